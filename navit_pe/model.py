"""The packed Vision Transformer (NaViT): blocks, block-diagonal attention, per-image pooling.

`NaViT.forward` reads a PackedBatch (or packs a list of images itself) and returns one row
of logits per image, in image-id order. The positional encoding plugs in through the three
hooks of `navit_pe.posenc.base.PosEncoding`: an additive token embedding, an additive
attention bias (with, for Shaw's relative encoding, its value term), and a rotation of q and k.
The blocks run on the varlen layout (`Segments`: tokens regrouped by image; attention per
bucket of equal-length images) or, with attention="dense", on the packed layout with a dense
block-diagonal mask; both are tested to agree.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .config import NaViTConfig
from .packing import PackedBatch, drop_tokens, pack
from .posenc import PosContext, PosEncoding, build_posenc


# ----------------------------------------------------------------------------- dropout
def fast_dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Inverted dropout with a byte-resolution mask drawn as raw random bits.

    `nn.Dropout` draws one float per element, which on CPU costs about as much as the rest of
    a small ViT step. Here eight mask bytes come from each random int64 and an element is
    dropped when its byte < round(p * 256), so the drop rate is p rounded to 1/256 (0.1 ->
    26/256 = 0.1016) and the survivors are scaled by the matching 1 / (1 - p').
    """
    if not training or p <= 0:
        return x
    threshold = round(p * 256)
    if threshold <= 0:
        return x
    if threshold >= 256:
        return torch.zeros_like(x)
    n = x.numel()
    bits = torch.randint(-2**63, 2**63 - 1, ((n + 7) // 8,), dtype=torch.int64, device=x.device)
    keep = bits.view(torch.uint8)[:n].view(x.shape) >= threshold
    return x * keep.to(x.dtype) * (256.0 / (256 - threshold))


class Dropout(nn.Module):
    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return fast_dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


# ----------------------------------------------------------------------------- blocks
def biased_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, pe: PosEncoding, ctx: PosContext,
                     layer: int) -> Tensor:
    """Explicit softmax attention over [B, h, L, d] with the encoding's additive bias on the
    logits and its value term on the output; `mask` bool (True = may attend) or additive."""
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    bias = pe.attn_bias(q, ctx, layer)
    if bias is not None:
        scores = scores + bias
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    probs = scores.softmax(dim=-1)
    out = probs @ v
    if pe.value_term:
        out = out + pe.attn_value(probs, ctx, layer)
    return out


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

        ids = take(ctx.image_ids).index_fill_(1, self.pad_slots, -1)
        return PosContext(take(ctx.coords), take(ctx.grid), take(ctx.is_cls), ids)

    def bucket_contexts(self, ctx: PosContext) -> list[PosContext]:
        """The slot-layout context cut into one [n_b, l_b] context per bucket (views, each with
        its own cache), so that the pairwise hooks (attention bias, value term) see each bucket
        as a packed batch of n_b sequences of l_b tokens, one image per sequence."""
        out, off = [], 0
        for nb, lb, _ in self.buckets:
            def cut(t: Tensor) -> Tensor:
                return t[0, off:off + nb * lb].view(nb, lb, *t.shape[2:])

            out.append(PosContext(cut(ctx.coords), cut(ctx.grid), cut(ctx.is_cls), cut(ctx.image_ids)))
            off += nb * lb
        return out

    def attend_with_bias(self, q: Tensor, k: Tensor, v: Tensor, pe: PosEncoding, ctx: PosContext,
                         layer: int) -> Tensor:
        """q, k, v [S, h, d] -> [S, h*d] with `biased_attention`, bucket by bucket: per bucket the
        logits are [n_b, h, l_b, l_b], each image's own length squared, not L x L. `ctx` is the
        slot-layout context; its bucket contexts are cut once and cached for every layer."""
        if "bucket_contexts" not in ctx.cache:
            ctx.cache["bucket_contexts"] = self.bucket_contexts(ctx)
        h, d = q.shape[1:]
        sizes = [nb * lb for nb, lb, _ in self.buckets]
        outs = []
        for (nb, lb, mask), c, qb, kb, vb in zip(self.buckets, ctx.cache["bucket_contexts"], q.split(sizes),
                                                 k.split(sizes), v.split(sizes)):
            qb, kb, vb = (t.view(nb, lb, h, d).transpose(1, 2) for t in (qb, kb, vb))  # "(n l) h d -> n h l d"
            o = biased_attention(qb, kb, vb, mask, pe, c, layer)
            outs.append(o.transpose(1, 2).reshape(nb * lb, h * d))  # "n h l d -> (n l) (h d)"
        return torch.cat(outs)

    def attend(self, qkv: Tensor) -> Tensor:
        """qkv [S, 3, h, d] in slot layout -> attention output [S, h*d], bucket by bucket.

        On CPU one autograd node runs SDPA's own flash kernel over all buckets (VarlenAttention);
        elsewhere, or where torch lacks that kernel, a loop of F.scaled_dot_product_attention.
        """
        if qkv.device.type == "cpu" and _CPU_FLASH is not None:
            return VarlenAttention.apply(qkv, self.buckets)
        h, d = qkv.shape[2:]
        # split, not slice: a slice's backward writes a zero tensor of the full size per bucket
        outs = []
        for (nb, lb, mask), rows in zip(self.buckets, qkv.split([nb * lb for nb, lb, _ in self.buckets])):
            q, k, v = rows.view(nb, lb, 3, h, d).permute(2, 0, 3, 1, 4)  # "(n l) three h d -> three n h l d"
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
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
    def forward(ctx, qkv: Tensor, buckets: list) -> Tensor:
        qkv = qkv.contiguous()
        h, d = qkv.shape[2:]
        outs, lses, row = [], [], qkv.storage_offset()
        for nb, lb, mask in buckets:
            # "(n l) three h d -> three n h l d" for this bucket's rows, as three strided views
            size, stride = (nb, h, lb, d), (lb * 3 * h * d, d, 3 * h * d, 1)
            q, k, v = (qkv.as_strided(size, stride, row + i * h * d) for i in range(3))
            o, lse = _CPU_FLASH(q, k, v, attn_mask=mask)
            outs.append(o.transpose(1, 2).reshape(nb * lb, h * d))  # a view: o is laid out [n, l, h, d]
            lses.append(lse)
            row += nb * lb * 3 * h * d
        out = torch.cat(outs)
        ctx.buckets = buckets
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
            grads = _CPU_FLASH_BWD(g, q, k, v, o, lse, 0.0, False, attn_mask=mask)
            for i, t in enumerate(grads):
                dqkv.as_strided(size, stride, row + i * h * d).copy_(t)
            row += nb * lb * 3 * h * d
            row_o += nb * lb * h * d
        return dqkv, None


class Attention(nn.Module):
    def __init__(self, cfg: NaViTConfig, layer: int):
        super().__init__()
        self.heads, self.layer = cfg.heads, layer
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.drop = Dropout(cfg.dropout)

    def forward(self, x: Tensor, mask: Tensor | None, pe: PosEncoding, ctx: PosContext,
                segments: Segments | None = None) -> Tensor:
        """x [B, L, dim] in packed layout with a dense `mask`, or [1, S, dim] in the slot layout
        of `segments` (tokens grouped by image, see Segments)."""
        qkv = self.qkv(x)
        with torch.autocast(x.device.type, enabled=False):  # attention in fp32: bf16 SDPA backward is slow on CPU
            qkv = rearrange(qkv.float(), "b n (three h d) -> b n three h d", three=3, h=self.heads)
            q, k, v = rearrange(qkv, "b n three h d -> three b h n d")
            # positional hooks: rotate q and k, then an additive bias on the logits
            q_rot, k_rot = pe.rotate(q, k, ctx, self.layer)
            if segments is not None and (pe.uses_bias or pe.value_term):  # varlen, explicit softmax
                out = segments.attend_with_bias(*(t[0].transpose(0, 1) for t in (q_rot, k_rot, v)), pe, ctx,
                                                self.layer).unsqueeze(0)
            elif segments is not None:  # varlen: each image attends within its own bucket
                if q_rot is not q or k_rot is not k:  # rotated: gather the new q and k with v
                    qkv = rearrange(torch.stack((q_rot, k_rot, v)), "three b h n d -> b n three h d")
                out = segments.attend(qkv[0]).unsqueeze(0)
            else:
                q, k = q_rot, k_rot
                if pe.value_term:  # explicit softmax: the encoding also adds a term to the values
                    out = biased_attention(q, k, v, mask, pe, ctx, self.layer)
                else:  # dense block-diagonal mask over the whole sequence
                    bias = pe.attn_bias(q, ctx, self.layer)
                    attn_mask = mask if bias is None else bias.masked_fill(~mask, float("-inf"))
                    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
                out = rearrange(out, "b h n d -> b n (h d)")
        # merged heads, projected back
        return self.drop(self.proj(out.to(x.dtype)))


class MLP(nn.Module):
    def __init__(self, cfg: NaViTConfig):
        super().__init__()
        hidden = int(cfg.dim * cfg.mlp_ratio)
        self.fc1, self.fc2 = nn.Linear(cfg.dim, hidden), nn.Linear(hidden, cfg.dim)
        self.drop = Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, cfg: NaViTConfig, layer: int):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(cfg.dim), Attention(cfg, layer)
        self.norm2, self.mlp = nn.LayerNorm(cfg.dim), MLP(cfg)

    def forward(self, x: Tensor, mask: Tensor | None, pe: PosEncoding, ctx: PosContext,
                segments: Segments | None = None) -> Tensor:
        x = x + self.attn(self.norm1(x), mask, pe, ctx, segments)
        return x + self.mlp(self.norm2(x))


