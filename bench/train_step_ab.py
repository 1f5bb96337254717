"""Training steps of this checkout and of an older commit in ONE process, taking turns step by step.

`bench/train_speed.py` runs each version's train.py in its own process, one after the other; on
this VM the machine's speed drifts within a minute by more than the difference it measures
(ratios of single rounds ranged 1.54-2.06x at fixed 32x32 in one call). Here both versions' packages are imported
side by side (the old one from `git archive`, renamed `navit_pe_<commit>`) and their training
steps alternate, so a slow spell hits both alike. Each version does what its train.py does in a
step, with its own defaults:

  old : its streaming data path (shards read and JPEG-decoded per image, augmented, packed by
        the stream packer) -> fp32 forward, backward, AdamW;
  new : the RAM image store and epoch plan (augmented, packed) -> bf16 autocast where the CPU
        has it, blocks compiled (the default for runs of >= 1000 steps), fused AdamW.

A step's time includes making its batch. Images/s = images / seconds over the steps after
`--warmup` (which pay for compilation); the ratio is also taken block by block (`--block`
steps) for a spread. Which version goes first in a turn alternates. malloc's settings
(`keep_freed_memory`) are those that both versions' train.py apply.

    python bench/train_step_ab.py                                   # default mix and fixed 32x32
    python bench/train_step_ab.py --steps 100 --out results/bench/train_step_ab.json
"""
from __future__ import annotations

import argparse
import importlib
import io
import json
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from navit_pe.config import NaViTConfig  # noqa: E402
from navit_pe.cpu import cpu_name, keep_freed_memory  # noqa: E402
from navit_pe.data import ImageStore  # noqa: E402
from navit_pe.model import NaViT  # noqa: E402
from navit_pe.stages import EpochPlan, TrainBatches, steps_per_epoch  # noqa: E402
from navit_pe.trainer import resolve_precision  # noqa: E402
from navit_pe.transforms import ResolutionSampler, TrainTransform, parse_res  # noqa: E402
from train_speed import code_version  # noqa: E402  (bench/ is on sys.path when run as a script)

CONFIGS = {"default mix (16:48)": "16:48", "fixed 32x32": "32"}


