"""Runnable GBLR layouts: merge rank-1 pieces, snap intervals to a tile grid, refit exactly.

Interval ALS (:mod:`.intervals`) returns hundreds to thousands of rank-1 pieces of ~10-20
entries per side. Such a layout is accurate per MAC but runs far below the dense GEMM rate:
every piece is a GEMV-like sliver (docs/product_speed.md). Two transformations make a layout
*runnable* (few, large, aligned blocks):

1. :func:`merge_identical` (lossless): components on the same rectangle are one component
   whose factors are the concatenation, ``sum_j U_j V_j^T = [U_1 .. U_J] [V_1 .. V_J]^T``
   (a dense block when that is cheaper). The matrix is unchanged and the cost can only drop.
2. :func:`tiled_layout` (lossy): every piece's row and column interval is snapped to the grid
   of ``tile`` entries (cyclic, math.md 1.2), pieces with the same snapped rectangle are
   grouped into one rank-``r`` component, the tile-grid blocks and the full matrix are added
   as candidate rectangles, and the content is refitted *exactly* on these fixed rectangles
   (:class:`.blocks.BlockModel`: truncated SVDs by block-coordinate descent, ranks allocated to
   the budget by a knapsack on the spectra). Aligned starts (the truncated SVD and
   block-low-rank on grids of tile-multiple blocks) compete too, and the best hard iterate
   within the budget is kept, so the result is never worse than them.

An aligned layout fills the product's tiles (no partial slots; what padding is left comes from
bucketing tiles of different slot counts) and has few components of rank > 1; with few
distinct intervals it runs as one GEMM per interval on contiguous slices
(:class:`~gblr_approx.formats.gblr_plan.GBLRSegments`, no padding at all).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterator

import torch

from ...budget import InfeasibleBudgetError
from ...formats.blocklowrank import BlockLowRank
from ...formats.gblr import GBLR
from ...formats.lowrank import LowRank
from .blocks import BlockModel, Rect, _Comp
from .blocks import _pieces as _slices
from .candidates import mixed_candidates

__all__ = [
    "LAYOUTS",
    "check_layout",
    "is_aligned",
    "merge_identical",
    "snap_interval",
    "snapped_model",
    "tiled_layout",
]

#: Values of ``fit_gblr(..., layout=)``.
LAYOUTS = ("free", "tiled")


def check_layout(layout: object, tile: object) -> tuple[str, int]:
    """Validate ``fit_gblr``'s ``layout`` and ``tile`` options; returns them."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}; got {layout!r}")
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
        raise ValueError(f"tile must be a positive int (entries); got {tile!r}")
    return str(layout), int(tile)


def merge_identical(G: GBLR) -> GBLR:
    """Merge the components of ``G`` that share both intervals (exact, cost never grows).

    Parameters
    ----------
    G : GBLR (m, n) with ``K`` components.

    Returns
    -------
    GBLR
        One component per distinct rectangle ``(row_start, row_width, col_start, col_width)``
        (in order of first appearance): factored components are concatenated into a rank
        ``sum_j r_j`` component, any dense member makes the sum a dense block. The
        constructor stores a block dense when ``r (h + w) > h w``, so the cost is at most
        that of ``G`` and ``to_dense()`` equal up to rounding. Empty components are dropped.
        ``O(K)`` Python work plus the concatenations.
    """
    if not isinstance(G, GBLR):
        raise TypeError(f"G must be a GBLR matrix; got {type(G).__name__}")
    m, n = G.shape
    groups: dict[tuple[int, int, int, int], list[int]] = {}
    rs, rw, cs, cw = (t.tolist() for t in (G.row_start, G.row_width, G.col_start, G.col_width))
    for k in range(G.num_components):
        if rw[k] == 0 or cw[k] == 0 or (int(G.ranks[k]) == 0 and not bool(G.is_dense[k])):
            continue
        key = (rs[k], rw[k], cs[k], cw[k])
        groups.setdefault(key, []).append(k)
    keys = list(groups)
    factors = []
    for key in keys:
        ks = groups[key]
        dense = [k for k in ks if bool(G.is_dense[k])]
        if len(ks) == 1:
            k = ks[0]
            factors.append(G.block(k) if dense else G.component(k))
            continue
        if dense:
            factors.append(sum(G.block(k) for k in ks))
            continue
        comps = [G.component(k) for k in ks]
        factors.append((torch.cat([u for u, _ in comps], 1), torch.cat([v for _, v in comps], 1)))
    return GBLR(
        (m, n),
        [k[0] for k in keys],
        [k[1] for k in keys],
        [k[2] for k in keys],
        [k[3] for k in keys],
        factors,
        dtype=G.dtype,
        device=G.device,
    )


