"""train.py end to end on tiny shards: smoke run, resume settings, 2 processes and a signal to one of
them (resume == uninterrupted, after a stop, a signal or SIGKILL: tests/test_resume.py)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from navit_pe import NaViT
from navit_pe.evaluate import evaluate

REPO = Path(__file__).resolve().parents[1]
TINY = ["--dim", "32", "--depth", "1", "--heads", "2", "--batch-images", "16", "--train-res", "16:32",
        "--num-workers", "1", "--log-every", "1"]


def run_train(data: Path, out: Path, *args: str, timeout: float = 240, launcher: list[str] | None = None):
    env = {**os.environ, "NAVIT_PE_CIFAR_SOURCE": str(out.parent / "no-such-source")}
    cmd = (launcher or [sys.executable]) + ["train.py", "--data-root", str(data.parent), "--out", str(out),
                                            *TINY, *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_smoke_one_epoch(tiny_shards, tmp_path):
    run = tmp_path / "run"
    ok(run_train(tiny_shards, run, "--epochs", "1", "--steps-per-epoch", "3", "--pos-embed", "rope_mixed",
                 "--checkpoint-every", "2"))
    rows = metrics(run)
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(r["tokens_per_s"] > 0 and 0.5 < r["efficiency"] <= 1 for r in steps)
    evals = [r for r in rows if "test_acc" in r]
    assert len(evals) == 1 and evals[0]["test_images"] == 30  # every tiny test image, once
    # step 2 (--checkpoint-every 2) and step 3 (the epoch end), nothing else
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000002", "step_00000003"]
    model = NaViT.from_pretrained(run)
    assert model.config.pos_embed == "rope_mixed" and model.config.dim == 32
    results = json.loads((run / "results.json").read_text())
    assert results["test_images"] == 30 and results == {**results, **evals[0]}
    # the accuracy reported is the saved model's own on the test set at 32x32
    correct, total = evaluate(model, tiny_shards, (32, 32))
    assert total == 30 and results["test_correct"] == correct and results["test_acc"] == correct / 30


# resume == uninterrupted (inside an epoch, at an epoch boundary, after SIGKILL): tests/test_resume.py


def test_resume_checks_settings_and_keeps_finished_results(tiny_shards, tmp_path):
    run = tmp_path / "done"
    args = ["--epochs", "1", "--steps-per-epoch", "2", "--pos-embed", "sincos"]
    ok(run_train(tiny_shards, run, *args))
    before = json.loads((run / "results.json").read_text())
    assert before["test_images"] == 30
    ok(run_train(tiny_shards, run, *args, "--resume", "latest"))  # already finished: nothing lost
    assert json.loads((run / "results.json").read_text()) == before
    proc = run_train(tiny_shards, run, *args, "--lr", "1e-3", "--resume", "latest")
    assert proc.returncode == 2 and "lr" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_two_processes(tiny_shards, tmp_path):
    """Two processes, an epoch = every training image once (no --steps-per-epoch): 60 images in
    round(60 / 16) = 4 steps; over both ranks every epoch trains on each of the 60 images once
    (the trainer gathers the dataset indices of every rank's batches) and evaluates each test
    image once."""
    run = tmp_path / "ddp"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu"]
    proc = ok(run_train(tiny_shards, run, "--epochs", "2", "--pos-embed", "rope",
                        "--num-workers", "0", launcher=launcher, timeout=300))
    out = proc.stdout + proc.stderr
    assert "2 process(es)" in out and "60 training images in 4 steps/epoch" in out
    assert "rank 0: 8 steps" in out and "rank 1: 8 steps" in out  # no rank stopped early
    evals = [r for r in metrics(run) if "test_acc" in r]
    assert [r["test_images"] for r in evals] == [30, 30]  # the test set once, over both ranks
    # by identity: 60 images trained on an epoch, 60 different ones (not one rank's half twice)
    assert [(r["epoch_images"], r["epoch_unique_images"]) for r in evals] == [(60, 60), (60, 60)]
    assert [r["step"] for r in metrics(run) if "loss" in r][-1] == 8  # both ranks: 4 steps an epoch
    assert (run / "model.safetensors").is_file()


def _parent(pid: int) -> int:
    """The parent of process `pid` (from /proc), -1 if it is gone."""
    try:
        return int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except OSError:
        return -1


def _children(pid: int) -> list[int]:
    """Every process whose parent is `pid`."""
    return [int(p.name) for p in Path("/proc").glob("[0-9]*") if _parent(int(p.name)) == pid]


def _descendants(pid: int) -> list[int]:
    found = _children(pid)
    return found + [d for c in found for d in _descendants(c)]


def _cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_two_processes_stop_together_on_a_signal_to_one(tiny_shards, tmp_path):
    """SIGTERM to one of two training processes: both stop after the same step (the request is
    shared, or the other would wait in its next all-reduce for ever), that step is checkpointed,
    and the launch exits non-zero."""
    import signal
    import time

    run = tmp_path / "ddp"
    env = {**os.environ, "NAVIT_PE_CIFAR_SOURCE": str(tmp_path / "no-such-source")}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu", "train.py",
           "--data-root", str(tiny_shards.parent), "--out", str(run), *TINY, "--epochs", "500",
           "--pos-embed", "rope", "--num-workers", "0", "--checkpoint-every", "1000",
           "--compile", "no"]  # no recompiles of new shapes: a step takes well under a second
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not ((run / "metrics.jsonl").is_file() and len(metrics(run)) >= 3):
            time.sleep(0.2)
        workers = [p for p in _descendants(proc.pid) if "torch.distributed.run" in _cmdline(_parent(p))]
        assert len(workers) == 2, [_cmdline(p) for p in _descendants(proc.pid)]
        os.kill(workers[1], signal.SIGTERM)
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:  # a hang: the workers run in sessions of their own, kill them too
            for pid in [*_descendants(proc.pid), proc.pid]:
                os.kill(pid, signal.SIGKILL)
    assert proc.returncode != 0
    steps = dict(re.findall(r"rank (\d): (\d+) steps", out))  # the lines of two processes may run together
    assert sorted(steps) == ["0", "1"] and steps["0"] == steps["1"], out[-3000:]
    n = int(steps["0"])
    assert f"stopped by SIGTERM after step {n}, which is checkpointed" in out
    assert (run / "checkpoints" / f"step_{n:08d}").is_dir() and not (run / "model.safetensors").exists()


def test_stop_request_is_the_one_all_processes_agreed_on(monkeypatch):
    """A signal that lands while the stop flags are being all-reduced must not stop its process alone:
    the other process sent 0 and trains on, and the two would wait in different collectives for ever.
    The request counts from the next all-reduce, on both; another process's signal counts here too."""
    import signal
    import types

    import torch

    from navit_pe.trainer import StopOnSignal

    two = types.SimpleNamespace(num_processes=2, device="cpu")
    stop = StopOnSignal()  # no handlers installed: the test delivers the "signal" by calling handle()

    def all_reduce_while_signalled(flag, op):  # the other process's flag is 0: the MAX is this one's
        stop.handle(signal.SIGTERM, None)

    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce_while_signalled)
    assert stop.requested(two) == 0 and stop.signum == 0  # this step's flags were both 0
    assert stop.requested(two) == signal.SIGTERM == stop.signum  # the next step's carries it

    other = StopOnSignal()  # the process that was not signalled
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda flag, op: flag.fill_(int(signal.SIGTERM)))
    assert other.requested(two) == signal.SIGTERM == other.signum == other.received


