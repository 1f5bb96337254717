"""Evaluate trained runs on their test split at many resolutions (unseen ones included).

    python eval_resolutions.py runs/rope_16-48 runs/sincos_32               # default sweep
    python eval_resolutions.py runs/rope_16-48/checkpoints/step_00001000    # a checkpoint
    python eval_resolutions.py RUN --res 16,32,48 --aspect 16x32,32x16 --plots --out results/eval
    python eval_resolutions.py RUN --budgets 16,64,144,256,576              # token budgets, aspect kept
    python eval_resolutions.py RUN --pos-mode extrapolate,interpolate    # both test-time modes
    accelerate launch --num_processes 2 --cpu eval_resolutions.py RUN ...   # counts merged over ranks

Writes to --out: accuracy.md (the table, also printed), accuracy.csv, accuracy.json (counts per
cell and each run's metadata), accuracy.png, and with --plots learned_<run>.png per run; and
cells.jsonl, each cell as it finishes: a killed sweep run again with the same --out evaluates only
the cells it had not finished (a cell is reused only for the same weights, model config and
test-time mode, code, size, data, packing, torch version and device). Bad input prints one line and exits 2.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from navit_pe.cli import UsageError, check_out_dir
from navit_pe.launch import relaunch_cpu_multiprocess
from navit_pe.sweep import (CELLS_FILE, DEFAULT_ASPECTS, DEFAULT_SIDES, SweepError, check_resolutions, expand_modes,
                            label_runs, load_run, markdown_table, parse_budgets, parse_hw, parse_modes, parse_sides,
                            run_sweep, write_outputs)


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run directories or RUN/checkpoints/step_* directories")
    ap.add_argument("--res", default=None,
                    help="comma list of square sides in px, multiples of the patch size "
                         f"(default: {','.join(map(str, DEFAULT_SIDES))}, none with --budgets)")
    ap.add_argument("--aspect", default=None,
                    help="comma list of non-square HxW sizes in px, '' for none "
                         f"(default: {','.join(f'{h}x{w}' for h, w in DEFAULT_ASPECTS)}, none with --budgets)")
    ap.add_argument("--budgets", default="",
                    help="comma list of token budgets in patches per image, e.g. 16,64,144,256,576: every test "
                         "image keeps its aspect ratio, scaled to at most N patches (default: none)")
    ap.add_argument("--pos-mode", default="extrapolate",
                    help="comma list of test-time position modes, each its own row: extrapolate (the test "
                         "grid's positions as they are), interpolate (grids beyond the trained extent "
                         "scaled onto it) (default: %(default)s)")
    ap.add_argument("--data-root", default=None,
                    help="directory holding the prepared datasets (default: each run's data_root)")
    ap.add_argument("--out", default="results/eval", help="output directory for the table and plots "
                    "(default: %(default)s)")
    ap.add_argument("--max-seq-len", type=int, default=None,
                    help="tokens per packed sequence (default: the run's; raised where one image needs more)")
    ap.add_argument("--tokens-per-batch", type=int, default=None,
                    help="tokens per evaluation batch, all sequences together (default: as train.py evaluated "
                         "the run)")
    ap.add_argument("--max-images", type=int, default=0,
                    help="evaluate only the first N test images (in the split's order; 0: all) for a quick sweep")
    ap.add_argument("--num-workers", type=int, default=0,
                    help="DataLoader worker processes per process (default: %(default)s)")
    ap.add_argument("--plots", action="store_true",
                    help="also draw what each encoding learned (learned_<run>.png per run)")
    return ap


def columns(args: argparse.Namespace) -> list:
    """The sweep's columns: --res sides, --aspect sizes, --budgets token budgets; sides and sizes
    default to the standard sweep unless only --budgets is given."""
    budgets = parse_budgets(args.budgets)
    only_budgets = budgets and args.res is None and args.aspect is None
    res = "" if only_budgets else args.res if args.res is not None else ",".join(map(str, DEFAULT_SIDES))
    aspect = "" if only_budgets else args.aspect if args.aspect is not None else \
        ",".join(f"{h}x{w}" for h, w in DEFAULT_ASPECTS)
    return parse_sides(res) + parse_hw(aspect) + budgets


def main(argv=None) -> int:
    args = parse_args(argv)
    relaunch_cpu_multiprocess()  # `accelerate launch --num_processes N --cpu` alone starts one process
    from accelerate import Accelerator

    accelerator = Accelerator()
    main_proc = accelerator.is_main_process
    try:
        resolutions = columns(args)
        modes = parse_modes(args.pos_mode)
        if not resolutions:
            raise SweepError("no resolutions to evaluate (--res, --aspect and --budgets are all empty); "
                             "give e.g. --res 16,32 or --budgets 16,64")
        if args.max_images < 0:
            raise SweepError(f"--max-images must be 0 (all test images) or a positive count, got {args.max_images}")
        runs = [load_run(p) for p in args.runs]
        for r in runs:
            check_resolutions(resolutions, r.model.config.patch_size, str(r.path))
        label_runs(runs)
        models = runs
        runs = expand_modes(runs, modes)  # one row per (run, test-time mode)
        out = check_out_dir(Path(args.out))  # every process checks: no rank may fail alone mid-sweep
        sweep = run_sweep(runs, resolutions, accelerator=accelerator, data_root=args.data_root,
                          max_seq_len=args.max_seq_len, tokens_per_batch=args.tokens_per_batch,
                          max_images=args.max_images, num_workers=args.num_workers, progress=main_proc,
                          cells_file=out / CELLS_FILE)
        if main_proc:
            paths = write_outputs(sweep, out)
            print(markdown_table(sweep), end="")
            written = [paths[k] for k in ("md", "csv", "json", "png")]
            if args.plots:
                from navit_pe.visualize import plot_learned

                for r in models:
                    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", r.label).strip("_")
                    written.append(plot_learned(r.model, out / f"learned_{slug}.png", title=r.label))
            print("wrote " + ", ".join(str(p) for p in written))
    except UsageError as e:  # SweepError and the shared --out check
        if main_proc:
            print(f"eval_resolutions.py: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. the disk filling up while writing the outputs
        if main_proc:
            print(f"eval_resolutions.py: error: {e.strerror}: {e.filename}", file=sys.stderr)
        return 2
    finally:
        accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
