"""Augmentations do what they say: the crop shifts the content by exactly the drawn offset
(zero fill), the flip mirrors exactly, every RandAugment operation changes an image as
documented, RandAugment applies `num_ops` of them at the documented magnitude, and the
training transform really crops and flips."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

from navit_pe.transforms import RandAugment, TrainTransform, denormalize, random_crop, random_hflip


def noise(h: int, w: int, lo: int = 1, hi: int = 255, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(lo, hi + 1, (h, w, 3), dtype=np.uint8)


def pil(a: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(a), "RGB")


def arr(img: Image.Image) -> np.ndarray:
    return np.asarray(img).astype(np.int64)


def shifted(a: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """out[y, x] = a[y + dy, x + dx] where that is inside a, else 0."""
    h, w = a.shape[:2]
    out = np.zeros_like(a)
    ys, xs = slice(max(0, -dy), min(h, h - dy)), slice(max(0, -dx), min(w, w - dx))
    out[ys, xs] = a[ys.start + dy:ys.stop + dy, xs.start + dx:xs.stop + dx]
    return out


def shifts_matching(out: np.ndarray, a: np.ndarray, pad: int = 4) -> list[tuple[int, int]]:
    return [(dx, dy) for dx in range(-pad, pad + 1) for dy in range(-pad, pad + 1)
            if np.array_equal(out, shifted(a, dx, dy))]


# ----------------------------------------------------------------------------- crop, flip
def test_random_crop_shifts_by_the_drawn_offset():
    """A non-square noise image (no zero pixel): every crop is the image moved by one offset,
    zero filled, and that offset is the one drawn: dx = randint(0, 2p) - p, then dy likewise."""
    a = noise(12, 20)  # h 12, w 20
    seen = set()
    for seed in range(150):
        out = np.asarray(random_crop(pil(a), random.Random(seed), padding=4))
        assert out.shape == a.shape
        found = shifts_matching(out, a)
        replay = random.Random(seed)
        dx, dy = replay.randint(0, 8) - 4, replay.randint(0, 8) - 4
        assert found == [(dx, dy)], (seed, found, (dx, dy))
        seen.add((dx, dy))
    assert {dx for dx, _ in seen} == set(range(-4, 5)) and {dy for _, dy in seen} == set(range(-4, 5))
    assert any(dx != dy for dx, dy in seen)


def test_random_crop_padding_bounds_the_offset():
    a = noise(16, 16, seed=1)
    for seed in range(60):
        out = np.asarray(random_crop(pil(a), random.Random(seed), padding=2))
        assert len(shifts_matching(out, a, pad=2)) == 1


def test_random_hflip_mirrors_exactly_half_the_time():
    a = noise(10, 14, seed=2)
    flips = 0
    for seed in range(200):
        out = np.asarray(random_hflip(pil(a), random.Random(seed), p=0.5))
        flipped = random.Random(seed).random() < 0.5
        assert np.array_equal(out, a[:, ::-1] if flipped else a), seed
        flips += flipped
    assert 70 < flips < 130


# ----------------------------------------------------------------------------- RandAugment ops
def op(name):
    return RandAugment.OPS[name][0]


def marker_image(x0: int, y0: int, size: int = 32) -> Image.Image:
    """Black, with a white 2x2 marker whose centre is at (x0, y0) in pixel-edge coordinates."""
    a = np.zeros((size, size, 3), np.uint8)
    a[y0 - 1:y0 + 1, x0 - 1:x0 + 1] = 255
    return pil(a)


def marker_at(img: Image.Image) -> tuple[float, float]:
    """(x, y) centre of the white pixels (pixel centres at +0.5)."""
    white = (arr(img) == 255).all(-1)
    assert 1 <= white.sum() <= 6, white.sum()  # the marker survives as a marker
    ys, xs = np.nonzero(white)
    return xs.mean() + 0.5, ys.mean() + 0.5


def test_shear_moves_rows_in_proportion_to_their_height():
    x0, y0, m = 23, 25, 0.3  # the top shear
    for name, along, across in (("ShearX", 0, 1), ("ShearY", 1, 0)):
        moves = []
        for sign in (1, -1):
            x, y = marker_at(op(name)(marker_image(x0, y0), sign * m))
            moves.append(((x - x0), (y - y0)))
        for move in moves:  # along the axis by m * (the other coordinate), not across it
            assert abs(move[across]) <= 0.6, (name, moves)
            assert abs(abs(move[along]) - m * (y0 if name == "ShearX" else x0)) <= 1.0, (name, moves)
        assert moves[0][along] * moves[1][along] < 0  # opposite signs shear opposite ways


def test_translate_moves_by_the_fraction_of_the_side():
    x0, y0, m = 16, 16, 0.25
    for name, along, side in (("TranslateX", 0, 32), ("TranslateY", 1, 32)):
        moves = []
        for sign in (1, -1):
            x, y = marker_at(op(name)(marker_image(x0, y0), sign * m))
            moves.append((x - x0, y - y0))
        for move in moves:
            assert abs(abs(move[along]) - m * side) <= 1.0 and abs(move[1 - along]) <= 0.6, (name, moves)
        assert moves[0][along] * moves[1][along] < 0
    # a non-square image: TranslateX uses the width, TranslateY the height
    a = np.zeros((16, 40, 3), np.uint8)
    a[7:9, 19:21] = 255
    x, y = marker_at(op("TranslateX")(pil(a), 0.25))
    assert abs(abs(x - 20) - 10) <= 1.0 and abs(y - 8) <= 0.6
    x, y = marker_at(op("TranslateY")(pil(a), 0.25))
    assert abs(abs(y - 8) - 4) <= 1.0 and abs(x - 20) <= 0.6


def test_rotate_turns_about_the_centre_by_the_angle_counter_clockwise():
    x0, y0 = 23, 25
    for deg in (30, -30, 12):
        x, y = marker_at(op("Rotate")(marker_image(x0, y0), deg))
        t = math.radians(deg)
        dx, dy = x0 - 16, y0 - 16  # y grows downwards: counter-clockwise on screen
        want = (16 + dx * math.cos(t) + dy * math.sin(t), 16 - dx * math.sin(t) + dy * math.cos(t))
        assert math.dist((x, y), want) <= 1.0, (deg, (x, y), want)


def test_brightness_scales_every_pixel():
    a = noise(16, 16, 40, 120, seed=3)
    for m in (0.9, -0.9, 0.3):
        out = arr(op("Brightness")(pil(a), m))
        assert np.abs(out - a * (1 + m)).max() <= 1.0, m


def test_color_contrast_sharpness_change_in_the_documented_direction():
    a = noise(24, 24, 40, 120, seed=4)
    spread = lambda x: (x.max(-1) - x.min(-1)).mean()  # colourfulness: channel spread per pixel
    lum_std = lambda x: x.mean(-1).std()
    tv = lambda x: np.abs(np.diff(x[2:-2, 2:-2].astype(float), axis=0)).mean() + \
        np.abs(np.diff(x[2:-2, 2:-2].astype(float), axis=1)).mean()  # interior detail
    for name, measure in (("Color", spread), ("Contrast", lum_std), ("Sharpness", tv)):
        base = measure(a)
        more, less = measure(arr(op(name)(pil(a), 0.9))), measure(arr(op(name)(pil(a), -0.9)))
        assert more > 1.25 * base and less < 0.6 * base, (name, base, more, less)
    # Color moves each pixel to or away from its own grey: its luminance stays; Contrast moves
    # pixels to or away from the image's mean grey: the mean stays, each pixel's luminance moves
    lum = lambda x: x.astype(float) @ np.array([0.299, 0.587, 0.114])
    for m in (0.5, -0.9):
        assert np.abs(lum(arr(op("Color")(pil(a), m))) - lum(a)).mean() <= 1.0, m
        contrast = lum(arr(op("Contrast")(pil(a), m)))
        assert abs(contrast.mean() - lum(a).mean()) <= 2.0 and np.abs(contrast - lum(a)).mean() > 5, m
    # Color at -1 is greyscale; Contrast at -1 a flat image
    grey = arr(op("Color")(pil(a), -1.0))
    assert (grey.max(-1) - grey.min(-1)).max() <= 1
    flat = arr(op("Contrast")(pil(a), -1.0))
    assert flat.max() - flat.min() <= 1


def test_posterize_keeps_the_top_bits():
    a = noise(16, 16, 0, 255, seed=5)
    for bits in (4, 6, 7):
        out = arr(op("Posterize")(pil(a), bits))
        assert np.array_equal(out, a & (0xFF << (8 - bits) & 0xFF)), bits
    assert np.array_equal(arr(op("Posterize")(pil(a), 8)), a)


def test_solarize_inverts_at_and_above_the_threshold():
    a = noise(16, 16, 0, 255, seed=6)
    for thr in (128, 200, 30):
        out = arr(op("Solarize")(pil(a), thr))
        assert np.array_equal(out, np.where(a < thr, a, 255 - a)), thr
    assert np.array_equal(arr(op("Solarize")(pil(a), 255.0)), np.where(a < 255, a, 0))


def test_autocontrast_stretches_each_channel_to_full_range():
    a = noise(16, 16, 0, 100, seed=7)
    a[..., 0] = a[..., 0] // 2 + 50  # red in 50..100
    a[..., 2] = a[..., 2] + 100  # blue in 100..200
    a[0, 0], a[0, 1] = (50, 0, 100), (100, 100, 200)  # the exact extremes are present
    out = arr(op("AutoContrast")(pil(a), 0))
    lo, hi = a.reshape(-1, 3).min(0), a.reshape(-1, 3).max(0)
    want = (a - lo) * 255.0 / (hi - lo)
    assert np.abs(out - want).max() <= 1.0


def test_equalize_spreads_a_narrow_histogram():
    a = noise(32, 32, 100, 120, seed=8)
    out = arr(op("Equalize")(pil(a), 0))
    for c in range(3):
        assert out[..., c].min() <= 20 and out[..., c].max() >= 230
        order = np.argsort(a[..., c].ravel(), kind="stable")
        assert (np.diff(out[..., c].ravel()[order]) >= 0).all()  # monotone: same order, spread out
        # roughly flat: each quarter of the output range holds about a quarter of the pixels
        counts = np.histogram(out[..., c], bins=4, range=(0, 256))[0] / out[..., c].size
        assert (counts > 0.12).all() and (counts < 0.5).all(), counts


def test_identity_is_the_only_op_that_leaves_an_image_alone():
    a = noise(20, 20, 0, 255, seed=9)
    tops = {name: (top if name not in ("Posterize", "Solarize") else {"Posterize": 4, "Solarize": 128}[name])
            for name, (_, top, _) in RandAugment.OPS.items()}
    for name, m in tops.items():
        out = arr(op(name)(pil(a), m))
        assert np.array_equal(out, a) == (name == "Identity"), name


# ----------------------------------------------------------------------------- RandAugment itself
def documented_magnitudes(magnitude: int, bins: int = 31) -> dict[str, float]:
    """The docstring's ranges at the top bin, scaled linearly by magnitude / (bins - 1);
    posterize keeps 8 - round(4 * frac) bits, solarize's threshold goes 255 -> 0."""
    frac = magnitude / (bins - 1)
    top = {"Identity": 0.0, "ShearX": 0.3, "ShearY": 0.3, "TranslateX": 150 / 331, "TranslateY": 150 / 331,
           "Rotate": 30.0, "Brightness": 0.9, "Color": 0.9, "Contrast": 0.9, "Sharpness": 0.9,
           "AutoContrast": 0.0, "Equalize": 0.0}
    out = {name: t * frac for name, t in top.items()}
    out["Posterize"] = 8 - round(4 * frac)
    out["Solarize"] = 255 * (1 - frac)
    return out