@pytest.mark.parametrize("args, match", [
    (["--pos-embed", "sinus"], "unknown --pos-embed 'sinus'; choose one of: none, "),
    (["--train-res", "30"], "multiple"),
    (["--train-res", "16:64"], "max-seq-len"),
    (["--mixed-precision", "fp8"], "mixed-precision"),
    (["--heads", "0"], "--heads must be at least 1"),
    (["--coord-jitter", "0.5"], "coord_jitter >= 1"),
    (["--dim", "34", "--heads", "2"], "divisible by 4"),
    (["--keep-checkpoints", "0"], "--keep-checkpoints must be at least 1"),
])
def test_bad_flags_one_line_exit_2(tiny_shards, tmp_path, args, match):
    proc = run_train(tiny_shards, tmp_path / "bad", *args)
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and match in err, err


def test_missing_or_empty_shards_and_unwritable_out(tiny_shards, tmp_path):
    empty = tmp_path / "empty" / "cifar10"
    empty.mkdir(parents=True)
    proc = run_train(empty, tmp_path / "r1", "--epochs", "1")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "prepare_cifar.py" in proc.stderr
    # a meta.json whose shard is empty
    broken = tmp_path / "broken" / "cifar10"
    broken.mkdir(parents=True)
    for f in tiny_shards.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    first = json.loads((broken / "meta.json").read_text())["splits"]["train"]["shards"][0]["file"]
    (broken / first).write_bytes(b"")
    proc = run_train(broken, tmp_path / "r2", "--epochs", "1")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    # an output directory that cannot be created
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = run_train(tiny_shards, blocker / "run", "--epochs", "1")
    assert proc.returncode == 2 and "--out" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def load_script(name: str):
    """train.py / eval_resolutions.py as modules (they live at the repository root)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), REPO / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_flag_has_a_help_line():
    from dataclasses import fields

    from navit_pe.trainer import TrainConfig

    help_of = load_script("train.py").HELP
    names = [f.name for f in fields(TrainConfig)]
    assert sorted(help_of) == sorted(names), "every TrainConfig field needs a one-line HELP entry in train.py"
    assert all(help_of[n].strip() and "\n" not in help_of[n] for n in names)
    parser = load_script("eval_resolutions.py").build_parser()
    for action in parser._actions:
        assert action.help and action.help.strip() and "\n" not in action.help, action.dest


@pytest.mark.parametrize("field, value, names, not_in", [
    ("aspect", "2:0.5", ["--aspect", "e.g. --aspect 0.5:2"], "multiple"),
    ("aspect", "wide", ["--aspect", "e.g. --aspect 0.5:2"], "multiple"),
    ("train_res", "30", ["--train-res", "multiples of the patch size 4"], "--aspect"),
    ("resize", "budget", ["--resize", "e.g. budget:64"], "--train-res"),
])
def test_errors_name_the_wrong_flag(field, value, names, not_in):
    from navit_pe.cli import UsageError
    from navit_pe.trainer import TrainConfig, check_config

    with pytest.raises(UsageError) as e:
        check_config(TrainConfig(**{field: value}))
    assert all(n in str(e.value) for n in names) and not_in not in str(e.value), str(e.value)


def test_run_eta_arithmetic():
    from navit_pe.trainer import RunETA, format_duration

    eta = RunETA(total_steps=100, start_step=20, start_time=1000.0)  # resumed at step 20 of 100
    assert eta.remaining(20, now=1000.0) is None  # no step done yet
    assert eta.remaining(25, now=1010.0) == pytest.approx(2.0 * 75)  # 2 s a step, 75 steps left
    assert eta.remaining(100, now=1200.0) == 0
    assert [s for s in range(101) if eta.announce_at(s)] == [20 + RunETA.AFTER_STEPS]
    assert [s for s in range(4) if RunETA(3).announce_at(s)] == [3]  # a run shorter than AFTER_STEPS
    line = eta.summary(25, now=1010.0)
    assert "2m40s" in line and "80 steps at 2.00 s/step" in line and "2m30s left" in line, line
    assert [format_duration(x) for x in (None, 0, 42.4, 200, 7500, 190000)] == \
        ["?", "0s", "42s", "3m20s", "2h05m", "2d04h"]


def test_tensorboard_scalars_at_the_right_steps(tiny_shards, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "tb"
    proc = ok(run_train(tiny_shards, run, "--epochs", "2", "--steps-per-epoch", "2", "--num-workers", "0"))
    assert "estimated time for the whole run" in proc.stdout + proc.stderr
    events = sorted((run / "navit-pe").glob("events.out.tfevents.*"))  # (the hparams go one level down)
    assert len(events) == 1, sorted(run.rglob("events.out.tfevents.*"))
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    scalars = {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}
    rows = metrics(run)
    for tag in ("loss", "lr", "images_per_s", "tokens_per_s", "efficiency"):
        want = {r["step"]: r[tag] for r in rows if "loss" in r}
        assert list(want) == [1, 2, 3, 4]
        assert scalars[f"train/{tag}"] == pytest.approx(want, rel=1e-6), tag
    assert scalars["test/acc"] == pytest.approx({r["step"]: r["test_acc"] for r in rows if "test_acc" in r})
    assert sorted(scalars["test/acc"]) == [2, 4]  # after each epoch
