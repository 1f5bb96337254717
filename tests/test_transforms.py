"""Tests for navit_pe.transforms (fast, CPU only)."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

from navit_pe.transforms import (
    CIFAR_MEAN,
    CIFAR_STD,
    EvalTransform,
    RandAugment,
    ResolutionSampler,
    TrainTransform,
    denormalize,
    parse_aspect,
    parse_res,
    random_crop,
    random_hflip,
    to_tensor,
)


def _rand_img(seed: int = 0, h: int = 32, w: int = 32) -> Image.Image:
    arr = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr, "RGB")


# --- parsing ---------------------------------------------------------------


def test_parse_res_ok() -> None:
    assert parse_res("32", 4) == (32, 32)
    assert parse_res("16:48", 4) == (16, 48)
    assert parse_res(" 8:8 ", 8) == (8, 8)


@pytest.mark.parametrize(
    "spec, match",
    [
        ("30", "multiple of patch size 4"),
        ("16:50", "50 is not a positive multiple"),
        ("0:16", "0 is not a positive multiple"),
        ("48:16", "lower bound 48 > upper bound 16"),
        ("a:b", "integers"),
        ("1:2:3", "expected"),
    ],
)
def test_parse_res_errors(spec: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_res(spec, 4)


def test_parse_aspect() -> None:
    assert parse_aspect("0.5:2") == (0.5, 2.0)
    assert parse_aspect(None) is None
    assert parse_aspect("") is None
    assert parse_aspect("1") == (1.0, 1.0)
    with pytest.raises(ValueError, match="lower bound"):
        parse_aspect("2:0.5")
    with pytest.raises(ValueError, match="> 0"):
        parse_aspect("0:2")
    with pytest.raises(ValueError, match="numbers"):
        parse_aspect("x:2")


# --- resolution sampling ------------------------------------------------------


def test_sampler_default_mix() -> None:
    s = ResolutionSampler(16, 48, 4)
    rng = random.Random(0)
    samples = [s.sample(rng) for _ in range(2000)]
    sides = {v for hw in samples for v in hw}
    assert sides == set(range(16, 49, 4))  # all 9 side values
    assert all(16 <= h <= 48 and 16 <= w <= 48 and h % 4 == 0 and w % 4 == 0 for h, w in samples)
    assert any(h != w for h, w in samples)
    assert s.max_tokens() == 12 * 12


def test_sampler_fixed() -> None:
    s = ResolutionSampler(32, 32, 4)
    rng = random.Random(1)
    assert all(s.sample(rng) == (32, 32) for _ in range(50))
    assert s.max_tokens() == 64


def test_sampler_reproducible() -> None:
    s = ResolutionSampler(16, 48, 4, aspect=(0.5, 2.0))
    a = [s.sample(random.Random(7)) for _ in range(3)]
    assert a[0] == a[1] == a[2]


def test_sampler_aspect() -> None:
    p = 4
    s = ResolutionSampler(16, 48, p, aspect=(0.5, 2.0))
    rng = random.Random(0)
    samples = [s.sample(rng) for _ in range(3000)]
    for h, w in samples:
        assert h % p == 0 and w % p == 0 and p <= h <= s.cap and p <= w <= s.cap
        # each side is within p/2 of its unrounded value, whose ratio lies in [0.5, 2]
        # (the cap clamp only shrinks a side that is already the long one)
        assert (w - p / 2) / (h + p / 2) <= 2.0 + 1e-9
        assert (w + p / 2) / (h - p / 2) >= 0.5 - 1e-9
        # area stays close to s^2 for some s in range
        assert 12**2 <= h * w <= 52**2
    ratios = [math.log(w / h) for h, w in samples]
    assert min(ratios) < math.log(0.6) and max(ratios) > math.log(1.7)  # both ends reached
    assert abs(sum(ratios) / len(ratios)) < 0.05  # log-uniform => symmetric around 1
    # max_tokens is an upper bound that is attained
    mt = s.max_tokens()
    seen = max((h // p) * (w // p) for h, w in samples)
    assert seen <= mt
    rng = random.Random(1)
    assert max((h // p) * (w // p) for h, w in (s.sample(rng) for _ in range(20000))) == mt


def test_sampler_aspect_one_is_square() -> None:
    s = ResolutionSampler(16, 48, 4, aspect=(1.0, 1.0))
    rng = random.Random(0)
    assert all(h == w for h, w in (s.sample(rng) for _ in range(200)))
    assert s.max_tokens() == 144


# --- augmentations ------------------------------------------------------------


def test_random_crop_padding_zero_is_identity() -> None:
    img = _rand_img()
    out = random_crop(img, random.Random(0), padding=0)
    assert np.array_equal(np.asarray(out), np.asarray(img))


def test_random_crop_zero_fill_and_shift() -> None:
    img = Image.new("RGB", (32, 32), (200, 100, 50))
    rng = random.Random(3)
    outs = [np.asarray(random_crop(img, rng, padding=4)) for _ in range(50)]
    assert all(o.shape == (32, 32, 3) for o in outs)
    # some crops are shifted, exposing zero padding; no other value appears
    assert any((o == 0).all(axis=2).any() for o in outs)
    for o in outs:
        px = o.reshape(-1, 3)
        ok = (px == 0).all(1) | (px == (200, 100, 50)).all(1)
        assert ok.all()
        zero_rows = (o == 0).all(axis=(1, 2)).sum()
        zero_cols = (o == 0).all(axis=(0, 2)).sum()
        assert zero_rows <= 4 and zero_cols <= 4


def test_random_hflip() -> None:
    img = _rand_img()
    assert random_hflip(img, random.Random(0), p=0.0) is img
    flipped = np.asarray(random_hflip(img, random.Random(0), p=1.0))
    assert np.array_equal(flipped, np.asarray(img)[:, ::-1])


def test_randaugment_shape_and_reproducible() -> None:
    ra = RandAugment(num_ops=2, magnitude=9)
    img = _rand_img(1, 32, 24)
    for seed in range(40):
        a = ra(img, random.Random(seed))
        b = ra(img, random.Random(seed))
        assert a.size == img.size and a.mode == "RGB"
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_randaugment_every_op_runs() -> None:
    img = _rand_img(2)
    for mag in (0, 15, 30):
        ra = RandAugment(num_ops=1, magnitude=mag)
        for name, op, m, _ in ra._table:
            for sign in (1, -1):
                out = op(img, sign * m if name not in ("Posterize", "Solarize") else m)
                assert out.size == img.size and out.mode == "RGB", name
    with pytest.raises(ValueError):
        RandAugment(magnitude=31)


def test_point_ops_match_imageops() -> None:
    """The numpy LUT versions of the point ops agree with Pillow's ImageOps."""
    from PIL import ImageOps

    from navit_pe import transforms as T

    rng = np.random.default_rng(0)
    for i in range(60):
        h, w = rng.integers(1, 40, 2)
        lo, hi = sorted(rng.integers(0, 256, 2))
        a = rng.integers(lo, hi + 1, (h, w, 3), dtype=np.uint8)
        if i % 5 == 0:
            a[..., 1] = 7  # a constant channel
        img = Image.fromarray(a, "RGB")
        assert np.array_equal(np.asarray(T._op_equalize(img, 0)), np.asarray(ImageOps.equalize(img)))
        diff = np.asarray(T._op_autocontrast(img, 0)).astype(int) - np.asarray(ImageOps.autocontrast(img))
        assert np.abs(diff).max() <= 1  # rounding only
        for bits in (1, 4, 8):
            assert np.array_equal(np.asarray(T._op_posterize(img, bits)), np.asarray(ImageOps.posterize(img, bits)))
        for thr in (0, 128, 255):
            assert np.array_equal(np.asarray(T._op_solarize(img, thr)), np.asarray(ImageOps.solarize(img, thr)))


