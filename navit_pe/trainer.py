"""Training with Accelerate, one linear story: config -> data -> model -> prepare -> resume ->
loop (step, log, checkpoint) -> evaluate each epoch -> save the final model -> end.

`train.py` at the repository root parses flags into a `TrainConfig` and calls `train(cfg)`;
bad input raises `UsageError`, which train.py turns into one line and exit code 2.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import threading
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from .cli import UsageError, check_out_dir
from .config import NaViTConfig
from .cpu import cores, keep_freed_memory
from .data import DataError, ImageStore, ensure_prepared, load_meta, prepare_command
from .evaluate import evaluate
from .model import NaViT
from .posenc import POS_EMBEDS
from .stages import EpochPlan, TrainBatches, steps_per_epoch
from .transforms import ResolutionSampler, TokenBudget, TrainTransform, parse_aspect, parse_res, parse_resize


@dataclass
class TrainConfig:
    # -- data
    dataset: str = "cifar10"  # cifar10, cifar100 or a data/prepare_images.py --name (shards under data_root/dataset)
    data_root: str = "data"  # where the prepared shards live
    train_res: str = "16:48"  # a fixed side "32" or a range "lo:hi" sampled per image in patch multiples
    aspect: str | None = None  # "lo:hi" aspect ratio w/h sampled log-uniformly (None: h, w independent)
    resize: str | None = None  # "budget:N": each image keeps its aspect ratio, scaled to the largest size of at
    #                            most N patches (NaFlex), in training and evaluation; None: train_res/eval_res
    eval_res: int = 32  # side of the test images evaluated at each epoch end
    randaug_ops: int = 2  # RandAugment ops per image (0: off)
    randaug_magnitude: int = 9  # RandAugment magnitude (0..30)
    num_workers: int = -1  # DataLoader workers per process; -1: 0 on a CPU-only machine of <= 4 cores
    #                        (a worker would take cores from the model's threads), else 2
    # -- model
    pos_embed: str = "sincos"  # one of navit_pe.posenc.POS_EMBEDS
    pool: str = "cls"  # cls, mean or attn
    patch_size: int = 4
    dim: int = 128
    depth: int = 6
    heads: int = 4
    mlp_ratio: float = 2.0
    dropout: float = 0.1
    max_seq_len: int = 256  # tokens per packed sequence (a step packs its images into as many as it needs)
    token_drop: float = 0.0  # fraction of each image's patches dropped in training
    coord_shift: float = 0.0  # coordinate augmentation (DINOv3): offset per image and axis in [-S, S] patches
    coord_jitter: float = 1.0  # per-axis log-uniform position scale in [1/J, J] (1: off)
    coord_rescale: float = 1.0  # one log-uniform position scale per image in [1/R, R] (1: off)
    # -- optimisation (the reference CIFAR recipe)
    epochs: int = 200
    batch_images: int = 128  # images per optimizer step, over all processes
    lr: float = 5e-4
    min_lr: float = 1e-5
    weight_decay: float = 1e-3
    warmup_epochs: int = 10  # linear warmup, at most 5 % of the run's steps
    grad_clip: float = 0.0  # max gradient norm (0: off)
    compile: str = "auto"  # torch.compile the blocks' per-token parts: yes, no, or auto (yes for runs of at
    #                        least 1000 steps; compiling takes about a minute on 2 cores)
    mixed_precision: str = "auto"  # auto (bf16 where the device has fast bf16, else no), no or bf16
    #                                (Accelerate autocast; attention stays fp32)
    seed: int = 0
    # -- run directory, checkpoints, logging
    out: str | None = None  # run directory (default runs/<pos_embed>_<train_res>)
    resume: str | None = None  # "latest" or a checkpoint directory
    checkpoint_every: int = 500  # steps between checkpoints (and one at every epoch end)
    keep_checkpoints: int = 3  # how many checkpoints to keep
    log_every: int = 10  # steps between metric lines
    steps_per_epoch: int = 0  # 0: every training image once an epoch; >0 fixes it, batch_images a step
    stop_after: int = 0  # stop (as if killed, after a checkpoint) at this global step; 0: never

    def model_config(self, num_classes: int) -> NaViTConfig:
        return NaViTConfig(pos_embed=self.pos_embed, num_classes=num_classes, patch_size=self.patch_size,
                           dim=self.dim, depth=self.depth, heads=self.heads, mlp_ratio=self.mlp_ratio,
                           dropout=self.dropout, pool=self.pool, max_seq_len=self.max_seq_len,
                           coord_shift=self.coord_shift, coord_jitter=self.coord_jitter,
                           coord_rescale=self.coord_rescale)

    def run_dir(self) -> Path:
        return Path(self.out or f"runs/{self.pos_embed}_{(self.resize or self.train_res).replace(':', '-')}")


# ----------------------------------------------------------------------------- checks
def check_config(cfg: TrainConfig) -> ResolutionSampler | TokenBudget:
    """Validate everything that can be checked before touching data; return the size policy."""
    if cfg.pos_embed not in POS_EMBEDS:
        raise UsageError(f"unknown --pos-embed {cfg.pos_embed!r}; choose one of: {', '.join(POS_EMBEDS)}")
    if cfg.pool not in ("cls", "mean", "attn"):
        raise UsageError(f"unknown --pool {cfg.pool!r}; choose one of: cls, mean, attn")
    if cfg.compile not in ("auto", "yes", "no"):
        raise UsageError(f"--compile must be auto, yes or no, got {cfg.compile!r}")
    if cfg.mixed_precision not in ("auto", "no", "bf16"):
        raise UsageError(f"--mixed-precision must be auto, no or bf16, got {cfg.mixed_precision!r}")
    if not 0 <= cfg.token_drop < 1:
        raise UsageError(f"--token-drop must be in [0, 1), got {cfg.token_drop}")
    for name in ("epochs", "patch_size", "dim", "depth", "heads", "batch_images", "checkpoint_every",
                 "keep_checkpoints", "log_every", "max_seq_len"):
        if getattr(cfg, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    if not (cfg.lr > 0 and cfg.min_lr >= 0 and cfg.weight_decay >= 0 and 0 <= cfg.dropout < 1):
        raise UsageError("need --lr > 0, --min-lr >= 0, --weight-decay >= 0 and 0 <= --dropout < 1")
    try:  # everything the model itself checks (dim vs heads, dim divisible by 4 for sin-cos, ...)
        NaViT(cfg.model_config(num_classes=10))
    except ValueError as e:
        raise UsageError(f"model: {e}") from None
    try:
        lo, hi = parse_res(cfg.train_res, cfg.patch_size)
    except ValueError as e:
        raise UsageError(f"--train-res: {e}; use sides in px that are multiples of the patch size "
                         f"{cfg.patch_size}, e.g. --train-res 32 or 16:48") from None
    try:
        aspect = parse_aspect(cfg.aspect)
    except ValueError as e:
        raise UsageError(f"--aspect: {e}; use a width/height ratio R or a range LO:HI of positive numbers, "
                         "e.g. --aspect 0.5:2") from None
    try:
        budget = parse_resize(cfg.resize, cfg.patch_size)
    except ValueError as e:
        raise UsageError(f"--resize: {e}") from None
    if budget is not None and aspect is not None:
        raise UsageError("--aspect does not apply with --resize budget:N (every image keeps its own aspect "
                         "ratio); drop --aspect")
    sampler = budget or ResolutionSampler(lo, hi, cfg.patch_size, aspect)
    if cfg.eval_res % cfg.patch_size:
        raise UsageError(f"--eval-res {cfg.eval_res} is not a multiple of the patch size {cfg.patch_size}")
    need = sampler.max_tokens() + int(cfg.pool == "cls")
    if need > cfg.max_seq_len:
        lower = "--resize budget:N" if budget else "--train-res"
        raise UsageError(f"the largest training image needs {need} tokens but --max-seq-len is "
                         f"{cfg.max_seq_len}; raise --max-seq-len to at least {need} or lower {lower}")
    return sampler


def check_data(cfg: TrainConfig) -> tuple[Path, dict]:
    try:
        ddir = ensure_prepared(cfg.data_root, cfg.dataset)
        meta = load_meta(ddir)
    except DataError as e:
        raise UsageError(str(e)) from None
    again = f"re-run {prepare_command(cfg.dataset, cfg.data_root)}"
    for split in ("train", "test"):
        shards = meta.get("splits", {}).get(split, {}).get("shards", [])
        if not shards:
            raise UsageError(f"{ddir} has no {split} shards; {again}")
        for s in shards:
            f = ddir / s["file"]
            if not f.is_file() or f.stat().st_size == 0:
                raise UsageError(f"shard {f} is missing or empty; {again}")
    return ddir, meta


# ----------------------------------------------------------------------------- schedule
def lr_at(step: int, total: int, warmup: int, lr: float, min_lr: float) -> float:
    """Linear warmup from 0 to `lr`, then cosine from `lr` to `min_lr` at the last step."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup - 1)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


