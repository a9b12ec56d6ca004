"""Spectral statistics of a weight matrix: norms, ranks, energy and the heavy-tail exponent.

Definitions (``sigma_1 >= ... >= sigma_p``, ``p = min(m, n)``, the singular values of ``W``):

- stable rank ``||W||_F^2 / ||W||_2^2 = sum sigma_i^2 / sigma_1^2``;
- effective rank (Roy & Vetterli 2007) ``exp(H)`` with ``H = -sum q_i log q_i`` and
  ``q_i = sigma_i / sum_j sigma_j`` (the entropy of the normalised singular values; zeros
  contribute nothing);
- energy captured by rank ``r``: ``sum_{i<=r} sigma_i^2 / sum_i sigma_i^2`` (the fraction of
  ``||W||_F^2`` kept by the best rank-``r`` approximation, Eckart–Young), and ``rank_for(e)``
  the smallest ``r`` with energy ``>= e``;
- power-law tail of the empirical spectral density of ``W^T W`` (eigenvalues
  ``lambda_i = sigma_i^2``), the "alpha" of heavy-tailed self-regularisation (Martin &
  Mahoney 2021): ``p(lambda) ~ lambda^(-alpha)`` for ``lambda >= xmin``, fitted by the
  continuous maximum-likelihood estimator of Clauset, Shalizi & Newman (2009)
  ``alpha = 1 + n / sum_{lambda_i >= xmin} ln(lambda_i / xmin)``, with ``xmin`` chosen among
  the eigenvalues to minimise the Kolmogorov–Smirnov distance between the tail's empirical
  CDF and the fitted one, ``F(x) = 1 - (x / xmin)^(1 - alpha)``. Standard error
  ``(alpha - 1) / sqrt(n)``. Numerically zero eigenvalues are left out (see below). Same
  estimator as the ``powerlaw`` package (``Fit(..., discrete=False)``) used by WeightWatcher,
  which may restrict ``xmin`` differently.
- numerical rank: singular values above ``eps * ||W||_F`` with ``eps`` the machine epsilon
  of the *input* dtype (at least ``max(m, n) * eps(float64) * sigma_1``). Storing ``W`` in that
  dtype perturbs it by ``E`` with ``|e_ij| <= eps/2 |w_ij|``, so ``||E||_2 <= ||E||_F <=
  eps ||W||_F``: smaller singular values are not determined by the stored data (e.g. rounding
  noise of a float16 or bfloat16 checkpoint). Only the eigenvalues of the singular values
  above this level enter the power-law fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from ..validation import as_matrix

__all__ = ["spectrum", "SpectrumReport", "powerlaw_fit", "PowerLawFit", "ENERGY_LEVELS"]

#: Energy levels reported by default.
ENERGY_LEVELS = (0.9, 0.95, 0.99)

POWERLAW_METHOD = (
    "continuous power-law MLE (Clauset, Shalizi & Newman 2009) on the eigenvalues of W^T W, "
    "xmin chosen by minimum Kolmogorov-Smirnov distance"
)


@dataclass(frozen=True)
class PowerLawFit:
    """Power-law fit ``p(x) ~ x^(-alpha)`` for ``x >= xmin``.

    Attributes
    ----------
    alpha : float or None
        Exponent; None when the fit was not possible (see ``status``).
    alpha_std : float or None
        Standard error ``(alpha - 1) / sqrt(n_tail)``.
    xmin : float or None
        Lower bound of the tail (an eigenvalue of ``W^T W``).
    n_tail : int
        Eigenvalues ``>= xmin`` used by the fit.
    ks_distance : float or None
        Kolmogorov–Smirnov distance of the fit on the tail (smaller is better).
    n_total : int
        Positive eigenvalues available.
    status : str
        ``"ok"`` or the reason no fit was made (e.g. too few eigenvalues).
    method : str
        The estimator, in words.
    """

    alpha: float | None
    alpha_std: float | None
    xmin: float | None
    n_tail: int
    ks_distance: float | None
    n_total: int
    status: str
    method: str = POWERLAW_METHOD


def powerlaw_fit(x: Any, *, min_tail: int = 10) -> PowerLawFit:
    """Continuous power-law MLE with xmin by minimum KS distance (Clauset et al. 2009).

    Parameters
    ----------
    x : array of positive floats, shape (N,)
        Samples (e.g. eigenvalues); non-positive values are dropped.
    min_tail : int, default 10
        Smallest number of samples in the tail; candidates ``xmin`` leaving fewer are skipped.

    Returns
    -------
    PowerLawFit
        ``status != "ok"`` (and ``alpha`` None) when fewer than ``min_tail`` distinct
        positive samples exist.

    Notes
    -----
    For each candidate ``xmin = x_(k)`` (sorted ascending) the MLE is
    ``alpha_k = 1 + n_k / sum_{j >= k} ln(x_(j) / x_(k))`` and the KS distance is
    ``max_i max(|i/n - F(x_i)|, |(i-1)/n - F(x_i)|)`` over the tail. Cost ``O(N^2)``.
    """
    v = np.sort(np.asarray(x, dtype=np.float64).ravel())
    v = v[v > 0]
    N = int(v.size)
    distinct = int(np.unique(v).size)
    if N < min_tail:
        return PowerLawFit(None, None, None, 0, None, N,
                           f"too few positive values to fit (have {N}, need >= {min_tail})")
    if distinct < min_tail:
        return PowerLawFit(None, None, None, 0, None, N,
                           f"too few distinct positive values to fit (have {distinct} distinct "
                           f"among {N}, need >= {min_tail})")
    logv = np.log(v)
    # suffix sums of log values: S[k] = sum_{j >= k} log v_j
    suffix = np.cumsum(logv[::-1])[::-1]
    best = None
    for k in range(0, N - min_tail + 1):
        if k > 0 and v[k] == v[k - 1]:
            continue
        n = N - k
        s = suffix[k] - n * logv[k]
        if s <= 0:
            continue
        alpha = 1.0 + n / s
        tail = v[k:]
        cdf = 1.0 - (tail / v[k]) ** (1.0 - alpha)
        i = np.arange(1, n + 1, dtype=np.float64)
        d = float(max(np.max(np.abs(i / n - cdf)), np.max(np.abs((i - 1) / n - cdf))))
        if best is None or d < best[0]:
            best = (d, k, alpha)
    if best is None:
        return PowerLawFit(None, None, None, 0, None, N, "no candidate xmin gave a valid fit")
    d, k, alpha = best
    n = N - k
    return PowerLawFit(float(alpha), float((alpha - 1.0) / math.sqrt(n)), float(v[k]), n, d, N,
                       "ok")


@dataclass(frozen=True)
class SpectrumReport:
    """Spectral statistics of one matrix (see the module docstring for definitions).

    Attributes
    ----------
    shape : tuple[int, int]
    singular_values : torch.Tensor, shape (min(m, n),)
        Descending, float64, on the CPU.
    fro_norm, spectral_norm : float
    stable_rank, effective_rank : float
    energy : torch.Tensor, shape (min(m, n),)
        ``energy[r - 1]``: fraction of ``||W||_F^2`` captured by the best rank-``r``
        approximation.
    energy_ranks : dict[float, int]
        Level -> smallest rank reaching it (levels 0.9, 0.95, 0.99 by default).
    numerical_rank : int
        Singular values above ``eps(input dtype) * ||W||_F`` (see the module docstring).
    powerlaw : PowerLawFit
        Tail exponent of the eigenvalues of ``W^T W``.
    """

    shape: tuple[int, int]
    singular_values: torch.Tensor
    fro_norm: float
    spectral_norm: float
    stable_rank: float
    effective_rank: float
    energy: torch.Tensor
    energy_ranks: dict[float, int]
    numerical_rank: int
    powerlaw: PowerLawFit
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def eigenvalues(self) -> torch.Tensor:
        """Eigenvalues of ``W^T W`` (non-zero part), i.e. squared singular values, descending."""
        return self.singular_values**2

    @property
    def alpha(self) -> float | None:
        """Power-law exponent of the eigenvalue tail (None when not fitted)."""
        return self.powerlaw.alpha

    def rank_for(self, level: float) -> int:
        """Smallest rank ``r`` whose best approximation keeps ``level`` of the energy."""
        if not (0.0 < level <= 1.0):
            raise ValueError(f"level must lie in (0, 1]; got {level}")
        return _rank_for(self.energy, level)

    def summary(self) -> dict[str, Any]:
        """Scalars as a flat JSON-friendly dict."""
        m, n = self.shape
        out: dict[str, Any] = {
            "rows": m, "cols": n, "fro_norm": self.fro_norm, "spectral_norm": self.spectral_norm,
            "stable_rank": self.stable_rank, "effective_rank": self.effective_rank,
            "numerical_rank": self.numerical_rank,
        }
        for lvl, r in self.energy_ranks.items():
            out[f"rank_{round(lvl * 100, 6):g}"] = r  # rank_90, rank_99, rank_99.9
        pl = self.powerlaw
        out.update(alpha=pl.alpha, alpha_std=pl.alpha_std, xmin=pl.xmin, n_tail=pl.n_tail,
                   ks_distance=pl.ks_distance, powerlaw_status=pl.status,
                   powerlaw_method=pl.method)
        return out

    def __repr__(self) -> str:
        m, n = self.shape
        ranks = ", ".join(f"{round(k * 100)}%: {v}" for k, v in self.energy_ranks.items())
        a = f"{self.alpha:.3f}" if self.alpha is not None else f"n/a ({self.powerlaw.status})"
        return (
            f"SpectrumReport(shape=({m}, {n}), spectral_norm={self.spectral_norm:.4g}, "
            f"fro_norm={self.fro_norm:.4g}, stable_rank={self.stable_rank:.2f}, "
            f"effective_rank={self.effective_rank:.1f}, energy ranks {{{ranks}}}, alpha={a})"
        )


def _rank_for(energy: torch.Tensor, level: float) -> int:
    # tolerance absorbs rounding in the cumulative sum (energy[-1] is 1 up to ~1e-16)
    idx = int(torch.searchsorted(energy, torch.tensor(level - 1e-12, dtype=energy.dtype)))
    return min(idx + 1, energy.numel())


def spectrum(
    W: Any,
    *,
    levels: tuple[float, ...] = ENERGY_LEVELS,
    min_tail: int = 10,
) -> SpectrumReport:
    """Spectral statistics of ``W``.

    Parameters
    ----------
    W : torch.Tensor or numpy.ndarray, shape (m, n)
        Real matrix (computed in float64 on its device; results on the CPU).
    levels : tuple of float, default (0.9, 0.95, 0.99)
        Energy levels for :attr:`SpectrumReport.energy_ranks`.
    min_tail : int, default 10
        Fewest eigenvalues in the power-law tail (see :func:`powerlaw_fit`).

    Returns
    -------
    SpectrumReport

    Raises
    ------
    ValueError
        ``W`` is all zeros (no spectrum to normalise), or a level outside (0, 1].

    Notes
    -----
    Cost: one exact SVD, ``O(m n min(m, n))``, plus ``O(min(m, n)^2)`` for the power-law fit.
    """
    eps = _input_eps(W)
    W = as_matrix(W, "W")
    for lvl in levels:
        if not (0.0 < float(lvl) <= 1.0):
            raise ValueError(f"levels must lie in (0, 1]; got {lvl}")
    W64 = W.to(torch.float64)
    # statistics of W / c (c a power of two: exact), scaled back; squares of finite float64
    # entries beyond ~1e154 or below ~1e-154 would over- or underflow
    peak = float(torch.linalg.vector_norm(W64, ord=float("inf"))) if W64.numel() else 0.0
    if peak == 0.0:
        raise ValueError("W is the zero matrix; its spectral statistics are undefined")
    c = math.ldexp(1.0, math.frexp(peak)[1])
    s_hat = torch.linalg.svdvals(W64 / c).cpu()
    s = s_hat * c
    total2_hat = float((s_hat**2).sum())
    s1 = float(s[0])
    fro = math.sqrt(total2_hat) * c
    q = s_hat / s_hat.sum()
    q = q[q > 0]
    eff = float(torch.exp(-(q * q.log()).sum()))
    energy = torch.cumsum(s_hat**2, 0) / total2_hat
    ranks = {float(lvl): _rank_for(energy, float(lvl)) for lvl in levels}
    m, n = W.shape
    tol = max(eps * math.sqrt(total2_hat), max(m, n) * float(np.finfo(np.float64).eps)
              * float(s_hat[0]))
    nrank = int((s_hat > tol).sum())
    pl = powerlaw_fit((s_hat[:nrank] ** 2).numpy(), min_tail=min_tail)  # alpha: scale-free
    if pl.xmin is not None:
        pl = replace(pl, xmin=pl.xmin * c * c)
    return SpectrumReport(
        shape=(int(m), int(n)), singular_values=s, fro_norm=fro, spectral_norm=s1,
        stable_rank=total2_hat / float(s_hat[0]) ** 2, effective_rank=eff, energy=energy,
        energy_ranks=ranks, numerical_rank=nrank, powerlaw=pl,
    )


def _input_eps(W: Any) -> float:
    """Machine epsilon of the input's floating dtype (float64 when unknown)."""
    dt = getattr(W, "dtype", None)
    if isinstance(dt, torch.dtype) and dt.is_floating_point:
        return float(torch.finfo(dt).eps)
    try:
        return float(np.finfo(np.dtype(dt)).eps)
    except (TypeError, ValueError):
        return float(np.finfo(np.float64).eps)
