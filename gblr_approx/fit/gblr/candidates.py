"""Starting points for GBLR fitting: the formats GBLR contains, embedded exactly.

Every candidate is the optimal (or greedy-optimal) projection of ``W`` onto a format that GBLR
contains at equal cost -- low-rank (truncated SVD), block-low-rank on several grids,
block-sparse on several block shapes -- and the mixed "global low-rank plus grid blocks"
fit of :mod:`.mixed`. Each is converted to a :class:`~gblr_approx.GBLR` exactly, so a fit
started from the best of them can only improve on all of them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from ...budget import InfeasibleBudgetError
from ...formats.blocklowrank import BlockLowRank
from ...formats.blocksparse import BlockSparse
from ...formats.gblr import GBLR
from ...formats.lowrank import LowRank
from .blocks import BlockModel
from .mixed import lowrank_plus_blocks

__all__ = [
    "default_grids",
    "default_mixed_grids",
    "fine_regime",
    "default_block_shapes",
    "embedded_candidates",
    "mixed_candidates",
]


def default_grids(m: int, n: int) -> list[tuple[int, int]]:
    """Block-low-rank starts: ``g x g`` grids and grids of roughly square blocks, ``g`` in
    2, 4, 8, 16 (blocks of at least 2 x 2 entries). Each costs one batched per-block SVD."""
    a = max(1, round(m / n)) if m >= n else 1
    b = max(1, round(n / m)) if n > m else 1
    out: list[tuple[int, int]] = []
    for g in (2, 4, 8, 16):
        for grid in ((g, g), (g * a, g * b)):
            if m // grid[0] >= 2 and n // grid[1] >= 2 and grid not in out:
                out.append(grid)
    return out


#: Layers with at most this many entries, at budgets up to :data:`FINE_MIXED_MAX_FRACTION` of
#: the dense MACs, get the finer start of :func:`default_mixed_grids` (3-entry blocks, twice
#: the pieces); larger layers and budgets keep the coarser rule (it bounds the cost of
#: interval ALS on 4096 x 11008 layers, and at 50 % the finer start costs 3-4x the time).
FINE_MIXED_MAX_ENTRIES = 1 << 20
FINE_MIXED_MAX_FRACTION = 0.3
#: Price-update exponent of interval ALS (``gain`` of :meth:`.intervals.IntervalModel.fit`) in
#: the fine regime: a slower price (1 instead of 2) oscillates less around the budget with many
#: small pieces (MiniLM 384 x 384 at 10-25 %: 0.1-0.3 % lower error, as fast); at 50 % it was
#: 1-2 % worse than 2, so elsewhere the price keeps exponent 2.
FINE_PRICE_GAIN = 1.0


def fine_regime(m: int, n: int, budget: int | None) -> bool:
    """Whether an ``m x n`` fit at ``budget`` MACs gets the fine start and the slow price.

    True for layers of at most :data:`FINE_MIXED_MAX_ENTRIES` entries at budgets up to
    :data:`FINE_MIXED_MAX_FRACTION` of the dense MACs: there :func:`default_mixed_grids`
    returns 3-entry blocks and the pipeline runs interval ALS with price exponent
    :data:`FINE_PRICE_GAIN` (measured in docs/benchmarks.md, fit_gblr).
    """
    return m * n <= FINE_MIXED_MAX_ENTRIES and budget is not None and (
        budget <= FINE_MIXED_MAX_FRACTION * m * n
    )


def default_mixed_grids(
    m: int,
    n: int,
    budget: int | None = None,
    max_pieces: int | None = None,
    min_block: int = 1,
) -> list[tuple[int, int]]:
    """One fine grid for the low-rank + blocks start.

    Square blocks of side ``b``, enlarged to ``ceil(budget / (2 max_pieces))`` so that about
    ``max_pieces`` rank-1 pieces fit the budget (the cost of interval ALS grows with their
    number). Up to :data:`FINE_MIXED_MAX_ENTRIES` entries and a budget up to
    :data:`FINE_MIXED_MAX_FRACTION` ``m n``: ``b >= 3`` and ``max_pieces`` defaults to
    ``3200 (m + n) / 768``; otherwise ``b >= max(min(m, n) // 48, 4)`` and
    ``1600 (m + n) / 768``. Fine blocks give the structure learning (:mod:`.intervals`) many
    small pieces to move and resize; measured on the MiniLM layers (docs/benchmarks.md,
    fit_gblr) they start it far better than coarse grids: 384 x 384 at 10 % of the MACs,
    3-entry blocks end 1-1.5 % below the 8-entry ones, at 25 % 6-entry blocks 1.5 % below
    12-entry ones. Blocks of 2 entries are worse again (a rank-1 2 x 2 block costs as much as
    its dense entries). ``min_block`` is a lower bound on ``b`` (``fit_gblr(min_width=...)``:
    the grid's blocks are at least that wide, clipped to the matrix).
    """
    fine = fine_regime(m, n, budget)
    b = 3 if fine else max(min(m, n) // 48, 4)
    if max_pieces is None:
        max_pieces = max(1, round((3200 if fine else 1600) * (m + n) / 768))
    if budget is not None:
        b = max(b, math.ceil(budget / (2 * max_pieces)))
    b = max(b, min_block)
    g1, g2 = max(1, min(m, round(m / b))), max(1, min(n, round(n / b)))
    if min_block > 1:  # rounding must not make blocks narrower than min_block
        g1, g2 = min(g1, max(1, m // min_block)), min(g2, max(1, n // min_block))
    return [(g1, g2)]


def default_block_shapes(m: int, n: int) -> list[tuple[int, int]]:
    """Square blocks of side 8, 16, 32 (clipped to the matrix)."""
    out: list[tuple[int, int]] = []
    for b in (8, 16, 32):
        s = (min(b, m), min(b, n))
        if s not in out:
            out.append(s)
    return out


def embedded_candidates(
    W: torch.Tensor,
    budget: int,
    grids: list[tuple[int, int]],
    block_shapes: list[tuple[int, int]],
) -> Iterator[tuple[str, GBLR]]:
    """Yield ``(name, GBLR)`` for low-rank, block-low-rank and block-sparse projections.

    Formats whose smallest cost exceeds ``budget`` are skipped.
    """
    try:
        yield "lowrank", GBLR.from_lowrank(LowRank.project(W, budget))
    except InfeasibleBudgetError:
        pass
    for g in grids:
        try:
            yield (
                f"blocklowrank{g[0]}x{g[1]}",
                GBLR.from_blocklowrank(BlockLowRank.project(W, budget, grid=g)),
            )
        except InfeasibleBudgetError:
            pass
    for s in block_shapes:
        try:
            yield (
                f"blocksparse{s[0]}x{s[1]}",
                GBLR.from_blocksparse(BlockSparse.project(W, budget, block_shape=s)),
            )
        except InfeasibleBudgetError:
            pass


def mixed_candidates(
    W: torch.Tensor,
    budget: int,
    grids: list[tuple[int, int]],
    *,
    iters: int = 6,
    max_components: int | None = None,
) -> Iterator[tuple[str, BlockModel, float]]:
    """Yield ``(name, BlockModel, rel_error)`` for global low-rank + grid-block fits."""
    m, n = W.shape
    for g in grids:
        if budget < min(m + n, m // g[0] + n // g[1]):
            continue
        model, err = lowrank_plus_blocks(W, budget, g, iters=iters, max_components=max_components)
        if model.cost() <= budget and model.active() > 0:
            yield f"lowrank+blocks{g[0]}x{g[1]}", model, err
