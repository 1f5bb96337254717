"""Positional encodings behind one interface (see base.py), picked by name.

Adding an encoding: write one PosEncoding subclass with a unique `name`, import it here and
add it to `_CLASSES`; the registry-parametrized tests then cover it automatically.
"""
from __future__ import annotations

from ..config import NaViTConfig
from .alibi import ALiBi2D
from .base import PosContext, PosEncoding
from .fire import FIRE2D
from .fractional import Fractional
from .learned import Factorized, Learned1D, Learned2D
from .lookhere import LookHere
from .none import NoPosEncoding
from .relative import Relative2D
from .rope import RoPE2D, RoPEMixed
from .sincos import SinCos2D

_CLASSES: tuple[type[PosEncoding], ...] = (
    NoPosEncoding, Learned1D, Learned2D, Factorized, Fractional, SinCos2D, Relative2D, RoPE2D, RoPEMixed,
    ALiBi2D, LookHere, FIRE2D,
)
REGISTRY: dict[str, type[PosEncoding]] = {c.name: c for c in _CLASSES}
POS_EMBEDS: tuple[str, ...] = tuple(REGISTRY)


def check_name(name: str) -> str:
    if name not in REGISTRY:
        raise ValueError(f"unknown positional encoding {name!r}; choose one of: {', '.join(POS_EMBEDS)}")
    return name


def build_posenc(name: str, cfg: NaViTConfig | None = None, **overrides) -> PosEncoding:
    """Build the encoding `name` for a model config (or a default config with `overrides`)."""
    check_name(name)
    if cfg is None:
        cfg = NaViTConfig(pos_embed=name, **overrides)
    return REGISTRY[name](cfg)


__all__ = ["POS_EMBEDS", "REGISTRY", "PosContext", "PosEncoding", "build_posenc", "check_name"]
