"""The packed Vision Transformer (NaViT): blocks, block-diagonal attention, per-image pooling.

`NaViT.forward` reads a PackedBatch (or packs a list of images itself) and returns one row
of logits per image, in image-id order. The positional encoding plugs in through the three
hooks of `navit_pe.posenc.base.PosEncoding`: an additive token embedding, an additive
attention bias (with, for Shaw's relative encoding, its value term), and a rotation of q and k.
The blocks run on the varlen layout (`Segments`: tokens regrouped by image; attention per
bucket of equal-length images) or, with attention="dense", on the packed layout with a dense
block-diagonal mask; both are tested to agree.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from . import positions
from .attention import Segments, biased_attention
from .config import NaViTConfig
from .packing import PackedBatch, drop_tokens, pack
from .posenc import PosContext, PosEncoding, build_posenc


# ----------------------------------------------------------------------------- dropout
def random_bytes(n: int, device: torch.device | str = "cpu") -> Tensor:
    """n random uint8 values. On CPU from numpy's SFC64 (2.6x the speed of torch's mt19937 here),
    seeded by one draw from torch's default generator, so torch.manual_seed and a restored RNG
    state (resume) reproduce them."""
    if torch.device(device).type != "cpu":
        return torch.randint(0, 256, (n,), dtype=torch.uint8, device=device)
    seed = int(torch.randint(0, 2**62, ()))
    raw = np.random.SFC64(seed).random_raw((n + 7) // 8)
    return torch.from_numpy(raw.view(np.uint8)[:n])


def byte_mask(bytes_: Tensor, p: float, dtype: torch.dtype) -> Tensor:
    """Inverted-dropout multipliers from random bytes b (uint8): 0 where b < t = round(p * 256),
    else 256 / (256 - t). Made as clamp(b - (t - 1), 0, 1) * scale in `dtype` (exact: b is an
    integer 0..255), which is 2.3x faster on CPU than comparing bytes and casting a bool mask.
    The drop rate is p rounded to 1/256 (0.1 -> 26/256 = 0.1016)."""
    t = round(p * 256)
    if t >= 256:
        return torch.zeros(bytes_.shape, dtype=dtype, device=bytes_.device)
    return (bytes_.to(dtype) - (t - 1)).clamp(0, 1) * (256.0 / (256 - t))


def dropped(x: Tensor, bytes_: Tensor | None, p: float) -> Tensor:
    """x with inverted dropout from the random `bytes_` (one per element of x); None: x as it is."""
    return x if bytes_ is None else x * byte_mask(bytes_, p, x.dtype)


def fast_dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Inverted dropout with one random byte per element (`byte_mask`): `nn.Dropout` draws a float
    per element and its bool-mask ops are slow on CPU (about a fifth of a small ViT step here)."""
    t = round(p * 256)
    if not training or t <= 0:
        return x
    if t >= 256:
        return torch.zeros_like(x)
    return dropped(x, random_bytes(x.numel(), x.device).view(x.shape), p)


class Dropout(nn.Module):
    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return fast_dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


# ----------------------------------------------------------------------------- blocks
class Attention(nn.Module):
    def __init__(self, cfg: NaViTConfig, layer: int):
        super().__init__()
        self.heads, self.layer = cfg.heads, layer
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, qkv: Tensor, mask: Tensor | None, pe: PosEncoding, ctx: PosContext,
                segments: Segments | None = None) -> Tensor:
        """qkv [B, L, 3 dim] (the projection of the normed tokens) in packed layout with a dense
        `mask`, or [1, S, 3 dim] in the slot layout of `segments` (tokens grouped by image, see
        Segments) -> the heads' outputs merged, [B, L, dim] fp32 (before the output projection)."""
        with torch.autocast(qkv.device.type, enabled=False):  # attention in fp32: bf16 SDPA backward is slow on CPU
            qkv = rearrange(qkv.float(), "b n (three h d) -> b n three h d", three=3, h=self.heads)
            q, k, v = rearrange(qkv, "b n three h d -> three b h n d")
            # positional hooks: rotate q and k, then an additive bias on the logits
            q_rot, k_rot = pe.rotate(q, k, ctx, self.layer)
            if segments is not None and pe.explicit_softmax:  # varlen, explicit softmax
                return segments.attend_with_bias(*(t.squeeze(0).transpose(0, 1) for t in (q_rot, k_rot, v)), pe, ctx,
                                                 self.layer).unsqueeze(0)
            if segments is not None:  # varlen: each image attends within its own bucket
                if q_rot is not q or k_rot is not k:  # rotated: gather the new q and k with v
                    # "three b h n d -> b n three h d" in the one copy that stack makes
                    qkv = torch.stack([t.transpose(1, 2) for t in (q_rot, k_rot, v)], dim=2)
                # squeeze, not [0]: the backward of a view is a view, that of an index a zero-filled copy
                qkv = qkv.squeeze(0)
                if not pe.widens_attention:
                    return segments.attend(qkv).unsqueeze(0)
                # the encoding's bias and value term as extra channels of q, k, v, on the flash kernel; the
                # logits keep the scale of the head width d (the kernel's default would be that of the wider d')
                s, _, h, d = qkv.shape
                out = segments.attend(pe.widen(qkv, ctx, self.layer), scale=d ** -0.5).view(s, h, -1)
                return pe.narrow(out, ctx, self.layer).view(1, s, h * d)
            q, k = q_rot, k_rot
            if pe.value_term:  # explicit softmax: the encoding also adds a term to the values
                out = biased_attention(q, k, v, mask, pe, ctx, self.layer)
            else:  # dense block-diagonal mask over the whole sequence
                bias = pe.attn_bias(q, ctx, self.layer)
                attn_mask = mask if bias is None else bias.masked_fill(~mask, float("-inf"))
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
            return rearrange(out, "b h n d -> b n (h d)")


