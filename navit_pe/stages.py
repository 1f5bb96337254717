"""The training and evaluation batches, planned by index over a split held in RAM.

    ImageStore (RAM) -> EpochPlan (which images each step and rank takes) -> TrainBatches
        image i: size drawn, augmented, to tensor (its own rng, seeded by seed/epoch/i) -> pack

An epoch is a seeded permutation of the training split cut into `steps` runs of (nearly) equal
length: every image is presented exactly once per epoch, every step holds about the same number
of images (`--batch-images`), and the size mix of a step is that of the whole data from the
first step on (no packing buffer to fill or drain, nothing dropped at an epoch's end). Each step's
images are dealt out to the ranks (rank r takes every world-th), and each rank packs its share into
as many sequences of `max_seq_len` tokens as it needs (first-fit decreasing); the model's varlen
layout makes the padding free. Since a batch is a pure function of (seed, epoch, step, rank), a
resumed run starts at its step directly, and the DataLoader's workers can share the steps of an
epoch. `EvalBatches` reads every test image once, rank r taking every world-th image.
"""
from __future__ import annotations

import random
from typing import Iterator

import torch
from torch.utils.data import IterableDataset, get_worker_info

from .data import ImageStore
from .packing import PackedBatch, pack
from .transforms import EvalTransform, ResolutionSampler, TokenBudget, TrainTransform, normalize_patches


def image_seed(seed: int, epoch: int, index: int, rep: int = 0) -> int:
    """The seed of one image's draws in one epoch (its `rep`-th showing, when a fixed step count
    repeats the data); an int: seeding from a string hashes it, 10x slower."""
    return ((seed * 100_003 + epoch) * 1_000_003 + rep) * 1_000_000_007 + index


def packed_uint8(images: list[torch.Tensor], idx: list[int], labels: list[int], patch_size: int, max_seq_len: int,
                 cls_token: bool) -> PackedBatch:
    """Pack uint8 images and normalise all their patches at once (one pass instead of one per image)."""
    batch = pack(images, patch_size, max_seq_len, labels, cls_token=cls_token)
    real = batch.is_patch
    patches = torch.zeros(batch.patches.shape, dtype=torch.float32)
    patches[real] = normalize_patches(batch.patches[real], patch_size)
    batch.patches, batch.sample_ids = patches, torch.tensor(idx, dtype=torch.long)
    return batch


def steps_per_epoch(n_images: int, batch_images: int) -> int:
    """Steps that present `n_images` once in steps of about `batch_images` images."""
    return max(1, round(n_images / batch_images))


