#!/usr/bin/env python
"""Make a small folder of images in mixed sizes and aspect ratios from the shared CIFAR-10 copy,
laid out as data/prepare_images.py expects: OUT/{train,test}/<class>/<name>.jpg|png|webp.

    python scripts/make_mixed_folder.py /tmp/mixed10                       # 300 train, 100 test images
    python scripts/make_mixed_folder.py /tmp/mixed10 --train 1000 --test 200

Each image is a CIFAR-10 image (32x32) resized (bicubic) to a random height and width: a side of
16..96 px and an aspect ratio w/h of 1/3..3, drawn log-uniformly, so the folder holds tall, wide,
small and large images; most are saved as JPEG, some as PNG and WebP. The source is
<repo>/../shared/data/cifar10 (its README describes it); OUT should be outside git (e.g. /tmp).
"""
from __future__ import annotations

import argparse
import io
import math
import random
import sys
import tarfile
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = REPO.parent / "shared" / "data" / "cifar10"


def pick(tar_path: Path, per_class: int, rng: random.Random) -> dict[str, list[tuple[str, bytes]]]:
    """{class: [(member name, jpeg bytes)]}: `per_class` random members of each class of one tar."""
    with tarfile.open(tar_path) as tar:
        names: dict[str, list[tarfile.TarInfo]] = {}
        for m in tar.getmembers():
            parts = m.name.split("/")
            if m.isfile() and len(parts) >= 3:
                names.setdefault(parts[-2], []).append(m)
        return {cls: [(m.name, tar.extractfile(m).read()) for m in rng.sample(sorted(ms, key=lambda m: m.name),
                                                                             min(per_class, len(ms)))]
                for cls, ms in sorted(names.items())}


def random_size(rng: random.Random) -> tuple[int, int]:
    """(h, w): area side 16..96 px and w/h in 1/3..3, both log-uniform."""
    side = math.exp(rng.uniform(math.log(16), math.log(96)))
    ratio = math.exp(rng.uniform(math.log(1 / 3), math.log(3)))
    return max(4, round(side / math.sqrt(ratio))), max(4, round(side * math.sqrt(ratio)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="folder to create (outside git, e.g. /tmp/mixed10)")
    ap.add_argument("--source", default=str(DEFAULT_SOURCE),
                    help="directory with cifar10-jpeg-{train,test}.tar (default: %(default)s)")
    ap.add_argument("--train", type=int, default=300, help="training images, spread over the 10 classes "
                    "(default: %(default)s)")
    ap.add_argument("--test", type=int, default=100, help="test images, spread over the 10 classes "
                    "(default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="random seed for the picks and sizes (default: %(default)s)")
    args = ap.parse_args(argv)
    source, out = Path(args.source), Path(args.out)
    rng = random.Random(args.seed)
    written = 0
    for split, n in (("train", args.train), ("test", args.test)):
        tar = source / f"cifar10-jpeg-{split}.tar"
        if not tar.is_file():
            print(f"make_mixed_folder: error: {tar} not found; pass --source DIR holding cifar10-jpeg-{split}.tar",
                  file=sys.stderr)
            return 2
        for cls, images in pick(tar, max(1, n // 10), rng).items():
            (out / split / cls).mkdir(parents=True, exist_ok=True)
            for name, data in images:
                h, w = random_size(rng)
                img = Image.open(io.BytesIO(data)).convert("RGB").resize((w, h), Image.Resampling.BICUBIC)
                ext, fmt = rng.choices([("jpg", "JPEG"), ("png", "PNG"), ("webp", "WEBP")], [8, 1, 1])[0]
                img.save(out / split / cls / f"{Path(name).stem}.{ext}", format=fmt)
                written += 1
    print(f"wrote {written} images to {out} ({args.train // 10 * 10} train, {args.test // 10 * 10} test)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