class MLP(nn.Module):
    def __init__(self, cfg: NaViTConfig):
        super().__init__()
        hidden = int(cfg.dim * cfg.mlp_ratio)
        self.fc1, self.fc2 = nn.Linear(cfg.dim, hidden), nn.Linear(hidden, cfg.dim)


class Block(nn.Module):
    """Pre-norm transformer block, in three parts: `pre` (norm, qkv projection), attention (fp32,
    never compiled), `post` (output projection, dropout, residual, then the MLP half). `pre` and
    `post` are plain tensor code that `NaViT.compile_blocks` can hand to torch.compile; their
    dropout masks come in as random bytes drawn outside (see `byte_mask`)."""

    def __init__(self, cfg: NaViTConfig, layer: int):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(cfg.dim), Attention(cfg, layer)
        self.norm2, self.mlp = nn.LayerNorm(cfg.dim), MLP(cfg)
        self.p = cfg.dropout
        self.pre_fn, self.post_fn = self.pre, self.post  # replaced by compiled versions (compile_blocks)

    def forward(self, x: Tensor, mask: Tensor | None, pe: PosEncoding, ctx: PosContext,
                segments: Segments | None = None) -> Tensor:
        # 1. norm and qkv projection; 2. attention; 3. projection, dropout, residual, MLP
        # (compiled parts in training only: evaluation runs the same eager code as a reloaded model)
        pre, post = (self.pre_fn, self.post_fn) if self.training else (self.pre, self.post)
        a = self.attn(pre(x), mask, pe, ctx, segments)
        drops = (None,) * 3
        if self.training and round(self.p * 256) > 0:  # one draw of random bytes for the block's 3 dropouts
            s, d, hid = x.shape[:-1].numel(), x.shape[-1], self.mlp.fc1.out_features
            drops = random_bytes(s * (2 * d + hid), x.device).split([s * d, s * hid, s * d])
            drops = tuple(m.view(*x.shape[:-1], -1) for m in drops)
        return post(x, a, *drops)

    def pre(self, x: Tensor) -> Tensor:
        return self.attn.qkv(self.norm1(x)).float()  # fp32 for attention (the cast fuses when compiled)

    def post(self, x: Tensor, a: Tensor, m1: Tensor | None, m2: Tensor | None, m3: Tensor | None) -> Tensor:
        x = x + dropped(self.attn.proj(a), m1, self.p)
        h = dropped(F.gelu(self.mlp.fc1(self.norm2(x))), m2, self.p)
        return x + dropped(self.mlp.fc2(h), m3, self.p)


# ----------------------------------------------------------------------------- pooling
def segment_mean(x: Tensor, ids: Tensor, n: int) -> Tensor:
    """x [T, D], ids [T] in 0..n-1 -> [n, D] mean over each id's rows."""
    out = torch.zeros(n, x.shape[-1], dtype=x.dtype, device=x.device).index_add_(0, ids, x)
    count = torch.bincount(ids, minlength=n).clamp(min=1).to(x.dtype)
    return out / count[:, None]