@dataclass
class Progress:
    """Where the run is; saved in every checkpoint through register_for_checkpointing."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, d: dict) -> None:
        for f in fields(self):
            setattr(self, f.name, int(d[f.name]))


class RunETA:
    """Time left for the whole run at the pace so far: (elapsed / steps done) x steps left.

    The elapsed time includes everything since the start (evaluation, checkpoints), so the pace
    settles once an epoch has passed. `start_step` is the step the run (or its resume) began at.
    """

    AFTER_STEPS = 5  # the first estimate is printed after this many steps

    def __init__(self, total_steps: int, start_step: int = 0, start_time: float | None = None):
        self.total_steps, self.start_step = total_steps, start_step
        self.start_time = time.perf_counter() if start_time is None else start_time

    def elapsed(self, now: float | None = None) -> float:
        return (time.perf_counter() if now is None else now) - self.start_time

    def remaining(self, step: int, now: float | None = None) -> float | None:
        """Seconds left after global step `step`; None before the first step."""
        done = step - self.start_step
        return None if done <= 0 else self.elapsed(now) / done * (self.total_steps - step)

    def announce_at(self, step: int) -> bool:
        """Whether `step` is the one after which the estimate is printed."""
        return step == self.start_step + min(self.AFTER_STEPS, self.total_steps - self.start_step)

    def summary(self, step: int, now: float | None = None) -> str:
        done, elapsed = step - self.start_step, self.elapsed(now)
        left = self.remaining(step, now) or 0.0
        return (f"estimated time for the whole run: {format_duration(elapsed + left)} "
                f"({self.total_steps - self.start_step} steps at {elapsed / max(1, done):.2f} s/step "
                f"over the first {done}; {format_duration(left)} left)")


def format_duration(seconds: float | None) -> str:
    """42 -> '42s', 200 -> '3m20s', 7500 -> '2h05m', 190000 -> '2d04h'; None -> '?'."""
    if seconds is None:
        return "?"
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


# ----------------------------------------------------------------------------- checkpoints
def fast_bf16() -> bool:
    """Whether this machine runs bf16 matmuls natively: a CUDA GPU with bf16, or a CPU with
    AVX-512 BF16 / AMX (on other CPUs bf16 is emulated and slower than fp32)."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve_precision(mixed_precision: str) -> str:
    """"auto" -> "bf16" where the device has fast bf16, else "no"; "no" and "bf16" as they are."""
    if mixed_precision == "auto":
        return "bf16" if fast_bf16() else "no"
    return mixed_precision