# ----------------------------------------------------------------------------- pooling
def segment_mean(x: Tensor, ids: Tensor, n: int) -> Tensor:
    """x [T, D], ids [T] in 0..n-1 -> [n, D] mean over each id's rows."""
    out = torch.zeros(n, x.shape[-1], dtype=x.dtype, device=x.device).index_add_(0, ids, x)
    count = torch.bincount(ids, minlength=n).clamp(min=1).to(x.dtype)
    return out / count[:, None]


class AttentionPool(nn.Module):
    """One learned query per image attends over that image's patch tokens (multi-head)."""

    def __init__(self, cfg: NaViTConfig):
        super().__init__()
        self.heads = cfg.heads
        self.query = nn.Parameter(torch.randn(cfg.heads, cfg.head_dim) * 0.02)
        self.kv = nn.Linear(cfg.dim, 2 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, x: Tensor, ids: Tensor, n: int) -> Tensor:
        # x [T, D] tokens of all images, ids [T]: a softmax over each image's tokens
        k, v = rearrange(self.kv(x), "t (two h d) -> two t h d", two=2, h=self.heads).float()
        logits = (k * self.query).sum(-1) * k.shape[-1] ** -0.5  # [T, h]
        idx = ids[:, None].expand_as(logits)
        peak = torch.full((n, self.heads), float("-inf"), device=x.device).scatter_reduce(
            0, idx, logits, reduce="amax", include_self=True)
        w = (logits - peak[ids]).exp()
        denom = torch.zeros(n, self.heads, device=x.device).index_add_(0, ids, w)
        w = w / denom[ids]
        out = torch.zeros(n, self.heads, v.shape[-1], device=x.device).index_add_(0, ids, w[..., None] * v)
        return self.proj(rearrange(out, "n h d -> n (h d)").to(x.dtype))


