"""Approximation error measures."""

from __future__ import annotations

from typing import Any

import torch

from .formats.base import StructuredMatrix
from .validation import as_matrix

__all__ = ["relative_error"]


def relative_error(W: Any, A: Any, ord: str | int = "fro") -> float:
    """Relative error ``||W - A|| / ||W||``.

    Parameters
    ----------
    W : array, shape (m, n)
        Reference matrix.
    A : StructuredMatrix or array, shape (m, n)
        Approximation.
    ord : {"fro", 2}
        Frobenius norm or spectral norm (largest singular value).

    Returns
    -------
    float
        Computed in float64. ``W = 0`` gives ``0.0`` if ``A = 0`` too, else ``inf``.
    """
    W = as_matrix(W, "W").detach().to(torch.float64)
    if isinstance(A, StructuredMatrix):
        if A.shape != tuple(W.shape):
            raise ValueError(f"A has shape {A.shape} but W has shape {tuple(W.shape)}")
        with torch.no_grad():  # (a float metric: no graph, no warning for trainable factors)
            Ad = A.to_dense().to(device=W.device, dtype=torch.float64)
    else:
        Ad = as_matrix(A, "A").detach().to(device=W.device, dtype=torch.float64)
        if Ad.shape != W.shape:
            raise ValueError(f"A has shape {tuple(Ad.shape)} but W has shape {tuple(W.shape)}")
    if ord == "fro":
        num, den = torch.linalg.norm(W - Ad), torch.linalg.norm(W)
    elif ord == 2:
        num = torch.linalg.matrix_norm(W - Ad, ord=2)
        den = torch.linalg.matrix_norm(W, ord=2)
    else:
        raise ValueError(f"ord must be 'fro' or 2; got {ord!r}")
    if float(den) == 0.0:
        return 0.0 if float(num) == 0.0 else float("inf")
    return float(num / den)
