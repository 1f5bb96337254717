"""Whole epochs through the real train.py: without --steps-per-epoch one epoch of the tiny data
(60 training images) trains on every image exactly once, in round(60 / --batch-images) steps of
about --batch-images images each, at a fixed resolution and at a range of resolutions; what the
trainer reports (metrics.jsonl) is what the model was given (watched at its forward)."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from inproc import metrics, run_train_py, tiny_args
from navit_pe.model import NaViT


# 60 / 16 = 3.75 -> 4 steps of 15; 60 / 14 = 4.3 -> 4 steps of 15; 60 / 20 -> 3 steps of 20
@pytest.mark.parametrize("res, batch", [("16", 16), ("32", 14), ("16:48", 20)])
def test_one_epoch_is_every_image_once(tiny_shards, tmp_path, res, batch):
    steps: list[tuple[list[int], torch.Tensor]] = []  # per training step: dataset indices, (h, w) grids
    forward = NaViT.forward

    def watch(self, x):
        if self.training:
            steps.append((x.sample_ids.tolist(), x.image_grids().clone()))
        return forward(self, x)

    NaViT.forward = watch
    run = tmp_path / "run"
    try:
        assert run_train_py(tiny_args(tiny_shards, run, "--epochs", "1", "--batch-images", batch,
                                      "--train-res", res, "--pos-embed", "learned_2d")) == 0
    finally:
        NaViT.forward = forward
    spe = round(60 / batch)
    assert len(steps) == spe
    # by identity: each of the 60 training images exactly once in the epoch
    assert Counter(i for ids, _ in steps for i in ids) == Counter(range(60))
    sizes = [len(ids) for ids, _ in steps]  # steady steps of about --batch-images images
    assert max(sizes) - min(sizes) <= 1 and all(abs(n - batch) <= 0.1 * batch for n in sizes), sizes
    # the images at the resolution asked for (patch size 4)
    lo, hi = (int(v) // 4 for v in (res.split(":") * 2)[:2])
    grids = torch.cat([g for _, g in steps])
    assert grids.min() >= lo and grids.max() <= hi
    if lo < hi:
        assert len(set(grids.flatten().tolist())) > 3  # a range really draws different sides
    rows = metrics(run)
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, spe + 1))
    evals = [r for r in rows if "test_acc" in r]
    assert len(evals) == 1 and evals[0]["step"] == spe
    assert evals[0]["epoch_images"] == evals[0]["epoch_unique_images"] == 60
