"""Turn a CIFAR-10/100 source into webdataset shards plus a meta.json.

Sources (the format is detected from the tar members):

* image tree: one or more plain tars with members ``<split>/<class>/<name>.jpg|png``
  (e.g. the directory /work/shared/data/cifar10/); the encoded bytes are copied as they are.
* CIFAR python pickles: the official ``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz``;
  raw pixels are written as lossless PNG (CIFAR-100: the 100 fine labels).

Output, under ``<out>/<dataset>/``: ``{split}-NNNNNN.tar`` shards whose samples are
``<key>.jpg|png`` and ``<key>.cls`` (label as ascii), and ``meta.json``. Every file is written
under a temporary name and renamed when complete, meta.json last, so an interrupted run never
leaves a shard or a meta.json that looks whole. The CLI is ``data/prepare_cifar.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import pickle
import re
import sys
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Iterator

try:
    import fcntl
except ImportError:  # not POSIX: no lock (one process at a time is then up to the user)
    fcntl = None

import numpy as np
from PIL import Image
from tqdm import tqdm

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "data"
SOURCE_ENV = "NAVIT_PE_CIFAR_SOURCE"  # overrides the default source (used by tests)
LOCK_FILE = ".prepare.lock"  # in the output directory, held while preparing (see exclusive)
SLEEP_ENV = "NAVIT_PE_PREPARE_SLEEP"  # seconds to sleep per sample (tests kill a run mid-way)
META_VERSION = 1
ORDER_SEED = 0  # samples are written in a fixed pseudo-random order so shards mix classes

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck"]
OFFICIAL = {  # dataset -> (url, md5) of the official python-pickle tarball
    "cifar10": ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                "c58f30108f718f92721af3b95e74349a"),
    "cifar100": ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                 "eb9058c3a382ffc7106e4002c42a8d85"),
}

# image tree member: [prefix/]<split>/<class>/<name>.<ext>
IMAGE_MEMBER = re.compile(r"^(?:.*/)?([^/]+)/([^/]+)/([^/]+)\.(jpe?g|png)$", re.IGNORECASE)
CIFAR10_PARTS = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
CIFAR100_PARTS = ["train", "test", "meta"]

Record = tuple[str, str, int, bytes]  # (key, ext "jpg"|"png", label, encoded image)


class DataError(ValueError):
    """Missing or bad input data; the message is a single line meant for the user."""


@dataclass
class Source:
    """A parsed source: class names in label order and the samples of each split."""

    dataset: str
    format: str  # "image-tree" | "cifar-pickle"
    classes: list[str]
    counts: dict[str, int]  # split -> number of samples
    records: Callable[[str], Iterator[Record]]  # split -> samples in write order


# ----------------------------------------------------------------------------- entry points


def main(argv: list[str] | None = None) -> int:
    """CLI: prepare shards; bad input prints one line to stderr and returns 2."""
    args = _parse_args(argv)
    try:
        if (args.url or args.md5) and not args.download:
            raise DataError("--url and --md5 only apply together with --download")
        if args.download:
            dataset = args.dataset or "cifar10"
            url, md5 = OFFICIAL.get(dataset, (None, None))
            if not (args.url or url) or not (args.md5 or md5):
                raise DataError(f"no official download for {dataset!r}; pass --url and --md5")
            source = download(args.url or url, args.md5 or md5,
                              Path(args.out) / "downloads", progress=not args.quiet)
        elif args.source:
            source = Path(args.source)
        else:
            source = default_source()
            if not source.exists():
                raise DataError(f"no --source given and the default source {source} does not "
                                "exist; pass --source PATH (image-tree tar or directory, or "
                                "cifar-10/100-python.tar.gz) or --download")
        prepare(source, Path(args.out), dataset=args.dataset, shard_size=args.shard_size,
                force=args.force, progress=not args.quiet)
    except DataError as exn:
        message = " ".join(str(exn).split())  # guarantee a single line
        print(f"prepare_cifar: error: {message}", file=sys.stderr)
        return 2
    except OSError as exn:  # e.g. an --out that cannot be created, a full disk
        print(f"prepare_cifar: error: {exn.strerror}: {exn.filename}; pass a writable --out",
              file=sys.stderr)
        return 2
    return 0


def prepare(source: str | Path, out: str | Path = DEFAULT_OUT, dataset: str | None = None,
            shard_size: int = 10_000, force: bool = False, progress: bool = True) -> Path:
    """Write the shards and meta.json for `source` under `out`/<dataset>; return that dir.

    Does nothing when a meta.json made from the same source files and shard size exists and
    all its shards match their sha256 (unless `force`).
    """
    if shard_size < 1:
        raise DataError(f"--shard-size must be positive, got {shard_size}")
    out = Path(out)
    files = source_files(Path(source))
    fingerprint = _fingerprint(files)
    with exclusive(out):
        if not force:
            done = _find_up_to_date(out, fingerprint, shard_size, dataset)
            if done is not None:
                print(f"{done.name}: up to date ({done / 'meta.json'})")
                return done
        return _write(out, open_source(files, dataset), fingerprint, shard_size, progress)


def _write(out: Path, src: Source, fingerprint: dict, shard_size: int, progress: bool) -> Path:
    """Write `src`'s shards and meta.json under `out`/<dataset> (the caller holds `exclusive(out)`)."""
    ddir = out / src.dataset
    ddir.mkdir(parents=True, exist_ok=True)
    # From here on the old meta.json no longer describes the directory: drop it first.
    (ddir / "meta.json").unlink(missing_ok=True)
    splits = write_splits(ddir, list(src.counts), src, shard_size, progress)

    meta = {
        "version": META_VERSION,
        "dataset": src.dataset,
        "format": src.format,
        "classes": src.classes,
        "counts": {split: info["count"] for split, info in splits.items()},
        "splits": splits,
        "shard_size": shard_size,
        "source": fingerprint,
    }
    _atomic_write(ddir / "meta.json", (json.dumps(meta, indent=1) + "\n").encode())
    counts = ", ".join(f"{n} {split}" for split, n in meta["counts"].items())
    print(f"{src.dataset}: wrote {counts} samples to {ddir}")
    return ddir


