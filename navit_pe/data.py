"""Read prepared shards (CIFAR, or a folder of images from data/prepare_images.py) as a webdataset pipeline of (PIL RGB image, int label).

    root = ensure_prepared()                  # data/cifar10, preparing it on first use
    train = make_dataset(root, "train", seed=0, epoch=0)
    test = make_dataset(root, "test", shuffle=False)
    batches = train.compose(my_packing_stage)  # further stages append to a copy

The pipeline: this rank/worker's share of the shards (shuffled per seed+epoch) -> tar samples
-> sample shuffle buffer -> Pillow decode. A sample that cannot be decoded is skipped with one
logged warning and counted in `reader.skipped` (per process: each DataLoader worker counts
in its own copy).
"""

from __future__ import annotations

import io
import json
import logging
import random
from dataclasses import dataclass
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Callable, Iterable, Iterator

import webdataset as wds
from PIL import Image
from torch import Tensor

from navit_pe.packing import PackedBatch, StreamPacker
from navit_pe.prepare import DEFAULT_OUT, DataError, default_source, prepare, shards_intact

__all__ = ["DataError", "Reader", "ensure_prepared", "load_meta", "make_dataset", "packed", "prepare_command",
           "shard_urls", "split_sizes", "transformed"]

log = logging.getLogger(__name__)
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def ensure_prepared(root: str | Path = DEFAULT_OUT, dataset: str = "cifar10") -> Path:
    """Return `root`/`dataset` once it holds meta.json and its shards.

    Prepares it from the default source (<repo>/../shared/data/cifar10) when that exists,
    else raises DataError saying what to run.
    """
    ddir = Path(root) / dataset
    meta_path = ddir / "meta.json"
    if meta_path.is_file() and shards_intact(ddir, load_meta(ddir)):
        return ddir
    source = default_source()
    if dataset != "cifar10" or not source.exists():
        raise DataError(f"{ddir} is not prepared and there is no default source for it; run "
                        f"{prepare_command(dataset, root)}")
    return prepare(source, root, dataset=dataset)


def prepare_command(dataset: str, root: str | Path = DEFAULT_OUT) -> str:
    """The command that prepares `dataset` under `root` (for error messages)."""
    if dataset in ("cifar10", "cifar100"):
        return f"python data/prepare_cifar.py --source PATH --dataset {dataset} --out {root}"
    return f"python data/prepare_images.py SOURCE --name {dataset} --out {root}"


def split_sizes(meta: dict, split: str) -> list[tuple[int, int]] | None:
    """Every image's source size (h, w) in `split`, from meta.json's size counts (None when the
    dataset was prepared without them)."""
    counts = meta.get("splits", {}).get(split, {}).get("sizes")
    if not counts:
        return None
    out = []
    for hw, n in counts.items():
        h, w = (int(v) for v in hw.split("x"))
        out += [(h, w)] * int(n)
    return out


def load_meta(root: str | Path) -> dict:
    """The meta.json of a prepared dataset directory."""
    path = Path(root) / "meta.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path} not found; run {prepare_command(Path(root).name, Path(root).parent)} "
                        "first") from None
    except ValueError as exn:
        raise DataError(f"{path} is not valid JSON ({exn})") from None


def shard_urls(root: str | Path, split: str) -> list[str]:
    """Paths of the shards of `split`, in meta.json order."""
    splits = load_meta(root)["splits"]
    if split not in splits:
        raise DataError(f"no split {split!r} in {Path(root) / 'meta.json'}; have {sorted(splits)}")
    return [str(Path(root) / shard["file"]) for shard in splits[split]["shards"]]


def make_dataset(root: str | Path, split: str, shuffle: bool = True, seed: int = 0,
                 shuffle_buffer: int = 1000, epoch: int = 0, nodesplit: bool = True) -> Reader:
    """A pipeline over the `split` shards of dataset dir `root` yielding (PIL RGB image, label).

    shuffle: shuffle the shard order and the samples (buffer of `shuffle_buffer`), seeded by
        (seed, epoch), so a run is reproducible; set_epoch() changes it per epoch.
    nodesplit: give each torch.distributed rank its own part of the data (wds.split_by_node);
        DataLoader workers always get disjoint parts (wds.split_by_worker). With fewer shards
        than ranks (or workers) the split falls back to every k-th sample, so each sample is
        still read exactly once per epoch over all ranks and workers. Parts may differ in size.
    """
    return Reader(_ReadState(shard_urls(root, split), shuffle, seed, shuffle_buffer, epoch,
                             nodesplit))


@dataclass
class _ReadState:
    """Settings and counters shared by a Reader, its compose() copies, and its stages."""

    urls: list[str]
    shuffle: bool
    seed: int
    shuffle_buffer: int
    epoch: int
    nodesplit: bool
    skipped: int = 0


