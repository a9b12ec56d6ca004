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
from collections.abc import Iterator

import numpy as np
import torch

from ..formats.gblr import GBLR

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
            sub = (W - approx)[ri][:, ci] + parts[k]
            U, S, Vh = torch.linalg.svd(sub, full_matrices=False)
            s = S[:r].sqrt()
            Uk, Vk = U[:, :r] * s, Vh[:r].T * s
            new = Uk @ Vk.T
            approx[ri.unsqueeze(1), ci.unsqueeze(0)] += new - parts[k]
            parts[k], factors[k] = new, (Uk, Vk)
    err = float(torch.linalg.norm(W - approx) / torch.linalg.norm(W).clamp_min(1e-300))
    return err, factors


def support_candidates(
    W: torch.Tensor,
    budget: int,
    *,
    max_boundaries: int = 10,
    max_blocks: int = 4,
    max_rank: int = 4,
    iters: int = 40,
    min_zero_fraction: float = 0.05,
) -> Iterator[tuple[str, GBLR]]:
    """Yield ``("support", G)`` GBLR starts derived from the exact-zero pattern of ``W``.

    Yields nothing when fewer than ``min_zero_fraction`` of the entries of ``W`` are exact
    zeros, when the pattern has more than ``max_boundaries`` boundaries per side, or when no
    cover with at most ``max_blocks`` rectangles exists. Cost: one SVD per block per BCD
    sweep for each cover and rank assignment tried (at most 20 covers, ranks <= max_rank).
    """
    m, n = W.shape
    Wd = W.detach().to("cpu", torch.float64)
    Z = (Wd != 0).numpy()
    if not Z.any() or Z.mean() > 1 - min_zero_fraction:
        return  # (almost) dense data: a few stray zeros carry no block structure
    rb, cb = _boundaries(Z), _boundaries(Z.T)
    if len(rb) > max_boundaries or len(cb) > max_boundaries:
        return
    rects = []
    for rs, rw in _arcs(rb, m):
        ri = _indices(rs, rw, m)
        sub = Z[ri]
        for cs, cw in _arcs(cb, n):
            ci = _indices(cs, cw, n)
            if sub[:, ci].all():
                mask = np.zeros((m, n), dtype=bool)
                mask[np.ix_(ri, ci)] = True
                rects.append(((rs, rw, cs, cw), ri, ci, _bits(mask)))
    # keep maximal rectangles
    maximal = [
        R
        for R in rects
        if not any(S is not R and R[3] & ~S[3] == 0 and S[3] != R[3] for S in rects)
    ]
    if len(maximal) > 40:
        return
    target = _bits(Z)
    covers = []
    for size in range(1, max_blocks + 1):
        for combo in itertools.combinations(maximal, size):
            u = 0
            for R in combo:
                u |= R[3]
            if u == target:
                covers.append(combo)
        if covers:
            break
    best = None  # (err, key, ranks, factors)
    for combo in covers[:20]:
        sizes = [(len(R[1]), len(R[2])) for R in combo]
        options = [range(1, min(max_rank, h, w) + 1) for h, w in sizes]
        for ranks in itertools.product(*options):
            cost = sum(min(r * (h + w), h * w) for r, (h, w) in zip(ranks, sizes, strict=True))
            if cost > budget:
                continue
            err, factors = _bcd(Wd, [(R[1], R[2]) for R in combo], list(ranks), iters=8)
            if best is None or err < best[0]:
                best = (err, combo, list(ranks), factors)
    if best is None:
        return
    _, combo, ranks, _ = best
    _, factors = _bcd(Wd, [(R[1], R[2]) for R in combo], ranks, iters=iters)
    G = GBLR(
        (m, n),
        [R[0][0] for R in combo],
        [R[0][1] for R in combo],
        [R[0][2] for R in combo],
        [R[0][3] for R in combo],
        [(U.to(W.dtype).to(W.device), V.to(W.dtype).to(W.device)) for U, V in factors],
    )
    if G.flops <= budget:
        yield "support", G
