"""Attention backends for packed sequences, in one place.

Three ways to run "every token attends only to its own image":
1. dense: `F.scaled_dot_product_attention` over the packed [B, L] sequence with the
   block-diagonal mask (`PackedBatch.attention_mask`), or `biased_attention`, the explicit
   softmax, where an encoding adds a bias and a value term;
2. varlen on CPU: `Segments` regroups the real tokens image by image into buckets of equal
   length, and `VarlenAttention` runs SDPA's CPU flash kernel once per bucket in one autograd node;
3. varlen elsewhere (CUDA, or a torch without that kernel): a loop of
   `F.scaled_dot_product_attention` calls, one per bucket.
Encodings with a bias or value term run `biased_attention` bucket by bucket
(`Segments.attend_with_bias`), unless they widen q, k and v so that the flash kernel computes
the same (`PosEncoding.widen`, `relative`). A GPU varlen kernel would be one more branch of
`Segments.attend`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .posenc import PosContext, PosEncoding


def biased_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, pe: PosEncoding, ctx: PosContext,
                     layer: int, shared: PosContext | None = None) -> Tensor:
    """Explicit softmax attention over [B, h, L, d] with the encoding's additive bias on the
    logits and its value term on the output; `mask` bool (True = may attend) or additive.
    `shared`: a one-row context that every row of `ctx` equals (`shared_row`), given only for an
    encoding whose bias reads positions alone: its bias is computed there once, [1, h, L, L], and
    broadcast to the B rows.
    Without autograd (evaluation), without a value term and with an additive `mask` or none (the
    varlen buckets), SDPA's kernel takes the bias and the mask as one float mask: the same sums,
    several times faster at 96x96 on the 2-core CPU (`bench/bias_inference.py`). Training keeps the
    explicit softmax: the CPU kernel gives no gradient for a mask, and a learned bias (fire_2d's
    MLP) needs one."""
    bias = pe.attn_bias(q, ctx, layer) if shared is None else pe.attn_bias(q[:1], shared, layer)
    if not pe.value_term and not torch.is_grad_enabled() and (mask is None or mask.dtype != torch.bool):
        if mask is not None:  # the varlen buckets' additive key mask
            bias = mask if bias is None else bias + mask
        return F.scaled_dot_product_attention(q, k, v, attn_mask=None if bias is None else bias.to(q.dtype))
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if bias is not None:
        scores = scores + bias
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    probs = scores.softmax(dim=-1)
    out = probs @ v
    if pe.value_term:
        out = out + pe.attn_value(probs, ctx, layer)
    return out


def shared_row(ctx: PosContext) -> PosContext | None:
    """The first row of a [B, L] context if every row has the same coordinates, grids, CLS slots,
    padding and positions (images of one size, no per-image augmentation), else None."""
    fields = (ctx.coords, ctx.grid, ctx.is_cls, ctx.image_ids >= 0, ctx.pos, ctx.scale)
    if ctx.image_ids.shape[0] > 1 and all(bool((t == t[:1]).all()) for t in fields):
        return ctx.map(lambda t: t[:1])
    return None


class Segments:
    """The varlen layout: the real tokens of a packed batch regrouped image by image.

    Dense attention over a packed sequence costs L x L per sequence although each token only
    sees its own image. NaViT therefore runs on the "slot layout": once per forward the real
    tokens are gathered into buckets of images of equal length (with `granularity` > 1, lengths
    rounded up to the same multiple share a bucket, padded to its longest image), every block
    runs on [1, S, dim], attention runs bucket by bucket, and the packing padding costs nothing.
    The cost of attention per token follows its own image's length instead of L. Exact: slots
    beyond an image's length are masked keys and count as padding.
    """

    def __init__(self, image_ids: Tensor, granularity: int = 1):
        dev = image_ids.device
        flat = image_ids.reshape(-1)
        real = (flat >= 0).nonzero().squeeze(1)
        # group the real tokens by image id (stable: keeps each image's token order)
        order = torch.argsort(flat[real], stable=True)
        tokens, ids = real[order], flat[real][order]
        n = int(ids.max()) + 1 if len(ids) else 0
        lengths = torch.bincount(ids, minlength=n)
        starts = torch.cumsum(lengths, 0) - lengths
        padded = (lengths + granularity - 1) // granularity * granularity
        # slots: bucket by bucket, image by image, `lb` slots per image of a bucket
        perm, valid_slots, self.buckets = [], [], []  # buckets: (images, length, key mask)
        for bucket in torch.unique(padded).tolist():
            imgs = (padded == bucket).nonzero().squeeze(1)
            lb = int(lengths[imgs].max())  # the bucket's longest image sets its length
            pos = torch.arange(lb, device=dev)
            valid = pos[None] < lengths[imgs][:, None]  # [n_b, lb]
            src = (starts[imgs][:, None] + pos[None]).clamp(max=max(len(tokens) - 1, 0))
            perm.append(torch.where(valid, tokens[src], torch.zeros_like(src)).reshape(-1))
            valid_slots.append(valid.reshape(-1))
            # additive key mask of each image (0 or -inf), only where a bucket holds shorter images
            mask = None if bool(valid.all()) else torch.zeros(valid.shape, device=dev).masked_fill(
                ~valid, float("-inf"))[:, None, None, :]
            self.buckets.append((len(imgs), lb, mask))
        self.perm = torch.cat(perm) if perm else flat.new_zeros(0)  # slot -> token
        slot_ok = torch.cat(valid_slots) if valid_slots else flat.new_zeros(0, dtype=torch.bool)
        self.pad_slots = (~slot_ok).nonzero().squeeze(1)

    def to_slots(self, x: Tensor) -> Tensor:
        """x [B*L, ...] in packed order -> [S, ...] in slot order (zeros on unused slots)."""
        return x.index_select(0, self.perm).index_fill_(0, self.pad_slots, 0)

    def context(self, ctx: PosContext) -> PosContext:
        """The packed context in slot layout [1, S]; unused slots count as padding."""
        def take(t: Tensor) -> Tensor:
            return self.to_slots(t.reshape(-1, *t.shape[2:])).unsqueeze(0)

        out = ctx.map(take)
        out.image_ids.index_fill_(1, self.pad_slots, -1)
        return out

    def bucket_contexts(self, ctx: PosContext) -> list[PosContext]:
        """The slot-layout context cut into one [n_b, l_b] context per bucket (views, each with
        its own cache), so that the pairwise hooks (attention bias, value term) see each bucket
        as a packed batch of n_b sequences of l_b tokens, one image per sequence."""
        out, off = [], 0
        for nb, lb, _ in self.buckets:
            def cut(t: Tensor) -> Tensor:
                return t[0, off:off + nb * lb].view(nb, lb, *t.shape[2:])

            out.append(ctx.map(cut))
            off += nb * lb
        return out

    def attend_with_bias(self, q: Tensor, k: Tensor, v: Tensor, pe: PosEncoding, ctx: PosContext,
                         layer: int) -> Tensor:
        """q, k, v [S, h, d] -> [S, h*d] with `biased_attention`, bucket by bucket: per bucket the
        logits are [n_b, h, l_b, l_b], each image's own length squared, not L x L. `ctx` is the
        slot-layout context; its bucket contexts (with their shared rows, if any) are cut once
        and cached for every layer."""
        if "bucket_contexts" not in ctx.cache:
            ctx.cache["bucket_contexts"] = [(c, shared_row(c) if pe.bias_from_positions else None)
                                            for c in self.bucket_contexts(ctx)]
        h, d = q.shape[1:]
        sizes = [nb * lb for nb, lb, _ in self.buckets]
        outs = []
        for (nb, lb, mask), (c, shared), qb, kb, vb in zip(self.buckets, ctx.cache["bucket_contexts"],
                                                           q.split(sizes), k.split(sizes), v.split(sizes)):
            qb, kb, vb = (t.view(nb, lb, h, d).transpose(1, 2) for t in (qb, kb, vb))  # "(n l) h d -> n h l d"
            o = biased_attention(qb, kb, vb, mask, pe, c, layer, shared)
            outs.append(o.transpose(1, 2).reshape(nb * lb, h * d))  # "n h l d -> (n l) (h d)"
        return torch.cat(outs)

    def attend(self, qkv: Tensor, scale: float | None = None) -> Tensor:
        """qkv [S, 3, h, d] in slot layout -> attention output [S, h*d], bucket by bucket; logits
        scaled by `scale` (default d^-0.5).

        On CPU one autograd node runs SDPA's own flash kernel over all buckets (VarlenAttention);
        elsewhere, or where torch lacks that kernel, a loop of F.scaled_dot_product_attention.
        """
        if qkv.device.type == "cpu" and _CPU_FLASH is not None:
            return VarlenAttention.apply(qkv, self.buckets, scale)
        h, d = qkv.shape[2:]
        # split, not slice: a slice's backward writes a zero tensor of the full size per bucket
        outs = []
        for (nb, lb, mask), rows in zip(self.buckets, qkv.split([nb * lb for nb, lb, _ in self.buckets])):
            q, k, v = rows.view(nb, lb, 3, h, d).permute(2, 0, 3, 1, 4)  # "(n l) three h d -> three n h l d"
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
            outs.append(o.transpose(1, 2).reshape(nb * lb, h * d))  # "n h l d -> (n l) (h d)"
        return torch.cat(outs)


def _cpu_flash_ops():
    """The CPU flash-attention kernels that F.scaled_dot_product_attention dispatches to on CPU."""
    try:
        return (torch.ops.aten._scaled_dot_product_flash_attention_for_cpu,
                torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward)
    except (AttributeError, RuntimeError):
        return None, None


_CPU_FLASH, _CPU_FLASH_BWD = _cpu_flash_ops()


class VarlenAttention(torch.autograd.Function):
    """Attention over the slot layout in one autograd node, with SDPA's CPU flash kernel per bucket.

    The same kernels as a loop of F.scaled_dot_product_attention calls (tests compare outputs and
    gradients), without the ~10 autograd nodes and three gradient copies per bucket of that loop:
    q, k, v are read in place from qkv, and backward writes every bucket's dq, dk, dv straight into
    one [S, 3, h, d] gradient. On a default-mix batch (25 buckets) that saved 1.2-1.8 ms of a
    13-16 ms attention layer (forward + backward) on the 2-core CPU. The kernels are private ATen
    ops; where they are missing, Segments.attend falls back to the loop.
    """

    @staticmethod
    def forward(ctx, qkv: Tensor, buckets: list, scale: float | None = None) -> Tensor:
        qkv = qkv.contiguous()
        h, d = qkv.shape[2:]
        outs, lses, row = [], [], qkv.storage_offset()
        for nb, lb, mask in buckets:
            # "(n l) three h d -> three n h l d" for this bucket's rows, as three strided views
            size, stride = (nb, h, lb, d), (lb * 3 * h * d, d, 3 * h * d, 1)
            q, k, v = (qkv.as_strided(size, stride, row + i * h * d) for i in range(3))
            o, lse = _CPU_FLASH(q, k, v, attn_mask=mask, scale=scale)
            outs.append(o.transpose(1, 2).reshape(nb * lb, h * d))  # a view: o is laid out [n, l, h, d]
            lses.append(lse)
            row += nb * lb * 3 * h * d
        out = torch.cat(outs)
        ctx.buckets, ctx.scale = buckets, scale
        ctx.save_for_backward(qkv, out, *lses)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        qkv, out, *lses = ctx.saved_tensors
        h, d = qkv.shape[2:]
        grad = grad.contiguous()
        dqkv = torch.empty_like(qkv)
        row, row_o = 0, 0  # offsets into qkv / dqkv (3 h d per token) and into out / grad (h d)
        for (nb, lb, mask), lse in zip(ctx.buckets, lses):
            size, stride, stride_o = (nb, h, lb, d), (lb * 3 * h * d, d, 3 * h * d, 1), (lb * h * d, d, h * d, 1)
            q, k, v = (qkv.as_strided(size, stride, qkv.storage_offset() + row + i * h * d) for i in range(3))
            g = grad.as_strided(size, stride_o, grad.storage_offset() + row_o)
            o = out.as_strided(size, stride_o, out.storage_offset() + row_o)
            grads = _CPU_FLASH_BWD(g, q, k, v, o, lse, 0.0, False, attn_mask=mask, scale=ctx.scale)
            for i, t in enumerate(grads):
                dqkv.as_strided(size, stride, row + i * h * d).copy_(t)
            row += nb * lb * 3 * h * d
            row_o += nb * lb * h * d
        return dqkv, None, None
