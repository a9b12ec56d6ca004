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

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch

from .base import StructuredMatrix, cached_layout, check_factors, plan_building, register_format
from .gblr_plan import (
    BUCKET_COST,
    MATVEC_BUCKET_COST,
    ROW_FORM_BELOW,
    WIDE_SHARE,
    GBLRPlan,
    GBLRSegments,
    build_plan,
    build_segments,
)
from .gblr_sparse import GBLRSparseMatvec, build_sparse_matvec

__all__ = ["GBLR"]

Factor = tuple[torch.Tensor, torch.Tensor] | torch.Tensor


_PLAN_CACHE: OrderedDict[tuple, GBLRPlan] = OrderedDict()
_PLAN_CACHE_SIZE = 64
#: Price of one CSR non-zero of the sparse mat-vec plan in padded multiply-adds of the tiled
#: mat-vec plan (index indirection, no panel reuse). Measured on 13 layouts (six default
#: MiniLM fits at 25 % / 50 %, six tile-64 layouts, a 4096x4096 random one; one thread): the
#: CSR plan was 0.45-0.95x the tiled plan's time where its non-zeros were <= 0.39 of the
#: tiled plan's padded MACs, and 1.2x at 0.50-0.60 (aligned layouts that fill their tiles).
SPARSE_NNZ_COST = 2.2
#: Products with fewer than ``ROW_FORM_BELOW`` columns run the segment plan only when it has
#: at most this many GEMMs (e.g. a low-rank-like layout); otherwise the one-bucket tiled plan.
SEGMENTS_THIN = 4
#: ... and only from this many columns: below it the tiled plan's fewer launches win (128-grid
#: MiniLM layouts of four GEMMs at 1-6 columns: 2.4-2.9x less time than the segment plan on
#: 384 x 384, 0.57 against 1.72 of dense on 1536 x 384 at one column; about equal at 8, the
#: segment plan ahead from 10; docs/benchmarks.md, seventeenth session).
SEGMENTS_THIN_COLUMNS = 8


def cached_plan(
    G: GBLR, device: torch.device, matvec: bool | str = False
) -> GBLRPlan | GBLRSegments | GBLRSparseMatvec | None:
    """The plan of ``G``'s structure on ``device``, from a small LRU cache keyed by structure.

    Matrices that share a structure (a ``StructuredLinear`` rebuilt at every step, copies,
    reloads) share one plan; building one costs ``O(S log S)`` Python work for ``S`` slots.
    ``matvec=True`` gives the plan for thin operands: one panel shape per stage, since call
    overhead, not padding, dominates a mat-vec. ``matvec="segments"`` gives the segment plan
    (:class:`~.gblr_plan.GBLRSegments`, ``None`` for layouts with many distinct intervals),
    ``matvec="sparse"`` the CSR mat-vec plan (:class:`~.gblr_sparse.GBLRSparseMatvec`).
    """
    key = (
        G.shape,
        str(device),
        matvec,
        tuple(
            t.numpy().tobytes()
            for t in (G.row_start, G.row_width, G.col_start, G.col_width, G.ranks, G.is_dense)
        ),
    )
    if key in _PLAN_CACHE:  # (a segment plan may be a cached None)
        _PLAN_CACHE.move_to_end(key)
        return _PLAN_CACHE[key]
    with plan_building():  # (shared across modes: never inference tensors)
        plan = _build_plan(G, device, matvec)
    _PLAN_CACHE[key] = plan
    if len(_PLAN_CACHE) > _PLAN_CACHE_SIZE:
        _PLAN_CACHE.popitem(last=False)
    return plan


def _build_plan(
    G: GBLR, device: torch.device, matvec: bool | str
) -> GBLRPlan | GBLRSegments | GBLRSparseMatvec | None:
    """The plan :func:`cached_plan` keeps, built from ``G``'s structure."""
    structure = (G.shape, *(t.tolist() for t in (G.row_start, G.row_width, G.col_start,
                                                  G.col_width, G.ranks, G.is_dense)))
    if matvec == "segments":
        plan = build_segments(*structure)
    elif matvec == "sparse":
        plan = build_sparse_matvec(*structure)
    else:
        # mat-vecs keep wide slots in the tiles: two more kernels cost more than they save
        plan = build_plan(*structure, bucket_cost=MATVEC_BUCKET_COST if matvec else BUCKET_COST,
                          row_form=matvec, wide_share=float("inf") if matvec else WIDE_SHARE)
    if plan is not None and torch.device(device).type != "cpu":
        plan = plan.to(torch.device(device))
    return plan


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


