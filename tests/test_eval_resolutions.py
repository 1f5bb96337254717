"""eval_resolutions.py end to end: tiny real runs from train.py, the sweep outputs, the 2-process
launch, bad input. Two short training runs are shared by the module (about 5 s each)."""
from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SQUARES = ["8x8", "16x16", "24x24", "32x32", "40x40", "48x48", "56x56", "64x64", "72x72", "80x80", "88x88", "96x96"]
OTHERS = ["16x32", "32x16", "16x64", "64x16", "32x64", "64x32"]


def run_py(*args, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def train_tiny(data_root: Path, out: Path, pos_embed: str) -> Path:
    proc = run_py("train.py", "--data-root", data_root, "--epochs", 1, "--steps-per-epoch", 2, "--dim", 32,
                  "--depth", 1, "--heads", 2, "--batch-images", 16, "--num-workers", 0, "--train-res", "16:32",
                  "--pos-embed", pos_embed, "--out", out)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="module")
def runs(tiny_shards, tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("eval_runs")
    return {name: train_tiny(tiny_shards.parent, base / name, name) for name in ("rope", "learned_1d")}


@pytest.fixture(scope="module")
def sweep_out(runs, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """One single-process sweep over both runs and the rope run's checkpoint, with --plots."""
    out = tmp_path_factory.mktemp("eval_out")
    ckpt = sorted((runs["rope"] / "checkpoints").glob("step_*"))[-1]
    proc = run_py("eval_resolutions.py", runs["rope"], runs["learned_1d"], ckpt, "--out", out, "--plots",
                  timeout=300)  # the default sweep reaches 96 px: leave room on a busy machine
    assert proc.returncode == 0, proc.stderr
    return out, proc


def parse_table(md: str) -> tuple[list[str], dict[str, list[str]]]:
    """Markdown table -> (column keys, {run label: cell strings})."""
    lines = [ln for ln in md.splitlines() if ln.startswith("|")]
    split = lambda ln: [c.strip() for c in ln.strip("|").split("|")]  # noqa: E731
    header = split(lines[0])[1:]
    rows = {split(ln)[0]: split(ln)[1:] for ln in lines[2:]}
    return header, rows


def cell_value(s: str) -> float:
    return float(s.strip("*"))


def test_table_csv_json_agree(sweep_out):
    out, proc = sweep_out
    md = (out / "accuracy.md").read_text()
    assert md.strip() in proc.stdout  # printed as well as saved
    header, rows = parse_table(md)
    assert header == SQUARES + OTHERS
    assert list(rows) == ["rope @16:32", "learned_1d @16:32", "rope @16:32 step 2"]
    data = json.loads((out / "accuracy.json").read_text())
    assert data["resolutions"] == header
    with open(out / "accuracy.csv") as f:
        csv_rows = {r["run"]: r for r in csv.DictReader(f)}
    for run in data["runs"]:
        cells = rows[run["label"]]
        assert run["pos_embed"] in run["label"] and run["train_res"] == "16:32"
        for key, s in zip(header, cells):
            c = run["results"][key]
            assert 0 <= c["acc"] <= 1 and c["total"] == 30 and c["acc"] == c["correct"] / c["total"]
            assert s == f"{c['acc']:.4f}" or s == f"**{c['acc']:.4f}**"
            assert s.startswith("**") == c["in_train_range"]
            assert float(csv_rows[run["label"]][key]) == c["acc"]
        # 16..32 on both sides is the training range of train_res 16:32
        inside = {k for k, s in zip(header, cells) if s.startswith("**")}
        assert inside == {"16x16", "24x24", "32x32", "16x32", "32x16"}


def test_eval_res_matches_train(runs, sweep_out):
    out, _ = sweep_out
    data = {r["label"]: r for r in json.loads((out / "accuracy.json").read_text())["runs"]}
    for name, run_dir in runs.items():
        final = json.loads((run_dir / "results.json").read_text())
        cell = data[f"{name} @16:32"]["results"][f"{final['eval_res']}x{final['eval_res']}"]
        assert (cell["correct"], cell["total"]) == (final["test_correct"], final["test_images"])
        assert cell["acc"] == final["test_acc"]
        assert data[f"{name} @16:32"]["train_result"]["test_acc"] == final["test_acc"]
    # the last checkpoint holds the final weights
    assert data["rope @16:32 step 2"]["results"] == data["rope @16:32"]["results"]
    assert data["rope @16:32 step 2"]["checkpoint_step"] == 2


def test_both_pos_modes_are_rows(runs, sweep_out, tmp_path):
    """--pos-mode extrapolate,interpolate: one row per (run, mode), one for an encoding whose
    modes are the same; inside the training range the two modes agree, the extrapolate row is
    the default sweep's row."""
    out = tmp_path / "modes"
    proc = run_py("eval_resolutions.py", runs["rope"], runs["learned_1d"], "--out", out, "--res", "16,32,64",
                  "--aspect", "", "--pos-mode", "extrapolate,interpolate")
    assert proc.returncode == 0, proc.stderr
    header, rows = parse_table((out / "accuracy.md").read_text())
    assert list(rows) == ["rope @16:32, extrapolate", "rope @16:32, interpolate", "learned_1d @16:32, both modes"]
    ext, itp = rows["rope @16:32, extrapolate"], rows["rope @16:32, interpolate"]
    assert ext[:2] == itp[:2]  # 16x16 and 32x32: inside the trained extent, the same model
    default = {r["label"]: r["results"] for r in json.loads((sweep_out[0] / "accuracy.json").read_text())["runs"]}
    data = {r["label"]: r for r in json.loads((out / "accuracy.json").read_text())["runs"]}
    for key in header:
        assert data["rope @16:32, extrapolate"]["results"][key] == default["rope @16:32"][key]
    assert [data[k]["pos_mode"] for k in rows] == ["extrapolate", "interpolate", "both"]
    assert data["rope @16:32, interpolate"]["trained_extent"] == [8.0, 8.0]  # 32 px / patch 4
    with open(out / "accuracy.csv") as f:
        assert [r["pos_mode"] for r in csv.DictReader(f)] == ["extrapolate", "interpolate", "both"]
    from navit_pe.sweep import SweepError, parse_modes

    with pytest.raises(SweepError, match="extrapolate, interpolate"):  # the CLI prints it as one line
        parse_modes("extrapolate,stretch")


def test_pngs_are_images(sweep_out):
    out, _ = sweep_out
    pngs = [out / "accuracy.png", out / "learned_rope_16_32.png", out / "learned_learned_1d_16_32.png",
            out / "learned_rope_16_32_step_2.png"]
    for p in pngs:
        with Image.open(p) as im:
            im.verify()
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_same_counts(runs, sweep_out, tmp_path):
    out1, _ = sweep_out
    out2 = tmp_path / "two"
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                           "--main_process_port", str(free_port()),
                           "eval_resolutions.py", str(runs["rope"]), "--out", str(out2)],
                          cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("| rope @16:32 |") == 1  # only the main process prints the table
    one = {r["label"]: r["results"] for r in json.loads((out1 / "accuracy.json").read_text())["runs"]}
    two_json = json.loads((out2 / "accuracy.json").read_text())
    assert two_json["num_processes"] == 2
    two = two_json["runs"]
    assert [r["label"] for r in two] == ["rope @16:32"]
    assert two[0]["results"] == one["rope @16:32"]


def broken_copy(src: Path, dst: Path, how: str) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoints"))
    cfg = json.loads((dst / "config.json").read_text())
    if how == "garbage":
        (dst / "config.json").write_text("{not json")
    elif how == "unknown_key":
        (dst / "config.json").write_text(json.dumps(dict(cfg, colour="blue")))
    elif how == "unknown_pos":
        (dst / "config.json").write_text(json.dumps(dict(cfg, pos_embed="wavelet")))
    elif how == "no_weights":
        (dst / "model.safetensors").unlink()
    return dst


@pytest.mark.parametrize("case", ["missing", "garbage", "unknown_key", "unknown_pos", "no_weights", "bad_res",
                                  "bad_aspect", "out_under_a_file"])
def test_bad_input(runs, tmp_path, case):
    run, extra = runs["rope"], []
    if case == "missing":
        run = tmp_path / "nope"
    elif case == "bad_res":
        extra = ["--res", "16,30"]
    elif case == "bad_aspect":
        extra = ["--aspect", "16x18"]
    elif case == "out_under_a_file":  # --out cannot be created (a file stands in its path)
        (tmp_path / "file").write_text("")
        extra = ["--out", tmp_path / "file" / "out"]
    else:
        run = broken_copy(runs["rope"], tmp_path / "run", case)
    proc = run_py("eval_resolutions.py", run, "--out", tmp_path / "out", *extra, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("eval_resolutions.py: error:"), proc.stderr
    if case in ("bad_res", "bad_aspect"):
        assert "not a multiple of the patch size" in lines[0]
    if case == "out_under_a_file":
        assert "cannot write to the output directory" in lines[0]
    assert not (tmp_path / "out").exists()


def test_train_range_with_aspect():
    from navit_pe.model import NaViT
    from navit_pe.sweep import Run

    model = NaViT("none", dim=16, depth=1, heads=1)
    fixed = Run(Path("r"), Path("r"), None, dict(train_res="32", dataset="cifar10", data_root="d"), model)
    assert fixed.in_train_range((32, 32)) and not fixed.in_train_range((16, 32))
    aspect = Run(Path("r"), Path("r"), None, dict(train_res="16:48", aspect="0.5:2"), model)
    # area within [16^2, 48^2] and w/h within [0.5, 2]
    assert aspect.in_train_range((32, 64)) and aspect.in_train_range((64, 32)) and aspect.in_train_range((16, 32))
    assert not aspect.in_train_range((64, 64)) and not aspect.in_train_range((8, 8))
    assert not aspect.in_train_range((16, 64))


def test_max_images_takes_the_first_n(runs, sweep_out, tmp_path):
    """--max-images N: every cell counts the split's first N images, and those are the same images
    as in the full sweep (the cells of a one-image sweep agree with evaluate on that image)."""
    out = tmp_path / "few"
    proc = run_py("eval_resolutions.py", runs["rope"], "--out", out, "--res", "16,32", "--aspect", "",
                  "--max-images", "7")
    assert proc.returncode == 0, proc.stderr
    data = json.loads((out / "accuracy.json").read_text())
    assert data["max_images"] == 7
    assert all(c["total"] == 7 for c in data["runs"][0]["results"].values())
    from navit_pe import NaViT
    from navit_pe.evaluate import evaluate

    model = NaViT.from_pretrained(runs["rope"])
    train = json.loads((runs["rope"] / "train_config.json").read_text())
    ddir = Path(train["data_root"]) / train["dataset"]
    full = [evaluate(model, ddir, (32, 32), max_images=n, mixed_precision=train["resolved_mixed_precision"])
            for n in (7, 0)]
    assert full[0] == (data["runs"][0]["results"]["32x32"]["correct"], 7) and full[1][1] == 30
    proc = run_py("eval_resolutions.py", runs["rope"], "--out", out, "--max-images", "-1")
    assert proc.returncode == 2 and "--max-images" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("order", [("extrapolate", "interpolate"), ("interpolate", "extrapolate")])
def test_interpolate_inside_the_trained_extent_is_the_extrapolate_cell(runs, tmp_path, monkeypatch, order):
    """rope @16:32 (trained extent 8x8 patches): sizes whose grid fits are evaluated once for both
    modes, in either order, also through the cells file; a size one patch beyond is evaluated per
    mode. The counts stand in for evaluate() and differ per mode, so a cell shared wrongly shows."""
    from navit_pe import sweep as sw

    calls = []

    def counts(model, data, size, **kw):
        calls.append((model.config.pos_mode, size))
        return size[0] * 100 + size[1] + (5000 if model.config.pos_mode == "interpolate" else 0), 10000

    monkeypatch.setattr(sw, "evaluate", counts)
    rows = sw.expand_modes([sw.load_run(runs["rope"])], list(order))
    inside, beyond = [(8, 8), (32, 32), (16, 32)], [(32, 36), (36, 16)]
    ext, itp = (0, 1) if order[0] == "extrapolate" else (1, 0)  # rows' indices
    sweep = sw.run_sweep(rows, inside + beyond, progress=False)
    assert len(calls) == len(inside) + 2 * len(beyond)
    for res in inside:
        assert sweep.cells[itp, res] == sweep.cells[ext, res]
    for res in beyond:
        assert sweep.cells[itp, res] != sweep.cells[ext, res]
    cells_file = tmp_path / sw.CELLS_FILE
    calls.clear()
    assert sw.run_sweep(rows, inside + beyond, progress=False, cells_file=cells_file).cells == sweep.cells
    assert len(calls) == len(sw.read_cells(cells_file)) == len(inside) + 2 * len(beyond)
    calls.clear()
    assert sw.run_sweep(rows, inside + beyond, progress=False, cells_file=cells_file).cells == sweep.cells
    assert calls == []


def test_a_killed_sweep_goes_on_where_it_stopped(runs, tmp_path, monkeypatch):
    """Killed after 2 of 6 cells, the same sweep again evaluates only the other 4 and ends with the
    counts of an uninterrupted sweep; a line torn by the kill is skipped; other weights are
    evaluated afresh. The counts are a stand-in for evaluate(), distinct per mode and size, so a
    cell taken from the file for the wrong row or size shows."""
    from navit_pe import sweep as sw

    cells_file = tmp_path / sw.CELLS_FILE
    rows = sw.expand_modes([sw.load_run(runs["rope"])], ["extrapolate", "interpolate"])
    resolutions = [(8, 40), (40, 8), (16, 64)]  # each beyond the trained 32x32: the modes differ
    calls = []

    def counts(model, data, size, **kw):  # (correct, total) unique to (mode, size)
        calls.append((model.config.pos_mode, size))
        return size[0] * 100 + size[1] + (5000 if model.config.pos_mode == "interpolate" else 0), 10000

    def killed_after_two(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt
        return counts(*args, **kwargs)

    monkeypatch.setattr(sw, "evaluate", counts)
    whole = sw.run_sweep(rows, resolutions, progress=False)  # no cells file: every cell evaluated
    assert len(set(whole.cells.values())) == 6
    calls.clear()
    monkeypatch.setattr(sw, "evaluate", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        sw.run_sweep(rows, resolutions, cells_file=cells_file, progress=False)
    assert len(sw.read_cells(cells_file)) == 2
    with open(cells_file, "a") as f:
        f.write('{"key": "torn')  # a kill in the middle of a write
    calls.clear()
    monkeypatch.setattr(sw, "evaluate", counts)
    again = sw.run_sweep(rows, resolutions, cells_file=cells_file, progress=False)
    assert len(calls) == 4 and len(sw.read_cells(cells_file)) == 6
    assert again.cells == whole.cells
    # the same cell of other weights (the run's checkpoint) is evaluated, not taken from the file
    calls.clear()
    ckpt = sorted((runs["rope"] / "checkpoints").glob("step_*"))[-1]
    sw.run_sweep([sw.load_run(ckpt)], resolutions[:1], cells_file=cells_file, progress=False)
    assert len(calls) == 1
    # ... and so is a cell of data prepared again (a test shard rewritten: its time changes)
    calls.clear()
    shard = next(sw.data_dir(rows[0]).glob("test-*"))
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    sw.run_sweep(rows[:1], resolutions[:1], cells_file=cells_file, progress=False)
    assert len(calls) == 1


def test_a_cell_is_keyed_by_the_weights_loaded(runs, tmp_path, monkeypatch):
    """A weights file replaced after loading: the cells are keyed by the bytes in the model, not by
    the file's new content (which a later load evaluates afresh)."""
    from navit_pe import sweep as sw

    calls = []
    monkeypatch.setattr(sw, "evaluate", lambda *a, **k: calls.append(a[2]) or (1, 2))
    run_dir = tmp_path / "rope"
    shutil.copytree(runs["rope"], run_dir)
    kw = dict(resolutions=[(16, 16)], cells_file=tmp_path / sw.CELLS_FILE, progress=False)
    loaded = sw.load_run(run_dir)
    sw.run_sweep([loaded], **kw)
    sw.run_sweep([replace(loaded, weights_digest="")], **kw)  # a Run built elsewhere: the file is hashed
    assert len(calls) == 1
    ckpt = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    shutil.copyfile(ckpt / "model.safetensors", run_dir / "model.safetensors")  # other weights, same path
    sw.run_sweep([loaded], **kw)
    assert len(calls) == 1  # the model holds the weights already evaluated
    sw.run_sweep([sw.load_run(run_dir)], **kw)
    assert len(calls) == 2  # loaded again: the new weights are evaluated


@pytest.mark.parametrize("change", ["max_images", "tokens_per_batch", "max_seq_len", "model config"])
def test_a_cell_is_reused_only_for_the_same_inputs(runs, tmp_path, monkeypatch, change):
    from navit_pe import sweep as sw

    calls = []
    monkeypatch.setattr(sw, "evaluate", lambda *a, **k: calls.append(a[2]) or (1, 2))
    cells_file = tmp_path / sw.CELLS_FILE
    kw = dict(resolutions=[(16, 16)], cells_file=cells_file, progress=False)
    sw.run_sweep([sw.load_run(runs["rope"])], **kw)
    sw.run_sweep([sw.load_run(runs["rope"])], **kw)
    assert len(calls) == 1  # the same inputs: taken from the file
    run = sw.load_run(runs["rope"])
    if change == "model config":  # e.g. config.json edited: not in the weights file
        run.model.config.rope_base = run.model.config.rope_base * 2
    else:
        kw[change] = {"max_images": 7, "tokens_per_batch": 4096, "max_seq_len": 512}[change]
    sw.run_sweep([run], **kw)
    assert len(calls) == 2


def test_the_cli_writes_every_cell(sweep_out):
    """eval_resolutions.py keeps its finished cells in --out (what a rerun after a kill reads)."""
    out, _ = sweep_out
    from navit_pe.sweep import CELLS_FILE, read_cells

    data = json.loads((out / "accuracy.json").read_text())
    cells = read_cells(out / CELLS_FILE)
    assert len(cells) == len(data["runs"]) * len(data["resolutions"])
    assert sorted(cells.values()) == sorted((c["correct"], c["total"]) for r in data["runs"] for c in r["results"].values())
