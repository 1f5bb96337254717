"""The epoch plan and the train/eval batches over a split in RAM: whole epochs, steady steps,
exact splits between ranks, reproducible from the seed."""
import random
from collections import Counter

import numpy as np
import pytest
import torch

from navit_pe.data import ImageStore, make_dataset
from navit_pe.stages import EpochPlan, EvalBatches, TrainBatches, steps_per_epoch
from navit_pe.transforms import ResolutionSampler, TrainTransform


def fake_store(n: int, seed: int = 0) -> ImageStore:
    """n 32x32 images whose pixels all equal i % 251 in channel 0 (so an image is known by its
    pixels), labels i % 10."""
    pixels = []
    for i in range(n):
        a = np.zeros((32, 32, 3), np.uint8)
        a[..., 0] = i % 251
        a[..., 1] = i // 251
        pixels.append(a)
    return ImageStore(pixels, [i % 10 for i in range(n)], [(32, 32)] * n, [f"k{i}" for i in range(n)])


@pytest.mark.parametrize("n, batch", [(50_000, 128), (60, 16), (1000, 7), (10, 10)])
def test_plan_every_image_once_in_equal_steps(n, batch):
    spe = steps_per_epoch(n, batch)
    plan = EpochPlan(n, spe, seed=3, epoch=1)
    steps = [plan.images(s) for s in range(spe)]
    assert sorted(i for s in steps for i in s) == list(range(n))  # every image exactly once
    sizes = {len(s) for s in steps}
    assert max(sizes) - min(sizes) <= 1 and abs(n / spe - batch) <= batch * 0.05 + 1
    for world in (2, 3):  # the ranks split every step: disjoint, together the whole step
        for s in range(min(spe, 5)):
            parts = [plan.images(s, r, world) for r in range(world)]
            assert sorted(i for p in parts for i in p) == sorted(steps[s])
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert plan.count(0, spe) == n
    other = EpochPlan(n, spe, seed=3, epoch=2)
    assert n < 20 or other.order != plan.order  # a new order every epoch


def test_plan_with_fixed_steps_takes_batch_images_each():
    plan = EpochPlan(60, steps=10, seed=0, epoch=0, per_step=16)  # 160 images: the order repeats
    steps = [plan.images(s) for s in range(10)]
    assert all(len(s) == 16 for s in steps)
    flat = [i for s in steps for i in s]
    assert sorted(flat[:60]) == list(range(60)) and sorted(flat[60:120]) == list(range(60))
    # an image's second showing gets draws of its own (its seed knows the pass over the data)
    reps = [r for s in range(10) for r in plan.showings(s)]
    assert reps == [0] * 60 + [1] * 60 + [2] * 40
    store = fake_store(60)
    batches = TrainBatches(store, plan, ResolutionSampler(16, 48, 4), TrainTransform(randaugment=False), 4, 256,
                           True, seed=0, epoch=0)
    sizes = {}
    for s in range(10):
        b = batches.batch(s)
        for i, g in zip(b.sample_ids.tolist(), b.image_grids().tolist()):
            sizes.setdefault(i, []).append(tuple(g))
    assert sum(len(set(v)) > 1 for v in sizes.values()) > 30  # most images drew other sizes the 2nd time


def pixels_of(batch) -> list[int]:
    """The identity (i % 251 + 251 * (i // 251)) of every image in a batch of fake_store images,
    read back from the normalized pixels of its first patch."""
    from navit_pe.transforms import CIFAR_MEAN, CIFAR_STD

    out = []
    for img in range(batch.num_images):
        first = ((batch.image_ids == img) & batch.is_patch).nonzero()[0]
        patch = batch.patches[first[0], first[1]].view(3, -1)
        vals = [round(float(patch[c].median()) * CIFAR_STD[c] * 255 + CIFAR_MEAN[c] * 255) for c in range(2)]
        out.append(vals[0] + 251 * vals[1])
    return out


