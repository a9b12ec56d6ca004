"""Row/column permutations around any structured matrix.

``Permuted(inner, row_perm, col_perm)`` is the ``m x n`` matrix

    A[a, b] = inner[row_perm[a], col_perm[b]]

i.e. ``A = P_r @ inner @ P_c^T`` with permutation matrices ``P_r``, ``P_c``. Permutations are
index moves, not arithmetic, so the cost is the inner matrix's cost. This is how a Monarch
matrix is shown to be a block-low-rank (and hence GBLR) matrix: up to its fixed row
permutation (math.md 4.4), without a permutation bolted onto each format.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from .base import StructuredMatrix, get_format, register_format, take_rows

__all__ = ["Permuted"]

_PREFIX = "inner__"  # no "." (torch module buffer names cannot contain one)


def _check_perm(p: Any, size: int, name: str) -> torch.Tensor | None:
    if p is None:
        return None
    t = torch.as_tensor(p)
    if t.ndim != 1 or t.numel() != size or t.is_floating_point() or t.is_complex():
        raise ValueError(f"{name} must be an integer vector of length {size}; got {tuple(t.shape)}")
    t = t.to(torch.long)
    if not torch.equal(torch.sort(t.cpu()).values, torch.arange(size)):
        raise ValueError(f"{name} must be a permutation of 0..{size - 1}")
    return t


@register_format
class Permuted(StructuredMatrix):
    """``A[a, b] = inner[row_perm[a], col_perm[b]]`` for any :class:`StructuredMatrix` ``inner``.

    Parameters
    ----------
    inner : StructuredMatrix, shape (m, n)
    row_perm : LongTensor (m,), optional
        Row ``a`` of ``A`` is row ``row_perm[a]`` of ``inner``. ``None``: identity.
    col_perm : LongTensor (n,), optional
        Column ``b`` of ``A`` is column ``col_perm[b]`` of ``inner``. ``None``: identity.

    Notes
    -----
    Cost (MACs) and parameters are those of ``inner``: ``A @ X`` gathers the rows of ``X``,
    multiplies by ``inner`` and gathers the rows of the result. ``A.T`` is
    ``Permuted(inner.T, col_perm, row_perm)``. Saving nests the inner format's tensors and
    configuration in the same file.
    """

    format_name = "permuted"

    def __init__(
        self, inner: StructuredMatrix, row_perm: Any = None, col_perm: Any = None
    ) -> None:
        if not isinstance(inner, StructuredMatrix):
            raise TypeError(f"inner must be a StructuredMatrix; got {type(inner).__name__}")
        super().__init__(inner.shape)
        m, n = inner.shape
        self.inner = inner
        self.row_perm = _check_perm(row_perm, m, "row_perm")
        self.col_perm = _check_perm(col_perm, n, "col_perm")
        self._inv_col = None if self.col_perm is None else torch.argsort(self.col_perm)
        self._inv_row = None if self.row_perm is None else torch.argsort(self.row_perm)

    # ----------------------------------------------------------------- hooks
    def _tensors(self) -> dict[str, torch.Tensor]:
        out = {_PREFIX + k: t for k, t in self.inner._tensors().items()}
        if self.row_perm is not None:
            out["row_perm"] = self.row_perm
        if self.col_perm is not None:
            out["col_perm"] = self.col_perm
        return out

    def _config(self) -> dict[str, Any]:
        return {
            "inner_format": self.inner.format_name,
            "inner_config": json.dumps(self.inner._config()),
            "inner_info": json.dumps(self.inner.info, default=str),
        }

    @classmethod
    def _from_state(cls, tensors, config, shape):
        inner_cls = get_format(config["inner_format"])
        inner_t = {k[len(_PREFIX):]: t for k, t in tensors.items() if k.startswith(_PREFIX)}
        inner = inner_cls._from_state(inner_t, json.loads(config["inner_config"]), shape)
        inner.info = json.loads(config.get("inner_info", "{}"))
        return cls(inner, tensors.get("row_perm"), tensors.get("col_perm"))

    def _float_tensors(self) -> list[torch.Tensor]:
        return self.inner._float_tensors()

    @property
    def num_params(self) -> int:
        return self.inner.num_params

    @property
    def flops(self) -> int:
        return self.inner.flops

    def to_dense(self) -> torch.Tensor:
        D = self.inner.to_dense()
        if self.row_perm is not None:
            D = D[self.row_perm.to(D.device)]
        if self.col_perm is not None:
            D = D[:, self.col_perm.to(D.device)]
        return D

    def _matmul(self, X: torch.Tensor) -> torch.Tensor:
        if self._inv_col is not None:
            X = take_rows(X, self._inv_col)
        Y = self.inner._matmul(X)
        if self.row_perm is not None:
            Y = take_rows(Y, self.row_perm)
        return Y

    def _rmatmul(self, X: torch.Tensor) -> torch.Tensor:
        # (X @ A)[:, b] = sum_a X[:, a] inner[row_perm[a], col_perm[b]]
        if self._inv_row is not None:
            X = take_rows(X.T, self._inv_row).T
        Y = self.inner._rmatmul(X)
        if self.col_perm is not None:
            Y = take_rows(Y.T, self.col_perm).T
        return Y

    def _transpose(self) -> Permuted:
        return Permuted(self.inner.T, self.col_perm, self.row_perm)

    def __repr__(self) -> str:
        perms = [s for s, p in (("rows", self.row_perm), ("cols", self.col_perm)) if p is not None]
        return f"Permuted({', '.join(perms) or 'identity'} of {self.inner!r})"

    @classmethod
    def project(cls, W: torch.Tensor, budget: int, **options: Any) -> StructuredMatrix:
        raise ValueError(
            "'permuted' is a wrapper, not a format one projects onto; project onto the inner "
            "format (or use ga.convert, which returns Permuted results where they are exact)"
        )
