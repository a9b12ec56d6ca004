"""Block-low-rank (BLR) matrices on a grid, and their projection (per-block SVD + greedy ranks)."""

from __future__ import annotations

import heapq
from typing import Any

import numpy as np
import torch

from ..budget import InfeasibleBudgetError
from ..validation import check_pair
from .base import (
    ROW_FORM_BELOW,
    StructuredMatrix,
    batch_major,
    bmm_nk,
    cached_layout,
    check_factors,
    gather,
    gather_slabs,
    plan_building,
    register_format,
    scale_invariant,
    scatter_slabs,
    slab_maps,
    stack_rows,
)

__all__ = ["BlockLowRank", "balanced_splits"]

DEFAULT_GRID = (4, 4)
#: Batch-major products with this many rows (inclusive range) run the unpadded GEMMs on fresh
#: outputs joined by ``torch.cat`` (:meth:`BlockLowRank._fresh_row_product`) instead of
#: ``mm(out=)`` into strided slices with transposed weight views, which cost ~2-3 us more per
#: small GEMM on MKL (51 x 96 x 96: 9.2 vs 6.8 us). MiniLM layers at 50 %, 51 rows, layer
#: forward / ``nn.Linear``: 384 x 384 1.44 -> 1.26, 1536 x 384 0.79 -> 0.73, 384 x 1536
#: 0.78 -> 0.69 (docs/benchmarks.md). Below 32 rows the padded bmm form is faster; from ~256
#: rows the copies of ``cat`` cost what they save.
FRESH_ROWS = (ROW_FORM_BELOW, 128)


def balanced_splits(length: int, parts: int) -> list[int]:
    """Boundaries cutting ``length`` into ``parts`` contiguous pieces whose sizes differ by <= 1.

    The first ``length % parts`` pieces are one longer. Returns ``parts + 1`` boundaries
    starting at 0 and ending at ``length``. Requires ``1 <= parts <= length``.
    """
    if parts < 1 or parts > length:
        raise ValueError(f"cannot split {length} indices into {parts} non-empty blocks")
    q, r = divmod(length, parts)
    out = [0]
    for i in range(parts):
        out.append(out[-1] + q + (1 if i < r else 0))
    return out


#: Layout -> index maps (see :func:`_padded_maps`); rebuilding a matrix with the same grid and
#: ranks (``StructuredLinear`` does it every forward) reuses them.
_MAPS: dict[tuple, tuple] = {}
_MAPS_MAX = 256


def _padded_maps(
    rs: list[int], cs: list[int], ranks: tuple[tuple[int, ...], ...]
) -> tuple[torch.Tensor, ...]:
    """Gather maps for the padded bases and the regrouping of the intermediate.

    ``umap`` (b1 * max p * Ru) and ``vmap`` (b2 * max q * Rv) index the flat ``U`` / ``V``
    extended by one zero (the padding); ``zmap`` (b1 * Ru) takes the intermediate by block row
    from the one by block column, ``zmap_t`` the reverse (padding reads entry 0, which always
    meets a zero column of the padded bases, so it adds exact zeros).
    """
    b1, b2 = len(rs) - 1, len(cs) - 1
    p = [rs[i + 1] - rs[i] for i in range(b1)]
    q = [cs[j + 1] - cs[j] for j in range(b2)]
    R = np.array(ranks, dtype=np.int64).reshape(b1, b2)
    Ru, Rv = int(R.sum(1).max()), int(R.sum(0).max())
    nu = int(sum(p[i] * R[i].sum() for i in range(b1)))
    nv = int(sum(q[j] * R[:, j].sum() for j in range(b2)))
    umap = np.full((b1, max(p), Ru), nu, dtype=np.int64)
    vmap = np.full((b2, max(q), Rv), nv, dtype=np.int64)
    zmap = np.zeros((b1, Ru), dtype=np.int64)
    zmap_t = np.zeros((b2, Rv), dtype=np.int64)
    row_off = np.concatenate([np.zeros((b1, 1), np.int64), R.cumsum(1)[:, :-1]], 1)
    col_off = np.concatenate([np.zeros((1, b2), np.int64), R.cumsum(0)[:-1]], 0)
    ou = ov = 0
    for i in range(b1):
        for j in range(b2):
            r = int(R[i, j])
            if r:
                a, c = int(row_off[i, j]), int(col_off[i, j])
                umap[i, : p[i], a : a + r] = np.arange(ou, ou + p[i] * r).reshape(p[i], r)
                vmap[j, : q[j], c : c + r] = np.arange(ov, ov + q[j] * r).reshape(q[j], r)
                zmap[i, a : a + r] = np.arange(j * Rv + c, j * Rv + c + r)
                zmap_t[j, c : c + r] = np.arange(i * Ru + a, i * Ru + a + r)
            ou, ov = ou + p[i] * r, ov + q[j] * r
    def inverse(fwd: np.ndarray, size: int) -> np.ndarray:
        inv = np.zeros(size, dtype=np.int64)  # entries absent from fwd (padding) read 0
        real = fwd < size - 1
        inv[fwd[real]] = np.nonzero(real)[0]
        return inv

    umap, vmap = umap.reshape(-1), vmap.reshape(-1)
    zmap, zmap_t = zmap.reshape(-1), zmap_t.reshape(-1)
    # zmap and zmap_t are each other's inverses on the real entries
    out = (umap, vmap, zmap, zmap_t, inverse(umap, nu + 1), inverse(vmap, nv + 1))
    return tuple(torch.from_numpy(a) for a in out)