SIGNED = {"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast", "Sharpness"}


def single_ops(img: Image.Image, magnitude: int) -> list[Image.Image]:
    mags = documented_magnitudes(magnitude)
    assert set(mags) == set(RandAugment.OPS)
    outs = []
    for name, m in mags.items():
        for sign in ((1, -1) if name in SIGNED else (1,)):
            outs.append(op(name)(img, sign * m))
    return outs


@pytest.mark.parametrize("magnitude", [9, 20])
def test_randaugment_applies_num_ops_documented_ops(magnitude):
    img = pil(noise(8, 8, 0, 255, seed=10))
    singles = single_ops(img, magnitude)
    one = {o.tobytes() for o in singles}
    two = {o2.tobytes() for o in singles for o2 in single_ops(o, magnitude)}
    # num_ops = 1: always one documented op; 2: always a composition of two, rarely a single op
    for seed in range(40):
        assert RandAugment(num_ops=1, magnitude=magnitude)(img, random.Random(seed)).tobytes() in one
    outs = [RandAugment(num_ops=2, magnitude=magnitude)(img, random.Random(seed)).tobytes() for seed in range(40)]
    assert all(o in two for o in outs)
    assert sum(o not in one for o in outs) >= 20
    assert sum(o != img.tobytes() for o in outs) >= 34  # an image goes through changed
    # num_ops = 0: nothing
    assert all(RandAugment(num_ops=0, magnitude=magnitude)(img, random.Random(s)).tobytes() == img.tobytes()
               for s in range(10))


