"""The table of scripts/accuracy_fixed32.sh: final test accuracy per precision and epochs, each seed
and mean ± std over seeds, from results/accuracy_fixed32/*/results.json; written to its README.md.

    python scripts/accuracy_table.py
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "results" / "accuracy_fixed32"


def main() -> int:
    runs = {}
    for res in sorted(ROOT.glob("*/results.json")):
        name = res.parent.name  # e.g. auto_6ep_s0
        prec, epochs, seed = name.split("_")
        cfg = json.loads((res.parent / "train_config.json").read_text())
        rows = [json.loads(x) for x in (res.parent / "metrics.jsonl").read_text().splitlines()]
        ep = [r["epoch_train_s"] for r in rows if "epoch_train_s" in r]
        runs.setdefault((prec, epochs), []).append(dict(
            seed=int(seed[1:]), acc=json.loads(res.read_text())["test_acc"], resolved=cfg.get("resolved_mixed_precision", "no"),
            compiled=cfg.get("compiled", False), commit=(res.parent / "commit").read_text().strip()[:12],
            epoch_s=statistics.fmean(ep) if ep else float("nan")))
    if not runs:
        print(f"accuracy_table.py: no results under {ROOT}", file=sys.stderr)
        return 2
    lines = ["| precision | epochs | seeds | test accuracy per seed (%) | mean ± std (%) | s per epoch (training) | commit |",
             "|---|---:|---|---|---:|---:|---|"]
    for (prec, epochs), rs in sorted(runs.items(), key=lambda kv: (int(kv[0][1].removesuffix("ep")), kv[0][0])):
        rs.sort(key=lambda r: r["seed"])
        accs = [100 * r["acc"] for r in rs]
        sd = f" ± {statistics.stdev(accs):.2f}" if len(accs) > 1 else ""
        label = {"fp32": "fp32 (--mixed-precision no)", "fp32at267bfa3": "fp32, code of 267bfa3 (before the speed work)",
                 "nocompile": "default, --compile no",
                 "spe398": "default, --steps-per-epoch 398 (267bfa3's steps, 128 images each)",
                 "torchdrop": "default, dropout bytes from torch's generator (as in 267bfa3; patch.diff)",
                 }.get(prec, f"default (auto -> {rs[0]['resolved']})")
        lines.append(f"| {label} | {epochs.removesuffix('ep')} | {','.join(str(r['seed']) for r in rs)} | "
                     f"{', '.join(f'{a:.2f}' for a in accs)} | {statistics.fmean(accs):.2f}{sd} | "
                     f"{statistics.fmean(r['epoch_s'] for r in rs):.0f} | {', '.join(sorted({r['commit'] for r in rs}))} |")
    table = "\n".join(lines)
    text = f"""# learned_1d at fixed 32x32, reference recipe: fp32 against the default precision

`bash scripts/accuracy_fixed32.sh && python scripts/accuracy_table.py` (the runs' own files are in the
sub-directories: train_config.json, metrics.jsonl, results.json, commit).

Recipe: `train.py --pos-embed learned_1d --train-res 32 --randaug-ops 0 --warmup-epochs 1
--batch-images 128 --max-seq-len 260 --epochs E --seed S --mixed-precision no|auto`, compiled
(`--compile auto`: runs of >= 1000 steps). The 267bfa3 row: the same flags with the train.py of
commit 267bfa3 (fp32, not compiled; its "epochs" are 398 steps of 128 images). The `spe398` and
`torchdrop` rows are the bisection of the gap between the seed-1 runs of 267bfa3 and of today's
code: 267bfa3's step count, and its source of dropout randomness. Test accuracy on the 10,000 CIFAR-10 test images at
32x32 after the last epoch. Machine: 2-core Intel Xeon (AVX-512 BF16, AMX), torch 2.13 CPU; the
two queues of the script ran side by side with one thread each, so the epoch times are those of
a shared machine, not of a quiet one.

Given the same weights and the same batch (dropout off), the model of today's code and that of
267bfa3 give bitwise the same logits and gradients (learned_1d, 128 images packed 4 to a sequence
of 260 tokens), and both read the same pixels from the shards; what differs is the order of the
images and the random draws (crop, flip, dropout). Over seeds 1 and 2, 267bfa3 gives 59.33 and
58.39 % (and 58.93 % with seed 0, the issue's run, not in this folder): 58.88 ± 0.47 % over the
three seeds, a range of 0.94 points, within which today's default (58.45, 58.52, 58.44 over
seeds 0-2) lies.

{table}
"""
    (ROOT / "README.md").write_text(text)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
