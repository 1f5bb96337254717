"""`fire_2d`: FIRE (Li et al., ICLR 2024) in 2-D: a small MLP maps the log-transformed row and
column offsets, each normalized by the image's own extent, to one attention bias per head.

For query i and key j of one image, per axis a with offset d = pos_j - pos_i and extent E
(the image's span in positions, `PosContext.extent`):
    u_a = psi(d) / psi(max(E - 1, 1)),   psi(x) = sign(x) log(1 + c |x|),
    bias_ij = MLP_layer(u_row, u_col)    (2 -> 32 -> heads, ReLU; one MLP and one c per layer).
u lies in [-1, 1] on every grid: the normalization is FIRE's progressive interpolation, the log
its emphasis on near neighbours (c > 0 learned, through log c). FIRE's learned threshold L
of max(L, i) is left out: an image's extent is known, not causal.

Cost: positions are affine per image (pos = coords * scale + offset), so every pair's input
is fixed by the query image's (scale, extent) and the integer offset of the two patches. The
MLP therefore runs once per distinct (scale, extent) profile and offset in -(G-1)..G-1 per axis
(G the largest grid side present), and each pair gathers its row: [profiles, 2G-1, 2G-1]
MLP inputs instead of [B, L, L]. Pairs with a CLS query or key get no bias.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..config import NaViTConfig
from .alibi import CLS_FREE
from .base import PosContext, PosEncoding

HIDDEN = 32  # MLP width (FIRE's default)


def _uniform(*shape: int, fan_in: int) -> nn.Parameter:
    bound = 1 / math.sqrt(fan_in)  # nn.Linear's default init
    return nn.Parameter(torch.empty(*shape).uniform_(-bound, bound))


class FIRE2D(PosEncoding):
    name = "fire_2d"
    cls_handling = CLS_FREE
    uses_bias = True
    bias_from_positions = True
    relative = True

    def __init__(self, cfg: NaViTConfig):
        super().__init__(cfg)
        # raw parameters, not nn.Linear: the model's 0.02 init of its linears would silence the bias
        self.w1, self.b1 = _uniform(cfg.depth, 2, HIDDEN, fan_in=2), _uniform(cfg.depth, HIDDEN, fan_in=2)
        self.w2 = _uniform(cfg.depth, HIDDEN, cfg.heads, fan_in=HIDDEN)
        self.b2 = _uniform(cfg.depth, cfg.heads, fan_in=HIDDEN)
        self.log_c = nn.Parameter(torch.zeros(cfg.depth))  # c = 1 at init

    def no_weight_decay(self) -> set[str]:
        return {"log_c"}

    def pair_index(self, ctx: PosContext) -> tuple[Tensor, Tensor, int, Tensor]:
        """(profiles [P, 4] = (scale_r, scale_c, extent_r, extent_c), index [B, i, j] into the
        [P, 2G-1, 2G-1] offset table of the query's profile, G, cls_pair [B, i, j]); cached."""
        if "fire_index" not in ctx.cache:
            b, n = ctx.image_ids.shape
            g = max(int(ctx.grid.max()), 1) if ctx.grid.numel() else 1
            k = 2 * g - 1
            profiles, which = torch.unique(torch.cat([ctx.scale, ctx.extent], -1).view(-1, 4), dim=0,
                                           return_inverse=True)
            off = ctx.coords[:, None, :, :] - ctx.coords[:, :, None, :] + (g - 1)  # [B, i, j, 2] in 0..2G-2
            index = which.view(b, n, 1) * (k * k) + off[..., 0] * k + off[..., 1]
            cls_pair = ctx.is_cls[:, :, None] | ctx.is_cls[:, None, :]
            ctx.cache["fire_index"] = (profiles, index, g, cls_pair)
        return ctx.cache["fire_index"]

    def attn_bias(self, q: Tensor, ctx: PosContext, layer: int) -> Tensor:
        profiles, index, g, cls_pair = self.pair_index(ctx)
        c = self.log_c[layer].exp()

        def psi(x: Tensor) -> Tensor:
            return x.sign() * torch.log1p(c * x.abs())

        # normalized log offsets per profile and axis: [P, 2G-1, 2]
        offsets = torch.arange(1 - g, g, device=q.device, dtype=torch.float32)
        scale, extent = profiles[:, :2], profiles[:, 2:]
        u = psi(offsets[None, :, None] * scale[:, None, :]) / psi((extent - 1).clamp(min=1))[:, None, :]
        k = 2 * g - 1
        feats = torch.stack([u[:, :, None, 0].expand(-1, k, k), u[:, None, :, 1].expand(-1, k, k)], dim=-1)
        # the MLP on every (profile, dr, dc): [P, 2G-1, 2G-1, 2] -> [P * (2G-1)^2, heads]
        hidden = torch.relu(feats @ self.w1[layer] + self.b1[layer])
        table = (hidden @ self.w2[layer] + self.b2[layer]).view(-1, self.cfg.heads)
        # each pair gathers its row: "h (b i j) -> b h i j"
        b, n = index.shape[:2]
        bias = table.T.index_select(1, index.reshape(-1)).view(-1, b, n, n).transpose(0, 1)
        return bias.masked_fill(cls_pair[:, None], 0.0)
