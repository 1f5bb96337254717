"""Learned absolute tables, added to the patch tokens before the first block.

- `learned_1d`: the vanilla ViT table, one vector per flattened position of the training grid
  (cfg.pos_grid x cfg.pos_grid). Any other grid gets the table bicubic-interpolated to it, as
  ViT fine-tuning at a new resolution does.
- `learned_2d`: the Pix2Struct table, one vector per (row, col) up to cfg.max_grid.
- `factorized`: NaViT's separate row and column tables, summed or concatenated.

The two max_grid tables clamp positions beyond the table to its last row / column, so a
larger grid never raises; all patches past the edge share the edge's vector.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..config import NaViTConfig
from .base import CLS_ZERO, PosContext, PosEncoding, zero_cls_and_padding



def _table(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.randn(*shape) * 0.02)


def lookup(table: Tensor, index: Tensor) -> Tensor:
    """table [N, dim], index [...] long -> [..., dim]; index_select's backward is a fast
    index_add (plain advanced indexing backpropagates through a slow accumulate on CPU)."""
    return table.index_select(0, index.reshape(-1)).view(*index.shape, table.shape[-1])


# ----------------------------------------------------------------------------- learned_1d
class Learned1D(PosEncoding):
    name = "learned_1d"
    cls_handling = CLS_ZERO + " (ViT's extra CLS row of the table is folded into it)"
    uses_embed = True
    mode = "bicubic"  # interpolation to other grids (align_corners=False, no antialias)

    def __init__(self, cfg: NaViTConfig):
        super().__init__(cfg)
        self.table = _table(cfg.pos_grid * cfg.pos_grid, cfg.dim)  # row-major flattened grid

    def table_for(self, h: int, w: int) -> Tensor:
        """[h*w, dim]: the table itself at the training grid, else interpolated to (h, w)."""
        g = self.cfg.pos_grid
        if (h, w) == (g, g):
            return self.table
        grid = rearrange(self.table, "(gh gw) d -> 1 d gh gw", gh=g)
        grid = F.interpolate(grid, size=(h, w), mode=self.mode, align_corners=False, antialias=False)
        return rearrange(grid, "1 d h w -> (h w) d")

    def embed(self, ctx: PosContext) -> Tensor:
        patch = ctx.is_patch
        b, l = patch.shape
        if not patch.any():
            return self.table.new_zeros(b, l, self.cfg.dim)
        # one table per distinct grid in the batch, stacked; each token picks its row
        # (1-D unique on h * K + w: unique(dim=0) costs thousands of tiny ops a step)
        g = ctx.grid[patch]
        k = int(g.max()) + 1
        keys, which = torch.unique(g[:, 0] * k + g[:, 1], return_inverse=True)  # [G], [N]
        grids = torch.stack((keys // k, keys % k), 1)  # [G, 2]
        tables = [self.table_for(h, w) for h, w in grids.tolist()]
        sizes = grids[:, 0] * grids[:, 1]
        offsets = torch.cumsum(sizes, 0) - sizes  # start of each grid's table in the stack
        rc = ctx.coords[patch]
        flat = offsets[which] + rc[:, 0] * grids[which, 1] + rc[:, 1]  # offset + r*w + c
        index = torch.zeros(b, l, dtype=torch.long, device=patch.device)
        index[patch] = flat
        return zero_cls_and_padding(lookup(torch.cat(tables), index), ctx)


# ----------------------------------------------------------------------------- learned_2d
class Learned2D(PosEncoding):
    name = "learned_2d"
    cls_handling = CLS_ZERO
    uses_embed = True

    def __init__(self, cfg: NaViTConfig):
        super().__init__(cfg)
        self.table = _table(cfg.max_grid * cfg.max_grid, cfg.dim)  # row-major (row, col)

    def embed(self, ctx: PosContext) -> Tensor:
        rc = ctx.coords.clamp(0, self.cfg.max_grid - 1)  # beyond the table: the last row / col
        flat = rc[..., 0] * self.cfg.max_grid + rc[..., 1]
        return zero_cls_and_padding(lookup(self.table, flat), ctx)


# ----------------------------------------------------------------------------- factorized
class Factorized(PosEncoding):
    name = "factorized"
    cls_handling = CLS_ZERO
    uses_embed = True

    def __init__(self, cfg: NaViTConfig):
        super().__init__(cfg)
        if cfg.factorized_mode not in ("sum", "concat"):
            raise ValueError(f"factorized_mode must be 'sum' or 'concat', got {cfg.factorized_mode!r}")
        width = cfg.dim if cfg.factorized_mode == "sum" else cfg.dim // 2
        if cfg.factorized_mode == "concat" and cfg.dim % 2:
            raise ValueError(f"factorized concat needs an even dim, got {cfg.dim}")
        self.rows = _table(cfg.max_grid, width)
        self.cols = _table(cfg.max_grid, width)

    def embed(self, ctx: PosContext) -> Tensor:
        rc = ctx.coords.clamp(0, self.cfg.max_grid - 1)  # beyond the table: the last entry
        row, col = lookup(self.rows, rc[..., 0]), lookup(self.cols, rc[..., 1])
        emb = row + col if self.cfg.factorized_mode == "sum" else torch.cat([row, col], dim=-1)
        return zero_cls_and_padding(emb, ctx)
