"""Every training flag of train.py reaches what it controls, watched inside a real run:
- --token-drop: the transformer sees round((1 - rate) * n) of each image's n patches in
  training, and all of them when the model is evaluated at the epoch end;
- --grad-clip: the gradient the optimizer steps with has exactly the clip norm;
- --mixed-precision bf16: the model's linear layers compute in bf16 in training and in the
  evaluation at the epoch end (and in fp32 without the flag).
Each flagged run is compared with the same run without the flag."""
from __future__ import annotations

import contextlib

import json

import pytest
import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.optim.optimizer import register_optimizer_step_pre_hook

from inproc import colour_shards, run_train_py, tiny_args
from navit_pe.model import NaViT
from navit_pe.packing import PackedBatch
from navit_pe.posenc import PosContext

# fp32 unless a test asks for bf16 (the default "auto" is bf16 on a CPU with AVX-512 BF16 or AMX)
RUN = ["--epochs", "1", "--steps-per-epoch", "3", "--train-res", "16", "--eval-res", "16", "--mixed-precision", "no"]


class Recorder:
    """Global hooks on every module and optimizer while a run is going."""

    def __init__(self):
        self.forwards: list[dict] = []  # one per NaViT forward: training flag, patches given
        self.grad_norms: list[float] = []  # total gradient norm at every optimizer step

    def _navit(self, module, args):
        if isinstance(module, NaViT):
            batch = args[0]
            assert isinstance(batch, PackedBatch)
            self.forwards.append(dict(training=module.training, given=batch.tokens_per_image().tolist(),
                                      seen=[], dtypes=set()))

    def _pre(self, module, args):
        self._navit(module, args)
        if self.forwards and any(isinstance(a, PosContext) for a in args):  # a block or its attention
            ctx = next(a for a in args if isinstance(a, PosContext))
            self.forwards[-1]["seen"].append(int(ctx.is_patch.sum()))

    def _post(self, module, args, output):
        if self.forwards and isinstance(module, nn.Linear):
            self.forwards[-1]["dtypes"].add(output.dtype)

    def _step(self, opt, args, kwargs):
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        self.grad_norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

    @contextlib.contextmanager
    def watching(self):
        handles = [register_module_forward_pre_hook(self._pre), register_module_forward_hook(self._post),
                   register_optimizer_step_pre_hook(self._step)]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def phase(self, training: bool) -> list[dict]:
        return [f for f in self.forwards if f["training"] == training]


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    return colour_shards(tmp_path_factory.mktemp("colour_data"), n_train=8, n_test=3)


def record(colours, out, *flags) -> Recorder:
    rec = Recorder()
    with rec.watching():
        assert run_train_py(tiny_args(colours, out, *RUN, *flags)) == 0
    assert len(rec.phase(True)) == 3 and rec.phase(False)  # 3 training steps, an evaluation
    assert len(rec.grad_norms) == 3
    return rec


@pytest.fixture(scope="module")
def plain(colours, tmp_path_factory):
    return record(colours, tmp_path_factory.mktemp("plain") / "run", "--mixed-precision", "no")


def test_token_drop_in_training_only(colours, tmp_path, plain):
    rec = record(colours, tmp_path / "run", "--token-drop", "0.25")
    for f in rec.phase(True):  # 16x16 px = 16 patches an image, 12 kept
        assert f["given"] and all(n == 16 for n in f["given"])
        assert set(f["seen"]) == {12 * len(f["given"])}, f
    for f in rec.phase(False):  # evaluation: every patch
        assert set(f["seen"]) == {sum(f["given"])}, f
    for f in plain.forwards:  # without the flag: every patch in training too
        assert set(f["seen"]) == {sum(f["given"])}, f


def test_grad_clip_bounds_the_gradient(colours, tmp_path, plain):
    clip = 1e-3
    assert min(plain.grad_norms) > 20 * clip  # unclipped gradients are far larger than the clip
    rec = record(colours, tmp_path / "run", "--grad-clip", clip)
    assert rec.grad_norms == pytest.approx([clip] * 3, rel=1e-3)  # scaled down to exactly the clip


def test_bf16_in_training_and_evaluation(colours, tmp_path, plain):
    for f in plain.forwards:
        assert f["dtypes"] == {torch.float32}, f
    rec = record(colours, tmp_path / "run", "--mixed-precision", "bf16")
    for f in rec.forwards:  # training steps and the epoch-end evaluation
        assert torch.bfloat16 in f["dtypes"], f