def test_randaugment_draws_every_op_with_both_signs():
    img = pil(noise(20, 20, 90, 140, seed=11))  # >= 256 pixels in a narrow range: Equalize acts
    singles = [o.tobytes() for o in single_ops(img, 30)]
    assert len(set(singles)) == len(singles) == 23  # 14 ops, 9 of them signed: all tell apart
    drawn = {RandAugment(num_ops=1, magnitude=30)(img, random.Random(s)).tobytes() for s in range(600)}
    assert set(singles) <= drawn  # every op, each sign of the signed ones, at the top bin


# ----------------------------------------------------------------------------- the train transform
def as_uint8(x: torch.Tensor) -> np.ndarray:
    return (denormalize(x) * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def test_train_transform_crops_and_flips():
    a = noise(32, 32, seed=12)
    tf = TrainTransform(randaugment=False)
    kinds = []
    for seed in range(120):
        out = as_uint8(tf(pil(a), random.Random(seed), (32, 32)))
        plain, mirrored = shifts_matching(out, a), shifts_matching(out, a[:, ::-1])
        assert len(plain) + len(mirrored) == 1, seed  # a shifted copy, or a shifted mirror image
        (dx, dy), flipped = (plain or mirrored)[0], bool(mirrored)
        kinds.append((flipped, (dx, dy) != (0, 0)))
    n = len(kinds)
    assert 0.3 * n < sum(f for f, _ in kinds) < 0.7 * n  # flipped about half the time
    assert sum(s for _, s in kinds) > 0.8 * n  # shifted nearly always (80 of 81 offsets move)
    # with RandAugment on, the same draws are augmented further
    ra = TrainTransform(randaugment=True, num_ops=2, magnitude=9)
    changed = sum(not torch.equal(ra(pil(a), random.Random(s), (32, 32)), tf(pil(a), random.Random(s), (32, 32)))
                  for s in range(30))
    assert changed >= 25


def test_train_transform_resizes_the_augmented_image():
    a = noise(32, 32, seed=13)
    tf = TrainTransform(randaugment=False)
    for seed in range(10):
        x = tf(pil(a), random.Random(seed), (16, 48))
        replay = random.Random(seed)
        img = random_hflip(random_crop(pil(a), replay, 4), replay, 0.5)
        ref = img.resize((48, 16), Image.Resampling.BICUBIC)
        assert x.shape == (3, 16, 48)
        assert np.abs(as_uint8(x).astype(int) - arr(ref)).max() <= 1
