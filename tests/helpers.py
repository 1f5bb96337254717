"""Builders of tiny datasets and small utilities shared by the tests."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import io
import pickle
import subprocess
import sys
import tarfile
import threading
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
PREPARE_SCRIPT = REPO_ROOT / "data" / "prepare_cifar.py"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")


def make_image_tree_tar(path: str | Path, n_per_class: int | dict[str, int] = 3,
                        classes: Sequence[str] = CIFAR10_CLASSES,
                        split_names: Sequence[str] = ("train", "test"),
                        size: int = 32, seed: int = 0) -> dict[str, bytes]:
    """Write a plain tar of random `size`x`size` JPEGs as `<split>/<class>/<NNNN>.jpg`.

    n_per_class: images per class, one number for every split or a {split: n} dict.
    Returns {member name: JPEG bytes} of what was written (members sorted, like the real one).
    """
    rng = np.random.default_rng(seed)
    members = {}
    for split in split_names:
        n = n_per_class[split] if isinstance(n_per_class, dict) else n_per_class
        for cls in classes:
            for i in range(n):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                buf = io.BytesIO()
                Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
                members[f"{split}/{cls}/{i:04d}.jpg"] = buf.getvalue()
    members = dict(sorted(members.items()))
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members.items():
            _add(tar, name, data)
    return members


def make_cifar_pickle_tgz(path: str | Path, kind: str = "cifar10", n: int = 20,
                          seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Write a tiny tarball in the official CIFAR-10/100 python-pickle layout.

    n: images in each of train and test. Returns {split: (images N x 32 x 32 x 3 uint8 HWC,
    labels N int)} as written; pickles use bytes keys like the official python-2 ones.
    """
    rng = np.random.default_rng(seed)
    num_classes = {"cifar10": 10, "cifar100": 100}[kind]
    arrays = {split: (rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                      rng.integers(0, num_classes, n)) for split in ("train", "test")}
    names = [f"class_{i:03d}".encode() for i in range(num_classes)]

    def batch(images: np.ndarray, labels: np.ndarray, label_key: bytes) -> bytes:
        rows = images.transpose(0, 3, 1, 2).reshape(len(images), -1)  # HWC -> CHW rows
        return pickle.dumps({b"data": rows, label_key: [int(x) for x in labels],
                             b"filenames": [f"img_{i}.png".encode() for i in range(len(rows))]})

    parts = {}
    if kind == "cifar10":
        top = "cifar-10-batches-py"
        train_images, train_labels = arrays["train"]
        for b, idx in enumerate(np.array_split(np.arange(n), 5), start=1):
            parts[f"data_batch_{b}"] = batch(train_images[idx], train_labels[idx], b"labels")
        parts["test_batch"] = batch(*arrays["test"], b"labels")
        parts["batches.meta"] = pickle.dumps({b"label_names": names})
    else:
        top = "cifar-100-python"
        for split in ("train", "test"):
            parts[split] = batch(*arrays[split], b"fine_labels")
        parts["meta"] = pickle.dumps({b"fine_label_names": names,
                                      b"coarse_label_names": [b"coarse"] * 20})
    with tarfile.open(path, "w:gz") as tar:
        for name, data in parts.items():
            _add(tar, f"{top}/{name}", data)
    return arrays


def read_shards(ddir: str | Path, split: str | None = None) -> dict[str, dict[str, bytes]]:
    """Raw samples of a prepared dataset dir: {key: {ext: bytes}} (one split or all)."""
    samples: dict[str, dict[str, bytes]] = {}
    pattern = f"{split}-*.tar" if split else "*.tar"
    for shard in sorted(Path(ddir).glob(pattern)):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def run_prepare(*args: str | Path, env: dict[str, str] | None = None,
                timeout: float = 60) -> subprocess.CompletedProcess:
    """Run data/prepare_cifar.py in a subprocess, capturing text output."""
    return subprocess.run([sys.executable, str(PREPARE_SCRIPT), *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=timeout)


def file_md5(path: str | Path) -> str:
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@contextlib.contextmanager
def http_server(directory: str | Path) -> Iterator[str]:
    """Serve `directory` over HTTP on 127.0.0.1 (a free port) in a thread; yields the base URL."""

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    handler = functools.partial(QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    tar.addfile(info, io.BytesIO(data))


# class -> source (h, w): one size per class, so a label tells a packed image's source size
MIXED_SIZES = {"square": (64, 64), "tall": (90, 20), "wide": (40, 300)}


def make_mixed_image_folder(root: str | Path, per_class: dict[str, int] | None = None,
                            seed: int = 0) -> dict[str, bytes]:
    """A folder tree `root/<split>/<class>/` of random images, one size per class (MIXED_SIZES),
    in every supported format (.jpg, .jpeg, .png, .webp), plus a corrupt .jpg and a text file in
    train/square/ (both to be skipped). Returns {relative path: bytes} of the good images."""
    per_class = per_class or {"train": 4, "test": 2}
    rng = np.random.default_rng(seed)
    formats = [("jpg", "JPEG"), ("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")]
    good = {}
    for split, n in per_class.items():
        for cls, (h, w) in MIXED_SIZES.items():
            d = Path(root) / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                ext, fmt = formats[i % len(formats)]
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format=fmt)
                (d / f"img{i}.{ext}").write_bytes(buf.getvalue())
                good[f"{split}/{cls}/img{i}.{ext}"] = buf.getvalue()
    bad = Path(root) / "train" / "square"
    jpeg = good["train/square/img0.jpg"]
    (bad / "corrupt.jpg").write_bytes(jpeg[: len(jpeg) // 3])  # truncated
    (bad / "notes.txt").write_text("not an image")
    return good
