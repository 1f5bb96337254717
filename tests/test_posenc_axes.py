"""Encodings on non-square grids, rows and columns told apart.

Hand-computed values on a 3x5 (and 5x3) grid for every coordinate-reading encoding: RoPE turns
the first quarter of channel pairs by the row and the second by the column; RoPE-Mixed at
x = col, y = row; the tables index (row, col); fractional divides the row by the grid height and
the column by the grid width. And at the model: an image and its transpose (patch size 1, so
both have the same multiset of tokens) get the same logits without position and different
logits with every encoding that reads coordinates."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from navit_pe import NaViT
from navit_pe.posenc import POS_EMBEDS, REGISTRY, PosContext, build_posenc

torch.set_num_threads(1)

H, W = 3, 5  # a non-square grid: 3 rows, 5 columns


def grid_ctx(h: int, w: int, cls: bool = True) -> PosContext:
    """One image: [CLS,] its h*w patches in row-major order."""
    coords = ([(0, 0)] if cls else []) + [(r, c) for r in range(h) for c in range(w)]
    n = len(coords)
    is_cls = torch.zeros(n, dtype=torch.bool)
    is_cls[0] = cls
    return PosContext(torch.tensor(coords)[None], torch.tensor([(h, w)] * n)[None], is_cls[None],
                      torch.zeros(1, n, dtype=torch.long))


def patches(h: int, w: int):
    """(slot, row, col) of every patch in grid_ctx(h, w) (slot 0 is CLS)."""
    return [(1 + r * w + c, r, c) for r in range(h) for c in range(w)]


def randomize(pe, seed: int = 0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in pe.parameters():
            p.copy_(torch.randn_like(p))
    return pe


def rotate_pairs(x: torch.Tensor, angles: list[float]) -> torch.Tensor:
    """x [d]: pair m = (x_m, x_{m+d/2}) turned by angles[m], written out one pair at a time."""
    d2 = x.shape[0] // 2
    out = x.clone().double()
    for m, a in enumerate(angles):
        x1, x2 = float(x[m]), float(x[m + d2])
        out[m], out[m + d2] = x1 * math.cos(a) - x2 * math.sin(a), x1 * math.sin(a) + x2 * math.cos(a)
    return out


# ----------------------------------------------------------------------------- rotary
@pytest.mark.parametrize("h, w", [(H, W), (W, H)])
def test_rope_turns_row_pairs_by_the_row_and_column_pairs_by_the_column(h, w):
    pe = build_posenc("rope", dim=32, heads=2, rope_base=100.0)  # head_dim 16: 8 pairs, 4 per axis
    ctx = grid_ctx(h, w)
    torch.manual_seed(1)
    q, k = torch.randn(2, 1, 2, 1 + h * w, 16).unbind(0)
    rq, rk = pe.rotate(q, k, ctx, 0)
    theta = [100.0 ** (-m / 4) for m in range(4)]
    for slot, r, c in patches(h, w):
        angles = [r * t for t in theta] + [c * t for t in theta]  # pairs 0-3: row, 4-7: column
        for head in range(2):
            for x, rx in ((q, rq), (k, rk)):
                want = rotate_pairs(x[0, head, slot], angles)
                assert torch.allclose(rx[0, head, slot].double(), want, atol=1e-5), (slot, r, c)
    assert torch.equal(rq[..., 0, :], q[..., 0, :])  # CLS: not turned


@pytest.mark.parametrize("h, w", [(H, W), (W, H)])
def test_rope_mixed_angle_is_col_fx_plus_row_fy(h, w):
    pe = build_posenc("rope_mixed", dim=32, heads=2, depth=2)
    ctx = grid_ctx(h, w)
    torch.manual_seed(1)
    q, k = torch.randn(2, 1, 2, 1 + h * w, 16).unbind(0)
    layer = 1
    rq, rk = pe.rotate(q, k, ctx, layer)
    f = pe.freqs.detach()[layer]  # [heads, 8, (x, y)]
    for slot, r, c in patches(h, w):
        for head in range(2):
            angles = [c * float(f[head, m, 0]) + r * float(f[head, m, 1]) for m in range(8)]
            for x, rx in ((q, rq), (k, rk)):
                want = rotate_pairs(x[0, head, slot], angles)
                assert torch.allclose(rx[0, head, slot].double(), want, atol=1e-5), (slot, r, c)


# ----------------------------------------------------------------------------- additive
def sincos_half(pos: float, d: int) -> list[float]:
    """One axis of the MAE table, d channels: sin(pos w_k) for k < d/2, then cos(pos w_k)."""
    ws = [10000.0 ** (-k / (d // 2)) for k in range(d // 2)]
    return [math.sin(pos * wk) for wk in ws] + [math.cos(pos * wk) for wk in ws]


@pytest.mark.parametrize("h, w", [(H, W), (W, H)])
def test_sincos_rows_first_columns_second_on_a_non_square_grid(h, w):
    pe = build_posenc("sincos", dim=16)
    emb = pe.embed(grid_ctx(h, w))[0]
    for slot, r, c in patches(h, w):
        want = torch.tensor(sincos_half(r, 8) + sincos_half(c, 8))
        assert torch.allclose(emb[slot], want, atol=1e-6), (r, c)


@pytest.mark.parametrize("h, w", [(H, W), (W, H)])
def test_learned_2d_reads_the_row_col_entry(h, w):
    pe = randomize(build_posenc("learned_2d", dim=8, max_grid=6))
    emb = pe.embed(grid_ctx(h, w))[0]
    for slot, r, c in patches(h, w):
        assert torch.equal(emb[slot], pe.table[r * 6 + c]), (r, c)


@pytest.mark.parametrize("mode", ["sum", "concat"])
def test_factorized_row_table_by_row_column_table_by_column(mode):
    pe = randomize(build_posenc("factorized", dim=8, max_grid=6, factorized_mode=mode))
    for h, w in ((H, W), (W, H)):
        emb = pe.embed(grid_ctx(h, w))[0]
        for slot, r, c in patches(h, w):
            want = (pe.rows[r] + pe.cols[c]) if mode == "sum" else torch.cat([pe.rows[r], pe.cols[c]])
            assert torch.allclose(emb[slot], want, atol=1e-6), (mode, r, c)


def fractions(r: int, c: int, h: int, w: int) -> tuple[float, float]:
    return (r + 0.5) / h, (c + 0.5) / w  # the row by the height, the column by the width


@pytest.mark.parametrize("h, w", [(H, W), (W, H), (2, 6)])
def test_fractional_table_divides_rows_by_height_and_columns_by_width(h, w):
    bins = 5
    pe = randomize(build_posenc("fractional", dim=8, fractional_fn="table", fractional_bins=bins))
    emb = pe.embed(grid_ctx(h, w))[0]
    at = np.linspace(0, 1, bins)  # entry j sits at j / (bins - 1)
    rows, cols = pe.rows.detach().numpy(), pe.cols.detach().numpy()
    for slot, r, c in patches(h, w):
        fr, fc = fractions(r, c, h, w)
        want = [np.interp(fr, at, rows[:, ch]) + np.interp(fc, at, cols[:, ch]) for ch in range(8)]
        assert np.allclose(emb[slot].detach().numpy(), want, atol=1e-5), (r, c)


@pytest.mark.parametrize("h, w", [(H, W), (W, H)])
def test_fractional_sincos_and_fourier_read_the_same_fractions(h, w):
    sc = build_posenc("fractional", dim=16, fractional_fn="sincos", max_grid=16)
    emb = sc.embed(grid_ctx(h, w))[0]
    for slot, r, c in patches(h, w):
        fr, fc = fractions(r, c, h, w)
        want = torch.tensor(sincos_half(fr * 16, 8) + sincos_half(fc * 16, 8))
        assert torch.allclose(emb[slot], want, atol=1e-5), (r, c)
    ff = randomize(build_posenc("fractional", dim=8, fractional_fn="fourier"))
    emb = ff.embed(grid_ctx(h, w))[0]
    freqs = ff.freqs.detach().double()  # [2, 4]: (row, col) x frequencies
    for slot, r, c in patches(h, w):
        fr, fc = fractions(r, c, h, w)
        ang = 2 * math.pi * (fr * freqs[0] + fc * freqs[1])
        want = ff.proj(torch.cat([ang.sin(), ang.cos()]).float())
        assert torch.allclose(emb[slot], want, atol=1e-4), (r, c)


# ----------------------------------------------------------------------------- model level
def pixel_model(name: str) -> NaViT:
    """Patch size 1, one channel; position tables at std 1, attention and head weights scaled up
    so that position visibly moves the logits (the 0.02 init would hide it)."""
    torch.manual_seed(0)
    model = NaViT(name, dim=32, depth=2, heads=2, dropout=0.0, channels=1, patch_size=1, max_seq_len=64).eval()
    with torch.no_grad():
        for pname, p in model.pos.named_parameters():
            if pname != "freqs":
                p.copy_(torch.randn_like(p))
        for block in model.blocks:
            block.attn.qkv.weight.normal_(std=0.3)
        model.head.weight.normal_(std=1.0)
    return model


@pytest.mark.parametrize("name", POS_EMBEDS)
def test_an_image_and_its_transpose(name):
    """Patch size 1: an image and its transpose are the same set of tokens at transposed
    positions. Without position the model cannot tell them apart; with any encoding that reads
    coordinates it must (a model that mixed up rows and columns consistently would still pass,
    the hand-computed tests above pin which is which)."""
    model = pixel_model(name)
    with torch.no_grad():
        x = torch.randn(1, H, W)
        a, b = model([x]), model([x.transpose(1, 2).contiguous()])
    if name == "none" or REGISTRY[name].mirror_symmetric:  # no position, or distances only: blind to it
        assert torch.allclose(a, b, atol=1e-4)
    else:
        assert (a - b).abs().max() > 1e-2, name


@pytest.mark.parametrize("name", POS_EMBEDS)
def test_rows_and_columns_are_both_read(name):
    """Mirroring the image left-right moves tokens only along their rows, top-bottom only along
    their columns: an encoding that ignored one axis could not see one of the two."""
    model = pixel_model(name)
    with torch.no_grad():
        x = torch.randn(1, H, W)
        base = model([x])
        for dim in (1, 2):  # rows reversed, columns reversed
            moved = model([x.flip(dim)])
            if name == "none" or REGISTRY[name].mirror_symmetric:
                assert torch.allclose(base, moved, atol=1e-4)
            else:
                assert (base - moved).abs().max() > 1e-2, (name, dim)
