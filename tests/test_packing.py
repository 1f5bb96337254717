"""Packing: patchify, masks checked by hand, streaming packer, token dropping, bad input."""
import random

import pytest
import torch

from navit_pe.packing import PAD_ID, StreamPacker, drop_tokens, pack, patchify


def img(h, w, c=3, fill=None):
    if fill is not None:
        return torch.full((c, h, w), float(fill))
    return torch.randn(c, h, w)


# ----------------------------------------------------------------------------- patchify
def test_patchify_hand_checked():
    # a 1-channel 4x6 image with patch 2 -> a 2x3 grid; pixel value = 10*y + x
    y, x = torch.meshgrid(torch.arange(4), torch.arange(6), indexing="ij")
    image = (10 * y + x).float()[None]
    patches, coords = patchify(image, 2)
    assert coords.tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]
    assert patches[0].tolist() == [0, 1, 10, 11]
    assert patches[2].tolist() == [4, 5, 14, 15]
    assert patches[4].tolist() == [22, 23, 32, 33]


def test_patchify_channel_layout():
    image = torch.stack([torch.zeros(2, 2), torch.ones(2, 2)])  # c=2
    patches, _ = patchify(image, 2)
    assert patches.tolist() == [[0, 0, 0, 0, 1, 1, 1, 1]]  # (c p1 p2)


# ----------------------------------------------------------------------------- masks by hand
def test_mask_block_diagonal_by_hand():
    # a 2x3-patch image (6 tokens) and a 1x1-patch image (1 token) in L=8: one padding slot
    a, b = img(2, 3), img(1, 1)
    batch = pack([a, b], patch_size=1, max_seq_len=8)
    assert batch.shape == (1, 8)
    assert batch.image_ids.tolist() == [[0, 0, 0, 0, 0, 0, 1, -1]]
    assert batch.grid[0, :7].tolist() == [[2, 3]] * 6 + [[1, 1]]
    assert batch.coords[0, :6].tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[:6, :6] = True  # image 0 sees itself only
    expected[6, 6] = True  # image 1 sees itself only
    expected[7, 7] = True  # padding: only its own diagonal, never seen by a real token
    mask = batch.attention_mask()
    assert mask.shape == (1, 1, 8, 8)
    assert torch.equal(mask[0, 0], expected)
    assert batch.efficiency() == pytest.approx(7 / 8)


def test_mask_with_cls_slots_by_hand():
    batch = pack([img(2, 3), img(1, 1)], patch_size=1, max_seq_len=9, cls_token=True)
    assert batch.image_ids.tolist() == [[0] * 7 + [1] * 2]
    assert batch.is_cls.tolist() == [[True] + [False] * 6 + [True, False]]
    assert batch.coords[0, 0].tolist() == [0, 0] and batch.grid[0, 0].tolist() == [2, 3]
    m = batch.attention_mask()[0, 0]
    assert m[:7, :7].all() and m[7:, 7:].all() and not m[:7, 7:].any() and not m[7:, :7].any()


def test_mask_matches_ids_on_random_packs():
    gen = random.Random(0)
    images = [img(4 * gen.randint(1, 6), 4 * gen.randint(1, 6)) for _ in range(40)]
    batch = pack(images, 4, 64)
    mask = batch.attention_mask()[:, 0]
    ids = batch.image_ids
    for s in range(ids.shape[0]):
        for i in range(ids.shape[1]):
            for j in range(0, ids.shape[1], 7):
                want = (ids[s, i] == ids[s, j] and ids[s, i] >= 0) or i == j
                assert bool(mask[s, i, j]) == bool(want)
    assert mask.any(-1).all()  # no fully masked row


