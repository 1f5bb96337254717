"""One picture per trained model of what its positional encoding learned.

- additive encodings (uses_embed: learned_1d, learned_2d, factorized, fractional, sincos):
  cosine similarity of a few reference positions' embeddings against every position, on an
  8x8 grid and on a 16x16 grid (for the 32 px / patch 4 models: the training grid and an
  unseen one);
- rotary encodings (rope, rope_mixed): the position-only attention logit q_rot(0) . k_rot(d)
  for a fixed unit q = k, as a function of the 2-D offset d = (dr, dc), per head of the first
  and last layer (`rope` has the same fixed frequencies everywhere: one panel);
- relative: the key term q . a^K(dr, dc) of the first and last layer for the same fixed q
  (shared by the heads), where offsets beyond +-k show the clamping;
- none: a picture saying there is nothing to show.

    plot_learned(model, "learned.png", title="rope @16:48")
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor  # noqa: E402

from .model import NaViT  # noqa: E402
from .posenc import PosContext  # noqa: E402

GRIDS = (8, 16)  # additive encodings: grid sides (in patches) shown
RADIUS = 8  # rotary / relative: offsets -RADIUS..RADIUS per axis


def grid_context(positions: Tensor, grid: tuple[int, int]) -> PosContext:
    """A PosContext for one image whose patches sit at `positions` [N, 2] of a `grid` (h, w)."""
    n = positions.shape[0]
    return PosContext(coords=positions.long()[None], grid=torch.tensor(grid).expand(1, n, 2).clone(),
                      is_cls=torch.zeros(1, n, dtype=torch.bool), image_ids=torch.zeros(1, n, dtype=torch.long))


def all_positions(h: int, w: int) -> Tensor:
    """[h*w, 2] (row, col), row-major."""
    return torch.cartesian_prod(torch.arange(h), torch.arange(w))


def plot_learned(model: NaViT, path: str | Path, title: str = "") -> Path:
    """Draw the picture for `model`'s encoding into `path` (PNG)."""
    pos = model.pos
    with torch.no_grad():
        if pos.uses_embed:
            fig = _embedding_similarity(model)
        elif pos.uses_rotate:
            fig = _rotary_logits(model)
        elif pos.uses_bias:
            fig = _relative_bias(model)
        else:
            fig = plt.figure(figsize=(5, 1.5))
            fig.text(0.5, 0.5, f"'{pos.name}': no positional encoding, nothing to show", ha="center", va="center")
    fig.suptitle(f"{title or pos.name}")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


