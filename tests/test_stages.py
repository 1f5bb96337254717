"""The packing stage inside a webdataset pipeline, and the train/eval streams."""
import random

import torch

from navit_pe.data import make_dataset, packed, transformed
from navit_pe.stages import EvalStream, TrainStream
from navit_pe.transforms import EvalTransform, ResolutionSampler, TrainTransform, to_tensor


def test_packing_stage_composes_with_reader(tiny_shards):
    reader = make_dataset(tiny_shards, "test", shuffle=False)
    pipeline = reader.compose(transformed(lambda img, rng: to_tensor(img), "t"),
                              packed(patch_size=4, max_seq_len=160, batch_seqs=4, buffer_size=8,
                                     fixed_batches=False))
    batches = list(pipeline)
    assert all(b.shape[1] == 160 and b.shape[0] <= 4 for b in batches)
    labels = torch.cat([b.labels for b in batches])
    want = [label for _, label in make_dataset(tiny_shards, "test", shuffle=False)]
    assert sorted(labels.tolist()) == sorted(want) and len(want) == 30


def test_eval_stream_every_image_once_any_size(tiny_shards):
    for size in [(8, 8), (16, 32), (64, 64)]:
        stream = EvalStream(tiny_shards, size, 4, max_seq_len=257, batch_seqs=3, cls_token=True)
        batches = list(stream)
        assert sum(b.num_images for b in batches) == 30
        assert all((b.image_grids() == torch.tensor([size[0] // 4, size[1] // 4])).all() for b in batches)


def test_train_stream_fixed_shapes_and_reproducible(tiny_shards):
    def first(n, seed):
        stream = TrainStream(tiny_shards, ResolutionSampler(16, 32, 4), TrainTransform(), 4, 128, 2,
                             cls_token=True, seed=seed, epoch=0, buffer_size=16)
        it = iter(stream)
        return [next(it) for _ in range(n)]

    a, b, c = first(12, 0), first(12, 0), first(12, 1)  # 12 batches > one pass over 60 images
    assert all(x.shape == (2, 128) for x in a)
    assert all(torch.equal(x.patches, y.patches) for x, y in zip(a, b))
    assert not all(torch.equal(x.patches, y.patches) for x, y in zip(a, c))
