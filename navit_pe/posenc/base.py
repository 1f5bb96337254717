"""The one interface every positional encoding implements.

A transformer can learn position at three points, and every encoding uses one or more:
1. `embed(ctx)`            -> [B, L, dim] added to the tokens before the first block;
2. `attn_bias(q, ctx, i)`  -> [B, heads, L, L] added to the attention logits of block i;
3. `rotate(q, k, ctx, i)`  -> (q, k) rotated before the logits of block i are taken.
An encoding whose bias also has a value part (Shaw et al.'s relative encoding) sets
`value_term = True` and implements `attn_value(probs, ctx, i)`; attention then runs the
explicit softmax path instead of `F.scaled_dot_product_attention`. Where the bias and the value
term depend on the key only through its row and column, the encoding can also set
`widens_attention` and implement `widen` / `narrow`: the same attention as extra channels of
q, k and v, which the varlen layout runs on the flash kernel (`relative` does).

All hooks receive a `PosContext` built once per forward from the PackedBatch, so they work
inside packed sequences and on any grid: coordinates and grids come from the data, nothing
is precomputed for a fixed size. Per-forward tensors an encoding derives (rotation angles,
clamped distance indices) go into `ctx.cache` and are shared by all blocks.

Layouts: the context is [B, L] in the packed layout, or [1, S] in the model's varlen layout
(tokens regrouped image by image; unused slots look like padding: image_ids -1, grid 0).
Hooks must treat every token by its own fields only.

Positions: `coords` are the integer patch indices; `pos` are the float positions the encodings
read, pos = coords * scale + offset per image and axis (`navit_pe.positions`): equal to coords
unless coordinate augmentation (training) or position interpolation (eval, pos_mode
"interpolate") scaled or moved them. `scale` is that per-image, per-axis factor. Every
encoding records nothing itself: the model keeps `trained_extent` (a buffer of this base
class, in the state dict) up to date in training mode. The pairwise hooks (`attn_bias`,
`attn_value`) get [B, L] contexts only: the packed layout, or in the varlen layout one bucket
at a time as [images, length] (one image per row, shorter images' extra keys masked).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..config import NaViTConfig


@dataclass
class PosContext:
    coords: Tensor  # [B, L, 2] long (row, col) of each patch; 0 on CLS and padding
    grid: Tensor  # [B, L, 2] long (h, w) of the token's image, in patches; 0 on padding
    is_cls: Tensor  # [B, L] bool, the CLS slot of each image
    image_ids: Tensor  # [B, L] long, -1 on padding
    pos: Tensor | None = None  # [B, L, 2] float positions read by the encodings; default coords (0 off patches)
    scale: Tensor | None = None  # [B, L, 2] float: pos = coords * scale + offset; default 1
    cache: dict = field(default_factory=dict)  # per-forward values shared across blocks

    def __post_init__(self):
        if self.pos is None:
            self.pos = self.coords.float() * self.is_patch.unsqueeze(-1).float()
        if self.scale is None:
            self.scale = torch.ones(self.coords.shape, device=self.coords.device)

    @property
    def is_patch(self) -> Tensor:
        return (self.image_ids >= 0) & ~self.is_cls

    @property
    def extent(self) -> Tensor:
        """[B, L, 2] float: the image's span along each axis in position units, (grid - 1) * scale + 1."""
        return (self.grid - 1).clamp(min=0) * self.scale + 1

    def map(self, fn) -> "PosContext":
        """The same context with `fn` applied to every tensor field (a new, empty cache)."""
        return PosContext(*(fn(t) for t in (self.coords, self.grid, self.is_cls, self.image_ids, self.pos,
                                             self.scale)))