def _arc_slices(start: int, width: int, size: int) -> list[tuple[int, int, int]]:
    """A cyclic interval as contiguous pieces ``(first index, offset in the interval, length)``."""
    first = min(width, size - start)
    pieces = [(start, 0, first)]
    if width > first:
        pieces.append((0, first, width - first))
    return pieces


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
    ``num_params``. Storage is packed: every factor lives in two flat buffers (``U``, ``V``;
    the saved layout). ``A @ X`` runs the cached :attr:`plan`: the components' rank-1 slots
    packed into tiled batched GEMMs (:mod:`gblr_approx.formats.gblr_plan`), a few kernel
    launches whatever ``K`` is, exact, differentiable in the factors, and free of host syncs.
    Without autograd, aligned layouts run :attr:`segments`, and products of fewer than 32
    columns run :attr:`sparse_matvec` (CSR) where the tiles would pad a lot.
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
        self._check_intervals()
        Us: list[torch.Tensor] = []
        Vs: list[torch.Tensor] = []
        ranks: list[int] = []
        dense: list[bool] = []
        for k, f in enumerate(factors):
            h, w = int(self.row_width[k]), int(self.col_width[k])
            if isinstance(f, torch.Tensor):
                if f.shape != (h, w):
                    raise ValueError(
                        f"component {k}: dense block must have shape (row_width, col_width) = "
                        f"({h}, {w}); got {tuple(f.shape)}"
                    )
                Us.append(f)
                ranks.append(min(h, w))
                dense.append(True)
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
                check_factors(U, V)  # (before the product, which torch would fail on)
                Us.append(U @ V.T)
                ranks.append(min(h, w))
                dense.append(True)
            else:
                Us.append(U)
                Vs.append(V)
                ranks.append(r)
                dense.append(False)
        floats = Us + Vs
        if floats:
            check_factors(*floats)
            dt, dev = floats[0].dtype, floats[0].device
        else:
            dt = dtype or torch.get_default_dtype()
            dev = torch.device(device) if device is not None else torch.device("cpu")
        empty = torch.empty(0, dtype=dt, device=dev)
        self.ranks = torch.tensor(ranks, dtype=torch.long)
        self.is_dense = torch.tensor(dense, dtype=torch.bool)
        # packed storage: every factor in two flat buffers (the layout of ``_tensors``)
        self._Uf = torch.cat([u.reshape(-1) for u in Us]) if Us else empty
        self._Vf = torch.cat([v.reshape(-1) for v in Vs]) if Vs else empty
        self._offsets_cache: tuple[list[int], list[int]] | None = None

    @classmethod
    def _from_flat(
        cls,
        shape: tuple[int, int],
        row_start: torch.Tensor,
        row_width: torch.Tensor,
        col_start: torch.Tensor,
        col_width: torch.Tensor,
        ranks: torch.Tensor,
        is_dense: torch.Tensor,
        U: torch.Tensor,
        V: torch.Tensor,
    ) -> GBLR:
        """Wrap packed buffers (the layout of ``_tensors``) without copying them.

        ``U`` and ``V`` are 1-D: component ``k`` owns ``h_k r_k`` entries of ``U`` (its
        ``(h_k, r_k)`` factor row-major, or its ``(h_k, w_k)`` dense block) and ``w_k r_k`` of
        ``V`` (none when dense). Raises ``ValueError`` when the sizes do not add up.
        """
        self = cls.__new__(cls)
        StructuredMatrix.__init__(self, shape)
        m, n = self.shape
        if m < 1 or n < 1:
            raise ValueError(f"shape must be positive; got {shape}")
        K = int(torch.as_tensor(ranks).numel())
        self.row_start = _long(row_start, "row_start", K)
        self.row_width = _long(row_width, "row_width", K)
        self.col_start = _long(col_start, "col_start", K)
        self.col_width = _long(col_width, "col_width", K)
        self.ranks = _long(ranks, "ranks", K)
        self.is_dense = torch.as_tensor(is_dense).reshape(-1).to(torch.bool).cpu()
        if self.is_dense.numel() != K:
            raise ValueError(f"is_dense must have one entry per component ({K})")
        self._check_intervals()
        check_factors(U, V)
        h, w, r, d = self.row_width, self.col_width, self.ranks, self.is_dense
        if K and (int(r.min()) < 0 or bool((d & (r != torch.minimum(h, w))).any())):
            raise ValueError("ranks must be >= 0 and equal min(h, w) for dense components")
        nu = int(torch.where(d, h * w, h * r).sum())
        nv = int(torch.where(d, 0, w * r).sum())
        if U.numel() != nu or V.numel() != nv:
            raise ValueError(
                f"packed factors hold {U.numel()} + {V.numel()} numbers but the intervals and "
                f"ranks need {nu} + {nv}"
            )
        self._Uf, self._Vf = U.reshape(-1), V.reshape(-1)
        self._offsets_cache = None
        return self

    def _check_intervals(self) -> None:
        m, n = self.shape
        K = self.row_start.numel()
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

    # ----------------------------------------------------------- accessors
    @property
    def num_components(self) -> int:
        return int(self.ranks.numel())

    def _offsets(self) -> tuple[list[int], list[int]]:
        """Start of each component's entries in the flat ``U`` and ``V`` buffers."""
        if self._offsets_cache is None:
            h, w, r, d = self.row_width, self.col_width, self.ranks, self.is_dense
            nu = torch.where(d, h * w, h * r)
            nv = torch.where(d, 0, w * r)
            uo = (torch.cumsum(nu, 0) - nu).tolist()
            vo = (torch.cumsum(nv, 0) - nv).tolist()
            self._offsets_cache = (uo, vo)
        return self._offsets_cache

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

    def _factors(self, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Views of component ``k`` in the flat buffers: ``(U_k, V_k)`` or ``(block, None)``."""
        uo, vo = self._offsets()
        h, w = int(self.row_width[k]), int(self.col_width[k])
        if bool(self.is_dense[k]):
            return self._Uf[uo[k] : uo[k] + h * w].view(h, w), None
        r = int(self.ranks[k])
        U = self._Uf[uo[k] : uo[k] + h * r].view(h, r)
        return U, self._Vf[vo[k] : vo[k] + w * r].view(w, r)

    def component(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Factors ``(U_k (h_k, r_k), V_k (w_k, r_k))`` of component ``k``.

        The block on rows ``row_indices(k)`` and columns ``col_indices(k)`` is ``U_k @ V_k.T``.
        For a dense component this is ``(block, identity(w_k))``.
        """
        if not -self.num_components <= k < self.num_components:
            raise IndexError(f"component index {k} out of range for K={self.num_components}")
        k = k % self.num_components
        U, V = self._factors(k)
        if V is None:
            w = U.shape[1]
            return U, torch.eye(w, dtype=U.dtype, device=U.device)
        return U, V

    def block(self, k: int) -> torch.Tensor:
        """Dense ``(h_k, w_k)`` block of component ``k``."""
        U, V = self._factors(k)
        return U if V is None else U @ V.T

    def component_costs(self) -> torch.Tensor:
        """LongTensor (K,): ``min(r_k (h_k + w_k), h_k w_k)`` MACs per component."""
        h, w, r = self.row_width, self.col_width, self.ranks
        return torch.minimum(r * (h + w), h * w)

    # --------------------------------------------------------------- hooks
    def _tensors(self) -> dict[str, torch.Tensor]:
        return {
            "row_start": self.row_start,
            "row_width": self.row_width,
            "col_start": self.col_start,
            "col_width": self.col_width,
            "ranks": self.ranks,
            "is_dense": self.is_dense.to(torch.uint8),
            "U": self._Uf,
            "V": self._Vf,
        }

    def _float_tensors(self) -> list[torch.Tensor]:
        return [self._Uf, self._Vf]

    # O(1) instead of the base class's O(K) list (row_indices/col_indices ask for the device
    # once per component, which made to_dense O(K^2): minutes for ~10^5 block-sparse blocks)
    @property
    def dtype(self) -> torch.dtype:
        return self._Uf.dtype

    @property
    def device(self) -> torch.device:
        return self._Uf.device

    @classmethod
    def _from_state(cls, tensors, config, shape):
        return cls._from_flat(
            shape,
            tensors["row_start"],
            tensors["row_width"],
            tensors["col_start"],
            tensors["col_width"],
            tensors["ranks"],
            tensors["is_dense"].bool(),
            tensors["U"],
            tensors["V"],
        )

    @property
    def flops(self) -> int:
        return int(self.component_costs().sum())

    @property
    def num_params(self) -> int:
        return int(self._Uf.numel() + self._Vf.numel())

    def to_dense(self) -> torch.Tensor:
        # each cyclic rectangle is at most 2 x 2 contiguous slices: one GEMM written in place
        # per slice (an index_put_ per component took minutes on 4096 x 11008 layouts)
        m, n = self.shape
        D = torch.zeros(m, n, dtype=self.dtype, device=self.device)
        rs, rw, cs, cw = (t.tolist() for t in (self.row_start, self.row_width, self.col_start,
                                               self.col_width))
        for k in range(self.num_components):
            if rw[k] == 0 or cw[k] == 0:
                continue
            U, V = self._factors(k)
            for r0, ro, rh in _arc_slices(rs[k], rw[k], m):
                for c0, co, ch in _arc_slices(cs[k], cw[k], n):
                    dst = D[r0:r0 + rh, c0:c0 + ch]
                    if V is None:
                        dst += U[ro:ro + rh, co:co + ch]
                    else:
                        dst.addmm_(U[ro:ro + rh], V[co:co + ch].T)
        return D

    # ------------------------------------------------------------- product
    @property
    def plan(self) -> GBLRPlan:
        """The batched-GEMM execution plan of this structure (built once, then cached).

        See :mod:`gblr_approx.formats.gblr_plan`; ``plan.fill`` is the share of real
        multiply-adds among those executed. Products with fewer than ``ROW_FORM_BELOW``
        columns use a second plan with one panel shape per stage (:meth:`plan_for`).
        """
        return self.plan_for(ROW_FORM_BELOW)

    def _plan_ref(self, key: tuple, build: Any) -> Any:
        """``build()``, kept on this matrix under ``key`` (its plans and plan choices)."""
        plans = self.__dict__.setdefault("_plan_refs", {})
        plan = plans.get(key, plans)  # (the dict itself marks a missing key)
        if plan is plans:
            plan = plans[key] = build()
        return plan

    def plan_for(self, columns: int) -> GBLRPlan:
        """The plan a product with ``columns`` right-hand columns runs."""
        matvec = columns < ROW_FORM_BELOW
        dev = self.device
        return self._plan_ref((dev, matvec), lambda: cached_plan(self, dev, matvec))

    @property
    def segments(self) -> GBLRSegments | None:
        """The segment plan (one GEMM per distinct interval, on contiguous slices), or ``None``
        when the layout has too many distinct intervals. Products of at least
        ``ROW_FORM_BELOW`` columns without autograd run it when it exists (aligned, runnable
        layouts: :func:`gblr_approx.fit.gblr.layout.tiled_layout`)."""
        return self._plan_ref(
            (self.device, "segments"), lambda: cached_plan(self, self.device, "segments")
        )

    @property
    def sparse_matvec(self) -> GBLRSparseMatvec:
        """The thin-product plan: near-full slots as dense GEMVs, the others as two CSR
        matrices (:mod:`~gblr_approx.formats.gblr_sparse`). Products of fewer than
        ``ROW_FORM_BELOW`` columns without autograd run it where it pays."""
        return self._plan_ref(
            (self.device, "sparse"), lambda: cached_plan(self, self.device, "sparse")
        )

    def _thin_sparse(self) -> GBLRSparseMatvec | None:
        """:attr:`sparse_matvec` when thin products run it (:meth:`_sparse_matvec_pays`),
        else ``None``: one lookup on the mat-vec path."""
        return self._plan_ref(
            (self.device, "thin"),
            lambda: self.sparse_matvec if self._sparse_matvec_pays() else None,
        )

    def _sparse_matvec_pays(self) -> bool:
        """Whether thin products run the CSR plan: float32 / float64 factors, and
        ``SPARSE_NNZ_COST`` times its narrow non-zeros at most the tiled thin-product plan's
        padded MACs (decided once per matrix: :meth:`_thin_sparse` keeps the answer)."""
        # (CPU sparse kernels exist for float32 / float64 only)
        return self.dtype in (torch.float32, torch.float64) and (
            SPARSE_NNZ_COST * self.sparse_matvec.narrow_nnz <= self.plan_for(1).padded_macs
        )

    def _panels(self, plan: GBLRPlan | GBLRSegments | GBLRSparseMatvec) -> tuple:
        # (with gradients: rebuilt at every product, differentiably)
        U, V = self._Uf, self._Vf
        return cached_layout(self, ("panels", id(plan)), lambda: plan.pack(U, V), U, V)

    def _records_grad(self, X: torch.Tensor) -> bool:
        """Whether autograd records a product with ``X`` (then no in-place plan kernels)."""
        return torch.is_grad_enabled() and (
            X.requires_grad or self._Uf.requires_grad or self._Vf.requires_grad
        )

    def _matmul(self, X: torch.Tensor) -> torch.Tensor:
        if self.num_components == 0:
            return X.new_zeros(self.shape[0], X.shape[1])
        if not self._records_grad(X):
            sp = self._thin_sparse() if X.shape[1] < ROW_FORM_BELOW else None
            if sp is not None:
                return sp.matmul(self._panels(sp), X)
            seg = self.segments
            # thin products: only when it is a handful of GEMMs (launches dominate there)
            k = X.shape[1]
            if seg is not None and (k >= ROW_FORM_BELOW or (
                k >= SEGMENTS_THIN_COLUMNS and len(seg.stage1) + len(seg.stage2) <= SEGMENTS_THIN
            )):
                return seg.matmul(self._panels(seg), X)
        plan = self.plan_for(X.shape[1])
        return plan.matmul(self._panels(plan), X)

    def _linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
        """``x @ A.T + bias`` for a row-major batch ``x`` (k, n) where :meth:`_matmul` runs the
        segment plan (aligned layouts, >= ``ROW_FORM_BELOW`` rows, no autograd): the bias is
        added by its first stage-2 GEMM. ``None`` elsewhere (``StructuredLinear`` then adds
        the bias itself)."""
        X = x.T
        if bias is None or self.num_components == 0 or X.shape[1] < ROW_FORM_BELOW or (
            X.stride(0) != 1  # (the plan writes a row-major result for batch-major X only)
        ) or self._records_grad(X):
            return None
        seg = self.segments
        if seg is None:
            return None
        return seg.matmul(self._panels(seg), X, bias).T

    def _rmatmul(self, X: torch.Tensor) -> torch.Tensor:
        """``X @ A`` for ``X`` of shape ``(k, m)``: the transpose's packed product.

        The transposed matrix (a repacked copy of the factors) is kept while the factors are
        unchanged and no gradient is needed; its plan comes from the shared plan cache.
        """
        T = cached_layout(self, "transpose", self._transpose, self._Uf, self._Vf)
        return T._matmul(X.T).T

    def _matmul_loop(self, X: torch.Tensor) -> torch.Tensor:
        """Reference product: one gather, two small GEMMs and one scatter per component.

        ``O(K)`` Python work; kept to test :meth:`_matmul` against and for benchmarks.
        """
        m = self.shape[0]
        Y = torch.zeros(m, X.shape[1], dtype=X.dtype, device=X.device)
        for k in range(self.num_components):
            if int(self.row_width[k]) == 0 or int(self.col_width[k]) == 0:
                continue
            Xk = X.index_select(0, self.col_indices(k))
            U, V = self._factors(k)
            Yk = U @ Xk if V is None else U @ (V.T @ Xk)
            Y.index_add_(0, self.row_indices(k), Yk)
        return Y

    def _transpose(self) -> GBLR:
        factors: list[Factor] = []
        for k in range(self.num_components):
            U, V = self._factors(k)
            factors.append(U.T if V is None else (V, U))
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
        from ..projection import get_projection  # the fitter registers itself (fit/)

        options.setdefault("progress", False)
        return get_projection("gblr")(W, budget, **options)