# ----------------------------------------------------------------------------- the model
class NaViT(nn.Module):
    """A ViT over packed sequences. `NaViT(pos_embed="rope", dim=192, ...)` or `NaViT(config)`."""

    def __init__(self, pos_embed: str | NaViTConfig = "sincos", **kwargs):
        super().__init__()
        cfg = pos_embed if isinstance(pos_embed, NaViTConfig) else NaViTConfig(pos_embed=pos_embed, **kwargs)
        cfg.validate()
        self.config = cfg
        patch_dim = cfg.channels * cfg.patch_size ** 2
        self.patch_embed = nn.Linear(patch_dim, cfg.dim)
        self.cls_token = nn.Parameter(torch.zeros(cfg.dim)) if cfg.pool == "cls" else None
        self.pos = build_posenc(cfg.pos_embed, cfg)
        self.drop = Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim)
        self.attn_pool = AttentionPool(cfg) if cfg.pool == "attn" else None
        self.head = nn.Linear(cfg.dim, cfg.num_classes)
        self.token_drop: float = 0.0  # fraction of patches dropped per image, training mode only
        self.apply(self._init_weights)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=0.02)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # -- input handling
    def pack(self, images: Sequence[Tensor], labels=None) -> PackedBatch:
        """Pack a list of images [C, H, W] the way this model expects (CLS slots for pool=cls)."""
        cfg = self.config
        return pack(images, cfg.patch_size, cfg.max_seq_len, labels, cls_token=cfg.pool == "cls")

    def _check(self, batch: PackedBatch) -> None:
        cfg = self.config
        p_dim = cfg.channels * cfg.patch_size ** 2
        if batch.patches.shape[-1] != p_dim:
            raise ValueError(f"patches have {batch.patches.shape[-1]} values, the model expects "
                             f"{p_dim} (channels={cfg.channels}, patch_size={cfg.patch_size})")
        n_cls = int(batch.is_cls.sum())
        if cfg.pool == "cls" and n_cls != batch.num_images:
            raise ValueError(f"pool='cls' needs one CLS slot per image; the batch has {n_cls} for "
                             f"{batch.num_images} images (pack with cls_token=True)")
        if cfg.pool != "cls" and n_cls:
            raise ValueError(f"pool={cfg.pool!r} takes batches packed without CLS slots (cls_token=False)")

    # -- forward
    def forward(self, x: PackedBatch | Sequence[Tensor]) -> Tensor:
        batch = x if isinstance(x, PackedBatch) else self.pack(x)
        self._check(batch)
        if self.training and self.token_drop > 0:
            batch = drop_tokens(batch, self.token_drop)
        n = batch.num_images
        ctx = PosContext(batch.coords, batch.grid, batch.is_cls, batch.image_ids)
        patches = batch.patches
        # layout: varlen (tokens regrouped by image, once, for the whole forward) unless asked
        # for the dense block-diagonal mask over the packed sequence
        mask = segments = None
        if self.config.attention == "dense":
            mask = batch.attention_mask()
        else:
            segments = Segments(batch.image_ids, self.config.varlen_granularity)
            ctx = segments.context(ctx)
            patches = segments.to_slots(patches.reshape(-1, patches.shape[-1])).unsqueeze(0)
        # embed patches; the CLS slots take the learned CLS token
        h = self.patch_embed(patches)
        if self.cls_token is not None:
            h = torch.where(ctx.is_cls.unsqueeze(-1), self.cls_token.to(h.dtype), h)
        # additive positional embedding (none for encodings that act inside attention)
        emb = self.pos.embed(ctx)
        if emb is not None:
            h = h + emb.to(h.dtype)
        h = self.drop(h)
        # transformer blocks; no token ever attends to another image
        for block in self.blocks:
            h = block(h, mask, self.pos, ctx, segments)
        h = self.norm(h)
        # pool each image on its own, in image-id order
        return self.head(self._pool(h, ctx, n))

    def _pool(self, h: Tensor, ctx: PosContext, n: int) -> Tensor:
        pool = self.config.pool
        if pool == "cls":
            out = torch.empty(n, h.shape[-1], dtype=h.dtype, device=h.device)
            out[ctx.image_ids[ctx.is_cls]] = h[ctx.is_cls]
            return out
        sel = ctx.is_patch
        tokens, ids = h[sel], ctx.image_ids[sel]
        if pool == "mean":
            return segment_mean(tokens, ids, n)
        return self.attn_pool(tokens, ids, n)

    # -- optimisation helpers
    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: no decay on norms, biases, the CLS token, pooling query, RoPE frequencies."""
        no_decay_pos = {f"pos.{n}" for n in self.pos.no_weight_decay()}
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            if p.ndim <= 1 or name in no_decay_pos or name in ("cls_token", "attn_pool.query"):
                no_decay.append(p)
            else:
                decay.append(p)
        return [{"params": decay, "weight_decay": weight_decay},
                {"params": no_decay, "weight_decay": 0.0}]

    def num_params(self, only_pos: bool = False) -> int:
        mod = self.pos if only_pos else self
        return sum(p.numel() for p in mod.parameters())

    # -- save / load
    def save_pretrained(self, out_dir: str | Path) -> None:
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        tmp = out / "model.safetensors.tmp"
        save_file(state, str(tmp))
        tmp.replace(out / "model.safetensors")
        tmp = out / "config.json.tmp"
        tmp.write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        tmp.replace(out / "config.json")

    @classmethod
    def from_pretrained(cls, run_dir: str | Path, map_location: str = "cpu") -> "NaViT":
        """Rebuild a model from `config.json` and `model.safetensors` in `run_dir` alone."""
        from safetensors.torch import load_file

        run = Path(run_dir)
        model = cls(NaViTConfig.load(run / "config.json"))
        model.load_state_dict(load_file(str(run / "model.safetensors"), device=map_location))
        return model