def import_old(commit: str, into: Path):
    """The navit_pe package of `commit` as the module navit_pe_<commit> (its absolute
    `navit_pe.` imports made relative, so it never reaches into this checkout's package)."""
    name = f"navit_pe_{commit}"
    tar = subprocess.run(["git", "archive", commit, "navit_pe"], cwd=REPO, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        t.extractall(into, filter="data")
    (into / "navit_pe").rename(into / name)
    for f in (into / name).rglob("*.py"):  # every reference to the package by name, in any module
        f.write_text(re.sub(r"\bnavit_pe\b", name, f.read_text()))
    sys.path.insert(0, str(into))
    for mod in ("stages", "trainer", "model", "transforms", "config"):
        importlib.import_module(f"{name}.{mod}")
    outside = [m for m, v in sys.modules.items() if m.startswith(name)
               and getattr(v, "__file__", None) and not Path(v.__file__).is_relative_to(into)]
    if outside:
        raise SystemExit(f"train_step_ab.py: {outside} of the old package loaded from outside {into}")
    return name


class OldSteps:
    """The older train.py's step: its TrainStream (batch_seqs sequences sized from the sampler's
    mean tokens), fp32, AdamW."""

    def __init__(self, pkg: str, data: Path, res: str, seed: int):
        stages, trainer = (importlib.import_module(f"{pkg}.{m}") for m in ("stages", "trainer"))
        model_mod, tf = (importlib.import_module(f"{pkg}.{m}") for m in ("model", "transforms"))
        lo, hi = tf.parse_res(res, 4)
        sampler = tf.ResolutionSampler(lo, hi, 4, None)
        tok = trainer.mean_tokens(sampler, 4, True)
        batch_seqs = max(1, round(128 * tok / 256))
        per_step = batch_seqs * 256 * 0.98 / tok
        stream = stages.TrainStream(data, sampler, tf.TrainTransform(), 4, 256, batch_seqs, True, seed=seed,
                                    epoch=0, buffer_size=max(64, 4 * round(per_step)))
        self.batches = iter(stream)
        torch.manual_seed(seed)
        cfg = importlib.import_module(f"{pkg}.config").NaViTConfig(num_classes=10, max_seq_len=256)
        self.model = model_mod.NaViT(cfg).train()
        self.opt = torch.optim.AdamW(self.model.param_groups(1e-3), lr=1e-4)

    def step(self) -> int:
        batch = next(self.batches)
        loss = F.cross_entropy(self.model(batch).float(), batch.labels)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return batch.num_images


class NewSteps:
    """This checkout's train.py step with its defaults."""

    def __init__(self, store: ImageStore, res: str, seed: int):
        lo, hi = parse_res(res, 4)
        plan = EpochPlan(len(store), steps_per_epoch(len(store), 128), seed, 0)
        self.tb = TrainBatches(store, plan, ResolutionSampler(lo, hi, 4), TrainTransform(), 4, 256, True, seed, 0)
        self.i = 0
        torch.manual_seed(seed)
        self.model = NaViT(NaViTConfig(num_classes=10, max_seq_len=256)).compile_blocks().train()
        self.opt = torch.optim.AdamW(self.model.param_groups(1e-3), lr=1e-4, fused=True)
        self.bf16 = resolve_precision("auto") == "bf16"

    def step(self) -> int:
        batch = self.tb.batch(self.i % self.tb.plan.steps)
        self.i += 1
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.model(batch)
        loss = F.cross_entropy(logits.float(), batch.labels)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return batch.num_images


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", default="267bfa3", help="the commit to compare against")
    ap.add_argument("--steps", type=int, default=100, help="timed steps of each version per configuration")
    ap.add_argument("--warmup", type=int, default=15, help="untimed steps first (compilation, start-up)")
    ap.add_argument("--block", type=int, default=10, help="steps per block for the spread of the ratio")
    ap.add_argument("--data-root", default=str(REPO / "data"), help="prepared shards (both versions read them)")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="which configurations, comma-separated")
    ap.add_argument("--out", help="write the figures as JSON here")
    args = ap.parse_args(argv)
    data = Path(args.data_root).resolve() / "cifar10"
    if not (data / "meta.json").is_file():
        raise SystemExit(f"train_step_ab.py: no prepared CIFAR-10 under {args.data_root}; run python data/prepare_cifar.py")
    keep_freed_memory()
    store = ImageStore.load(data, "train")
    summary = {}
    with tempfile.TemporaryDirectory() as tmp:
        pkg = import_old(args.old, Path(tmp))
        for name, res in CONFIGS.items():
            if name not in args.configs.split(","):
                continue
            versions = {"old": OldSteps(pkg, data, res, 0), "new": NewSteps(store, res, 0)}
            times = {v: [] for v in versions}
            images = {v: [] for v in versions}
            for i in range(args.warmup + args.steps):
                order = ("old", "new") if i % 2 else ("new", "old")  # one step of each; who goes first alternates
                for v in order:
                    t = time.perf_counter()
                    n = versions[v].step()
                    if i >= args.warmup:
                        times[v].append(time.perf_counter() - t)
                        images[v].append(n)
            ips = {v: sum(images[v]) / sum(times[v]) for v in versions}
            blocks = [(sum(images["new"][b:b + args.block]) / sum(times["new"][b:b + args.block]))
                      / (sum(images["old"][b:b + args.block]) / sum(times["old"][b:b + args.block]))
                      for b in range(0, args.steps - args.block + 1, args.block)]
            summary[name] = {"old_images_per_s": ips["old"], "new_images_per_s": ips["new"],
                             "ratio": ips["new"] / ips["old"], "block_ratio_mean": statistics.fmean(blocks),
                             "block_ratio_std": statistics.stdev(blocks) if len(blocks) > 1 else 0.0,
                             "block_ratios": blocks, "old_images_per_step": statistics.fmean(images["old"]),
                             "new_images_per_step": statistics.fmean(images["new"])}
            s = summary[name]
            print(f"{name}: old {s['old_images_per_s']:.1f} images/s, new {s['new_images_per_s']:.1f} images/s, "
                  f"ratio {s['ratio']:.2f}x (blocks of {args.block} steps: {s['block_ratio_mean']:.2f} ± "
                  f"{s['block_ratio_std']:.2f})", flush=True)
            del versions
    info = {"machine": cpu_name(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "old": args.old, "new": code_version(),
            "command": " ".join(["python", "bench/train_step_ab.py", *(argv if argv is not None else sys.argv[1:])]),
            "steps": args.steps, "warmup": args.warmup, "block": args.block}
    print(f"{info['machine']}, torch {info['torch']}, {info['threads']} threads; {args.old} vs {info['new']}, "
          f"{args.steps} steps each after {args.warmup}, taking turns step by step in one process")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"info": info, "summary": summary}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
