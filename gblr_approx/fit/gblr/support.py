"""Support-based GBLR start for matrices with exact zeros.

When ``W`` has exact zeros (e.g. it *is* a sum of a few low-rank blocks), its non-zero
pattern is a union of cyclic rectangles, and the blocks' boundaries show up as the rows (and
columns) where the pattern changes. This module turns that into candidate components:

1. row/column boundaries = indices whose support differs from the previous (cyclic) one;
2. candidate rectangles = pairs of cyclic arcs between boundaries lying inside the support,
   kept when maximal;
3. the smallest sets of candidates covering the support exactly (exhaustive, up to
   ``max_blocks``);
4. for each cover and each rank assignment within the budget, block coordinate descent
   (each block's best rank-``r_k`` fit of the residual on its rectangle, truncated SVD).

It costs nothing on dense data (real weights have no exact zeros): it yields no candidate.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator

import numpy as np
import torch

from ...formats.gblr import GBLR
from ...linalg import svd

__all__ = ["support_candidates"]


def _boundaries(Z: np.ndarray) -> list[int]:
    """Indices i whose row pattern differs from row i-1 (cyclically)."""
    prev = np.roll(Z, 1, axis=0)
    return [int(i) for i in np.nonzero((Z != prev).any(axis=1))[0]]


def _arcs(bounds: list[int], N: int) -> list[tuple[int, int]]:
    """Cyclic arcs (start, width) between boundaries, plus the full circle."""
    arcs = {(0, N)}
    for a in bounds:
        for c in bounds:
            if a != c:
                arcs.add((a, (c - a) % N))
    return sorted(arcs)


def _cells(bounds: list[int], N: int) -> np.ndarray:
    """Cell id (0, 1, ...) of each index: cells are the cyclic arcs between boundaries."""
    if not bounds:
        return np.zeros(N, dtype=np.int64)
    b = np.asarray(sorted(bounds))
    # index i lies in the arc starting at the last boundary <= i (cyclically: the last one)
    return (np.searchsorted(b, np.arange(N), side="right") - 1) % len(b)


def _indices(start: int, width: int, N: int) -> np.ndarray:
    return (start + np.arange(width)) % N


def _bits(mask: np.ndarray) -> int:
    return int.from_bytes(np.packbits(mask.ravel()).tobytes(), "big")


def _bcd(
    W: torch.Tensor, rects: list[tuple[np.ndarray, np.ndarray]], ranks: list[int], iters: int
) -> tuple[float, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Block coordinate descent: each block = truncated SVD of the residual on its rectangle."""
    approx = torch.zeros_like(W)
    parts = [torch.zeros(len(r), len(c), dtype=W.dtype) for r, c in rects]
    factors: list[tuple[torch.Tensor, torch.Tensor]] = [None] * len(rects)  # type: ignore[list-item]
    idx = [(torch.as_tensor(r), torch.as_tensor(c)) for r, c in rects]
    for _ in range(iters):
        for k, ((ri, ci), r) in enumerate(zip(idx, ranks, strict=True)):
            block = (ri.unsqueeze(1), ci.unsqueeze(0))
            sub = W[block] - approx[block] + parts[k]
            U, S, Vh = svd(sub)
            s = S[:r].sqrt()
            Uk, Vk = U[:, :r] * s, Vh[:r].T * s
            new = Uk @ Vk.T
            approx[block] += new - parts[k]
            parts[k], factors[k] = new, (Uk, Vk)
    err = float(torch.linalg.norm(W - approx) / torch.linalg.norm(W).clamp_min(1e-300))
    return err, factors


