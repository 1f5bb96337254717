"""Read prepared shards (CIFAR, or a folder of images from data/prepare_images.py): a split in RAM
for random access, or a webdataset stream.

    root = ensure_prepared()                  # data/cifar10, preparing it on first use
    train = ImageStore.load(root, "train")    # what training and evaluation use (random access)
    test = make_dataset(root, "test", shuffle=False)  # a stream of (PIL RGB image, int label)
    labels = test.compose(my_stage)           # further stages append to a copy

The stream: this rank/worker's share of the shards (shuffled per seed+epoch) -> tar samples
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
from typing import Iterable, Iterator

import numpy as np
import webdataset as wds
from PIL import Image

from navit_pe.prepare import DEFAULT_OUT, DataError, default_source, prepare, shards_intact

__all__ = ["DataError", "ImageStore", "Reader", "ensure_prepared", "load_meta", "make_dataset", "prepare_command",
           "shard_urls"]

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


# ----------------------------------------------------------------------------- random access in RAM
class ImageStore:
    """One split held in RAM for random access by index: the training plan (navit_pe.stages)
    picks any image of any epoch and step directly, so epochs are exact, resume jumps to its step
    and ranks split by index.

    Images of at most `decode_max_pixels` pixels are kept decoded (uint8 HWC; CIFAR-10's train
    split is 154 MB, and JPEG decoding, ~90 us an image here, is paid once); larger ones keep
    their encoded bytes and are decoded on access. Bad samples are skipped and counted as by the
    Reader. Every process loads the whole split (index i is the same image on every rank).
    """

    def __init__(self, pixels: list, labels: list[int], sizes: list[tuple[int, int]], keys: list[str],
                 skipped: int = 0):
        self.pixels, self.labels, self.sizes, self.keys = pixels, labels, sizes, keys
        self.skipped = skipped  # bad samples left out

    @classmethod
    def load(cls, root: str | Path, split: str, decode_max_pixels: int = 64 * 64,
             progress: bool = False) -> "ImageStore":
        from tqdm.auto import tqdm

        state = _ReadState(shard_urls(root, split), shuffle=False, seed=0, shuffle_buffer=0, epoch=0,
                           nodesplit=False)
        samples = wds.DataPipeline(partial(_my_shards, state),
                                   wds.tarfile_to_samples(handler=partial(_skip_error, state)))
        pixels, labels, sizes, keys = [], [], [], []
        info = load_meta(root).get("splits", {}).get(split, {})
        count = info.get("count")
        # samples each shard holds (meta.json): a damaged tar header ends Python's tar reader
        # without an error, so the samples read are counted against them
        expected = {url: s.get("count") for url, s in zip(state.urls, info.get("shards", []))}
        read: dict[str, int] = {}
        bad = 0  # samples read but not decodable
        for sample in tqdm(samples, total=count, desc=f"loading {split} into RAM", disable=not progress,
                           leave=False, dynamic_ncols=True):
            url = str(sample.get("__url__"))
            read[url] = read.get(url, 0) + 1
            decoded = _decode_one(state, sample)
            if decoded is None:
                bad += 1
                continue
            image, label = decoded
            w, h = image.size
            if h * w <= decode_max_pixels:
                pixels.append(np.asarray(image, dtype=np.uint8))
            else:  # keep the original bytes: a large photo decoded is 30x its JPEG
                ext = next(ext for ext in IMAGE_EXTS if ext in sample)
                pixels.append(sample[ext])
            labels.append(label)
            sizes.append((h, w))
            keys.append(str(sample.get("__key__")))
        skipped = state.skipped
        if expected and all(isinstance(n, int) for n in expected.values()):
            missing = {url: n - read.get(url, 0) for url, n in expected.items() if n > read.get(url, 0)}
            for url, n in missing.items():
                log.warning("%s: %d of its %d samples could not be read (damaged tar data)", url, n, expected[url])
            skipped = bad + sum(missing.values())  # exactly the samples left out
        if not labels:
            raise DataError(f"no readable {split} images in {root}")
        return cls(pixels, labels, sizes, keys, skipped)

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, i: int) -> Image.Image:
        """Image i as a PIL RGB image."""
        px = self.pixels[i]
        if isinstance(px, np.ndarray):
            return Image.fromarray(px)
        image = Image.open(io.BytesIO(px))
        return image.convert("RGB") if image.mode != "RGB" else image


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


def _decode_one(state: _ReadState, sample: dict) -> tuple[Image.Image, int] | None:
    """(PIL RGB image, label) of one tar sample, or None (counted, one warning) when it is bad."""
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
        return None
    return image, label


def _decode(state: _ReadState, samples: Iterable[dict]) -> Iterator[tuple[Image.Image, int]]:
    for sample in samples:
        decoded = _decode_one(state, sample)
        if decoded is not None:
            yield decoded


def _skip_error(state: _ReadState, exn: Exception) -> bool:
    """webdataset handler for unreadable tar data: log it, count it, carry on."""
    state.skipped += 1
    log.warning("skipping unreadable shard data: %r", exn)
    return True
