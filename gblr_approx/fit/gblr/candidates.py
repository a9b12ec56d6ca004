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


def default_mixed_grids(
    m: int, n: int, budget: int | None = None, max_pieces: int | None = None
) -> list[tuple[int, int]]:
    """One fine grid for the low-rank + blocks start.

    Square blocks of side ``b = max(min(m, n) // 48, 4)``, enlarged to
    ``ceil(budget / (2 max_pieces))`` so that about ``max_pieces`` rank-1 pieces fit the budget
    (the cost of interval ALS grows with their number; default ``1600 (m + n) / 768``).
    Fine blocks give the structure learning
    (:mod:`.intervals`) many small pieces to move and resize; measured on the MiniLM layers they
    start it far better than coarse grids.
    """
    b = max(min(m, n) // 48, 4)
    if max_pieces is None:
        max_pieces = max(1, round(1600 * (m + n) / 768))
    if budget is not None:
        b = max(b, math.ceil(budget / (2 * max_pieces)))
    return [(max(1, min(m, round(m / b))), max(1, min(n, round(n / b))))]


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
