"""Model configuration: one dataclass, saved with every model (config.json), from which
`NaViT(config)` / `NaViT.from_pretrained(run_dir)` rebuild the model alone."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path


@dataclass
class NaViTConfig:
    pos_embed: str = "sincos"  # positional encoding, one of navit_pe.posenc.POS_EMBEDS
    num_classes: int = 10  # classifier outputs
    patch_size: int = 4  # square patch side in pixels
    channels: int = 3  # image channels
    dim: int = 128  # token width
    depth: int = 6  # transformer blocks
    heads: int = 4  # attention heads (head_dim = dim // heads)
    mlp_ratio: float = 2.0  # MLP hidden width = mlp_ratio * dim
    dropout: float = 0.1  # dropout on the patch embedding, the attention output and the MLP
    pool: str = "cls"  # "cls" (CLS token per image), "mean" (masked mean), "attn" (attention pooling)
    max_seq_len: int = 256  # tokens per packed sequence when the model packs a list of images itself
    attention: str = "auto"  # "dense" (block-diagonal mask over L), "varlen" (tokens regrouped by image),
    #                          "auto": varlen, the faster layout for every encoding (kept so saved configs load)
    varlen_granularity: int = 0  # varlen: images whose lengths round up to the same multiple share a bucket;
    #                              0 (auto): 16 where attention is an explicit softmax (an encoding with a bias
    #                              that does not widen q, k, v: fewer, padded buckets), else 1 (exact lengths,
    #                              flash kernel)
    # -- positional-encoding options (each encoding reads the ones it needs)
    pos_grid: int = 8  # learned_1d: side of the training grid its table is laid out on (8x8 = 32px / 4)
    max_grid: int = 16  # learned_2d, factorized: table side; positions beyond clamp to the last entry
    factorized_mode: str = "sum"  # factorized: "sum" or "concat" of the row and column embeddings
    fractional_fn: str = "table"  # fractional: "table" (interpolated), "sincos" or "fourier" of r
    fractional_bins: int = 16  # fractional "table": entries per axis over r in [0, 1]
    max_relative_distance: int = 2  # relative: distances clamped to +-k
    rope_base: float = 100.0  # rope: frequency base of the axial rotary encoding
    rope_mixed_base: float = 10.0  # rope_mixed: base of the initial frequency magnitudes
    # -- positions (navit_pe/positions.py)
    pos_mode: str = "extrapolate"  # at eval: "extrapolate" (test grid as is) or "interpolate" (scaled into
    #                                the trained extent); settable on a trained model
    coord_shift: float = 0.0  # training: uniform offset per image and axis in [-S, S] patches (0: off)
    coord_jitter: float = 1.0  # training: per-axis log-uniform scale in [1/J, J] (1: off)
    coord_rescale: float = 1.0  # training: one log-uniform scale per image in [1/R, R] (1: off)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "NaViTConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; this version knows {sorted(known)}")
        return cls(**d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "NaViTConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    def validate(self) -> None:
        if self.dim % self.heads:
            raise ValueError(f"dim={self.dim} is not divisible by heads={self.heads}")
        if self.pool not in ("cls", "mean", "attn"):
            raise ValueError(f"unknown pool {self.pool!r}; choose one of cls, mean, attn")
        if self.attention not in ("auto", "dense", "varlen"):
            raise ValueError(f"unknown attention {self.attention!r}; choose one of auto, dense, varlen")
        if self.varlen_granularity < 0:
            raise ValueError(f"varlen_granularity must be 0 (auto) or positive, got {self.varlen_granularity}")
        if self.pos_mode not in ("extrapolate", "interpolate"):
            raise ValueError(f"unknown pos_mode {self.pos_mode!r}; choose one of extrapolate, interpolate")
        if self.coord_shift < 0 or self.coord_jitter < 1 or self.coord_rescale < 1:
            raise ValueError(f"need coord_shift >= 0, coord_jitter >= 1, coord_rescale >= 1 (off: 0, 1, 1), got "
                             f"{self.coord_shift}, {self.coord_jitter}, {self.coord_rescale}")
        if self.patch_size < 1:
            raise ValueError(f"patch_size must be positive, got {self.patch_size}")
