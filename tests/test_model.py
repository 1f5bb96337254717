"""The packed model: packed == per-image, isolation between images, dropping, save/load."""
import copy
import pytest
import torch

from navit_pe import POS_EMBEDS, NaViT, NaViTConfig, pack
from navit_pe.model import fast_dropout
from navit_pe.posenc import REGISTRY, PosContext
from navit_pe.posenc.rope import mixed_rotate, rotate_pair

SMALL = dict(dim=32, depth=2, heads=2, num_classes=5, max_seq_len=64, pos_grid=4, max_grid=8)
SIZES = [(8, 12), (4, 4), (16, 8), (12, 12), (4, 28), (20, 4)]


def images(seed=0, sizes=SIZES):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, h, w, generator=g) for h, w in sizes]


def model(pos, pool, **kw):
    torch.manual_seed(0)
    m = NaViT(pos, pool=pool, **{**SMALL, **kw}).eval()
    with torch.no_grad():  # make the encodings' learned parts non-trivial (tables start near 0)
        for p in m.pos.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return m


@pytest.mark.parametrize("pool", ["cls", "mean", "attn"])
@pytest.mark.parametrize("pos", POS_EMBEDS)
def test_packed_equals_per_image(pos, pool):
    m, ims = model(pos, pool), images()
    with torch.no_grad():
        packed = m(ims)
        alone = torch.cat([m([im]) for im in ims])
    assert packed.shape == (len(ims), 5)
    assert (packed - alone).abs().max().item() <= 1e-5


@pytest.mark.parametrize("pos", POS_EMBEDS)
def test_isolation_between_images(pos):
    m, ims = model(pos, "cls"), images()
    with torch.no_grad():
        base = m(ims)
        # change one image's pixels: every other image's logits stay the same
        changed = list(ims)
        changed[2] = torch.randn_like(ims[2])
        out = m(changed)
        assert not torch.allclose(out[2], base[2])
        keep = [i for i in range(len(ims)) if i != 2]
        assert (out[keep] - base[keep]).abs().max().item() <= 1e-5
        # other packing partners and another max_seq_len: the same logits for image 0
        other = m.pack([ims[0]] + images(seed=1, sizes=[(16, 16), (4, 8)]))
        assert (m(other)[0] - base[0]).abs().max().item() <= 1e-5
        m.config.max_seq_len = 200
        assert (m(ims) - base).abs().max().item() <= 1e-5


@pytest.mark.parametrize("attention", ["dense", "auto"])
def test_padding_never_changes_real_tokens(attention):
    m = model("sincos", "mean", attention=attention)
    ims = images()
    batch = m.pack(ims)
    batch2 = m.pack(ims)
    pad = batch2.image_ids < 0
    assert pad.any()
    batch2.patches[pad] = torch.randn_like(batch2.patches[pad]) * 100
    with torch.no_grad():
        assert torch.equal(m(batch), m(batch2))


def test_token_drop_only_in_training():
    m = model("sincos", "mean", dropout=0.0)  # so that token dropping is the only randomness
    ims = images()

    def twice():
        torch.manual_seed(1)
        a = m(ims)
        torch.manual_seed(2)
        return a, m(ims)

    with torch.no_grad():
        m.token_drop = 0.5
        a, b = twice()
        assert torch.equal(a, b)  # eval: nothing dropped
        m.train()
        m.token_drop = 0.0
        a, b = twice()
        assert torch.equal(a, b)  # training without dropping: deterministic
        m.token_drop = 0.5
        a, b = twice()
        assert not torch.allclose(a, b)  # training with dropping: a random subset each call


@pytest.mark.parametrize("attention", ["dense", "auto"])
def test_no_nan_with_padding_and_backward(attention):
    m = model("rope", "attn", attention=attention).train()
    batch = pack(images(), 4, 100, labels=[0, 1, 2, 3, 4, 0])
    assert (batch.image_ids < 0).any()
    loss = torch.nn.functional.cross_entropy(m(batch), batch.labels)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


