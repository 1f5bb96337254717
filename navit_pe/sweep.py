"""Evaluate trained runs on a sweep of resolutions; write the table, CSV, JSON and plot.

    runs = [load_run(p) for p in paths]        # run dirs or RUN/checkpoints/step_* dirs
    runs = expand_modes(runs, ["extrapolate", "interpolate"])  # one entry per (run, test-time mode)
    sweep = run_sweep(runs, resolutions, accelerator=acc, cells_file=out_dir / CELLS_FILE)
    write_outputs(sweep, out_dir)             # accuracy.{md,csv,json,png}

A cell is (correct, total) over the whole test split with every image resized to (h, w) and
packed as in training (`navit_pe.evaluate.evaluate`), so the cell at a run's eval_res equals
train.py's own final test accuracy. Every (run, pos_mode) pair is its own row of the table, CSV
and JSON and its own line of the plot; an encoding whose two modes are the same is evaluated
once ("both modes"), and an interpolate cell whose grid lies inside the trained extent is taken
from the extrapolate cell of the same weights (interpolation moves no position there). Bad input
raises `SweepError` (one line for the CLI). With a `cells_file`, every finished cell is appended
to it under a key of everything its counts depend on (the weights' and the code's digests, the
model config with its test-time mode, the size, the data, the packing, torch and the device), and
cells already there are not evaluated again: a killed sweep goes on where it stopped.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import torch

from .cli import UsageError, check_out_dir
from .config import NaViTConfig
from .data import DataError, ensure_prepared
from .evaluate import evaluate
from .model import NaViT
from .positions import POS_MODES, interpolation_moves
from .transforms import TokenBudget, parse_aspect, parse_res, parse_resize

Res = tuple[int, int]  # (h, w) in pixels


@dataclass(frozen=True)
class Budget:
    """A sweep column where every test image keeps its aspect ratio and gets at most `tokens`
    patches (the TokenBudget size policy, train.py's --resize budget:N)."""

    tokens: int


Column = Res | Budget

DEFAULT_SIDES = (8, 16, 24, 32, 40, 48, 56, 64, 72, 80, 88, 96)  # 96 px = 24x24 patches, 577 tokens with CLS
DEFAULT_ASPECTS: tuple[Res, ...] = ((16, 32), (32, 16), (16, 64), (64, 16), (32, 64), (64, 32))


class SweepError(UsageError):
    """Bad input (a run that cannot be loaded, a bad resolution): one line, exit code 2."""


# ----------------------------------------------------------------------------- resolutions
def parse_sides(spec: str) -> list[Res]:
    """"16,32,48" -> [(16, 16), (32, 32), (48, 48)]."""
    try:
        sides = [int(s) for s in spec.split(",") if s.strip()]
    except ValueError:
        raise SweepError(f"--res {spec!r}: expected a comma list of sides, e.g. 16,32,48") from None
    if any(s <= 0 for s in sides):
        raise SweepError(f"--res {spec!r}: sides must be positive")
    return [(s, s) for s in sides]


def parse_hw(spec: str) -> list[Res]:
    """"16x32,32x16" -> [(16, 32), (32, 16)] (height x width); "" -> []."""
    out = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        m = re.fullmatch(r"(\d+)\s*[xX]\s*(\d+)", item)
        if not m or int(m[1]) <= 0 or int(m[2]) <= 0:
            raise SweepError(f"--aspect {spec!r}: expected a comma list of HxW, e.g. 16x32,32x16")
        out.append((int(m[1]), int(m[2])))
    return out


def parse_budgets(spec: str) -> list[Budget]:
    """"16,64,144" -> [Budget(16), Budget(64), Budget(144)] (patches per image); "" -> []."""
    try:
        tokens = [int(s) for s in spec.split(",") if s.strip()]
    except ValueError:
        raise SweepError(f"--budgets {spec!r}: expected a comma list of token counts, e.g. 16,64,144,256") from None
    if any(t < 1 for t in tokens):
        raise SweepError(f"--budgets {spec!r}: token budgets must be at least 1, e.g. 16,64,144,256")
    return [Budget(t) for t in tokens]


def parse_modes(spec: str) -> list[str]:
    """"extrapolate,interpolate" -> ["extrapolate", "interpolate"]."""
    modes = [m.strip() for m in spec.split(",") if m.strip()]
    bad = [m for m in modes if m not in POS_MODES]
    if bad or not modes:
        raise SweepError(f"--pos-mode {spec!r}: choose one or more of {', '.join(POS_MODES)} (comma list)")
    return list(dict.fromkeys(modes))



def res_key(res: Column) -> str:
    return f"budget:{res.tokens}" if isinstance(res, Budget) else f"{res[0]}x{res[1]}"


def size_policy(res: Column, patch_size: int) -> Res | TokenBudget:
    """What evaluate() takes for a column: a fixed (h, w) or the budget's size policy."""
    return TokenBudget(res.tokens, patch_size) if isinstance(res, Budget) else res


def check_resolutions(resolutions: Sequence[Column], patch_size: int, where: str) -> None:
    for res in resolutions:
        if isinstance(res, Budget):
            continue
        h, w = res
        if h % patch_size or w % patch_size:
            raise SweepError(f"resolution {h}x{w} is not a multiple of the patch size {patch_size} of {where}")


# ----------------------------------------------------------------------------- runs
@dataclass
class Run:
    path: Path  # as given: a run directory or one of its checkpoints
    run_dir: Path  # the directory holding config.json and train_config.json
    step: int | None  # checkpoint step, None for the final model
    train: dict  # train_config.json
    model: NaViT
    label: str = ""
    pos_mode: str = "extrapolate"  # test-time position mode this entry is evaluated with
    modes_same: bool = False  # the encoding's two modes are identical: this entry stands for both
    weights_digest: str = ""  # digest of the weights file's bytes as loaded (a sweep cell's key); "": hash the file

    @property
    def train_range(self) -> tuple[int, int]:
        return parse_res(self.train["train_res"], self.model.config.patch_size)

    @property
    def aspect(self) -> tuple[float, float] | None:
        return parse_aspect(self.train.get("aspect"))

    def in_train_range(self, res: Column) -> bool:
        """Both sides in [lo, hi]; for aspect-sampled runs the area in [lo^2, hi^2] and w/h in
        the sampled ratio range (a little slack for the rounding of sampled sides); for runs
        trained with --resize budget:N, the column of that budget only."""
        if isinstance(res, Budget) or self.train.get("resize"):
            budget = parse_resize(self.train.get("resize"), self.model.config.patch_size)
            return isinstance(res, Budget) and budget is not None and res.tokens == budget.budget
        lo, hi = self.train_range
        h, w = res
        if self.aspect is None:
            return lo <= h <= hi and lo <= w <= hi
        a_lo, a_hi = self.aspect
        eps = 1e-9
        return lo * lo <= h * w <= hi * hi and a_lo - eps <= w / h <= a_hi + eps

    def regime(self) -> str:
        """'@16:48', '@32', '@16:48 ar0.5:2'."""
        s = f"@{self.train.get('resize') or self.train['train_res']}"
        return s + f" ar{self.train['aspect']}" if self.train.get("aspect") else s

    def metadata(self) -> dict:
        final = self.run_dir / "results.json"
        train_result = json.loads(final.read_text()) if final.is_file() and self.step is None else None
        cfg = self.model.config
        return dict(label=self.label, path=str(self.path), run_dir=str(self.run_dir), checkpoint_step=self.step,
                    pos_embed=cfg.pos_embed, pos_mode="both" if self.modes_same else self.pos_mode,
                    trained_extent=self.model.pos.trained_extent.tolist(), train_res=self.train["train_res"],
                    aspect=self.train.get("aspect"),
                    dataset=self.train["dataset"], mixed_precision=self.train.get("mixed_precision", "no"),
                    eval_res=self.train.get("eval_res"), patch_size=cfg.patch_size,
                    model_config={**cfg.to_dict(), "pos_mode": self.pos_mode}, train_config=self.train,
                    train_result=train_result)


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise SweepError(f"{path} not found ({what})") from None
    except ValueError as e:
        raise SweepError(f"{path} is not valid JSON ({e})") from None


def load_run(path: str | Path) -> Run:
    """A run directory, or a checkpoint RUN/checkpoints/step_N (config from RUN, weights from it)."""
    path = Path(path)
    if not path.is_dir():
        raise SweepError(f"run {path} does not exist or is not a directory")
    is_ckpt = path.parent.name == "checkpoints" and not (path / "config.json").is_file()
    run_dir = path.parent.parent if is_ckpt else path
    step = None
    if is_ckpt:
        m = re.fullmatch(r"step_(\d+)", path.name)
        step = int(m[1]) if m else None
    cfg_dict = _read_json(run_dir / "config.json", "the model config of the run")
    train = _read_json(run_dir / "train_config.json", "the training config of the run")
    try:
        cfg = NaViTConfig.from_dict(cfg_dict)
        model = NaViT(cfg)
    except (TypeError, ValueError) as e:
        raise SweepError(f"cannot rebuild the model of {run_dir} from config.json: {e}") from None
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise SweepError(f"{weights} not found (no trained weights in {path})")
    digest = load_weights(model, weights)
    missing = [k for k in ("dataset", "data_root", "train_res") if k not in train]
    if missing:
        raise SweepError(f"{run_dir / 'train_config.json'} lacks {missing}")
    try:
        parse_res(train["train_res"], cfg.patch_size)
        parse_aspect(train.get("aspect"))
        parse_resize(train.get("resize"), cfg.patch_size)
    except ValueError as e:
        raise SweepError(f"{run_dir / 'train_config.json'}: {e}") from None
    model.eval()
    return Run(path, run_dir, step, train, model, weights_digest=digest)


def load_weights(model: NaViT, weights: Path) -> str:
    """Load `weights` into `model`; returns the digest of the bytes loaded (read once)."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        data = weights.read_bytes()
        model.load_state_dict(load(data))
    except (SafetensorError, OSError, KeyError) as e:  # KeyError: a dtype safetensors' torch loader lacks
        raise SweepError(f"cannot read {weights}: {e}") from None
    except RuntimeError as e:  # missing / unexpected keys, shape mismatches
        first = str(e).strip().splitlines()
        raise SweepError(f"{weights} does not fit the model of config.json: "
                         f"{' '.join(s.strip() for s in first[:2])}") from None
    return _digest_bytes(data)


def label_runs(runs: Sequence[Run]) -> None:
    """'rope_mixed @16:48' (+ ' step N' for checkpoints); duplicates get the directory name."""
    for r in runs:
        r.label = f"{r.model.config.pos_embed} {r.regime()}" + (f" step {r.step}" if r.step is not None else "")
    seen: dict[str, int] = {}
    for r in runs:
        seen[r.label] = seen.get(r.label, 0) + 1
    for r in runs:
        if seen[r.label] > 1:
            r.label += f" ({r.run_dir.name})"


def expand_modes(runs: Sequence[Run], modes: Sequence[str]) -> list[Run]:
    """One entry per (run, mode), sharing the run's model; an encoding whose modes are the same
    gets one entry. With several modes the labels say which: 'rope @16:48, interpolate'."""
    out = []
    for r in runs:
        same = r.model.pos.same_in_both_modes and len(modes) > 1
        for mode in modes[:1] if same else modes:
            suffix = ", both modes" if same else (f", {mode}" if len(modes) > 1 else "")
            out.append(replace(r, label=r.label + suffix, pos_mode=mode, modes_same=same))
    return out


def train_tokens_per_batch(train: dict, cfg: NaViTConfig) -> int:
    """Tokens per eval batch as train.py used them (same packing, so the accuracy at eval_res
    equals the run's own to the last digit)."""
    return max(8192, int(train.get("max_seq_len", cfg.max_seq_len)))


def train_precision(train: dict) -> str:
    """The precision the run trained (and evaluated) in: --mixed-precision auto resolved."""
    return train.get("resolved_mixed_precision", train.get("mixed_precision", "no"))


def data_dir(run: Run, data_root: str | None = None) -> Path:
    """The prepared test data of `run` (its dataset under `data_root` or the run's own data_root)."""
    try:
        return ensure_prepared(data_root or run.train["data_root"], run.train["dataset"])
    except DataError as e:
        raise SweepError(str(e)) from None


# ----------------------------------------------------------------------------- the sweep
@dataclass
class Sweep:
    runs: list[Run]
    resolutions: list[Column]  # (h, w) sizes and token budgets
    cells: dict[tuple[int, Res], tuple[int, int]] = field(default_factory=dict)  # (run index, res) -> (correct, total)
    num_processes: int = 1  # processes whose counts were summed
    max_images: int = 0  # only the first N test images were evaluated (0: all)

    def acc(self, i: int, res: Res) -> float:
        correct, total = self.cells[i, res]
        return correct / max(1, total)


CELLS_FILE = "cells.jsonl"  # in eval_resolutions.py's --out: the finished cells of the sweep(s) there


def _digest_bytes(*chunks: bytes) -> str:
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()[:16]


def code_digest() -> str:
    """A digest of the package's source: a changed model or evaluation gives new cell keys."""
    return _digest_bytes(*(p.read_bytes() for p in sorted(Path(__file__).resolve().parent.rglob("*.py"))))


def data_stamp(ddir: Path) -> str:
    """The prepared data's place and its files' names, sizes and times: data prepared again is new data."""
    files = sorted(f for f in Path(ddir).resolve().iterdir() if f.is_file())
    stat = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return f"{Path(ddir).resolve()}:{hashlib.sha256(repr(stat).encode()).hexdigest()[:16]}"


def read_cells(path: Path) -> dict[str, tuple[int, int]]:
    """key -> (correct, total) from a cells file; a line torn by a kill is skipped."""
    cells = {}
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
                cells[rec["key"]] = (int(rec["correct"]), int(rec["total"]))
            except (ValueError, KeyError, TypeError):
                continue
    return cells


def append_cell(path: Path, key: str, counts: tuple[int, int]) -> None:
    """One line per cell, flushed at once; after a line torn by a kill, on a line of its own."""
    with open(path, "ab+") as f:
        torn = f.tell() > 0 and (f.seek(-1, 2), f.read(1))[1] != b"\n"
        f.write((("\n" if torn else "") + json.dumps(dict(key=key, correct=counts[0], total=counts[1])) + "\n").encode())


def same_as_extrapolate(model, res: Column) -> bool:
    """Whether pos_mode "interpolate" evaluates `res` exactly as "extrapolate" does: a fixed size
    whose patch grid interpolation does not move (tests/test_positions.py checks the logits are equal)."""
    if isinstance(res, Budget):  # grids vary with each image's aspect ratio
        return False
    p = model.config.patch_size
    return not interpolation_moves((res[0] // p, res[1] // p), model.pos.trained_extent)


def run_sweep(runs: Sequence[Run], resolutions: Sequence[Column], *, accelerator=None, data_root: str | None = None,
              max_seq_len: int | None = None, tokens_per_batch: int | None = None, max_images: int = 0,
              num_workers: int = 0, progress: bool = True, cells_file: Path | None = None) -> Sweep:
    """Every (run, resolution) cell; with `cells_file`, those already in it are taken from it and
    each newly evaluated one is appended to it (by the main process) as soon as it is done."""
    from tqdm.auto import tqdm

    for r in runs:
        check_resolutions(resolutions, r.model.config.patch_size, str(r.path))
    ddirs = [data_dir(r, data_root) for r in runs]  # all data found before any evaluation
    sweep = Sweep(list(runs), list(resolutions),
                  num_processes=accelerator.num_processes if accelerator is not None else 1, max_images=max_images)
    device = accelerator.device if accelerator is not None else torch.device("cpu")
    keep = cells_file is not None  # finished cells are read from and written to cells_file
    done = read_cells(cells_file) if keep else {}
    if keep and sweep.num_processes > 1:  # every rank skips the cells the main process read
        from accelerate.utils import broadcast_object_list

        done = broadcast_object_list([done])[0]
    writer = keep and (accelerator is None or accelerator.is_main_process)
    code = code_digest() if keep else ""
    stamps = {ddir: data_stamp(ddir) for ddir in set(ddirs)} if keep else {}
    bar = tqdm(total=len(runs) * len(resolutions), disable=not progress, dynamic_ncols=True, desc="eval")
    evaluated: dict[tuple[int, str, str], tuple[int, int]] = {}  # (model's id, size, mode) -> counts, this sweep
    for i, (r, ddir) in enumerate(zip(runs, ddirs)):
        model = r.model.to(device)
        model.set_pos_mode(r.pos_mode)
        tpb = tokens_per_batch or train_tokens_per_batch(r.train, model.config)
        precision = train_precision(r.train)
        weights = (r.weights_digest or _digest_bytes((r.path / "model.safetensors").read_bytes())) if keep else ""
        for res in resolutions:
            bar.set_description(f"{r.label} {res_key(res)}")
            same = r.pos_mode == "interpolate" and same_as_extrapolate(model, res)
            mode = "extrapolate" if same else r.pos_mode  # the cell this one is
            memo = (id(r.model), res_key(res), mode)
            key = json.dumps(dict(weights=weights, model={**model.config.to_dict(), "pos_mode": mode}, code=code,
                                  torch=torch.__version__, device=device.type, res=res_key(res),
                                  data=stamps.get(ddir, ""), tokens_per_batch=tpb, max_seq_len=max_seq_len,
                                  max_images=max_images, precision=precision, processes=sweep.num_processes),
                             sort_keys=True)
            if key in done:
                sweep.cells[i, res] = done[key]
            elif memo in evaluated:
                sweep.cells[i, res] = evaluated[memo]
            else:
                sweep.cells[i, res] = evaluate(model, ddir, size_policy(res, model.config.patch_size),
                                               tokens_per_batch=tpb, max_seq_len=max_seq_len, accelerator=accelerator,
                                               num_workers=num_workers, mixed_precision=precision,
                                               max_images=max_images)
                if writer:
                    append_cell(cells_file, key, sweep.cells[i, res])
            evaluated[memo] = sweep.cells[i, res]
            bar.update(1)
        r.model.to("cpu")
    bar.close()
    return sweep


# ----------------------------------------------------------------------------- outputs
def markdown_table(sweep: Sweep) -> str:
    """Rows = runs, columns = resolutions (HxW); bold = inside the run's training range."""
    keys = [res_key(r) for r in sweep.resolutions]
    lines = ["| run | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
    for i, run in enumerate(sweep.runs):
        cells = []
        for res in sweep.resolutions:
            s = f"{sweep.acc(i, res):.4f}"
            cells.append(f"**{s}**" if run.in_train_range(res) else s)
        lines.append(f"| {run.label} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Test accuracy at each resolution (HxW, px; budget:N: every image at its own aspect ratio, "
                 "at most N patches); **bold**: inside the run's training range.")
    return "\n".join(lines) + "\n"


def write_csv(sweep: Sweep, path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "pos_embed", "pos_mode", "train_res", "aspect", "step"]
                   + [res_key(r) for r in sweep.resolutions])
        for i, run in enumerate(sweep.runs):
            w.writerow([run.label, run.model.config.pos_embed, "both" if run.modes_same else run.pos_mode,
                        run.train["train_res"], run.train.get("aspect") or "", "" if run.step is None else run.step]
                       + [repr(sweep.acc(i, r)) for r in sweep.resolutions])


def to_json(sweep: Sweep) -> dict:
    runs = []
    for i, run in enumerate(sweep.runs):
        cells = {}
        for res in sweep.resolutions:
            correct, total = sweep.cells[i, res]
            size = dict(budget=res.tokens) if isinstance(res, Budget) else dict(height=res[0], width=res[1])
            cells[res_key(res)] = dict(size, acc=sweep.acc(i, res), correct=correct, total=total,
                                       in_train_range=run.in_train_range(res))
        runs.append(dict(run.metadata(), results=cells))
    return dict(resolutions=[res_key(r) for r in sweep.resolutions], num_processes=sweep.num_processes,
                max_images=sweep.max_images, runs=runs)


def write_outputs(sweep: Sweep, out: Path) -> dict[str, Path]:
    """accuracy.md, accuracy.csv, accuracy.json, accuracy.png in `out`; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {k: out / f"accuracy.{k}" for k in ("md", "csv", "json", "png")}
    paths["md"].write_text(markdown_table(sweep))
    write_csv(sweep, paths["csv"])
    paths["json"].write_text(json.dumps(to_json(sweep), indent=2) + "\n")
    plot_accuracy(sweep, paths["png"])
    return paths


def plot_accuracy(sweep: Sweep, path: Path) -> None:
    """Left: accuracy vs square side, one line per run, its training range shaded in its colour.
    Right (if any): the non-square resolutions as grouped markers, filled when in range."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted((r for r in sweep.resolutions if isinstance(r, Budget)), key=lambda b: b.tokens)
    fixed = [r for r in sweep.resolutions if not isinstance(r, Budget)]
    squares = sorted(r for r in fixed if r[0] == r[1])
    others = [r for r in fixed if r[0] != r[1]]
    if budgets and not squares:  # a budget sweep: token budgets on the x axis of the line panel
        squares = budgets
    panels = [p for p in (squares, others) if p]
    widths = [max(1.0, len(p) / 3) for p in panels]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 + 2 * sum(widths), 4.5), squeeze=False,
                             gridspec_kw=dict(width_ratios=widths), sharey=True)
    axes = list(axes[0])
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    n = len(sweep.runs)
    models = list(dict.fromkeys(id(r.model) for r in sweep.runs))  # one colour per run, whatever its modes
    for i, run in enumerate(sweep.runs):
        c = colors[models.index(id(run.model)) % len(colors)]
        style = "o--" if run.pos_mode == "interpolate" and not run.modes_same else "o-"
        if squares:
            ax = axes[0]
            first = run is next(r for r in sweep.runs if r.model is run.model)  # each run's range once
            if squares is budgets:
                xs = [b.tokens for b in budgets]
                for x, b in zip(xs, budgets):
                    if first and run.in_train_range(b):
                        ax.axvline(x, color=c, alpha=0.3)
            else:
                xs = [s for s, _ in squares]
                lo, hi = run.train_range
                if first:
                    ax.axvspan(lo, hi, color=c, alpha=0.08, lw=0)
                    for x in (lo, hi):
                        ax.axvline(x, color=c, lw=0.8, ls=":")
            ax.plot(xs, [sweep.acc(i, r) for r in squares], style, color=c, label=run.label)
        if others:
            ax = axes[-1]
            off = (i - (n - 1) / 2) * min(0.6 / max(n, 1), 0.15)
            for j, res in enumerate(others):
                inside = run.in_train_range(res)
                marker = "D" if style == "o--" else "s"  # diamonds: interpolate
                ax.plot(j + off, sweep.acc(i, res), marker, color=c, mfc=c if inside else "white",
                        label=run.label if not squares and j == 0 else None)
    if squares:
        ax = axes[0]
        if squares is budgets:
            ax.set_xlabel("token budget (patches per image, aspect ratio kept); line: trained at; "
                          "dashed: interpolate")
            ax.set_xticks([b.tokens for b in budgets])
            ax.set_title("token budgets")
        else:
            ax.set_xlabel("square side (px); shaded: training range; dashed: interpolate")
            ax.set_xticks([s for s, _ in squares])
            ax.set_title("square resolutions")
    if others:
        ax = axes[-1]
        ax.set_xticks(range(len(others)), [res_key(r) for r in others])
        ax.set_xlim(-0.5, len(others) - 0.5)
        ax.set_xlabel("H x W (px); filled: inside training range")
        ax.set_title("non-square resolutions")
    axes[0].set_ylabel("test accuracy")
    axes[0].set_ylim(0, 1)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=min(n, 4), frameon=False,
               bbox_to_anchor=(0.5, 0))
    fig.tight_layout(rect=(0, 0.06 * math.ceil(n / 4) + 0.02, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