def _span_boundaries(W: torch.Tensor, window: int) -> list[int]:
    """Columns j where the active blocks change, seen in the values (not only the zeros).

    Column ``j`` starts something new when it leaves the span of the ``window`` columns
    before it; column ``j - 1`` ends something when it leaves the span of the ``window``
    columns from ``j`` on. Exact for exactly block-structured data when every block is at
    least ``window`` wide and ``window`` exceeds the summed rank of the active blocks.
    """
    m, n = W.shape
    L = min(window, n - 1)
    if L < 1:
        return []
    idx = torch.arange(n)
    prev = (idx[:, None] - L + torch.arange(L)[None, :]) % n  # (n, L)
    nxt = (idx[:, None] + torch.arange(L)[None, :]) % n
    found = set()
    for win, col in ((prev, idx), (nxt, (idx - 1) % n)):
        U, S, _ = svd(W[:, win].permute(1, 0, 2))  # (n, m, L)
        keep = S > 1e-9 * S[:, :1].clamp_min(1e-300)
        U = U * keep[:, None, :]
        v = W[:, col].T  # (n, m)
        res = v - torch.einsum("jmk,jk->jm", U, torch.einsum("jmk,jm->jk", U, v))
        out = res.norm(dim=1) > 1e-7 * v.norm(dim=1).clamp_min(1e-300)
        found.update(int(j) for j in torch.nonzero(out & (v.norm(dim=1) > 0)).flatten())
    return sorted(found)


def _merge_boundaries(exact: list[int], span: list[int], N: int) -> list[int]:
    """Zero-pattern boundaries plus the span-change ones that are not next to one of them.

    The span test fires on both sides of a boundary when the active blocks' summed rank
    fills its window (measured: pairs ``{b - 1, b}`` or ``{b, b + 1}`` on 128 x 96 matrices of
    four rank-2 blocks); next to a zero-pattern boundary (which is exact) such a detection is
    its echo and is dropped, elsewhere both members of a pair are kept.
    """
    ex = set(exact)
    out = set(ex)
    for b in span:
        if not ({(b - 1) % N, b, (b + 1) % N} & ex):
            out.add(b)
    return sorted(out)


