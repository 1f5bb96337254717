"""Training really learns: a short run on data a model can learn (classes told apart by colour)
reaches high test accuracy, and the same run with a learning rate too small to move the
weights does not (so a trainer that never updates the weights fails here)."""
from __future__ import annotations

import pytest

from inproc import colour_shards, metrics, run_train_py, tiny_args

RUN = ["--epochs", "2", "--steps-per-epoch", "10", "--warmup-epochs", "0", "--min-lr", "0", "--dropout", "0"]


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    return colour_shards(tmp_path_factory.mktemp("colour_data"))


def _run(colours, out, lr):
    assert run_train_py(tiny_args(colours, out, *RUN, "--lr", lr)) == 0
    rows = metrics(out)
    losses = [r["loss"] for r in rows if "loss" in r]
    accs = [r["test_acc"] for r in rows if "test_acc" in r]
    evals = [r for r in rows if "test_acc" in r]
    assert len(losses) == 20 and len(accs) == 2
    assert all(r["test_images"] == 40 for r in evals)  # 4 colours x 10 test images, each once
    return losses, accs


def test_short_run_learns_colours(colours, tmp_path):
    losses, accs = _run(colours, tmp_path / "learn", 1e-2)
    assert accs[-1] >= 0.9, accs  # chance is 0.25
    # the training loss fell well below its start (ln 4 = 1.39 at chance)
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3, losses


def test_run_that_cannot_learn_stays_at_chance(colours, tmp_path):
    """The control: the same run with a learning rate of 1e-9 stays near chance, so the
    threshold above is one that only learning reaches."""
    losses, accs = _run(colours, tmp_path / "frozen", 1e-9)
    assert accs[-1] <= 0.5, accs
    assert abs(sum(losses[-3:]) / 3 - sum(losses[:3]) / 3) < 0.1, losses
