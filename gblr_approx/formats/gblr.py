"""Generalized block-low-rank (GBLR) matrices, hard form.

A GBLR matrix is a sum of ``K`` components. Component ``k`` lives on a rectangle
``I_k^out x I_k^in`` of cyclic intervals (math.md 1.2)::

    I_k^out = {(row_start[k] + t) mod m : t < row_width[k]}
    I_k^in  = {(col_start[k] + t) mod n : t < col_width[k]}

and equals ``U_k @ V_k.T`` there (``U_k`` is ``(h_k, r_k)``, ``V_k`` is ``(w_k, r_k)``), zero
elsewhere. Rectangles may overlap (contributions add) and may wrap around the last row or
column. A component is executed either as its factor pair (``r_k (h_k + w_k)`` MACs) or as a
dense ``h_k x w_k`` block (``h_k w_k`` MACs), whichever is cheaper; the constructor stores the
cheaper form, so ``flops == num_params == sum_k min(r_k (h_k + w_k), h_k w_k)``.

Low-rank, block-sparse and block-low-rank matrices are GBLR matrices; the ``from_*``
constructors embed them exactly at their own cost (math.md 4.1-4.3).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .base import StructuredMatrix, register_format

__all__ = ["GBLR"]

Factor = tuple[torch.Tensor, torch.Tensor] | torch.Tensor


def _long(x: Any, name: str, K: int | None = None) -> torch.Tensor:
    t = (
        torch.as_tensor(x)
        if not isinstance(x, (list, tuple)) or len(x)
        else torch.zeros(0, dtype=torch.long)
    )
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must hold integers (entries); got dtype {t.dtype}")
    t = t.to(torch.long).reshape(-1).cpu()
    if K is not None and t.numel() != K:
        raise ValueError(f"{name} must have one entry per component ({K}); got {t.numel()}")
    return t


@register_format
class GBLR(StructuredMatrix):
    """Generalized block-low-rank matrix (hard masks, whole-entry intervals).

    Parameters
    ----------
    shape : (m, n)
        Rows (outputs) x columns (inputs).
    row_start, row_width : LongTensor or sequence of int, shape (K,)
        Start in ``[0, m)`` and length in ``[0, m]`` (entries) of each row interval.
    col_start, col_width : LongTensor or sequence of int, shape (K,)
        Same for the column intervals (``[0, n)``, ``[0, n]``).
    factors : sequence of K items
        Either a pair ``(U_k, V_k)`` with ``U_k`` of shape ``(h_k, r_k)`` and ``V_k`` of shape
        ``(w_k, r_k)`` (``r_k`` may be 0), or a tensor ``(h_k, w_k)``: a dense block.
    dtype, device : optional
        Used only when ``K = 0`` (nothing to infer them from).

    Attributes
    ----------
    row_start, row_width, col_start, col_width, ranks : LongTensor (K,)
        ``ranks[k]`` is ``r_k`` for a factored component and ``min(h_k, w_k)`` for one stored
        as a dense block (so the cost is ``min(r_k (h_k + w_k), h_k w_k)`` in both cases).
    is_dense : BoolTensor (K,)
        Components stored (and executed) as dense blocks.
    num_components : int
        ``K``.

    Notes
    -----
    A factor pair with ``r_k (h_k + w_k) > h_k w_k`` is converted to its dense block
    ``U_k @ V_k.T`` on construction (the cheaper execution). ``component(k)`` always returns
    factors: for a dense component ``(block, I_{w_k})``.

    Cost: ``flops = sum_k min(r_k (h_k + w_k), h_k w_k)`` MACs per mat-vec, equal to
    ``num_params``. ``A @ X`` gathers ``X[I_k^in]``, applies the small factors (or block) and
    scatter-adds into the rows ``I_k^out``: ``O(flops * k)`` for ``X`` of shape ``(n, k)``.
    """

    format_name = "gblr"

    def __init__(
        self,
        shape: tuple[int, int],
        row_start: Any,
        row_width: Any,
        col_start: Any,
        col_width: Any,
        factors: Sequence[Factor],
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(shape)
        m, n = self.shape
        if m < 1 or n < 1:
            raise ValueError(f"shape must be positive; got {shape}")
        factors = list(factors)
        K = len(factors)
        self.row_start = _long(row_start, "row_start", K)
        self.row_width = _long(row_width, "row_width", K)
        self.col_start = _long(col_start, "col_start", K)
        self.col_width = _long(col_width, "col_width", K)
        for name, t, side in (
            ("row_start", self.row_start, m),
            ("col_start", self.col_start, n),
        ):
            if K and (int(t.min()) < 0 or int(t.max()) >= side):
                raise ValueError(f"{name} must lie in [0, {side}); got values {t.tolist()}")
        for name, t, side in (
            ("row_width", self.row_width, m),
            ("col_width", self.col_width, n),
        ):
            if K and (int(t.min()) < 0 or int(t.max()) > side):
                raise ValueError(f"{name} must lie in [0, {side}]; got values {t.tolist()}")
        Us: list[torch.Tensor] = []
        Vs: list[torch.Tensor | None] = []
        ranks: list[int] = []
        for k, f in enumerate(factors):
            h, w = int(self.row_width[k]), int(self.col_width[k])
            if isinstance(f, torch.Tensor):
                if f.shape != (h, w):
                    raise ValueError(
                        f"component {k}: dense block must have shape (row_width, col_width) = "
                        f"({h}, {w}); got {tuple(f.shape)}"
                    )
                Us.append(f)
                Vs.append(None)
                ranks.append(min(h, w))
                continue
            if not (isinstance(f, (tuple, list)) and len(f) == 2):
                raise TypeError(f"factors[{k}] must be a pair (U, V) or a dense block tensor")
            U, V = f
            if (
                U.ndim != 2
                or V.ndim != 2
                or U.shape[0] != h
                or V.shape[0] != w
                or (U.shape[1] != V.shape[1])
            ):
                raise ValueError(
                    f"component {k}: needs U ({h}, r) and V ({w}, r) for row_width={h}, "
                    f"col_width={w}; got {tuple(U.shape)} and {tuple(V.shape)}"
                )
            r = int(U.shape[1])
            if r * (h + w) > h * w:  # the dense block is cheaper: store and run it dense
                Us.append(U @ V.T)
                Vs.append(None)
                ranks.append(min(h, w))
            else:
                Us.append(U)
                Vs.append(V)
                ranks.append(r)
        floats = [t for t in Us] + [t for t in Vs if t is not None]
        if floats:
            dt, dev = floats[0].dtype, floats[0].device
            for t in floats:
                if not t.is_floating_point():
                    raise TypeError(f"factors must be floating point; got {t.dtype}")
                if t.dtype != dt or t.device != dev:
                    raise ValueError(
                        f"all factors must share dtype and device; got {dt}/{dev} and "
                        f"{t.dtype}/{t.device}"
                    )
        else:
            dt = dtype or torch.get_default_dtype()
            dev = torch.device(device) if device is not None else torch.device("cpu")
        self._U = Us
        self._V = Vs
        self._empty = torch.empty(0, dtype=dt, device=dev)
        self.ranks = torch.tensor(ranks, dtype=torch.long)
        self.is_dense = torch.tensor([v is None for v in Vs], dtype=torch.bool)

    # ----------------------------------------------------------- accessors
    @property
    def num_components(self) -> int:
        return len(self._U)

    def row_indices(self, k: int) -> torch.Tensor:
        """LongTensor (h_k,) of the rows of component ``k`` (cyclic interval)."""
        m = self.shape[0]
        return (
            int(self.row_start[k]) + torch.arange(int(self.row_width[k]), device=self.device)
        ) % m

    def col_indices(self, k: int) -> torch.Tensor:
        """LongTensor (w_k,) of the columns of component ``k`` (cyclic interval)."""
        n = self.shape[1]
        return (
            int(self.col_start[k]) + torch.arange(int(self.col_width[k]), device=self.device)
        ) % n

    def component(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Factors ``(U_k (h_k, r_k), V_k (w_k, r_k))`` of component ``k``.

        The block on rows ``row_indices(k)`` and columns ``col_indices(k)`` is ``U_k @ V_k.T``.
        For a dense component this is ``(block, identity(w_k))``.
        """
        if not -self.num_components <= k < self.num_components:
            raise IndexError(f"component index {k} out of range for K={self.num_components}")
        U, V = self._U[k], self._V[k]
        if V is None:
            w = U.shape[1]
            return U, torch.eye(w, dtype=U.dtype, device=U.device)
        return U, V

    def block(self, k: int) -> torch.Tensor:
        """Dense ``(h_k, w_k)`` block of component ``k``."""
        U, V = self._U[k], self._V[k]
        return U if V is None else U @ V.T

    def component_costs(self) -> torch.Tensor:
        """LongTensor (K,): ``min(r_k (h_k + w_k), h_k w_k)`` MACs per component."""
        h, w, r = self.row_width, self.col_width, self.ranks
        return torch.minimum(r * (h + w), h * w)

    # --------------------------------------------------------------- hooks
    def _tensors(self) -> dict[str, torch.Tensor]:
        U = torch.cat([u.reshape(-1) for u in self._U]) if self._U else self._empty
        vs = [v.reshape(-1) for v in self._V if v is not None]
        V = torch.cat(vs) if vs else self._empty
        return {
            "row_start": self.row_start,
            "row_width": self.row_width,
            "col_start": self.col_start,
            "col_width": self.col_width,
            "ranks": self.ranks,
            "is_dense": self.is_dense.to(torch.uint8),
            "U": U,
            "V": V,
        }

    def _float_tensors(self) -> list[torch.Tensor]:
        return [self._empty] + list(self._U) + [v for v in self._V if v is not None]

    # O(1) instead of the base class's O(K) list (row_indices/col_indices ask for the device
    # once per component, which made to_dense O(K^2): minutes for ~10^5 block-sparse blocks)
    @property
    def dtype(self) -> torch.dtype:
        return self._empty.dtype

    @property
    def device(self) -> torch.device:
        return self._empty.device

    @classmethod
    def _from_state(cls, tensors, config, shape):
        rs, rw = tensors["row_start"], tensors["row_width"]
        cs, cw = tensors["col_start"], tensors["col_width"]
        ranks, dense = tensors["ranks"].tolist(), tensors["is_dense"].bool().tolist()
        U, V = tensors["U"], tensors["V"]
        iu = iv = 0
        factors: list[Factor] = []
        for k in range(len(ranks)):
            h, w, r = int(rw[k]), int(cw[k]), ranks[k]
            if dense[k]:
                factors.append(U[iu : iu + h * w].view(h, w))
                iu += h * w
            else:
                factors.append((U[iu : iu + h * r].view(h, r), V[iv : iv + w * r].view(w, r)))
                iu, iv = iu + h * r, iv + w * r
        return cls(shape, rs, rw, cs, cw, factors, dtype=U.dtype, device=U.device)

    @property
    def flops(self) -> int:
        return int(self.component_costs().sum())

    @property
    def num_params(self) -> int:
        return int(
            sum(u.numel() for u in self._U) + sum(v.numel() for v in self._V if v is not None)
        )

    def to_dense(self) -> torch.Tensor:
        m, n = self.shape
        D = torch.zeros(m, n, dtype=self.dtype, device=self.device)
        for k in range(self.num_components):
            if int(self.row_width[k]) == 0 or int(self.col_width[k]) == 0:
                continue
            ri, ci = self.row_indices(k), self.col_indices(k)
            D.index_put_((ri[:, None], ci[None, :]), self.block(k), accumulate=True)
        return D

    def _matmul(self, X: torch.Tensor) -> torch.Tensor:
        m = self.shape[0]
        Y = torch.zeros(m, X.shape[1], dtype=X.dtype, device=X.device)
        for k in range(self.num_components):
            if int(self.row_width[k]) == 0 or int(self.col_width[k]) == 0:
                continue
            Xk = X.index_select(0, self.col_indices(k))
            U, V = self._U[k], self._V[k]
            Yk = U @ Xk if V is None else U @ (V.T @ Xk)
            Y.index_add_(0, self.row_indices(k), Yk)
        return Y

    def _transpose(self) -> GBLR:
        factors: list[Factor] = [
            U.T if V is None else (V, U) for U, V in zip(self._U, self._V, strict=True)
        ]
        return GBLR(
            (self.shape[1], self.shape[0]),
            self.col_start.clone(),
            self.col_width.clone(),
            self.row_start.clone(),
            self.row_width.clone(),
            factors,
            dtype=self.dtype,
            device=self.device,
        )

    # -------------------------------------------------------- constructors
    @classmethod
    def from_lowrank(cls, L: Any) -> GBLR:
        """Embed a :class:`~gblr_approx.LowRank` ``U V^T`` exactly (math.md 4.1).

        One full-width component of rank ``r``: cost ``r (m + n)``, the low-rank cost (or
        ``m n`` when that is cheaper, then stored dense).
        """
        m, n = L.shape
        return cls((m, n), [0], [m], [0], [n], [(L.U, L.V)], dtype=L.U.dtype, device=L.U.device)

    @classmethod
    def from_blocksparse(cls, S: Any) -> GBLR:
        """Embed a :class:`~gblr_approx.BlockSparse` matrix exactly (math.md 4.3 (c)).

        Each stored block becomes one dense component on its in-matrix rectangle: cost
        ``h * w`` per block, the block-sparse cost.
        """
        m, n = S.shape
        br, bc = S.block_shape
        rows = S.block_rows.tolist()
        cols = S.block_cols.tolist()
        rs, rw, cs, cw, factors = [], [], [], [], []
        for b, (i, j) in enumerate(zip(rows, cols, strict=True)):
            r0, c0 = i * br, j * bc
            h, w = min(br, m - r0), min(bc, n - c0)
            rs.append(r0)
            rw.append(h)
            cs.append(c0)
            cw.append(w)
            factors.append(S.blocks[b, :h, :w])
        return cls((m, n), rs, rw, cs, cw, factors, dtype=S.dtype, device=S.device)

    @classmethod
    def from_blocklowrank(cls, B: Any) -> GBLR:
        """Embed a :class:`~gblr_approx.BlockLowRank` matrix exactly (math.md 4.2).

        Each block of rank ``r_ij >= 1`` becomes one component of rank ``r_ij`` on its
        rectangle: cost ``r_ij (p_i + q_j)``, the block-low-rank cost (a block whose factor
        pair costs more than its ``p_i q_j`` entries is stored dense, which is cheaper).
        Rank-0 blocks are dropped.
        """
        m, n = B.shape
        rsp, csp = B.row_splits, B.col_splits
        rs, rw, cs, cw, factors = [], [], [], [], []
        for i, row in enumerate(B.factors):
            for j, (U, V) in enumerate(row):
                if U.shape[1] == 0:
                    continue
                rs.append(rsp[i])
                rw.append(rsp[i + 1] - rsp[i])
                cs.append(csp[j])
                cw.append(csp[j + 1] - csp[j])
                factors.append((U, V))
        return cls((m, n), rs, rw, cs, cw, factors, dtype=B.dtype, device=B.device)

    @classmethod
    def zeros(
        cls, shape: tuple[int, int], dtype: torch.dtype | None = None, device: Any = None
    ) -> GBLR:
        """The empty GBLR matrix (``K = 0``, cost 0)."""
        return cls(shape, [], [], [], [], [], dtype=dtype, device=device)

    # ------------------------------------------------------------ fitting
    @classmethod
    def min_budget(cls, m: int, n: int, **options: Any) -> int:
        return 1  # one dense 1 x 1 component

    @classmethod
    def project(cls, W: torch.Tensor, budget: int, **options: Any) -> GBLR:
        """Fit a GBLR matrix to ``W`` within ``budget`` MACs with :func:`gblr_approx.fit_gblr`.

        Options are those of :func:`~gblr_approx.fit.fit_gblr` (``steps``, ``seed``,
        ``rank_per_component``, ``components``, ...); the progress bar is off unless
        ``progress=True`` is passed. The result's ``info`` records the fit summary.
        """
        from ..fit import fit_gblr

        options.setdefault("progress", False)
        res = fit_gblr(W, budget, **options)
        return res.matrix