def support_candidates(
    W: torch.Tensor,
    budget: int,
    *,
    max_boundaries: int = 12,
    max_blocks: int = 4,
    max_rank: int = 3,
    window: int = 8,
    max_covers: int = 3000,
    time_limit: float = 5.0,
    iters: int = 60,
    min_zero_fraction: float = 0.05,
) -> Iterator[tuple[str, GBLR]]:
    """Yield ``("support", G)`` GBLR starts derived from the block structure of ``W``.

    Steps: boundaries from the zero pattern and from column/row span changes
    (:func:`_span_boundaries`); candidate rectangles = pairs of cyclic arcs between
    boundaries lying inside the support; every cover of the support by at most
    ``max_blocks`` candidates whose cost fits the budget (depth-first over the cells between
    boundaries, at most ``max_covers`` and ``time_limit``);
    for each cover and rank assignment (ranks <= ``max_rank``) a short block coordinate descent,
    refined when promising; stops at an exact fit or after ``time_limit`` CPU seconds
    (process time, so that a loaded machine does not change the result much).

    Yields nothing when fewer than ``min_zero_fraction`` of the entries of ``W`` are exact
    zeros (dense data, e.g. real weights: the step then costs nothing) or when there are more
    than ``max_boundaries`` boundaries per side.
    """
    t0 = time.process_time()
    m, n = W.shape
    Wd = W.detach().to("cpu", torch.float64)
    Z = (Wd != 0).numpy()
    if not Z.any() or Z.mean() > 1 - min_zero_fraction:
        return  # (almost) dense data: a few stray zeros carry no block structure
    rb = _merge_boundaries(_boundaries(Z), _span_boundaries(Wd.T, window), m)
    cb = _merge_boundaries(_boundaries(Z.T), _span_boundaries(Wd, window), n)
    if len(rb) > max_boundaries or len(cb) > max_boundaries:
        return
    # The pattern is constant on the cells between consecutive boundaries, and every
    # candidate is a union of cells: the cover search works on the (few) cells, not the entries.
    rcell, ccell = _cells(rb, m), _cells(cb, n)
    rrep = [int(np.argmax(rcell == k)) for k in range(rcell.max() + 1)]
    crep = [int(np.argmax(ccell == k)) for k in range(ccell.max() + 1)]
    cands = []
    for rs, rw in _arcs(rb, m):
        ri = _indices(rs, rw, m)
        sub = Z[ri]
        rin = np.zeros(len(rrep), dtype=bool)
        rin[rcell[ri]] = True
        for cs, cw in _arcs(cb, n):
            ci = _indices(cs, cw, n)
            if sub[:, ci].all() and min(rw + cw, rw * cw) <= budget:
                cin = np.zeros(len(crep), dtype=bool)
                cin[ccell[ci]] = True
                mask = np.outer(rin, cin).ravel()
                cands.append(((rs, rw, cs, cw), ri, ci, mask, min(rw + cw, rw * cw)))
    if not cands:
        return
    masks = np.stack([c[3] for c in cands])
    costs = np.array([c[4] for c in cands])
    support = Z[np.ix_(rrep, crep)].ravel()
    covers: set[tuple[int, ...]] = set()

    def search(chosen: list[int], covered: np.ndarray, cost: int) -> None:
        # the tree can be large with few covers in it: the CPU-time limit bounds it too
        if len(covers) >= max_covers or time.process_time() - t0 > time_limit:
            return
        uncovered = np.nonzero(support & ~covered)[0]
        if uncovered.size == 0:
            covers.add(tuple(sorted(chosen)))
            return
        if len(chosen) >= max_blocks:
            return
        if len(chosen) == max_blocks - 1:  # the last rectangle must cover everything left
            last = np.nonzero(masks[:, uncovered].all(axis=1) & (cost + costs <= budget))[0]
            covers.update(tuple(sorted([*chosen, int(k)])) for k in last)
            return
        # branch on the uncovered entry that the fewest candidates contain
        e = uncovered[int(np.argmin(masks[:, uncovered].sum(axis=0)))]
        for k in np.nonzero(masks[:, e])[0]:
            if cost + cands[k][4] <= budget:
                search([*chosen, int(k)], covered | masks[k], cost + cands[k][4])

    search([], np.zeros_like(support), 0)
    best = None  # (err, combo, ranks)
    for cover in sorted(covers, key=len):
        combo = [cands[k] for k in cover]
        rects = [(c[1], c[2]) for c in combo]
        sizes = [(len(r), len(c)) for r, c in rects]
        options = []
        for ranks in itertools.product(*[range(1, min(max_rank, h, w) + 1) for h, w in sizes]):
            cost = sum(min(r * (h + w), h * w) for r, (h, w) in zip(ranks, sizes, strict=True))
            if cost <= budget:
                options.append((cost, ranks))
        # the costliest rank assignments first: an exact structure uses the budget it is given
        for _, ranks in sorted(options, reverse=True):
            err, _ = _bcd(Wd, rects, list(ranks), iters=3)
            if err < 1e-2:
                err, _ = _bcd(Wd, rects, list(ranks), iters=iters)
            if best is None or err < best[0]:
                best = (err, combo, list(ranks))
            if best[0] < 1e-8 or time.process_time() - t0 > time_limit:
                break
        if best is not None and (best[0] < 1e-8 or time.process_time() - t0 > time_limit):
            break
    if best is None:
        return
    _, combo, ranks = best
    _, factors = _bcd(Wd, [(c[1], c[2]) for c in combo], ranks, iters=iters)
    G = GBLR(
        (m, n),
        [c[0][0] for c in combo],
        [c[0][1] for c in combo],
        [c[0][2] for c in combo],
        [c[0][3] for c in combo],
        [(U.to(W.dtype).to(W.device), V.to(W.dtype).to(W.device)) for U, V in factors],
    )
    if G.flops <= budget:
        yield "support", G
