"""Test accuracy of a packed model at one resolution, counted once per image across ranks.

Used by train.py at the end of every epoch and by eval_resolutions.py, so both report the
same number for the same model and resolution (same data, same packing, same code path).
"""
from __future__ import annotations

import contextlib
from functools import lru_cache
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from .data import ImageStore
from .model import NaViT
from .stages import EvalBatches
from .transforms import TokenBudget


def seq_len_for(size, patch_size: int, max_seq_len: int, cls_token: bool) -> int:
    """`max_seq_len`, raised where one image of `size` (h, w), or the largest image of a size
    policy, needs more tokens."""
    tokens = (size[0] // patch_size) * (size[1] // patch_size) if isinstance(size, tuple) else size.max_tokens()
    need = tokens + int(cls_token)
    return max(max_seq_len, need)


@lru_cache(maxsize=4)
def _store(root: str, split: str) -> ImageStore:
    return ImageStore.load(root, split)


def load_split(data: str | Path | ImageStore, split: str = "test") -> ImageStore:
    """`data` itself if already loaded, else the split of the dataset dir `data` (loaded once per process)."""
    return data if isinstance(data, ImageStore) else _store(str(Path(data).resolve()), split)


@torch.no_grad()
def evaluate(model: NaViT, data: str | Path | ImageStore, size: tuple[int, int] | TokenBudget, *,
             tokens_per_batch: int = 8192, max_seq_len: int | None = None, accelerator=None, mixed_precision: str = "no",
             num_workers: int = 0, split: str = "test", max_images: int = 0) -> tuple[int, int]:
    """(correct, total) over the whole `split` of `data` (a dataset dir or a loaded ImageStore),
    every image resized to `size` = (h, w), or by a size policy (TokenBudget: each image to its own
    size within the budget).

    Under Accelerate rank r evaluates every world-th image and the counts are summed (packed
    batches hold different numbers of images, so we reduce counts, never gather predictions).
    `max_seq_len` is raised automatically when one image needs more tokens. `max_images` > 0:
    only the split's first `max_images` images.
    """
    cfg = model.config
    p = cfg.patch_size
    if isinstance(size, tuple) and (size[0] % p or size[1] % p or min(size) < p):
        raise ValueError(f"resolution {size[0]}x{size[1]} is not a positive multiple of the patch size {p}")
    cls = cfg.pool == "cls"
    L = seq_len_for(size, p, max_seq_len or cfg.max_seq_len, cls)
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    batches = EvalBatches(load_split(data, split), size, p, L, max(1, tokens_per_batch // L), cls, rank, world,
                          max_images)
    loader = DataLoader(batches, batch_size=None, num_workers=num_workers)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if mixed_precision == "bf16"
                else contextlib.nullcontext())
    correct = total = 0
    try:
        for batch in loader:
            batch = batch.to(device)
            with autocast:
                logits = model(batch)
            correct += int((logits.argmax(-1) == batch.labels).sum())
            total += batch.num_images
    finally:
        model.train(was_training)
    if accelerator is not None and accelerator.num_processes > 1:
        counts = accelerator.reduce(torch.tensor([correct, total], device=accelerator.device), "sum")
        correct, total = (int(x) for x in counts.tolist())
    return correct, total
