"""data/prepare_cifar.py: sources, meta.json, atomic shards, re-runs, download, bad input."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter

import numpy as np
import pytest
from helpers import (CIFAR10_CLASSES, PREPARE_SCRIPT, file_md5, file_sha256, http_server,
                     make_cifar_pickle_tgz, make_image_tree_tar, read_shards, run_prepare)
from PIL import Image

from navit_pe.data import DataError, ensure_prepared, make_dataset
from navit_pe.prepare import SLEEP_ENV, SOURCE_ENV, main


def load_meta(ddir):
    return json.loads((ddir / "meta.json").read_text())


def assert_meta_consistent(ddir):
    """Shard list == shard files present, each sha256 and count right, counts add up."""
    meta = load_meta(ddir)
    listed = set()
    for split, info in meta["splits"].items():
        assert sum(s["count"] for s in info["shards"]) == info["count"] == meta["counts"][split]
        assert sum(info["per_class"].values()) == info["count"]
        assert list(info["per_class"]) == meta["classes"]
        for shard in info["shards"]:
            assert file_sha256(ddir / shard["file"]) == shard["sha256"]
            listed.add(shard["file"])
    assert {p.name for p in ddir.glob("*.tar")} == listed
    assert not list(ddir.glob("*.tmp"))
    return meta


def test_image_tree_directory_like_the_real_layout(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    members = make_image_tree_tar(src / "cifar10-jpeg-train.tar", 4, split_names=["train"])
    members |= make_image_tree_tar(src / "cifar10-jpeg-test.tar", 2, split_names=["test"], seed=1)
    result = run_prepare("--source", src, "--out", tmp_path / "out", "--shard-size", 7)
    assert result.returncode == 0, result.stderr
    assert "cifar10 train" in result.stderr  # the tqdm bar

    ddir = tmp_path / "out" / "cifar10"
    meta = assert_meta_consistent(ddir)
    assert meta["dataset"] == "cifar10" and meta["classes"] == list(CIFAR10_CLASSES)
    assert meta["counts"] == {"train": 40, "test": 20}
    assert set(meta["splits"]["train"]["per_class"].values()) == {4}
    assert set(meta["splits"]["test"]["per_class"].values()) == {2}
    assert [s["count"] for s in meta["splits"]["train"]["shards"]] == [7, 7, 7, 7, 7, 5]

    # every source JPEG is in the shards byte for byte, with its class index
    samples = read_shards(ddir)
    assert len(samples) == len(members)
    for name, data in members.items():
        split, cls, stem = name[:-len(".jpg")].split("/")
        sample = samples[f"{split}_{cls}_{stem}"]
        assert sample == {"jpg": data, "cls": str(CIFAR10_CLASSES.index(cls)).encode()}


@pytest.mark.parametrize("kind", ["cifar10", "cifar100"])
def test_pickle_tarball_png_bit_exact(tmp_path, kind):
    tgz = tmp_path / f"{kind}-python.tar.gz"
    arrays = make_cifar_pickle_tgz(tgz, kind, n=20)
    result = run_prepare("--source", tgz, "--out", tmp_path / "out", "--quiet")
    assert result.returncode == 0, result.stderr

    ddir = tmp_path / "out" / kind
    meta = assert_meta_consistent(ddir)
    num_classes = 10 if kind == "cifar10" else 100
    assert meta["dataset"] == kind
    assert meta["classes"] == [f"class_{i:03d}" for i in range(num_classes)]
    assert meta["counts"] == {"train": 20, "test": 20}
    for split, (images, labels) in arrays.items():
        assert list(meta["splits"][split]["per_class"].values()) == \
            np.bincount(labels, minlength=num_classes).tolist()

    # raw shards: <split>_<index>.png decodes to exactly the pickle's pixels
    samples = read_shards(ddir)
    for split, (images, labels) in arrays.items():
        for i in range(len(images)):
            sample = samples[f"{split}_{i:06d}"]
            assert int(sample["cls"]) == labels[i]
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(sample["png"]))), images[i])

    # through the reader: the same (label, pixels) multiset
    read = Counter((label, image.tobytes()) for image, label in make_dataset(ddir, "test"))
    assert read == Counter((int(lab), img.tobytes()) for img, lab in zip(*arrays["test"]))


def test_rerun_is_a_noop_and_force_is_reproducible(tmp_path, tiny_image_tree, capsys):
    # in-process main() (same code as the script, minus the interpreter start-up)
    out = tmp_path / "out"
    args = ["--source", str(tiny_image_tree[0]), "--out", str(out), "--shard-size", "16",
            "--quiet"]
    assert main(args) == 0
    ddir = out / "cifar10"
    before = {p.name: p.stat().st_mtime_ns for p in ddir.iterdir()}
    capsys.readouterr()

    assert main(args) == 0
    assert "up to date" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in ddir.iterdir()} == before

    shas = {s["file"]: s["sha256"] for i in load_meta(ddir)["splits"].values()
            for s in i["shards"]}
    assert main([*args, "--force"]) == 0  # rebuilds the very same bytes
    assert {s["file"]: s["sha256"] for i in load_meta(ddir)["splits"].values()
            for s in i["shards"]} == shas


def test_interrupted_prepare_leaves_no_whole_looking_shard(tmp_path, tiny_image_tree):
    out = tmp_path / "out"
    ddir = out / "cifar10"
    args = [sys.executable, str(PREPARE_SCRIPT), "--source", str(tiny_image_tree[0]),
            "--out", str(out), "--shard-size", "4", "--quiet"]
    env = {**os.environ, SLEEP_ENV: "0.05"}  # 90 samples x 0.05 s: plenty of time to kill it
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not (ddir / "train-000000.tar").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "no shard appeared"
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    # no meta.json yet; every final-named shard is whole (the one in flight is still *.tmp)
    assert not (ddir / "meta.json").exists()
    assert list(ddir.glob("*.tmp")), "expected the interrupted shard under its temporary name"
    for shard in ddir.glob("*.tar"):
        with tarfile.open(shard) as tar:
            names = tar.getnames()
        assert len(names) == 8 and len({n.split(".")[0] for n in names}) == 4

    # a re-run completes and cleans up
    result = run_prepare(*args[2:])
    assert result.returncode == 0, result.stderr
    assert assert_meta_consistent(ddir)["counts"] == {"train": 60, "test": 30}


def test_two_processes_preparing_at_once_both_succeed(tmp_path, tiny_image_tree):
    # two study runs (or two ranks) on a fresh checkout prepare the same directory at once:
    # the second waits for the first, then finds the data up to date
    out = tmp_path / "out"
    args = [sys.executable, str(PREPARE_SCRIPT), "--source", str(tiny_image_tree[0]),
            "--out", str(out), "--shard-size", "4", "--quiet"]
    env = {**os.environ, SLEEP_ENV: "0.01"}  # 90 samples x 0.01 s: the two overlap
    procs = [subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=60), *p.communicate()) for p in procs]
    assert [rc for rc, _, _ in results] == [0, 0], results
    assert sum("up to date" in o for _, o, _ in results) == 1  # one wrote, the other waited and found it
    assert assert_meta_consistent(out / "cifar10")["counts"] == {"train": 60, "test": 30}


def test_download_checks_md5(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    tgz = served / "cifar-10-python.tar.gz"
    make_cifar_pickle_tgz(tgz, "cifar10", n=10)
    with http_server(served) as base:
        url = f"{base}/cifar-10-python.tar.gz"

        bad = run_prepare("--download", "--url", url, "--md5", "0" * 32,
                          "--out", tmp_path / "bad", "--quiet")
        assert bad.returncode != 0
        assert "md5" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
        assert "Traceback" not in bad.stderr
        assert not list((tmp_path / "bad" / "downloads").iterdir())  # nothing left behind
        assert not (tmp_path / "bad" / "cifar10").exists()

        good = run_prepare("--download", "--url", url, "--md5", file_md5(tgz),
                           "--out", tmp_path / "good", "--quiet")
        assert good.returncode == 0, good.stderr
    assert file_md5(tmp_path / "good" / "downloads" / "cifar-10-python.tar.gz") == file_md5(tgz)
    assert assert_meta_consistent(tmp_path / "good" / "cifar10")["counts"] == \
        {"train": 10, "test": 10}


def test_no_source_and_no_default_exits_2(tmp_path):
    env = {**os.environ, SOURCE_ENV: str(tmp_path / "missing")}
    result = run_prepare("--out", tmp_path / "out", env=env)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "--source" in result.stderr and "Traceback" not in result.stderr


def _unrelated_tar(path):
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("notes.txt")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"hello"))


@pytest.mark.parametrize("make, expect", [
    (lambda p: None, "not found"),
    (lambda p: p.write_text("not a tar"), "not a readable tar"),
    (_unrelated_tar, "unknown format"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, make, expect):
    source = tmp_path / "source.tar"
    make(source)
    assert main(["--source", str(source), "--out", str(tmp_path / "out")]) == 2
    stderr = capsys.readouterr().err
    assert len(stderr.strip().splitlines()) == 1 and expect in stderr


def test_ensure_prepared(tmp_path, monkeypatch, tiny_shards, tiny_image_tree):
    assert ensure_prepared(tiny_shards.parent) == tiny_shards  # already there

    monkeypatch.setenv(SOURCE_ENV, str(tmp_path / "missing"))
    with pytest.raises(DataError, match="not prepared"):
        ensure_prepared(tmp_path / "empty")

    monkeypatch.setenv(SOURCE_ENV, str(tiny_image_tree[0]))  # the default source exists
    ddir = ensure_prepared(tmp_path / "fresh")
    assert ddir == tmp_path / "fresh" / "cifar10"
    assert load_meta(ddir)["counts"] == {"train": 60, "test": 30}
