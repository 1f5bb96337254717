"""`sincos`: the fixed 2-D sin-cos embedding of MAE, computed for any grid on the fly.

Channel layout (pinned by a test with hand-computed values, since MAE, big_vision and timm
differ): the first dim/2 channels encode the row, the last dim/2 the column; each half is
[sin(pos * w_0), ..., sin(pos * w_{D-1}), cos(pos * w_0), ..., cos(pos * w_{D-1})] with
D = dim/4 and w_k = 10000^(-k/D). Position is the patch index (ctx.pos, a float where augmented
or interpolated), so a larger grid continues the same functions and a smaller one is a crop.
"""
import torch
from torch import Tensor

from .base import CLS_ZERO, PosContext, PosEncoding, sincos_1d, zero_cls_and_padding


def sincos_2d(coords: Tensor, dim: int, base: float = 10000.0) -> Tensor:
    """coords [..., 2] (row, col) -> [..., dim]: rows in the first half, columns in the second."""
    if dim % 4:
        raise ValueError(f"sincos needs dim divisible by 4, got {dim}")
    return torch.cat([sincos_1d(coords[..., 0], dim // 2, base),
                      sincos_1d(coords[..., 1], dim // 2, base)], dim=-1)


class SinCos2D(PosEncoding):
    name = "sincos"
    cls_handling = CLS_ZERO
    uses_embed = True

    def __init__(self, cfg):
        super().__init__(cfg)
        if cfg.dim % 4:
            raise ValueError(f"sincos needs dim divisible by 4, got dim={cfg.dim}")

    def embed(self, ctx: PosContext) -> Tensor:
        return zero_cls_and_padding(sincos_2d(ctx.pos, self.cfg.dim), ctx)