def test_model_rejects_mismatched_batches():
    m = model("sincos", "cls")
    with pytest.raises(ValueError, match="CLS slot"):
        m(pack(images(), 4, 64, cls_token=False))
    with pytest.raises(ValueError, match="without CLS"):
        model("sincos", "mean")(pack(images(), 4, 64, cls_token=True))
    with pytest.raises(ValueError, match="more than max_seq_len"):
        m([torch.zeros(3, 64, 64)])
    with pytest.raises(ValueError, match="not a multiple"):
        m([torch.zeros(3, 6, 8)])
    with pytest.raises(ValueError, match="empty"):
        m([])


def test_unknown_encoding_lists_choices():
    with pytest.raises(ValueError, match="rope_mixed"):
        NaViT("sinus")


def test_save_and_from_pretrained(tmp_path):
    m = model("learned_1d" if "learned_1d" in POS_EMBEDS else "sincos", "attn")
    m.save_pretrained(tmp_path)
    again = NaViT.from_pretrained(tmp_path).eval()
    assert again.config == m.config
    with torch.no_grad():
        assert torch.equal(again(images()), m(images()))
    assert NaViTConfig.load(tmp_path / "config.json") == m.config


def test_fast_dropout_rate_and_scale():
    x = torch.ones(1000, 1000)
    y = fast_dropout(x, 0.1, training=True)
    dropped = (y == 0).float().mean().item()
    assert dropped == pytest.approx(26 / 256, abs=0.002)
    assert y.mean().item() == pytest.approx(1.0, abs=0.005)  # inverted scaling keeps the mean
    assert torch.equal(fast_dropout(x, 0.1, training=False), x)


def test_param_groups_cover_every_parameter_once():
    m = NaViT("sincos")
    groups = m.param_groups(1e-3)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(m.parameters()))
    no_decay = {id(p) for p in groups[1]["params"]}
    assert id(m.blocks[0].norm1.weight) in no_decay and id(m.blocks[0].mlp.fc1.bias) in no_decay
    assert id(m.blocks[0].mlp.fc1.weight) not in no_decay


@pytest.mark.parametrize("granularity", [0, 1, 16])
@pytest.mark.parametrize("pos", POS_EMBEDS)
def test_varlen_equals_dense_attention(pos, granularity):
    """The varlen layout (tokens regrouped by image) and the dense block-diagonal mask over the
    packed sequence compute the same logits and the same gradients."""
    m = model(pos, "cls", varlen_granularity=granularity)
    batch = pack(images(), 4, 64, labels=[0, 1, 2, 3, 4, 0], cls_token=True)
    outs, grads = {}, {}
    for attention in ("dense", "auto"):
        m.config.attention = attention
        m.zero_grad()
        out = m(batch)
        torch.nn.functional.cross_entropy(out, batch.labels).backward()
        outs[attention] = out.detach()
        grads[attention] = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    assert (outs["dense"] - outs["auto"]).abs().max().item() <= 1e-5
    for n, g in grads["dense"].items():
        assert torch.allclose(g, grads["auto"][n], atol=1e-5, rtol=1e-4), n


@pytest.mark.parametrize("scale", [None, 0.3])
@pytest.mark.parametrize("granularity", [1, 8])
def test_varlen_kernel_equals_sdpa_loop(granularity, scale, monkeypatch):
    """VarlenAttention (SDPA's CPU flash kernel per bucket, one autograd node) and the loop of
    F.scaled_dot_product_attention calls used elsewhere give the same output and qkv gradient,
    at the default scale and at a given one."""
    import navit_pe.attention as A

    if A._CPU_FLASH is None:
        pytest.skip("this torch has no CPU flash kernel")
    ids = torch.tensor([[0] * 7 + [1] * 12 + [-1], [2] * 5 + [3] * 12 + [4, 4, -1]])
    seg = A.Segments(ids, granularity)
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(seg.perm.numel(), 3, 2, 8, generator=g)
    grad = torch.randn(seg.perm.numel(), 16, generator=g)
    results = []
    for kernel in (A._CPU_FLASH, None):
        monkeypatch.setattr(A, "_CPU_FLASH", kernel)
        x = qkv.clone().requires_grad_()
        out = seg.attend(x, scale)
        out.backward(grad)
        results.append((out.detach(), x.grad))
    assert any(mask is not None for _, _, mask in seg.buckets) == (granularity > 1)
    (out_a, grad_a), (out_b, grad_b) = results
    assert torch.allclose(out_a, out_b, atol=1e-6)
    assert torch.allclose(grad_a, grad_b, atol=1e-6)


