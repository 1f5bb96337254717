"""Your own images: data/prepare_images.py -> train.py --resize budget:N -> eval_resolutions.py --budgets,
on images the test makes in three sizes and aspect ratios (64x64, 90x20, 40x300, h x w), every
supported format, plus a truncated JPEG and a text file that must be skipped and counted."""
from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from helpers import MIXED_SIZES, make_mixed_image_folder, read_shards

from navit_pe.cli import UsageError
from navit_pe.prepare_images import main as prepare_main
from navit_pe.data import ImageStore
from navit_pe.stages import EpochPlan, EvalBatches, TrainBatches
from navit_pe.sweep import SweepError, parse_budgets
from navit_pe.trainer import TrainConfig, check_config, check_data
from navit_pe.transforms import TokenBudget, TrainTransform, budget_grid, parse_resize

REPO = Path(__file__).resolve().parents[1]
PATCH = 4
TINY = ["--dim", "32", "--depth", "1", "--heads", "2", "--batch-images", "16", "--num-workers", "0"]
CLASSES = sorted(MIXED_SIZES)  # label order


def run_py(*args, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "NAVIT_PE_CIFAR_SOURCE": "/nonexistent"}
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)


def one_line_error(proc: subprocess.CompletedProcess, prog: str) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error:") and "Traceback" not in proc.stderr, \
        proc.stderr
    return lines[0]


def within_one_patch(src_hw: tuple[int, int], grid: tuple[int, int]) -> bool:
    """Some common scale s puts both sides within one patch of the exact scaled size."""
    (h, w), (gh, gw) = src_hw, grid
    lo = max((gh - 1) * PATCH / h, (gw - 1) * PATCH / w)
    hi = min((gh + 1) * PATCH / h, (gw + 1) * PATCH / w)
    return lo <= hi