@contextlib.contextmanager
def exclusive(out: Path) -> Iterator[None]:
    """Hold `out`/.prepare.lock while checking and writing prepared data. Two processes that
    prepare the same directory at once (two study runs side by side, or the ranks of a
    multi-process run, on a fresh checkout) would otherwise delete and rename each other's
    temporary shards; the second now waits, then finds the data up to date. The lock goes with
    the process, however it ends."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOCK_FILE, "a") as f:
        if fcntl is not None:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(f"waiting for another process that prepares data under {out}", file=sys.stderr, flush=True)
                fcntl.flock(f, fcntl.LOCK_EX)
        yield


def default_source() -> Path:
    """The default source: $NAVIT_PE_CIFAR_SOURCE, else <repo>/../shared/data/cifar10."""
    return Path(os.environ.get(SOURCE_ENV) or REPO_ROOT.parent / "shared" / "data" / "cifar10")


def download(url: str, md5: str, dest_dir: Path, progress: bool = True) -> Path:
    """Fetch `url` into `dest_dir` unless a copy with the right md5 is there; return its path.

    The file is streamed to `<name>.part` and only renamed once its md5 matches; a mismatch
    deletes it and raises DataError.
    """
    dest_dir.mkdir(parents=True, exist_ok=True)
    name = PurePosixPath(urllib.parse.urlparse(url).path).name or "download.tar.gz"
    final = dest_dir / name
    if final.exists():
        if _md5(final) == md5.lower():
            return final
        final.unlink()  # stale or corrupt copy: fetch again
    part = dest_dir / (name + ".part")
    digest = hashlib.md5()
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(part, "wb") as f:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, desc=f"download {name}", unit="B", unit_scale=True,
                      disable=not progress) as bar:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError) as exn:
        part.unlink(missing_ok=True)
        raise DataError(f"download of {url} failed: {exn}") from None
    if digest.hexdigest() != md5.lower():
        part.unlink()
        raise DataError(f"md5 mismatch for {url}: expected {md5.lower()}, got "
                        f"{digest.hexdigest()}; the download was deleted")
    os.replace(part, final)
    return final


# ----------------------------------------------------------------------------- reading sources


def source_files(path: Path) -> list[Path]:
    """The tar files of a source: the path itself, or the tars in a directory."""
    if not path.exists():
        raise DataError(f"source not found: {path}")
    if path.is_file():
        return [path]
    files = sorted(path.glob("*.tar")) or sorted([*path.glob("*.tar.gz"), *path.glob("*.tgz")])
    if not files:
        raise DataError(f"no .tar, .tar.gz or .tgz files in {path}")
    return files


def open_source(files: list[Path], dataset: str | None = None) -> Source:
    """Read the source tars and detect their format (image tree or CIFAR pickles)."""
    images, parts = [], {}
    for path in files:
        more_images, more_parts = _read_tar(path)
        images += more_images
        parts.update(more_parts)
    if images and parts:
        raise DataError(f"{files[0]}: mixes image files and CIFAR pickle files")
    if images:
        return _image_tree_source(images, dataset)
    if parts:
        return _pickle_source(parts, dataset, files[0])
    raise DataError(f"{files[0]}: unknown format (expected <split>/<class>/<name>.jpg members "
                    "or the CIFAR-10/100 python tarball)")


def _read_tar(path: Path) -> tuple[list[tuple[str, str, str, str, bytes]], dict[str, bytes]]:
    """One streaming pass: image-tree members and CIFAR pickle members of one tar."""
    images, parts = [], {}
    try:
        with tarfile.open(path, "r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base = PurePosixPath(member.name).name
                if match := IMAGE_MEMBER.match(member.name):
                    split, cls, stem, ext = match.groups()
                    ext = "png" if ext.lower() == "png" else "jpg"
                    images.append((split, cls, stem, ext, tar.extractfile(member).read()))
                elif base in CIFAR10_PARTS or base in CIFAR100_PARTS:
                    parts[base] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exn:
        raise DataError(f"{path}: not a readable tar archive ({exn})") from None
    return images, parts


def _image_tree_source(images: list[tuple[str, str, str, str, bytes]],
                       dataset: str | None) -> Source:
    classes = sorted({cls for _, cls, _, _, _ in images})
    inferred = None
    if set(classes) == set(CIFAR10_CLASSES):
        classes, inferred = CIFAR10_CLASSES, "cifar10"  # CIFAR-10 label order
    elif len(classes) == 100:
        inferred = "cifar100"  # CIFAR-100's fine label names are in sorted order
    dataset = dataset or inferred
    if not dataset:
        raise DataError(f"cannot infer the dataset name from {len(classes)} classes; "
                        "pass --dataset NAME")
    label = {cls: i for i, cls in enumerate(classes)}
    by_split: dict[str, list[Record]] = {}
    seen = set()
    for split, cls, stem, ext, data in images:
        key = _safe_key(f"{split}_{cls}_{stem}")
        if key in seen:
            raise DataError(f"duplicate image {split}/{cls}/{stem} in the source")
        seen.add(key)
        by_split.setdefault(split, []).append((key, ext, label[cls], data))

    def records(split: str) -> Iterator[Record]:
        rows = by_split[split]
        for i in _write_order(len(rows)):
            yield rows[i]

    return Source(dataset, "image-tree", list(classes),
                  {split: len(rows) for split, rows in by_split.items()}, records)


def _pickle_source(parts: dict[str, bytes], dataset: str | None, path: Path) -> Source:
    if "batches.meta" in parts:
        kind, names, label_key, class_key = "cifar10", CIFAR10_PARTS, "labels", "label_names"
        split_parts = {"train": CIFAR10_PARTS[:5], "test": ["test_batch"]}
        meta_part = "batches.meta"
    else:
        kind, names, label_key, class_key = "cifar100", CIFAR100_PARTS, "fine_labels", \
            "fine_label_names"
        split_parts = {"train": ["train"], "test": ["test"]}
        meta_part = "meta"
    missing = [name for name in names if name not in parts]
    if missing:
        raise DataError(f"{path}: {kind} python tarball lacks {', '.join(missing)}")
    if dataset and dataset != kind:
        raise DataError(f"{path} holds {kind}, not {dataset}")
    classes = [_text(name) for name in _unpickle(parts[meta_part], path)[class_key]]

    arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split, batch_names in split_parts.items():
        batches = [_unpickle(parts[name], path) for name in batch_names]
        data = np.concatenate([np.asarray(b["data"], dtype=np.uint8) for b in batches])
        labels = np.concatenate([np.asarray(b[label_key], dtype=np.int64) for b in batches])
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
            raise DataError(f"{path}: unexpected {split} array shapes {data.shape}, "
                            f"{labels.shape}")
        if len(labels) and not 0 <= labels.min() <= labels.max() < len(classes):
            raise DataError(f"{path}: {split} labels outside 0..{len(classes) - 1}")
        arrays[split] = data, labels

    def records(split: str) -> Iterator[Record]:
        data, labels = arrays[split]
        for i in _write_order(len(data)):
            pixels = data[i].reshape(3, 32, 32).transpose(1, 2, 0)  # CHW rows -> HWC
            buf = io.BytesIO()
            Image.fromarray(pixels, "RGB").save(buf, format="PNG")
            yield f"{split}_{i:06d}", "png", int(labels[i]), buf.getvalue()

    return Source(kind, "cifar-pickle", classes,
                  {split: len(arr[0]) for split, arr in arrays.items()}, records)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only, nothing that could run code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _unpickle(blob: bytes, path: Path) -> dict:
    try:
        obj = _ArrayUnpickler(io.BytesIO(blob), encoding="bytes").load()
    except Exception as exn:  # any malformed pickle is bad input
        raise DataError(f"{path}: unreadable CIFAR pickle ({exn})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: CIFAR pickle is not a dict")
    return {_text(k): v for k, v in obj.items()}  # python-2 pickles have bytes keys


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _safe_key(key: str) -> str:
    # webdataset splits the key from the extension at the first dot
    return re.sub(r"[^A-Za-z0-9_-]", "_", key)


def _write_order(n: int) -> list[int]:
    return np.random.default_rng(ORDER_SEED).permutation(n).tolist()


# ----------------------------------------------------------------------------- writing shards


class _ShardWriter:
    """Writes one shard under `<name>.tmp`; finish() renames it into place."""

    def __init__(self, path: Path):
        self.path = path
        self.tmp = path.with_name(path.name + ".tmp")
        self.tar = tarfile.open(self.tmp, "w")
        self.count = 0

    def add(self, key: str, ext: str, label: int, data: bytes) -> None:
        self._member(f"{key}.{ext}", data)
        self._member(f"{key}.cls", str(label).encode("ascii"))
        self.count += 1

    def _member(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), 0o644, 0  # fixed: reproducible shards
        self.tar.addfile(info, io.BytesIO(data))

    def finish(self) -> dict:
        self.tar.close()
        with open(self.tmp, "rb") as f:
            os.fsync(f.fileno())
        entry = {"file": self.path.name, "count": self.count,
                 "bytes": self.tmp.stat().st_size, "sha256": _sha256(self.tmp)}
        os.replace(self.tmp, self.path)
        return entry


def write_splits(ddir: Path, names: list[str], src: Source, shard_size: int, progress: bool) -> dict[str, dict]:
    """Write every split's shards (train, test, then the rest), drop leftovers of earlier runs
    (temporary files, shards no split names any more); {split: its meta.json entry}."""
    for stale in ddir.glob("*.tmp"):
        stale.unlink()
    splits = {split: _write_split(ddir, split, src, shard_size, progress)
              for split in sorted(names, key=lambda s: (s != "train", s != "test", s))}
    keep = {s["file"] for info in splits.values() for s in info["shards"]}
    for old in ddir.glob("*.tar"):
        if old.name not in keep:
            old.unlink()
    return splits


def _write_split(ddir: Path, split: str, src: Source, shard_size: int, progress: bool) -> dict:
    """Write one split's shards; return its meta.json entry."""
    delay = float(os.environ.get(SLEEP_ENV) or 0)
    per_class = [0] * len(src.classes)
    shards, writer = [], None
    with tqdm(total=src.counts[split], desc=f"{src.dataset} {split}", unit="img",
              disable=not progress) as bar:
        for i, (key, ext, label, data) in enumerate(src.records(split)):
            if i % shard_size == 0:
                if writer:
                    shards.append(writer.finish())
                writer = _ShardWriter(ddir / f"{split}-{len(shards):06d}.tar")
            writer.add(key, ext, label, data)
            per_class[label] += 1
            bar.update()
            if delay:
                time.sleep(delay)
        if writer:
            shards.append(writer.finish())
    return {"count": sum(per_class),
            "per_class": dict(zip(src.classes, per_class)),
            "shards": shards}


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- up-to-date check


