"""Benchmark: stream a prepared split through the reader (decode to PIL, no resize).

    .venv/bin/python bench/reader.py                  # data/cifar10 train, in-process and 1 worker
    .venv/bin/python bench/reader.py --workers 0 --split test
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from navit_pe.data import make_dataset  # noqa: E402
from navit_pe.prepare import DEFAULT_OUT  # noqa: E402


def run(root: Path, split: str, workers: int, batch: int) -> tuple[int, float]:
    """Images read and seconds taken with `workers` DataLoader workers (0: in-process)."""
    dataset = make_dataset(root, split, shuffle=True, seed=0)
    start = time.perf_counter()
    n = 0
    if workers == 0:
        for _image, _label in dataset:
            n += 1
    else:
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch, num_workers=workers,
                                             collate_fn=list)
        for samples in loader:
            n += len(samples)
    return n, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=DEFAULT_OUT / "cifar10")
    parser.add_argument("--split", default="train")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--batch", type=int, default=256, help="DataLoader batch (workers > 0)")
    args = parser.parse_args()
    for workers in args.workers:
        n, seconds = run(args.root, args.split, workers, args.batch)
        print(f"{args.split}: {n} images in {seconds:.2f} s = {n / seconds:,.0f} images/s "
              f"(num_workers={workers})")


if __name__ == "__main__":
    main()
