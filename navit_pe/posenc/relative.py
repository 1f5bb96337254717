"""`relative`: Shaw et al. (2018) relative position representations, in 2-D.

Every layer has four tables shared by the heads: key-row, key-col, value-row, value-col,
each [2k+2, head_dim/2] (k = cfg.max_relative_distance). Between query i and key j of one
image, dr = clamp(r_j - r_i, -k, k) + k and dc likewise index the tables; entry 2k+1 is
the CLS entry, used whenever i or j is a CLS token. The relative vector a_ij is the concat
[row_table[dr], col_table[dc]] along head_dim, so

    logits_ij = q_i . (k_j + a^K_ij) / sqrt(d)
              = q_i . k_j / sqrt(d) + (q_i[:d/2] . R^K[dr] + q_i[d/2:] . C^K[dc]) / sqrt(d)
    out_i     = sum_j p_ij (v_j + a^V_ij).

No [B, h, L, L, d] tensor is built. The two axes share one joint index
n = dr * (2k+2) + dc, so each layer does a single gather and a single scatter over
[B, h, L, L]: the key term gathers from the (2k+2)^2 sums q_row . R^K[dr] + q_col . C^K[dc]
([B, h, L, (2k+2)^2], tiny), the value term scatter-adds the probabilities into the
(2k+2)^2 joint bins, sums them per axis and multiplies by the value tables. Pairs across
images get some valid index; the block-diagonal mask removes them anyway.
"""
from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn

from ..config import NaViTConfig
from .base import PosContext, PosEncoding


class Relative2D(PosEncoding):
    name = "relative"
    cls_handling = "a learned CLS entry (index 2k+1 of each table) for every pair with a CLS query or key"
    uses_bias = True
    value_term = True
    relative = True

    def __init__(self, cfg: NaViTConfig):
        super().__init__(cfg)
        if cfg.head_dim % 2:
            raise ValueError(f"relative needs an even head_dim, got {cfg.head_dim}")
        self.k = cfg.max_relative_distance
        shape = (cfg.depth, 2 * self.k + 2, cfg.head_dim // 2)  # per layer: [2k+2, d/2]
        self.key_row = nn.Parameter(torch.randn(shape) * 0.02)
        self.key_col = nn.Parameter(torch.randn(shape) * 0.02)
        self.value_row = nn.Parameter(torch.randn(shape) * 0.02)
        self.value_col = nn.Parameter(torch.randn(shape) * 0.02)

    def joint_index(self, ctx: PosContext) -> Tensor:
        """[B, 1, L, L] long: dr * (2k+2) + dc for query i (dim 2) and key j (dim 3), cached."""
        if "relative_idx" not in ctx.cache:
            k = self.k
            pos = ctx.pos  # float where augmented or interpolated: distances round to the nearest entry
            dist = pos[:, None, :, :] - pos[:, :, None, :]  # [B, i, j, 2]: (r_j - r_i, c_j - c_i)
            idx = dist.round().long().clamp(-k, k) + k
            cls_pair = ctx.is_cls[:, :, None] | ctx.is_cls[:, None, :]  # [B, i, j]
            idx = idx.masked_fill(cls_pair[..., None], 2 * k + 1)
            joint = idx[..., 0] * (2 * k + 2) + idx[..., 1]
            ctx.cache["relative_idx"] = joint.unsqueeze(1)  # shared by the heads
        return ctx.cache["relative_idx"]

    def attn_bias(self, q: Tensor, ctx: PosContext, layer: int) -> Tensor:
        index = self.joint_index(ctx)
        b, h, n, d = q.shape
        q_row, q_col = (q * d ** -0.5).split(d // 2, dim=-1)  # Shaw: the key term shares 1/sqrt(d)
        # q . table^T per axis [B, h, L, 2k+2], then all (dr, dc) sums: [B, h, L, (2k+2)^2]
        s_row = q_row @ self.key_row[layer].to(q.dtype).T
        s_col = q_col @ self.key_col[layer].to(q.dtype).T
        s = rearrange(s_row[..., :, None] + s_col[..., None, :], "b h i r c -> b h i (r c)")
        return s.gather(-1, index.expand(b, h, n, n))  # each pair picks its bin

    def attn_value(self, probs: Tensor, ctx: PosContext, layer: int) -> Tensor:
        index = self.joint_index(ctx)
        b, h, n, _ = probs.shape
        bins = 2 * self.k + 2
        # total probability of each joint bin per query, then per axis: [B, h, L, 2k+2]
        p = probs.new_zeros(b, h, n, bins * bins).scatter_add_(-1, index.expand(b, h, n, n), probs)
        p = rearrange(p, "b h i (r c) -> b h i r c", r=bins)
        out_row = p.sum(-1) @ self.value_row[layer].to(probs.dtype)  # [B, h, L, d/2]
        out_col = p.sum(-2) @ self.value_col[layer].to(probs.dtype)
        return torch.cat([out_row, out_col], dim=-1)