# ----------------------------------------------------------------------------- additive
def _embedding_similarity(model: NaViT) -> plt.Figure:
    """Rows: grids; columns: reference positions (corner, top edge middle, centre)."""
    refs = lambda g: [(0, 0), (0, g // 2), (g // 2, g // 2)]  # noqa: E731
    fig, axes = plt.subplots(len(GRIDS), 3, figsize=(9, 3 * len(GRIDS)), squeeze=False,
                             layout="constrained")
    for row, g in enumerate(GRIDS):
        emb = model.pos.embed(grid_context(all_positions(g, g), (g, g)))[0].float()  # [g*g, dim]
        emb = F.normalize(emb, dim=-1)
        for col, (r, c) in enumerate(refs(g)):
            sim = (emb @ emb[r * g + c]).view(g, g)
            ax = axes[row, col]
            im = ax.imshow(sim.numpy(), cmap="RdBu_r", vmin=-1, vmax=1)
            ax.plot(c, r, "k*", ms=8)
            ax.set_title(f"{g}x{g} grid, ref ({r}, {c})", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.colorbar(im, ax=axes, shrink=0.8, label="cosine similarity")
    return fig


# ----------------------------------------------------------------------------- rotary / relative
def _offset_context() -> tuple[PosContext, int]:
    """Patches at every (R + dr, R + dc), |dr|, |dc| <= R; returns the context and the index
    of the centre (offset 0)."""
    side = 2 * RADIUS + 1
    ctx = grid_context(all_positions(side, side), (side, side))
    return ctx, RADIUS * side + RADIUS


def _layers(model: NaViT) -> list[int]:
    return sorted({0, model.config.depth - 1})


def _unit_q(model: NaViT, n: int) -> Tensor:
    cfg = model.config
    return torch.ones(1, cfg.heads, n, cfg.head_dim) / cfg.head_dim ** 0.5


def _rotary_logits(model: NaViT) -> plt.Figure:
    """maps[layer][head] = q_rot(centre) . k_rot(centre + offset), q = k = unit vector."""
    side = 2 * RADIUS + 1
    per_head = model.pos.name != "rope"  # plain rope: the same fixed frequencies in every head and layer
    layers = _layers(model) if per_head else [0]
    heads = model.config.heads if per_head else 1
    maps = []
    for layer in layers:
        ctx, centre = _offset_context()
        q = _unit_q(model, side * side)
        q_rot, k_rot = model.pos.rotate(q, q.clone(), ctx, layer)
        logits = (q_rot[0, :, centre:centre + 1] * k_rot[0]).sum(-1)  # [heads, N]
        maps.append(logits.view(-1, side, side)[:heads])
    titles = ([[f"layer {layer}, head {h}" for h in range(heads)] for layer in layers] if per_head
              else [["every layer and head"]])
    return _offset_grid(maps, titles, "q·k (unit q = k)")


def _relative_bias(model: NaViT) -> plt.Figure:
    """The bias from the centre query to every offset, one panel per layer (and head, where
    heads differ: every bias encoding but Shaw's, whose heads share the tables)."""
    side = 2 * RADIUS + 1
    layers = _layers(model)
    shared = model.pos.value_term  # `relative`: one table for all heads, a key term through q
    maps = []
    for layer in layers:
        ctx, centre = _offset_context()
        bias = model.pos.attn_bias(_unit_q(model, side * side), ctx, layer)  # [1, heads, N, N]
        bias = bias[0, :1 if shared else None, centre]
        maps.append(bias.clamp(min=-50).view(-1, side, side))  # masked pairs (lookhere) shown at -50
    k = getattr(model.pos, "k", None)
    heads = 1 if shared else model.config.heads
    titles = [[f"layer {layer} (all heads)" if shared else f"layer {layer}, head {h}" for h in range(heads)]
              for layer in layers]
    return _offset_grid(maps, titles, "q·a^K(dr, dc) (unit q)" if shared else "bias(dr, dc)", clamp=k)


def _offset_grid(maps: list[Tensor], titles: list[list[str]], label: str, clamp: int | None = None) -> plt.Figure:
    """One image per (layer, head) over offsets (dr, dc) in -R..R, a shared symmetric colour scale."""
    rows, cols = len(maps), maps[0].shape[0]
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols + 1.5, 3 * rows + 0.5), squeeze=False,
                             layout="constrained")
    vmax = max(float(m.abs().max()) for m in maps) or 1.0
    ext = (-RADIUS - 0.5, RADIUS + 0.5, RADIUS + 0.5, -RADIUS - 0.5)
    for i, m in enumerate(maps):
        for h in range(cols):
            ax = axes[i, h]
            im = ax.imshow(m[h].float().numpy(), cmap="RdBu_r", vmin=-vmax, vmax=vmax, extent=ext)
            if clamp is not None:  # the +-k box beyond which offsets share the edge entries
                ax.add_patch(plt.Rectangle((-clamp - 0.5, -clamp - 0.5), 2 * clamp + 1, 2 * clamp + 1,
                                           fill=False, ec="k", lw=1, ls="--"))
            ax.set_title(titles[i][h], fontsize=9)
            ax.set_xlabel("dc")
            ax.set_ylabel("dr")
            ax.set_xticks(range(-RADIUS, RADIUS + 1, 4))
            ax.set_yticks(range(-RADIUS, RADIUS + 1, 4))
    fig.colorbar(im, ax=axes, shrink=0.8, label=label)
    return fig
