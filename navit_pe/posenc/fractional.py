"""`fractional`: NaViT's fractional positions, added to the patch tokens.

Each patch gets r = (index + 0.5) / side per axis (side = grid h for rows, grid w for cols),
so r lies in (0, 1) on every grid: images of one aspect ratio share positions whatever
their resolution. r is mapped to a vector by cfg.fractional_fn:
- "table":   a learned table of cfg.fractional_bins entries per axis over r in [0, 1]
             (entry j sits at r = j / (bins - 1)), linearly interpolated in r; the row and
             column vectors are summed.
- "sincos":  the fixed sincos layout of `sincos` (rows in the first half, columns in the
             second) applied to r * cfg.max_grid: on a max_grid-sized grid this is the
             integer sincos shifted by half a patch, on others a rescaled copy of it.
- "fourier": learned Fourier features (NeRF / Tancik et al.): a learned frequency matrix
             [2, dim/2] maps (r_row, r_col) jointly, sin and cos of 2*pi*that give dim
             features (in fp32), and one linear layer maps them to dim.
Since r is relative to the image's own grid, both test-time position modes are the same.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..config import NaViTConfig
from .base import CLS_ZERO, PosContext, PosEncoding, zero_cls_and_padding
from .learned import lookup
from .sincos import sincos_2d

FOURIER_STD = 4.0  # init std of the Fourier frequencies, in cycles per image side


def fractional_coords(ctx: PosContext) -> Tensor:
    """[B, L, 2] float (r_row, r_col) in (0, 1); padding (grid 0) gets 0.5 and is zeroed later."""
    side = ctx.grid.clamp(min=1).float()
    return (ctx.pos + 0.5) / side


class Fractional(PosEncoding):
    name = "fractional"
    cls_handling = CLS_ZERO
    uses_embed = True
    same_in_both_modes = True  # r is a fraction of the image's own grid on every grid

    def __init__(self, cfg: NaViTConfig):
        super().__init__(cfg)
        self.fn = cfg.fractional_fn
        if self.fn == "table":
            if cfg.fractional_bins < 2:
                raise ValueError(f"fractional table needs >= 2 bins, got {cfg.fractional_bins}")
            self.rows = nn.Parameter(torch.randn(cfg.fractional_bins, cfg.dim) * 0.02)
            self.cols = nn.Parameter(torch.randn(cfg.fractional_bins, cfg.dim) * 0.02)
        elif self.fn == "fourier":
            if cfg.dim % 2:
                raise ValueError(f"fractional fourier needs an even dim, got {cfg.dim}")
            self.freqs = nn.Parameter(torch.randn(2, cfg.dim // 2) * FOURIER_STD)
            self.proj = nn.Linear(cfg.dim, cfg.dim)
        elif self.fn == "sincos":
            if cfg.dim % 4:
                raise ValueError(f"fractional sincos needs dim divisible by 4, got dim={cfg.dim}")
        else:
            raise ValueError(f"fractional_fn must be 'table', 'sincos' or 'fourier', got {self.fn!r}")

    @staticmethod
    def _lerp(table: Tensor, r: Tensor) -> Tensor:
        """table [bins, dim] read at r [...] in [0, 1] with linear interpolation -> [..., dim]."""
        t = r.clamp(0, 1) * (table.shape[0] - 1)
        lo = t.floor().long().clamp(max=table.shape[0] - 2)
        frac = (t - lo).unsqueeze(-1)
        return lookup(table, lo) * (1 - frac) + lookup(table, lo + 1) * frac

    def embed(self, ctx: PosContext) -> Tensor:
        r = fractional_coords(ctx)
        if self.fn == "table":
            emb = self._lerp(self.rows, r[..., 0]) + self._lerp(self.cols, r[..., 1])
        elif self.fn == "sincos":
            emb = sincos_2d(r * self.cfg.max_grid, self.cfg.dim)
        else:
            emb = self.proj(self.fourier_features(r))
        return zero_cls_and_padding(emb, ctx)

    def fourier_features(self, r: Tensor) -> Tensor:
        """[B, L, 2] @ [2, dim/2] -> [sin, cos] [B, L, dim], in fp32 even under autocast (bf16
        angles of 2 pi r f are off by up to ~0.3 rad on a 64x64 grid)."""
        with torch.autocast(r.device.type, enabled=False):
            ang = 2 * math.pi * (r.float() @ self.freqs.float())
            return torch.cat([ang.sin(), ang.cos()], dim=-1)
