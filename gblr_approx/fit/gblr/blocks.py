"""Exact block-coordinate descent for GBLR components on fixed rectangles.

The model is ``A = sum_k P_k`` where ``P_k`` lives on the cyclic rectangle ``I_k^out x I_k^in``
and has rank ``r_k`` there (or is a dense block when that is cheaper). For fixed rectangles
and ranks the best ``P_k`` given all the others is the truncated SVD of the residual
``W - sum_{j != k} P_j`` restricted to its rectangle (Eckart-Young), so updating the
components one after another never increases ``||W - A||_F`` (block coordinate descent).

Ranks are re-allocated between components by a knapsack on the singular values of each
component's own residual (gain ``sigma_t^2`` for cost ``h_k + w_k`` per rank, or the whole
remaining block energy for the dense block), under a total cost budget and an optional limit
on the number of active components.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

import torch

from ...formats.gblr import GBLR
from ...linalg import frob2, svd

__all__ = ["Rect", "BlockModel"]


@dataclass
class Rect:
    """A component's rectangle: start and width (entries) of its row and column intervals."""

    r0: int
    h: int
    c0: int
    w: int

    def cost(self, rank: int) -> int:
        return min(rank * (self.h + self.w), self.h * self.w)

    def dense_rank(self) -> int:
        """Smallest rank at which the dense block is no more expensive than the factors."""
        return math.ceil(self.h * self.w / (self.h + self.w))


def _pieces(start: int, width: int, size: int) -> list[tuple[int, int, int]]:
    """(matrix_start, matrix_stop, block_offset) slices of a cyclic interval."""
    end = start + width
    if end <= size:
        return [(start, end, 0)]
    return [(start, size, 0), (0, end - size, size - start)]


@dataclass
class _Comp:
    rect: Rect
    rank: int = 0
    P: torch.Tensor | None = None  # current block (h, w)
    S: torch.Tensor | None = None  # singular values of the own residual (descending)
    U: torch.Tensor | None = None
    Vh: torch.Tensor | None = None
    rows: list = field(default_factory=list)
    cols: list = field(default_factory=list)


