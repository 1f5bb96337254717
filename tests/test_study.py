"""The study driver (navit_pe/study.py): the summary from records alone (fake records, numbers
checkable by hand), and a tiny protocol end to end: train, sweep, record, skip what is recorded,
resume what was interrupted."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
from PIL import Image

from navit_pe import study
from navit_pe.study import Protocol, Regime, RunSpec

RES = ["8x8", "32x32", "64x64", "96x96", "16x64"]


def fake_record(enc: str, regime: str, seed: int, accs: dict[str, dict[str, float]], test_acc: float = 0.5,
                epoch_train_s: float = 100.0) -> dict:
    """A record as run_one writes it, with the sweep accuracies given per mode."""
    spec = RunSpec(enc, regime, seed)
    return dict(protocol="fake", name=spec.name, spec=dict(encoding=enc, regime=regime, seed=seed),
                regime=dict(label={"mix": "16:48", "ref32_10ep": "32 ref 10ep", "fixed32": "32",
                                   "mix_rescale2": "16:48 rescale 2"}[regime], args=["--x"],
                            about="a"),
                commit="c0ffee", recorded_commit="c0ffee", machine="test CPU, 2 cores", python="3",
                recorded_at="2026-01-01T00:00:00+00:00", train_command=f"python train.py --pos-embed {enc} --out x",
                sweep_command="python eval_resolutions.py x", train_config={}, result=dict(test_acc=test_acc),
                epochs=[dict(epoch=1, test_acc=test_acc, epoch_s=epoch_train_s + 5, epoch_train_s=epoch_train_s)],
                train_s=epoch_train_s + 5, sweep_s=30.0,
                sweep=dict(resolutions=RES, max_images=0,
                           modes={m: {k: dict(acc=a, correct=int(a * 1000), total=1000) for k, a in cells.items()}
                                  for m, cells in accs.items()}))


def test_summary_from_fake_records(tmp_path):
    root = tmp_path / "cpu-short"
    # rope at 16:48, three seeds: at 64x64 extrapolate 0.5, 0.6, 0.7 -> 60.0 ± 10.0 (sample std)
    for seed, a in enumerate((0.5, 0.6, 0.7)):
        accs = {"extrapolate": {k: a for k in RES}, "interpolate": {k: a - 0.1 for k in RES}}
        study.write_json(root / "runs" / f"{RunSpec('rope', 'mix', seed).name}.json",
                         fake_record("rope", "mix", seed, accs))
    # one seed of learned_1d with the reference recipe, and its peer figure
    study.write_json(root / "runs" / "ref.json", fake_record(
        "learned_1d", "ref32_10ep", 0, {"both": {k: 0.63 for k in RES}}, test_acc=0.63, epoch_train_s=80.0))
    paths = study.build_summary(root)
    summary = json.loads((root / "summary.json").read_text())
    rows = {(r["encoding"], r["regime"], r["mode"]): r for r in summary["rows"]}
    assert set(rows) == {("rope", "mix", "extrapolate"), ("rope", "mix", "interpolate"),
                         ("learned_1d", "ref32_10ep", "both")}
    cell = rows["rope", "mix", "extrapolate"]["cells"]["64x64"]
    assert cell["mean"] == pytest.approx(0.6) and cell["std"] == pytest.approx(0.1) and cell["n"] == 3
    assert rows["rope", "mix", "interpolate"]["cells"]["8x8"]["mean"] == pytest.approx(0.5)
    assert rows["learned_1d", "ref32_10ep", "both"]["cells"]["32x32"] == dict(mean=0.63, std=0.0, n=1, values=[0.63],
                                                                             seeds=[0])
    assert rows["rope", "mix", "extrapolate"]["seeds"] == [0, 1, 2]
    # the peer comparison: 63.00 against the reference code's 59.55 at 80 s an epoch
    (peer,) = summary["peers"]
    assert peer["margin"] == pytest.approx(0.63 - 0.5955) and peer["mean_epoch_train_s"] == 80.0
    assert summary["train_s"] == pytest.approx(4 * 105 - 20) and summary["sweep_s"] == pytest.approx(120)
    md = (root / "summary.md").read_text()
    assert "| rope | 16:48 | extrapolate | 0,1,2 | 60.0 ± 10.0 |" in md
    # the published 200-epoch figures beside our 32x32 cells (extrapolate or both), one column per regime
    ref = {r["encoding"]: r for r in summary["reference_200ep"]}
    assert ref["rope"]["published"] == 0.8849 and ref["rope"]["ours"]["mix"]["mean"] == pytest.approx(0.6)
    assert ref["learned_1d"]["ours"]["ref32_10ep"]["mean"] == pytest.approx(0.63) and ref["sincos"]["ours"] == {}
    assert "| rope | 88.49 | 60.0 ± 10.0 |  |" in md and "| learned_1d | 86.52 |  | 63.0 |" in md
    assert "| learned_1d | 0 | 63.00 | 59.55 | +3.45 | 80 |" in md
    with open(root / "summary.csv") as f:
        table = list(csv.DictReader(f))
    assert float(table[0]["64x64 mean"]) == pytest.approx(rows[table[0]["encoding"], table[0]["regime"],
                                                                 table[0]["mode"]]["cells"]["64x64"]["mean"])
    for p in paths:
        if p.suffix == ".png":
            with Image.open(p) as im:
                lo, hi = im.convert("L").getextrema()
                assert im.size[0] > 300 and hi - lo > 100  # drawn, not blank


def test_summary_contrasts_and_leaders(tmp_path):
    """The differences the README's sentences quote, checkable by hand: interpolate minus extrapolate
    paired by seed, regime minus regime against the seed spread, and who leads at each size."""
    root = tmp_path / "cpu-short"
    runs = {}
    # rope at 16:48: extrapolate 0.5/0.6/0.7 and interpolate 0.1 lower in every seed -> -10.0 ± 0.0 (paired),
    # while the two cells' own seed std (10 points) would call the same gap a tie if the seeds were not paired;
    # seed 1 has no interpolated 96x96, so pairing by position there would give -5.0 ± 7.1
    for seed, a in enumerate((0.5, 0.6, 0.7)):
        interp = {k: a - 0.1 for k in RES if not (seed == 1 and k == "96x96")}
        runs[RunSpec("rope", "mix", seed)] = {"extrapolate": {k: a for k in RES}, "interpolate": interp}
    # rope at fixed 32x32, one seed: 16:48 minus it = +20.0 ± 10.0 (extrapolate), (+5.0 ± 10.0) (interpolate)
    runs[RunSpec("rope", "fixed32", 0)] = {"extrapolate": {k: 0.4 for k in RES}, "interpolate": {k: 0.45 for k in RES}}
    # fractional at 16:48 (one mode): 55.0, tied with rope's 60.0 ± 10.0; with rescale: 50.0 -> -5.0 (one seed)
    runs[RunSpec("fractional", "mix", 0)] = {"both": {k: 0.55 for k in RES}}
    runs[RunSpec("fractional", "mix_rescale2", 0)] = {"both": {k: 0.5 for k in RES}}
    # none: 30.0, behind rope beyond the spread, except at 8x8 where its one seed leads at 65.0
    runs[RunSpec("none", "mix", 0)] = {"both": {k: 0.65 if k == "8x8" else 0.3 for k in RES}}
    for spec, accs in runs.items():
        study.write_json(root / "runs" / f"{spec.name}.json", fake_record(spec.encoding, spec.regime, spec.seed, accs))
    study.build_summary(root)
    summary = json.loads((root / "summary.json").read_text())
    interp, regimes, rescale = summary["contrasts"]
    assert interp["paired"] and sorted((r["encoding"], r["regime"]) for r in interp["rows"]) == [
        ("rope", "fixed32"), ("rope", "mix")]
    (row,) = (r for r in interp["rows"] if r["regime"] == "mix")
    assert list(row["cells"]) == RES
    for k, n in (("64x64", 3), ("96x96", 2)):
        d = row["cells"][k]
        assert d["delta"] == pytest.approx(-0.1) and d["spread"] == pytest.approx(0.0, abs=1e-12) and d["n"] == n
        assert d["verdict"] == "beyond spread"
    assert regimes["regimes"] == ["mix", "fixed32"]
    got = {r["mode"]: r["cells"]["64x64"] for r in regimes["rows"]}
    assert got["extrapolate"]["delta"] == pytest.approx(0.2) and got["extrapolate"]["spread"] == pytest.approx(0.1)
    assert got["extrapolate"]["verdict"] == "beyond spread" and got["interpolate"]["verdict"] == "within spread"
    assert got["interpolate"]["delta"] == pytest.approx(0.05)
    assert rescale["regimes"] == ["mix_rescale2", "mix"]
    (row,) = rescale["rows"]
    assert (row["encoding"], row["mode"], row["cells"]["96x96"]["verdict"]) == ("fractional", "both", "one seed")
    assert row["cells"]["96x96"]["delta"] == pytest.approx(-0.05)
    md = (root / "summary.md").read_text()
    assert "| rope | 16:48 | -10.0 ± 0.0 | -10.0 ± 0.0 | -10.0 ± 0.0 | -10.0 ± 0.0 | -10.0 ± 0.0 |" in md
    assert "| rope | 32 | +5.0 | +5.0 | +5.0 | +5.0 | +5.0 |" in md  # one seed: no spread, no verdict
    assert "| rope | extrapolate | +20.0 ± 10.0 |" in md and "| rope | interpolate | (+5.0 ± 10.0) |" in md
    assert "| fractional | both | -5.0 | -5.0 |" in md
    lead = {(g["regime"], g["size"]): g for g in summary["leaders"]}
    assert ("fixed32", "96x96") not in lead  # one encoding: nobody to lead
    g = lead["mix", "96x96"]
    assert (g["encoding"], g["mode"], g["within_spread"]) == ("rope", "extrapolate", ["fractional"])
    assert [o["verdict"] for o in g["others"]] == ["within spread", "beyond spread"]
    assert "- 16:48, 96x96: rope (extrapolate) 60.0 ± 10.0; tied: fractional 55.0\n" in md
    # a one-seed leader: tied with rope through rope's spread, so the line has a verdict
    assert "- 16:48, 8x8: none (both) 65.0; tied: rope 60.0 ± 10.0\n" in md
    assert "- 16:48 rescale 2" not in md  # one encoding in that regime


def test_difference_needs_a_shared_seed():
    a = dict(mean=0.5, std=0.0, n=1, values=[0.5], seeds=[0])
    b = dict(mean=0.4, std=0.0, n=1, values=[0.4], seeds=[1])
    assert study.difference(a, b, paired=True) is None
    assert study.difference(a, b, paired=False) == dict(delta=pytest.approx(0.1), spread=0.0, n=1, verdict="one seed")


def test_summary_needs_records(tmp_path):
    with pytest.raises(study.UsageError, match="no records"):
        study.build_summary(tmp_path)


def tiny_protocol(data_root: Path) -> Protocol:
    tiny = ("--data-root", str(data_root), "--epochs", "1", "--steps-per-epoch", "2", "--dim", "32", "--depth", "1",
            "--heads", "2", "--batch-images", "16", "--train-res", "16:32", "--randaug-ops", "0")
    return Protocol("tiny", "a tiny protocol for tests", {"mix": Regime("16:32", tiny, "tiny")},
                    (RunSpec("rope", "mix", 0), RunSpec("learned_1d", "mix", 0)), sweep_res=(16, 32),
                    sweep_aspect=("16x32",))


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_tiny_protocol_end_to_end(tiny_shards, tmp_path, monkeypatch, capfd, jobs):
    """One run at a time (output to the terminal), or two side by side (one thread each, output to
    each run's study.log)."""
    p = tiny_protocol(tiny_shards.parent)
    monkeypatch.setitem(study.PROTOCOLS, "tiny", lambda: p)
    results, work = tmp_path / "results", tmp_path / "work"
    args = ["--protocol", "tiny", "--results", str(results), "--work", str(work), "--allow-dirty", "--jobs", jobs]
    if jobs == "2":  # the study, not this setting, must set each run's threads
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
    # an interrupted run: one step of rope, with a checkpoint and no results
    rope_dir = work / "tiny" / p.runs[0].name
    import subprocess
    import sys

    cmd = study.train_command(p, p.runs[0], rope_dir, sys.executable, ["--stop-after", "1"])
    assert subprocess.run(cmd, cwd=study.REPO, capture_output=True).returncode == 0
    assert not (rope_dir / "results.json").exists()
    capfd.readouterr()

    assert study.main(args) == 0
    out = capfd.readouterr().out
    assert "0 of 2 runs recorded, 2 to do" in out
    told = out if jobs == "1" else (rope_dir / "study.log").read_text()
    assert f"resumed from {rope_dir / 'checkpoints'}" in told  # went on from the interrupted step
    for spec in p.runs:
        rec = json.loads((results / "tiny" / "runs" / f"{spec.name}.json").read_text())
        run_dir = work / "tiny" / spec.name
        assert rec["result"] == json.loads((run_dir / "results.json").read_text())
        assert rec["train_config"]["pos_embed"] == spec.encoding and rec["train_config"]["seed"] == 0
        assert rec["sweep"]["resolutions"] == ["16x16", "32x32", "16x32"]
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=study.REPO, capture_output=True, text=True).stdout
        assert rec["commit"].split("+")[0] == head.strip()
        assert rec["sweep_s"] > 0 and rec["train_s"] > 0 and rec["train_cpu_s"] > 0 and len(rec["epochs"]) == 1
        assert rec["jobs"] == int(jobs)
        if jobs == "2":  # the cores shared out: the run says how many threads it had
            threads = max(1, study.cores() // 2)
            assert rec["threads"] == threads and f", {threads} thread(s)," in (run_dir / "study.log").read_text()
        # the sweep at eval_res is train.py's own final accuracy
        mode = next(iter(rec["sweep"]["modes"].values()))
        assert mode["32x32"]["acc"] == pytest.approx(rec["result"]["test_acc"])
    modes = json.loads((results / "tiny" / "runs" / f"{p.runs[0].name}.json").read_text())["sweep"]["modes"]
    assert set(modes) == {"extrapolate", "interpolate"}
    summary = json.loads((results / "tiny" / "summary.json").read_text())
    assert summary["runs"] == 2 and {r["encoding"] for r in summary["rows"]} == {"rope", "learned_1d"}

    # the interrupted run's time counts both attempts' epochs only once each
    assert [e["epoch"] for e in json.loads((results / "tiny" / "runs" / f"{p.runs[0].name}.json").read_text())[
        "epochs"]] == [1]
    # a second call finds everything recorded and trains nothing
    before = {f: f.stat().st_mtime_ns for f in (results / "tiny" / "runs").glob("*.json")}
    assert study.main(args) == 0
    assert "2 of 2 runs recorded, 0 to do" in capfd.readouterr().out
    assert before == {f: f.stat().st_mtime_ns for f in (results / "tiny" / "runs").glob("*.json")}
    # --list says so too
    assert study.main([*args, "--list"]) == 0
    assert "2 of 2 recorded" in capfd.readouterr().out
    # a run swept again (its record gone, as after a kill inside the sweep) keeps the sweep's
    # finished cells and evaluates none of them again: the file is neither replaced nor appended to
    spec = p.runs[1]
    cells = work / "tiny" / spec.name / "sweep" / "cells.jsonl"
    lines = cells.read_text().splitlines()
    assert len(lines) == 3  # learned_1d: one mode ('both') x 3 sizes
    cells.write_text("\n".join([*lines, "a line of the earlier sweep"]) + "\n")
    (results / "tiny" / "runs" / f"{spec.name}.json").unlink()
    assert study.main(args) == 0
    assert cells.read_text().splitlines() == [*lines, "a line of the earlier sweep"]
    assert json.loads((results / "tiny" / "runs" / f"{spec.name}.json").read_text())["sweep"]["resolutions"] == [
        "16x16", "32x32", "16x32"]
    # --hours: a run that would end after the limit (at the pace of the records) is not started
    (results / "tiny" / "runs" / f"{spec.name}.json").unlink()
    capfd.readouterr()
    assert study.main([*args, "--hours", "0.000001"]) == 0
    assert "1 runs left, none would end within --hours 1e-06" in capfd.readouterr().out
    assert not (results / "tiny" / "runs" / f"{spec.name}.json").exists()


def test_time_left_at_the_pace_of_the_recorded_runs():
    """A run left to do costs the mean (epochs + sweep) of its regime's records, or, for a regime
    with none, the records' mean seconds per epoch times its epochs plus their mean sweep."""
    p = Protocol("fake", "a", {"mix": Regime("16:48", ("--epochs", "6"), "a"),
                               "ref32_10ep": Regime("32", ("--epochs", "10"), "b")}, (), (32,), ())
    assert study.time_left(p, [RunSpec("rope", "mix", 1)], []) is None
    recs = [fake_record("rope", "mix", 0, {"both": {}}), fake_record("sincos", "mix", 0, {"both": {}})]
    recs[0]["epochs"] *= 6  # 6 epochs of 105 s + 30 s sweep: 660 s
    recs[0]["epoch_s"], recs[1]["epoch_s"] = 630.0, 210.0  # the other: 1 epoch of 210 s + 30 s: 240 s
    # mix: (660 + 240) / 2 = 450; ref32_10ep: (630 + 210) / 7 epochs = 120 s an epoch, x 10 + 30 = 1230
    left = [RunSpec("relative", "mix", 1), RunSpec("learned_1d", "ref32_10ep", 0)]
    assert study.time_left(p, left, recs) == pytest.approx(450 + 1230)
    assert study.time_left(p, [RunSpec("rope", "mix", 2)], recs) == pytest.approx(660)  # its own encoding's pace
    assert study.time_left(p, left, recs, jobs=2) == pytest.approx((450 + 1230) / 2)
    # --hours: the first run that would end in time starts; none fits -> None; no records: any fits
    queue = [RunSpec("rope", "mix", 2), RunSpec("relative", "mix", 1), RunSpec("x", "ref32_10ep", 0)]
    assert study.first_that_fits(p, queue, recs, 500) == 1
    assert study.first_that_fits(p, queue, recs, 700) == 0
    assert study.first_that_fits(p, queue[2:], recs, 1229) is None
    assert study.first_that_fits(p, queue, recs, 100) is None
    assert study.first_that_fits(p, queue, [], 1) == 0
    # a record made beside another run (2 x 1 thread) counts 0.8x for a run made alone (2 threads),
    # one made alone 1.25x for a run made beside another; records that do not say count as made so
    recs[0]["jobs"] = recs[1]["jobs"] = 2
    assert study.run_seconds(p, RunSpec("rope", "mix", 2), recs, jobs=2) == pytest.approx(660)
    assert study.run_seconds(p, RunSpec("rope", "mix", 2), recs, jobs=1) == pytest.approx(0.8 * 660)
    assert study.time_left(p, left, recs, jobs=1) == pytest.approx(0.8 * (450 + 1230))
    assert study.first_that_fits(p, queue, recs, 600, jobs=2) == 1  # rope 660 s, relative 450 s
    assert study.first_that_fits(p, queue, recs, 600, jobs=1) == 0  # rope alone 528 s
    recs[0]["jobs"] = 1
    assert study.run_seconds(p, RunSpec("rope", "mix", 2), recs, jobs=2) == pytest.approx(1.25 * 660)


@pytest.mark.parametrize("argv, message", [
    (["--protocol", "nope"], "unknown protocol 'nope'; choose one of cpu-short, reference"),
    (["--only", "nothing*"], "matches no run of cpu-short"),
    (["--max-runs", "-1"], "--max-runs must be 0"),
    (["--hours", "-2"], "--hours must be 0"),
])
def test_bad_input_one_line(argv, message, capfd, tmp_path):
    assert study.main([*argv, "--results", str(tmp_path)]) == 2
    err = capfd.readouterr().err
    assert message in err and err.count("\n") == 1


def test_gpu_protocol_refused_without_gpu(capfd, tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert study.main(["--protocol", "reference", "--results", str(tmp_path), "--work", str(tmp_path)]) == 2
    assert "needs a GPU" in capfd.readouterr().err
    assert not (tmp_path / "reference").exists()


def test_epoch_rows_and_completeness(tmp_path):
    """A run killed between an epoch's log line and its checkpoint logs that epoch twice: the last
    row counts. A run without a final result, or with epochs missing, is not recorded."""
    spec = RunSpec("rope", "mix", 0)
    rows = [dict(step=1, loss=2.0), dict(epoch=1, test_acc=0.1, epoch_s=5.0), dict(epoch=1, test_acc=0.2, epoch_s=6.0),
            dict(epoch=2, test_acc=0.3, epoch_s=7.0)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [r["test_acc"] for r in study.epoch_rows(tmp_path)] == [0.2, 0.3]
    with pytest.raises(study.StudyError, match="not a finished run"):  # no results.json
        study.check_complete(spec, tmp_path, 2)
    (tmp_path / "results.json").write_text("{}")
    with pytest.raises(study.StudyError, match="not a finished run"):  # an empty result
        study.check_complete(spec, tmp_path, 2)
    (tmp_path / "results.json").write_text(json.dumps(dict(test_acc=0.3)))
    study.check_complete(spec, tmp_path, 2)
    with pytest.raises(study.StudyError, match=r"epochs logged: \[1, 2\]"):
        study.check_complete(spec, tmp_path, 3)


def test_killed_before_results_json(tiny_shards, tmp_path):
    """train.py killed after its last checkpoint but before results.json: --resume latest writes
    the result from the last epoch's row instead of an empty one."""
    import subprocess
    import sys

    p = tiny_protocol(tiny_shards.parent)
    run = tmp_path / "run"
    cmd = study.train_command(p, p.runs[1], run, sys.executable)
    assert subprocess.run(cmd, cwd=study.REPO, capture_output=True).returncode == 0
    first = json.loads((run / "results.json").read_text())
    (run / "results.json").unlink()
    assert subprocess.run(cmd, cwd=study.REPO, capture_output=True).returncode == 0
    assert json.loads((run / "results.json").read_text()) == first and "test_acc" in first


@pytest.fixture
def git(tmp_path):
    """A new git repository in tmp_path, with a committer; returns git(*args) -> stdout, run there."""
    import subprocess

    def run(*a):
        return subprocess.run(["git", *a], cwd=tmp_path, capture_output=True, text=True, check=True).stdout

    run("init", "-q")
    run("config", "user.email", "t@example.com")
    run("config", "user.name", "t")
    return run


def test_git_commit_dir_commits_only_the_folder(tmp_path, git):
    (tmp_path / "other.txt").write_text("staged elsewhere")
    git("add", "other.txt")
    root = tmp_path / "results" / "p"
    study.write_json(root / "runs" / "a.json", {"x": 1})
    assert study.git_commit_dir(root, "record a")
    assert git("log", "--format=%s") == "record a\n"
    assert git("show", "--name-only", "--format=").split() == ["results/p/runs/a.json"]
    assert "A  other.txt" in git("status", "--porcelain")  # still staged, not committed
    assert study.git_commit_dir(root, "nothing new")  # nothing to commit: no new commit
    assert git("log", "--format=%s") == "record a\n"
    outside = tmp_path.parent / f"{tmp_path.name}_outside"
    outside.mkdir()
    assert not study.git_commit_dir(outside, "x")  # not in a git work tree: nothing to commit to


def test_commit_id_is_dirty_only_for_code(tmp_path, git):
    """A record names HEAD, +dirty only when code changed: the study's own records and summary
    (results/) and the docs (Markdown) change while runs train and do not make it dirty."""
    for f in ("train.py", "README.md", "results/p/summary.md", "results/p/runs/a.json"):
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_text("v1")
    git("add", "-A")
    git("commit", "-q", "-m", "c")
    head = git("rev-parse", "HEAD").strip()
    for f in ("README.md", "results/p/summary.md", "results/p/runs/a.json"):
        (tmp_path / f).write_text("v2")
    (tmp_path / "new.py").write_text("untracked")
    assert study.code_changes(tmp_path) == []
    assert study.git_commit_id(tmp_path) == head
    (tmp_path / "train.py").write_text("v2")
    assert study.code_changes(tmp_path) == ["train.py"]
    assert study.git_commit_id(tmp_path) == head + "+dirty"


def test_records_that_git_ignores_are_refused(tmp_path, capfd):
    import subprocess

    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / ".gitignore").write_text("runs/\n")  # unanchored: matches results/p/runs/ as well
    root = tmp_path / "results" / "p"
    study.write_json(root / "runs" / "a.json", {"x": 1})
    assert study.git_ignores(root / "runs" / "b.json")
    assert not study.git_commit_dir(root, "record a")
    assert "results/p/runs/a.json ignored by git" in capfd.readouterr().err
    argv = ["--results", str(tmp_path / "results"), "--work", str(tmp_path / "w"), "--allow-dirty"]
    assert study.main(argv) == 2  # refused before anything trains
    err = capfd.readouterr().err
    assert "git ignores" in err and "no record would be committed" in err and err.count("\n") == 1
    assert not (tmp_path / "w").exists()
    (tmp_path / ".gitignore").write_text("/runs/\n")
    assert not study.git_ignores(root / "runs" / "b.json")
    # this repository: the records of every protocol are committed, the training runs/ are not
    assert not study.git_ignores(study.REPO / "results" / "cpu-short" / "runs" / "x.json")
    assert not (study.REPO / "runs").is_dir() or study.git_ignores(study.REPO / "runs" / "x.json")


def test_cpu_short_protocol_covers_the_issue():
    p = study.get_protocol("cpu-short")
    names = [s.name for s in p.runs]
    assert len(names) == len(set(names))
    from navit_pe.posenc import POS_EMBEDS

    for e in POS_EMBEDS:
        assert {s.seed for s in p.runs if s.encoding == e and s.regime == "mix"} == {0, 1, 2}
        assert {s.seed for s in p.runs if s.encoding == e and s.regime == "fixed32"} == {0}
    assert {(s.encoding, s.seed) for s in p.runs if s.regime == "mix_rescale2"} == {
        (e, s) for e in ("rope", "rope_mixed", "sincos") for s in (0, 1, 2)}
    assert {s.encoding for s in p.runs if s.regime == "ref32_10ep"} == set(study.PEER_6EP)
    def flag(reg, name):
        a = list(reg.args)
        return a[a.index(name) + 1] if name in a else None

    for name, reg in p.regimes.items():
        assert flag(reg, "--randaug-ops") == "0"  # crop + flip only
        assert study.regime_epochs(reg) == (10 if name == "ref32_10ep" else 6)
    assert flag(p.regimes["mix_rescale2"], "--coord-rescale") == "2"
    assert flag(p.regimes["fixed32"], "--train-res") == "32" and flag(p.regimes["mix"], "--train-res") == "16:48"
    ref = study.get_protocol("reference")
    assert ref.needs_gpu and {s.encoding for s in ref.runs} == set(POS_EMBEDS)
    (reg,) = ref.regimes.values()
    assert study.regime_epochs(reg) == 200 and flag(reg, "--randaug-ops") is None  # train.py's RandAugment default
    assert flag(reg, "--batch-images") == "128"


def test_a_signal_goes_to_the_child_and_the_study_waits_for_it(tmp_path):
    """SIGTERM to the study while train.py runs: passed on to the child once, the study waits until
    the child has finished (train.py's checkpoint) instead of killing it, counts the time, then
    stops; its own SIGTERM handler is back afterwards."""
    import os
    import signal
    import sys
    import threading
    import time

    ready, log = tmp_path / "ready", tmp_path / "log"
    child = ("import pathlib, signal, sys, time\n"
             "got = []\n"
             "signal.signal(signal.SIGTERM, lambda s, f: got.append(s))\n"
             f"pathlib.Path({str(ready)!r}).write_text('1')\n"
             "t = time.monotonic()\n"
             "while not got and time.monotonic() - t < 20: time.sleep(0.01)\n"
             "time.sleep(0.3)\n"  # the checkpoint, which the study must wait for
             f"pathlib.Path({str(log)!r}).write_text(str(len(got)))\n"
             "sys.exit(143)\n")

    def send():
        while not ready.exists():
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)

    def ours(signum, frame):  # stands for the study's own handler (and keeps pytest alive)
        raise AssertionError("the study's handler ran instead of passing the signal on")

    previous = signal.signal(signal.SIGTERM, ours)
    try:
        threading.Thread(target=send, daemon=True).start()
        times = tmp_path / "times.json"
        with pytest.raises(KeyboardInterrupt):
            study._call([sys.executable, "-c", child], "child", times, "train")
        assert log.read_text() == "1"  # the child got the signal once and finished its work
        assert signal.getsignal(signal.SIGTERM) is ours
        assert json.loads(times.read_text())["train_wall_s"] >= 0.3
    finally:
        signal.signal(signal.SIGTERM, previous)



def test_a_signal_stops_the_study_and_every_run_checkpoints(tiny_shards, tmp_path, monkeypatch, capfd):
    """SIGTERM to the study with two runs side by side: both train.py checkpoint the step they are
    in and stop, nothing is recorded, and the study exits 130 saying how to go on."""
    import os
    import signal
    import threading
    import time

    slow = ("--data-root", str(tiny_shards.parent), "--epochs", "1", "--steps-per-epoch", "1000", "--dim", "32",
            "--depth", "1", "--heads", "2", "--batch-images", "16", "--train-res", "16:32", "--randaug-ops", "0",
            "--checkpoint-every", "1000", "--compile", "no", "--log-every", "1")
    p = Protocol("tiny", "a slow tiny protocol", {"mix": Regime("16:32", slow, "tiny")},
                 (RunSpec("rope", "mix", 0), RunSpec("learned_1d", "mix", 0), RunSpec("sincos", "mix", 0)),
                 sweep_res=(16,), sweep_aspect=())
    monkeypatch.setitem(study.PROTOCOLS, "tiny", lambda: p)
    results, work = tmp_path / "results", tmp_path / "work"
    runs = [work / "tiny" / s.name for s in p.runs[:2]]

    def send():  # once both runs have taken a few steps
        t = time.monotonic()
        while time.monotonic() - t < 120 and not all(
                (r / "metrics.jsonl").is_file() and len((r / "metrics.jsonl").read_text().splitlines()) >= 3
                for r in runs):
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=send, daemon=True).start()
    rc = study.main(["--protocol", "tiny", "--results", str(results), "--work", str(work), "--allow-dirty",
                     "--jobs", "2"])
    err = capfd.readouterr().err
    assert rc == 130 and "study: interrupted; run the same command again to continue" in err
    assert not list(results.glob("tiny/runs/*.json"))  # nothing recorded
    for r in runs:
        steps = [int(c.name.split("_")[1]) for c in (r / "checkpoints").glob("step_*")]
        last = max(int(json.loads(x)["step"]) for x in (r / "metrics.jsonl").read_text().splitlines())
        assert steps == [last] and 3 <= last < 1000  # the step it stopped at, checkpointed
        assert "stopped by SIGTERM" in (r / "study.log").read_text()
    assert not (work / "tiny" / p.runs[2].name).exists()  # the third run never started
