"""`relative`: Shaw et al. (2018) relative position representations, in 2-D.

Every layer has four tables shared by the heads: key-row, key-col, value-row, value-col,
each [2k+2, head_dim/2] (k = cfg.max_relative_distance). Between query i and key j of one
image, dr = clamp(r_j - r_i, -k, k) + k and dc likewise index the tables; entry 2k+1 is
the CLS entry, used whenever i or j is a CLS token. The relative vector a_ij is the concat
[row_table[dr], col_table[dc]] along head_dim, so

    logits_ij = q_i . (k_j + a^K_ij) / sqrt(d)
              = q_i . k_j / sqrt(d) + (q_i[:d/2] . R^K[dr] + q_i[d/2:] . C^K[dc]) / sqrt(d)
    out_i     = sum_j p_ij (v_j + a^V_ij).

No [B, h, L, L, d] tensor is built: the key term gathers from q . table^T ([B, h, L, 2k+2]
per axis), the value term scatter-adds the probabilities into 2k+2 bins per axis and
multiplies the bins by the value tables. Pairs across images get some valid index; the
block-diagonal mask removes them anyway.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import NaViTConfig
from .base import PosContext, PosEncoding


class Relative2D(PosEncoding):
    name = "relative"
    cls_handling = "a learned CLS entry (index 2k+1 of each table) for every pair with a CLS query or key"
    uses_bias = True
    value_term = True

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

    def indices(self, ctx: PosContext) -> tuple[Tensor, Tensor]:
        """Clamped distance indices (rows, cols), each [B, 1, L, L] long, cached per forward."""
        if "relative_idx" not in ctx.cache:
            k = self.k
            pos = ctx.coords
            dist = pos[:, None, :, :] - pos[:, :, None, :]  # [B, i, j, 2]: (r_j - r_i, c_j - c_i)
            idx = dist.clamp(-k, k) + k
            cls_pair = ctx.is_cls[:, :, None] | ctx.is_cls[:, None, :]  # [B, i, j]
            idx = idx.masked_fill(cls_pair[..., None], 2 * k + 1)
            ctx.cache["relative_idx"] = (idx[..., 0].unsqueeze(1).contiguous(),  # [B, 1, i, j]
                                         idx[..., 1].unsqueeze(1).contiguous())
        return ctx.cache["relative_idx"]

    def attn_bias(self, q: Tensor, ctx: PosContext, layer: int) -> Tensor:
        rows, cols = self.indices(ctx)
        b, h, n, d = q.shape
        q_row, q_col = q.split(d // 2, dim=-1)
        # q . table^T per axis: [B, h, L, 2k+2], then pick each pair's bin
        s_row = q_row @ self.key_row[layer].to(q.dtype).T
        s_col = q_col @ self.key_col[layer].to(q.dtype).T
        bias = s_row.gather(-1, rows.expand(b, h, n, n)) + s_col.gather(-1, cols.expand(b, h, n, n))
        return bias * d ** -0.5  # Shaw: the relative key term shares the 1/sqrt(d) of q . k

    def attn_value(self, probs: Tensor, ctx: PosContext, layer: int) -> Tensor:
        rows, cols = self.indices(ctx)
        b, h, n, _ = probs.shape
        bins = 2 * self.k + 2
        # total probability of each distance bin per query: [B, h, L, 2k+2] per axis
        p_row = probs.new_zeros(b, h, n, bins).scatter_add_(-1, rows.expand(b, h, n, n), probs)
        p_col = probs.new_zeros(b, h, n, bins).scatter_add_(-1, cols.expand(b, h, n, n), probs)
        out_row = p_row @ self.value_row[layer].to(probs.dtype)  # [B, h, L, d/2]
        out_col = p_col @ self.value_col[layer].to(probs.dtype)
        return torch.cat([out_row, out_col], dim=-1)