@pytest.mark.parametrize("attention", ["auto", "dense"])
def test_pairwise_bias_per_image_in_varlen(attention, monkeypatch):
    """In the varlen layout the pairwise hooks see [images, h, l, l] logits of each bucket of
    equal-length images (granularity 1), never the L x L of a packed sequence; dense sees [B, h, L, L]."""
    m = model("alibi_2d", "cls", varlen_granularity=1)
    shapes = []
    hook = m.pos.attn_bias

    def spy(q, ctx, layer):
        shapes.append(tuple(q.shape))
        return hook(q, ctx, layer)

    monkeypatch.setattr(m.pos, "attn_bias", spy)
    m.config.attention = attention
    ims = images()
    batch = pack(ims, 4, 64, cls_token=True)
    with torch.no_grad():
        m(batch)
    lengths = sorted({im.shape[1] * im.shape[2] // 16 + 1 for im in ims})  # patches + CLS
    if attention == "auto":
        assert sorted({s[2] for s in shapes}) == lengths
        assert sum(s[0] for s in shapes) == len(ims) * m.config.depth  # every image once per layer
    else:
        assert {s[0] for s in shapes} == {batch.patches.shape[0]} and {s[2] for s in shapes} == {64}


SHARED_BIAS = [n for n in POS_EMBEDS if REGISTRY[n].bias_from_positions]


@pytest.mark.parametrize("pos", SHARED_BIAS)
def test_a_bias_from_positions_reads_no_q(pos):
    """The encodings that may share one bias across images (bias_from_positions) give the same
    bias for any q: it reads the positions only."""
    m = model(pos, "cls")
    batch = pack(images(), 4, 64, cls_token=True)
    ctx = PosContext(batch.coords, batch.grid, batch.is_cls, batch.image_ids)
    g = torch.Generator().manual_seed(0)
    b, n = ctx.image_ids.shape
    q1, q2 = (torch.randn(b, m.config.heads, n, m.config.head_dim, generator=g) for _ in range(2))
    assert torch.equal(m.pos.attn_bias(q1, ctx, 0), m.pos.attn_bias(q2, ctx, 0))


@pytest.mark.parametrize("augmented", [False, True])
@pytest.mark.parametrize("pos", SHARED_BIAS)
def test_a_shared_bias_equals_one_bias_per_image(pos, augmented, monkeypatch):
    """Images of one size in one bucket share a single bias (computed on one row, broadcast); the
    logits are those of one bias per image bit for bit, the gradients equal, and images of the
    same length but another shape (2x3, 3x2), or with positions augmented per image, get their own."""
    import navit_pe.attention as A

    m = model(pos, "cls", varlen_granularity=1, dropout=0.0, coord_rescale=2.0 if augmented else 1.0)
    m.train(augmented)
    sizes = [(8, 12), (12, 8), (8, 12), (12, 12), (12, 12), (12, 12), (4, 4)]  # 2x3, 3x2, 2x3, 3x3 x3, 1x1
    batch = pack(images(sizes=sizes), 4, 64, labels=[0, 1, 2, 3, 4, 0, 1], cls_token=True)
    rows = []
    hook = m.pos.attn_bias
    monkeypatch.setattr(m.pos, "attn_bias", lambda q, ctx, layer: rows.append(q.shape[0]) or hook(q, ctx, layer))
    results = {}
    for shared in (True, False):
        if not shared:
            monkeypatch.setattr(A, "shared_row", lambda ctx: None)
        rows.clear()
        m.zero_grad()
        torch.manual_seed(1)  # the same augmentation draws
        out = m(batch)
        torch.nn.functional.cross_entropy(out, batch.labels).backward()
        results[shared] = (out.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
        per_layer = sorted(rows[: len(rows) // m.config.depth])
        # buckets: length 7 (2x3, 3x2, 2x3 + CLS), 10 (three 3x3), 2 (1x1)
        assert per_layer == ([1, 3, 3] if augmented or not shared else [1, 1, 3])
    (out_s, grads_s), (out_e, grads_e) = results[True], results[False]
    assert torch.equal(out_s, out_e)
    for n, g in grads_e.items():
        assert torch.allclose(grads_s[n], g, atol=1e-6, rtol=1e-5), n


WIDENING = [n for n in POS_EMBEDS if REGISTRY[n].widens_attention]


@pytest.mark.parametrize("kernel", ["flash", "loop"])
@pytest.mark.parametrize("positions", ["grid", "interpolate", "augmented", "dropped"])
@pytest.mark.parametrize("pos", WIDENING)
def test_widened_attention_equals_explicit_softmax(pos, positions, kernel, monkeypatch):
    """An encoding that widens q, k, v (its bias and value term as extra channels, run on the flash
    kernel or the SDPA loop) gives the logits and gradients of its explicit softmax, bucket by
    bucket: on the grid, on float positions (interpolated into the trained extent, with distances
    at exactly .5; coordinate augmentation in training), and with half the tokens dropped, per-axis
    jitter and padded buckets (masked keys, unused slots); and in the varlen layout it never
    calls the pairwise hooks."""
    import navit_pe.attention as A

    if kernel == "loop":
        monkeypatch.setattr(A, "_CPU_FLASH", None)
    dropped = positions == "dropped"
    m = model(pos, "cls", varlen_granularity=16 if dropped else 1, dropout=0.0, coord_rescale=2.0,
              coord_shift=0.5, coord_jitter=2.0 if dropped else 1.0)
    m.token_drop = 0.5 if dropped else 0.0
    if positions == "interpolate":
        m.config.pos_mode = "interpolate"
        m.pos.trained_extent.fill_(3.0)  # 3x3 trained: larger grids are scaled by 2/(g-1), fractions
    m.train(positions in ("augmented", "dropped"))
    batch = pack(images(), 4, 64, labels=[0, 1, 2, 3, 4, 0], cls_token=True)
    calls, widths = [], []
    for name in ("attn_bias", "attn_value"):
        hook = getattr(m.pos, name)
        monkeypatch.setattr(m.pos, name, lambda *a, _hook=hook: calls.append(1) or _hook(*a))
    widen = m.pos.widen
    monkeypatch.setattr(m.pos, "widen", lambda *a: widths.append(widen(*a).shape[-1]) or widen(*a))
    results = []
    for widened in (True, False):
        m.pos.widens_attention = widened
        m.zero_grad()
        torch.manual_seed(1)  # the same coordinate augmentation draws
        out = m(batch)
        torch.nn.functional.cross_entropy(out, batch.labels).backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}))
        if widened:
            assert not calls and widths
            if not dropped:  # (dropping may remove the last row or column)
                rows, cols = (int(batch.coords[..., a].max()) + 1 for a in (0, 1))
                assert set(widths) == {m.config.head_dim + rows + 1 + cols + 1}
        else:
            assert calls
    (out_w, grads_w), (out_e, grads_e) = results
    assert (out_w - out_e).abs().max().item() <= 1e-5
    assert grads_w.keys() == grads_e.keys()
    for n, g in grads_e.items():
        assert torch.allclose(grads_w[n], g, atol=1e-5, rtol=1e-4), n


@pytest.mark.parametrize("attention", ["auto", "dense"])
def test_training_forward_with_dropout_in_both_layouts(attention):
    """Dropout draws one random byte per element of whatever layout the blocks run on: the slot
    layout [1, S, dim] or the dense packed one [B, L, dim]."""
    torch.manual_seed(0)
    m = NaViT("sincos", dim=32, depth=2, heads=2, dropout=0.3, attention=attention, max_seq_len=80).train()
    imgs = [torch.randn(3, 16, 16) for _ in range(5)]
    out = m(imgs)
    out.sum().backward()
    assert out.shape == (5, 10) and torch.isfinite(out).all()
    m.eval()
    with torch.no_grad():
        assert torch.equal(m(imgs), m(imgs))  # no dropout in eval


def test_compiled_parts_only_in_training():
    """compile_blocks' functions serve training only; evaluation runs the eager pre/post, the same
    code as a model reloaded from its files."""
    m = NaViT("rope", dim=32, depth=1, heads=2)
    imgs = [torch.randn(3, 16, 16) for _ in range(2)]

    def refuse(*args):
        raise AssertionError("a compiled part ran")

    m.blocks[0].pre_fn = m.blocks[0].post_fn = refuse
    with torch.no_grad():
        m.eval()(imgs)  # fine: eager
        with pytest.raises(AssertionError, match="compiled part"):
            m.train()(imgs)


@pytest.mark.parametrize("name", ["rope", "rope_mixed"])
def test_rotary_compiled_rotation_in_training_only(name):
    """compile_parts gives the rotary encodings a compiled rotation that training uses (every
    layer) and evaluation does not, as for the blocks' compiled parts."""
    m = NaViT(name, dim=32, depth=2, heads=2).compile_blocks()  # the trainer's call; compiles lazily
    for block in m.blocks:
        block.pre_fn, block.post_fn = block.pre, block.post  # keep the blocks eager (fast test)
    assert set(m.pos.compiled) == {rotate_pair, mixed_rotate}
    assert all(c is not fn for fn, c in m.pos.compiled.items())  # compiled wrappers, not the functions
    expected = {"rope": "rotate_pair", "rope_mixed": "mixed_rotate"}[name]
    calls = []

    def spy(fn):
        def wrapped(*args):
            calls.append(fn.__name__)
            return fn(*args)
        return wrapped

    m.pos.compiled = {fn: spy(fn) for fn in m.pos.compiled}  # the eager functions, counted
    imgs = [torch.randn(3, 16, 16) for _ in range(2)]
    with torch.no_grad():
        m.eval()(imgs)
        assert calls == []
        m.train()(imgs)
    assert calls == [expected] * m.config.depth


def test_rotary_compiled_rotation_equals_eager():
    """The compiled RoPE-Mixed rotation (angles, cos / sin and the rotation of q and k in one
    graph) gives the eager outputs and gradients, the learned frequencies' included."""
    torch.manual_seed(0)
    eager = NaViT("rope_mixed", dim=32, depth=1, heads=2, dropout=0.0).train()
    fused = copy.deepcopy(eager)
    fused.pos.compile_parts()
    assert fused.pos.compiled[mixed_rotate] is not mixed_rotate
    imgs = [torch.randn(3, 16, 12), torch.randn(3, 8, 20)]
    outs = []
    for m in (eager, fused):
        out = m(imgs)
        out.square().sum().backward()
        outs.append(out)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    for (name, a), b in zip(eager.named_parameters(), fused.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_auto_granularity_pads_buckets_only_for_explicit_softmax(monkeypatch):
    """varlen_granularity 0 (the default): padded buckets of 16 where attention is an explicit
    softmax (a bias or value term), exact lengths where it runs on the flash kernel (also
    `relative`, which widens q, k and v instead)."""
    import navit_pe.model as M

    seen = []

    class Spy(M.Segments):
        def __init__(self, image_ids, granularity=1):
            seen.append(granularity)
            super().__init__(image_ids, granularity)

    monkeypatch.setattr(M, "Segments", Spy)
    imgs = [torch.randn(3, 16, 12), torch.randn(3, 8, 20)]
    for pos in ("sincos", "rope", "relative", "alibi_2d", "fire_2d"):
        with torch.no_grad():
            NaViT(pos, dim=32, depth=1, heads=2).eval()(imgs)
    assert seen == [1, 1, 1, 16, 16]
