"""Checkpoints: one for every --checkpoint-every N-th step and one at each epoch end, each holding
the progress of its own step; --keep-checkpoints K keeps exactly the last K, at every moment of
the run. Watched from inside a real run: the checkpoint directory is listed before every
optimizer step."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from inproc import colour_shards, run_train_py, tiny_args


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    return colour_shards(tmp_path_factory.mktemp("colour_data"), n_train=8, n_test=2)


def steps_in(ckdir: Path) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in ckdir.glob("step_*")) if ckdir.is_dir() else []


# epochs x steps per epoch, --checkpoint-every, --keep-checkpoints -> checkpoints written
@pytest.mark.parametrize("epochs, spe, every, keep, written", [
    (2, 5, 3, 100, [3, 5, 6, 9, 10]),  # every 3rd step and both epoch ends, all kept
    (2, 5, 3, 2, [3, 5, 6, 9, 10]),  # the same, the last 2 kept
    (3, 2, 4, 1, [2, 4, 6]),  # epoch ends 2, 4, 6 (4 is also the 4th step: one checkpoint)
    (1, 7, 2, 3, [2, 4, 6, 7]),
])
def test_cadence_and_pruning(colours, tmp_path, epochs, spe, every, keep, written):
    run = tmp_path / "run"
    ckdir = run / "checkpoints"
    seen: list[list[int]] = []  # the checkpoints present before each optimizer step
    handle = register_optimizer_step_pre_hook(lambda opt, args, kwargs: seen.append(steps_in(ckdir)))
    try:
        assert run_train_py(tiny_args(colours, run, "--epochs", epochs, "--steps-per-epoch", spe,
                                      "--checkpoint-every", every, "--keep-checkpoints", keep,
                                      "--train-res", "8", "--eval-res", "8", "--batch-images", "4")) == 0
    finally:
        handle.remove()
    total = epochs * spe
    seen.append(steps_in(ckdir))  # after the last step
    assert len(seen) == total + 1
    # after n steps: exactly the last `keep` of the checkpoints due by then
    for done, present in enumerate(seen):
        due = [s for s in written if s <= done]
        assert present == due[-keep:], (done, present, due)
    # every checkpoint that remains is complete and holds the progress of its own step
    for step in steps_in(ckdir):
        ck = ckdir / f"step_{step:08d}"
        assert (ck / "model.safetensors").is_file()
        states = [torch.load(f, weights_only=False) for f in sorted(ck.glob("custom_checkpoint_*.pkl"))]
        progress = [d for d in states if isinstance(d, dict) and "global_step" in d]
        assert len(progress) == 1 and progress[0]["global_step"] == step, (step, states)
    assert not list(ckdir.glob(".tmp*"))  # no temporary directory left behind
