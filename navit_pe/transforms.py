"""Per-image data transforms for variable-resolution CIFAR training.

Everything here works on PIL RGB images and takes an explicit ``random.Random``
so a sample's augmentation is reproducible from its seed. Sizes are always
``(h, w)``; Pillow's ``resize`` takes ``(w, h)`` and is only called internally.
"""

from __future__ import annotations

import math
import random
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

__all__ = [
    "CIFAR_MEAN",
    "CIFAR_STD",
    "parse_res",
    "parse_aspect",
    "ResolutionSampler",
    "TokenBudget",
    "budget_grid",
    "parse_resize",
    "random_crop",
    "random_hflip",
    "RandAugment",
    "to_tensor",
    "to_uint8",
    "normalize_patches",
    "denormalize",
    "resize",
    "TrainTransform",
    "EvalTransform",
]

CIFAR_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR_STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)

# to_tensor computes x * _SCALE + _BIAS == (x / 255 - mean) / std in one pass.
_SCALE = torch.tensor([1.0 / (255.0 * s) for s in CIFAR_STD], dtype=torch.float32).view(3, 1, 1)
_BIAS = torch.tensor([-m / s for m, s in zip(CIFAR_MEAN, CIFAR_STD)], dtype=torch.float32).view(3, 1, 1)


# ---------------------------------------------------------------------------
# Resolution specs and sampling
# ---------------------------------------------------------------------------


def parse_res(spec: str, patch_size: int) -> tuple[int, int]:
    """Parse "32" -> (32, 32) or "16:48" -> (16, 48); bounds must be positive multiples of patch_size."""
    parts = str(spec).strip().split(":")
    if len(parts) not in (1, 2):
        raise ValueError(f"bad resolution spec {spec!r}: expected 'N' or 'LO:HI'")
    try:
        vals = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"bad resolution spec {spec!r}: bounds must be integers") from None
    lo, hi = vals[0], vals[-1]
    for v in (lo, hi):
        if v <= 0 or v % patch_size != 0:
            raise ValueError(
                f"bad resolution spec {spec!r}: {v} is not a positive multiple of patch size {patch_size}"
            )
    if lo > hi:
        raise ValueError(f"bad resolution spec {spec!r}: lower bound {lo} > upper bound {hi}")
    return lo, hi


def parse_aspect(spec: str | None) -> tuple[float, float] | None:
    """Parse an aspect-ratio (w/h) range "0.5:2" -> (0.5, 2.0); None or "" -> None; "1.5" -> (1.5, 1.5)."""
    if spec is None or str(spec).strip() == "":
        return None
    parts = str(spec).strip().split(":")
    if len(parts) not in (1, 2):
        raise ValueError(f"bad aspect spec {spec!r}: expected 'R' or 'LO:HI'")
    try:
        vals = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"bad aspect spec {spec!r}: bounds must be numbers") from None
    lo, hi = vals[0], vals[-1]
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo <= 0 or hi <= 0:
        raise ValueError(f"bad aspect spec {spec!r}: ratios must be finite and > 0")
    if lo > hi:
        raise ValueError(f"bad aspect spec {spec!r}: lower bound {lo} > upper bound {hi}")
    return lo, hi


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