class Reader(wds.DataPipeline):
    """wds.DataPipeline of (PIL RGB image, label); extend with .compose(stage) or .append()."""

    def __init__(self, state: _ReadState):
        self.state = state
        super().__init__(
            partial(_my_shards, state),
            wds.tarfile_to_samples(handler=partial(_skip_error, state)),
            partial(_my_samples, state),
            partial(_shuffle_samples, state),
            partial(_decode, state),
        )

    @property
    def skipped(self) -> int:
        """Bad samples skipped so far by this process."""
        return self.state.skipped

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for `epoch` from the next iteration on (DataLoader workers get it when
        they start, i.e. for non-persistent workers at the next iter())."""
        self.state.epoch = epoch


# ----------------------------------------------------------------------------- pipeline stages


def _partition(state: _ReadState) -> tuple[list[str], int, int]:
    """This rank/worker's shards, plus (stride, offset): keep samples i % stride == offset.

    Shards go to ranks and then to workers while there are at least as many shards as takers;
    otherwise all of them read the same shards and take every k-th sample.
    """
    urls = list(state.urls)
    if state.shuffle:  # the same order on every rank and worker, or the split would overlap
        random.Random(f"shards/{state.seed}/{state.epoch}").shuffle(urls)
    rank, world, worker, workers = wds.utils.pytorch_worker_info()
    stride, offset = 1, 0
    if state.nodesplit and world > 1:
        if len(urls) >= world:
            urls = list(wds.split_by_node(urls))
        else:
            stride, offset = world, rank
    if workers > 1:
        if len(urls) >= workers:
            urls = list(wds.split_by_worker(urls))
        else:
            stride, offset = stride * workers, offset + stride * worker
    return urls, stride, offset


def _my_shards(state: _ReadState) -> Iterator[dict]:
    urls, _, _ = _partition(state)
    return iter([{"url": url} for url in urls])


def _my_samples(state: _ReadState, samples: Iterable[dict]) -> Iterator[dict]:
    _, stride, offset = _partition(state)
    return islice(samples, offset, None, stride)


def _shuffle_samples(state: _ReadState, samples: Iterable[dict]) -> Iterator[dict]:
    """Buffer shuffle, seeded per (seed, epoch, rank, worker)."""
    if not state.shuffle or state.shuffle_buffer <= 1:
        yield from samples
        return
    rank, _, worker, _ = wds.utils.pytorch_worker_info()
    rng = random.Random(f"samples/{state.seed}/{state.epoch}/{rank}/{worker}")
    buf: list[dict] = []
    for sample in samples:
        if len(buf) < state.shuffle_buffer:
            buf.append(sample)
            continue
        i = rng.randrange(len(buf))
        buf[i], sample = sample, buf[i]
        yield sample
    rng.shuffle(buf)
    yield from buf


def _decode(state: _ReadState, samples: Iterable[dict]) -> Iterator[tuple[Image.Image, int]]:
    for sample in samples:
        try:
            ext = next(ext for ext in IMAGE_EXTS if ext in sample)
            image = Image.open(io.BytesIO(sample[ext]))
            image.load()
            if image.mode != "RGB":
                image = image.convert("RGB")
            label = int(sample["cls"])
        except Exception as exn:  # StopIteration (no image), PIL errors, bad .cls, ...
            state.skipped += 1
            log.warning("skipping bad sample %s in %s: %s", sample.get("__key__"),
                        sample.get("__url__"), repr(exn))
            continue
        yield image, label


def _skip_error(state: _ReadState, exn: Exception) -> bool:
    """webdataset handler for unreadable tar data: log it, count it, carry on."""
    state.skipped += 1
    log.warning("skipping unreadable shard data: %r", exn)
    return True


# ----------------------------------------------------------------------------- after the reader
# Two generator stages (iterator in, iterator out) that turn the reader's (PIL, label) pairs into
# fixed-shape PackedBatches; they compose with a Reader (`reader.compose(transformed(...),
# packed(...))`) or chain over any iterator. navit_pe.stages wraps them for a DataLoader.


def transformed(fn: Callable[[Image.Image, random.Random], Tensor], seed: str
                ) -> Callable[[Iterable], Iterator[tuple[Tensor, int]]]:
    """Stage: (PIL, label) -> (fn(img, rng), label). The rng is seeded by `seed` plus this
    process's rank and DataLoader worker, so a stream is reproducible from its seed alone."""
    def stage(samples: Iterable[tuple[Image.Image, int]]) -> Iterator[tuple[Tensor, int]]:
        rank, _, worker, _ = wds.utils.pytorch_worker_info()
        rng = random.Random(f"{seed}/{rank}/{worker}")
        for img, label in samples:
            yield fn(img, rng), label
    return stage


def packed(patch_size: int, max_seq_len: int, batch_seqs: int, buffer_size: int = 512,
           cls_token: bool = True, fixed_batches: bool = True
           ) -> Callable[[Iterable], Iterator[PackedBatch]]:
    """Stage: (tensor [C, H, W], label) -> fixed-shape PackedBatches [batch_seqs, max_seq_len]."""
    return StreamPacker(patch_size, max_seq_len, batch_seqs, buffer_size=buffer_size,
                        cls_token=cls_token, fixed_batches=fixed_batches)