def _fingerprint(files: list[Path]) -> dict:
    return {"files": [{"path": str(p.resolve()), "bytes": p.stat().st_size,
                       "mtime_ns": p.stat().st_mtime_ns} for p in files]}


def _find_up_to_date(out: Path, fingerprint: dict, shard_size: int,
                     dataset: str | None) -> Path | None:
    """A dataset dir under `out` already prepared from these files, with intact shards."""
    for meta_path in sorted(out.glob("*/meta.json")):
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            continue
        if (meta.get("version") == META_VERSION and meta.get("source") == fingerprint
                and meta.get("shard_size") == shard_size
                and dataset in (None, meta.get("dataset"))
                and shards_intact(meta_path.parent, meta, check_sha256=True)):
            return meta_path.parent
    return None


def shards_intact(ddir: Path, meta: dict, check_sha256: bool = False) -> bool:
    """Whether every shard listed in `meta` exists with its size (and sha256)."""
    try:
        for info in meta["splits"].values():
            for shard in info["shards"]:
                path = ddir / shard["file"]
                if not path.is_file() or path.stat().st_size != shard["bytes"]:
                    return False
                if check_sha256 and _sha256(path) != shard["sha256"]:
                    return False
    except (KeyError, TypeError, AttributeError):
        return False
    return True


def _sha256(path: Path) -> str:
    return _digest(path, hashlib.sha256())


def _md5(path: Path) -> str:
    return _digest(path, hashlib.md5())


def _digest(path: Path, digest) -> str:
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="prepare_cifar.py",
        description="Write CIFAR-10/100 webdataset shards and meta.json under OUT/<dataset>/.")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--source", help="image-tree tar or directory of tars, or the official "
                       "cifar-10/100-python.tar.gz (default: <repo>/../shared/data/cifar10)")
    where.add_argument("--download", action="store_true",
                       help="fetch the official python tarball of --dataset (md5 checked)")
    parser.add_argument("--url", help="download from this address instead of the official one")
    parser.add_argument("--md5", help="expected md5 of the download (default: the official one)")
    parser.add_argument("--dataset", help="cifar10 or cifar100 (default: inferred from the source)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="output root (default: %(default)s)")
    parser.add_argument("--shard-size", type=int, default=10_000, help="samples per shard")
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser.parse_args(argv)
