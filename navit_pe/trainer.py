"""Training with Accelerate, one linear story: config -> data -> model -> prepare -> resume ->
loop (step, log, checkpoint) -> evaluate each epoch -> save the final model -> end.

`train.py` at the repository root parses flags into a `TrainConfig` and calls `train(cfg)`;
bad input raises `UsageError`, which train.py turns into one line and exit code 2.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from .cli import UsageError, check_out_dir
from .config import NaViTConfig
from .cpu import keep_freed_memory
from .data import DataError, ensure_prepared, load_meta
from .evaluate import evaluate
from .model import NaViT
from .posenc import POS_EMBEDS
from .stages import TrainStream
from .transforms import ResolutionSampler, TrainTransform, parse_aspect, parse_res


@dataclass
class TrainConfig:
    # -- data
    dataset: str = "cifar10"  # cifar10 or cifar100 (shards under data_root/dataset)
    data_root: str = "data"  # where the prepared shards live
    train_res: str = "16:48"  # a fixed side "32" or a range "lo:hi" sampled per image in patch multiples
    aspect: str | None = None  # "lo:hi" aspect ratio w/h sampled log-uniformly (None: h, w independent)
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
    max_seq_len: int = 256  # tokens per packed sequence
    token_drop: float = 0.0  # fraction of each image's patches dropped in training
    coord_shift: float = 0.0  # coordinate augmentation (DINOv3): offset per image and axis in [-S, S] patches
    coord_jitter: float = 1.0  # per-axis log-uniform position scale in [1/J, J] (1: off)
    coord_rescale: float = 1.0  # one log-uniform position scale per image in [1/R, R] (1: off)
    # -- optimisation (the reference CIFAR recipe)
    epochs: int = 200
    batch_images: int = 128  # images' worth of tokens per optimizer step, over all processes
    lr: float = 5e-4
    min_lr: float = 1e-5
    weight_decay: float = 1e-3
    warmup_epochs: int = 10  # linear warmup, at most 5 % of the run's steps
    grad_clip: float = 0.0  # max gradient norm (0: off)
    mixed_precision: str = "no"  # no or bf16 (Accelerate autocast; attention stays fp32)
    seed: int = 0
    # -- run directory, checkpoints, logging
    out: str | None = None  # run directory (default runs/<pos_embed>_<train_res>)
    resume: str | None = None  # "latest" or a checkpoint directory
    checkpoint_every: int = 500  # steps between checkpoints (and one at every epoch end)
    keep_checkpoints: int = 3  # how many checkpoints to keep
    log_every: int = 10  # steps between metric lines
    steps_per_epoch: int = 0  # 0: from the dataset size and the packing; >0 fixes it (tests)
    stop_after: int = 0  # stop (as if killed, after a checkpoint) at this global step; 0: never

    def model_config(self, num_classes: int) -> NaViTConfig:
        return NaViTConfig(pos_embed=self.pos_embed, num_classes=num_classes, patch_size=self.patch_size,
                           dim=self.dim, depth=self.depth, heads=self.heads, mlp_ratio=self.mlp_ratio,
                           dropout=self.dropout, pool=self.pool, max_seq_len=self.max_seq_len,
                           coord_shift=self.coord_shift, coord_jitter=self.coord_jitter,
                           coord_rescale=self.coord_rescale)

    def run_dir(self) -> Path:
        return Path(self.out or f"runs/{self.pos_embed}_{self.train_res.replace(':', '-')}")


# ----------------------------------------------------------------------------- checks
def check_config(cfg: TrainConfig) -> ResolutionSampler:
    """Validate everything that can be checked before touching data; return the sampler."""
    if cfg.pos_embed not in POS_EMBEDS:
        raise UsageError(f"unknown --pos-embed {cfg.pos_embed!r}; choose one of: {', '.join(POS_EMBEDS)}")
    if cfg.pool not in ("cls", "mean", "attn"):
        raise UsageError(f"unknown --pool {cfg.pool!r}; choose one of: cls, mean, attn")
    if cfg.mixed_precision not in ("no", "bf16"):
        raise UsageError(f"--mixed-precision must be no or bf16, got {cfg.mixed_precision!r}")
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
        sampler = ResolutionSampler(lo, hi, cfg.patch_size, parse_aspect(cfg.aspect))
    except ValueError as e:
        raise UsageError(f"--train-res/--aspect: {e}; use multiples of the patch size "
                         f"{cfg.patch_size}, e.g. --train-res 32 or 16:48") from None
    if cfg.eval_res % cfg.patch_size:
        raise UsageError(f"--eval-res {cfg.eval_res} is not a multiple of the patch size {cfg.patch_size}")
    need = sampler.max_tokens() + int(cfg.pool == "cls")
    if need > cfg.max_seq_len:
        raise UsageError(f"the largest training image needs {need} tokens but --max-seq-len is "
                         f"{cfg.max_seq_len}; raise --max-seq-len to at least {need} or lower --train-res")
    return sampler


def check_data(cfg: TrainConfig) -> tuple[Path, dict]:
    try:
        ddir = ensure_prepared(cfg.data_root, cfg.dataset)
        meta = load_meta(ddir)
    except DataError as e:
        raise UsageError(str(e)) from None
    for split in ("train", "test"):
        shards = meta.get("splits", {}).get(split, {}).get("shards", [])
        if not shards:
            raise UsageError(f"{ddir} has no {split} shards; re-run python data/prepare_cifar.py")
        for s in shards:
            f = ddir / s["file"]
            if not f.is_file() or f.stat().st_size == 0:
                raise UsageError(f"shard {f} is missing or empty; re-run python data/prepare_cifar.py")
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


# ----------------------------------------------------------------------------- checkpoints
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
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, log_with=_tracker(), project_dir=str(run))
    with accelerator.main_process_first():  # only one process prepares missing shards
        ddir, meta = check_data(cfg)
    set_seed(cfg.seed, device_specific=True)
    world, main = accelerator.num_processes, accelerator.is_main_process

    # -- data: B sequences of L tokens per process, ~batch_images images over all processes
    cls = cfg.pool == "cls"
    tok_per_img = sampler.mean_tokens(cls)
    batch_seqs = max(1, round(cfg.batch_images * tok_per_img / cfg.max_seq_len / world))
    imgs_per_step = world * batch_seqs * cfg.max_seq_len * 0.98 / tok_per_img
    n_train = int(meta["splits"]["train"]["count"])
    spe = cfg.steps_per_epoch or max(1, int(n_train / imgs_per_step))
    total_steps = cfg.epochs * spe
    warmup = min(cfg.warmup_epochs * spe, total_steps // 20)
    transform = TrainTransform(randaugment=cfg.randaug_ops > 0, num_ops=max(cfg.randaug_ops, 1),
                               magnitude=cfg.randaug_magnitude)

    workers = cfg.num_workers if cfg.num_workers >= 0 else (
        0 if accelerator.device.type == "cpu" and (os.cpu_count() or 1) <= 4 else 2)

    def train_loader(epoch: int) -> DataLoader:
        stream = TrainStream(ddir, sampler, transform, cfg.patch_size, cfg.max_seq_len, batch_seqs, cls,
                             seed=cfg.seed, epoch=epoch, buffer_size=max(64, 4 * round(imgs_per_step / world)))
        # an explicit generator: creating the loader must not draw from the global RNG (resume)
        return DataLoader(stream, batch_size=None, num_workers=workers,
                          generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch),
                          persistent_workers=False, prefetch_factor=4 if workers else None)

    # -- model, optimizer (no weight decay on norms, biases, RoPE frequencies), prepare
    mcfg = cfg.model_config(len(meta["classes"]))
    model = NaViT(mcfg)
    model.token_drop = cfg.token_drop
    optimizer = torch.optim.AdamW(model.param_groups(cfg.weight_decay), lr=cfg.lr)
    model, optimizer = accelerator.prepare(model, optimizer)
    progress = Progress()
    accelerator.register_for_checkpointing(progress)

    # -- resume: same data order, schedule and RNG state as an uninterrupted run
    extra = {"world_size": world, "resolved_num_workers": workers}  # they shape the data order too
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
    accelerator.print(f"{cfg.pos_embed}: {sum(p.numel() for p in model.parameters()):,} parameters, "
                      f"{world} process(es) x {batch_seqs} sequences x {cfg.max_seq_len} tokens, "
                      f"{spe} steps/epoch, {cfg.epochs} epochs, data {ddir}")

    # -- loop (a resumed run that had already finished keeps its results)
    done = run / "results.json"
    result = json.loads(done.read_text()) if progress.epoch >= cfg.epochs and done.is_file() else {}
    stopped = False
    unwrapped = accelerator.unwrap_model(model)
    for epoch in range(progress.epoch, cfg.epochs):
        model.train()
        t_epoch = time.perf_counter()
        batches = iter(train_loader(epoch)) if progress.step_in_epoch < spe else iter(())
        for _ in range(progress.step_in_epoch if progress.step_in_epoch < spe else 0):
            next(batches)  # resume mid-epoch: the same stream, skipping the steps already done
        bar = tqdm(total=spe, initial=progress.step_in_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   disable=not main, dynamic_ncols=True, leave=False)
        t_last, n_img, n_tok, eff_sum, n_steps, loss_sum = time.perf_counter(), 0, 0, 0.0, 0, 0.0
        while progress.step_in_epoch < spe:
            batch = next(batches).to(accelerator.device)
            lr = lr_at(progress.global_step, total_steps, warmup, cfg.lr, cfg.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            logits = model(batch)
            loss = F.cross_entropy(logits.float(), batch.labels)
            accelerator.backward(loss)
            if cfg.grad_clip > 0:
                accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            progress.step_in_epoch += 1
            progress.global_step += 1

            # -- throughput and metrics (this process's figures x processes)
            n_img += batch.num_images * world
            per_image = batch.tokens_per_image()  # patches the model sees (after token dropping)
            n_tok += int(torch.clamp(torch.round(per_image * (1 - cfg.token_drop)), min=1).sum()) * world
            eff_sum += batch.efficiency()
            loss_sum += loss.item()
            n_steps += 1
            bar.update(1)
            if progress.global_step % cfg.log_every == 0 or progress.step_in_epoch == spe:
                dt = time.perf_counter() - t_last
                row = dict(step=progress.global_step, epoch=epoch + progress.step_in_epoch / spe,
                           loss=loss_sum / n_steps, lr=lr, images_per_s=n_img / dt, tokens_per_s=n_tok / dt,
                           efficiency=eff_sum / n_steps)
                log.write(**row)
                accelerator.log({f"train/{k}": v for k, v in row.items() if k != "step"}, step=progress.global_step)
                bar.set_postfix(loss=f"{row['loss']:.3f}", img_s=f"{row['images_per_s']:.0f}",
                                tok_s=f"{row['tokens_per_s']:.0f}", eff=f"{row['efficiency']:.1%}")
                t_last, n_img, n_tok, eff_sum, n_steps, loss_sum = time.perf_counter(), 0, 0, 0.0, 0, 0.0
            stopping = bool(cfg.stop_after) and progress.global_step >= cfg.stop_after
            if progress.step_in_epoch < spe and progress.global_step % cfg.checkpoint_every == 0 and not stopping:
                save_checkpoint(accelerator, run, progress.global_step, cfg.keep_checkpoints)
            if stopping:
                stopped = True
                break
        bar.close()
        del batches
        if stopped:
            save_checkpoint(accelerator, run, progress.global_step, cfg.keep_checkpoints)
            accelerator.print(f"stopped after step {progress.global_step} (--stop-after); "
                              f"continue with --resume latest")
            break
        train_time = time.perf_counter() - t_epoch

        # -- evaluate at eval_res, every test image counted once over all processes
        correct, total = evaluate(unwrapped, ddir, (cfg.eval_res, cfg.eval_res), accelerator=accelerator,
                                  tokens_per_batch=batch_seqs * cfg.max_seq_len, mixed_precision=cfg.mixed_precision)
        result = dict(epoch=epoch + 1, step=progress.global_step, test_acc=correct / max(1, total),
                      test_correct=correct, test_images=total, eval_res=cfg.eval_res,
                      epoch_train_s=train_time, epoch_s=time.perf_counter() - t_epoch)
        log.write(**result)
        accelerator.log({"test/acc": result["test_acc"]}, step=progress.global_step)
        accelerator.print(f"epoch {epoch + 1}/{cfg.epochs}: test acc {result['test_acc']:.4f} "
                          f"({correct}/{total} at {cfg.eval_res}x{cfg.eval_res}), {train_time:.0f} s training")
        progress.epoch, progress.step_in_epoch = epoch + 1, 0
        save_checkpoint(accelerator, run, progress.global_step, cfg.keep_checkpoints)

    # -- end: the final model, rebuildable from config.json + model.safetensors alone
    if world > 1:
        print(f"rank {accelerator.process_index}: {progress.global_step} steps", flush=True)
    accelerator.wait_for_everyone()
    if not stopped and main:
        unwrapped.save_pretrained(run)
        (run / "results.json").write_text(json.dumps(result, indent=2) + "\n")
        accelerator.print(f"saved {run / 'model.safetensors'} and {run / 'config.json'}")
    log.close()
    accelerator.end_training()
    return result
