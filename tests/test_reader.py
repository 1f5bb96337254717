"""navit_pe.data reader: labels and pixels, shuffling, node/worker splits, bad samples."""

from __future__ import annotations

import io
import logging
import shutil
import tarfile
from collections import Counter

import pytest
import torch
from helpers import CIFAR10_CLASSES
from PIL import Image

from navit_pe.data import DataError, load_meta, make_dataset, shard_urls


def fingerprint(image, label):
    return label, image.tobytes()


def read_all(ddir, split="train", **kw):
    return [fingerprint(image, label) for image, label in make_dataset(ddir, split, **kw)]


def test_reads_every_sample_with_its_label_and_pixels(tiny_shards, tiny_image_tree):
    samples = list(make_dataset(tiny_shards, "train", shuffle=False))
    assert all(img.mode == "RGB" and img.size == (32, 32) for img, _ in samples)
    expected = Counter()
    for name, data in tiny_image_tree[1].items():
        split, cls, _ = name.split("/")
        if split == "train":
            image = Image.open(io.BytesIO(data)).convert("RGB")
            expected[fingerprint(image, CIFAR10_CLASSES.index(cls))] += 1
    assert Counter(fingerprint(img, label) for img, label in samples) == expected
    assert len(samples) == load_meta(tiny_shards)["counts"]["train"] == 60


def test_shuffle_is_seeded_and_changes_with_epoch(tiny_shards):
    plain = read_all(tiny_shards, shuffle=False)
    first = read_all(tiny_shards, seed=1, shuffle_buffer=20)
    assert first == read_all(tiny_shards, seed=1, shuffle_buffer=20)  # deterministic
    assert first != plain and Counter(first) == Counter(plain)  # same samples, new order
    assert read_all(tiny_shards, seed=2, shuffle_buffer=20) != first
    other_epoch = read_all(tiny_shards, seed=1, shuffle_buffer=20, epoch=1)
    assert other_epoch != first
    reader = make_dataset(tiny_shards, "train", seed=1, shuffle_buffer=20)
    reader.set_epoch(1)
    assert [fingerprint(*s) for s in reader] == other_epoch


@pytest.mark.parametrize("world, workers", [(1, 2), (2, 1), (2, 2), (2, 3), (3, 4), (1, 8)])
@pytest.mark.parametrize("shuffle", [False, True])
def test_ranks_and_workers_see_each_sample_once(tiny_shards, monkeypatch, world, workers,
                                                shuffle):
    # pytorch_worker_info() reads these, so one process can play every rank and worker;
    # the train split has 4 shards, so several cases have fewer shards than takers
    seen = Counter()
    for rank in range(world):
        for worker in range(workers):
            for name, value in [("RANK", rank), ("WORLD_SIZE", world),
                                ("WORKER", worker), ("NUM_WORKERS", workers)]:
                monkeypatch.setenv(name, str(value))
            seen.update(read_all(tiny_shards, shuffle=shuffle, seed=3))
    assert sorted(seen.values()) == [1] * 60


def test_nodesplit_off_gives_every_rank_everything(tiny_shards, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert len(read_all(tiny_shards, nodesplit=False)) == 60
    assert 0 < len(read_all(tiny_shards, nodesplit=True)) < 60  # 2 of the 4 shards


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_dataloader_workers_eval_exactly_once(tiny_shards):
    dataset = make_dataset(tiny_shards, "test", shuffle=False)  # 2 shards, 3 workers
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=3,
                                         collate_fn=list)
    seen = Counter(fingerprint(*sample) for batch in loader for sample in batch)
    assert seen == Counter(read_all(tiny_shards, "test", shuffle=False))
    assert sum(seen.values()) == 30


@pytest.mark.parametrize("damage", [lambda b: b"garbage, not an image", lambda b: b[:len(b) // 2]])
def test_corrupt_sample_is_skipped_and_counted(tiny_shards, tmp_path, caplog, damage):
    ddir = shutil.copytree(tiny_shards, tmp_path / "cifar10")
    shard = ddir / "train-000000.tar"
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    bad_key = members[4][0].name.split(".")[0]
    with tarfile.open(shard, "w") as tar:
        for member, data in members:
            if member.name == f"{bad_key}.jpg":
                data = damage(data)
                member.size = len(data)
            tar.addfile(member, io.BytesIO(data))

    reader = make_dataset(ddir, "train", shuffle=True)
    with caplog.at_level(logging.WARNING, logger="navit_pe.data"):
        samples = list(reader)
    assert len(samples) == 59 and reader.skipped == 1
    warnings = [r for r in caplog.records if r.name == "navit_pe.data"]
    assert len(warnings) == 1 and bad_key in warnings[0].getMessage()


def test_compose_adds_stages(tiny_shards):
    labels = make_dataset(tiny_shards, "test", shuffle=False).compose(
        lambda source: (label for _, label in source))
    assert sorted(labels) == sorted(label for _, label in make_dataset(tiny_shards, "test"))


def test_shard_urls_and_errors(tiny_shards, tmp_path):
    urls = shard_urls(tiny_shards, "train")
    assert [u.rsplit("/", 1)[1] for u in urls] == [f"train-{i:06d}.tar" for i in range(4)]
    with pytest.raises(DataError, match="no split"):
        shard_urls(tiny_shards, "val")
    with pytest.raises(DataError, match="not found"):
        make_dataset(tmp_path, "train")