def snap_interval(start: int, width: int, side: int, tile: int) -> tuple[int, int]:
    """Snap the cyclic interval ``[start, start + width)`` of a side of ``side`` entries to the
    grid of ``tile`` entries.

    Both ends move to the nearest grid point (the multiples of ``tile`` below ``side``, and
    ``side`` itself); the width is at least one grid cell; an interval that then covers the
    side becomes ``(0, side)``. Returns ``(start, width)``: ``start % tile == 0`` and the end
    ``start + width`` is a multiple of ``tile`` or equals ``side`` (or ``2 side`` cyclically).
    """
    if width >= side or tile >= side:
        return 0, side

    def snap(x: int) -> int:  # x in [0, 2 side): nearest grid point on its lap
        lap, p = divmod(x, side)
        lo = (p // tile) * tile
        hi = min(lo + tile, side)
        return lap * side + (lo if p - lo <= hi - p else hi)

    a = snap(start)
    b = snap(start + width)
    if a >= side:
        a, b = a - side, b - side
    if b <= a:  # narrower than half a cell: one cell
        b = min((a // tile + 1) * tile, side)
    if b - a >= side:
        return 0, side
    return a, b - a


def is_aligned(G: GBLR, tile: int) -> bool:
    """Whether every interval of ``G`` starts on the ``tile`` grid and ends on it (or at the
    end of its side, or covers the side)."""
    for starts, widths, side in (
        (G.row_start.tolist(), G.row_width.tolist(), G.shape[0]),
        (G.col_start.tolist(), G.col_width.tolist(), G.shape[1]),
    ):
        for s, w in zip(starts, widths, strict=True):
            if w == side:
                continue
            end = s + w if s + w <= side else s + w - side
            if s % tile or (end % tile and end != side):
                return False
    return True


def _grid_rects(m: int, n: int, tile: int) -> list[Rect]:
    """The blocks of the ``tile`` grid (partial at the ends)."""
    return [
        Rect(i, min(tile, m - i), j, min(tile, n - j))
        for i in range(0, m, tile)
        for j in range(0, n, tile)
    ]


def _pieces(G: GBLR) -> Iterator[tuple[int, int, int, int, int]]:
    """``(row_start, row_width, col_start, col_width, rank)`` of every component."""
    for k in range(G.num_components):
        yield (
            int(G.row_start[k]),
            int(G.row_width[k]),
            int(G.col_start[k]),
            int(G.col_width[k]),
            int(G.ranks[k]),
        )


def _extend(
    x: torch.Tensor, start: int, width: int, new_start: int, new_width: int, side: int
) -> torch.Tensor:
    """Rows of ``x`` (one per entry of the cyclic interval ``(start, width)``) placed on the
    interval ``(new_start, new_width)``: entries outside the old interval are zero."""
    off = (new_start + torch.arange(new_width) - start) % side
    keep = off < width
    out = x.new_zeros(new_width, *x.shape[1:])
    out[keep] = x[off[keep].to(x.device)]
    return out


def snapped_model(W: torch.Tensor, G: GBLR, tile: int) -> BlockModel:
    """A :class:`.blocks.BlockModel` on the snapped rectangles of ``G``, warm-started with
    ``G``'s content.

    Every component's intervals are snapped (:func:`snap_interval`); components with the same
    snapped rectangle become one component whose factors are the concatenation of theirs,
    extended by zeros onto the new rectangle (cut where it shrank). Ranks are the summed
    ranks (capped at the dense rank). The cost may exceed ``G.flops``: see :func:`_trim`.
    """
    m, n = G.shape
    groups: dict[tuple[int, int, int, int], list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for k, (r0, h, c0, w, r) in enumerate(_pieces(G)):
        if h == 0 or w == 0 or r == 0:
            continue
        a, hh = snap_interval(r0, h, m, tile)
        b, ww = snap_interval(c0, w, n, tile)
        U, V = G.component(k)
        U = _extend(U.to(W.dtype), r0, h, a, hh, m)
        V = _extend(V.to(W.dtype), c0, w, b, ww, n)
        groups.setdefault((a, hh, b, ww), []).append((U, V))
    rects = [Rect(*key) for key in groups]
    model = BlockModel(W, rects, [0] * len(rects))
    for i, (rc, parts) in enumerate(zip(rects, groups.values(), strict=True)):
        U = torch.cat([u for u, _ in parts], 1)
        V = torch.cat([v for _, v in parts], 1)
        model.comps[i].rank = min(U.shape[1], rc.dense_rank())
        model.set_factors(i, U.to(W.device), V.T.to(W.device))
    return model


def _trim(model: BlockModel, budget: int) -> None:
    """Lower ranks until ``model.cost() <= budget``, cheapest loss per saved MAC first.

    The loss of dropping the last rank ``r`` of a component is ``sigma_r^2`` of its own
    residual (exact with the others fixed; for a dense block, everything past rank
    ``dense_rank - 1``). Needs spectra (a sweep with ``keep_spectrum=True``).
    """
    heap: list[tuple[float, int]] = []

    def item(i: int) -> tuple[float, int] | None:
        c = model.comps[i]
        if c.rank <= 0 or c.S is None:
            return None
        rc, S2 = c.rect, c.S.double().pow(2)
        d = rc.dense_rank()
        if c.rank >= d:
            save = rc.h * rc.w - (d - 1) * (rc.h + rc.w)
            loss = float(S2[d - 1 :].sum())
        else:
            save = rc.h + rc.w
            loss = float(S2[c.rank - 1]) if c.rank - 1 < S2.numel() else 0.0
        return loss / max(save, 1), save

    for i in range(len(model.comps)):
        it = item(i)
        if it is not None:
            heapq.heappush(heap, (it[0], i))
    cost = model.cost()
    while cost > budget and heap:
        _, i = heapq.heappop(heap)
        c = model.comps[i]
        d = c.rect.dense_rank()
        before = c.rect.cost(c.rank)
        c.rank = d - 1 if c.rank >= d else c.rank - 1
        cost -= before - (c.rect.cost(c.rank) if c.rank > 0 else 0)
        it = item(i)
        if it is not None:
            heapq.heappush(heap, (it[0], i))


def _fill(model: BlockModel, budget: int, max_components: int | None) -> None:
    """Raise ranks while they fit the budget, best gain per MAC first (own-residual spectra;
    activates rank-0 candidate rectangles)."""
    used = model.cost()
    active = model.active()
    heap = []
    for i, c in enumerate(model.comps):
        if c.S is not None and c.S.numel() and c.rank < c.rect.dense_rank():
            heapq.heappush(heap, (-BlockModel._item(c, c.rank)[0], i))
    while heap:
        _, i = heapq.heappop(heap)
        c = model.comps[i]
        ratio, _, nxt = BlockModel._item(c, c.rank)
        cost = c.rect.cost(nxt) - (c.rect.cost(c.rank) if c.rank > 0 else 0)
        if ratio <= 0 or used + cost > budget:
            continue
        if c.rank == 0:
            if max_components is not None and active >= max_components:
                continue
            active += 1
        used += cost
        c.rank = nxt
        if nxt < c.rect.dense_rank():
            heapq.heappush(heap, (-BlockModel._item(c, nxt)[0], i))


def _trim_components(model: BlockModel, max_components: int) -> None:
    """Keep the ``max_components`` active components of largest energy ``||P_k||^2``."""
    act = [
        (float(c.P.double().pow(2).sum()) if c.P is not None else 0.0, i)
        for i, c in enumerate(model.comps)
        if c.rank > 0
    ]
    for _, i in sorted(act, reverse=True)[max_components:]:
        model.comps[i].rank = 0


def _aligned_grids(m: int, n: int, tile: int) -> list[tuple[int, int]]:
    """Block-low-rank grids whose blocks are 1, 2, 4 or 8 tiles per side."""
    out = []
    for f in (1, 2, 4, 8):
        g = (max(1, math.ceil(m / (f * tile))), max(1, math.ceil(n / (f * tile))))
        if g not in out:
            out.append(g)
    return out


def _refit(
    model: BlockModel, budget: int, iters: int, max_components: int | None
) -> Iterator[tuple[GBLR, float]]:
    """Exact fits on the model's fixed rectangles: a BCD sweep (spectra), ranks trimmed to
    the budget, then sweeps alternating with filling the left-over budget. Yields
    ``(matrix, rel_error)`` of every iterate within the budget."""
    model.sweep(keep_spectrum=True)
    if max_components is not None and model.active() > max_components:
        _trim_components(model, max_components)
    _trim(model, budget)
    for _ in range(iters):
        err = model.sweep(keep_spectrum=True)
        if model.cost() <= budget and model.active() > 0:
            yield model.to_gblr(), err
        _fill(model, budget, max_components)


def tiled_layout(
    W: torch.Tensor,
    budget: int,
    start: GBLR | None = None,
    *,
    tile: int = 32,
    iters: int = 6,
    max_components: int | None = None,
) -> Iterator[tuple[str, GBLR, float]]:
    """Aligned GBLR fits of ``W`` within ``budget`` MACs on the grid of ``tile`` entries.

    Parameters
    ----------
    W : Tensor (m, n)
        Target (float32 or float64).
    budget : int
        MACs per mat-vec; every yielded matrix has ``flops <= budget``.
    start : GBLR, optional
        A free layout (e.g. interval ALS's best) whose snapped rectangles seed the layout.
    tile : int
        Grid step in entries (16, 32, 64 match the product's tiles).
    iters : int
        Rank re-allocations + BCD sweeps per candidate set (each one SVD per rectangle).
    max_components : int, optional
        Cap on the active components.

    Yields
    ------
    (name, GBLR, rel_error)
        Every hard iterate within the budget, exact relative Frobenius error; all aligned
        (:func:`is_aligned`). Candidate sets: the snapped rectangles of ``start`` plus the
        tile grid and the full matrix (``"tiled"``), the full matrix alone (truncated SVD,
        ``"tiled:lowrank"``), block-low-rank on grids of tile-multiple blocks
        (``"tiled:blocklowrank<b1>x<b2>"``, skipped when they have more than
        ``max_components`` blocks), and, when both sides are multiples of ``tile``, a global
        low-rank part plus one-tile blocks (:func:`.mixed.lowrank_plus_blocks`,
        ``"tiled:lowrank+blocks"``), refitted with the snapped rectangles as further
        candidates (``"tiled:lowrank+blocks+snapped"``). Snapping narrow free pieces (median
        side 6-10 on MiniLM) to a 64-grid keeps little of them; on the MiniLM layer-0 layers
        at 25 % the last candidate set is the best (tile 64: query 0.6434, intermediate
        0.6285, output 0.6926, against 0.6571 / 0.6476 / 0.716 without it).

    Cost: per iteration one SVD per candidate rectangle, ``O(sum_k h_k w_k min(h_k, w_k))``.
    """
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
        raise ValueError(f"tile must be a positive int (entries); got {tile!r}")
    m, n = W.shape
    full = Rect(0, m, 0, n)
    try:
        L = GBLR.from_lowrank(LowRank.project(W, budget))
        yield "tiled:lowrank", L, _rel(W, L)
    except InfeasibleBudgetError:
        pass
    for g in _aligned_grids(m, n, tile):
        try:
            B = BlockLowRank.project(W, budget, grid=g)
        except (InfeasibleBudgetError, ValueError):
            continue
        rs, cs = B.row_splits, B.col_splits
        rects = [
            Rect(rs[i], rs[i + 1] - rs[i], cs[j], cs[j + 1] - cs[j])
            for i in range(len(rs) - 1)
            for j in range(len(cs) - 1)
        ]
        if not all(r.r0 % tile == 0 and r.c0 % tile == 0 for r in rects):
            continue  # balanced splits off the tile grid: not an aligned start
        G = GBLR.from_blocklowrank(B)
        if max_components is None or G.num_components <= max_components:
            yield f"tiled:blocklowrank{g[0]}x{g[1]}", G, _rel(W, G)
    if start is None:  # no free layout: the candidates alone (the fill step activates them)
        start = GBLR.zeros((m, n), dtype=W.dtype, device=W.device)
    model = snapped_model(W, start, tile)
    snapped = [c.rect for c in model.comps]
    _add_candidates(model, [full] + _grid_rects(m, n, tile))
    for G, err in _refit(model, budget, iters, max_components):
        yield "tiled", G, err
    # low-rank + blocks of one tile: the free layout's narrow pieces snap to whole tiles and
    # lose most of their content, so the tile-grid split of the budget between a global part
    # and local blocks often beats the snapped refit; refitted with the snapped rectangles as
    # further candidates
    mixed = _tile_mixed(W, budget, tile, iters, max_components)
    if mixed is not None:
        model, err = mixed
        yield "tiled:lowrank+blocks", model.to_gblr(), err
        _add_candidates(model, snapped)
        for G, err in _refit(model, budget, iters, max_components):
            yield "tiled:lowrank+blocks+snapped", G, err


def _add_candidates(model: BlockModel, rects: list[Rect]) -> None:
    """Append the rectangles ``model`` lacks as rank-0 components (the fill step may activate
    them)."""
    m, n = model.W.shape
    seen = {(c.rect.r0, c.rect.h, c.rect.c0, c.rect.w) for c in model.comps}
    for rc in rects:
        key = (rc.r0, rc.h, rc.c0, rc.w)
        if key not in seen:
            seen.add(key)
            rows, cols = _slices(rc.r0, rc.h, m), _slices(rc.c0, rc.w, n)
            model.comps.append(_Comp(rc, 0, rows=rows, cols=cols))


def _tile_mixed(
    W: torch.Tensor, budget: int, tile: int, iters: int, max_components: int | None
) -> tuple[BlockModel, float] | None:
    """The low-rank + blocks start (:func:`.candidates.mixed_candidates`) on the grid of
    ``tile``-entry blocks, or ``None`` when that grid is not aligned (a side not a multiple of
    ``tile``), has a single block, or the budget buys nothing."""
    m, n = W.shape
    if m % tile or n % tile or (m // tile) * (n // tile) < 2:
        return None
    grid = [(m // tile, n // tile)]
    for _, model, err in mixed_candidates(
        W, budget, grid, iters=iters, max_components=max_components
    ):
        return model, err
    return None


def _rel(W: torch.Tensor, G: GBLR) -> float:
    nrm = float(W.double().norm()) or 1.0
    return float((W - G.to_dense()).double().norm()) / nrm
