"""`alibi_2d`: ALiBi in 2-D (CROMA, Fuller et al. 2023): an attention bias of minus a per-head
slope times the Euclidean distance between the two patches. No learned parameters.

Slopes are ALiBi's geometric sequence 2^(-8 k / heads), k = 1..heads, the same in every layer.
Distances come from the float positions ctx.pos, so pos_mode "interpolate" shrinks them
together with the grid. Pairs with a CLS query or key get no bias (CLS sees every patch alike).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..config import NaViTConfig
from .base import PosContext, PosEncoding

CLS_FREE = "no bias on any pair with a CLS query or key: CLS attends to and is seen by every patch alike"


def pair_offsets(ctx: PosContext) -> tuple[Tensor, Tensor]:
    """(offsets [B, i, j, 2] = pos_j - pos_i, cls_pair [B, i, j] bool), cached per forward."""
    if "pair_offsets" not in ctx.cache:
        off = ctx.pos[:, None, :, :] - ctx.pos[:, :, None, :]
        cls_pair = ctx.is_cls[:, :, None] | ctx.is_cls[:, None, :]
        ctx.cache["pair_offsets"] = (off, cls_pair)
    return ctx.cache["pair_offsets"]


def pair_distance(ctx: PosContext) -> Tensor:
    """[B, 1, i, j] Euclidean patch distance, 0 on pairs with CLS; cached, shared by the heads."""
    if "pair_distance" not in ctx.cache:
        off, cls_pair = pair_offsets(ctx)
        dist = off.square().sum(-1).sqrt().masked_fill(cls_pair, 0.0)
        ctx.cache["pair_distance"] = dist.unsqueeze(1)
    return ctx.cache["pair_distance"]


class ALiBi2D(PosEncoding):
    name = "alibi_2d"
    cls_handling = CLS_FREE
    uses_bias = True
    bias_from_positions = True
    relative = True
    mirror_symmetric = True  # Euclidean distance cannot tell left from right

    def __init__(self, cfg: NaViTConfig):
        super().__init__(cfg)
        k = torch.arange(1, cfg.heads + 1, dtype=torch.float32)
        self.register_buffer("slopes", 2.0 ** (-8.0 * k / cfg.heads), persistent=False)  # [heads]

    def attn_bias(self, q: Tensor, ctx: PosContext, layer: int) -> Tensor:
        if "alibi_bias" not in ctx.cache:  # the same in every layer: computed once per forward
            ctx.cache["alibi_bias"] = -self.slopes.view(1, -1, 1, 1) * pair_distance(ctx)  # "h, b 1 i j -> b h i j"
        return ctx.cache["alibi_bias"]
