"""Cost of attention per token against the image's length: the CPU flash kernel behind
F.scaled_dot_product_attention, forward + backward, in the model's shapes (4 heads of 32).

Why the packed mix costs more per token than a 32x32 batch: attention per token grows with
the length of the token's own image. One row per length: a batch of ~4,000 tokens of images of
that length, q, k, v strided views of one qkv tensor as in the model.

    python bench/attention.py --out results/bench/attention_cpu.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from navit_pe.cpu import keep_freed_memory

LENGTHS = [17, 26, 37, 50, 65, 82, 97, 122, 145, 170, 197, 257]


def seconds(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4000, help="tokens per timed call (images x length)")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=20, help="timed calls per length (median reported)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    keep_freed_memory()
    torch.manual_seed(0)
    h, d, rows = args.heads, args.head_dim, []
    print(f"{'length':>6} {'images':>6} {'fwd+bwd us/token':>17} {'fwd us/token':>13}")
    for n in LENGTHS:
        b = max(1, args.tokens // n)
        qkv = torch.randn(b, n, 3, h, d, requires_grad=True)
        grad = torch.randn(b, h, n, d)

        def train_step():
            q, k, v = qkv.permute(2, 0, 3, 1, 4)  # "b n three h d -> three b h n d"
            F.scaled_dot_product_attention(q, k, v).backward(grad)

        def forward():
            with torch.no_grad():
                F.scaled_dot_product_attention(*qkv.permute(2, 0, 3, 1, 4))

        t_train, t_fwd = seconds(train_step, args.repeats), seconds(forward, args.repeats)
        rows.append(dict(length=n, images=b, train_us_per_token=1e6 * t_train / (b * n),
                         forward_us_per_token=1e6 * t_fwd / (b * n)))
        print(f"{n:6d} {b:6d} {rows[-1]['train_us_per_token']:17.3f} {rows[-1]['forward_us_per_token']:13.3f}")
    info = dict(torch=torch.__version__, threads=torch.get_num_threads(), args=vars(args))
    print(f"torch {info['torch']}, {info['threads']} threads")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(dict(rows=rows, info=info), indent=2) + "\n")


if __name__ == "__main__":
    main()
