"""Patch n' Pack: cut images into patches and pack several images into each sequence.

The story of this file, top-down:
1. `patchify` cuts one image [C, H, W] into patches [N, C*p*p] with (row, col) coords.
2. `PackedBatch` holds B sequences of L tokens; every token carries its patch coordinate,
   the grid (h, w) of its image, and its image id (-1 on padding). Optional CLS slots
   (one per image, placed before the image's patches) are marked by `is_cls`.
3. `pack` packs a list of images (first-fit decreasing); `StreamPacker` packs a stream of
   images into fixed-shape [B, L] batches (best-fit decreasing over a buffer), for training.
4. `drop_tokens` keeps a random subset of every image's patches (NaViT token dropping).

Everything here is data-pipeline code: the model only reads a PackedBatch.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, fields, replace
from functools import lru_cache
from typing import Callable, Iterable, Iterator, Sequence

import torch
from einops import rearrange
from torch import Tensor

PAD_ID = -1


# ----------------------------------------------------------------------------- patchify
def patchify(image: Tensor, patch_size: int) -> tuple[Tensor, Tensor]:
    """image [C, H, W] -> patches [N, C*p*p], coords [N, 2] (row, col), row-major."""
    if image.ndim != 3:
        raise ValueError(f"expected an image of shape [C, H, W], got shape {tuple(image.shape)}")
    c, h, w = image.shape
    p = patch_size
    if h < p or w < p:
        raise ValueError(f"image of size {h}x{w} is smaller than one {p}x{p} patch")
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
    gh, gw = h // p, w // p
    # "c (gh p1) (gw p2) -> (gh gw) (c p1 p2)", as views and one copy (einops costs ~50 us a call)
    patches = image.reshape(c, gh, p, gw, p).permute(1, 3, 0, 2, 4).reshape(gh * gw, c * p * p)
    return patches, grid_coords(gh, gw)


@lru_cache(maxsize=1024)
def grid_coords(gh: int, gw: int) -> Tensor:
    """[gh * gw, 2] long (row, col), row-major; cached (shared: never modify it in place)."""
    return torch.stack(torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij"), -1).reshape(-1, 2)


# ----------------------------------------------------------------------------- PackedBatch
@dataclass
class PackedBatch:
    """B packed sequences of L tokens. Image ids number the images 0..n-1 in input order."""

    patches: Tensor  # [B, L, C*p*p] patch pixels (zeros on CLS slots and padding)
    coords: Tensor  # [B, L, 2] long, (row, col) of the patch in its image (0 on CLS/padding)
    grid: Tensor  # [B, L, 2] long, (h, w) in patches of the token's image (0 on padding)
    image_ids: Tensor  # [B, L] long, image index 0..n-1, PAD_ID (-1) on padding
    is_cls: Tensor  # [B, L] bool, True on the CLS slot of each image (if packed with CLS)
    labels: Tensor | None  # [n] long labels in image-id order, or None
    num_images: int  # n
    sample_ids: Tensor | None = None  # [n] long: each image's index in its dataset split, where known

    # -- masks and statistics
    def attention_mask(self) -> Tensor:
        """bool [B, 1, L, L], True = may attend: block-diagonal over image ids.

        Padding tokens attend only to themselves, so no row is fully masked (no NaN), and
        no real token ever attends to padding or to another image.
        """
        ids = self.image_ids
        same = (ids[:, :, None] == ids[:, None, :]) & (ids >= 0)[:, :, None]
        eye = torch.eye(ids.shape[1], dtype=torch.bool, device=ids.device)
        return (same | eye).unsqueeze(1)

    @property
    def is_real(self) -> Tensor:
        """bool [B, L]: token belongs to an image (patch or CLS)."""
        return self.image_ids >= 0

    @property
    def is_patch(self) -> Tensor:
        """bool [B, L]: token is an image patch (not CLS, not padding)."""
        return self.is_real & ~self.is_cls

    def efficiency(self) -> float:
        """Real tokens (patches and CLS) / all tokens."""
        return self.is_real.float().mean().item()

    def image_grids(self) -> Tensor:
        """[n, 2] long: (h, w) in patches of every image, in image-id order."""
        out = torch.zeros(self.num_images, 2, dtype=torch.long, device=self.grid.device)
        real = self.is_real
        out[self.image_ids[real]] = self.grid[real]
        return out

    def tokens_per_image(self) -> Tensor:
        """[n] long: number of patch tokens (CLS excluded) of every image in the batch."""
        ids = self.image_ids[self.is_patch]
        return torch.bincount(ids, minlength=self.num_images)

    def _map(self, fn) -> "PackedBatch":
        return PackedBatch(**{f.name: (fn(v) if isinstance(v, Tensor) else v)
                              for f in fields(self) for v in [getattr(self, f.name)]})

    def to(self, device, non_blocking: bool = False) -> "PackedBatch":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "PackedBatch":  # lets torch DataLoader(pin_memory=True) work
        return self._map(lambda t: t.pin_memory())

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.image_ids.shape)


# ----------------------------------------------------------------------------- assembling
@dataclass
class _Item:
    patches: Tensor  # [N, P]
    coords: Tensor  # [N, 2]
    grid: tuple[int, int]
    label: int | None
    age: int = 0  # batches this item has waited in the stream buffer

    def length(self, cls_token: bool) -> int:
        return self.patches.shape[0] + int(cls_token)


def _make_item(image: Tensor, patch_size: int, label: int | None) -> _Item:
    patches, coords = patchify(image, patch_size)
    _, h, w = image.shape
    return _Item(patches, coords, (h // patch_size, w // patch_size), label)


def _assemble(bins: list[list[_Item]], seq_len: int, patch_dim: int, cls_token: bool,
              dtype: torch.dtype) -> PackedBatch:
    """Write bins of items into one PackedBatch; images are numbered bin by bin. Every token's
    slot is computed first, then each field is written with one scatter (not item by item)."""
    b = len(bins)
    items = [it for items in bins for it in items]
    lengths = torch.tensor([it.length(cls_token) for it in items], dtype=torch.long)
    n = len(items)
    # the start of every item: its sequence * seq_len + its offset inside the sequence
    starts = []
    for s, its in enumerate(bins):
        pos = 0
        for it in its:
            starts.append(s * seq_len + pos)
            pos += it.length(cls_token)
    starts_t = torch.tensor(starts, dtype=torch.long)
    item_of_token = torch.repeat_interleave(torch.arange(n), lengths)  # [T] image id of every token
    offset = torch.arange(len(item_of_token)) - torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths)
    slot = starts_t[item_of_token] + offset  # [T] flat slot of every token
    is_patch = offset >= int(cls_token)  # the first slot of an item is its CLS (with cls_token)
    ids = torch.full((b * seq_len,), PAD_ID, dtype=torch.long).index_put_((slot,), item_of_token)
    grids = torch.tensor([it.grid for it in items], dtype=torch.long).reshape(n, 2)
    grid = torch.zeros(b * seq_len, 2, dtype=torch.long).index_put_((slot,), grids[item_of_token])
    is_cls = torch.zeros(b * seq_len, dtype=torch.bool)
    if cls_token:
        is_cls[slot[~is_patch]] = True
    patches = torch.zeros(b * seq_len, patch_dim, dtype=dtype)
    coords = torch.zeros(b * seq_len, 2, dtype=torch.long)
    if n:
        patch_slots = slot[is_patch]
        patches.index_put_((patch_slots,), torch.cat([it.patches for it in items]).to(dtype))
        coords.index_put_((patch_slots,), torch.cat([it.coords for it in items]))
    labels = [it.label for it in items]
    has_labels = n > 0 and all(lbl is not None for lbl in labels)
    lab = torch.tensor(labels, dtype=torch.long) if has_labels else None
    return PackedBatch(patches.view(b, seq_len, patch_dim), coords.view(b, seq_len, 2), grid.view(b, seq_len, 2),
                       ids.view(b, seq_len), is_cls.view(b, seq_len), lab, n)


def _check_fits(item: _Item, max_seq_len: int, cls_token: bool) -> None:
    if item.length(cls_token) > max_seq_len:
        h, w = item.grid
        raise ValueError(
            f"an image of {h}x{w} patches needs {item.length(cls_token)} tokens"
            f"{' (with its CLS token)' if cls_token else ''}, more than max_seq_len={max_seq_len}")


def _first_fit_decreasing(items: Sequence[_Item], capacity: int, cls_token: bool) -> list[list[int]]:
    """Indices of items per bin; bins opened as needed, longest items first."""
    order = sorted(range(len(items)), key=lambda i: -items[i].length(cls_token))
    bins: list[list[int]] = []
    free: list[int] = []
    for i in order:
        need = items[i].length(cls_token)
        for b, room in enumerate(free):
            if room >= need:
                bins[b].append(i)
                free[b] -= need
                break
        else:
            bins.append([i])
            free.append(capacity - need)
    return bins


def pack(images: Sequence[Tensor], patch_size: int, max_seq_len: int,
         labels: Sequence[int] | Tensor | None = None, cls_token: bool = False) -> PackedBatch:
    """Pack a list of images [C, H, W] into as few sequences of `max_seq_len` as first-fit
    decreasing finds. Image ids follow input order; inside a sequence images keep input order.
    With `cls_token`, one CLS slot per image is reserved just before its patches."""
    if len(images) == 0:
        raise ValueError("pack() got an empty list of images")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"got {len(labels)} labels for {len(images)} images")
    items = [_make_item(img, patch_size, None if labels is None else int(labels[i]))
             for i, img in enumerate(images)]
    for it in items:
        _check_fits(it, max_seq_len, cls_token)
    channels = {img.shape[0] for img in images}
    if len(channels) != 1:
        raise ValueError(f"images have different channel counts: {sorted(channels)}")
    bins = _first_fit_decreasing(items, max_seq_len, cls_token)
    bins = [sorted(b) for b in bins]
    batch = _assemble([[items[i] for i in b] for b in bins], max_seq_len,
                      items[0].patches.shape[1], cls_token, images[0].dtype)
    # renumber so that ids follow input order (assembly numbered them bin by bin)
    placed = [i for b in bins for i in b]  # assembly id -> input index
    remap = torch.tensor(placed + [PAD_ID])  # index -1 maps padding to itself
    batch.image_ids = remap[batch.image_ids]
    if batch.labels is not None:
        batch.labels = torch.as_tensor([int(x) for x in labels], dtype=torch.long)
    return batch


# ----------------------------------------------------------------------------- streaming
class StreamPacker:
    """Packs a stream of (image [C, H, W], label) into fixed-shape PackedBatches [B, L].

    Best-fit decreasing over a buffer: when the buffer holds `buffer_size` images, the
    longest images (and any that waited `max_age` batches) are placed first, each into the
    fullest sequence it still fits. Images that fit nowhere wait for the next batch. At the
    end of the stream the buffer is flushed, so every image is emitted exactly once; the last
    batches may be less full (and may hold fewer than B sequences unless `fixed_batches`).
    """

    def __init__(self, patch_size: int, max_seq_len: int, batch_seqs: int,
                 buffer_size: int = 512, cls_token: bool = False, max_age: int = 4,
                 fixed_batches: bool = True):
        if buffer_size < 1 or batch_seqs < 1:
            raise ValueError("buffer_size and batch_seqs must be positive")
        self.patch_size, self.max_seq_len, self.batch_seqs = patch_size, max_seq_len, batch_seqs
        self.buffer_size, self.cls_token, self.max_age = buffer_size, cls_token, max_age
        self.fixed_batches = fixed_batches

    def _fill(self, buffer: list[_Item]) -> tuple[list[list[_Item]], list[_Item]]:
        """Choose B bins from the buffer; return (bins, leftover)."""
        cap, cls = self.max_seq_len, self.cls_token
        order = sorted(buffer, key=lambda it: (it.age < self.max_age, -it.length(cls)))
        bins: list[list[_Item]] = [[] for _ in range(self.batch_seqs)]
        free = [cap] * self.batch_seqs
        left: list[_Item] = []
        for it in order:
            need = it.length(cls)
            best, best_room = -1, cap + 1
            for b, room in enumerate(free):  # best fit: the fullest bin that still fits
                if need <= room < best_room:
                    best, best_room = b, room
            if best < 0:
                it.age += 1
                left.append(it)
            else:
                bins[best].append(it)
                free[best] -= need
        return [b for b in bins if b] if not self.fixed_batches else bins, left

    def __call__(self, samples: Iterable[tuple[Tensor, int]]) -> Iterator[PackedBatch]:
        buffer: list[_Item] = []
        patch_dim, dtype = None, torch.float32
        for image, label in samples:
            item = _make_item(image, self.patch_size, int(label))
            _check_fits(item, self.max_seq_len, self.cls_token)
            patch_dim, dtype = item.patches.shape[1], item.patches.dtype
            buffer.append(item)
            if len(buffer) >= self.buffer_size:
                bins, buffer = self._fill(buffer)
                yield _assemble(bins, self.max_seq_len, patch_dim, self.cls_token, dtype)
        while buffer:  # flush
            bins, buffer = self._fill(buffer)
            yield _assemble(bins, self.max_seq_len, patch_dim, self.cls_token, dtype)


# ----------------------------------------------------------------------------- token dropping
def drop_tokens(batch: PackedBatch, rate: float | Callable[[int, int], float],
                generator: torch.Generator | None = None) -> PackedBatch:
    """Keep a random subset of every image's patch tokens (NaViT token dropping).

    `rate` is the fraction to drop, a float or a callable (h, w) -> float of the image's grid
    in patches. Each image keeps round(n * (1 - rate)) patches, at least one; CLS slots are
    always kept. Kept tokens keep their order, coords, grid and ids; the sequences are
    compacted and cut to the longest kept sequence, so L shrinks.
    """
    n = batch.num_images
    grids = batch.image_grids()
    counts = batch.tokens_per_image()
    if callable(rate):
        rates = torch.tensor([float(rate(int(h), int(w))) for h, w in grids.tolist()])
    else:
        rates = torch.full((n,), float(rate))
    if ((rates < 0) | (rates >= 1)).any():
        raise ValueError(f"token drop rate must be in [0, 1), got {rates.min():.3g}..{rates.max():.3g}")
    keep_n = torch.clamp(torch.round(counts * (1 - rates.to(counts.device))).long(), min=1)

    ids, dev = batch.image_ids, batch.image_ids.device
    B, L = ids.shape
    # a random rank for every patch within its image: sort by (image id, random key)
    u = torch.rand(B, L, generator=generator).to(dev)
    key = torch.where(batch.is_patch, ids.double() + u.double(), torch.full_like(u, -2.0).double())
    order = torch.argsort(key, dim=1, stable=True)
    sorted_ids = torch.gather(torch.where(batch.is_patch, ids, torch.full_like(ids, -2)), 1, order)
    pos = torch.arange(L, device=dev).expand(B, L)
    is_start = torch.ones_like(sorted_ids, dtype=torch.bool)
    is_start[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    first = torch.cummax(torch.where(is_start, pos, torch.zeros_like(pos)), dim=1).values
    rank = torch.empty_like(pos).scatter_(1, order, pos - first)
    keep_patch = batch.is_patch & (rank < keep_n[ids.clamp(min=0)])
    keep = keep_patch | (batch.is_cls & batch.is_real)

    # compact: kept tokens first, in their original order
    new_len = int(keep.sum(1).max().item()) if keep.any() else 1
    idx = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :new_len]
    valid = torch.gather(keep, 1, idx)

    def take(t: Tensor, fill) -> Tensor:
        g = torch.gather(t, 1, idx.view(B, new_len, *([1] * (t.ndim - 2))).expand(B, new_len, *t.shape[2:]))
        mask = valid.view(B, new_len, *([1] * (t.ndim - 2)))
        return torch.where(mask, g, torch.full_like(g, fill))

    return replace(batch, patches=take(batch.patches, 0), coords=take(batch.coords, 0),
                   grid=take(batch.grid, 0), image_ids=take(ids, PAD_ID),
                   is_cls=take(batch.is_cls, False))
