"""Resume is exact wherever the run stopped: a stop inside an epoch, a stop exactly at an epoch
boundary, a SIGTERM or SIGINT (checkpointed on the spot) and a SIGKILL after a periodic
checkpoint all end with the weights of the uninterrupted
run of the same settings (dropout, token dropping and a learned encoding, so the data order, the
schedule, the optimizer state and every RNG state must all come back)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from inproc import REPO, metrics, run_train_py, tiny_args
from navit_pe.model import NaViT

# 2 epochs of 3 steps; a checkpoint every 2nd step and at each epoch end: 2, 3, 4, 6. Every
# random draw is on: dropout, token dropping, sizes, augmentation, coordinate augmentation.
RUN = ["--epochs", "2", "--steps-per-epoch", "3", "--pos-embed", "learned_2d", "--dropout", "0.1",
       "--token-drop", "0.25", "--train-res", "16:32", "--checkpoint-every", "2", "--warmup-epochs", "1",
       "--coord-shift", "1", "--coord-jitter", "1.3", "--coord-rescale", "1.5"]


def weights(run) -> dict[str, torch.Tensor]:
    return load_file(run / "model.safetensors")


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def straight(tiny_shards, tmp_path_factory):
    """The uninterrupted run: (its final weights, its weights before the first optimizer step,
    its epoch-end rows of metrics.jsonl)."""
    run = tmp_path_factory.mktemp("straight") / "run"
    initial: dict[str, torch.Tensor] = {}
    forward = NaViT.forward

    def watch(self, x):  # the run's own initial weights, taken at its first training forward
        if self.training and not initial:
            initial.update({k: v.detach().clone() for k, v in self.state_dict().items()})
        return forward(self, x)

    NaViT.forward = watch
    try:
        assert run_train_py(tiny_args(tiny_shards, run, *RUN)) == 0
    finally:
        NaViT.forward = forward
    final = weights(run)
    assert initial.keys() == final.keys()
    # the run really trained: its weights moved away from its own initial weights
    assert max_diff(final, initial) > 1e-3
    return final, initial, epoch_rows(run)


EPOCH_KEYS = ("epoch", "step", "test_correct", "test_images", "epoch_images", "epoch_unique_images")


def epoch_rows(run) -> list[dict]:
    """What each epoch end reported (every epoch once, even across a stop and a resume)."""
    return [{k: r[k] for k in EPOCH_KEYS} for r in metrics(run) if "test_acc" in r]


@pytest.mark.parametrize("stop, where", [(4, "inside epoch 2"), (3, "at the end of epoch 1")])
def test_resume_equals_uninterrupted(tiny_shards, tmp_path, straight, stop, where):
    run = tmp_path / "resumed"
    assert run_train_py(tiny_args(tiny_shards, run, *RUN, "--stop-after", stop)) == 0
    assert not (run / "model.safetensors").exists() and not (run / "results.json").exists()
    assert (run / "checkpoints" / f"step_{stop:08d}").is_dir()
    assert run_train_py(tiny_args(tiny_shards, run, *RUN, "--resume", "latest")) == 0
    final, initial, rows = straight
    assert max_diff(weights(run), final) <= 1e-6, where
    # each epoch evaluated once, with the same model and the same count of training images
    assert epoch_rows(run) == rows, where
    assert [r["epoch_images"] for r in rows] == [48, 48]  # 3 steps of 16 images an epoch


def train_py_signalling_itself(data, run, tmp_path, signum: int, times: int = 1) -> subprocess.CompletedProcess:
    """train.py (the RUN settings) in a process that sends itself `signum`, `times` times at once,
    before its 5th optimizer step."""
    script = (
        "import os, runpy, signal, sys, torch\n"
        "torch.set_num_threads(1)\n"  # as in this process (tests/inproc.py): the same arithmetic
        "from torch.optim.optimizer import register_optimizer_step_pre_hook\n"
        "n = [0]\n"
        "def hook(opt, args, kwargs):\n"
        "    n[0] += 1\n"
        "    if n[0] == 5:\n"
        f"        for _ in range({times}):\n"
        f"            os.kill(os.getpid(), {int(signum)})\n"
        "register_optimizer_step_pre_hook(hook)\n"
        "sys.argv = ['train.py'] + sys.argv[1:]\n"
        "runpy.run_path('train.py', run_name='__main__')\n")
    env = {**os.environ, "NAVIT_PE_CIFAR_SOURCE": str(tmp_path / "no-such-source")}
    return subprocess.run([sys.executable, "-c", script, *tiny_args(data, run, *RUN)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=240)


def test_sigkill_after_periodic_checkpoint_then_resume(tiny_shards, tmp_path, straight):
    """A real SIGKILL (no cleanup) during step 5, after the checkpoint of step 4 (a periodic one,
    inside epoch 2); --resume latest then ends with the uninterrupted run's weights."""
    run = tmp_path / "killed"
    proc = train_py_signalling_itself(tiny_shards, run, tmp_path, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert not (run / "model.safetensors").exists()
    ckdir = run / "checkpoints"
    assert sorted(p.name for p in ckdir.glob("step_*")) == ["step_00000002", "step_00000003", "step_00000004"]
    for ck in ckdir.glob("step_*"):  # every checkpoint that looks complete is complete
        assert (ck / "model.safetensors").is_file() and (ck / "custom_checkpoint_0.pkl").is_file()
    assert run_train_py(tiny_args(tiny_shards, run, *RUN, "--resume", "latest")) == 0
    final, initial, rows = straight
    assert max_diff(weights(run), final) <= 1e-6
    assert epoch_rows(run) == rows


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_checkpoints_the_step_then_resume(tiny_shards, tmp_path, straight, signum):
    """SIGTERM / SIGINT during step 5 (no periodic checkpoint there): train.py finishes the step,
    checkpoints it, says so in one line and exits 128 + the signal; --resume latest then ends with
    the uninterrupted run's weights. The signal comes twice at once (to a process group and from
    a parent): one request, not an abort."""
    run = tmp_path / "signalled"
    proc = train_py_signalling_itself(tiny_shards, run, tmp_path, signum, times=2)
    assert proc.returncode == 128 + signum, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last == (f"train.py: stopped by {signal.Signals(signum).name} after step 5, which is checkpointed; "
                    f"continue with --resume latest")
    assert not (run / "model.safetensors").exists()
    assert (run / "checkpoints" / "step_00000005").is_dir()
    assert max(int(r["step"]) for r in metrics(run)) == 5  # it stopped there, no step after
    assert run_train_py(tiny_args(tiny_shards, run, *RUN, "--resume", "latest")) == 0
    final, initial, rows = straight
    assert max_diff(weights(run), final) <= 1e-6
    assert epoch_rows(run) == rows
