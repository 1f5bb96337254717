"""The cost of one training step for each positional encoding, relative to `none`.

Same model (dim 128, depth 6, 4 heads, dropout 0.1), the same packed batch of the default mix
(128 images, sides 16..48 px drawn independently), full training steps (forward, backward,
AdamW), with the blocks compiled as train.py compiles them (`--compile no`: eager). The
encodings take turns step by step inside one process, so a slow spell of the machine hits all
of them alike; each reports its median step time over `--steps` timed steps after
`--warmup`, and the ratio to `none`.

    python bench/posenc_cost.py                                   # every registered encoding
    python bench/posenc_cost.py --pos-embed none,rope,alibi_2d --out results/bench/posenc_cost.json
    python bench/posenc_cost.py --compile no                      # eager blocks
    python bench/posenc_cost.py --pos-embed sincos,relative --explicit-too  # + relative on the explicit softmax
    python bench/posenc_cost.py --eval-side 96                    # inference of 64 images of 96x96 instead
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from navit_pe import NaViT
from navit_pe.cpu import keep_freed_memory
from navit_pe.packing import pack
from navit_pe.posenc import POS_EMBEDS, REGISTRY
from navit_pe.trainer import resolve_precision


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pos-embed", default=",".join(POS_EMBEDS), help="comma list of encodings ('none' is added)")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per encoding")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per encoding first")
    ap.add_argument("--mixed-precision", default="auto", choices=["auto", "no", "bf16"],
                    help="as train.py's flag (auto: bf16 where the CPU has native bf16)")
    ap.add_argument("--compile", default="yes", choices=["yes", "no"],
                    help="torch.compile the blocks' per-token parts as train.py does (default yes; the "
                         "warm-up steps then include the compilation)")
    ap.add_argument("--explicit-too", action="store_true",
                    help="also time each encoding that widens q, k, v for the flash kernel (relative) on the "
                         "explicit softmax instead, as '<name>/explicit' (with that path's bucket granularity)")
    ap.add_argument("--eval-side", type=int, default=0,
                    help="time inference instead (eval mode, no gradients) of 64 images of this side in px, "
                         "as the resolution sweep runs it (default 0: training steps of the default mix)")
    ap.add_argument("--out", help="write the figures as JSON here")
    args = ap.parse_args(argv)
    names = list(dict.fromkeys(["none", *[n for n in args.pos_embed.split(",") if n]]))
    unknown = [n for n in names if n not in POS_EMBEDS]
    if unknown:
        raise SystemExit(f"posenc_cost.py: unknown encoding {unknown[0]!r}; choose from {', '.join(POS_EMBEDS)}")
    keep_freed_memory()
    precision = resolve_precision(args.mixed_precision)
    rng, g = random.Random(0), torch.Generator().manual_seed(0)
    if args.eval_side < 0 or args.eval_side % 4:
        raise SystemExit(f"posenc_cost.py: --eval-side must be 0 (training steps) or a positive multiple of 4 px, got {args.eval_side}")
    if args.eval_side:
        images = [torch.randn(3, args.eval_side, args.eval_side, generator=g) for _ in range(64)]
    else:
        sides = list(range(16, 49, 4))
        images = [torch.randn(3, rng.choice(sides), rng.choice(sides), generator=g) for _ in range(128)]
    seq = max(256, (args.eval_side // 4) ** 2 + 1)
    batch = pack(images, 4, seq, [i % 10 for i in range(len(images))], cls_token=True)
    variants = [(name, name) for name in names]  # (label, encoding)
    if args.explicit_too:
        variants += [(f"{n}/explicit", n) for n in names if REGISTRY[n].widens_attention]
    runs = {}
    for label, name in variants:
        torch.manual_seed(0)
        model = NaViT(name).train(not args.eval_side)
        if label.endswith("/explicit"):
            model.pos.widens_attention = False  # the explicit softmax bucket by bucket (and its granularity)
        if args.compile == "yes":
            model.compile_blocks()
        runs[label] = (model, None if args.eval_side else torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True))

    def step(name: str) -> float:
        model, opt = runs[name]
        t = time.perf_counter()
        if args.eval_side:
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                model(batch)
            return time.perf_counter() - t
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = model(batch)
        F.cross_entropy(logits.float(), batch.labels).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    for _ in range(args.warmup):
        for name in runs:
            step(name)
    times = {name: [] for name in runs}
    for _ in range(args.steps):
        for name in runs:
            times[name].append(step(name))
    med = {name: statistics.median(ts) for name, ts in times.items()}
    info = dict(machine=f"{os.cpu_count()} cores", torch=torch.__version__, threads=torch.get_num_threads(),
                precision=precision, compiled=args.compile == "yes", eval_side=args.eval_side, steps=args.steps, warmup=args.warmup,
                command="python bench/posenc_cost.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    print(f"{info['machine']}, torch {info['torch']}, {info['threads']} threads, {precision}, "
          f"{'compiled' if info['compiled'] else 'eager'} blocks, "
          + (f"inference of {batch.num_images} images of {args.eval_side}x{args.eval_side}" if args.eval_side else
             f"training steps on {batch.num_images} images of the default mix") + f", median of {args.steps} steps")
    for name in runs:
        print(f"{name:18s} {1000 * med[name]:7.1f} ms/step  {med[name] / med['none']:.2f}x none")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(dict(info=info, median_s=med, ratio_to_none={
            n: med[n] / med["none"] for n in runs}, steps_s=times), indent=2) + "\n")


if __name__ == "__main__":
    main()
