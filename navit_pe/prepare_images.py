"""Turn a folder of your own images (or a tar of one) into webdataset shards plus a meta.json.

    SOURCE/<split>/<class>/<name>.jpg|jpeg|png|webp     (splits train and test are required)

Output, under ``<out>/<name>/``: ``{split}-NNNNNN.tar`` shards and ``meta.json``, in the format of
navit_pe.prepare (the CIFAR shards): samples ``<key>.<ext>`` with the file's original bytes under
its own extension (never re-encoded) and ``<key>.cls``; every shard's sha256; files written under
temporary names and renamed when complete, meta.json last; a re-run over unchanged files does
nothing. meta.json also records, per split, how many images have each source size ("HxW") and
the size statistics. A file that is not a readable jpg/jpeg/png/webp image is skipped, counted
and reported; an empty class or a missing split is an error. The CLI is data/prepare_images.py.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import statistics
import sys
import tarfile
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Iterator

from PIL import Image
from tqdm import tqdm

from .prepare import (DEFAULT_OUT, META_VERSION, DataError, Record, Source, _atomic_write, _find_up_to_date, exclusive,
                      _safe_key, _write_order, write_splits)

EXTS = ("jpg", "jpeg", "png", "webp")  # what navit_pe.data decodes
REQUIRED_SPLITS = ("train", "test")
REPORT_SKIPPED = 100  # skipped files listed by name in meta.json (all are counted)


@dataclass
class _File:
    """A file of the source tree: its path relative to the tree root and how to read it."""

    rel: str  # "<split>/<class>/<name>.<ext>" when well placed
    read: Callable[[], bytes]


@dataclass
class _Image:
    key: str
    ext: str
    label: int
    hw: tuple[int, int]
    file: _File


# ----------------------------------------------------------------------------- entry points
def main(argv: list[str] | None = None) -> int:
    """CLI: prepare shards; bad input prints one line to stderr and returns 2."""
    args = _parse_args(argv)
    try:
        prepare_images(args.source, args.name, args.out, shard_size=args.shard_size, force=args.force,
                       progress=not args.quiet)
    except DataError as exn:
        print(f"prepare_images: error: {' '.join(str(exn).split())}", file=sys.stderr)
        return 2
    except OSError as exn:
        print(f"prepare_images: error: {exn.strerror}: {exn.filename}; pass a writable --out", file=sys.stderr)
        return 2
    return 0


def prepare_images(source: str | Path, name: str, out: str | Path = DEFAULT_OUT, shard_size: int = 10_000,
                   force: bool = False, progress: bool = True) -> Path:
    """Write the shards and meta.json of the image tree `source` under `out`/`name`; return that dir.

    Does nothing when a meta.json made from the same files (paths, sizes, mtimes) and shard size
    exists and all its shards match their sha256 (unless `force`).
    """
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name or ""):
        raise DataError(f"--name {name!r} is not a plain directory name; use letters, digits, _ . -, e.g. "
                        "--name photos")
    if shard_size < 1:
        raise DataError(f"--shard-size must be a positive number of samples, got {shard_size}")
    source, out = Path(source), Path(out)
    files, dirs, fingerprint = _read_tree(source)
    with exclusive(out):  # one process at a time writes under `out`
        if not force:
            done = _find_up_to_date(out, fingerprint, shard_size, name)
            if done is not None:
                print(f"{done.name}: up to date ({done / 'meta.json'})")
                return done
        return _write(source, name, out, files, dirs, fingerprint, shard_size, progress)


def _write(source: Path, name: str, out: Path, files: list[_File], dirs: set[str], fingerprint: dict,
           shard_size: int, progress: bool) -> Path:
    """Scan the tree and write its shards and meta.json (the caller holds `exclusive(out)`)."""
    classes, images, skipped = _scan(source, files, dirs, progress)
    src = Source(name, "image-folder", classes, {s: len(v) for s, v in images.items()},
                 _records(images))
    ddir = out / name
    ddir.mkdir(parents=True, exist_ok=True)
    (ddir / "meta.json").unlink(missing_ok=True)  # from here on it no longer describes the directory
    splits = write_splits(ddir, list(images), src, shard_size, progress)
    for split, info in splits.items():
        info.update(_size_info(images[split]))
        info["skipped"] = sum(1 for rel, _ in skipped if rel.split("/")[0] == split)
    meta = {
        "version": META_VERSION,
        "dataset": name,
        "format": "image-folder",
        "classes": classes,
        "counts": {split: info["count"] for split, info in splits.items()},
        "splits": splits,
        "shard_size": shard_size,
        "source": fingerprint,
        "skipped": {"count": len(skipped),
                    "files": [f"{rel}: {why}" for rel, why in skipped[:REPORT_SKIPPED]]},
    }
    _atomic_write(ddir / "meta.json", (json.dumps(meta, indent=1) + "\n").encode())
    counts = ", ".join(f"{n} {split}" for split, n in meta["counts"].items())
    print(f"{name}: wrote {counts} images in {len(classes)} classes to {ddir}")
    if skipped:
        shown = "; ".join(f"{rel} ({why})" for rel, why in skipped[:5])
        more = f"; and {len(skipped) - 5} more (listed in meta.json)" if len(skipped) > 5 else ""
        print(f"{name}: skipped {len(skipped)} file(s) that are not readable {'/'.join(EXTS)} images: "
              f"{shown}{more}")
    return ddir


# ----------------------------------------------------------------------------- reading the tree
def _read_tree(source: Path) -> tuple[list[_File], set[str], dict]:
    """The files and directories of the tree (paths relative to its root), and a fingerprint
    of the source for the up-to-date check."""
    if not source.exists():
        raise DataError(f"source not found: {source}; pass a folder SOURCE/<split>/<class>/*.jpg or a tar of one")
    if source.is_dir():
        files, dirs, lines = [], set(), []
        for dirpath, dirnames, filenames in os.walk(source):
            dirnames.sort()
            rel_dir = Path(dirpath).relative_to(source).as_posix()
            if rel_dir != ".":
                dirs.add(rel_dir)
            for fname in sorted(filenames):
                path = Path(dirpath) / fname
                rel = path.relative_to(source).as_posix()
                st = path.stat()
                lines.append(f"{rel}\t{st.st_size}\t{st.st_mtime_ns}")
                files.append(_File(rel, path.read_bytes))
        digest = hashlib.sha256("\n".join(lines).encode()).hexdigest()
        return files, dirs, {"path": str(source.resolve()), "files": len(files), "sha256": digest}
    members: dict[str, bytes] = {}
    dirs = set()
    try:
        with tarfile.open(source, "r:*") as tar:
            for member in tar:
                name = member.name
                while name.startswith("./"):
                    name = name[2:]
                name = PurePosixPath(name.strip("/") or ".").as_posix()
                if member.isdir() and name != ".":
                    dirs.add(name)
                elif member.isfile():
                    members[name] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exn:
        raise DataError(f"{source}: not a folder and not a readable tar archive ({exn})") from None
    # a tar of "photos/train/..." has its tree one level down: strip shared top directories
    paths = list(members) + sorted(dirs)
    while paths and all("/" in p or p in dirs for p in paths):
        tops = {p.split("/")[0] for p in paths}
        if len(tops) != 1 or tops & set(REQUIRED_SPLITS):
            break
        cut = len(tops.pop()) + 1
        members = {k[cut:]: v for k, v in members.items()}
        dirs = {d[cut:] for d in dirs if len(d) > cut}
        paths = list(members) + sorted(dirs)
    files = [_File(rel, (lambda data=data: data)) for rel, data in sorted(members.items())]
    st = source.stat()
    fingerprint = {"files": [{"path": str(source.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}]}
    return files, dirs, fingerprint


def _scan(source: Path, files: list[_File], dirs: set[str], progress: bool
          ) -> tuple[list[str], dict[str, list[_Image]], list[tuple[str, str]]]:
    """Class names, the readable images of each split (with their sizes) and the skipped files."""
    splits = sorted({d.split("/")[0] for d in dirs} | {f.rel.split("/")[0] for f in files if "/" in f.rel})
    missing = [s for s in REQUIRED_SPLITS if s not in splits]
    if missing:
        raise DataError(f"{source} has no {missing[0]}/ split (found: {', '.join(splits) or 'nothing'}); expected "
                        f"{source}/train/<class>/*.jpg and {source}/test/<class>/*.jpg")
    class_dirs = {tuple(d.split("/")) for d in dirs if d.count("/") == 1}
    class_dirs |= {tuple(f.rel.split("/")[:2]) for f in files if f.rel.count("/") == 2}
    classes = sorted({cls for _, cls in class_dirs})
    label = {cls: i for i, cls in enumerate(classes)}
    images: dict[str, list[_Image]] = {split: [] for split in splits}
    skipped: list[tuple[str, str]] = []
    keys: set[str] = set()
    for f in tqdm(files, desc=f"scan {source.name}", unit="file", disable=not progress):
        parts = f.rel.split("/")
        if len(parts) == 1:
            continue  # a file beside the splits (a README): not part of the data
        if len(parts) != 3:
            skipped.append((f.rel, "not directly in <split>/<class>/"))
            continue
        split, cls, fname = parts
        ext = fname.rsplit(".", 1)[-1].lower() if "." in fname else ""
        if ext not in EXTS:
            skipped.append((f.rel, f"not a {'/'.join(EXTS)} file"))
            continue
        try:
            hw = _image_size(f.read())
        except Exception as exn:  # PIL's errors for a truncated or non-image file vary
            skipped.append((f.rel, f"unreadable: {' '.join(str(exn).split()) or type(exn).__name__}"))
            continue
        key = base = _safe_key(f"{split}_{cls}_{fname.rsplit('.', 1)[0]}")
        n = 1
        while key in keys:  # "a.b.jpg" and "a_b.png" would share a key
            n += 1
            key = f"{base}_{n}"
        keys.add(key)
        images[split].append(_Image(key, ext, label[cls], hw, f))
    for split, cls in sorted(class_dirs):
        if not any(im.label == label[cls] for im in images[split]):
            raise DataError(f"class {split}/{cls} in {source} has no readable image; add "
                            f"{'/'.join(EXTS)} files to it or remove the directory")
    return classes, images, skipped


def _image_size(data: bytes) -> tuple[int, int]:
    """(h, w) of an encoded image from its header; the pixels are decoded too (JPEGs at 1/8
    scale, which still reads every byte) so that a truncated file is caught here."""
    with Image.open(io.BytesIO(data)) as im:
        hw = (im.height, im.width)
        if im.format == "JPEG":
            im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
        im.load()
    if min(hw) < 1:
        raise ValueError("empty image")
    return hw


def _records(images: dict[str, list[_Image]]) -> Callable[[str], Iterator[Record]]:
    def records(split: str) -> Iterator[Record]:
        rows = images[split]
        for i in _write_order(len(rows)):
            im = rows[i]
            yield im.key, im.ext, im.label, im.file.read()
    return records


def _size_info(images: list[_Image]) -> dict:
    """meta.json entries of one split: images per source size "HxW", and size statistics."""
    sizes = Counter(f"{h}x{w}" for h, w in (im.hw for im in images))
    hs = [im.hw[0] for im in images]
    ws = [im.hw[1] for im in images]
    ratios = [w / h for h, w in zip(hs, ws)]

    def stats(v: list[float]) -> dict:
        return {"min": min(v), "max": max(v), "mean": round(statistics.fmean(v), 3),
                "median": statistics.median(v)} if v else {}

    return {"sizes": dict(sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0]))),
            "size_stats": {"height": stats(hs), "width": stats(ws), "aspect_w_over_h": stats(ratios),
                           "megapixels": stats([h * w / 1e6 for h, w in zip(hs, ws)])}}


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="prepare_images.py",
        description="Write webdataset shards and meta.json of a folder of images under OUT/NAME/.")
    parser.add_argument("source", help="folder SOURCE/<split>/<class>/*.jpg|jpeg|png|webp (splits train and "
                        "test), or a tar of one")
    parser.add_argument("--name", required=True, help="dataset name: the output directory OUT/NAME and the "
                        "train.py --dataset value")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="output root directory (default: %(default)s)")
    parser.add_argument("--shard-size", type=int, default=10_000,
                        help="images per shard file (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="rebuild even when the shards are up to date")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser.parse_args(argv)
