"""How far a study's records are from an earlier summary of the same runs (same seeds): for each
record in results/<protocol>/runs/ and each test-time mode, the largest and the mean absolute
difference in accuracy over the swept sizes, against the summary.json at a git revision.

    python scripts/rerun_agreement.py fca6d80                      # protocol cpu-short
    python scripts/rerun_agreement.py fca6d80 --protocol cpu-short

Used for the study's re-run: its first attempt lost its records but kept its summary (fca6d80).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from navit_pe.study import load_records

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("rev", help="git revision whose results/<protocol>/summary.json is compared")
    ap.add_argument("--protocol", default="cpu-short")
    args = ap.parse_args()
    show = subprocess.run(["git", "show", f"{args.rev}:results/{args.protocol}/summary.json"], cwd=ROOT,
                          capture_output=True, text=True)
    if show.returncode != 0:
        print(f"error: no summary at {args.rev}: {show.stderr.strip()}", file=sys.stderr)
        return 2
    # (encoding, regime, mode, seed) -> {size: accuracy}
    earlier = {}
    for row in json.loads(show.stdout)["rows"]:
        for size, cell in row["cells"].items():
            for seed, acc in zip(cell["seeds"], cell["values"]):
                earlier.setdefault((row["encoding"], row["regime"], row["mode"], seed), {})[size] = acc
    worst = 0.0
    for rec in load_records(ROOT / "results" / args.protocol):
        spec = rec["spec"]
        for mode, cells in rec["sweep"]["modes"].items():
            old = earlier.get((spec["encoding"], spec["regime"], mode, spec["seed"]))
            if old is None:
                print(f"{rec['name']:34s} {mode:12s} not in the earlier summary")
                continue
            diffs = {size: abs(cell["acc"] - old[size]) for size, cell in cells.items() if size in old}
            at = max(diffs, key=diffs.get)
            worst = max(worst, diffs[at])
            print(f"{rec['name']:34s} {mode:12s} max {100 * diffs[at]:.2f} points at {at}, "
                  f"mean {100 * sum(diffs.values()) / len(diffs):.2f} over {len(diffs)} sizes")
    print(f"largest difference: {100 * worst:.2f} points")
    return 0


if __name__ == "__main__":
    sys.exit(main())