# ----------------------------------------------------------------------------- the NaFlex rule
def test_budget_grid_is_the_largest_that_fits():
    rng = random.Random(0)
    cases = [((h, w), n) for h, w in [(64, 64), (90, 20), (40, 300), (20, 90), (300, 40), (1, 1000), (7, 5)]
             for n in (1, 4, 16, 64, 144)]
    cases += [((rng.randint(1, 500), rng.randint(1, 500)), rng.randint(1, 200)) for _ in range(150)]
    for (h, w), n in cases:
        gh, gw = budget_grid((h, w), PATCH, n)
        assert 1 <= gh * gw <= n, ((h, w), n, (gh, gw))
        assert within_one_patch((h, w), (gh, gw)), ((h, w), n, (gh, gw))

        # independently: grid (a, b) is reached by the scales s in ((a-1)p/h, ap/h] and ((b-1)p/w, bp/w];
        # the answer is the fitting grid (a * b <= n) reached by the largest s
        best = max((min(a * PATCH / h, b * PATCH / w), a, b) for a in range(1, n + 1) for b in range(1, n // a + 1)
                   if max((a - 1) * PATCH / h, (b - 1) * PATCH / w) < min(a * PATCH / h, b * PATCH / w))
        assert (gh, gw) == best[1:], ((h, w), n)

def test_token_budget_policy_interface():
    policy = parse_resize("budget:16", PATCH)
    assert isinstance(policy, TokenBudget) and policy.max_tokens() == 16
    assert policy.sample(random.Random(0), (90, 20)) == (32, 8)  # 8 x 2 patches
    assert policy.sample(None, (40, 300)) == (8, 32) and policy.sample(None, (64, 64)) == (16, 16)
    assert policy.sample(None, (12, 20)) == (12, 20)  # 3 x 5 patches: the next scale up needs 4 x 6
    assert parse_resize(None, PATCH) is None and parse_resize("none", PATCH) is None
    for bad in ("budget:0", "budget:x", "64", "tokens:64"):
        with pytest.raises(ValueError, match="budget:N"):
            parse_resize(bad, PATCH)


# ----------------------------------------------------------------------------- prepare
@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> tuple[Path, Path, dict[str, bytes], subprocess.CompletedProcess]:
    """(source folder, prepared dataset dir, {rel path: bytes} of the good images, the prepare run)."""
    base = tmp_path_factory.mktemp("mixed")
    good = make_mixed_image_folder(base / "src")
    proc = run_py("data/prepare_images.py", base / "src", "--name", "mixed", "--out", base / "data",
                  "--shard-size", "5")
    assert proc.returncode == 0, proc.stderr
    return base / "src", base / "data" / "mixed", good, proc


def test_prepare_keeps_bytes_records_sizes_and_skips_bad_files(mixed):
    src, ddir, good, proc = mixed
    meta = json.loads((ddir / "meta.json").read_text())
    assert meta["dataset"] == "mixed" and meta["classes"] == CLASSES
    assert meta["counts"] == {"train": 12, "test": 6}
    assert meta["skipped"]["count"] == 2 and meta["splits"]["train"]["skipped"] == 2
    assert sorted(f.split(":")[0] for f in meta["skipped"]["files"]) == ["train/square/corrupt.jpg",
                                                                        "train/square/notes.txt"]
    assert "skipped 2 file(s)" in proc.stdout and "train/square/corrupt.jpg" in proc.stdout
    for split, n in (("train", 4), ("test", 2)):
        info = meta["splits"][split]
        assert info["sizes"] == {f"{h}x{w}": n for h, w in MIXED_SIZES.values()}
        assert info["size_stats"]["height"]["min"] == 40 and info["size_stats"]["width"]["max"] == 300
        assert len(info["shards"]) == -(-info["count"] // 5)
    # every good image stored once, byte for byte, under its own extension, with its label
    samples = read_shards(ddir)
    assert len(samples) == len(good)
    for rel, data in good.items():
        split, cls, fname = rel.split("/")
        stem, ext = fname.rsplit(".", 1)
        sample = samples[f"{split}_{cls}_{stem}"]
        assert sample[ext] == data and int(sample["cls"]) == CLASSES.index(cls)
    assert {ext for s in samples.values() for ext in s} == {"jpg", "jpeg", "png", "webp", "cls"}


def test_prepare_rerun_is_a_noop_and_a_tar_source_gives_the_same_shards(mixed, tmp_path, capsys):
    src, ddir, _, _ = mixed
    before = {p.name: p.stat().st_mtime_ns for p in ddir.iterdir()}
    assert prepare_main([str(src), "--name", "mixed", "--out", str(ddir.parent), "--shard-size", "5"]) == 0
    assert "up to date" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in ddir.iterdir()} == before
    tar = tmp_path / "photos.tar"
    with tarfile.open(tar, "w") as t:
        t.add(src, arcname="photos")  # a tar whose tree is one directory down
    assert prepare_main([str(tar), "--name", "mixed", "--out", str(tmp_path / "data"), "--shard-size", "5",
                         "--quiet"]) == 0
    a = json.loads((ddir / "meta.json").read_text())
    b = json.loads((tmp_path / "data" / "mixed" / "meta.json").read_text())
    assert [s["sha256"] for s in a["splits"]["train"]["shards"]] == \
        [s["sha256"] for s in b["splits"]["train"]["shards"]]
    assert b["skipped"]["count"] == 2


@pytest.mark.parametrize("case, expect", [
    ("no_test", "no test/ split"),
    ("empty_class", "class train/empty"),
    ("only_bad_files", "class train/square"),
    ("missing", "source not found"),
    ("bad_name", "--name"),
])
def test_prepare_bad_input_one_line_exit_2(tmp_path, capsys, case, expect):
    src = tmp_path / "src"
    make_mixed_image_folder(src, {"train": 1, "test": 1})
    name = "mixed"
    if case == "no_test":
        for f in sorted((src / "test").rglob("*"), reverse=True):
            f.rmdir() if f.is_dir() else f.unlink()
        (src / "test").rmdir()
    elif case == "empty_class":
        (src / "train" / "empty").mkdir()
    elif case == "only_bad_files":
        (src / "train" / "square" / "img0.jpg").unlink()  # left: corrupt.jpg and notes.txt
    elif case == "missing":
        src = tmp_path / "nowhere"
    elif case == "bad_name":
        name = "../up"
    code = prepare_main([str(src), "--name", name, "--out", str(tmp_path / "data"), "--quiet"])
    proc = subprocess.CompletedProcess([], code, *capsys.readouterr())
    assert expect in one_line_error(proc, "prepare_images")
    assert not (tmp_path / "data" / name / "meta.json").exists()


# ----------------------------------------------------------------------------- sizes in training and evaluation
def check_sizes(batches, budget: int) -> int:
    """Every packed image of each class has the size the budget gives its source: within the
    budget and its aspect ratio kept within one patch. Returns the number of images seen."""
    n = 0
    for b in batches:
        for label, grid in zip(b.labels.tolist(), b.image_grids().tolist()):
            src_hw = MIXED_SIZES[CLASSES[label]]
            assert grid[0] * grid[1] <= budget and within_one_patch(src_hw, tuple(grid)), (src_hw, grid)
            assert tuple(grid) == budget_grid(src_hw, PATCH, budget)  # the largest that fits
            n += 1
    return n


@pytest.mark.parametrize("budget", [16, 64])
def test_every_image_trains_and_evaluates_within_its_budget(mixed, budget):
    _, ddir, _, _ = mixed
    policy = TokenBudget(budget, PATCH)
    train = ImageStore.load(ddir, "train")
    plan = EpochPlan(len(train), steps=4, seed=0, epoch=0)
    batches = TrainBatches(train, plan, policy, TrainTransform(), PATCH, budget + 1, cls_token=True, seed=0, epoch=0)
    assert check_sizes(list(batches), budget) == len(train) == 12  # every training image once
    test = ImageStore.load(ddir, "test")
    assert check_sizes(EvalBatches(test, policy, PATCH, budget + 1, 2, cls_token=True), budget) == 6


def test_prepare_train_eval_resolutions_end_to_end(mixed, tmp_path):
    _, ddir, _, _ = mixed
    run = tmp_path / "run"
    proc = run_py("train.py", "--data-root", ddir.parent, "--dataset", "mixed", "--resize", "budget:16",
                  "--out", run, "--epochs", "2", "--steps-per-epoch", "3", *TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "estimated time for the whole run" in out and "at budget:16" in out
    result = json.loads((run / "results.json").read_text())
    assert result["test_images"] == 6 and result["eval_res"] == "budget:16"
    proc = run_py("eval_resolutions.py", run, "--budgets", "16,64", "--out", tmp_path / "eval")
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "eval" / "accuracy.json").read_text())
    assert data["resolutions"] == ["budget:16", "budget:64"]
    cells = data["runs"][0]["results"]
    assert [cells[k]["total"] for k in data["resolutions"]] == [6, 6]
    assert cells["budget:16"]["in_train_range"] and not cells["budget:64"]["in_train_range"]
    # the sweep's cell at the training budget is train.py's own final accuracy
    assert (cells["budget:16"]["correct"], cells["budget:16"]["total"]) == (result["test_correct"], 6)
    assert "| sincos @budget:16 | **" in proc.stdout


