"""Evaluation under several processes, by identity: over the ranks every test image is evaluated
exactly once, also when the test split is a single shard (as the real CIFAR-10 one is), so there
are fewer shards than ranks. Each rank is driven through navit_pe.evaluate.evaluate with a small
stand-in for the Accelerator, and the model records the dataset indices of the images it sees.
(Training under two real processes: tests/test_train.py::test_two_processes.)"""
from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from navit_pe.config import NaViTConfig
from navit_pe.evaluate import evaluate
from navit_pe.model import NaViT
from navit_pe.prepare import prepare


class FakeAccelerator:
    """What evaluate needs of an Accelerator: this process's rank of `world`, its device, and a
    reduce (here: each rank's own counts, summed by the test)."""

    def __init__(self, rank: int, world: int):
        self.process_index, self.num_processes, self.device = rank, world, torch.device("cpu")

    def reduce(self, tensor, reduction="sum"):
        return tensor


@pytest.fixture(scope="module")
def one_shard(tiny_image_tree, tmp_path_factory):
    """The tiny CIFAR-like data (60 train, 30 test) with each split in one shard."""
    ddir = prepare(tiny_image_tree[0], tmp_path_factory.mktemp("one_shard"), shard_size=1000, progress=False)
    splits = json.loads((ddir / "meta.json").read_text())["splits"]
    assert len(splits["test"]["shards"]) == 1 and splits["test"]["count"] == 30
    return ddir


def watched_model() -> tuple[NaViT, list[int]]:
    torch.manual_seed(0)
    model = NaViT(NaViTConfig(pos_embed="sincos", num_classes=10, patch_size=4, dim=32, depth=1, heads=2))
    seen: list[int] = []
    forward = model.forward

    def watch(batch):
        seen.extend(batch.sample_ids.tolist())
        return forward(batch)

    model.forward = watch
    return model, seen


@pytest.mark.parametrize("world", [2, 3])
def test_evaluate_every_test_image_once_over_ranks(one_shard, world):
    model, seen = watched_model()
    alone = evaluate(model, one_shard, (16, 16))  # one process: the reference counts
    assert sorted(seen) == list(range(30))
    seen.clear()
    correct = total = 0
    per_rank = []
    for rank in range(world):
        start = len(seen)
        c, t = evaluate(model, one_shard, (16, 16), accelerator=FakeAccelerator(rank, world))
        per_rank.append(seen[start:])
        assert t == len(per_rank[-1])  # a rank counts the images it evaluated
        correct, total = correct + c, total + t
    # by identity: each of the 30 test images once over the ranks, and the ranks share the work
    assert Counter(seen) == Counter(range(30))
    assert max(map(len, per_rank)) - min(map(len, per_rank)) <= 1
    assert (correct, total) == alone  # the same accuracy as one process
