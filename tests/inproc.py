"""Helpers for the tests that run the trainer inside the test process (train(cfg) or train.py's
main(argv)), so hooks and patches can watch what it does.

- `colour_shards(root)`: a tiny dataset a model can learn, classes told apart by colour;
- `run_train_py(argv)`: train.py's main() in this process (Accelerate's state reset around it);
- `TinyRun`: the flags of a tiny, fast run.
"""
from __future__ import annotations

import importlib.util
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from navit_pe.prepare import prepare

REPO = Path(__file__).resolve().parents[1]

# tiny models: one thread is faster than two on a shared 2-core machine (tests/test_posenc.py
# sets the same for the whole session)
torch.set_num_threads(1)

# four classes, each a base colour; every image is that colour plus per-pixel noise
COLOURS = {"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200), "yellow": (200, 200, 40)}


def colour_shards(root: Path, n_train: int = 24, n_test: int = 10, size: int = 16, seed: int = 0,
                  shard_size: int = 32) -> Path:
    """Prepare `root`/colours: len(COLOURS) classes x (n_train + n_test) noisy solid-colour PNGs."""
    rng = np.random.default_rng(seed)
    src = root / "colours-src.tar"
    root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(src, "w") as tar:
        for split, n in (("train", n_train), ("test", n_test)):
            for cls, rgb in COLOURS.items():
                for i in range(n):
                    noise = rng.integers(-30, 31, (size, size, 3))
                    px = np.clip(np.array(rgb)[None, None] + noise, 0, 255).astype(np.uint8)
                    buf = io.BytesIO()
                    Image.fromarray(px).save(buf, format="PNG")
                    data = buf.getvalue()
                    info = tarfile.TarInfo(f"{split}/{cls}/{i:04d}.png")
                    info.size, info.mode, info.mtime = len(data), 0o644, 0
                    tar.addfile(info, io.BytesIO(data))
    return prepare(src, root, dataset="colours", shard_size=shard_size, progress=False)


def reset_accelerate() -> None:
    """Forget Accelerate's process-wide state, so the next Accelerator may use other settings."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


_TRAIN_PY = None


def train_py():
    """train.py at the repository root, imported as a module."""
    global _TRAIN_PY
    if _TRAIN_PY is None:
        spec = importlib.util.spec_from_file_location("navit_pe_train_script", REPO / "train.py")
        _TRAIN_PY = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(_TRAIN_PY)
    return _TRAIN_PY


def run_train_py(argv: list[str]) -> int:
    """train.py's main(argv) in this process; returns its exit code."""
    reset_accelerate()
    try:
        return train_py().main([str(a) for a in argv])
    finally:
        reset_accelerate()


def tiny_args(data_dir: Path, out: Path, *extra) -> list[str]:
    """Flags of a tiny, quick run on a dataset dir made by colour_shards (or the tiny CIFAR one)."""
    return ["--data-root", str(data_dir.parent), "--dataset", data_dir.name, "--out", str(out),
            "--dim", "32", "--depth", "1", "--heads", "2", "--mlp-ratio", "2", "--batch-images", "16",
            "--train-res", "16", "--eval-res", "16", "--num-workers", "0", "--log-every", "1",
            "--randaug-ops", "0", *map(str, extra)]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