class AttentionPool(nn.Module):
    """One learned query per image attends over that image's patch tokens (multi-head)."""

    def __init__(self, cfg: NaViTConfig):
        super().__init__()
        self.heads = cfg.heads
        self.query = nn.Parameter(torch.randn(cfg.heads, cfg.head_dim) * 0.02)
        self.kv = nn.Linear(cfg.dim, 2 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, x: Tensor, ids: Tensor, n: int) -> Tensor:
        # x [T, D] tokens of all images, ids [T]: a softmax over each image's tokens
        k, v = rearrange(self.kv(x), "t (two h d) -> two t h d", two=2, h=self.heads).float()
        logits = (k * self.query).sum(-1) * k.shape[-1] ** -0.5  # [T, h]
        idx = ids[:, None].expand_as(logits)
        peak = torch.full((n, self.heads), float("-inf"), device=x.device).scatter_reduce(
            0, idx, logits, reduce="amax", include_self=True)
        w = (logits - peak[ids]).exp()
        denom = torch.zeros(n, self.heads, device=x.device).index_add_(0, ids, w)
        w = w / denom[ids]
        out = torch.zeros(n, self.heads, v.shape[-1], device=x.device).index_add_(0, ids, w[..., None] * v)
        return self.proj(rearrange(out, "n h d -> n (h d)").to(x.dtype))


