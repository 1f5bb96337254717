"""A damaged training shard (truncated inside a member, or garbage written over its middle) is
skipped and counted: ImageStore.load keeps every readable sample exactly as in the undamaged data,
counts the samples it left out, and a real train.py run on the damaged data trains a whole epoch
on what is readable and says how many samples it skipped. (Each case damages its own copy of the
tiny dataset; the session fixture stays intact.)"""
from __future__ import annotations

import json
import shutil
import tarfile

import numpy as np
import pytest

from inproc import metrics, run_train_py, tiny_args
from navit_pe.data import ImageStore

DAMAGED = 1  # the second of the 4 train shards (16 samples each, 12 in the last): shards follow it


def damaged_copy(tiny_shards, tmp_path, how: str):
    """A copy of the tiny dataset with train shard DAMAGED damaged `how`; returns (dir, shard name)."""
    ddir = tmp_path / how / "cifar10"
    shutil.copytree(tiny_shards, ddir)
    name = json.loads((ddir / "meta.json").read_text())["splits"]["train"]["shards"][DAMAGED]["file"]
    shard = ddir / name
    data = bytearray(shard.read_bytes())
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    middle = members[len(members) // 2]
    if how == "truncated":  # cut inside the data of the member in the middle
        assert middle.size > 100
        del data[middle.offset_data + middle.size // 2:]
    elif how == "truncated_padding":  # cut after the data of a member, inside its padding to 512 bytes
        assert middle.size % 512 not in (0, 511)
        del data[middle.offset_data + middle.size + 1:]
    elif how == "garbage_head":  # garbage over the shard's first header (the tar cannot even be opened)
        data[:512] = np.random.default_rng(1).integers(0, 256, 512, dtype=np.uint8).tobytes()
    else:  # 3 KiB of garbage over the middle of the file, headers included (the size is unchanged)
        rng = np.random.default_rng(0)
        mid = len(data) // 2
        data[mid - 1536:mid + 1536] = rng.integers(0, 256, 3072, dtype=np.uint8).tobytes()
    shard.write_bytes(bytes(data))
    return ddir, name


@pytest.fixture(scope="module")
def intact(tiny_shards):
    return ImageStore.load(tiny_shards, "train")


@pytest.mark.parametrize("how", ["truncated", "truncated_padding", "garbage", "garbage_head"])
def test_store_skips_and_counts_the_damage(tiny_shards, tmp_path, intact, how):
    ddir, name = damaged_copy(tiny_shards, tmp_path, how)
    store = ImageStore.load(ddir, "train")
    assert len(intact) == 60 and intact.skipped == 0
    assert 0 < len(store) < 60
    assert store.skipped == 60 - len(store)  # every sample left out is counted
    # the samples of the undamaged shards all there, and every sample kept is the intact one
    by_key = {k: i for i, k in enumerate(intact.keys)}
    assert len(set(store.keys)) == len(store.keys)
    undamaged = [k for k in intact.keys if intact_shard_of(tiny_shards, k) != name]
    assert set(undamaged) <= set(store.keys) and len(undamaged) == 44
    for j, key in enumerate(store.keys):
        i = by_key[key]
        assert store.labels[j] == intact.labels[i] and store.sizes[j] == intact.sizes[i]
        assert np.array_equal(np.asarray(store.image(j)), np.asarray(intact.image(i))), key


_SHARD_OF: dict[str, str] = {}


def intact_shard_of(ddir, key: str) -> str:
    """The shard file (of the intact dataset) that holds sample `key`."""
    if not _SHARD_OF:
        for shard in sorted(ddir.glob("train-*.tar")):
            with tarfile.open(shard) as tar:
                for m in tar.getmembers():
                    _SHARD_OF[m.name.split(".", 1)[0]] = shard.name
    return _SHARD_OF[key]


def test_train_py_runs_on_a_damaged_shard(tiny_shards, tmp_path, capsys):
    """train.py on the data with garbage in a shard (its size unchanged, so the dataset still looks
    prepared): exit 0, the skip reported, a whole epoch over the readable images."""
    ddir, _ = damaged_copy(tiny_shards, tmp_path, "garbage")
    readable = len(ImageStore.load(ddir, "train"))
    run = tmp_path / "run"
    assert run_train_py(tiny_args(ddir, run, "--epochs", "1", "--batch-images", "8")) == 0
    out = capsys.readouterr()
    assert f"skipped unreadable samples: {60 - readable} train, 0 test" in out.out + out.err
    evals = [r for r in metrics(run) if "test_acc" in r]
    assert len(evals) == 1 and evals[0]["epoch_images"] == evals[0]["epoch_unique_images"] == readable
    assert evals[0]["test_images"] == 30
    assert (run / "model.safetensors").is_file()