class TrainingError(RuntimeError):
    """The run cannot go on (a non-finite loss): one line, exit code 1."""


def check_finite(loss: torch.Tensor, step: int, accelerator, run: Path) -> None:
    """Stop before a non-finite loss reaches the weights; the last checkpoint stays as it was."""
    bad = torch.tensor(float(not torch.isfinite(loss.detach()).all()), device=loss.device)
    if accelerator.num_processes > 1:  # every rank stops together, or the others would hang
        bad = accelerator.reduce(bad, "sum")
    if bad.item():
        found = list_checkpoints(run)
        last = f"the last good checkpoint is {found[-1]}" if found else "no checkpoint was written yet"
        raise TrainingError(f"non-finite loss ({loss.item()}) at step {step}; {last}; "
                            f"lower --lr or set --grad-clip and start again")


def ignore_ctrl_c(worker_id: int) -> None:
    """DataLoader workers leave Ctrl-C (sent to the whole terminal group) to the training process,
    which stops them; SIGTERM keeps torch's worker handler, which exits cleanly when asked."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class Stopped(Exception):
    """SIGTERM or SIGINT stopped the run after a checkpoint: train.py exits 128 + the signal."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}, which is checkpointed; "
                         f"continue with --resume latest")
        self.signum = signum


class StopOnSignal:
    """While training, SIGTERM and SIGINT ask the run to stop after the current step, with a
    checkpoint, so a killed run loses nothing; a second signal more than 2 s after the first
    (not the same signal delivered twice, e.g. to a process group and by a parent) stops at once."""

    def __init__(self):
        self.received = 0  # the signal this process received (0: none), set by the handler at any moment
        self.signum = 0  # the stop that every process agreed on in requested() (0: none yet)
        self.at, self.saved = 0.0, {}

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            self.saved = {s: signal.signal(s, self.handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.saved.items():
            signal.signal(s, handler)

    def handle(self, signum: int, frame) -> None:
        if not self.received:
            self.received, self.at = signum, time.monotonic()
            # os.write, not print: a handler must not re-enter a buffered write it interrupted
            os.write(2, f"\n{signal.Signals(signum).name}: stopping after this step's checkpoint "
                        f"(a second signal stops at once)\n".encode())
        elif time.monotonic() - self.at > 2.0:
            raise KeyboardInterrupt

    def requested(self, accelerator) -> int:
        """The signal that asks to stop (0: none), the same on every process: a signal to one
        of them stops all after the same step. Only the all-reduced value is returned: a signal that
        lands here after the flag was sent waits for the next call on every process alike."""
        agreed = self.received
        if accelerator.num_processes > 1:
            flag = torch.tensor(agreed, device=accelerator.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            agreed = int(flag.item())
            if agreed and not self.received:  # another process's signal: a request as if received here
                self.received, self.at = agreed, time.monotonic()
        self.signum = agreed
        return agreed


def list_checkpoints(run: Path) -> list[Path]:
    """Complete checkpoints, oldest first (incomplete ones are hidden .tmp directories)."""
    ckdir = run / "checkpoints"
    return sorted(p for p in ckdir.glob("step_*") if p.is_dir()) if ckdir.is_dir() else []


# settings that may change when a run is resumed (all others must match the saved run)
RESUMABLE = {"resume", "stop_after", "out", "log_every", "checkpoint_every", "keep_checkpoints"}


def check_same_run(cfg: TrainConfig, run: Path, extra: dict) -> None:
    """On resume, refuse settings that would change the data order, schedule or model."""
    saved_path = run / "train_config.json"
    if not saved_path.is_file():
        return
    saved = json.loads(saved_path.read_text())
    now = {**asdict(cfg), **extra}
    diff = [k for k in now if k not in RESUMABLE and k in saved and saved[k] != now[k]]
    if diff:
        k = diff[0]
        raise UsageError(f"--resume: {k} is {now[k]!r} but the run was started with {saved[k]!r}; "
                         f"resume with the run's own settings or start a new --out")


def resolve_resume(cfg: TrainConfig, run: Path) -> Path | None:
    if not cfg.resume:
        return None
    if cfg.resume == "latest":
        found = list_checkpoints(run)
        return found[-1] if found else None
    path = Path(cfg.resume)
    if not (path / "custom_checkpoint_0.pkl").is_file():
        raise UsageError(f"--resume {path} is not a checkpoint directory (expected one of "
                         f"{run / 'checkpoints'}/step_*); use --resume latest")
    return path


def save_checkpoint(accelerator, run: Path, step: int, keep: int) -> None:
    """accelerator.save_state into a temporary directory, renamed when complete."""
    ckdir = run / "checkpoints"
    tmp, final = ckdir / f".tmp_step_{step:08d}", ckdir / f"step_{step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in list_checkpoints(run)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


class MetricsLog:
    """Append-only JSONL in the run directory (main process), flushed every line."""

    def __init__(self, path: Path, enabled: bool):
        self.f = open(path, "a", buffering=1) if enabled else None

    def write(self, **row) -> None:
        if self.f:
            self.f.write(json.dumps(row) + "\n")

    def close(self) -> None:
        if self.f:
            self.f.close()


def _tracker() -> str | None:
    for mod in ("tensorboard", "tensorboardX"):
        try:
            __import__(mod)
            return "tensorboard"
        except ImportError:
            pass
    return None


def finished_result(run: Path) -> dict:
    """The result of a run whose epochs are all done: results.json, or where the run was killed
    before writing it (after its last checkpoint), the last epoch's row of metrics.jsonl."""
    if (run / "results.json").is_file():
        return json.loads((run / "results.json").read_text())
    path = run / "metrics.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []
    epochs = [r for r in rows if "test_acc" in r]
    return epochs[-1] if epochs else {}


# ----------------------------------------------------------------------------- train
def train(cfg: TrainConfig) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    keep_freed_memory()  # reuse freed tensor memory instead of page-faulting fresh memory each step
    # -- checks, before any heavy work
    sampler = check_config(cfg)
    run = cfg.run_dir()
    check_out_dir(run)
    precision = resolve_precision(cfg.mixed_precision)
    accelerator = Accelerator(mixed_precision=precision, log_with=_tracker(), project_dir=str(run))
    with accelerator.main_process_first():  # only one process prepares missing shards
        ddir, meta = check_data(cfg)
    set_seed(cfg.seed, device_specific=True)
    world, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    if cfg.batch_images < world:
        raise UsageError(f"--batch-images {cfg.batch_images} is fewer than the {world} processes; "
                         f"use at least one image per process")

    # -- data: both splits in RAM; an epoch = every training image once, ~batch_images a step
    with accelerator.main_process_first():
        train_set = ImageStore.load(ddir, "train", progress=main)
        test_set = ImageStore.load(ddir, "test")
    if train_set.skipped or test_set.skipped:
        accelerator.print(f"skipped unreadable samples: {train_set.skipped} train, {test_set.skipped} test")
    cls = cfg.pool == "cls"
    spe = cfg.steps_per_epoch or steps_per_epoch(len(train_set), cfg.batch_images)
    per_step = cfg.batch_images if cfg.steps_per_epoch else None  # a fixed step count: batch_images a step
    total_steps = cfg.epochs * spe
    warmup = min(cfg.warmup_epochs * spe, total_steps // 20)
    transform = TrainTransform(randaugment=cfg.randaug_ops > 0, num_ops=max(cfg.randaug_ops, 1),
                               magnitude=cfg.randaug_magnitude)
    workers = cfg.num_workers if cfg.num_workers >= 0 else (
        0 if accelerator.device.type == "cpu" and cores() <= 4 else 2)

    plans: dict[int, EpochPlan] = {}

    def plan(epoch: int) -> EpochPlan:
        if epoch not in plans:
            plans.clear()
            plans[epoch] = EpochPlan(len(train_set), spe, cfg.seed, epoch, per_step)
        return plans[epoch]

    if plan(0).min_share(world) < 1:
        raise UsageError(f"a step of {len(train_set)} images in {spe} steps leaves a process with none; "
                         f"use fewer processes or a larger --batch-images")

    def train_loader(epoch: int, start: int) -> DataLoader:
        batches = TrainBatches(train_set, plan(epoch), sampler, transform, cfg.patch_size, cfg.max_seq_len, cls,
                               cfg.seed, epoch, start, rank, world)
        # an explicit generator: creating the loader must not draw from the global RNG (resume)
        return DataLoader(batches, batch_size=None, num_workers=workers, worker_init_fn=ignore_ctrl_c,
                          generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch),
                          persistent_workers=False, prefetch_factor=4 if workers else None)

    # -- model, optimizer (no weight decay on norms, biases, RoPE frequencies), prepare
    mcfg = cfg.model_config(len(meta["classes"]))
    model = NaViT(mcfg)
    model.token_drop = cfg.token_drop
    compiled = cfg.compile == "yes" or (cfg.compile == "auto" and total_steps >= 1000)
    if compiled:
        model.compile_blocks()
    # fused AdamW: one kernel for all parameters (CPU and CUDA)
    optimizer = torch.optim.AdamW(model.param_groups(cfg.weight_decay), lr=cfg.lr, fused=True)
    model, optimizer = accelerator.prepare(model, optimizer)
    progress = Progress()
    accelerator.register_for_checkpointing(progress)

    # -- resume: same data order, schedule and RNG state as an uninterrupted run
    extra = {"world_size": world, "resolved_mixed_precision": precision, "compiled": compiled}
    ckpt = resolve_resume(cfg, run)
    if ckpt is not None:
        check_same_run(cfg, run, extra)
        accelerator.load_state(str(ckpt))
        accelerator.print(f"resumed from {ckpt} at epoch {progress.epoch}, step {progress.global_step}")
    elif cfg.resume == "latest":
        accelerator.print(f"no checkpoint in {run / 'checkpoints'}, starting from scratch")
    if main:
        (run / "train_config.json").write_text(json.dumps({**asdict(cfg), **extra}, indent=2) + "\n")
        mcfg.save(run / "config.json")
    if _tracker():
        accelerator.init_trackers("navit-pe", config={k: v for k, v in asdict(cfg).items() if v is not None})
    log = MetricsLog(run / "metrics.jsonl", main)
    accelerator.print(f"{cfg.pos_embed}: {sum(p.numel() for p in model.parameters()):,} parameters, {precision}, "
                      f"{'compiled, ' if compiled else ''}{world} process(es), {torch.get_num_threads()} thread(s), {len(train_set)} training images in {spe} steps/epoch "
                      f"(~{len(train_set) / spe:.0f} images a step), {cfg.epochs} epochs, data {ddir}")

    # -- loop (a resumed run that had already finished keeps its results)
    result = finished_result(run) if progress.epoch >= cfg.epochs else {}
    stopped = False
    unwrapped = accelerator.unwrap_model(model)
    eta = None  # the time left, paced from the end of this process's first step (which compiles)
    eval_size = sampler if isinstance(sampler, TokenBudget) else (cfg.eval_res, cfg.eval_res)
    eval_name = cfg.resize if isinstance(sampler, TokenBudget) else f"{cfg.eval_res}x{cfg.eval_res}"
    with StopOnSignal() as stop:  # SIGTERM / SIGINT: stop after the current step, with a checkpoint
        for epoch in range(progress.epoch, cfg.epochs):
            model.train()
            t_epoch = time.perf_counter()
            start = progress.step_in_epoch  # > 0 when resumed inside this epoch: the plan goes straight there
            batches = iter(train_loader(epoch, start)) if start < spe else iter(())
            seen: list[int] = []  # this process's training images of this epoch (indices), from `start` on
            bar = tqdm(total=spe, initial=start, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                       disable=not main, dynamic_ncols=True, leave=False)
            t_last, n_img, n_tok, eff_sum, n_steps, loss_sum = time.perf_counter(), 0, 0, 0.0, 0, 0.0
            while progress.step_in_epoch < spe:
                batch = next(batches).to(accelerator.device)
                lr = lr_at(progress.global_step, total_steps, warmup, cfg.lr, cfg.min_lr)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                logits = model(batch)
                loss = F.cross_entropy(logits.float(), batch.labels)
                try:
                    check_finite(loss, progress.global_step + 1, accelerator, run)
                except TrainingError:
                    bar.close()  # the error goes on a line of its own, not after the bar
                    raise
                accelerator.backward(loss)
                if cfg.grad_clip > 0:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if world > 1:  # every process's trained extent: DDP would keep only rank 0's buffer
                    torch.distributed.all_reduce(unwrapped.pos.trained_extent, op=torch.distributed.ReduceOp.MAX)
                progress.step_in_epoch += 1
                progress.global_step += 1

                # -- throughput and metrics (this process's figures x processes)
                seen += batch.sample_ids.tolist()
                n_img += batch.num_images * world
                per_image = batch.tokens_per_image()  # patches the model sees (after token dropping)
                n_tok += int(torch.clamp(torch.round(per_image * (1 - cfg.token_drop)), min=1).sum()) * world
                eff_sum += batch.efficiency()
                loss_sum += loss.item()
                n_steps += 1
                bar.update(1)
                if eta is None:
                    eta = RunETA(total_steps, progress.global_step)
                elif eta.announce_at(progress.global_step):
                    accelerator.print(eta.summary(progress.global_step))
                if progress.global_step % cfg.log_every == 0 or progress.step_in_epoch == spe:
                    dt = time.perf_counter() - t_last
                    row = dict(step=progress.global_step, epoch=epoch + progress.step_in_epoch / spe,
                               loss=loss_sum / n_steps, lr=lr, images_per_s=n_img / dt, tokens_per_s=n_tok / dt,
                               efficiency=eff_sum / n_steps)
                    log.write(**row)
                    accelerator.log({f"train/{k}": v for k, v in row.items() if k != "step"}, step=progress.global_step)
                    bar.set_postfix(loss=f"{row['loss']:.3f}", img_s=f"{row['images_per_s']:.0f}",
                                    tok_s=f"{row['tokens_per_s']:.0f}", eff=f"{row['efficiency']:.1%}",
                                    run_left=format_duration(eta and eta.remaining(progress.global_step)))
                    t_last, n_img, n_tok, eff_sum, n_steps, loss_sum = time.perf_counter(), 0, 0, 0.0, 0, 0.0
                # a signal (asked on every process, every step) or --stop-after
                stopping = bool(stop.requested(accelerator)) or (
                    bool(cfg.stop_after) and progress.global_step >= cfg.stop_after)
                if progress.step_in_epoch < spe and progress.global_step % cfg.checkpoint_every == 0 and not stopping:
                    save_checkpoint(accelerator, run, progress.global_step, cfg.keep_checkpoints)
                if stopping:
                    stopped = True
                    break
            bar.close()
            del batches
            if stopped:
                save_checkpoint(accelerator, run, progress.global_step, cfg.keep_checkpoints)
                if not stop.signum:
                    accelerator.print(f"stopped after step {progress.global_step} (--stop-after); "
                                      f"continue with --resume latest")
                break
            train_time = time.perf_counter() - t_epoch
            # -- the epoch's images over all processes: how many, and how many different ones
            if world > 1:
                everyone = [None] * world
                torch.distributed.all_gather_object(everyone, seen)
                seen = [i for part in everyone for i in part]
            done_before = plan(epoch).order[:plan(epoch).bounds[min(start, spe)]]  # the steps before a resume
            epoch_images, epoch_unique = len(seen) + len(done_before), len(set(seen) | set(done_before))

            # -- evaluate at eval_res, every test image counted once over all processes
            correct, total = evaluate(unwrapped, test_set, eval_size, accelerator=accelerator,
                                      tokens_per_batch=max(8192, cfg.max_seq_len), mixed_precision=precision)
            result = dict(epoch=epoch + 1, step=progress.global_step, test_acc=correct / max(1, total),
                          test_correct=correct, test_images=total, eval_res=cfg.resize or cfg.eval_res,
                          epoch_images=epoch_images, epoch_unique_images=epoch_unique,
                          epoch_train_s=train_time, epoch_s=time.perf_counter() - t_epoch)
            log.write(**result)
            accelerator.log({"test/acc": result["test_acc"]}, step=progress.global_step)
            accelerator.print(f"epoch {epoch + 1}/{cfg.epochs}: test acc {result['test_acc']:.4f} "
                              f"({correct}/{total} at {eval_name}), {epoch_images} training images, "
                              f"{train_time:.0f} s training")
            progress.epoch, progress.step_in_epoch = epoch + 1, 0
            save_checkpoint(accelerator, run, progress.global_step, cfg.keep_checkpoints)
            # asked during the evaluation (a condition the same on every rank: they call requested() alike)
            if progress.epoch < cfg.epochs and stop.requested(accelerator):
                stopped = True
                break

        # -- end: the final model, rebuildable from config.json + model.safetensors alone
        if world > 1:
            print(f"rank {accelerator.process_index}: {progress.global_step} steps", flush=True)
        accelerator.wait_for_everyone()
        if not stopped and main:
            unwrapped.save_pretrained(run)
            tmp = run / "results.json.tmp"
            tmp.write_text(json.dumps(result, indent=2) + "\n")
            tmp.replace(run / "results.json")
            accelerator.print(f"saved {run / 'model.safetensors'} and {run / 'config.json'}")
        log.close()
        accelerator.end_training()
        if stopped and stop.signum:
            raise Stopped(stop.signum, progress.global_step)
        return result
