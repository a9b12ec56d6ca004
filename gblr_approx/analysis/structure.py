"""Where the structure of a matrix lies: block-energy maps, per-block ranks, GBLR coverage.

Grids split ``m`` rows into ``gr`` contiguous blocks and ``n`` columns into ``gc`` blocks whose
sizes differ by at most one (edges ``floor(i * m / gr)``), so any shape works.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..validation import as_matrix, check_pair

__all__ = [
    "block_energy",
    "block_ranks",
    "gblr_coverage",
    "grid_edges",
    "BlockEnergy",
    "BlockRanks",
    "GBLRCoverage",
]


def grid_edges(size: int, blocks: int) -> torch.Tensor:
    """Edges ``floor(i * size / blocks)``, ``i = 0..blocks`` (LongTensor, ``blocks + 1``)."""
    return torch.tensor([(i * size) // blocks for i in range(blocks + 1)], dtype=torch.long)


def _grid(W: torch.Tensor, grid: Any) -> tuple[int, int]:
    gr, gc = check_pair(grid, "grid")
    m, n = W.shape
    if gr > m or gc > n:
        raise ValueError(
            f"grid={grid!r} asks for {gr} x {gc} blocks but W has shape ({m}, {n}); a grid "
            "needs at least one row and column per block"
        )
    return gr, gc


@dataclass(frozen=True)
class BlockEnergy:
    """Share of ``||W||_F^2`` in each block of a grid.

    Attributes
    ----------
    energy : torch.Tensor, shape (gr, gc), float64
        ``||W_ij||_F^2 / ||W||_F^2``; sums to 1.
    row_edges : LongTensor, shape (gr + 1,)
    col_edges : LongTensor, shape (gc + 1,)
    """

    energy: torch.Tensor
    row_edges: torch.Tensor
    col_edges: torch.Tensor

    @property
    def area(self) -> torch.Tensor:
        """Share of the entries in each block, shape (gr, gc)."""
        h = torch.diff(self.row_edges).double()
        w = torch.diff(self.col_edges).double()
        return torch.outer(h, w) / (h.sum() * w.sum())

    @property
    def density(self) -> torch.Tensor:
        """Energy per block relative to a uniform spread (``energy / area``; 1 = average)."""
        return self.energy / self.area

    @property
    def concentration(self) -> float:
        """Smallest share of blocks (ordered by energy) holding half the energy, in (0, 1]."""
        e = torch.sort(self.energy.flatten(), descending=True).values
        k = int(torch.searchsorted(torch.cumsum(e, 0), torch.tensor(0.5 - 1e-12, dtype=e.dtype)))
        return (k + 1) / e.numel()


def block_energy(W: Any, grid: int | tuple[int, int] = (8, 8)) -> BlockEnergy:
    """Fraction of the squared Frobenius norm of ``W`` in each block of a ``gr x gc`` grid.

    Parameters
    ----------
    W : array, shape (m, n)
    grid : int or (int, int), default (8, 8)
        Row blocks x column blocks (each at most the matrix size).

    Returns
    -------
    BlockEnergy
    """
    W = as_matrix(W, "W").to(torch.float64)
    gr, gc = _grid(W, grid)
    m, n = W.shape
    re, ce = grid_edges(m, gr), grid_edges(n, gc)
    sq = (W * W).cpu()
    # sums over row blocks then column blocks via reduceat on cumulative edges
    rows = torch.stack([sq[re[i]:re[i + 1]].sum(0) for i in range(gr)])
    e = torch.stack([rows[:, ce[j]:ce[j + 1]].sum(1) for j in range(gc)], dim=1)
    total = float(e.sum())
    if total == 0.0:
        raise ValueError("W is the zero matrix; its block energies are undefined")
    return BlockEnergy(e / total, re, ce)


@dataclass(frozen=True)
class BlockRanks:
    """Ranks of the blocks of a grid.

    Attributes
    ----------
    numerical_rank : LongTensor, shape (gr, gc)
        Singular values above ``rtol * sigma_1(block)`` (``rtol`` default
        ``max(h, w) * eps(float64)``, the NumPy ``matrix_rank`` rule); 0 for a zero block.
    energy_rank : LongTensor, shape (gr, gc)
        Smallest rank keeping ``energy`` of the block's squared Frobenius norm (0 for a zero
        block).
    max_rank : LongTensor, shape (gr, gc)
        ``min(h, w)`` of each block.
    row_edges, col_edges : LongTensor
    energy : float
        The level used for ``energy_rank``.
    """

    numerical_rank: torch.Tensor
    energy_rank: torch.Tensor
    max_rank: torch.Tensor
    row_edges: torch.Tensor
    col_edges: torch.Tensor
    energy: float


def block_ranks(
    W: Any,
    grid: int | tuple[int, int] = (4, 4),
    *,
    rtol: float | None = None,
    energy: float = 0.9,
) -> BlockRanks:
    """Numerical and energy ranks of each block of a ``gr x gc`` grid.

    Parameters
    ----------
    W : array, shape (m, n)
    grid : int or (int, int), default (4, 4)
    rtol : float, optional
        Relative tolerance (times ``sigma_1`` of the block) for the numerical rank. Default:
        the rule of :func:`~gblr_approx.analysis.spectrum.spectrum`, singular values above
        ``eps(input dtype) * ||B||_F`` (at least ``max(h, w) * eps(float64) * sigma_1``), so
        a float32 or float16 checkpoint's rounding does not count as rank.
    energy : float in (0, 1], default 0.9
        Level for :attr:`BlockRanks.energy_rank`.

    Returns
    -------
    BlockRanks

    Notes
    -----
    One SVD per block: ``O(m n min(m / gr, n / gc))`` in all.
    """
    from .spectrum import _input_eps

    eps_in = _input_eps(W)
    W = as_matrix(W, "W").to(torch.float64)
    gr, gc = _grid(W, grid)
    if not (0.0 < float(energy) <= 1.0):
        raise ValueError(f"energy must lie in (0, 1]; got {energy}")
    if rtol is not None and not (float(rtol) >= 0.0):
        raise ValueError(f"rtol must be >= 0; got {rtol}")
    m, n = W.shape
    re, ce = grid_edges(m, gr), grid_edges(n, gc)
    num = torch.zeros(gr, gc, dtype=torch.long)
    erank = torch.zeros(gr, gc, dtype=torch.long)
    mx = torch.zeros(gr, gc, dtype=torch.long)
    eps = float(np.finfo(np.float64).eps)
    for i in range(gr):
        for j in range(gc):
            B = W[re[i]:re[i + 1], ce[j]:ce[j + 1]]
            h, w = B.shape
            mx[i, j] = min(h, w)
            s = torch.linalg.svdvals(B).cpu()
            if float(s[0]) == 0.0:
                continue
            if rtol is None:  # as ga.spectrum: what the stored dtype can resolve
                tol = max(max(h, w) * eps * float(s[0]), eps_in * float(s.norm()))
            else:
                tol = float(rtol) * float(s[0])
            num[i, j] = int((s > tol).sum())
            c = torch.cumsum(s**2, 0) / float((s**2).sum())
            k = int(torch.searchsorted(c, torch.tensor(float(energy) - 1e-12, dtype=c.dtype)))
            erank[i, j] = min(k + 1, s.numel())
    return BlockRanks(num, erank, mx, re, ce, float(energy))


@dataclass(frozen=True)
class GBLRCoverage:
    """Where the components of a GBLR matrix lie.

    Attributes
    ----------
    count : torch.Tensor, shape (m, n), int32
        Number of components covering each entry.
    rank_sum : torch.Tensor, shape (m, n), int32
        Sum of the ranks of the components covering each entry.
    row_width, col_width, ranks : LongTensor, shape (K,)
        Per component (widths in entries, clipped to the matrix size).
    area : LongTensor, shape (K,)
        ``row_width * col_width``.
    """

    count: torch.Tensor
    rank_sum: torch.Tensor
    row_width: torch.Tensor
    col_width: torch.Tensor
    ranks: torch.Tensor
    area: torch.Tensor

    @property
    def covered_fraction(self) -> float:
        """Share of entries covered by at least one component."""
        return float((self.count > 0).double().mean())

    @property
    def overlap_fraction(self) -> float:
        """Share of covered entries covered by two or more components (0 when none covered)."""
        covered = int((self.count > 0).sum())
        return float((self.count > 1).sum()) / covered if covered else 0.0

    def summary(self) -> dict[str, Any]:
        """Width/rank distribution and coverage statistics as a JSON-friendly dict."""

        def stats(t: torch.Tensor) -> dict[str, float]:
            if t.numel() == 0:
                return {"min": 0, "median": 0, "mean": 0.0, "max": 0}
            d = t.double()
            return {"min": int(t.min()), "median": float(d.median()), "mean": float(d.mean()),
                    "max": int(t.max())}

        active = (self.ranks > 0) & (self.area > 0)
        return {
            "components": int(self.ranks.numel()),
            "active_components": int(active.sum()),
            "covered_fraction": self.covered_fraction,
            "overlap_fraction": self.overlap_fraction,
            "max_count": int(self.count.max()) if self.count.numel() else 0,
            "row_width": stats(self.row_width[active]),
            "col_width": stats(self.col_width[active]),
            "rank": stats(self.ranks[active]),
        }


def _interval_masks(start: torch.Tensor, width: torch.Tensor, size: int) -> torch.Tensor:
    """(K, size) bool: entry ``(start + t) mod size`` for ``t < width`` is True."""
    idx = torch.arange(size)
    off = (idx.unsqueeze(0) - start.unsqueeze(1)) % size
    return off < width.clamp(0, size).unsqueeze(1)


def gblr_coverage(G: Any) -> GBLRCoverage:
    """Coverage and overlap of the components of a GBLR matrix.

    Parameters
    ----------
    G : GBLR
        Any object with ``shape`` ``(m, n)`` and LongTensors (K,) ``row_start``, ``row_width``,
        ``col_start``, ``col_width``, ``ranks`` (widths in entries; component ``k`` covers rows
        ``(row_start[k] + t) mod m`` for ``t < row_width[k]``, and likewise for columns).

    Returns
    -------
    GBLRCoverage
        Entry-level maps (``m x n``; int32) plus per-component widths and ranks.
    """
    missing = [a for a in ("shape", "row_start", "row_width", "col_start", "col_width", "ranks")
               if not hasattr(G, a)]
    if missing:
        raise TypeError(
            f"G must be a GBLR matrix (with shape, row_start, row_width, col_start, col_width, "
            f"ranks); {type(G).__name__} lacks {missing}"
        )
    m, n = (int(G.shape[0]), int(G.shape[1]))

    def vec(name: str) -> torch.Tensor:
        t = torch.as_tensor(getattr(G, name)).detach().cpu().long().flatten()
        return t

    rs, rw, cs, cw, rk = (vec(a) for a in ("row_start", "row_width", "col_start", "col_width",
                                            "ranks"))
    K = rk.numel()
    if not all(t.numel() == K for t in (rs, rw, cs, cw)):
        raise ValueError("G.row_start, row_width, col_start, col_width and ranks must all have K "
                         "entries")
    R = _interval_masks(rs, rw, m).to(torch.float64)
    C = _interval_masks(cs, cw, n).to(torch.float64)
    active = (rk > 0).to(torch.float64)
    count = (R * active.unsqueeze(1)).T @ C
    rank_sum = (R * rk.to(torch.float64).unsqueeze(1)).T @ C
    rw_c, cw_c = rw.clamp(0, m), cw.clamp(0, n)
    return GBLRCoverage(
        count=count.round().to(torch.int32), rank_sum=rank_sum.round().to(torch.int32),
        row_width=rw_c, col_width=cw_c, ranks=rk, area=rw_c * cw_c,
    )