@pytest.mark.parametrize("res", ["16", "32", "16:48"])
def test_train_batches_one_epoch_reads_every_image_once(res):
    n, batch_images = 300, 32
    store = fake_store(n)
    lo, hi = (int(x) for x in (res.split(":") * 2)[:2])
    spe = steps_per_epoch(n, batch_images)
    plan = EpochPlan(n, spe, seed=0, epoch=0)
    # no crop or flip: the first patch of every image holds its identity
    transform = TrainTransform(randaugment=False, padding=0, hflip_p=0.0)
    seen = []
    for rank in range(2):
        batches = TrainBatches(store, plan, ResolutionSampler(lo, hi, 4), transform, 4, 160, True, seed=0,
                               epoch=0, rank=rank, world=2)
        got = list(batches)
        assert len(got) == spe
        for b in got:
            seen += pixels_of(b)
            assert b.labels.tolist() == [i % 10 for i in pixels_of(b)]
    assert Counter(seen) == Counter(range(n))  # by identity: each image once over both ranks


def test_train_batches_steady_mix_and_reproducible():
    store = fake_store(2048)
    plan = EpochPlan(len(store), 16, seed=0, epoch=0)

    def run(start=0, seed=0):
        return TrainBatches(store, plan, ResolutionSampler(16, 48, 4), TrainTransform(randaugment=False), 4, 256,
                            True, seed=seed, epoch=0, start=start)

    batches = list(run())
    tokens = torch.cat([b.tokens_per_image().float() for b in batches])
    mean, sd = tokens.mean().item(), tokens.std().item()
    per_step = [b.tokens_per_image().float().mean().item() for b in batches]
    # no burst of large or small images: every step's mean size is the data's within 4 standard errors
    assert all(abs(x - mean) < 4 * sd / 128 ** 0.5 for x in per_step), (mean, sd, per_step)
    assert all(abs(b.num_images - 128) <= 1 for b in batches)
    again = list(run(start=5))  # a resumed stream starts at its step with the same batches
    assert all(torch.equal(a.patches, b.patches) for a, b in zip(batches[5:], again))
    other = next(iter(run(seed=1)))
    assert not torch.equal(other.patches[:, :40], batches[0].patches[:, :40])


def test_dataloader_workers_keep_the_order():
    store = fake_store(200)
    plan = EpochPlan(len(store), 8, seed=0, epoch=0)
    batches = TrainBatches(store, plan, ResolutionSampler(16, 32, 4), TrainTransform(), 4, 128, True, 0, 0)
    alone = list(batches)
    with_workers = list(torch.utils.data.DataLoader(batches, batch_size=None, num_workers=2))
    assert len(alone) == len(with_workers) == 8
    assert all(torch.equal(a.patches, b.patches) for a, b in zip(alone, with_workers))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_eval_batches_every_test_image_once_over_ranks(tiny_shards, world):
    """The tiny test split is 2 shards; with 3 ranks there are fewer shards than ranks."""
    store = ImageStore.load(tiny_shards, "test")
    want = Counter((lbl, np.asarray(img).tobytes()) for img, lbl in make_dataset(tiny_shards, "test", shuffle=False))
    got = Counter()
    for rank in range(world):
        for size in [(32, 32)]:
            for b in EvalBatches(store, size, 4, 160, 2, True, rank, world):
                assert (b.image_grids() == 8).all()
                for img in range(b.num_images):
                    sel = (b.image_ids == img) & b.is_patch
                    got[(int(b.labels[img]), b.patches[sel].numpy().tobytes())] += 1
    # compare by identity: the same patches as the reader's images, each once
    from navit_pe.packing import patchify
    from navit_pe.transforms import to_tensor

    ref = Counter()
    for img, lbl in make_dataset(tiny_shards, "test", shuffle=False):
        ref[(lbl, patchify(to_tensor(img), 4)[0].numpy().tobytes())] += 1
    assert sum(want.values()) == 30 and got == ref


def test_eval_batches_any_size(tiny_shards):
    store = ImageStore.load(tiny_shards, "test")
    for size in [(8, 8), (16, 32), (64, 64)]:
        batches = list(EvalBatches(store, size, 4, 257, 3, True))
        assert sum(b.num_images for b in batches) == 30
        assert all((b.image_grids() == torch.tensor([size[0] // 4, size[1] // 4])).all() for b in batches)
