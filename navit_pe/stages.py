"""The training and evaluation streams: reader -> transformed -> packed, as IterableDatasets.

    reader (PIL, label) -> transformed(...) -> (tensor [3, h, w], label) -> packed(...) -> PackedBatch

The two stages live in navit_pe.data; here they are chained for a torch DataLoader.
"""
from __future__ import annotations

import random
from typing import Iterable, Iterator

import torch
from PIL import Image
from torch import Tensor

from .data import DataError, make_dataset, packed, transformed
from .packing import PackedBatch
from .transforms import EvalTransform, ResolutionSampler, TrainTransform


class TrainStream(torch.utils.data.IterableDataset):
    """An endless stream of training batches for one epoch of one rank.

    Images: this rank's shards (shuffled by seed and epoch), augmented, resized to a size drawn
    from `sampler`, packed. When the rank's part of the data is used up the stream goes on over
    it again with a new shuffle, so every rank can take the same number of steps whatever its
    packing; the trainer takes `steps_per_epoch` batches and stops.
    """

    def __init__(self, root, sampler: ResolutionSampler, transform: TrainTransform, patch_size: int,
                 max_seq_len: int, batch_seqs: int, cls_token: bool, seed: int, epoch: int,
                 buffer_size: int = 512, shuffle_buffer: int = 2000):
        super().__init__()
        self.root, self.sampler, self.transform = root, sampler, transform
        self.patch_size, self.max_seq_len, self.batch_seqs = patch_size, max_seq_len, batch_seqs
        self.cls_token, self.seed, self.epoch = cls_token, seed, epoch
        self.buffer_size, self.shuffle_buffer = buffer_size, shuffle_buffer

    def _images(self) -> Iterator[tuple[Image.Image, int]]:
        for rep in range(1 << 30):
            n = 0
            reader = make_dataset(self.root, "train", shuffle=True, seed=self.seed,
                                  shuffle_buffer=self.shuffle_buffer, epoch=self.epoch * 1000 + rep)
            for sample in reader:
                n += 1
                yield sample
            if n == 0:
                raise DataError(f"this process got no training images from {self.root}")

    def __iter__(self) -> Iterator[PackedBatch]:
        def augment(img: Image.Image, rng: random.Random) -> Tensor:
            return self.transform(img, rng, self.sampler.sample(rng, img.size[::-1]))

        stages = [transformed(augment, f"train/{self.seed}/{self.epoch}"),
                  packed(self.patch_size, self.max_seq_len, self.batch_seqs, self.buffer_size, self.cls_token)]
        it: Iterable = self._images()
        for stage in stages:
            it = stage(it)
        return iter(it)


class EvalStream(torch.utils.data.IterableDataset):
    """Every test image of this rank once, resized to `size` (h, w) or to the size a size policy
    (e.g. TokenBudget) gives it, packed as in training."""

    def __init__(self, root, size: tuple[int, int], patch_size: int, max_seq_len: int,
                 batch_seqs: int, cls_token: bool, split: str = "test", buffer_size: int = 512):
        super().__init__()
        self.root, self.size, self.split = root, size, split
        self.patch_size, self.max_seq_len, self.batch_seqs = patch_size, max_seq_len, batch_seqs
        self.cls_token, self.buffer_size = cls_token, buffer_size

    def __iter__(self) -> Iterator[PackedBatch]:
        transform = EvalTransform()
        reader = make_dataset(self.root, self.split, shuffle=False)
        def size_of(img: Image.Image) -> tuple[int, int]:  # a fixed (h, w) or a size policy
            return self.size if isinstance(self.size, tuple) else self.size.sample(None, img.size[::-1])

        it = transformed(lambda img, rng: transform(img, size_of(img)), "eval")(reader)
        return iter(packed(self.patch_size, self.max_seq_len, self.batch_seqs, self.buffer_size,
                           self.cls_token, fixed_batches=False)(it))