class ResolutionSampler:
    """Samples per-image (h, w) in pixels, both multiples of patch_size.

    Without aspect: h and w are independent, each uniform over {lo, lo+p, ..., hi}.

    With aspect (a_lo, a_hi): a side s is drawn uniformly from the same set and a
    ratio r = w/h log-uniformly from [a_lo, a_hi]; then h = s / sqrt(r) and
    w = s * sqrt(r) (so h * w ~= s^2), each rounded to the nearest multiple of p
    and clamped to [p, cap], where cap = hi * max(1, sqrt(a_hi), 1/sqrt(a_lo))
    rounded down to a multiple of p (i.e. the clamp only removes rounding overshoot;
    the side can exceed `hi` when the ratio is far from 1).
    """

    def __init__(
        self,
        res_lo: int,
        res_hi: int,
        patch_size: int,
        aspect: tuple[float, float] | None = None,
    ) -> None:
        p = patch_size
        if p <= 0:
            raise ValueError(f"patch_size must be > 0, got {p}")
        if res_lo <= 0 or res_lo % p or res_hi % p or res_lo > res_hi:
            raise ValueError(f"bad resolution range {res_lo}:{res_hi} for patch size {p}")
        if aspect is not None and not (0 < aspect[0] <= aspect[1]):
            raise ValueError(f"bad aspect range {aspect}: need 0 < lo <= hi")
        self.res_lo, self.res_hi, self.patch_size = res_lo, res_hi, p
        self.aspect = None if aspect is None else (float(aspect[0]), float(aspect[1]))
        if self.aspect is not None:
            a_lo, a_hi = self.aspect
            stretch = max(1.0, math.sqrt(a_hi), 1.0 / math.sqrt(a_lo))
            self.cap = p * max(1, int(res_hi * stretch / p + 1e-9))
            self._log_lo, self._log_hi = math.log(a_lo), math.log(a_hi)
        else:
            self.cap = res_hi

    def _side(self, rng: random.Random) -> int:
        return rng.randrange(self.res_lo, self.res_hi + 1, self.patch_size)

    def _from_ratio(self, s: int, t: float) -> tuple[int, int]:
        """(h, w) for side s and t = sqrt(w/h), rounded to patch multiples and clamped."""
        p = self.patch_size
        h = min(max(_round_half_up(s / t / p), 1) * p, self.cap)
        w = min(max(_round_half_up(s * t / p), 1) * p, self.cap)
        return h, w

    def sample(self, rng: random.Random, src_hw: tuple[int, int] | None = None) -> tuple[int, int]:
        """A size (h, w) for one image; `src_hw`, the source image's size, does not matter here
        (it does for TokenBudget, which has the same interface)."""
        if self.aspect is None:
            if self.res_lo == self.res_hi:
                return self.res_lo, self.res_lo
            return self._side(rng), self._side(rng)
        s = self._side(rng)
        r = math.exp(rng.uniform(self._log_lo, self._log_hi))
        return self._from_ratio(s, math.sqrt(r))

    def max_tokens(self) -> int:
        """Largest (h/p) * (w/p) any sample can have (exact, not a loose bound)."""
        p = self.patch_size
        if self.aspect is None:
            return (self.res_hi // p) ** 2
        t_lo, t_hi = math.sqrt(self.aspect[0]), math.sqrt(self.aspect[1])
        best = 0
        for s in range(self.res_lo, self.res_hi + 1, p):
            a = s / p
            # (h, w) is piecewise constant in t; it only changes where a/t or a*t
            # crosses a half-integer. Evaluate the endpoints and each piece's midpoint.
            cuts = {t_lo, t_hi}
            for k in range(int(a / t_hi) - 1, int(a / t_lo) + 2):
                if k + 0.5 > 0:
                    cuts.add(a / (k + 0.5))
            for k in range(int(a * t_lo) - 1, int(a * t_hi) + 2):
                cuts.add((k + 0.5) / a)
            pts = sorted(c for c in cuts if t_lo <= c <= t_hi)
            probes = pts + [(x + y) / 2 for x, y in zip(pts, pts[1:])]
            for t in probes:
                h, w = self._from_ratio(s, t)
                best = max(best, (h // p) * (w // p))
        return best

    def __repr__(self) -> str:
        return (
            f"ResolutionSampler({self.res_lo}:{self.res_hi}, patch={self.patch_size}, "
            f"aspect={self.aspect})"
        )


def budget_grid(src_hw: tuple[int, int], patch_size: int, budget: int) -> tuple[int, int]:
    """The NaFlex rule: the patch grid (rows, cols) of the largest scale s of a `src_hw` (h, w)
    image whose grid ceil(h*s/p) x ceil(w*s/p) holds at most `budget` patches.

    Both sides are scaled by the same s, so each side is within one patch of the exact aspect
    ratio; small images are scaled up, large ones down. The token count only steps up where
    h*s/p or w*s/p crosses an integer, so the best s is one of those points (k*p/h, k*p/w).
    """
    h, w = src_hw
    if h <= 0 or w <= 0:
        raise ValueError(f"bad source size {h}x{w}")
    p, best = patch_size, (0.0, 1, 1)
    for side in (h, w):
        for k in range(1, budget + 1):
            s = k * p / side
            gh = max(1, math.ceil(h * s / p - 1e-9))
            gw = max(1, math.ceil(w * s / p - 1e-9))
            if gh * gw > budget:
                break  # tokens never fall as s grows
            if s > best[0]:
                best = (s, gh, gw)
    return best[1], best[2]


class TokenBudget:
    """Size policy `budget:N`: every image keeps its aspect ratio and is scaled to the largest
    size in patch multiples whose token count fits N (`budget_grid`). Same interface as
    ResolutionSampler; the size depends on the source image only, not on the rng."""

    def __init__(self, budget: int, patch_size: int) -> None:
        if patch_size <= 0:
            raise ValueError(f"patch_size must be > 0, got {patch_size}")
        if budget < 1:
            raise ValueError(f"token budget must be at least 1, got {budget}")
        self.budget, self.patch_size = int(budget), patch_size
        self._cache: dict[tuple[int, int], tuple[int, int]] = {}

    def sample(self, rng: random.Random | None, src_hw: tuple[int, int]) -> tuple[int, int]:
        """(h, w) in pixels for a source image of size `src_hw` = (h, w)."""
        src_hw = (int(src_hw[0]), int(src_hw[1]))
        size = self._cache.get(src_hw)
        if size is None:
            gh, gw = budget_grid(src_hw, self.patch_size, self.budget)
            size = self._cache[src_hw] = (gh * self.patch_size, gw * self.patch_size)
        return size

    def max_tokens(self) -> int:
        """The most patches one image can get: the budget N."""
        return self.budget

    def __repr__(self) -> str:
        return f"TokenBudget({self.budget}, patch={self.patch_size})"


def parse_resize(spec: str | None, patch_size: int) -> TokenBudget | None:
    """"budget:N" -> TokenBudget(N, patch_size); None or "" or "none" -> None (fixed sides)."""
    if spec is None or str(spec).strip().lower() in ("", "none"):
        return None
    kind, _, value = str(spec).strip().partition(":")
    if kind != "budget" or not value.strip().isdigit() or int(value) < 1:
        raise ValueError(f"bad resize policy {spec!r}: expected 'budget:N' with N a positive token count, "
                         "e.g. budget:64")
    return TokenBudget(int(value), patch_size)


# ---------------------------------------------------------------------------
# Geometric augmentations
# ---------------------------------------------------------------------------


def random_crop(img: Image.Image, rng: random.Random, padding: int = 4) -> Image.Image:
    """Zero-pad by `padding` on every side and crop back to the original size at a random offset."""
    if padding <= 0:
        return img
    w, h = img.size
    dx = rng.randint(0, 2 * padding) - padding
    dy = rng.randint(0, 2 * padding) - padding
    if dx == 0 and dy == 0:
        return img
    # Pillow's crop fills out-of-bounds pixels with zeros, i.e. zero padding for free.
    return img.crop((dx, dy, dx + w, dy + h))


def random_hflip(img: Image.Image, rng: random.Random, p: float = 0.5) -> Image.Image:
    """Flip left-right with probability p."""
    if rng.random() < p:
        return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return img


# ---------------------------------------------------------------------------
# RandAugment
# ---------------------------------------------------------------------------

_FILL = (128, 128, 128)


def _affine(img: Image.Image, coeffs: tuple[float, ...]) -> Image.Image:
    return img.transform(img.size, Image.Transform.AFFINE, coeffs, Image.Resampling.NEAREST, fillcolor=_FILL)


def _op_identity(img: Image.Image, m: float) -> Image.Image:
    return img


def _op_shear_x(img: Image.Image, m: float) -> Image.Image:
    return _affine(img, (1.0, m, 0.0, 0.0, 1.0, 0.0))


def _op_shear_y(img: Image.Image, m: float) -> Image.Image:
    return _affine(img, (1.0, 0.0, 0.0, m, 1.0, 0.0))


def _op_translate_x(img: Image.Image, m: float) -> Image.Image:
    # m is a fraction of the width
    return _affine(img, (1.0, 0.0, m * img.size[0], 0.0, 1.0, 0.0))


def _op_translate_y(img: Image.Image, m: float) -> Image.Image:
    return _affine(img, (1.0, 0.0, 0.0, 0.0, 1.0, m * img.size[1]))


def _op_rotate(img: Image.Image, m: float) -> Image.Image:
    return img.rotate(m, resample=Image.Resampling.NEAREST, fillcolor=_FILL)


def _op_brightness(img: Image.Image, m: float) -> Image.Image:
    return ImageEnhance.Brightness(img).enhance(1.0 + m)


def _op_color(img: Image.Image, m: float) -> Image.Image:
    return ImageEnhance.Color(img).enhance(1.0 + m)


def _op_contrast(img: Image.Image, m: float) -> Image.Image:
    return ImageEnhance.Contrast(img).enhance(1.0 + m)


def _op_sharpness(img: Image.Image, m: float) -> Image.Image:
    return ImageEnhance.Sharpness(img).enhance(1.0 + m)


# Point ops map pixels through per-channel 256-entry uint8 lookup tables with numpy:
# on tiny images this is several times faster than ImageOps / Image.point.
_LUT_OFFSET = np.arange(3, dtype=np.intp) * 256  # index into a flattened [3, 256] table
_VALUES = np.arange(256)
_POSTERIZE_LUTS = {
    bits: np.tile((_VALUES & (0xFF << (8 - bits)) & 0xFF).astype(np.uint8), (3, 1)) for bits in range(9)
}


def _apply_lut(img: Image.Image, lut: np.ndarray) -> Image.Image:
    """Map every channel c of img through lut[c] (lut: [3, 256] uint8)."""
    out = lut.reshape(-1).take(np.asarray(img) + _LUT_OFFSET)
    return Image.fromarray(out, "RGB")


def _op_posterize(img: Image.Image, m: float) -> Image.Image:
    return _apply_lut(img, _POSTERIZE_LUTS[int(m)])


def _op_solarize(img: Image.Image, m: float) -> Image.Image:
    lut = np.where(_VALUES < int(m), _VALUES, 255 - _VALUES).astype(np.uint8)
    return _apply_lut(img, np.tile(lut, (3, 1)))


def _op_autocontrast(img: Image.Image, m: float) -> Image.Image:
    """Per-channel stretch of [min, max] to [0, 255] (ImageOps.autocontrast with cutoff 0)."""
    ext = np.array(img.getextrema(), dtype=np.float32)  # [3, 2]
    lo, hi = ext[:, :1], ext[:, 1:]
    flat = hi <= lo  # constant channels stay unchanged
    scale = np.where(flat, 1.0, 255.0 / np.where(flat, 1.0, hi - lo))
    lut = (_VALUES[None, :] - np.where(flat, 0.0, lo)) * scale  # [3, 256]
    return _apply_lut(img, np.clip(np.floor(lut + 0.5), 0, 255).astype(np.uint8))


def _op_equalize(img: Image.Image, m: float) -> Image.Image:
    """Histogram equalisation per channel, the same mapping as ImageOps.equalize."""
    idx = (np.asarray(img) + _LUT_OFFSET).reshape(-1)
    hist = np.bincount(idx, minlength=768).reshape(3, 256)
    nonzero = hist > 0
    last = hist[np.arange(3), 255 - nonzero[:, ::-1].argmax(axis=1)]  # count of the top value
    step = (hist.sum(axis=1) - last) // 255
    keep = (nonzero.sum(axis=1) <= 1) | (step == 0)  # degenerate channels stay unchanged
    step = np.where(keep, 1, step)[:, None]
    before = np.cumsum(hist, axis=1) - hist  # pixels strictly below each value
    lut = np.minimum((step // 2 + before) // step, 255)
    lut = np.where(keep[:, None], _VALUES[None, :], lut).astype(np.uint8)
    return _apply_lut(img, lut)


_Op = Callable[[Image.Image, float], Image.Image]


class RandAugment:
    """RandAugment (Cubuk et al., 2020) with Pillow ops.

    Each call applies `num_ops` ops drawn uniformly with replacement, all at the
    same magnitude bin `magnitude` out of `num_magnitude_bins`. Magnitude ranges
    at the top bin (as in the paper / torchvision): shear 0.3, translate 150/331
    of the side, rotate 30 degrees, enhance factors 1 +- 0.9, posterize 8 -> 4
    bits, solarize threshold 255 -> 0. Signed ops get a random sign. Geometric
    ops fill with gray (128).
    """

    # name -> (op, max magnitude, signed); posterize/solarize map the bin specially.
    OPS: dict[str, tuple[_Op, float, bool]] = {
        "Identity": (_op_identity, 0.0, False),
        "ShearX": (_op_shear_x, 0.3, True),
        "ShearY": (_op_shear_y, 0.3, True),
        "TranslateX": (_op_translate_x, 150.0 / 331.0, True),
        "TranslateY": (_op_translate_y, 150.0 / 331.0, True),
        "Rotate": (_op_rotate, 30.0, True),
        "Brightness": (_op_brightness, 0.9, True),
        "Color": (_op_color, 0.9, True),
        "Contrast": (_op_contrast, 0.9, True),
        "Sharpness": (_op_sharpness, 0.9, True),
        "Posterize": (_op_posterize, 4.0, False),
        "Solarize": (_op_solarize, 255.0, False),
        "AutoContrast": (_op_autocontrast, 0.0, False),
        "Equalize": (_op_equalize, 0.0, False),
    }

    def __init__(self, num_ops: int = 2, magnitude: int = 9, num_magnitude_bins: int = 31) -> None:
        if num_magnitude_bins < 2:
            raise ValueError(f"num_magnitude_bins must be >= 2, got {num_magnitude_bins}")
        if not 0 <= magnitude < num_magnitude_bins:
            raise ValueError(f"magnitude must be in [0, {num_magnitude_bins - 1}], got {magnitude}")
        if num_ops < 0:
            raise ValueError(f"num_ops must be >= 0, got {num_ops}")
        self.num_ops, self.magnitude, self.num_magnitude_bins = num_ops, magnitude, num_magnitude_bins
        frac = magnitude / (num_magnitude_bins - 1)
        # Precompute (name, op, magnitude, signed) once; __call__ only picks and applies.
        self._table: list[tuple[str, _Op, float, bool]] = []
        for name, (op, top, signed) in self.OPS.items():
            if name == "Posterize":
                m = 8.0 - round(frac * top)  # bits kept: 8 at bin 0 down to 4
            elif name == "Solarize":
                m = top * (1.0 - frac)  # threshold: 255 at bin 0 down to 0
            else:
                m = top * frac
            self._table.append((name, op, m, signed))

    def __call__(self, img: Image.Image, rng: random.Random) -> Image.Image:
        if img.mode != "RGB":
            img = img.convert("RGB")
        for _ in range(self.num_ops):
            _, op, m, signed = self._table[rng.randrange(len(self._table))]
            if signed and rng.random() < 0.5:
                m = -m
            img = op(img, m)
        return img

    def __repr__(self) -> str:
        return f"RandAugment(num_ops={self.num_ops}, magnitude={self.magnitude}, bins={self.num_magnitude_bins})"


# ---------------------------------------------------------------------------
# Tensor conversion and full pipelines
# ---------------------------------------------------------------------------


def to_uint8(img: Image.Image) -> torch.Tensor:
    """PIL image -> uint8 [3, H, W] (a copy of the pixels; the batch is normalised at once)."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL image -> float32 [3, H, W] normalised with CIFAR mean/std."""
    return torch.addcmul(_BIAS, to_uint8(img).float(), _SCALE)


def normalize_patches(patches: torch.Tensor, patch_size: int) -> torch.Tensor:
    """uint8 patches [..., 3*p*p] (channel-major, as patchify cuts them) -> float32, normalised
    exactly as to_tensor normalises an image."""
    per = patch_size * patch_size
    scale, bias = _SCALE.view(3).repeat_interleave(per), _BIAS.view(3).repeat_interleave(per)
    return torch.addcmul(bias, patches.float(), scale)


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """Undo to_tensor's normalisation: [..., 3, H, W] -> values in [0, 1] (not clamped)."""
    mean = torch.tensor(CIFAR_MEAN, dtype=x.dtype, device=x.device).view(3, 1, 1)
    std = torch.tensor(CIFAR_STD, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return x * std + mean


def resize(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize to size = (h, w) with BICUBIC; no-op when already that size."""
    h, w = size
    if img.size == (w, h):
        return img
    return img.resize((w, h), Image.Resampling.BICUBIC)


class TrainTransform:
    """random crop (zero pad) -> hflip -> optional RandAugment -> resize to (h, w) -> to_tensor.

    Works at any source size and aspect ratio (the crop keeps the source size)."""

    def __init__(
        self,
        randaugment: bool = True,
        num_ops: int = 2,
        magnitude: int = 9,
        num_magnitude_bins: int = 31,
        padding: int = 4,
        hflip_p: float = 0.5,
    ) -> None:
        self.padding, self.hflip_p = padding, hflip_p
        self.randaugment = RandAugment(num_ops, magnitude, num_magnitude_bins) if randaugment else None

    def __call__(self, img: Image.Image, rng: random.Random, size: tuple[int, int],
                 normalize: bool = True) -> torch.Tensor:
        """float32 [3, h, w] normalised (as to_tensor), or with normalize=False uint8 pixels."""
        if img.mode != "RGB":
            img = img.convert("RGB")
        # a source many times the target size (a photo): box-shrink it first, to >= 2x the
        # target, so the augmentations do not run on millions of pixels (CIFAR never gets here)
        factor = min(img.size[0] // (2 * size[1]), img.size[1] // (2 * size[0]))
        if factor >= 4:
            img = img.reduce(factor)
        img = random_crop(img, rng, self.padding)
        img = random_hflip(img, rng, self.hflip_p)
        if self.randaugment is not None:
            img = self.randaugment(img, rng)
        img = resize(img, size)
        return to_tensor(img) if normalize else to_uint8(img)

    def __repr__(self) -> str:
        return f"TrainTransform(padding={self.padding}, hflip_p={self.hflip_p}, randaugment={self.randaugment})"


class EvalTransform:
    """resize to (h, w) with BICUBIC (skipped when equal) -> to_tensor."""

    def __call__(self, img: Image.Image, size: tuple[int, int], normalize: bool = True) -> torch.Tensor:
        img = resize(img, size)
        return to_tensor(img) if normalize else to_uint8(img)

    def __repr__(self) -> str:
        return "EvalTransform()"
