"""navit-pe: a packed (NaViT-style) Vision Transformer for comparing 2-D positional encodings."""
from .config import NaViTConfig
from .model import NaViT
from .packing import PackedBatch, drop_tokens, pack, patchify
from .posenc import POS_EMBEDS, build_posenc

__all__ = ["NaViT", "NaViTConfig", "PackedBatch", "pack", "patchify", "drop_tokens", "POS_EMBEDS", "build_posenc"]