def test_pack_ids_follow_input_order_and_keep_pixels():
    images = [img(4 * h, 4 * w) for h, w in [(1, 2), (3, 3), (2, 2), (1, 1), (4, 2)]]
    batch = pack(images, 4, 16, labels=[5, 6, 7, 8, 9])
    assert batch.num_images == 5
    assert batch.labels.tolist() == [5, 6, 7, 8, 9]
    for i, im in enumerate(images):
        patches, coords = patchify(im, 4)
        sel = batch.image_ids == i
        assert torch.equal(batch.patches[sel], patches)  # row-major order kept
        assert torch.equal(batch.coords[sel], coords)
        assert (batch.grid[sel] == torch.tensor([im.shape[1] // 4, im.shape[2] // 4])).all()
    assert torch.equal(batch.image_grids(), torch.tensor([[1, 2], [3, 3], [2, 2], [1, 1], [4, 2]]))


# ----------------------------------------------------------------------------- streaming packer
def default_mix(n, seed=0):
    gen = random.Random(seed)
    sides = list(range(16, 49, 4))
    return [(torch.zeros(3, gen.choice(sides), gen.choice(sides)), gen.randrange(10)) for _ in range(n)]


def test_stream_packer_emits_every_image_once_with_fixed_shapes():
    samples = default_mix(700)
    for i, (im, _) in enumerate(samples):
        im.fill_(i)  # tag each image by its pixel value
    packer = StreamPacker(4, 256, batch_seqs=8, buffer_size=128, cls_token=True)
    seen = []
    for batch in packer(iter(samples)):
        assert batch.shape == (8, 256)
        assert int(batch.is_cls.sum()) == batch.num_images
        for i in range(batch.num_images):
            tag = batch.patches[(batch.image_ids == i) & ~batch.is_cls][:, 0]
            assert (tag == tag[0]).all()
            seen.append((int(tag[0]), int(batch.labels[i])))
    assert sorted(t for t, _ in seen) == list(range(700))
    assert all(samples[t][1] == lbl for t, lbl in seen)


@pytest.mark.parametrize("cls_token", [False, True])
def test_packing_efficiency_default_mix(cls_token):
    """Acceptance: >= 98 % real tokens on the default mix (16..48 step 4, patch 4, L=256)."""
    packer = StreamPacker(4, 256, batch_seqs=32, buffer_size=512, cls_token=cls_token)
    effs = [b.efficiency() for b in packer(iter(default_mix(6000)))]
    steady = effs[:-3]  # the final flush of the buffer is allowed to be emptier
    assert sum(steady) / len(steady) >= 0.98, sum(steady) / len(steady)


# ----------------------------------------------------------------------------- token dropping
def test_drop_tokens_rate_and_consistency():
    gen = torch.Generator().manual_seed(0)
    images = [img(4 * h, 4 * w) for h, w in [(8, 8), (6, 10), (12, 12), (1, 1), (2, 3)]]
    batch = pack(images, 4, 400, labels=list(range(5)), cls_token=True)
    dropped = drop_tokens(batch, 0.5, generator=gen)
    counts, kept = batch.tokens_per_image(), dropped.tokens_per_image()
    want = torch.clamp(torch.round(counts * 0.5), min=1)
    assert torch.equal(kept, want.long())
    assert int(dropped.is_cls.sum()) == 5  # CLS slots always kept
    assert dropped.shape[1] < batch.shape[1]
    # every kept token is one of the original tokens of that image with the same coords/pixels
    for i in range(5):
        orig = {tuple(c): p for c, p in zip(batch.coords[(batch.image_ids == i) & batch.is_patch].tolist(),
                                              batch.patches[(batch.image_ids == i) & batch.is_patch])}
        sel = (dropped.image_ids == i) & dropped.is_patch
        for c, p in zip(dropped.coords[sel].tolist(), dropped.patches[sel]):
            assert torch.equal(orig[tuple(c)], p)
        assert (dropped.grid[dropped.image_ids == i] == batch.image_grids()[i]).all()
    pad = dropped.image_ids == PAD_ID
    assert not dropped.is_cls[pad].any() and (dropped.patches[pad] == 0).all()


def test_drop_tokens_callable_rate_and_min_one():
    batch = pack([img(4, 4), img(32, 32)], 4, 80)
    dropped = drop_tokens(batch, lambda h, w: 0.99 if h * w == 1 else 0.25)
    assert dropped.tokens_per_image().tolist() == [1, 48]


def test_drop_tokens_kept_fraction_matches_rate_over_many_images():
    images = [im for im, _ in default_mix(300, seed=1)]
    batch = pack(images, 4, 256)
    dropped = drop_tokens(batch, 0.3, generator=torch.Generator().manual_seed(1))
    frac = dropped.tokens_per_image().sum() / batch.tokens_per_image().sum()
    assert frac.item() == pytest.approx(0.7, abs=0.01)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("images, match", [
    ([torch.zeros(3, 2, 8)], "smaller than one 4x4 patch"),
    ([torch.zeros(3, 8, 10)], "8x10 is not a multiple of the patch size 4"),
    ([torch.zeros(3, 80, 80)], "more than max_seq_len=64"),
    ([], "empty"),
])
def test_pack_bad_input(images, match):
    with pytest.raises(ValueError, match=match):
        pack(images, 4, 64)


def test_stream_packer_rejects_too_long_image():
    with pytest.raises(ValueError, match="max_seq_len"):
        list(StreamPacker(4, 16, 2, cls_token=True)(iter([(torch.zeros(3, 16, 16), 0)])))
