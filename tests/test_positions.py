"""Float positions: the trained extent, the test-time position modes, coordinate augmentation,
and the new bias encodings against direct references."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from navit_pe import NaViT, pack
from navit_pe.positions import augment, interpolate
from navit_pe.posenc import POS_EMBEDS, REGISTRY, PosContext, build_posenc

torch.set_num_threads(1)

TINY = dict(dim=32, depth=2, heads=4, mlp_ratio=2.0, dropout=0.0, patch_size=2, max_seq_len=300)
TRAIN_SIZES = [(8, 12), (12, 8), (4, 4)]  # px, patch 2: grids up to 6x6 -> trained extent (6, 6)


def trained_model(name: str, **kw) -> NaViT:
    """A tiny model with non-trivial position parameters, after one training-mode forward."""
    torch.manual_seed(0)
    model = NaViT(name, **{**TINY, **kw})
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight.normal_(std=0.3)
        for pname, p in model.pos.named_parameters():
            if pname != "freqs":
                p.copy_(torch.randn_like(p))
    return model


def images(sizes, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, h, w, generator=g) for h, w in sizes]


@pytest.mark.parametrize("name", POS_EMBEDS)
def test_both_modes_give_training_logits_inside_and_differ_beyond(name, tmp_path):
    """Inside the trained range both test-time modes reproduce the training-time logits exactly,
    also after a save / load (the extent is in the state dict); beyond it they differ unless the
    encoding declares them the same."""
    model = trained_model(name).train()
    ims = images(TRAIN_SIZES)
    batch = model.pack(ims)
    with torch.no_grad():
        train_logits = model(batch)
    assert model.pos.trained_extent.tolist() == [6.0, 6.0]
    model.save_pretrained(tmp_path)
    loaded = NaViT.from_pretrained(tmp_path).eval()
    small, large = images([(4, 8), (10, 2)], seed=3), images([(20, 14), (8, 24)], seed=2)  # beyond 6 x 6
    out = {}
    for mode in ("extrapolate", "interpolate"):
        loaded.set_pos_mode(mode)
        with torch.no_grad():
            assert torch.equal(loaded(batch), train_logits), mode
            out[mode] = loaded(small), loaded(large)
    assert torch.equal(out["extrapolate"][0], out["interpolate"][0])  # smaller grids: the same too
    same = torch.equal(out["extrapolate"][1], out["interpolate"][1])
    assert same == REGISTRY[name].same_in_both_modes, (name, same)


def test_pos_mode_is_checked():
    model = NaViT("rope", dim=16, heads=2, depth=1)
    with pytest.raises(ValueError, match="extrapolate, interpolate"):
        model.set_pos_mode("stretch")
    with pytest.raises(ValueError, match="extrapolate, interpolate"):
        NaViT("rope", dim=16, heads=2, depth=1, pos_mode="stretch")


@pytest.mark.parametrize("name", ["learned_2d", "factorized"])
def test_tables_never_read_untrained_rows(name):
    """Rows and columns beyond the trained extent (here NaN) are never read; interpolate mode
    resamples the trained part (bilinear, corners aligned), extrapolate clamps to its edge."""
    model = trained_model(name, max_grid=16).train()
    with torch.no_grad():
        model(images(TRAIN_SIZES))  # trained extent 6 x 6 of a 16 x 16 table
        pe = model.pos
        if name == "learned_2d":
            grid = pe.table.view(16, 16, -1)
            grid[6:] = grid[:, 6:] = float("nan")
            trained = rearrange(grid[:6, :6], "h w d -> 1 d h w")
        else:
            pe.rows[6:] = pe.cols[6:] = float("nan")
    model.eval()
    h, w = 12, 9  # patches, beyond the trained 6 x 6 along both axes
    coords = torch.cartesian_prod(torch.arange(h), torch.arange(w))[None]
    ctx = PosContext(coords, torch.tensor([h, w]).expand(1, h * w, 2), torch.zeros(1, h * w, dtype=torch.bool),
                     torch.zeros(1, h * w, dtype=torch.long))
    extrapolated = pe.embed(ctx)[0]
    interpolated = pe.embed(interpolate(ctx, pe.trained_extent))[0]
    assert torch.isfinite(extrapolated).all() and torch.isfinite(interpolated).all()
    edge = pe.embed(PosContext(coords.clamp(max=5), ctx.grid, ctx.is_cls, ctx.image_ids))[0]
    assert torch.equal(extrapolated, edge)  # clamped to the last trained row / column
    if name == "learned_2d":
        ref = F.interpolate(trained, size=(h, w), mode="bilinear", align_corners=True)
        assert torch.allclose(interpolated, rearrange(ref, "1 d h w -> (h w) d"), atol=1e-5)
    for mode in ("extrapolate", "interpolate"):
        model.set_pos_mode(mode)
        with torch.no_grad():
            assert torch.isfinite(model(images([(24, 18), (30, 6)]))).all(), mode


def test_coordinate_augmentation():
    """shift: one offset per image and axis in [-S, S]; jitter: a per-axis scale in [1/J, J];
    rescale: one scale in [1/R, R] for both axes; CLS and padding stay at 0."""
    ims = images([(8, 12), (12, 8), (6, 6)])
    batch = pack(ims, 2, 64, cls_token=True)
    ctx = PosContext(batch.coords, batch.grid, batch.is_cls, batch.image_ids)
    patch, ids, rc = ctx.is_patch, ctx.image_ids[ctx.is_patch], ctx.coords[ctx.is_patch].float()
    torch.manual_seed(0)
    for kind, (s, j, r) in {"shift": (1.5, 1, 1), "jitter": (0, 1.5, 1), "rescale": (0, 1, 1.5)}.items():
        out = augment(ctx, s, j, r)
        pos = out.pos[patch]
        assert out.pos[~patch].abs().sum() == 0
        for i in range(3):
            p, c = pos[ids == i], rc[ids == i]
            if kind == "shift":
                d = p - c
                assert torch.allclose(d, d[:1].expand_as(d)) and d.abs().max() <= 1.5 and d[0, 0] != d[0, 1]
            else:
                ratio = (p / c)[(c > 0).all(-1)]  # every patch of the image: the same scale per axis
                assert torch.allclose(ratio, ratio[:1].expand_as(ratio), atol=1e-6)
                assert ((ratio >= 1 / 1.5) & (ratio <= 1.5)).all()
                assert torch.allclose(out.scale[patch][ids == i], ratio[:1].expand(len(c), 2), atol=1e-6)
                assert (ratio[0, 0] == ratio[0, 1]) == (kind == "rescale")
    assert augment(ctx, 0, 1, 1) is ctx  # off: nothing drawn, nothing changed


@pytest.mark.parametrize("name", ["rope", "fire_2d", "learned_2d", "learned_1d"])
def test_augmentation_only_in_training_and_reproducible(name):
    aug = dict(coord_shift=2.0, coord_jitter=1.3, coord_rescale=1.5)
    plain, augmented = trained_model(name), trained_model(name, **aug)
    batch = plain.pack(images(TRAIN_SIZES))
    with torch.no_grad():
        for m in (plain, augmented):
            m.train()
            m(batch)  # the trained extent, identical weights otherwise
        augmented.pos.trained_extent.copy_(plain.pos.trained_extent)
        assert torch.equal(plain.eval()(batch), augmented.eval()(batch))  # eval: never augmented
        plain.train(), augmented.train()
        torch.manual_seed(5)
        a = augmented(batch)
        torch.manual_seed(5)
        b = augmented(batch)
        assert torch.equal(a, b)  # reproducible from the torch seed
        assert not torch.allclose(a, plain(batch), atol=1e-4)  # training: augmented


# ----------------------------------------------------------------------------- the bias encodings
def one_image_ctx(h: int, w: int, scale=(1.0, 1.0)) -> PosContext:
    """CLS + an h x w image, positions scaled by `scale` per axis."""
    rc = torch.cat([torch.zeros(1, 2, dtype=torch.long), torch.cartesian_prod(torch.arange(h), torch.arange(w))])
    n = len(rc)
    is_cls = torch.zeros(n, dtype=torch.bool)
    is_cls[0] = True
    s = torch.tensor(scale).expand(n, 2).clone()
    s[0] = 1.0
    pos = rc.float() * s
    return PosContext(rc[None], torch.tensor([h, w]).expand(1, n, 2), is_cls[None], torch.zeros(1, n, dtype=torch.long),
                      pos[None], s[None])


def test_alibi_2d_and_lookhere_against_a_direct_loop():
    ctx = one_image_ctx(3, 4)
    q = torch.randn(1, 4, 13, 8)
    alibi, lh = build_posenc("alibi_2d", heads=4, dim=32, depth=3), build_posenc("lookhere", heads=4, dim=32, depth=3)
    a, b = alibi.attn_bias(q, ctx, 0), lh.attn_bias(q, ctx, 2)
    p = ctx.pos[0]
    for i in range(13):
        for j in range(13):
            dist = 0.0 if i == 0 or j == 0 else math.dist(p[i].tolist(), p[j].tolist())
            dr, dc = (p[j] - p[i]).tolist()
            for h in range(4):
                assert a[0, h, i, j].item() == pytest.approx(-(2.0 ** (-2 * (h + 1))) * dist, abs=1e-6)
                sees = i == 0 or j == 0 or [dr <= 0, dc <= 0, dr >= 0, dc >= 0][h]  # up, left, down, right
                want = -0.5 * 0.5 * dist if sees else -1e4  # last layer factor 0.5, slope 1/2
                assert b[0, h, i, j].item() == pytest.approx(want, abs=1e-5)


def test_fire_2d_against_a_direct_mlp_per_pair():
    """The offset-table gather equals the MLP run on every pair, with float (scaled) positions
    and two images of different scale and extent in one sequence."""
    pe = build_posenc("fire_2d", heads=2, dim=16, depth=2)
    with torch.no_grad():
        pe.log_c.fill_(0.7)
    a, b = one_image_ctx(3, 5, (1.3, 0.8)), one_image_ctx(4, 2)
    ctx = PosContext(*(torch.cat([x, y], 1) for x, y in zip(
        (a.coords, a.grid, a.is_cls, a.image_ids, a.pos, a.scale),
        (b.coords, b.grid, b.is_cls, b.image_ids + 1, b.pos, b.scale))))
    q = torch.randn(1, 2, ctx.pos.shape[1], 8)
    bias = pe.attn_bias(q, ctx, 1)[0]
    c = math.exp(0.7)
    psi = lambda x: math.copysign(math.log1p(c * abs(x)), x)  # noqa: E731
    for i in range(ctx.pos.shape[1]):
        for j in range(ctx.pos.shape[1]):
            if ctx.image_ids[0, i] != ctx.image_ids[0, j]:
                continue  # across images: masked by the model
            if ctx.is_cls[0, i] or ctx.is_cls[0, j]:
                assert bias[:, i, j].abs().max() == 0
                continue
            ext = ctx.extent[0, i].tolist()
            u = torch.tensor([psi((ctx.pos[0, j, k] - ctx.pos[0, i, k]).item()) / psi(max(ext[k] - 1, 1))
                              for k in (0, 1)])
            want = torch.relu(u @ pe.w1[1] + pe.b1[1]) @ pe.w2[1] + pe.b2[1]
            assert torch.allclose(bias[:, i, j], want, atol=1e-5), (i, j)


def test_learned_1d_samples_moved_positions_where_it_resamples_the_grid():
    """The augmented path (grid_sample at float positions) reads the table where the resampling
    to each grid (F.interpolate) puts the integer positions."""
    pe = build_posenc("learned_1d", dim=16, pos_grid=8)
    for h, w in [(5, 11), (16, 16), (3, 3)]:
        ctx = one_image_ctx(h, w)
        assert torch.allclose(pe.sample(ctx)[0, 1:], pe.embed(ctx)[0, 1:], atol=1e-6), (h, w)