def test_budget_flag_errors_name_the_flag(mixed, tmp_path):
    root = str(mixed[1].parent)
    with pytest.raises(UsageError, match="--max-seq-len.*--resize"):
        check_config(TrainConfig(resize="budget:300"))
    with pytest.raises(UsageError, match="--resize: .*e.g. budget:64"):
        check_config(TrainConfig(resize="64"))
    with pytest.raises(UsageError, match="--aspect does not apply with --resize"):
        check_config(TrainConfig(resize="budget:16", aspect="0.5:2"))
    with pytest.raises(UsageError, match="prepare_images.py SOURCE --name photos") as e:
        check_data(TrainConfig(data_root=root, dataset="photos"))
    assert "prepare_cifar" not in str(e.value)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "meta.json").write_text(json.dumps({"splits": {"train": {"shards": []}}}))
    with pytest.raises(UsageError, match="no train shards; re-run python data/prepare_images.py SOURCE --name broken"):
        check_data(TrainConfig(data_root=str(tmp_path), dataset="broken"))
    with pytest.raises(SweepError, match="--budgets.*e.g. 16,64"):
        parse_budgets("16,x")


def test_train_transform_any_size_and_aspect():
    from PIL import Image
    transform = TrainTransform()  # crop, flip, RandAugment (2 ops, magnitude 9)
    rng = random.Random(0)
    for h, w in [(90, 20), (40, 300), (3, 500), (1200, 900)]:
        img = Image.new("RGB", (w, h), (200, 10, 10))
        for _ in range(5):
            size = TokenBudget(64, PATCH).sample(rng, (h, w))
            x = transform(img, rng, size)
            assert x.shape == (3, *size) and torch.isfinite(x).all()
