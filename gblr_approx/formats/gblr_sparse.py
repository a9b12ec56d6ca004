"""Thin-product plan of a GBLR matrix: near-full slots dense, the rest as two CSR matrices.

A mat-vec reads every factor entry once and does one multiply-add with it, so its cost is
memory traffic and kernel launches, not MAC rate. The tiled plan (:mod:`.gblr_plan`) pads
slots to tiles and runs 6-10 kernels. This plan runs four to five:

- *wide* slots (intervals covering at least ``WIDE_SHARE`` of both sides; on fitted layouts
  a few dozen near-full rank-1 pieces) as two dense GEMVs ``U_w (V_w^T x)`` over
  zero-padded full-length factors;
- every other slot as one row of a CSR matrix ``V_n^T`` (``R x n``, its column interval) and
  one column of a CSR matrix ``U_n`` (``m x (R + n)``, its row interval); a dense block is a
  set of ``U_n`` entries in the columns ``R + c`` that read ``x`` directly:
  ``y = U_n [V_n^T x; x] + U_w (V_w^T x)``.

The CSR matrices hold exactly the non-zeros of the narrow components (no padding), so the
narrow part reads ``flops`` values plus their column indices. Each non-zero costs more than
a padded tile entry (index indirection), so :class:`~.gblr.GBLR` runs this plan only where
the tiles would pad a lot (``SPARSE_NNZ_COST``): on the default MiniLM fits at 25 % (one
thread, batch 1, time / dense) 384x384 3.6 -> 2.3-2.4, 1536x384 1.95 -> 1.4-1.5, 384x1536
2.7 -> 1.8 (docs/benchmarks.md). Products of a few columns (``k < ROW_FORM_BELOW``, e.g.
the tokens of one sentence) use it too: at 16 batch-major columns it ran at 1.6-3.8x the
tiled plan's speed on the same fits.

Everything structural (index arrays) is built once per structure on the host; the values
are gathers from the flat factor buffers, so a plan serves every matrix of that structure.
Only products without autograd use it (sparse CSR tensors do not carry gradients here).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from .gblr_plan import WIDE_SHARE, factor_offsets

__all__ = ["GBLRSparseMatvec", "build_sparse_matvec"]


@dataclass
class GBLRSparseMatvec:
    """Index arrays of the sparse mat-vec plan (see the module docstring).

    Attributes
    ----------
    shape : (m, n)
    wide : int
        Number of wide slots ``R_w``; ``wide_v`` ``(R_w * n,)`` and ``wide_u`` ``(m * R_w,)``
        index the padded flat ``V`` / ``U`` buffers (the last index is a zero).
    v_crow, v_col : IntTensor; v_index : LongTensor
        CSR structure of ``V_n^T`` (``R x n``) and the flat-``V`` index of every entry.
    u_crow, u_col : IntTensor
        CSR structure of ``U_n`` (``m x (R + n)``).
    u_entry, u_index : LongTensor
        Contribution ``t`` adds ``U[u_index[t]]`` into entry ``u_entry[t]`` (overlapping dense
        blocks share entries).
    reads_x : bool
        Whether ``U_n`` has dense-block columns (``x`` is appended to ``z``).
    """

    shape: tuple[int, int]
    wide: int
    wide_v: torch.Tensor | None
    wide_u: torch.Tensor | None
    v_crow: torch.Tensor
    v_col: torch.Tensor
    v_index: torch.Tensor
    u_crow: torch.Tensor
    u_col: torch.Tensor
    u_entry: torch.Tensor
    u_index: torch.Tensor
    reads_x: bool

    @property
    def narrow_nnz(self) -> int:
        """Non-zeros of the two CSR matrices (the narrow part's stored values)."""
        return int(self.v_col.numel() + self.u_col.numel())

    @property
    def slots(self) -> int:
        """Narrow factored slots ``R`` (rows of ``V_n^T``)."""
        return self.v_crow.numel() - 1

    def to(self, device: torch.device) -> GBLRSparseMatvec:
        """The same plan with its index tensors on ``device``."""
        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return GBLRSparseMatvec(
            self.shape, self.wide, mv(self.wide_v), mv(self.wide_u), mv(self.v_crow),
            mv(self.v_col), mv(self.v_index), mv(self.u_crow), mv(self.u_col),
            mv(self.u_entry), mv(self.u_index), self.reads_x,
        )

    def pack(self, U: torch.Tensor, V: torch.Tensor) -> tuple:
        """``(V_w^T, U_w, V_n^T, U_n)`` from the flat factor buffers (no autograd)."""
        m, n = self.shape
        zero = U.new_zeros(1)
        Vz = torch.cat([V.reshape(-1), zero])
        Uz = torch.cat([U.reshape(-1), zero])
        Vw = None if self.wide_v is None else Vz[self.wide_v].view(self.wide, n)
        Uw = None if self.wide_u is None else Uz[self.wide_u].view(m, self.wide)
        R = self.slots
        u_vals = Uz.new_zeros(self.u_col.numel()).index_add_(0, self.u_entry, Uz[self.u_index])
        with warnings.catch_warnings():  # torch flags its CSR support as beta on construction
            warnings.simplefilter("ignore", UserWarning)
            Vn = torch.sparse_csr_tensor(self.v_crow, self.v_col, Vz[self.v_index], (R, n))
            Un = torch.sparse_csr_tensor(
                self.u_crow, self.u_col, u_vals, (m, R + (n if self.reads_x else 0))
            )
        return Vw, Uw, Vn, Un

    def matmul(self, packed: tuple, X: torch.Tensor) -> torch.Tensor:
        """``A @ X`` for ``X`` of shape ``(n,)`` or ``(n, k)`` (thin: ``k`` below
        ``ROW_FORM_BELOW``); returns ``(m,)`` or ``(m, k)``. Four or five kernels, ``flops``
        multiply-adds plus the wide slots' padding; one column runs the 1-D kernels (faster
        than the matrix ones)."""
        column = X.ndim == 2 and X.shape[1] == 1
        if column:
            X = X.reshape(-1)
        Vw, Uw, Vn, Un = packed
        cols = X.shape[1:]
        if self.u_col.numel() == 0:  # every slot is wide (e.g. a low-rank layout)
            Y = X.new_zeros(self.shape[0], *cols)
        else:
            Z = Vn @ X if self.slots else X.new_zeros(0, *cols)
            if self.reads_x:
                Z = torch.cat([Z, X])
            Y = Un @ Z
        if Vw is not None:
            (Y.addmv_ if X.ndim == 1 else Y.addmm_)(Uw, Vw @ X)
        return Y.view(-1, 1) if column else Y

    def matvec(self, packed: tuple, x: torch.Tensor) -> torch.Tensor:
        """``A @ x`` for a vector ``x`` of shape ``(n,)``: :meth:`matmul`."""
        return self.matmul(packed, x)


def build_sparse_matvec(
    shape: tuple[int, int],
    row_start: list[int],
    row_width: list[int],
    col_start: list[int],
    col_width: list[int],
    ranks: list[int],
    is_dense: list[bool],
    *,
    wide_share: float = WIDE_SHARE,
) -> GBLRSparseMatvec:
    """Build the sparse mat-vec plan of a GBLR structure (plain Python lists of length K).

    Flat-buffer layout as in :func:`~.gblr_plan.build_plan`. Cost: ``O(nnz log nnz)`` host
    work (one sort of the ``U_n`` entries), done once per structure.
    """
    m, n = shape
    wide_v: list[torch.Tensor] = []
    wide_u: list[torch.Tensor] = []
    v_rows: list[tuple[torch.Tensor, torch.Tensor]] = []  # per narrow slot: (cols, V index)
    u_r, u_c, u_i = [], [], []  # U_n contributions: row, column, U index
    offs = factor_offsets(row_width, col_width, ranks, is_dense)
    for k in range(len(ranks)):
        h, w, r = row_width[k], col_width[k], ranks[k]
        uo, vo = offs[k]
        rows = (row_start[k] + torch.arange(h)) % m
        cols = (col_start[k] + torch.arange(w)) % n
        if is_dense[k]:
            if h and w:  # entry (t, j) of the block: U_n[row t, R + col j]
                u_r.append(rows.repeat_interleave(w))
                u_c.append(-1 - cols.repeat(h))  # negative: an x column, shifted by R below
                u_i.append(uo + torch.arange(h * w))
            continue
        if h and w and r:
            wide = h >= wide_share * m and w >= wide_share * n
            for j in range(r):
                vi = vo + torch.arange(w) * r + j
                ui = uo + torch.arange(h) * r + j
                if wide:
                    wide_v.append(torch.full((n,), -1, dtype=torch.long).index_copy_(0, cols, vi))
                    wide_u.append(torch.full((m,), -1, dtype=torch.long).index_copy_(0, rows, ui))
                else:
                    s = len(v_rows)
                    order = torch.argsort(cols)
                    v_rows.append((cols[order], vi[order]))
                    u_r.append(rows)
                    u_c.append(torch.full((h,), s, dtype=torch.long))
                    u_i.append(ui)
    uo, vo = offs[-1]  # the buffers' lengths: the index of the zero appended to each
    R = len(v_rows)
    empty = torch.zeros(0, dtype=torch.long)
    # V_n^T: one CSR row per narrow slot, columns sorted
    lengths = torch.tensor([c.numel() for c, _ in v_rows], dtype=torch.long)
    v_crow = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(lengths, 0)])
    v_col = torch.cat([c for c, _ in v_rows]) if v_rows else empty
    v_index = torch.cat([i for _, i in v_rows]) if v_rows else empty
    # U_n: contributions sorted by (row, column); equal positions (overlapping dense blocks)
    # become one entry
    rr = torch.cat(u_r) if u_r else empty
    cc = torch.cat(u_c) if u_c else empty
    ii = torch.cat(u_i) if u_i else empty
    cc = torch.where(cc < 0, R + (-1 - cc), cc)
    width = R + n
    key = rr * width + cc
    uniq, entry = torch.unique(key, sorted=True, return_inverse=True)
    u_rows, u_col = uniq // width, uniq % width
    counts = torch.bincount(u_rows, minlength=m)
    u_crow = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(counts, 0)])

    def padded(idx: list[torch.Tensor], zero_at: int) -> torch.Tensor | None:
        if not idx:
            return None
        t = torch.stack(idx)
        return torch.where(t < 0, zero_at, t)

    wv = padded(wide_v, vo)  # (R_w, n); -1 (outside the interval) -> the appended zero
    wu = padded(wide_u, uo)  # (R_w, m)
    i32 = torch.int32  # CSR indices as int32: MKL's own type (int64 costs a conversion per call,
    # measured 8.3 -> 6.0 us for a 7000-entry mat-vec)
    return GBLRSparseMatvec(
        (m, n),
        len(wide_v),
        None if wv is None else wv.reshape(-1),
        None if wu is None else wu.T.contiguous().reshape(-1),
        v_crow.to(i32),
        v_col.to(i32),
        v_index,
        u_crow.to(i32),
        u_col.to(i32),
        entry.reshape(-1),
        ii,
        bool((u_col >= R).any()),
    )
