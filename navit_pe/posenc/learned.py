"""Learned absolute tables, added to the patch tokens before the first block.

- `learned_1d`: the vanilla ViT table, one vector per flattened position of the training grid
  (cfg.pos_grid x cfg.pos_grid). Any other grid gets the table bicubic-interpolated to it, as
  ViT fine-tuning at a new resolution does. Its positions are relative to the image's own
  grid, so both test-time position modes are the same. Positions moved by coordinate
  augmentation (training) sample the table bicubically at their own fractional place instead.
- `learned_2d`: the joint (row, col) table of timm's NaFlexViT / SigLIP 2's learned grid, one
  vector per (row, col) up to cfg.max_grid.
- `factorized`: NaViT's (and Pix2Struct's) separate row and column tables, summed or concatenated.

The two max_grid tables read only the rows and columns training reached (the model's
`trained_extent`, within the table): positions are clamped to the last trained row / column
(pos_mode "extrapolate": patches past the edge share the edge's vector) or, with pos_mode
"interpolate", scaled onto the trained range, which resamples the trained part of the table
(bilinear, corners aligned). Float positions (augmentation, interpolation) read the table by
linear interpolation between neighbouring rows; integer positions read one row exactly.
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


def neighbours(pos: Tensor, limit: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """pos [...] float clamped to [0, limit - 1] -> (lower index, upper index, weight of the upper)."""
    x = torch.minimum(pos.clamp(min=0), limit - 1)
    lo = x.floor()
    return lo.long(), torch.minimum(lo + 1, limit - 1).long(), x - lo


# ----------------------------------------------------------------------------- learned_1d
class Learned1D(PosEncoding):
    name = "learned_1d"
    cls_handling = CLS_ZERO + " (ViT's extra CLS row of the table is folded into it)"
    uses_embed = True
    same_in_both_modes = True  # the table is resampled to every image's own grid
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

    def sample(self, ctx: PosContext) -> Tensor:
        """[B, L, dim]: the table read bicubically at each token's float position, at the same
        place of the 8x8 table as F.interpolate to the token's grid puts its integer position."""
        g = self.cfg.pos_grid
        frac = (ctx.pos + 0.5) / ctx.grid.clamp(min=1)  # (row, col) as a fraction of the image
        xy = (frac.flip(-1) * 2 - 1).view(1, 1, -1, 2)  # grid_sample's (x, y) in [-1, 1]
        table = rearrange(self.table, "(gh gw) d -> 1 d gh gw", gh=g)
        out = F.grid_sample(table, xy, mode=self.mode, padding_mode="border", align_corners=False)
        return rearrange(out, "1 d 1 (b l) -> b l d", b=ctx.pos.shape[0])

    def embed(self, ctx: PosContext) -> Tensor:
        patch = ctx.is_patch
        b, l = patch.shape
        if not patch.any():
            return self.table.new_zeros(b, l, self.cfg.dim)
        if not torch.equal(ctx.pos, ctx.coords.float() * patch.unsqueeze(-1)):  # augmented positions
            return zero_cls_and_padding(self.sample(ctx), ctx)
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
        g = self.cfg.max_grid
        # the trained rows / cols around each position, clamped at the trained extent
        lim = self.readable_extent(g)
        (r0, r1, wr), (c0, c1, wc) = (neighbours(ctx.pos[..., a], lim[a]) for a in (0, 1))
        if not (wr.any() or wc.any()):  # integer positions: one row each, exactly
            return zero_cls_and_padding(lookup(self.table, r0 * g + c0), ctx)
        wr, wc = wr.unsqueeze(-1), wc.unsqueeze(-1)
        emb = ((1 - wr) * ((1 - wc) * lookup(self.table, r0 * g + c0) + wc * lookup(self.table, r0 * g + c1))
               + wr * ((1 - wc) * lookup(self.table, r1 * g + c0) + wc * lookup(self.table, r1 * g + c1)))
        return zero_cls_and_padding(emb, ctx)


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

    def read(self, table: Tensor, pos: Tensor, limit: Tensor) -> Tensor:
        """table [N, width] at float positions [...] up to the trained `limit` -> [..., width]."""
        lo, hi, w = neighbours(pos, limit)
        if not w.any():  # integer positions: one entry each, exactly
            return lookup(table, lo)
        w = w.unsqueeze(-1)
        return (1 - w) * lookup(table, lo) + w * lookup(table, hi)

    def embed(self, ctx: PosContext) -> Tensor:
        lim = self.readable_extent(self.cfg.max_grid)  # trained rows / cols of the tables
        row, col = self.read(self.rows, ctx.pos[..., 0], lim[0]), self.read(self.cols, ctx.pos[..., 1], lim[1])
        emb = row + col if self.cfg.factorized_mode == "sum" else torch.cat([row, col], dim=-1)
        return zero_cls_and_padding(emb, ctx)
