"""Train a packed NaViT on CIFAR or a folder of your own images with one positional encoding.

    accelerate launch train.py                                  # defaults: sincos, CIFAR-10, 16..48 px
    accelerate launch train.py --pos-embed rope_mixed --train-res 32 --epochs 50
    accelerate launch --num_processes 2 --cpu train.py ...      # several processes
    python train.py --resume latest --out runs/sincos_16-48     # continue a killed run
    accelerate launch train.py --dataset photos --resize budget:64   # data/prepare_images.py --name photos

Every flag is a field of navit_pe.trainer.TrainConfig; bad input prints one line, exits 2.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from navit_pe.launch import relaunch_cpu_multiprocess
from navit_pe.posenc import POS_EMBEDS
from navit_pe.cli import UsageError, check_out_dir
from navit_pe.trainer import Stopped, TrainConfig, TrainingError, check_config, check_data, train

HELP = {  # one line per TrainConfig field: what it does and its unit (tests check every field has one)
    # -- data
    "dataset": "dataset name: cifar10, cifar100, or the --name given to data/prepare_images.py "
               "(shards in DATA_ROOT/DATASET/)",
    "data_root": "directory holding the prepared datasets",
    "train_res": "training side in px (multiples of --patch-size): fixed '32' or a range '16:48' sampled per image",
    "aspect": "aspect ratio range w/h 'lo:hi' (e.g. 0.5:2), sampled log-uniformly; None: h and w drawn independently",
    "resize": "size policy 'budget:N': every image keeps its aspect ratio and is scaled to the largest size of "
              "at most N patches, in training and evaluation (replaces --train-res/--eval-res)",
    "eval_res": "side in px of the square test images evaluated after every epoch",
    "randaug_ops": "RandAugment operations per training image (0: no RandAugment)",
    "randaug_magnitude": "RandAugment magnitude bin, 0..30",
    "num_workers": "DataLoader workers per process; -1: none on a CPU-only machine of <= 4 cores, else 2",
    # -- model
    "pos_embed": f"positional encoding: {', '.join(POS_EMBEDS)}",
    "pool": "image pooling: cls (a CLS token), mean (mean of patch tokens) or attn (attention pooling)",
    "patch_size": "patch side in px",
    "dim": "transformer width (channels per token)",
    "depth": "number of transformer blocks",
    "heads": "attention heads per block",
    "mlp_ratio": "MLP hidden width as a multiple of --dim",
    "dropout": "dropout probability (0..1)",
    "max_seq_len": "tokens per packed sequence (patches + CLS of all images packed in it); a step packs its "
                   "images into as many sequences as it needs",
    "token_drop": "fraction of patches dropped per image in training (0..1)",
    "coord_shift": "coordinate augmentation: uniform offset per image and axis in [-S, S], in patches (0: off)",
    "coord_jitter": "coordinate augmentation: per-axis log-uniform scale in [1/J, J], a factor (1: off)",
    "coord_rescale": "coordinate augmentation: one log-uniform scale per image in [1/R, R], a factor (1: off)",
    # -- optimisation
    "epochs": "training epochs (passes over the training set)",
    "batch_images": "images per optimizer step, over all processes (an epoch has round(images / this) steps)",
    "lr": "peak learning rate (AdamW)",
    "min_lr": "learning rate at the end of the cosine schedule",
    "weight_decay": "AdamW weight decay (not on norms, biases, CLS token, RoPE frequencies)",
    "warmup_epochs": "epochs of linear learning-rate warmup (at most 5 %% of the run's steps)",
    "grad_clip": "maximum gradient norm (0: no clipping)",
    "mixed_precision": "auto (bf16 where the CPU/GPU has fast bf16, else fp32), no (fp32) or bf16 "
                       "(autocast; attention stays fp32)",
    "compile": "torch.compile the blocks' per-token parts: yes, no, or auto (yes for runs of >= 1000 steps; "
               "compiling takes about a minute on 2 cores)",
    "seed": "random seed (data order, augmentation, initialisation)",
    # -- run directory, checkpoints, logging
    "out": "run directory (default runs/<pos_embed>_<train_res or resize>)",
    "resume": "continue from 'latest' (the run's newest checkpoint) or a checkpoint directory",
    "checkpoint_every": "optimizer steps between checkpoints (one is also saved at every epoch end)",
    "keep_checkpoints": "number of newest checkpoints kept",
    "log_every": "optimizer steps between metric lines (metrics.jsonl, TensorBoard, progress bar)",
    "steps_per_epoch": "optimizer steps per epoch; 0: every training image once an epoch; >0: that many steps "
                       "of --batch-images images (short runs, tests)",
    "stop_after": "stop after this global step, with a checkpoint (0: never; for tests and time-boxed runs)",
}


def parse_args(argv=None) -> TrainConfig:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(TrainConfig):
        default = f.default
        kind = {int: int, float: float}.get(type(default), str)
        ap.add_argument("--" + f.name.replace("_", "-"), type=kind, default=default,
                        help=HELP[f.name] + f" (default: {default})")
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
    except TrainingError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 1
    except Stopped as e:  # SIGTERM or SIGINT while training: checkpointed first
        print(f"train.py: {e}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("train.py: interrupted; continue with --resume latest", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