class EpochPlan:
    """The images of every step of one epoch, by index into the split.

    By default the seeded permutation of all `n_images` is cut into `steps` runs of near-equal
    length. With `per_step` (a fixed number of steps set for a short run) each step takes the
    next `per_step` images of the permutation, which is repeated as often as the steps need.
    """

    def __init__(self, n_images: int, steps: int, seed: int, epoch: int, per_step: int | None = None):
        if n_images < 1 or steps < 1:
            raise ValueError(f"need at least one image and one step, got {n_images} images, {steps} steps")
        rng = random.Random(f"plan/{seed}/{epoch}")
        self.order: list[int] = []
        want = n_images if per_step is None else steps * per_step
        while len(self.order) < want:
            perm = list(range(n_images))
            rng.shuffle(perm)
            self.order += perm
        self.bounds = ([s * n_images // steps for s in range(steps + 1)] if per_step is None
                       else [s * per_step for s in range(steps + 1)])
        self.steps, self.n_images = steps, n_images

    def images(self, step: int, rank: int = 0, world: int = 1) -> list[int]:
        """Indices of the images that `rank` of `world` takes at `step`."""
        return self.order[self.bounds[step]:self.bounds[step + 1]][rank::world]

    def showings(self, step: int, rank: int = 0, world: int = 1) -> list[int]:
        """For each of `images(step, rank, world)`: which pass over the data it belongs to (0, or more
        where a fixed step count repeats the permutation)."""
        n = self.n_images
        return [pos // n for pos in range(self.bounds[step], self.bounds[step + 1])][rank::world]

    def min_share(self, world: int) -> int:
        """The fewest images any rank gets at any step."""
        return min(self.bounds[s + 1] - self.bounds[s] for s in range(self.steps)) // world

    def count(self, first: int, last: int) -> int:
        """Images of all ranks in steps first..last-1."""
        return self.bounds[last] - self.bounds[first]


class TrainBatches(IterableDataset):
    """The packed batches of one rank for steps `start`..end of one epoch of `plan`."""

    def __init__(self, store: ImageStore, plan: EpochPlan, sampler: ResolutionSampler, transform: TrainTransform,
                 patch_size: int, max_seq_len: int, cls_token: bool, seed: int, epoch: int, start: int = 0,
                 rank: int = 0, world: int = 1):
        super().__init__()
        self.store, self.plan, self.sampler, self.transform = store, plan, sampler, transform
        self.patch_size, self.max_seq_len, self.cls_token = patch_size, max_seq_len, cls_token
        self.seed, self.epoch, self.start, self.rank, self.world = seed, epoch, start, rank, world

    def __len__(self) -> int:
        return self.plan.steps - self.start

    def batch(self, step: int) -> PackedBatch:
        idx = self.plan.images(step, self.rank, self.world)
        images = []
        for i, rep in zip(idx, self.plan.showings(step, self.rank, self.world)):
            rng = random.Random(image_seed(self.seed, self.epoch, i, rep))  # the image's own draws: size, crop, flip, ops
            size = self.sampler.sample(rng, self.store.sizes[i])  # a policy may use the source size
            images.append(self.transform(self.store.image(i), rng, size, normalize=False))
        return packed_uint8(images, idx, [self.store.labels[i] for i in idx], self.patch_size, self.max_seq_len,
                            self.cls_token)

    def __iter__(self) -> Iterator[PackedBatch]:
        info = get_worker_info()  # DataLoader workers take turns step by step, so order is kept
        w, n = (info.id, info.num_workers) if info is not None else (0, 1)
        for step in range(self.start + w, self.plan.steps, n):
            yield self.batch(step)


class EvalBatches(IterableDataset):
    """Every image of `store` that belongs to `rank` (every world-th), resized to `size` = (h, w)
    or to the size a size policy (e.g. TokenBudget) gives its source size, packed into batches of
    about `batch_seqs` sequences of `max_seq_len` tokens."""

    def __init__(self, store: ImageStore, size: tuple[int, int] | TokenBudget, patch_size: int, max_seq_len: int,
                 batch_seqs: int, cls_token: bool, rank: int = 0, world: int = 1, max_images: int = 0):
        super().__init__()
        self.store, self.size, self.patch_size, self.max_seq_len = store, size, patch_size, max_seq_len
        self.count = min(len(store), max_images) if max_images > 0 else len(store)  # the first `count` images
        self.cls_token, self.rank, self.world = cls_token, rank, world
        tokens = ((size[0] // patch_size) * (size[1] // patch_size) if isinstance(size, tuple)
                  else size.max_tokens()) + int(cls_token)
        self.per_batch = max(1, batch_seqs * (max_seq_len // tokens))

    def size_of(self, i: int) -> tuple[int, int]:
        """(h, w) of image i: the fixed size, or the policy's size for its source size."""
        return self.size if isinstance(self.size, tuple) else self.size.sample(None, self.store.sizes[i])

    def __iter__(self) -> Iterator[PackedBatch]:
        transform = EvalTransform()
        mine = list(range(self.rank, self.count, self.world))
        chunks = [mine[i:i + self.per_batch] for i in range(0, len(mine), self.per_batch)]
        info = get_worker_info()
        w, n = (info.id, info.num_workers) if info is not None else (0, 1)
        for idx in chunks[w::n]:
            images = [transform(self.store.image(i), self.size_of(i), normalize=False) for i in idx]
            yield packed_uint8(images, idx, [self.store.labels[i] for i in idx], self.patch_size, self.max_seq_len,
                               self.cls_token)

