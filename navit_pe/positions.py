"""Float positions for the encodings: coordinate augmentation (training) and position
interpolation (evaluation), both affine per image and axis: pos = coords * scale + offset.

- `augment`: DINOv3's RoPE recipe on patch indices. Per image: one uniform offset in [-S, S]
  patches per axis (coord_shift S), a log-uniform scale in [1/J, J] per axis (coord_jitter J)
  times one log-uniform scale in [1/R, R] for both axes (coord_rescale R). Scales act around
  the image's top-left patch (position 0). Draws come from the global torch RNG (as dropout's
  do), so a run is reproducible from its seed and a resumed run continues the same stream;
  nothing is drawn when every option is off.
- `record_extent`: the trained extent, the largest position + 1 per axis seen in training.
- `interpolate`: positions of an image whose grid exceeds the trained extent T along an axis
  are scaled by (T - 1) / (g - 1), so its first and last patch land on the first and last
  trained position; images inside the trained range are left exactly as they are.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .posenc import PosContext

POS_MODES = ("extrapolate", "interpolate")


def _per_image(ctx: PosContext, scale: Tensor, offset: Tensor) -> PosContext:
    """Apply per-image [n, 2] scale and offset to the patches of `ctx` (CLS and padding stay 0)."""
    ids = ctx.image_ids.clamp(min=0)
    patch = ctx.is_patch.unsqueeze(-1)
    pos = torch.where(patch, ctx.pos * scale[ids] + offset[ids], 0.0)
    return PosContext(ctx.coords, ctx.grid, ctx.is_cls, ctx.image_ids, pos,
                      torch.where(patch, ctx.scale * scale[ids], ctx.scale))


def augment(ctx: PosContext, shift: float, jitter: float, rescale: float) -> PosContext:
    """Random per-image shift / jitter / rescale of the positions (training only)."""
    if shift <= 0 and jitter <= 1 and rescale <= 1:
        return ctx
    n = int(ctx.image_ids.max()) + 1 if ctx.image_ids.numel() else 0
    dev = ctx.pos.device
    scale, offset = torch.ones(n, 2, device=dev), torch.zeros(n, 2, device=dev)
    if shift > 0:  # uniform offset per image and axis
        offset = (torch.rand(n, 2, device=dev) * 2 - 1) * shift
    if jitter > 1:  # log-uniform per axis
        scale = scale * torch.exp((torch.rand(n, 2, device=dev) * 2 - 1) * math.log(jitter))
    if rescale > 1:  # log-uniform, one for both axes
        scale = scale * torch.exp((torch.rand(n, 1, device=dev) * 2 - 1) * math.log(rescale))
    return _per_image(ctx, scale, offset)


@torch.no_grad()
def record_extent(extent: Tensor, ctx: PosContext) -> None:
    """extent [2] <- max(extent, largest patch position + 1 per axis), in place."""
    patch = ctx.is_patch
    if patch.any():
        torch.maximum(extent, ctx.pos[patch].amax(0) + 1, out=extent)


def interpolation_moves(grid: tuple[int, int], trained: Tensor) -> bool:
    """Whether `interpolate` moves any position of an (h, w) patch grid: only an axis beyond the
    trained extent `trained` [2] is scaled, and nothing before training recorded an extent."""
    return bool((trained > 0).all()) and (grid[0] > trained[0] or grid[1] > trained[1])


def interpolate(ctx: PosContext, trained: Tensor) -> PosContext:
    """Scale each image's axis whose grid exceeds the trained extent `trained` [2] onto it
    (`interpolation_moves` says whether a grid is touched)."""
    if not bool((trained > 0).all()):  # never trained: nothing to interpolate to
        return ctx
    n = int(ctx.image_ids.max()) + 1 if ctx.image_ids.numel() else 0
    patch = ctx.is_patch
    grid = torch.zeros(n, 2, device=ctx.pos.device)
    grid[ctx.image_ids[patch]] = ctx.grid[patch].float()  # [n, 2] each image's (h, w)
    t = trained.clamp(min=1)
    scale = torch.where(grid > t, (t - 1) / (grid - 1).clamp(min=1), torch.ones_like(grid))
    return _per_image(ctx, scale, torch.zeros_like(scale))
