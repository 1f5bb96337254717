"""Shared fixtures: tiny datasets built on the fly (tests never read /work/shared).

The plain builders live in tests/helpers.py so tests can import them too.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `import helpers` from any test

from helpers import make_image_tree_tar  # noqa: E402

from navit_pe.prepare import prepare  # noqa: E402

TINY_PER_CLASS = {"train": 6, "test": 3}  # x 10 CIFAR-10 classes: 60 train, 30 test
TINY_SHARD_SIZE = 16  # -> 4 train shards, 2 test shards


@pytest.fixture(scope="session")
def tiny_image_tree(tmp_path_factory) -> tuple[Path, dict[str, bytes]]:
    """(tar path, {member name: JPEG bytes}) of a tiny CIFAR-10-like image-tree tar:
    10 classes x (6 train + 3 test) random 32x32 JPEGs."""
    path = tmp_path_factory.mktemp("tiny_source") / "cifar10-jpeg-tiny.tar"
    members = make_image_tree_tar(path, n_per_class=TINY_PER_CLASS)
    return path, members


@pytest.fixture(scope="session")
def tiny_shards(tiny_image_tree, tmp_path_factory) -> Path:
    """`<root>/cifar10`: shards + meta.json prepared from `tiny_image_tree`, 16 per shard.
    Treat as read-only (it is shared by the whole session)."""
    root = tmp_path_factory.mktemp("tiny_data")
    return prepare(tiny_image_tree[0], root, shard_size=TINY_SHARD_SIZE, progress=False)