# --- tensors and pipelines ------------------------------------------------------


def test_to_tensor_constant_image() -> None:
    img = Image.new("RGB", (5, 3), (255, 0, 128))  # w=5, h=3
    x = to_tensor(img)
    assert x.shape == (3, 3, 5) and x.dtype == torch.float32
    expect = [(1.0 - CIFAR_MEAN[0]) / CIFAR_STD[0], (0.0 - CIFAR_MEAN[1]) / CIFAR_STD[1],
              (128 / 255 - CIFAR_MEAN[2]) / CIFAR_STD[2]]
    for c in range(3):
        assert torch.allclose(x[c], torch.full((3, 5), expect[c]), atol=1e-5)
    assert torch.allclose(denormalize(x)[:, 0, 0], torch.tensor([1.0, 0.0, 128 / 255]), atol=1e-5)


def test_to_tensor_layout() -> None:
    img = _rand_img(3, 6, 10)
    x = to_tensor(img)
    ref = torch.from_numpy(np.asarray(img).astype(np.float32) / 255).permute(2, 0, 1)
    ref = (ref - torch.tensor(CIFAR_MEAN).view(3, 1, 1)) / torch.tensor(CIFAR_STD).view(3, 1, 1)
    assert torch.allclose(x, ref, atol=1e-5)


@pytest.mark.parametrize("size", [(32, 32), (16, 48), (40, 24)])
@pytest.mark.parametrize("ra", [False, True])
def test_train_transform_shape(size: tuple[int, int], ra: bool) -> None:
    tf = TrainTransform(randaugment=ra)
    img = _rand_img(4)
    x = tf(img, random.Random(0), size)
    assert x.shape == (3, *size) and x.dtype == torch.float32
    assert torch.equal(x, tf(img, random.Random(0), size))  # deterministic given the rng


def test_eval_transform() -> None:
    tf = EvalTransform()
    img = _rand_img(5)
    x = tf(img, (16, 48))
    assert x.shape == (3, 16, 48)
    assert torch.equal(x, tf(img, (16, 48)))
    assert torch.equal(x, to_tensor(img.resize((48, 16), Image.Resampling.BICUBIC)))
    assert torch.equal(tf(img, (32, 32)), to_tensor(img))
