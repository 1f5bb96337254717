"""A non-finite loss stops the run before it reaches the weights: train.py's main returns a
non-zero code and prints one line naming the step (no traceback); the checkpoint written before
that step stays exactly as it was, and no final model or results are written."""
from __future__ import annotations

import hashlib
import re

import pytest
import torch

from inproc import run_train_py, tiny_args
from navit_pe.model import NaViT

BAD_STEP = 4  # the logits of the 4th training step are NaN; checkpoints after steps 2 and 3


def snapshot(ckdir) -> dict[str, str]:
    """{path under the checkpoints directory: sha256} of every file in it."""
    return {str(p.relative_to(ckdir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(ckdir.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("where", ["nan", "inf"])
def test_nan_stops_the_run_and_keeps_the_last_checkpoint(tiny_shards, tmp_path, capsys, monkeypatch, where):
    run = tmp_path / "run"
    ckdir = run / "checkpoints"
    calls, before = [0], {}
    forward = NaViT.forward

    def poisoned(self, x):
        logits = forward(self, x)
        if not self.training:
            return logits
        calls[0] += 1
        if calls[0] == BAD_STEP:
            before.update(snapshot(ckdir))  # the checkpoints as they are when the bad step starts
            if where == "nan":
                return logits * float("nan")
            # every image's own class at -inf: a loss of +inf (not NaN)
            return logits.index_put((torch.arange(len(logits)), x.labels), torch.tensor(float("-inf"), dtype=logits.dtype))
        return logits

    monkeypatch.setattr(NaViT, "forward", poisoned)
    code = run_train_py(tiny_args(tiny_shards, run, "--epochs", "2", "--steps-per-epoch", "3",
                                  "--checkpoint-every", "2", "--pos-embed", "learned_2d"))
    out = capsys.readouterr()
    assert code != 0 and calls[0] == BAD_STEP  # stopped at the bad step, not a step later
    # one error line (the progress bars also write to stderr, each redrawn after a carriage return)
    assert "Traceback" not in out.err + out.out, out.err
    err = [line for line in re.split(r"[\r\n]+", out.err + out.out) if "error" in line.lower()]
    assert len(err) == 1 and err[0].startswith("train.py: error: "), err
    assert f"step {BAD_STEP}" in err[0] and f"non-finite loss ({where})" in err[0] and "step_00000003" in err[0], err[0]
    # the checkpoints written before the bad step are there, unchanged, and load as step 3
    assert sorted(p.name for p in ckdir.iterdir()) == ["step_00000002", "step_00000003"]
    assert before and snapshot(ckdir) == before
    from safetensors.torch import load_file

    last = ckdir / "step_00000003"
    weights = load_file(last / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values())
    progress = torch.load(last / "custom_checkpoint_0.pkl", weights_only=False)
    assert progress["global_step"] == 3 and progress["epoch"] == 1
    # nothing of a finished run
    assert not (run / "model.safetensors").exists() and not (run / "results.json").exists()
