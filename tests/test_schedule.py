"""The learning-rate schedule: linear warmup from lr/warmup at step 0 to the peak lr at the last
warmup step, cosine from the peak to exactly min_lr at the last step, warmup capped at 5 % of
the run (warmup = min(warmup_epochs * steps_per_epoch, total_steps // 20)); and a real run uses
it: the optimizer's lr at every step, and the lr in metrics.jsonl, follow it."""
from __future__ import annotations

import math

import pytest
from torch.optim.optimizer import register_optimizer_step_pre_hook

from inproc import colour_shards, metrics, run_train_py, tiny_args
from navit_pe.trainer import lr_at

LR, MIN = 1e-3, 1e-5


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-15)


def test_warmup_starts_at_lr_over_warmup_and_reaches_the_peak():
    total, warmup = 101, 10
    assert close(lr_at(0, total, warmup, LR, MIN), LR / 10)
    assert close(lr_at(4, total, warmup, LR, MIN), LR * 5 / 10)
    assert close(lr_at(9, total, warmup, LR, MIN), LR)  # the last warmup step is the peak
    assert close(lr_at(10, total, warmup, LR, MIN), LR)  # the cosine starts at the peak
    ramp = [lr_at(s, total, warmup, LR, MIN) for s in range(10)]
    for a, b in zip(ramp, ramp[1:]):  # linear: equal increments of lr / warmup
        assert close(b - a, LR / 10)


def test_cosine_to_exactly_min_lr_at_the_last_step():
    total, warmup = 101, 10  # the cosine spans steps 10..100: 90 intervals
    assert close(lr_at(100, total, warmup, LR, MIN), MIN)
    assert close(lr_at(55, total, warmup, LR, MIN), (LR + MIN) / 2)  # half way: cos(pi/2) = 0
    assert close(lr_at(40, total, warmup, LR, MIN), MIN + 0.75 * (LR - MIN))  # a third: cos(pi/3) = 1/2
    assert close(lr_at(85, total, warmup, LR, MIN), MIN + 0.5 * (LR - MIN) * (1 + math.cos(math.pi * 75 / 90)))
    after = [lr_at(s, total, warmup, LR, MIN) for s in range(10, 101)]
    assert all(b < a for a, b in zip(after, after[1:]))  # strictly decreasing
    assert min(after) >= MIN


def test_no_warmup_starts_at_the_peak():
    assert close(lr_at(0, 50, 0, LR, MIN), LR)
    assert close(lr_at(49, 50, 0, LR, MIN), MIN)
    assert lr_at(49, 50, 0, LR, 0.0) == pytest.approx(0.0, abs=1e-18)


def expected_lr(step: int, total: int, warmup: int, lr: float, min_lr: float) -> float:
    """The documented schedule, written out independently of the trainer."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / (total - warmup - 1)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * t))


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    return colour_shards(tmp_path_factory.mktemp("colour_data"), n_train=8, n_test=2)


@pytest.fixture
def optimizer_lrs():
    """The lr of every param group at every optimizer step taken while the test runs."""
    seen: list[list[float]] = []
    handle = register_optimizer_step_pre_hook(
        lambda opt, args, kwargs: seen.append([g["lr"] for g in opt.param_groups]))
    yield seen
    handle.remove()


# (epochs, steps per epoch, warmup epochs) -> warmup steps the trainer must use
@pytest.mark.parametrize("epochs, spe, warmup_epochs, warmup", [
    (1, 40, 5, 2),  # 5 epochs of warmup, capped at 5 % of 40 steps = 2
    (21, 2, 1, 2),  # 1 epoch = 2 steps, not above the cap of 42 // 20 = 2
    (1, 20, 0, 0),  # no warmup: the first step is at the peak
])
def test_run_follows_the_schedule(colours, tmp_path, optimizer_lrs, epochs, spe, warmup_epochs, warmup):
    lr, min_lr = 1e-2, 1e-4
    out = tmp_path / "run"
    assert run_train_py(tiny_args(colours, out, "--epochs", epochs, "--steps-per-epoch", spe,
                                  "--warmup-epochs", warmup_epochs, "--lr", lr, "--min-lr", min_lr,
                                  "--train-res", "8", "--eval-res", "8", "--batch-images", "4",
                                  "--checkpoint-every", 1000)) == 0
    total = epochs * spe
    want = [expected_lr(s, total, warmup, lr, min_lr) for s in range(total)]
    assert close(want[0], lr / max(1, warmup)) and close(want[max(0, warmup - 1)], lr)
    assert close(want[-1], min_lr)
    # what the optimizer really used, step by step (every param group)
    assert len(optimizer_lrs) == total
    for s, groups in enumerate(optimizer_lrs):
        assert all(close(g, want[s]) for g in groups), (s, groups, want[s])
    # and what metrics.jsonl reports at each logged step (step n is the n-th update)
    logged = {r["step"]: r["lr"] for r in metrics(out) if "loss" in r}
    assert sorted(logged) == list(range(1, total + 1))
    for step, value in logged.items():
        assert close(value, want[step - 1]), (step, value, want[step - 1])
