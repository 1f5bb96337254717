"""Rotary encodings in 2-D: q and k are rotated by angles that grow linearly with position,
so q_i . k_j depends on the positions only through their difference.

Channel pairs: head channel m is paired with channel m + d/2 (m < d/2, the "rotate half"
layout); pair m is rotated by angle[m]:
    (x_m, x_{m+d/2}) -> (x_m cos - x_{m+d/2} sin, x_m sin + x_{m+d/2} cos).

- `rope`: axial RoPE. The first d/4 pairs turn with the row, the last d/4 with the column,
  at theta_m = base^(-m / (d/4)), m = 0..d/4-1 (base cfg.rope_base).
- `rope_mixed`: RoPE-Mixed (Heo et al. 2024). Every layer and head learns one frequency
  pair (f_x, f_y) per channel pair; the angle at (x = col, y = row) is x f_x + y f_y, so
  a pair can turn along any direction, diagonals included.

CLS and padding are not rotated (angle 0). Angles and rotations are computed in fp32. Positions
are the float ctx.pos, so pos_mode "interpolate" is position interpolation (Chen et al. 2023).
"""
from __future__ import annotations

import math

import torch
from einops import einsum
from torch import Tensor, nn

from ..config import NaViTConfig
from .base import PosContext, PosEncoding

CLS_IDENTITY = "not rotated (identity): logits with CLS carry no positional phase"


def rotate_half(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [..., d]; cos, sin [..., d/2] broadcastable: rotate each pair (m, m + d/2)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def rotate_pair(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """q and k rotated by the same angles (`rotate_half`); compiled for training, one fused pass
    over q and k each way instead of about seven (see RotaryEncoding.compile_parts)."""
    return rotate_half(q, cos, sin), rotate_half(k, cos, sin)


def mixed_angles(xy: Tensor, freqs: Tensor) -> tuple[Tensor, Tensor]:
    """cos, sin [B, h, L, d/2] of RoPE-Mixed's angles x f_x + y f_y; xy [B, L, 2] (x = col, y = row),
    freqs [h, d/2, 2] of one layer."""
    ang = einsum(xy, freqs.float(), "b l a, h m a -> b h l m")
    return ang.cos(), ang.sin()


def mixed_rotate(q: Tensor, k: Tensor, xy: Tensor, freqs: Tensor) -> tuple[Tensor, Tensor]:
    """RoPE-Mixed's rotation of q and k at positions xy with one layer's `freqs` (angles included,
    so that compiled the whole of it is one graph)."""
    return rotate_pair(q, k, *mixed_angles(xy, freqs))


class RotaryEncoding(PosEncoding):
    """Shared by the rotary encodings: their per-token rotation, eager or compiled for training."""

    uses_rotate = True
    relative = True

    def __init__(self, cfg: NaViTConfig):
        super().__init__(cfg)
        _check_head_dim(cfg, self.name)
        self.compiled: dict = {}  # compiled versions of this module's rotation functions (compile_parts)

    def compile_parts(self) -> None:
        self.compiled = {fn: torch.compile(fn, dynamic=True) for fn in (rotate_pair, mixed_rotate)}

    def run(self, fn, *args):
        """fn(*args), compiled in training where compile_parts was called (eval stays eager, as the blocks do)."""
        return self.compiled.get(fn, fn)(*args) if self.training else fn(*args)


def patch_positions(ctx: PosContext) -> Tensor:
    """[B, L, 2] float (row, col) of patches (ctx.pos: augmented or interpolated where asked);
    0 on CLS and padding, so they get angle 0."""
    return ctx.pos


def _check_head_dim(cfg: NaViTConfig, name: str) -> None:
    if cfg.head_dim % 4:
        raise ValueError(f"{name} needs head_dim divisible by 4, got {cfg.head_dim}")


# ----------------------------------------------------------------------------- rope
class RoPE2D(RotaryEncoding):
    name = "rope"
    cls_handling = CLS_IDENTITY

    def __init__(self, cfg: NaViTConfig):
        super().__init__(cfg)
        quarter = cfg.head_dim // 4
        theta = cfg.rope_base ** (-torch.arange(quarter, dtype=torch.float32) / quarter)
        self.register_buffer("theta", theta, persistent=False)  # fixed, rebuilt from the config

    def cos_sin(self, ctx: PosContext) -> tuple[Tensor, Tensor]:
        """cos, sin [B, 1, L, d/2] (row pairs then column pairs), cached per forward."""
        if "rope_cos_sin" not in ctx.cache:
            pos = patch_positions(ctx)
            ang = torch.cat([pos[..., :1] * self.theta, pos[..., 1:] * self.theta], dim=-1)
            ang = ang.unsqueeze(1)  # shared by the heads
            ctx.cache["rope_cos_sin"] = (ang.cos(), ang.sin())
        return ctx.cache["rope_cos_sin"]

    def rotate(self, q: Tensor, k: Tensor, ctx: PosContext, layer: int) -> tuple[Tensor, Tensor]:
        return self.run(rotate_pair, q, k, *self.cos_sin(ctx))


# ----------------------------------------------------------------------------- rope_mixed
class RoPEMixed(RotaryEncoding):
    name = "rope_mixed"
    cls_handling = CLS_IDENTITY

    def __init__(self, cfg: NaViTConfig):
        super().__init__(cfg)
        quarter = cfg.head_dim // 4
        # magnitudes 1 / base^(4m/d), m < d/4, and one random direction phi per (layer, head)
        mag = 1.0 / cfg.rope_mixed_base ** (torch.arange(quarter, dtype=torch.float32) * 4 / cfg.head_dim)
        phi = torch.rand(cfg.depth, cfg.heads, 1) * 2 * math.pi
        f_x = torch.cat([mag * torch.cos(phi), mag * torch.cos(math.pi / 2 + phi)], dim=-1)
        f_y = torch.cat([mag * torch.sin(phi), mag * torch.sin(math.pi / 2 + phi)], dim=-1)
        self.freqs = nn.Parameter(torch.stack([f_x, f_y], dim=-1))  # [depth, heads, d/2, (x, y)]

    def no_weight_decay(self) -> set[str]:
        return {"freqs"}

    def rotate(self, q: Tensor, k: Tensor, ctx: PosContext, layer: int) -> tuple[Tensor, Tensor]:
        if "rope_mixed_xy" not in ctx.cache:
            ctx.cache["rope_mixed_xy"] = patch_positions(ctx).flip(-1)  # (x = col, y = row)
        xy = ctx.cache["rope_mixed_xy"]
        with torch.autocast(device_type=q.device.type, enabled=False):  # angles in fp32
            return self.run(mixed_rotate, q, k, xy, self.freqs[layer])
