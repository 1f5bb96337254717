"""One bias per image against one shared bias (the sweep's setting), side by side in one process.

The encodings whose attention bias reads positions only (alibi_2d, lookhere, fire_2d) compute it
once for the images of one size in a bucket and broadcast it (`navit_pe.attention.shared_row`).
This times inference of one sweep batch at 96x96 (14 images, 8192 tokens, bf16 autocast as the
study's runs evaluate) both ways, alternating, and prints the median of the timed repeats. "One
bias per image" is the shared path switched off; alibi_2d's bias computed once per forward
(not per layer) stays on in both.

    python bench/shared_bias.py              # 1 thread, as each of the study's 2 jobs runs
    python bench/shared_bias.py --threads 2
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import navit_pe.attention as A
from navit_pe import NaViT, pack


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--repeats", type=int, default=4, help="timed repeats each way, after one untimed")
    ap.add_argument("--side", type=int, default=96, help="image side in px (a multiple of 4)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    n = 8192 // ((args.side // 4) ** 2 + 1)  # as many images as one sweep batch of 8192 tokens holds
    batch = pack([torch.randn(3, args.side, args.side, generator=g) for _ in range(n)], 4, 8192, cls_token=True)
    shared_row = A.shared_row
    for name in ("alibi_2d", "lookhere", "fire_2d"):
        torch.manual_seed(0)
        model = NaViT(name).eval()
        times: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(args.repeats + 1):
            for shared in (False, True):
                A.shared_row = shared_row if shared else (lambda ctx: None)
                with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                    t = time.perf_counter()
                    model(batch)
                    times[shared].append(time.perf_counter() - t)
        A.shared_row = shared_row
        per_image, one = (statistics.median(times[s][1:]) for s in (False, True))
        print(f"{name:9s} one bias per image {per_image:.2f} s, shared {one:.2f} s "
              f"({n} images of {args.side}x{args.side}, {args.threads} thread(s)): {per_image / one:.2f}x")


if __name__ == "__main__":
    main()
