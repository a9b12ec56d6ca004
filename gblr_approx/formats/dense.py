"""Dense matrices: the reference format, cost ``m * n``."""

from __future__ import annotations

from typing import Any

import torch

from ..budget import InfeasibleBudgetError
from .base import ROW_FORM_BELOW, StructuredMatrix, check_factors, register_format

__all__ = ["Dense"]


@register_format
class Dense(StructuredMatrix):
    """A plain dense ``m x n`` matrix.

    Parameters
    ----------
    weight : torch.Tensor, shape (m, n)

    Cost: ``m * n`` MACs per mat-vec; ``m * n`` parameters.
    """

    format_name = "dense"

    def __init__(self, weight: torch.Tensor) -> None:
        if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
            raise ValueError("weight must be a 2-D torch.Tensor")
        check_factors(weight)
        super().__init__(tuple(weight.shape))
        self.weight = weight

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight}

    def _float_tensors(self) -> list[torch.Tensor]:
        return [self.weight]

    @classmethod
    def _from_state(cls, tensors, config, shape):
        return cls(tensors["weight"])

    @property
    def flops(self) -> int:
        return self.shape[0] * self.shape[1]

    def to_dense(self) -> torch.Tensor:
        return self.weight.clone()

    def _matmul(self, X: torch.Tensor) -> torch.Tensor:
        if 1 < X.shape[1] < ROW_FORM_BELOW:  # thin: the transposed product, as nn.Linear
            return (X.T @ self.weight.T).T  # runs it (2-3x faster in MKL at 2-10 columns)
        return self.weight @ X

    def _rmatmul(self, X: torch.Tensor) -> torch.Tensor:
        return X @ self.weight

    def _transpose(self) -> Dense:
        return Dense(self.weight.T.contiguous())

    @classmethod
    def min_budget(cls, m: int, n: int, **options: Any) -> int:
        return m * n

    @classmethod
    def project(cls, W: torch.Tensor, budget: int, **options: Any) -> Dense:
        """Return ``W`` itself; requires ``budget >= m * n``."""
        if options:
            raise TypeError(f"dense takes no format options; got {sorted(options)}")
        m, n = W.shape
        if budget < m * n:
            raise InfeasibleBudgetError("dense", budget, m * n)
        return cls(W.clone())
