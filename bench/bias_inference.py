"""Inference cost of the encodings with an attention bias, three ways, side by side in one process.

alibi_2d, lookhere and fire_2d add a bias to the attention logits, so their attention cannot run
on the plain flash kernel. This times one sweep batch (the batch `eval_resolutions.py` evaluates
at that size, packed as evaluation packs it, bf16 autocast as the study's runs evaluate) three
ways, taking turns, and prints the median of the timed repeats:

- per-image: the explicit softmax, each image's bias computed for itself;
- shared: the explicit softmax, one bias for the images of one size in a bucket, broadcast
  (`navit_pe.attention.shared_row`);
- kernel: the shared bias handed to SDPA's kernel as a float mask (what evaluation runs now,
  `navit_pe.attention.biased_attention` without autograd).

The three give the same logits (tested in tests/test_posenc.py); the bench checks it once more.

    python bench/bias_inference.py              # 1 thread, as each of the study's 2 jobs runs
    python bench/bias_inference.py --threads 2 --side 64
"""
from __future__ import annotations

import argparse
import statistics
import time
from contextlib import contextmanager

import torch

import navit_pe.attention as A
from navit_pe import NaViT, pack
from navit_pe.evaluate import seq_len_for
from navit_pe.sweep import train_tokens_per_batch

WAYS = ("per-image", "shared", "kernel")


@contextmanager
def way(name: str):
    """Switch navit_pe.attention to one of WAYS for the duration of the block."""
    shared_row, grad = A.shared_row, torch.is_grad_enabled()
    try:
        if name == "per-image":
            A.shared_row = lambda ctx: None
        # the explicit softmax is the path taken with autograd on; nothing here needs a gradient
        torch.set_grad_enabled(name != "kernel")
        yield
    finally:
        A.shared_row = shared_row
        torch.set_grad_enabled(grad)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--repeats", type=int, default=4, help="timed repeats each way, after one untimed")
    ap.add_argument("--side", type=int, default=96, help="image side in px, a multiple of the patch size (default 96)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for name in ("alibi_2d", "lookhere", "fire_2d"):
        torch.manual_seed(0)
        model = NaViT(name).eval()
        cfg = model.config
        for p in model.parameters():
            p.requires_grad_(False)  # autograd on records nothing: the explicit path costs only its own work
        cls = cfg.pool == "cls"
        seq = seq_len_for((args.side, args.side), cfg.patch_size, cfg.max_seq_len, cls)
        seqs = max(1, train_tokens_per_batch({}, cfg) // seq)  # sequences a sweep batch holds (evaluate.evaluate)
        n = seqs * (seq // ((args.side // cfg.patch_size) ** 2 + int(cls)))  # images in them (stages.EvalBatches)
        g = torch.Generator().manual_seed(0)
        batch = pack([torch.randn(3, args.side, args.side, generator=g) for _ in range(n)], cfg.patch_size, seq,
                     cls_token=cls)
        times: dict[str, list[float]] = {w: [] for w in WAYS}
        logits = {}
        for _ in range(args.repeats + 1):
            for w in WAYS:
                with way(w), torch.autocast("cpu", dtype=torch.bfloat16):
                    t = time.perf_counter()
                    logits[w] = model(batch).float()
                    times[w].append(time.perf_counter() - t)
        med = {w: statistics.median(times[w][1:]) for w in WAYS}
        diff = max((logits[w] - logits["per-image"]).abs().max().item() for w in WAYS)
        print(f"{name:9s} " + ", ".join(f"{w} {med[w]:.2f} s" for w in WAYS)
              + f" ({n} images of {args.side}x{args.side}, {args.threads} thread(s)): shared "
              f"{med['per-image'] / med['shared']:.2f}x, kernel {med['per-image'] / med['kernel']:.2f}x "
              f"per-image; largest logit difference {diff:.1e}", flush=True)


if __name__ == "__main__":
    main()
