"""`lookhere`: LookHere (Fuller et al., NeurIPS 2024), variant LH-180, as an attention bias.

Every head looks in one direction: heads cycle through up, left, down, right (head h gets
direction h mod 4; this order gives two heads one vertical and one horizontal view). A query at
(r, c) sees only the keys of its half-plane, boundary included (up: rows <= r; left: cols <= c;
down: rows >= r; right: cols >= c): a 180-degree field of view. Keys outside it get the bias
MASKED (finite, so a masked pair stays a number; its softmax weight is exactly 0 in fp32).
Inside, the bias is minus a distance penalty: slope x layer factor x the Euclidean patch
distance, with slopes 2^-(1 + h // 4) (one slope per group of four directions, as in the
paper's code) and layer factors falling linearly from 1.5 in the first block to 0.5 in the
last. No learned parameters.

Direction tests and distances use the float positions ctx.pos; scaling positions (pos_mode
"interpolate", augmentation) keeps the fields of view and shrinks or stretches the distances.
CLS is unrestricted: no mask and no penalty on any pair with a CLS query or key.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..config import NaViTConfig
from .alibi import pair_distance, pair_offsets
from .base import PosContext, PosEncoding

MASKED = -1e4  # bias outside a head's field of view
LAYER_SLOPES = (1.5, 0.5)  # penalty factor of the first and last block, linear in between


class LookHere(PosEncoding):
    name = "lookhere"
    cls_handling = "unrestricted: no direction mask and no distance penalty on pairs with a CLS query or key"
    uses_bias = True
    bias_from_positions = True
    relative = True

    def __init__(self, cfg: NaViTConfig):
        super().__init__(cfg)
        heads = torch.arange(cfg.heads)
        self.register_buffer("direction", heads % 4, persistent=False)  # 0 up, 1 left, 2 down, 3 right
        slopes = 2.0 ** -(1.0 + (heads // 4).float())
        layers = torch.linspace(*LAYER_SLOPES, cfg.depth) if cfg.depth > 1 else torch.tensor([LAYER_SLOPES[0]])
        self.register_buffer("slopes", layers[:, None] * slopes[None], persistent=False)  # [depth, heads]

    def outside_view(self, ctx: PosContext) -> Tensor:
        """[B, heads, i, j] bool: key j lies outside query i's field of view in that head; cached."""
        if "lookhere_outside" not in ctx.cache:
            off, cls_pair = pair_offsets(ctx)  # pos_j - pos_i
            dr, dc = off[..., 0], off[..., 1]
            outside = torch.stack([dr > 0, dc > 0, dr < 0, dc < 0], dim=1)  # up, left, down, right
            ctx.cache["lookhere_outside"] = outside[:, self.direction] & ~cls_pair[:, None]
        return ctx.cache["lookhere_outside"]

    def attn_bias(self, q: Tensor, ctx: PosContext, layer: int) -> Tensor:
        penalty = -self.slopes[layer].view(1, -1, 1, 1) * pair_distance(ctx)  # [B, heads, i, j]
        return penalty.masked_fill(self.outside_view(ctx), MASKED)
