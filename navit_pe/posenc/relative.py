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

The varlen layout runs it on the flash kernel instead (`widen` / `narrow`, no [L, L] tensor of
its own). The row term depends on the key only through the key's row b, so with G rows

    q_row . R^K[dr(i, j)] = sum_b Q_ib [row_j = b],   Q_ib = q_row . R^K[dr(i, b)],

a dot product of Q_i [G+1] with the key's one-hot row [G+1] (entry G: the CLS key). Appending
Q_i to q and the one-hot rows and columns to k gives the biased logits; appending the one-hots
to v makes attention return P_ib = sum_j p_ij [row_j = b], and the row value term is
sum_b P_ib R^V[dr(i, b)]. The head width grows from d to d + (rows + 1) + (cols + 1).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
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
    widens_attention = True

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

    # -- the same attention as extra channels of q, k, v (the varlen layout; module docstring)
    def axis_index(self, ctx: PosContext) -> tuple[Tensor, Tensor, Tensor]:
        """Cached per forward, for the slot-layout context [1, S]: (rows [S, 1, G_r+1] long: the
        table entry between query i and a key in row b of the same image, G_r for the CLS key;
        cols, likewise [S, 1, G_c+1]; hot [S, 2, 1, G_r+1 + G_c+1]: for k and v, each token's own row
        and column one-hot, CLS at G_r and G_c, zeros on padding)."""
        if "relative_axes" not in ctx.cache:
            k, cls = self.k, 2 * self.k + 1
            img, is_cls = ctx.image_ids[0], ctx.is_cls[0]
            patch = ctx.is_patch[0]
            n = int(img.max()) + 1 if img.numel() else 0
            entries, hots = [], []
            for a in (0, 1):  # rows, then columns ("line": a row or a column)
                coord, pos = ctx.coords[0, :, a], ctx.pos[0, :, a]
                lines = int(coord.max()) + 1 if coord.numel() else 1
                # the position of line b of every image, pos_j itself: positions are coords * scale + offset
                # per image and axis (navit_pe/positions.py), so the tokens of one line share it bit for bit
                line_pos = pos.new_zeros(n, lines).index_put_((img[patch], coord[patch]), pos[patch])
                dist = line_pos[img.clamp(min=0)] - pos.unsqueeze(-1)  # [S, lines]: pos_j - pos_i, key in line b
                entry = dist.round().long().clamp(-k, k) + k
                entry = torch.cat([entry, torch.full_like(entry[:, :1], cls)], -1)  # the CLS key
                entries.append(entry.masked_fill(is_cls.unsqueeze(-1), cls).unsqueeze(1))  # a CLS query: all CLS
                hot = F.one_hot(torch.where(is_cls, lines, coord), lines + 1)  # the CLS token at `lines`
                hots.append(hot * (img >= 0).unsqueeze(-1))  # padding: none (its keys are masked anyway)
            hot = torch.cat(hots, -1).to(ctx.pos.dtype)
            hot = torch.stack([hot, hot], 1).unsqueeze(2)
            ctx.cache["relative_axes"] = (*entries, hot)
        return ctx.cache["relative_axes"]

    def widen(self, qkv: Tensor, ctx: PosContext, layer: int) -> Tensor:
        rows, cols, hot = self.axis_index(ctx)
        s, _, h, d = qkv.shape
        q_row, q_col = qkv[:, 0].split(d // 2, dim=-1)
        # Q_ib = q_row . R^K[entry(i, b)]: q against the 2k+2 table rows, then each b picks its entry
        s_row = (q_row @ self.key_row[layer].to(qkv.dtype).T).gather(-1, rows.expand(s, h, -1))
        s_col = (q_col @ self.key_col[layer].to(qkv.dtype).T).gather(-1, cols.expand(s, h, -1))
        hot = hot.expand(s, 2, h, -1).to(qkv.dtype)  # k and v get their one-hot rows and columns
        return torch.cat([qkv, torch.cat([torch.cat([s_row, s_col], -1).unsqueeze(1), hot], 1)], -1)

    def narrow(self, out: Tensor, ctx: PosContext, layer: int) -> Tensor:
        rows, cols, _ = self.axis_index(ctx)
        s, h, _ = out.shape
        d, bins = self.cfg.head_dim, 2 * self.k + 2
        o, p_row, p_col = out.split([d, rows.shape[-1], cols.shape[-1]], dim=-1)
        # the probability of each key row summed per table entry, times the value table: [S, h, d/2]
        e_row = out.new_zeros(s, h, bins).scatter_add_(-1, rows.expand(s, h, -1), p_row)
        e_col = out.new_zeros(s, h, bins).scatter_add_(-1, cols.expand(s, h, -1), p_col)
        value = torch.cat([e_row @ self.value_row[layer].to(out.dtype), e_col @ self.value_col[layer].to(out.dtype)], -1)
        return o + value