class PosEncoding(nn.Module):
    """Base class: by default every hook is the identity, i.e. no position at all."""

    name: ClassVar[str] = ""
    cls_handling: ClassVar[str] = ""  # one line for the README: what happens to the CLS token
    uses_embed: ClassVar[bool] = False  # which hooks this encoding implements
    uses_bias: ClassVar[bool] = False
    uses_rotate: ClassVar[bool] = False
    value_term: ClassVar[bool] = False
    relative: ClassVar[bool] = False  # patch-patch logits depend on position differences only
    widens_attention: ClassVar[bool] = False  # bias and value term as extra channels of q, k, v (`widen`)
    same_in_both_modes: ClassVar[bool] = False  # pos_mode "interpolate" == "extrapolate" (grid-relative)
    mirror_symmetric: ClassVar[bool] = False  # a mirrored image gives the same logits (distance-only bias)
    bias_from_positions: ClassVar[bool] = False  # attn_bias reads the context only (q for its device): images
    # with the same positions share one bias, computed once per bucket of them and broadcast

    def __init__(self, cfg: NaViTConfig):
        super().__init__()
        self.cfg = cfg
        # largest position + 1 per (row, col) seen in training mode; 0: never trained
        self.register_buffer("trained_extent", torch.zeros(2))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # models saved before the trained extent was tracked: keep 0 (unknown)
        state_dict.setdefault(prefix + "trained_extent", self.trained_extent.clone())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def readable_extent(self, size: int) -> Tensor:
        """[2] float: how many rows / cols of a `size`-entry table were trained (all if unknown)."""
        t = self.trained_extent
        return torch.where(t > 0, t.clamp(1, size), torch.full_like(t, float(size)))

    def embed(self, ctx: PosContext) -> Tensor | None:
        return None

    def attn_bias(self, q: Tensor, ctx: PosContext, layer: int) -> Tensor | None:
        return None

    def rotate(self, q: Tensor, k: Tensor, ctx: PosContext, layer: int) -> tuple[Tensor, Tensor]:
        return q, k

    @property
    def explicit_softmax(self) -> bool:
        """Whether varlen attention must be an explicit softmax (a bias on the logits or a value
        term), not the flash kernel: not where the encoding widens q, k and v instead."""
        return (self.uses_bias or self.value_term) and not self.widens_attention

    def widen(self, qkv: Tensor, ctx: PosContext, layer: int) -> Tensor:
        """For `widens_attention` encodings, in the varlen slot layout (ctx [1, S]): qkv [S, 3, h, d]
        -> [S, 3, h, d'] such that plain softmax attention over the widened q, k, v at scale
        d^-0.5 gives the logits of `attn_bias` exactly and carries in its extra output channels
        what `narrow` needs for the value term. The flash kernel can then run the encoding."""
        raise NotImplementedError

    def narrow(self, out: Tensor, ctx: PosContext, layer: int) -> Tensor:
        """The attention output over `widen`'s q, k, v [S, h, d'] -> [S, h, d], value term added."""
        raise NotImplementedError

    def compile_parts(self) -> None:
        """torch.compile the encoding's own per-token work for training (NaViT.compile_blocks);
        by default there is none worth it."""

    def attn_value(self, probs: Tensor, ctx: PosContext, layer: int) -> Tensor:
        raise NotImplementedError

    def no_weight_decay(self) -> set[str]:
        """Names (relative to this module) of parameters to exclude from weight decay."""
        return set()


CLS_ZERO = "no position added (zero vector); the CLS token is its own learned vector"


def zero_cls_and_padding(emb: Tensor, ctx: PosContext) -> Tensor:
    """Additive encodings give CLS and padding no position (CLS is a learned token already)."""
    return emb * ctx.is_patch.unsqueeze(-1).to(emb.dtype)


def sincos_1d(pos: Tensor, dim: int, base: float = 10000.0) -> Tensor:
    """pos [...] (float) -> [..., dim]: [sin(pos * w_0..w_{dim/2-1}), cos(pos * w_0..)],
    w_k = base^(-k / (dim/2)). The 1-D building block of the MAE-style 2-D table."""
    half = dim // 2
    omega = base ** (-torch.arange(half, dtype=torch.float64, device=pos.device) / half)
    ang = pos.double().unsqueeze(-1) * omega
    return torch.cat([ang.sin(), ang.cos()], dim=-1).float()