# ----------------------------------------------------------------------------- the model
class NaViT(nn.Module):
    """A ViT over packed sequences. `NaViT(pos_embed="rope", dim=192, ...)` or `NaViT(config)`."""

    def __init__(self, pos_embed: str | NaViTConfig = "sincos", **kwargs):
        super().__init__()
        cfg = pos_embed if isinstance(pos_embed, NaViTConfig) else NaViTConfig(pos_embed=pos_embed, **kwargs)
        cfg.validate()
        self.config = cfg
        patch_dim = cfg.channels * cfg.patch_size ** 2
        self.patch_embed = nn.Linear(patch_dim, cfg.dim)
        self.cls_token = nn.Parameter(torch.zeros(cfg.dim)) if cfg.pool == "cls" else None
        self.pos = build_posenc(cfg.pos_embed, cfg)
        self.drop = Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim)
        self.attn_pool = AttentionPool(cfg) if cfg.pool == "attn" else None
        self.head = nn.Linear(cfg.dim, cfg.num_classes)
        self.token_drop: float = 0.0  # fraction of patches dropped per image, training mode only
        self.apply(self._init_weights)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=0.02)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # -- input handling
    def pack(self, images: Sequence[Tensor], labels=None) -> PackedBatch:
        """Pack a list of images [C, H, W] the way this model expects (CLS slots for pool=cls)."""
        cfg = self.config
        return pack(images, cfg.patch_size, cfg.max_seq_len, labels, cls_token=cfg.pool == "cls")

    def _check(self, batch: PackedBatch) -> None:
        cfg = self.config
        p_dim = cfg.channels * cfg.patch_size ** 2
        if batch.patches.shape[-1] != p_dim:
            raise ValueError(f"patches have {batch.patches.shape[-1]} values, the model expects "
                             f"{p_dim} (channels={cfg.channels}, patch_size={cfg.patch_size})")
        n_cls = int(batch.is_cls.sum())
        if cfg.pool == "cls" and n_cls != batch.num_images:
            raise ValueError(f"pool='cls' needs one CLS slot per image; the batch has {n_cls} for "
                             f"{batch.num_images} images (pack with cls_token=True)")
        if cfg.pool != "cls" and n_cls:
            raise ValueError(f"pool={cfg.pool!r} takes batches packed without CLS slots (cls_token=False)")

    def compile_blocks(self) -> "NaViT":
        """torch.compile the per-token parts of every block (norms, projections, MLP, dropout
        multiplies, residuals) with dynamic shapes; attention stays eager. The
        first steps then take longer (compilation, about a minute on 2 cores) and the rest run
        faster; the weights and their names are unchanged. The encoding compiles its own per-token
        work (`compile_parts`, e.g. the rotary rotation)."""
        for block in self.blocks:
            block.pre_fn = torch.compile(block.pre, dynamic=True)
            block.post_fn = torch.compile(block.post, dynamic=True)
        self.pos.compile_parts()  # e.g. the rotary encodings' rotation
        return self

    # -- forward
    def forward(self, x: PackedBatch | Sequence[Tensor]) -> Tensor:
        batch = x if isinstance(x, PackedBatch) else self.pack(x)
        self._check(batch)
        if self.training and self.token_drop > 0:
            batch = drop_tokens(batch, self.token_drop)
        n = batch.num_images
        ctx = self._positions(PosContext(batch.coords, batch.grid, batch.is_cls, batch.image_ids))
        patches = batch.patches
        # layout: varlen (tokens regrouped by image, once, for the whole forward) unless asked
        # for the dense block-diagonal mask over the packed sequence
        mask = segments = None
        if self.config.attention == "dense":
            mask = batch.attention_mask()
        else:
            segments = Segments(batch.image_ids, self.varlen_granularity())
            ctx = segments.context(ctx)
            patches = segments.to_slots(patches.reshape(-1, patches.shape[-1])).unsqueeze(0)
        # embed patches; the CLS slots take the learned CLS token
        h = self.patch_embed(patches)
        if self.cls_token is not None:
            h = torch.where(ctx.is_cls.unsqueeze(-1), self.cls_token.to(h.dtype), h)
        # additive positional embedding (none for encodings that act inside attention)
        emb = self.pos.embed(ctx)
        if emb is not None:
            h = h + emb.to(h.dtype)
        h = self.drop(h)
        # transformer blocks; no token ever attends to another image
        for block in self.blocks:
            h = block(h, mask, self.pos, ctx, segments)
        h = self.norm(h)
        # pool each image on its own, in image-id order
        return self.head(self._pool(h, ctx, n))

    # explicit-softmax buckets rounded up to this many tokens: one bucket per ~16 lengths instead of one
    # per length; for fire_2d / alibi_2d 13-15 % faster a default-mix step (2 threads, bf16)
    EXPLICIT_GRANULARITY = 16

    def varlen_granularity(self) -> int:
        """The configured bucket granularity, or for 0 (auto) EXPLICIT_GRANULARITY where attention
        is an explicit softmax (`PosEncoding.explicit_softmax`: a bias or value term, not widened) and 1
        for the flash kernel."""
        g = self.config.varlen_granularity
        if g:
            return g
        return self.EXPLICIT_GRANULARITY if self.pos.explicit_softmax else 1

    def _positions(self, ctx: PosContext) -> PosContext:
        """Training: coordinate augmentation, then the trained extent is recorded. Eval with
        pos_mode "interpolate": images beyond the trained extent scaled onto it."""
        cfg = self.config
        if self.training:
            ctx = positions.augment(ctx, cfg.coord_shift, cfg.coord_jitter, cfg.coord_rescale)
            positions.record_extent(self.pos.trained_extent, ctx)
        elif cfg.pos_mode == "interpolate" and not self.pos.same_in_both_modes:
            ctx = positions.interpolate(ctx, self.pos.trained_extent)
        return ctx

    def set_pos_mode(self, mode: str) -> None:
        """Test-time position mode: "extrapolate" or "interpolate" (see navit_pe/positions.py)."""
        if mode not in positions.POS_MODES:
            raise ValueError(f"unknown pos_mode {mode!r}; choose one of {', '.join(positions.POS_MODES)}")
        self.config.pos_mode = mode

    def _pool(self, h: Tensor, ctx: PosContext, n: int) -> Tensor:
        pool = self.config.pool
        if pool == "cls":
            out = torch.empty(n, h.shape[-1], dtype=h.dtype, device=h.device)
            out[ctx.image_ids[ctx.is_cls]] = h[ctx.is_cls]
            return out
        sel = ctx.is_patch
        tokens, ids = h[sel], ctx.image_ids[sel]
        if pool == "mean":
            return segment_mean(tokens, ids, n)
        return self.attn_pool(tokens, ids, n)

    # -- optimisation helpers
    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: no decay on norms, biases, the CLS token, pooling query, RoPE frequencies."""
        no_decay_pos = {f"pos.{n}" for n in self.pos.no_weight_decay()}
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            if p.ndim <= 1 or name in no_decay_pos or name in ("cls_token", "attn_pool.query"):
                no_decay.append(p)
            else:
                decay.append(p)
        return [{"params": decay, "weight_decay": weight_decay},
                {"params": no_decay, "weight_decay": 0.0}]

    def num_params(self, only_pos: bool = False) -> int:
        mod = self.pos if only_pos else self
        return sum(p.numel() for p in mod.parameters())

    # -- save / load
    def save_pretrained(self, out_dir: str | Path) -> None:
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        tmp = out / "model.safetensors.tmp"
        save_file(state, str(tmp))
        tmp.replace(out / "model.safetensors")
        tmp = out / "config.json.tmp"
        tmp.write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        tmp.replace(out / "config.json")

    @classmethod
    def from_pretrained(cls, run_dir: str | Path, map_location: str = "cpu") -> "NaViT":
        """Rebuild a model from `config.json` and `model.safetensors` in `run_dir` alone."""
        from safetensors.torch import load_file

        run = Path(run_dir)
        model = cls(NaViTConfig.load(run / "config.json"))
        model.load_state_dict(load_file(str(run / "model.safetensors"), device=map_location))
        return model
