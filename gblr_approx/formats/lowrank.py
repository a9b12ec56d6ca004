"""Low-rank matrices ``A = U V^T`` and their optimal (truncated SVD) projection."""

from __future__ import annotations

from typing import Any

import torch

from ..budget import InfeasibleBudgetError
from ..linalg import balanced_factors, check_sketch_options, top_svd
from ..validation import check_positive_int
from .base import (
    ROW_FORM_BELOW,
    StructuredMatrix,
    batch_major,
    check_factors,
    register_format,
    scale_invariant,
)

__all__ = ["LowRank"]


@register_format
class LowRank(StructuredMatrix):
    """Rank-``r`` matrix ``A = U @ V.T``.

    Parameters
    ----------
    U : torch.Tensor, shape (m, r)
    V : torch.Tensor, shape (n, r)

    Cost: ``r * (m + n)`` MACs per mat-vec (``x -> V^T x -> U (V^T x)``), ``r * (m + n)``
    parameters.
    """

    format_name = "lowrank"

    def __init__(self, U: torch.Tensor, V: torch.Tensor) -> None:
        check_factors(U, V)
        if U.ndim != 2 or V.ndim != 2 or U.shape[1] != V.shape[1]:
            raise ValueError(
                f"U (m, r) and V (n, r) must share r; got {tuple(U.shape)} and {tuple(V.shape)}"
            )
        super().__init__((U.shape[0], V.shape[0]))
        self.U = U
        self.V = V

    @property
    def rank(self) -> int:
        return int(self.U.shape[1])

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {"U": self.U, "V": self.V}

    def _float_tensors(self) -> list[torch.Tensor]:
        return [self.U, self.V]

    @classmethod
    def _from_state(cls, tensors, config, shape):
        return cls(tensors["U"], tensors["V"])

    @property
    def flops(self) -> int:
        return self.rank * (self.shape[0] + self.shape[1])

    def to_dense(self) -> torch.Tensor:
        return self.U @ self.V.T

    def _matmul(self, X: torch.Tensor) -> torch.Tensor:
        # (X^T V) U^T, the result batch-major too, as nn.Linear's: for batch-major X, and for
        # thin X, where MKL's GEMMs with a few output columns are 2-4x slower than the
        # transposed product (MiniLM layers at 25 %, 2-10 columns: 384x384 46-64 -> 14-23 us)
        if batch_major(X) or 1 < X.shape[1] < ROW_FORM_BELOW:
            return ((X.T @ self.V) @ self.U.T).T
        return self.U @ (self.V.T @ X)

    def _rmatmul(self, X: torch.Tensor) -> torch.Tensor:
        return (X @ self.U) @ self.V.T

    def _linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x @ A.T + bias`` for a row-major batch ``x`` (k, n): two GEMMs, the bias fused
        into the second (``addmm``), as ``nn.Linear``; one row as two mat-vecs (``addmv``).
        ``(m + n) r k`` MACs."""
        if x.shape[0] == 1:
            z = self.V.T.mv(x[0])
            y = self.U.mv(z) if bias is None else torch.addmv(bias, self.U, z)
            return y.unsqueeze(0)
        Z = x @ self.V
        return Z @ self.U.T if bias is None else torch.addmm(bias, Z, self.U.T)

    def _transpose(self) -> LowRank:
        return LowRank(self.V, self.U)

    @classmethod
    def min_budget(cls, m: int, n: int, **options: Any) -> int:
        return m + n

    @classmethod
    @scale_invariant
    def project(
        cls,
        W: torch.Tensor,
        budget: int,
        *,
        rank: int | None = None,
        method: str = "auto",
        oversample: int = 10,
        power_iters: int = 2,
        seed: int = 0,
    ) -> LowRank:
        """Best rank-``r`` approximation with ``r = floor(budget / (m + n))``.

        Optimal in Frobenius and spectral norm (Eckart-Young-Mirsky) when ``method="exact"``:
        ``||W - A||_F^2 = sum_{t > r} sigma_t^2``. ``method="randomized"`` uses a randomized
        range finder (see :func:`gblr_approx.linalg.randomized_svd` for its error bound),
        controlled by ``oversample``, ``power_iters`` and ``seed``; use it for large layers.
        ``method="auto"`` (default) is exact below
        :data:`gblr_approx.linalg.RANDOMIZED_MIN_ENTRIES` entries and randomized above (when
        ``r + oversample <= min(m, n) / 2``; :func:`gblr_approx.linalg.choose_svd_method`).
        ``info["algorithm"]`` and ``info["svd"]`` record which one ran.

        Parameters
        ----------
        rank : int, optional
            Fix the rank instead of deriving it from the budget (must still fit the budget).
        """
        m, n = W.shape
        # checked for every method, so a bad option never waits for a large layer to surface
        oversample, power_iters = check_sketch_options(oversample, power_iters)
        max_rank = budget // (m + n)
        if rank is None:
            r = min(max_rank, m, n)
        else:
            r = check_positive_int(rank, "rank")
            if r > min(m, n):
                raise ValueError(f"rank must be <= min(m, n) = {min(m, n)}; got {r}")
            if r > max_rank:
                raise InfeasibleBudgetError(
                    "lowrank", budget, r * (m + n), f"rank={r} costs r*(m+n)"
                )
        if r < 1:
            raise InfeasibleBudgetError("lowrank", budget, m + n, "one rank costs m+n MACs")
        U, S, Vh, svd_info = top_svd(
            W, r, method=method, oversample=oversample, power_iters=power_iters, seed=seed
        )
        L, R = balanced_factors(U, S, Vh)
        out = cls(L.contiguous(), R.contiguous())
        used = svd_info.pop("svd")
        out.info = {"algorithm": f"truncated SVD ({used})", "rank": r, "svd": used,
                    "method": method, **svd_info}
        return out