@register_format
class BlockLowRank(StructuredMatrix):
    """Block-low-rank matrix: a grid of contiguous blocks, each of its own rank.

    Block ``(i, j)`` covers rows ``row_splits[i]:row_splits[i+1]`` and columns
    ``col_splits[j]:col_splits[j+1]`` and equals ``U_ij @ V_ij.T``.

    Parameters
    ----------
    shape : (m, n)
    row_splits, col_splits : list of int
        Increasing boundaries, from 0 to ``m`` (``b1 + 1`` values) and 0 to ``n`` (``b2 + 1``).
    factors : nested list, ``factors[i][j] = (U_ij, V_ij)``
        ``U_ij`` has shape ``(p_i, r_ij)`` and ``V_ij`` shape ``(q_j, r_ij)``; ``r_ij`` may be 0.

    Cost: ``sum_ij r_ij * (p_i + q_j)`` MACs per mat-vec (each block applied as a factor pair);
    the same number of parameters.

    Notes
    -----
    The product is two batched GEMMs, as for a Monarch matrix with ranks that vary by block:
    ``z = blockdiag_j([V_1j ... V_b1j])^T x``, a gather regrouping ``z`` by block row, then
    ``y = blockdiag_i([U_i1 ... U_ib2]) z``. The concatenated bases are zero-padded to the
    largest block-column (block-row) rank and longest block, so the kernels run on
    ``b2 * max_j(q_j) * max_j(R_j) + b1 * max_i(p_i) * max_i(R_i)`` stored entries (``flops``
    counts only the real ones). The padded bases are packed once and reused while the factor
    tensors are unchanged (tracked by their version counters); factors that require grad are
    packed in every product, differentiably. ``X @ A`` uses the same packed bases.
    """

    format_name = "blocklowrank"

    def __init__(
        self,
        shape: tuple[int, int],
        row_splits: list[int],
        col_splits: list[int],
        factors: list[list[tuple[torch.Tensor, torch.Tensor]]],
    ) -> None:
        super().__init__(shape)
        m, n = self.shape
        self.row_splits = [int(x) for x in row_splits]
        self.col_splits = [int(x) for x in col_splits]
        for name, sp, L in (("row_splits", self.row_splits, m), ("col_splits", self.col_splits, n)):
            if sp[0] != 0 or sp[-1] != L or any(b <= a for a, b in zip(sp, sp[1:], strict=False)):
                raise ValueError(f"{name} must increase strictly from 0 to {L}; got {sp}")
        b1, b2 = len(self.row_splits) - 1, len(self.col_splits) - 1
        if len(factors) != b1 or any(len(row) != b2 for row in factors):
            raise ValueError(f"factors must be a {b1} x {b2} nested list of (U, V) pairs")
        check_factors(*(t for row in factors for pair in row for t in pair))
        for i in range(b1):
            for j in range(b2):
                U, V = factors[i][j]
                p, q = (
                    self.row_splits[i + 1] - self.row_splits[i],
                    self.col_splits[j + 1] - self.col_splits[j],
                )
                if U.shape[0] != p or V.shape[0] != q or U.shape[1] != V.shape[1]:
                    raise ValueError(
                        f"block ({i}, {j}) needs U ({p}, r) and V ({q}, r); got "
                        f"{tuple(U.shape)} and {tuple(V.shape)}"
                    )
        self.factors = [list(row) for row in factors]
        self._flat: tuple[torch.Tensor, torch.Tensor] | None = None  # set by _from_state
        self._build_maps()

    # ------------------------------------------------------------ packing
    def _build_maps(self) -> None:
        """Index maps from the flat factors to the padded bases (cached per layout)."""
        rs, cs = self.row_splits, self.col_splits
        ranks = tuple(tuple(U.shape[1] for U, _ in row) for row in self.factors)
        dev = self.factors[0][0][0].device
        key = (tuple(rs), tuple(cs), ranks, str(dev))
        maps = _MAPS.get(key)
        if maps is None:
            with plan_building():  # (shared across modes: never inference tensors)
                maps = tuple(t.to(dev) for t in _padded_maps(rs, cs, ranks))
                maps += (slab_maps(rs, dev), slab_maps(cs, dev))
            if len(_MAPS) >= _MAPS_MAX:
                _MAPS.pop(next(iter(_MAPS)))
            _MAPS[key] = maps
        self._umap, self._vmap, self._zmap, self._zmap_t, self._uinv, self._vinv = maps[:6]
        self._rmaps, self._cmaps = maps[6], maps[7]
        b1, b2 = self.grid
        pm, qm = self._rmaps[2], self._cmaps[2]
        Ru = max(sum(row) for row in ranks)
        Rv = max(sum(ranks[i][j] for i in range(b1)) for j in range(b2))
        self._pad_shapes = ((b1, pm, Ru), (b2, qm, Rv))

    def _sources(self) -> list[torch.Tensor]:
        return list(self._flat) if self._flat is not None else self._float_tensors()

    def _flat_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._flat is not None:
            return self._flat
        Us = [U.reshape(-1) for row in self.factors for U, _ in row]
        Vs = [V.reshape(-1) for row in self.factors for _, V in row]
        return torch.cat(Us), torch.cat(Vs)

    def _pack(self) -> tuple[torch.Tensor, torch.Tensor]:
        U, V = self._flat_factors()
        pu, pv = self._pad_shapes
        pad = torch.nn.functional.pad
        Up = gather(pad(U, (0, 1)), 0, self._umap, self._uinv).view(pu)
        Vp = gather(pad(V, (0, 1)), 0, self._vmap, self._vinv).view(pv)
        return Up, Vp

    def _packed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded bases ``(b1, max p, max R_i)`` and ``(b2, max q, max R_j)``."""
        return cached_layout(self, "packed", self._pack, *self._sources())

    @property
    def grid(self) -> tuple[int, int]:
        return len(self.row_splits) - 1, len(self.col_splits) - 1

    @property
    def ranks(self) -> torch.Tensor:
        """LongTensor (b1, b2) of block ranks."""
        return torch.tensor(
            [[U.shape[1] for U, _ in row] for row in self.factors], dtype=torch.long
        )

    def _tensors(self) -> dict[str, torch.Tensor]:
        U, V = self._flat_factors()
        return {"ranks": self.ranks, "U": U, "V": V}

    def _config(self) -> dict[str, Any]:
        return {"row_splits": self.row_splits, "col_splits": self.col_splits}

    @classmethod
    def _from_state(cls, tensors, config, shape):
        rs, cs = config["row_splits"], config["col_splits"]
        ranks = tensors["ranks"].tolist()
        U, V = tensors["U"], tensors["V"]
        iu = iv = 0
        factors = []
        for i in range(len(rs) - 1):
            row = []
            for j in range(len(cs) - 1):
                p, q, r = rs[i + 1] - rs[i], cs[j + 1] - cs[j], ranks[i][j]
                Uij = U[iu : iu + p * r].view(p, r)
                Vij = V[iv : iv + q * r].view(q, r)
                iu, iv = iu + p * r, iv + q * r
                row.append((Uij, Vij))
            factors.append(row)
        out = cls(shape, rs, cs, factors)
        out._flat = (U, V)
        return out

    def __reduce__(self):
        # pickles (Dask, multiprocessing) carry the two flat buffers once: pickled one by one,
        # the factor views of a flat matrix each carried the whole buffer (21x the size on a
        # MiniLM layer) and came back as copies that no longer shared it
        return (_rebuild, (self._tensors(), self._config(), tuple(self.shape), dict(self.info)))

    def _float_tensors(self) -> list[torch.Tensor]:
        if self._flat is not None:
            return list(self._flat)
        return [t for row in self.factors for pair in row for t in pair]

    @property
    def flops(self) -> int:
        rs, cs = self.row_splits, self.col_splits
        total = 0
        for i, row in enumerate(self.factors):
            for j, (U, _) in enumerate(row):
                total += U.shape[1] * ((rs[i + 1] - rs[i]) + (cs[j + 1] - cs[j]))
        return total

    def to_dense(self) -> torch.Tensor:
        m, n = self.shape
        D = torch.zeros(m, n, dtype=self.dtype, device=self.device)
        rs, cs = self.row_splits, self.col_splits
        for i, row in enumerate(self.factors):
            for j, (U, V) in enumerate(row):
                if U.shape[1]:
                    D[rs[i] : rs[i + 1], cs[j] : cs[j + 1]] = U @ V.T
        return D

    @staticmethod
    def _apply(
        Vp: torch.Tensor,
        Up: torch.Tensor,
        zmap: torch.Tensor,
        zinv: torch.Tensor,
        in_maps: tuple,
        out_maps: tuple,
        X: torch.Tensor,
    ) -> torch.Tensor:
        """``blockdiag(Up) @ regroup(blockdiag(Vp)^T @ X)`` for ``X`` (n, k).
        ``Vp`` (b2, q, Rv), ``Up`` (b1, p, Ru); ``zmap`` takes the ``b1 * Ru`` rows of the
        regrouped intermediate from the ``b2 * Rv`` computed ones and ``zinv`` is its inverse
        (the backward of the regrouping is then a gather, too).
        ``(b2 q Rv + b1 p Ru) k`` MACs in two batched GEMMs.
        """
        b2, q, _ = Vp.shape
        b1, _, Ru = Up.shape
        k = X.shape[1]
        if k == 1:  # mat-vec: the same kernels on flat views
            Xs = X.reshape(b2, 1, q) if in_maps[0] is None else (
                gather_slabs(X, b2, q, in_maps[0], True).mT)
            Z = torch.bmm(Xs, Vp).view(-1)  # (b2 Rv,)
            Y = torch.bmm(gather(Z, 0, zmap, zinv).view(b1, 1, Ru), Up.mT)  # (b1, 1, p)
            return scatter_slabs(Y.view(-1, 1), out_maps[1], False)
        row = batch_major(X) or k < ROW_FORM_BELOW
        Z = bmm_nk(Vp.mT, gather_slabs(X, b2, q, in_maps[0], row), row)  # (b2, Rv, k)
        Zf = stack_rows(Z, row)  # (b2 Rv, k)
        if batch_major(Zf):
            Zg = gather(Zf.T, 1, zmap, zinv).T.unflatten(0, (b1, Ru))  # (b1, Ru, k)
        else:
            Zg = gather(Zf, 0, zmap, zinv).unflatten(0, (b1, Ru))
        Y = bmm_nk(Up, Zg, row)  # (b1, p, k)
        return scatter_slabs(stack_rows(Y, row), out_maps[1], row)

    def _panels(self) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """Unpadded bases for the batched path (cached while the factors are unchanged).

        Returns ``Vt`` (per block column ``j``: ``[V_1j ... V_b1j]^T``, ``(R_j, q_j)``), ``Ur``
        (per block row ``i``: ``[U_i1 ... U_ib2]``, ``(p_i, R_i)``), both contiguous, and
        ``sel`` (sum R,): the rows of the intermediate stacked by block column (``R_j`` rows
        each) taken in block-row order.
        """

        def build() -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
            Up, Vp = self._packed()
            R = self.ranks
            Ri, Rj = R.sum(1).tolist(), R.sum(0).tolist()
            rs, cs = self.row_splits, self.col_splits
            Vt = [Vp[j, : cs[j + 1] - cs[j], : Rj[j]].T.contiguous() for j in range(len(Rj))]
            Ur = [Up[i, : rs[i + 1] - rs[i], : Ri[i]].contiguous() for i in range(len(Ri))]
            Rv = Vp.shape[2]
            zm = self._zmap.view(len(Ri), -1)
            offs = torch.tensor([0, *Rj[:-1]]).cumsum(0).to(zm.device)
            sel = torch.cat([zm[i, : Ri[i]] for i in range(len(Ri))])
            return Vt, Ur, offs[sel // Rv] + sel % Rv

        return cached_layout(self, "panels", build, *self._sources())

    def _panel_product(
        self, X: torch.Tensor, t: bool, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``A @ X`` (``t=False``) or ``A^T @ X`` by unpadded GEMMs, for ``X`` (n, k), no grad.

        One GEMM per block column (``Z_j = V_j^T X_j``, read in place from ``X``), one gather
        regrouping ``Z`` by block row, one GEMM per block row written in place into the
        result: ``flops * k`` MACs exactly, ``b1 + b2`` kernels. Batch-major ``X`` is computed
        in the row form ``Y^T = X^T [...]`` with the same kernels; there a ``bias`` (one per
        output row) is added by the block-row GEMMs (``addmm``), not in a pass of its own.
        """
        k = X.shape[1]
        bm = batch_major(X)
        if bm and FRESH_ROWS[0] <= k <= FRESH_ROWS[1]:
            return self._fresh_row_product(X.T, t, bias).T
        Vt, Ur, sel = self._panels()
        rs, cs = self.row_splits, self.col_splits
        if t:  # A^T: rows and columns swap roles; the regrouping maps swap with them
            Vt, Ur = [U.T for U in Ur], [V.T for V in Vt]
            rs, cs = cs, rs
            sel = self._panel_sel_t()
        Zr = sum(V.shape[0] for V in Vt)
        if bm:
            x = X.T  # (k, n) row-major
            Z = x.new_empty(k, Zr)
            o = 0
            for j, V in enumerate(Vt):
                torch.mm(x[:, cs[j] : cs[j + 1]], V.T, out=Z[:, o : o + V.shape[0]])
                o += V.shape[0]
            Zg = Z.index_select(1, sel)
            y = x.new_empty(k, rs[-1])
            o = 0
            for i, U in enumerate(Ur):
                out = y[:, rs[i] : rs[i + 1]]
                if bias is None:
                    torch.mm(Zg[:, o : o + U.shape[1]], U.T, out=out)
                else:
                    torch.addmm(bias[rs[i] : rs[i + 1]], Zg[:, o : o + U.shape[1]], U.T, out=out)
                o += U.shape[1]
            return y.T
        Z = X.new_empty(Zr, k)
        o = 0
        for j, V in enumerate(Vt):
            torch.mm(V, X[cs[j] : cs[j + 1]], out=Z[o : o + V.shape[0]])
            o += V.shape[0]
        Zg = Z.index_select(0, sel)
        Y = X.new_empty(rs[-1], k)
        o = 0
        for i, U in enumerate(Ur):
            torch.mm(U, Zg[o : o + U.shape[1]], out=Y[rs[i] : rs[i + 1]])
            o += U.shape[1]
        return Y

    def _fresh_row_product(
        self, x: torch.Tensor, t: bool, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """``x @ A^T + bias`` (``t=False``) or ``x @ A`` for a row-major batch ``x`` (k, n).

        The GEMMs of :meth:`_panel_product` on contiguous weights (``(q_j, R_j)`` and
        ``(R_i, p_i)``, cached) into fresh outputs: one ``mm`` per block column, ``cat``, one
        ``index_select`` + ``mm``/``addmm`` per block row, ``cat``. ``flops * k`` MACs; two
        extra copies of ``k x (sum R)`` and ``k x m`` floats. Returns (k, m) row-major.
        """
        Vs, Us, sels = self._fresh_panels(t)
        rs, cs = (self.col_splits, self.row_splits) if t else (self.row_splits, self.col_splits)
        Z = torch.cat([torch.mm(x[:, cs[j] : cs[j + 1]], V) for j, V in enumerate(Vs)], 1)
        if bias is None:
            parts = [torch.mm(Z.index_select(1, s), U) for s, U in zip(sels, Us, strict=True)]
        else:
            parts = [
                torch.addmm(bias[rs[i] : rs[i + 1]], Z.index_select(1, s), U)
                for i, (s, U) in enumerate(zip(sels, Us, strict=True))
            ]
        return torch.cat(parts, 1)

    def _fresh_panels(self, t: bool) -> tuple[list[torch.Tensor], list[torch.Tensor], list]:
        """Contiguous ``(q_j, R_j)`` / ``(R_i, p_i)`` panels and the per-block-row slices of the
        regrouping map for :meth:`_fresh_row_product` (``t``: those of ``A^T``); cached."""
        Vt, Ur, sel = self._panels()
        if t:  # A^T's panels are the stored ones, untransposed
            # (split sizes from the panels' shapes: no read-back of a device tensor)
            sel_t = self._panel_sel_t()
            splits = cached_layout(self, "fresh_sel_t",
                                   lambda: list(sel_t.split([V.shape[0] for V in Vt])),
                                   *self._sources())
            return Ur, Vt, splits

        def build() -> tuple[list[torch.Tensor], list[torch.Tensor], list]:
            return ([V.T.contiguous() for V in Vt], [U.T.contiguous() for U in Ur],
                    list(sel.split([U.shape[1] for U in Ur])))

        return cached_layout(self, "fresh_panels", build, *self._sources())

    def _panel_sel_t(self) -> torch.Tensor:
        """``sel`` of :meth:`_panels` for ``A^T`` (intermediate stacked by block row)."""

        def build() -> torch.Tensor:
            R = self.ranks
            Ri, Rj = R.sum(1).tolist(), R.sum(0).tolist()
            # row-stacked position of block (i, j)'s rank slots, in block-column order
            row_pos = torch.arange(sum(Ri)).split(Ri)
            out = []
            for j in range(len(Rj)):
                for i in range(len(Ri)):
                    a = int(R[i, :j].sum())
                    out.append(row_pos[i][a : a + int(R[i, j])])
            return torch.cat(out).to(self._zmap.device)

        return cached_layout(self, "panel_sel_t", build, *self._sources())

    def _use_panels(self, X: torch.Tensor) -> bool:
        """The unpadded GEMMs pay off from ``ROW_FORM_BELOW`` columns on, without autograd."""
        if X.shape[1] < ROW_FORM_BELOW:
            return False
        return not (
            torch.is_grad_enabled()
            and (X.requires_grad or any(t.requires_grad for t in self._sources()))
        )

    def _matmul(self, X: torch.Tensor) -> torch.Tensor:
        if self._use_panels(X):
            return self._panel_product(X, False)
        Up, Vp = self._packed()
        return self._apply(Vp, Up, self._zmap, self._zmap_t, self._cmaps, self._rmaps, X)

    def _linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
        """``x @ A.T + bias`` for a row-major batch ``x`` (k, n) when it takes the panel
        product (no autograd, enough rows): the bias rides on the block-row GEMMs. ``None``
        otherwise (``StructuredLinear`` then runs :meth:`_matmul` and adds the bias)."""
        X = x.T
        if bias is None or not self._use_panels(X) or not batch_major(X):
            return None
        return self._panel_product(X, False, bias).T

    def _rmatmul(self, X: torch.Tensor) -> torch.Tensor:
        # X @ A = (A^T X^T)^T: A^T's column-side bases are A's row-side ones and vice versa
        if self._use_panels(X.T):
            return self._panel_product(X.T, True).T
        Up, Vp = self._packed()
        return self._apply(Up, Vp, self._zmap_t, self._zmap, self._rmaps, self._cmaps, X.T).T

    def _transpose(self) -> BlockLowRank:
        b1, b2 = self.grid
        factors = [[self.factors[i][j][::-1] for i in range(b1)] for j in range(b2)]
        return BlockLowRank(
            (self.shape[1], self.shape[0]), self.col_splits, self.row_splits, factors
        )

    # ---------------------------------------------------------- projection
    @classmethod
    def _resolve_grid(cls, m: int, n: int, grid: Any) -> tuple[int, int]:
        b1, b2 = check_pair(DEFAULT_GRID if grid is None else grid, "grid")
        b1, b2 = (min(b1, m), min(b2, n)) if grid is None else (b1, b2)
        if b1 > m or b2 > n:
            raise ValueError(
                f"grid={grid!r} asks for more blocks than the {m}x{n} matrix has rows/columns; "
                f"use at most ({m}, {n}) blocks"
            )
        return b1, b2

    @classmethod
    def min_budget(cls, m: int, n: int, grid: Any = None, **options: Any) -> int:
        b1, b2 = cls._resolve_grid(m, n, grid)
        rs, cs = balanced_splits(m, b1), balanced_splits(n, b2)
        return min(b - a for a, b in zip(rs, rs[1:], strict=False)) + min(
            b - a for a, b in zip(cs, cs[1:], strict=False)
        )

    @classmethod
    @scale_invariant
    def project(cls, W: torch.Tensor, budget: int, *, grid: Any = None) -> BlockLowRank:
        """Per-block truncated SVD with ranks allocated greedily across blocks (math.md 6.3).

        Every block's singular triplets are candidates with gain ``sigma^2`` and cost
        ``p_i + q_j``; they are taken in order of gain per cost while they fit the budget. When
        all blocks have the same size (the grid divides the shape) this keeps the globally
        largest singular values and is the exact optimum; with unequal sizes it is optimal for
        the fractional relaxation and within one rank-1 term of the optimum.

        Parameters
        ----------
        grid : int or (b1, b2), default (4, 4)
            Number of row blocks x column blocks; blocks are contiguous and balanced (sizes
            differ by at most one), so any shape works.
        """
        m, n = W.shape
        b1, b2 = cls._resolve_grid(m, n, grid)
        rs, cs = balanced_splits(m, b1), balanced_splits(n, b2)
        min_cost = cls.min_budget(m, n, grid=(b1, b2))
        if budget < min_cost:
            raise InfeasibleBudgetError(
                "blocklowrank", budget, min_cost, f"one rank-1 term on the {b1}x{b2} grid"
            )
        # batched SVD over the blocks of each distinct shape (at most four with balanced splits)
        groups: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for i in range(b1):
            for j in range(b2):
                shape = (rs[i + 1] - rs[i], cs[j + 1] - cs[j])
                groups.setdefault(shape, []).append((i, j))
        from ..linalg import choose_svd_method, top_svd

        # large blocks (linalg.RANDOMIZED_MIN_ENTRIES): randomized SVD of the leading
        # ``cap`` triplets, cap = twice the mean rank the budget buys per block (+ 8); a block
        # whose allocated rank reaches its cap is recomputed with twice the cap (below)
        svds = {}
        caps: dict[tuple[int, int], int] = {}
        svd_used = set()
        mean_rank = budget / (b1 * b2 * (m / b1 + n / b2))

        def block_svds(keys: list[tuple[int, int]], cap: int | None) -> None:
            p, q = rs[keys[0][0] + 1] - rs[keys[0][0]], cs[keys[0][1] + 1] - cs[keys[0][1]]
            k = min(p, q) if cap is None else min(cap, p, q)
            stack = torch.stack([W[rs[i] : rs[i + 1], cs[j] : cs[j + 1]] for i, j in keys])
            U, S, Vh, used = top_svd(stack, k)
            svd_used.add(used["svd"])
            for t, key in enumerate(keys):
                svds[key] = (U[t], S[t], Vh[t])
                caps[key] = k if used["svd"] == "randomized" else min(p, q)

        for keys in groups.values():
            (i0, j0) = keys[0]
            p, q = rs[i0 + 1] - rs[i0], cs[j0 + 1] - cs[j0]
            cap = min(p, q, 2 * round(mean_rank) + 8)
            method = choose_svd_method(p, q, cap)
            block_svds(keys, cap if method == "randomized" else None)
        # singular values below the numerical-rank tolerance carry no information: never buy them
        smax = max(float(S[0]) for _, S, _ in svds.values())
        tol = torch.finfo(W.dtype).eps * max(m, n) * smax
        while True:
            heap: list[tuple[float, int, int, int]] = []
            for (i, j), (_, S, _) in svds.items():
                cost = (rs[i + 1] - rs[i]) + (cs[j + 1] - cs[j])
                if float(S[0]) > tol:
                    heap.append((-float(S[0].double() ** 2) / cost, i, j, 0))
            heapq.heapify(heap)
            ranks = {key: 0 for key in svds}
            used = 0
            while heap and budget - used >= min_cost:
                _, i, j, t = heapq.heappop(heap)
                cost = (rs[i + 1] - rs[i]) + (cs[j + 1] - cs[j])
                if used + cost > budget:
                    continue
                used += cost
                ranks[i, j] = t + 1
                S = svds[i, j][1]
                if t + 1 < S.shape[0] and float(S[t + 1]) > tol:
                    heapq.heappush(heap, (-float(S[t + 1].double() ** 2) / cost, i, j, t + 1))
            # a randomized block that used all its triplets may deserve more: enlarge its cap
            full = [key for key in svds if ranks[key] >= caps[key]
                    and caps[key] < min(svds[key][0].shape[0], svds[key][2].shape[1])]
            if not full:
                break
            for key in full:
                block_svds([key], 2 * caps[key])
        factors = []
        for i in range(b1):
            row = []
            for j in range(b2):
                U, S, Vh = svds[i, j]
                r = ranks[i, j]
                s = S[:r].sqrt()
                row.append(((U[:, :r] * s).contiguous(), (Vh[:r].T * s).contiguous()))
            factors.append(row)
        # flat storage, as a loaded or layer-wrapped matrix has: the factors are views of two
        # buffers, so the products' cache checks look at 2 tensors instead of 2 b1 b2
        out = cls._from_state(cls((m, n), rs, cs, factors)._tensors(),
                              {"row_splits": rs, "col_splits": cs}, (m, n))
        uniform = (
            len({b - a for a, b in zip(rs, rs[1:], strict=False)}) == 1
            and len({b - a for a, b in zip(cs, cs[1:], strict=False)}) == 1
        )
        out.info = {
            "algorithm": "per-block SVD, greedy rank allocation",
            "grid": [b1, b2],
            "optimal": uniform and svd_used == {"exact"},
            "svd": "randomized" if "randomized" in svd_used else "exact",
        }
        if "randomized" in svd_used:
            out.info["rank_caps"] = sorted(set(caps.values()))
        return out


def _rebuild(tensors: dict, config: dict, shape: tuple[int, int], info: dict) -> BlockLowRank:
    """Unpickle a :class:`BlockLowRank` (see ``BlockLowRank.__reduce__``)."""
    out = BlockLowRank._from_state(tensors, config, shape)
    out.info = info
    return out
