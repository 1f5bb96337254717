"""train.py images/s: this checkout against an older commit, side by side in one run.

Both versions train on the same prepared shards (`--data-root`), each with its own defaults
(so the comparison includes each version's default precision, compilation and data path), at
the default 16..48 mix and at fixed 32x32. The versions take turns run by run (old, new, old,
new, ...) so a slow spell of the machine hits both; each run trains `--steps` steps and its
images/s is taken over the steps after `--warmup` (which pay for start-up and compilation), from
its metrics.jsonl. The older commit is checked out into a temporary git worktree.

    python bench/train_speed.py                                   # against 267bfa3, 2 rounds
    python bench/train_speed.py --rounds 3 --out results/bench/train_speed.json
    python bench/train_speed.py --new-processes 2                 # this checkout as 2 CPU processes
                                                                  # (accelerate launch, the cores shared out)
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from navit_pe.cpu import cpu_name

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"default mix (16:48)": [], "fixed 32x32": ["--train-res", "32"]}


def code_version() -> str:
    """This checkout's short commit, "+dirty" where the code (navit_pe/, train.py, bench/) has
    uncommitted changes (results and docs do not count)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "navit_pe", "train.py", "bench")
    return git("rev-parse", "--short", "HEAD") + ("+dirty" if dirty else "")


def one_run(code: Path, data_root: Path, args: list[str], steps: int, warmup: int, log_every: int,
            processes: int = 1) -> dict:
    """Train `steps` steps with the train.py in `code` (as `processes` CPU processes under accelerate
    launch where > 1); images/s over the steps after `warmup`, summed over the processes."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes), "--cpu"] \
            if processes > 1 else [sys.executable]
        cmd = [*launch, str(code / "train.py"), "--data-root", str(data_root), "--out", str(out),
               "--stop-after", str(steps), "--log-every", str(log_every), *args]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=code, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"train_speed.py: {' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "images_per_s" in r]
    steady = [r for r in rows if r["step"] > warmup]
    # rows of equal step counts and about equal images: the harmonic mean is images / seconds
    first = rows[0]["images_per_s"] if rows else float("nan")
    return {"images_per_s": statistics.harmonic_mean([r["images_per_s"] for r in steady]),
            "first_rows_images_per_s": first, "wall_s": wall, "steady_rows": len(steady)}


def data_ms_per_step(data_root: Path, train_res: str, steps: int = 10) -> float:
    """This checkout's data path alone (ImageStore -> plan -> augment -> pack), ms per default step."""
    from navit_pe.data import ImageStore
    from navit_pe.stages import EpochPlan, TrainBatches
    from navit_pe.transforms import ResolutionSampler, TrainTransform, parse_res

    store = ImageStore.load(data_root / "cifar10", "train")
    plan = EpochPlan(len(store), round(len(store) / 128), seed=0, epoch=0)
    lo, hi = parse_res(train_res, 4)
    batches = TrainBatches(store, plan, ResolutionSampler(lo, hi, 4), TrainTransform(), 4, 256, True, 0, 0)
    batches.batch(0)
    t = time.perf_counter()
    for step in range(1, steps + 1):
        batches.batch(step)
    return (time.perf_counter() - t) / steps * 1000


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", default="267bfa3", help="the commit to compare against")
    ap.add_argument("--rounds", type=int, default=2, help="runs of each version per configuration")
    ap.add_argument("--steps", type=int, default=80, help="training steps per run")
    ap.add_argument("--warmup", type=int, default=20, help="steps left out of the figure (start-up, compilation)")
    ap.add_argument("--log-every", type=int, default=10, help="steps per metrics line")
    ap.add_argument("--data-root", default=str(REPO / "data"), help="prepared shards, shared by both versions")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="which configurations, comma-separated")
    ap.add_argument("--new-processes", type=int, default=1,
                    help="run this checkout's train.py as N CPU processes (accelerate launch --num_processes N "
                         "--cpu: data parallel, the cores shared out); the old commit runs as one")
    ap.add_argument("--out", help="write the figures as JSON here")
    args = ap.parse_args(argv)
    if args.warmup % args.log_every or args.steps <= args.warmup:
        raise SystemExit("train_speed.py: --warmup must be a multiple of --log-every and below --steps")
    data_root = Path(args.data_root).resolve()
    if not (data_root / "cifar10" / "meta.json").is_file():
        raise SystemExit(f"train_speed.py: no prepared CIFAR-10 under {data_root}; run python data/prepare_cifar.py")
    configs = [c for c in CONFIGS if c in args.configs.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "old"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(old), args.old], cwd=REPO, check=True)
        try:
            results = {c: {"old": [], "new": []} for c in configs}
            for r in range(args.rounds):
                for c in configs:
                    for name, code in (("old", old), ("new", REPO)):
                        res = one_run(code, data_root, CONFIGS[c], args.steps, args.warmup, args.log_every,
                                      args.new_processes if name == "new" else 1)
                        results[c][name].append(res)
                        print(f"round {r + 1}, {c}, {name}: {res['images_per_s']:.1f} images/s "
                              f"(first {args.log_every} steps {res['first_rows_images_per_s']:.1f}, "
                              f"wall {res['wall_s']:.0f} s)", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=REPO)
    data_ms = {c: data_ms_per_step(data_root, "32" if CONFIGS[c] else "16:48") for c in configs}
    summary = {}
    for c in configs:
        o = [x["images_per_s"] for x in results[c]["old"]]
        n = [x["images_per_s"] for x in results[c]["new"]]
        ratios = [b / a for a, b in zip(o, n)]  # each round's pair, run one after the other
        summary[c] = {"old_images_per_s": statistics.fmean(o), "new_images_per_s": statistics.fmean(n),
                      "ratio": statistics.fmean(ratios), "ratio_std": statistics.stdev(ratios) if len(ratios) > 1 else 0.0,
                      "ratios": ratios, "new_data_ms_per_step": data_ms[c],
                      "new_data_share": data_ms[c] / 1000 * statistics.fmean(n) / 128}
    info = {"machine": cpu_name(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "old": args.old, "new": code_version(),
            "command": " ".join(["python", "bench/train_speed.py", *(argv if argv is not None else sys.argv[1:])]),
            "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds, "new_processes": args.new_processes}
    print(f"\n{info['machine']}, torch {info['torch']}, {info['threads']} threads; "
          f"{args.old} vs {info['new']}, {args.rounds} rounds of {args.steps} steps (first {args.warmup} left out)")
    for c, s in summary.items():
        print(f"{c}: old {s['old_images_per_s']:.1f} images/s, new {s['new_images_per_s']:.1f} images/s, "
              f"ratio {s['ratio']:.2f} ± {s['ratio_std']:.2f}x; new data path alone {s['new_data_ms_per_step']:.0f} "
              f"ms a step = {100 * s['new_data_share']:.0f} % of a new step")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"info": info, "summary": summary, "runs": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
