"""Train a packed NaViT on CIFAR with one positional encoding.

    accelerate launch train.py                                  # defaults: sincos, CIFAR-10, 16..48 px
    accelerate launch train.py --pos-embed rope_mixed --train-res 32 --epochs 50
    accelerate launch --num_processes 2 --cpu train.py ...      # several processes
    python train.py --resume latest --out runs/sincos_16-48     # continue a killed run

Every flag is a field of navit_pe.trainer.TrainConfig; bad input prints one line, exits 2.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from navit_pe.launch import relaunch_cpu_multiprocess
from navit_pe.posenc import POS_EMBEDS
from navit_pe.cli import UsageError, check_out_dir
from navit_pe.trainer import TrainConfig, check_config, check_data, train

HELP = {
    "pos_embed": f"positional encoding: {', '.join(POS_EMBEDS)}",
    "train_res": "training side in px: fixed '32' or a range '16:48' sampled per image",
    "aspect": "aspect ratio range w/h 'lo:hi', sampled log-uniformly (default: h, w independent)",
    "resume": "'latest' or a checkpoint directory",
    "out": "run directory (default runs/<pos_embed>_<train_res>)",
    "mixed_precision": "no or bf16",
    "token_drop": "fraction of patches dropped per image in training",
    "stop_after": "stop after this global step, with a checkpoint (for tests and time-boxed runs)",
    "num_workers": "DataLoader workers per process; -1: none on a CPU-only machine of <= 4 cores, else 2",
    "coord_shift": "coordinate augmentation: uniform offset per image and axis in [-S, S], in patches (0: off)",
    "coord_jitter": "coordinate augmentation: per-axis log-uniform scale in [1/J, J], a factor (1: off)",
    "coord_rescale": "coordinate augmentation: one log-uniform scale per image in [1/R, R], a factor (1: off)",
}


def parse_args(argv=None) -> TrainConfig:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(TrainConfig):
        default = f.default
        kind = {int: int, float: float}.get(type(default), str)
        ap.add_argument("--" + f.name.replace("_", "-"), type=kind, default=default,
                        help=HELP.get(f.name, "") + f" (default: {default})")
    ns = ap.parse_args(argv)
    return TrainConfig(**vars(ns))


def main(argv=None) -> int:
    cfg = parse_args(argv)
    try:
        # bad input fails here, once, before any further process is started
        check_config(cfg)
        check_out_dir(cfg.run_dir())
        check_data(cfg)
        relaunch_cpu_multiprocess()
        train(cfg)
    except UsageError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("train.py: interrupted; continue with --resume latest", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