class BlockModel:
    """Components on fixed rectangles, fitted by exact block-coordinate descent.

    Parameters
    ----------
    W : Tensor (m, n)
        Target matrix.
    rects : list of Rect
        Candidate rectangles (a rectangle of rank 0 is inactive but keeps its spectrum so the
        rank allocation can activate it).
    ranks : list of int, optional
        Initial ranks (default all 0).
    """

    def __init__(self, W: torch.Tensor, rects: list[Rect], ranks: list[int] | None = None):
        self.W = W
        self.m, self.n = W.shape
        self.R = W.clone()
        # large layers: float64 sums without float64 copies (linalg.frob2)
        self._big = W.numel() >= _threshold()
        self.norm2 = (frob2(W) if self._big else float(W.double().pow(2).sum())) or 1.0
        #: how the model was made (e.g. ``{"global_svd": "randomized"}``), copied to
        #: :meth:`to_gblr`'s ``info``
        self.info: dict = {}
        self.comps: list[_Comp] = []
        for i, rc in enumerate(rects):
            c = _Comp(rc, 0 if ranks is None else int(ranks[i]))
            c.rows = _pieces(rc.r0, rc.h, self.m)
            c.cols = _pieces(rc.c0, rc.w, self.n)
            self.comps.append(c)

    # ------------------------------------------------------------ residual access
    def _get(self, c: _Comp) -> torch.Tensor:
        if len(c.rows) == 1 and len(c.cols) == 1:
            (a, b, _), (p, q, _) = c.rows[0], c.cols[0]
            return self.R[a:b, p:q].clone()
        parts = [torch.cat([self.R[a:b, p:q] for p, q, _ in c.cols], 1) for a, b, _ in c.rows]
        return torch.cat(parts, 0)

    def _add(self, c: _Comp, X: torch.Tensor, alpha: float) -> None:
        for a, b, oa in c.rows:
            for p, q, op in c.cols:
                self.R[a:b, p:q].add_(X[oa : oa + b - a, op : op + q - p], alpha=alpha)

    def set_factors(self, i: int, U: torch.Tensor, Vh: torch.Tensor) -> None:
        """Set component ``i`` to ``U @ Vh`` (``U`` carries the singular values)."""
        c = self.comps[i]
        if c.P is not None:
            self._add(c, c.P, 1.0)
        c.U, c.Vh = U.contiguous(), Vh.contiguous()
        c.P = c.U @ c.Vh
        self._add(c, c.P, -1.0)

    def drop_inactive(self) -> None:
        """Forget rank-0 components (their spectra are then no longer tracked)."""
        for c in self.comps:
            if c.rank == 0 and c.P is not None:
                self._add(c, c.P, 1.0)
        self.comps = [c for c in self.comps if c.rank > 0]

    # ------------------------------------------------------------------ updates
    def update(self, c: _Comp, keep_spectrum: bool = True) -> None:
        """Exact update of one component: best rank-``rank`` block given the others."""
        rc = c.rect
        if c.P is not None:
            self._add(c, c.P, 1.0)  # residual now includes the component's own part
        if c.rank == 0 and not keep_spectrum:
            c.P = None
            return
        blk = self._get(c)
        if c.rank >= rc.dense_rank() and c.rank > 0:
            c.P = blk
            c.S = None
            self._add(c, blk, -1.0)
            if keep_spectrum:
                c.S = torch.linalg.svdvals(blk)
            return
        U, S, Vh = svd(blk)
        c.S = S
        if c.rank == 0:
            c.P, c.U, c.Vh = None, None, None
            return
        r = c.rank
        c.U, c.Vh = U[:, :r] * S[:r], Vh[:r]
        c.P = c.U @ c.Vh
        self._add(c, c.P, -1.0)

    def sweep(self, keep_spectrum: bool = True) -> float:
        """Update every component once (largest first); return the relative error."""
        order = sorted(
            range(len(self.comps)), key=lambda i: -self.comps[i].rect.h * self.comps[i].rect.w
        )
        for i in order:
            self.update(self.comps[i], keep_spectrum)
        return self.rel_error()

    def rel_error(self) -> float:
        if self._big:
            return math.sqrt(max(frob2(self.R), 0.0) / self.norm2)
        return math.sqrt(max(float(self.R.double().pow(2).sum()), 0.0) / self.norm2)

    def cost(self) -> int:
        return sum(c.rect.cost(c.rank) for c in self.comps if c.rank > 0)

    def active(self) -> int:
        return sum(1 for c in self.comps if c.rank > 0)

    # ----------------------------------------------------------- rank allocation
    def allocate(self, budget: int, max_components: int | None = None) -> None:
        """Re-allocate ranks by a greedy knapsack on each component's own-residual spectrum.

        Gains are ``sigma_t^2`` (rank ``t``) per ``h + w`` MACs; once the factor cost reaches
        the dense cost the remaining block energy is one item costing the difference. Items
        are taken in order of gain per MAC while they fit, each component's items in order.
        Requires a spectrum for every component (run :meth:`sweep` first).
        """
        heap: list[tuple[float, int, int]] = []
        for i, c in enumerate(self.comps):
            if c.S is None or c.S.numel() == 0:
                continue
            heapq.heappush(heap, (-self._item(c, 0)[0], i, 0))
        new_rank = [0] * len(self.comps)
        used = 0
        active = 0
        while heap:
            neg, i, t = heapq.heappop(heap)
            c = self.comps[i]
            ratio, cost, next_rank = self._item(c, t)
            if ratio <= 0:
                continue
            if used + cost > budget:
                continue
            if t == 0:
                if max_components is not None and active >= max_components:
                    continue
                active += 1
            used += cost
            new_rank[i] = next_rank
            if next_rank < c.rect.dense_rank():
                heapq.heappush(heap, (-self._item(c, t + 1)[0], i, t + 1))
        for c, r in zip(self.comps, new_rank, strict=True):
            if r != c.rank:
                c.rank = r

    @staticmethod
    def _item(c: _Comp, t: int) -> tuple[float, int, int]:
        """(gain per MAC, cost, resulting rank) of the t-th allocation step of ``c``."""
        rc = c.rect
        S2 = c.S.double().pow(2)
        d = rc.dense_rank()
        full = rc.h * rc.w
        step = rc.h + rc.w
        if t + 1 < d and (t + 1) * step < full and t < S2.numel():
            return float(S2[t]) / step, step, t + 1
        # dense item: everything left, for the rest of the dense cost
        cost = full - t * step
        gain = float(S2[t:].sum()) if t < S2.numel() else 0.0
        return (gain / cost if cost > 0 else 0.0), max(cost, 0), d

    # ------------------------------------------------------------------- export
    def to_gblr(self) -> GBLR:
        rs, rw, cs, cw, factors = [], [], [], [], []
        for c in self.comps:
            if c.rank <= 0 or c.P is None:
                continue
            rc = c.rect
            rs.append(rc.r0)
            rw.append(rc.h)
            cs.append(rc.c0)
            cw.append(rc.w)
            if c.rank >= rc.dense_rank():
                factors.append(c.P.clone())
            else:
                s = torch.ones(c.rank, dtype=c.U.dtype, device=c.U.device)
                # U already carries the singular values; split them evenly for balance
                # (the smallest normal number of the dtype: 1e-300 is 0 in float32, and a zero
                # column would then give 0 / 0)
                nrm = c.U.norm(dim=0).clamp_min(torch.finfo(c.U.dtype).tiny).sqrt()
                s = s / nrm
                factors.append(((c.U * s).contiguous(), (c.Vh.T / s).contiguous()))
        G = GBLR(
            (self.m, self.n), rs, rw, cs, cw, factors, dtype=self.W.dtype, device=self.W.device
        )
        G.info = dict(self.info)
        return G


def _threshold() -> int:
    from ... import linalg

    return linalg.RANDOMIZED_MIN_ENTRIES