def test_auto_precision_follows_the_machine(colours, tmp_path):
    """--mixed-precision auto (the default): bf16 exactly where the CPU has native bf16."""
    from navit_pe.trainer import fast_bf16

    rec = record(colours, tmp_path / "run", "--mixed-precision", "auto")  # (RUN says no; the last flag wins)
    want = torch.bfloat16 if fast_bf16() else torch.float32
    for f in rec.forwards:
        assert want in f["dtypes"], f
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert saved["mixed_precision"] == "auto" and saved["resolved_mixed_precision"] == ("bf16" if fast_bf16() else "no")


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("no", torch.float32)])
def test_evaluate_runs_in_the_precision_asked(colours, precision, dtype):
    """evaluate() itself (the epoch-end evaluation and eval_resolutions.py) on a plain model."""
    from navit_pe.evaluate import evaluate

    torch.manual_seed(0)
    model = NaViT("sincos", dim=32, depth=1, heads=2, num_classes=4)
    rec = Recorder()
    with rec.watching():
        correct, total = evaluate(model, colours, (16, 16), mixed_precision=precision)
    assert total == 12 and rec.forwards
    for f in rec.forwards:
        assert not f["training"] and dtype in f["dtypes"] and len(f["dtypes"]) == 1, f


def test_resolution_flags_reach_the_batches(colours, tmp_path):
    """--train-res lo:hi: training images of independent heights and widths in patch multiples
    of lo..hi; --eval-res: every evaluated image at eval_res x eval_res."""
    rec = Recorder()
    grids = []
    orig = rec._navit

    def navit(module, args):
        orig(module, args)
        if isinstance(module, NaViT):
            grids.append((module.training, {tuple(g) for g in args[0].image_grids().tolist()}))
    rec._navit = navit
    with rec.watching():
        assert run_train_py(tiny_args(colours, tmp_path / "run", "--epochs", "1", "--steps-per-epoch", "4",
                                      "--train-res", "8:16", "--eval-res", "12", "--batch-images", "32")) == 0
    train = set().union(*(g for t, g in grids if t))
    evals = set().union(*(g for t, g in grids if not t))
    assert train <= {(h, w) for h in (2, 3, 4) for w in (2, 3, 4)}  # 8..16 px in patches of 4
    assert len(train) >= 5 and any(h != w for h, w in train)
    assert evals == {(3, 3)}


def test_model_and_optimizer_flags(colours, tmp_path):
    """--pos-embed, --dim, --depth, --heads, --mlp-ratio, --dropout, --pool, --patch-size reach the
    saved model; --weight-decay reaches AdamW (not on norms, biases and the CLS token)."""
    from navit_pe import NaViT as Model

    groups = []
    handle = register_optimizer_step_pre_hook(
        lambda opt, args, kwargs: groups.append([(g["weight_decay"], [p.ndim for p in g["params"]])
                                                 for g in opt.param_groups]))
    try:
        out = tmp_path / "run"
        assert run_train_py(tiny_args(colours, out, "--epochs", "1", "--steps-per-epoch", "1", "--train-res", "16",
                                      "--pos-embed", "rope", "--dim", "48", "--depth", "2", "--heads", "3",
                                      "--mlp-ratio", "1.5", "--dropout", "0.25", "--pool", "mean",
                                      "--patch-size", "2", "--weight-decay", "0.125")) == 0
    finally:
        handle.remove()
    cfg = Model.from_pretrained(out).config
    assert (cfg.pos_embed, cfg.dim, cfg.depth, cfg.heads, cfg.mlp_ratio, cfg.dropout, cfg.pool, cfg.patch_size,
            cfg.num_classes) == ("rope", 48, 2, 3, 1.5, 0.25, "mean", 2, 4)
    (decay, decay_ndims), (no_decay, no_decay_ndims) = sorted(groups[0], reverse=True)
    assert decay == 0.125 and no_decay == 0.0
    assert all(n >= 2 for n in decay_ndims) and all(n <= 1 for n in no_decay_ndims)


def test_randaugment_flags_reach_the_transform(colours, tmp_path, monkeypatch):
    from navit_pe.transforms import RandAugment

    calls = []
    orig = RandAugment.__call__

    def spy(self, img, rng):
        calls.append((self.num_ops, self.magnitude))
        return orig(self, img, rng)

    monkeypatch.setattr(RandAugment, "__call__", spy)
    base = ["--epochs", "1", "--steps-per-epoch", "1"]
    assert run_train_py(tiny_args(colours, tmp_path / "a", *base, "--randaug-ops", "3",
                                  "--randaug-magnitude", "5")) == 0
    assert calls and set(calls) == {(3, 5)}
    calls.clear()
    assert run_train_py(tiny_args(colours, tmp_path / "b", *base, "--randaug-ops", "0")) == 0
    assert calls == []
