"""Execution plan of the GBLR product: components packed into tiled batched GEMMs.

A GBLR matrix is a sum of components ``U_k V_k^T`` on cyclic rectangles. Looping over the
components in Python runs one tiny GEMM pair per component and is orders of magnitude slower
than a dense product. The plan instead splits every factored component into rank-1 *slots*
(one column ``v`` of ``V_k`` on its column interval, one column ``u`` of ``U_k`` on its row
interval) and runs ``Y = A @ X`` in two tiled stages, each a few batched GEMMs:

1. ``Z = V^T X``: the columns are cut into tiles of ``T1`` columns. Tile ``c`` holds a dense
   ``(M_c, T1)`` panel: one row per slot whose column interval meets the tile, with that
   slot's ``v`` entries inside the tile (zero elsewhere). Tiles with similar ``M_c`` share one
   ``torch.bmm`` against their ``T1``-row slices of ``X``; the partial sums of a slot that
   spans several tiles are added by one ``index_add``.
2. ``Y = U Z``: the rows are cut into tiles of ``T2`` rows; tile ``t`` holds a ``(T2, M_t)``
   panel of the ``u`` entries of the slots meeting it. One ``bmm`` per bucket of tiles writes
   every output row exactly once (no scatter of partial outputs). A component stored as a
   dense block is a set of stage-2 slots, one per block column, that read ``X`` rows directly.

Slots whose interval spans most of a side (``WIDE_SHARE``; on fitted MiniLM layouts a few
dozen near-full-width rank-1 pieces that carry 35-70 % of the MACs) skip the tiles of that
stage: stage 1 computes their rows of ``Z`` with one dense GEMM ``V_w^T X`` over zero-padded
full-length rows, stage 2 adds ``U_w Z_w`` with one more. Those GEMMs run at the dense rate and
pad by at most ``1 / WIDE_SHARE``; in tiles the same slots would occupy a line of every tile and
go through the ``index_add`` and the row gathers.

Everything that depends only on the structure (intervals, ranks) is integer index tensors
built once on the CPU; the panel values are one gather from the flat factor buffers, so
autograd reaches ``U`` and ``V`` and the product never synchronises with the host
(CUDA-safe). Padding is exact zeros: results equal the component loop up to rounding.

Cost model: the panels execute ``padded_macs`` multiply-adds per product column, at least
``A.flops``; ``fill = flops / padded_macs``. A slot of width ``w`` fills about
``w / (w + T)`` of the tile rows it occupies, so layouts of many narrow rank-1 pieces run far
below the dense GEMM rate however they are packed (docs/product_speed.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import balanced_step, scratch

__all__ = ["GBLRPlan", "GBLRSegments", "build_plan", "build_segments"]

#: Candidate tile sizes; the plan takes the cheapest by :data:`LINE_COST` (see _best_tile).
TILES = (16, 32, 64, 128)
#: Price of one panel line (a slot meeting a tile: one partial row to write, add and gather),
#: in multiply-adds per product column. Memory-bound row traffic runs ~10-20x slower per
#: entry than GEMM multiply-adds (measured: a 1272 x 256 row gather takes as long as a
#: ~4 MMAC GEMM), so equally padded layouts take the largest tile (aligned layouts: the
#: layout's own tile, whose panels are real GEMMs with inner dimension T).
LINE_COST = 16
#: Price of one more bmm call, in multiply-adds per product column (see build_plan).
BUCKET_COST = 4096
#: The same price for thin operands (mat-vecs), where a multiply-add is one memory read:
#: a launch (~5 us) costs about as much as 16k of them. Small layers get one panel shape per
#: stage; a 4096 x 4096 layer with 1000 random components gets a few (measured 2.7 ms
#: against 6.7 ms with a single, 0.41-filled shape; dense 4.2 ms).
MATVEC_BUCKET_COST = 16384
#: Below this many product columns each bmm runs in row form ``(X^T W^T)^T``: MKL's column
#: form has a large fixed cost per call when the right operand is thin (measured ~60 us vs
#: ~3 us at one column).
ROW_FORM_BELOW = 32
#: A slot whose interval covers at least this share of its side runs in that stage's dense
#: GEMM (zero-padded to the full side) instead of the tiles. Measured on fitted MiniLM layers
#: (384x384 at 50 %, batch 256): the near-full pieces then run at ~1.0 of the dense rate
#: against ~0.3 in tiles.
WIDE_SHARE = 0.75
#: Cache footprint (bytes) of one column block of a large product's intermediates, and the
#: smallest block (per-block Python work: one call per bucket; thin blocks also run the
#: bucket GEMMs at a lower rate). MIN_CHUNK 64 -> 256, measured on a 2-core Intel Xeon host,
#: one thread, efficiency at 256 / 1024 columns: 4096 x 4096 with 1000 random components
#: 0.43 / 0.38 -> 0.67 / 0.53; free-layout MiniLM layers at 25 % 0.11-0.13 -> 0.11-0.16.
CHUNK_BYTES = 1 << 20
MIN_CHUNK = 256


def _bmm(W: torch.Tensor, X: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``W @ X`` batched, in the faster of the two memory layouts for ``X``'s width.

    Thin operands run in row form ``(X^T W^T)^T`` (measured 4-8 us against 20-30 us for the
    column form at one column, panels of 16-128); :meth:`GBLRPlan.pack` stores the panels
    of row-form plans transposed, so ``W^T`` is contiguous.
    """
    if X.shape[-1] < ROW_FORM_BELOW:
        if out is None:
            return torch.bmm(X.mT, W.mT).mT
        if X.shape[-1] == 1:  # (count, 1, rows) views of a column are contiguous
            torch.bmm(X.mT, W.mT, out=out.mT)
        else:
            out.copy_(torch.bmm(X.mT, W.mT).mT)
        return out
    return torch.bmm(W, X) if out is None else torch.bmm(W, X, out=out)


@dataclass
class _Bucket:
    """Tiles of one panel shape: ``count`` panels of ``(rows, cols)`` values."""

    count: int
    rows: int
    cols: int
    value_index: torch.Tensor  # (count*rows*cols,) indices into the padded flat factor buffer


@dataclass
class GBLRPlan:
    """Integer index tensors that run a GBLR product as tiled batched GEMMs.

    Attributes
    ----------
    shape : (m, n)
    slots : int
        Rank-1 slots of the factored components (sum of their ranks): rows of ``Z``.
    tiles : (T1, T2)
        Column tile width of stage 1, row tile height of stage 2.
    stage1, stage2 : list of _Bucket
        Stage-1 buckets of ``(M, T1)`` panels (values from ``V``), stage-2 buckets of
        ``(T2, M)`` panels (values from ``U``).
    x_gather : LongTensor (tiles1 * T1,) or None
        Rows of ``X`` read by the stage-1 tiles, bucket after bucket (modulo ``n``); ``None``
        when that is ``X`` itself in order (aligned layouts: stage 1 reads views of ``X``).
    z_index : LongTensor
        Slot (row of ``Z``) each stage-1 output row adds into (``slots`` for padding).
    z_gather : LongTensor
        Rows of ``[Z; 0; X]`` read by the stage-2 tiles, bucket after bucket.
    y_order : LongTensor or None
        Permutation from bucket order to tile order of the stage-2 output rows (``None``
        when they already are in tile order).
    padded_macs, flops : int
        Multiply-adds per product column executed (padding included) and the matrix's cost.
    reads_x : bool
        Whether stage 2 reads rows of ``X`` (dense components); otherwise ``X`` is not copied.
    row_form : bool
        Panels packed for thin products (fewer than ``ROW_FORM_BELOW`` columns, row form).
    wide1 : int
        Slots ``0 .. wide1-1`` are wide in stage 1: their rows of ``Z`` are one GEMM
        ``V_w^T X`` with ``V_w^T`` of shape ``(wide1, n)``, values ``wide_v`` (flat indices).
    wide2 : (start, count)
        Slots ``start .. start+count-1`` are wide in stage 2: ``Y += U_w Z[start:start+count]``
        with ``U_w`` of shape ``(m, count)``, values ``wide_u``.
    """

    shape: tuple[int, int]
    slots: int
    tiles: tuple[int, int]
    stage1: list[_Bucket]
    stage2: list[_Bucket]
    x_gather: torch.Tensor | None
    z_index: torch.Tensor
    z_gather: torch.Tensor
    y_order: torch.Tensor | None
    padded_macs: int
    flops: int
    reads_x: bool = True
    row_form: bool = False
    wide1: int = 0
    wide2: tuple[int, int] = (0, 0)
    wide_v: torch.Tensor | None = None
    wide_u: torch.Tensor | None = None

    @property
    def fill(self) -> float:
        """``flops / padded_macs``: share of the executed multiply-adds that are real."""
        return self.flops / self.padded_macs if self.padded_macs else 1.0

    def to(self, device: torch.device) -> GBLRPlan:
        """The same plan with its index tensors on ``device``."""

        def mv(b: _Bucket) -> _Bucket:
            return _Bucket(b.count, b.rows, b.cols, b.value_index.to(device))

        return GBLRPlan(
            self.shape,
            self.slots,
            self.tiles,
            [mv(b) for b in self.stage1],
            [mv(b) for b in self.stage2],
            None if self.x_gather is None else self.x_gather.to(device),
            self.z_index.to(device),
            self.z_gather.to(device),
            None if self.y_order is None else self.y_order.to(device),
            self.padded_macs,
            self.flops,
            self.reads_x,
            self.row_form,
            self.wide1,
            self.wide2,
            None if self.wide_v is None else self.wide_v.to(device),
            None if self.wide_u is None else self.wide_u.to(device),
        )

    # ------------------------------------------------------------------ values
    def pack(self, U: torch.Tensor, V: torch.Tensor) -> tuple:
        """Panel values from the flat factor buffers (differentiable in ``U`` and ``V``).

        Returns ``(p1, p2, (V_w, U_w))``: one ``(count, M, T1)`` tensor per stage-1 bucket
        (entries of ``V``), one ``(count, T2, M)`` tensor per stage-2 bucket (entries of
        ``U``), and the wide slots' ``(wide1, n)`` and ``(m, wide2[1])`` matrices (``None``
        when there are none); padding is zero.
        """
        zero = U.new_zeros(1)
        Vz = torch.cat([V.reshape(-1), zero])
        Uz = torch.cat([U.reshape(-1), zero])
        p1 = [Vz[b.value_index].view(b.count, b.rows, b.cols) for b in self.stage1]
        p2 = [Uz[b.value_index].view(b.count, b.rows, b.cols) for b in self.stage2]
        if self.row_form:  # thin products read W^T: store it contiguous
            p1 = [p.mT.contiguous().mT for p in p1]
            p2 = [p.mT.contiguous().mT for p in p2]
        m, n = self.shape
        Vw = None if self.wide_v is None else Vz[self.wide_v].view(self.wide1, n)
        Uw = None if self.wide_u is None else Uz[self.wide_u].view(m, self.wide2[1])
        return p1, p2, (Vw, Uw)

    # ----------------------------------------------------------------- product
    def matmul(
        self, panels: tuple[list[torch.Tensor], list[torch.Tensor]], X: torch.Tensor
    ) -> torch.Tensor:
        """``A @ X`` for ``X`` of shape ``(n, k)``; ``panels`` from :meth:`pack`.

        About ``6 + len(stage1) + len(stage2)`` kernel launches (two more with wide slots) per
        column block of :attr:`chunk_columns`, no host synchronisation. Without autograd the
        stages write into preallocated buffers (no concatenations).
        """
        p1, p2, (Vw, Uw) = panels
        needs_grad = torch.is_grad_enabled() and (
            X.requires_grad
            or any(v.requires_grad for v in p1 + p2 + [w for w in (Vw, Uw) if w is not None])
        )
        if needs_grad:
            return self._matmul_autograd(p1, p2, (Vw, Uw), X)
        if X.shape[1] == 1:
            return self._matvec(p1, p2, (Vw, Uw), X)
        chunk = self.chunk_columns
        B = X.shape[1]
        if B >= 2 * chunk:  # column blocks whose intermediates stay in cache
            # (batch-major X: the result is written batch-major, block by block while it is
            # in cache, so callers need no transposing copy of the whole result)
            m = self.shape[0]
            out = X.new_empty(B, m).T if X.stride(0) == 1 else X.new_empty(m, B)
            rows = self._block_rows(scratch_result=True)
            for j in range(0, B, chunk):
                out[:, j : j + chunk] = self._matmul_block(
                    p1, p2, (Vw, Uw), X[:, j : j + chunk], rows
                )
            return out
        return self._matmul_block(p1, p2, (Vw, Uw), X, self._block_rows(scratch_result=False))

    @property
    def chunk_columns(self) -> int:
        """Product columns per block: the intermediates (rows of ``Z``, the stage-1 partial
        sums, the gathered stage-2 operand and the output) of one block fill about
        :data:`CHUNK_BYTES` of fp32 (measured on MiniLM layouts: 2-3x faster at 1024 columns
        than one block), at least :data:`MIN_CHUNK` columns."""
        rows = (
            self.slots + 1 + (self.shape[1] if self.reads_x else 0) + self.z_index.numel()
            + self.z_gather.numel() + sum(b.count * b.rows for b in self.stage2)
        )
        c = CHUNK_BYTES // (4 * max(rows, 1))
        return max(MIN_CHUNK, 1 << max(c, 1).bit_length() - 1)

    def _block_rows(self, scratch_result: bool) -> list[int]:
        """Rows of each intermediate of :meth:`_matmul_block` (``ZX``, gathered ``X``,
        stage-1 partial sums, gathered ``[Z; X]``, stage-2 output and, when the result may
        live in scratch, its reordered copy)."""
        S1 = self.slots + 1
        y_rows = sum(b.count * b.rows for b in self.stage2)
        in_scratch = scratch_result or self.y_order is not None
        return [
            S1 + (self.shape[1] if self.reads_x else 0),
            0 if (not self.stage1 or self.x_gather is None) else self.x_gather.numel(),
            self.z_index.numel() if self.stage1 else 0,
            self.z_gather.numel() if self.stage2 else 0,
            y_rows if (self.stage2 and in_scratch) else 0,
            self.shape[0] if (self.stage2 and scratch_result and self.y_order is not None)
            else 0,
        ]

    def _matmul_block(
        self, p1: list[torch.Tensor], p2: list[torch.Tensor], pw: tuple, X: torch.Tensor,
        rows: list[int],
    ) -> torch.Tensor:
        """The no-autograd product of one column block (see :meth:`matmul`).

        The intermediates (``rows`` from :meth:`_block_rows`) are views of this thread's
        scratch buffer on the CPU (:func:`~gblr_approx.formats.base.scratch`: no page faults
        per product), fresh tensors elsewhere; with ``scratch_result`` rows the returned
        block may be a view of it too (the caller copies it).
        """
        Vw, Uw = pw
        m = self.shape[0]
        B = X.shape[1]
        T1 = self.tiles[0]
        S1 = self.slots + 1
        buf = scratch(sum(rows) * B, X)

        def take(i: int) -> torch.Tensor:
            if buf is None:
                return X.new_empty(rows[i], B)
            at = sum(rows[:i]) * B
            return buf[at : at + rows[i] * B].view(rows[i], B)

        ZX = take(0)
        ZX[:S1].zero_()
        if self.reads_x:  # rows: slots, a zero scratch row, then X (read by dense slots)
            ZX[S1:].copy_(X)
        if Vw is not None:  # wide stage-1 slots: one dense GEMM into their rows of Z
            torch.mm(Vw, X, out=ZX[: self.wide1])
        if self.stage1:
            Xg = X if self.x_gather is None else _rows(X, self.x_gather, take(1))
            P = take(2)
            at = to = 0
            for b, vals in zip(self.stage1, p1, strict=True):
                size, rows_b = b.count * T1, b.count * b.rows
                _bmm(
                    vals,
                    Xg[at : at + size].view(b.count, T1, B),
                    out=P[to : to + rows_b].view(b.count, b.rows, B),
                )
                at, to = at + size, to + rows_b
            ZX[:S1].index_add_(0, self.z_index, P)
        w0, wc = self.wide2
        if not self.stage2:  # every stage-2 slot is wide
            return torch.mm(Uw, ZX[w0 : w0 + wc])
        Zg = _rows(ZX, self.z_gather, take(3))
        # (rows[4] == 0: the stage-2 output is the result itself, a fresh tensor)
        Y = take(4) if rows[4] else X.new_empty(sum(b.count * b.rows for b in self.stage2), B)
        at = to = 0
        for b, vals in zip(self.stage2, p2, strict=True):
            size, rows_b = b.count * b.cols, b.count * b.rows
            _bmm(
                vals,
                Zg[at : at + size].view(b.count, b.cols, B),
                out=Y[to : to + rows_b].view(b.count, b.rows, B),
            )
            at, to = at + size, to + rows_b
        if self.y_order is not None:  # (a fresh tensor unless the caller copies the block)
            Y = _rows(Y, self.y_order[:m], take(5) if rows[5] else None)
        Y = Y[:m]
        if Uw is not None:
            Y.addmm_(Uw, ZX[w0 : w0 + wc])
        return Y

    def _matvec(self, p1: list[torch.Tensor], p2: list[torch.Tensor], pw: tuple,
                X: torch.Tensor) -> torch.Tensor:
        """One column: the same stages on 1-D buffers (``index_select``/``index_add_`` on
        vectors, one ``bmm`` per bucket written in place), about half the overhead of the
        general path (measured 36 us against ~115 us on a 384x384 layout of 800 pieces)."""
        Vw, Uw = pw
        x = X.reshape(-1)
        S1 = self.slots + 1
        Z = x.new_zeros(S1 + x.numel()) if self.reads_x else x.new_zeros(S1)
        if self.reads_x:
            Z[S1:] = x
        if Vw is not None:
            torch.mv(Vw, x, out=Z[: self.wide1])
        if p1:
            xs = x if self.x_gather is None else x.index_select(0, self.x_gather)
            Z.index_add_(0, self.z_index, _bucket_matvecs(self.stage1, p1, xs, self.tiles[0]))
        w0, wc = self.wide2
        if not p2:
            return torch.mv(Uw, Z[w0 : w0 + wc]).view(-1, 1)
        Y = _bucket_matvecs(self.stage2, p2, Z.index_select(0, self.z_gather), None)
        if self.y_order is not None:
            Y = Y.index_select(0, self.y_order)
        Y = Y[: self.shape[0]]
        if Uw is not None:
            Y.addmv_(Uw, Z[w0 : w0 + wc])
        return Y.view(-1, 1)

    def _matmul_autograd(
        self, p1: list[torch.Tensor], p2: list[torch.Tensor], pw: tuple, X: torch.Tensor
    ) -> torch.Tensor:
        """The same product out of differentiable (out-of-place) operations."""
        Vw, Uw = pw
        m = self.shape[0]
        B = X.shape[1]
        T1 = self.tiles[0]
        S1 = self.slots + 1
        if Vw is None:
            Z = X.new_zeros(S1, B)
        else:
            Z = torch.cat([Vw @ X, X.new_zeros(S1 - self.wide1, B)])
        if self.stage1:
            Xg = X if self.x_gather is None else _rows(X, self.x_gather)
            at = 0
            parts = []
            for b, vals in zip(self.stage1, p1, strict=True):
                size = b.count * T1
                # (flatten, not reshape(-1, B): an empty batch, B = 0, has no -1 to infer)
                parts.append(_bmm(vals, Xg[at : at + size].view(b.count, T1, B)).flatten(0, 1))
                at += size
            Z = Z.index_add(0, self.z_index, torch.cat(parts) if len(parts) > 1 else parts[0])
        w0, wc = self.wide2
        Yw = None if Uw is None else Uw @ Z[w0 : w0 + wc]
        if not self.stage2:
            return Yw
        Zg = _rows(torch.cat([Z, X]) if self.reads_x else Z, self.z_gather)
        outs = []
        at = 0
        for b, vals in zip(self.stage2, p2, strict=True):
            size = b.count * b.cols
            outs.append(_bmm(vals, Zg[at : at + size].view(b.count, b.cols, B)).flatten(0, 1))
            at += size
        Y = torch.cat(outs) if len(outs) > 1 else outs[0]
        if self.y_order is not None:
            Y = _rows(Y, self.y_order)
        Y = Y[:m]
        return Y if Yw is None else Y + Yw


def _bucket_matvecs(
    buckets: list[_Bucket], panels: list[torch.Tensor], v: torch.Tensor, width: int | None
) -> torch.Tensor:
    """Concatenated ``panel @ slice`` of every bucket for a vector ``v`` whose consecutive
    slices of ``count * width`` entries (``width=None``: the bucket's ``cols``) feed the
    buckets in order; one ``bmm`` per bucket into a shared output."""
    if len(buckets) == 1:
        b = buckets[0]
        return torch.bmm(v.view(b.count, 1, b.cols), panels[0].mT).view(-1)
    out = v.new_empty(sum(b.count * b.rows for b in buckets))
    at = to = 0
    for b, vals in zip(buckets, panels, strict=True):
        size, rows = b.count * (width or b.cols), b.count * b.rows
        torch.bmm(v[at : at + size].view(b.count, 1, -1), vals.mT,
                  out=out[to : to + rows].view(b.count, 1, b.rows))
        at, to = at + size, to + rows
    return out


def _rows(X: torch.Tensor, index: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``X[index]`` for a 2-D ``X``: the embedding lookup kernel, measured ~2x faster than
    ``index_select`` for row gathers on CPU (differentiable in ``X``). Into ``out`` (no
    autograd) it is ``index_select(..., out=out)``, as fast in torch 2.13 for the gathers
    of a column block (30 against 33 us for 4722 rows of 64 columns)."""
    if out is None:
        return torch.nn.functional.embedding(index, X)
    return torch.index_select(X, 0, index, out=out)


def _buckets(
    counts: list[int], size: int, bucket_cost: float, contiguous: bool = False
) -> list[tuple[int, list[int]]]:
    """Split tiles into buckets minimising padded MACs + ``bucket_cost`` per bucket.

    Tiles sorted by their slot count (or, with ``contiguous``, in tile order: every bucket is
    then a run of neighbouring tiles, so its rows of ``X`` or ``Y`` are one contiguous slice)
    are cut into contiguous runs (dynamic programming, ``O(G^2)``); a run pads every tile to
    its largest count and runs as one ``bmm`` of ``size``-long panels. Returns
    ``(padded count, tile ids)`` per bucket.
    """
    order = list(range(len(counts)))
    if not contiguous:
        order.sort(key=lambda g: counts[g])
    cnt = [max(counts[g], 1) for g in order]
    G = len(cnt)
    best = [0.0] + [float("inf")] * G
    cut = [0] * (G + 1)
    for j in range(1, G + 1):
        M = 0
        for i in range(j - 1, -1, -1):
            M = max(M, cnt[i])
            c = best[i] + (j - i) * M * size + bucket_cost
            if c < best[j]:
                best[j], cut[j] = c, i
    out = []
    j = G
    while j > 0:
        i = cut[j]
        out.append((max(cnt[i:j]), order[i:j]))
        j = i
    return out[::-1]


def _padded(buckets: list[tuple[int, list[int]]], size: int, bucket_cost: float) -> float:
    return sum(M * len(ids) * size + bucket_cost for M, ids in buckets)


def _incidence(
    starts: list[int], widths: list[int], side: int, tile: int
) -> list[list[tuple[int, int, int, int]]]:
    """For each tile of ``tile`` entries, the runs ``(slot, local position, first entry,
    length)`` of every slot whose cyclic interval meets it (a wrapping slot may meet a tile
    twice)."""
    nt = -(-side // tile)
    tiles: list[list[tuple[int, int, int]]] = [[] for _ in range(nt)]
    for i, (s, w) in enumerate(zip(starts, widths, strict=True)):
        t = 0
        while t < w:  # contiguous runs: up to the end of the tile or of the side
            p = (s + t) % side
            length = min(w - t, tile - p % tile, side - p)
            tiles[p // tile].append((i, p % tile, t, length))
            t += length
    return tiles


def _stage(starts: list[int], widths: list[int], side: int, tile: int, bucket_cost: float):
    """Per tile the slots meeting it (with their runs), and the tiles' buckets.

    Buckets of neighbouring tiles are preferred while they pad by less than one gather or
    reordering of the side's rows would cost (``side * LINE_COST``): their slices of ``X``
    (stage 1) or ``Y`` (stage 2) are then read or written in place.
    """
    tiles = _incidence(starts, widths, side, tile)
    # the slots of a tile: each distinct slot once, its runs merged into one panel line
    lines = []
    for runs in tiles:
        by_slot: dict[int, list] = {}
        for run in runs:
            by_slot.setdefault(run[0], []).append(run)
        lines.append(list(by_slot.items()))
    counts = [len(ln) for ln in lines]
    buckets = _buckets(counts, tile, bucket_cost)
    runs = _buckets(counts, tile, bucket_cost, contiguous=True)
    if _padded(runs, tile, bucket_cost) <= _padded(buckets, tile, bucket_cost) + side * LINE_COST:
        buckets = runs
    return lines, buckets


def _value_index(vals: tuple[int, int, int], t0: int, length: int) -> torch.Tensor:
    """Flat-buffer indices of entries ``t0 .. t0+length-1`` of a slot ``(base, j, r)``:
    entry ``t`` of column ``j`` of a row-major ``(., r)`` factor at ``base``."""
    base, j, r = vals
    return base + torch.arange(t0, t0 + length) * r + j


def _best_tile(starts, widths, side, tiles, bucket_cost) -> int:
    def padded(tile):
        lines = _incidence(starts, widths, side, tile)
        counts = [len({run[0] for run in runs}) for runs in lines]
        return sum(max(c, 1) for c in counts) * (tile + LINE_COST) + bucket_cost * 2

    cands = [t for t in tiles if t <= max(side, 1)] or [min(tiles)]
    return min(cands, key=padded)


def factor_offsets(
    row_width: list[int], col_width: list[int], ranks: list[int], is_dense: list[bool]
) -> list[tuple[int, int]]:
    """Start ``(u, v)`` of each component's entries in the flat factor buffers ``U`` and ``V``
    (a dense block: ``h w`` entries of ``U``; a factor pair: ``h r`` of ``U``, ``w r`` of
    ``V``), plus one last pair: the buffers' lengths. ``K + 1`` pairs."""
    out = [(0, 0)]
    for h, w, r, d in zip(row_width, col_width, ranks, is_dense, strict=True):
        u, v = out[-1]
        out.append((u + h * w, v) if d else (u + h * r, v + w * r))
    return out


def build_plan(
    shape: tuple[int, int],
    row_start: list[int],
    row_width: list[int],
    col_start: list[int],
    col_width: list[int],
    ranks: list[int],
    is_dense: list[bool],
    *,
    tiles: tuple[int, int] | None = None,
    bucket_cost: float = BUCKET_COST,
    row_form: bool = False,
    wide_share: float = WIDE_SHARE,
) -> GBLRPlan:
    """Build the plan of a GBLR structure (plain Python lists of length K).

    The flat buffers follow :meth:`GBLR._tensors`: component ``k`` owns ``U[uo:uo+h*r]``
    (``(h, r)`` row-major, or its dense ``(h, w)`` block) and ``V[vo:vo+w*r]`` (``(w, r)``).
    ``tiles=(T1, T2)`` fixes the tile sizes (default: the candidate in :data:`TILES` with the
    fewest padded MACs, per stage). ``bucket_cost`` prices one more ``bmm`` call in
    multiply-adds per product column. ``row_form=True`` packs the panels for thin products
    (:attr:`GBLRPlan.row_form`); results are the same either way. A slot whose interval
    covers at least ``wide_share`` of a side runs in that stage's dense GEMM (``wide_share >
    1``: never).
    Cost: ``O(S (w / T + 1) + tiles^2)`` integer work for ``S`` slots, done once.
    """
    m, n = shape
    # stage-1 slots (factored components): column interval, v = V[vo + t*r + j]
    c_start, c_width, c_val = [], [], []
    # stage-2 slots: row interval, u entries, source row of [Z; 0; X]
    r_start, r_width, r_val, r_src = [], [], [], []
    offs = factor_offsets(row_width, col_width, ranks, is_dense)
    flops = 0
    for k in range(len(ranks)):
        h, w, r = row_width[k], col_width[k], ranks[k]
        uo, vo = offs[k]
        if is_dense[k]:
            if h and w:  # column j of the block: a stage-2 slot reading X row cs + j
                for j in range(w):
                    r_start.append(row_start[k])
                    r_width.append(h)
                    r_val.append((uo, j, w))
                    r_src.append(-1 - (col_start[k] + j) % n)
                flops += h * w
            continue
        if h and w:
            for j in range(r):
                r_src.append(len(c_start))
                c_start.append(col_start[k])
                c_width.append(w)
                c_val.append((vo, j, r))
                r_start.append(row_start[k])
                r_width.append(h)
                r_val.append((uo, j, r))
            flops += r * (h + w)
    uo, vo = offs[-1]  # the buffers' lengths: the index of the zero appended to each
    S = len(c_start)
    # ---- wide slots leave the tiles of the stage they span (WIDE_SHARE); renumber the slots
    # as [wide in stage 1 only, wide in both, wide in stage 2 only, narrow] so that each
    # stage's wide slots are one contiguous range of rows of Z
    r_of = {src: j for j, src in enumerate(r_src) if src >= 0}
    w1 = [c_width[i] >= wide_share * n for i in range(S)]
    w2 = [r_width[r_of[i]] >= wide_share * m for i in range(S)]
    group = [(1 if w2[i] else 0) if w1[i] else (2 if w2[i] else 3) for i in range(S)]
    old_of = sorted(range(S), key=group.__getitem__)  # (stable: slot order within a group)
    new_id = [0] * S
    for new, old in enumerate(old_of):
        new_id[old] = new
    c_start, c_width, c_val = ([lst[i] for i in old_of] for lst in (c_start, c_width, c_val))
    r_src = [new_id[src] if src >= 0 else src for src in r_src]
    wide1 = group.count(0) + group.count(1)
    wide2 = (group.count(0), group.count(1) + group.count(2))
    wide_v = wide_u = None
    if wide1:
        vidx = torch.full((wide1, n), vo, dtype=torch.long)  # vo: the appended zero
        for i in range(wide1):
            cols = (c_start[i] + torch.arange(c_width[i])) % n
            vidx[i, cols] = _value_index(c_val[i], 0, c_width[i])
        wide_v = vidx.reshape(-1)
    narrow_r = [j for j, src in enumerate(r_src) if not (wide2[0] <= src < sum(wide2))]
    if wide2[1]:
        uidx = torch.full((m, wide2[1]), uo, dtype=torch.long)  # uo: the appended zero
        for j, src in enumerate(r_src):
            if wide2[0] <= src < sum(wide2):
                rows_ = (r_start[j] + torch.arange(r_width[j])) % m
                uidx[rows_, src - wide2[0]] = _value_index(r_val[j], 0, r_width[j])
        wide_u = uidx.reshape(-1)
    padded = wide1 * n + wide2[1] * m
    c_start, c_width, c_val = c_start[wide1:], c_width[wide1:], c_val[wide1:]
    r_start, r_width, r_val, r_src = (
        [lst[j] for j in narrow_r] for lst in (r_start, r_width, r_val, r_src)
    )
    skip2 = not narrow_r and wide2[1] > 0  # every stage-2 slot is wide: no tiles at all

    T1 = tiles[0] if tiles else _best_tile(c_start, c_width, n, TILES, bucket_cost)
    T2 = tiles[1] if tiles else _best_tile(r_start, r_width, m, TILES, bucket_cost)

    # ---- stage 1: column tiles, (M, T1) panels of V entries (narrow slots wide1 .. S-1)
    lines1, buckets1 = (
        _stage(c_start, c_width, n, T1, bucket_cost) if c_start else ([], [])
    )
    stage1: list[_Bucket] = []
    xg, zi = [], []
    for M, ids in buckets1:
        ids = sorted(ids)  # tile order: a single bucket then needs no reordering
        G = len(ids)
        vidx = torch.full((G, M, T1), vo, dtype=torch.long)  # vo: the appended zero
        zidx = torch.full((G, M), S, dtype=torch.long)  # S: a scratch row for padding
        for g, tid in enumerate(ids):
            xg.append((tid * T1 + torch.arange(T1)) % n)
            for a, (i, runs) in enumerate(lines1[tid]):
                zidx[g, a] = wide1 + i
                for _, p0, t0, length in runs:
                    vidx[g, a, p0 : p0 + length] = _value_index(c_val[i], t0, length)
        stage1.append(_Bucket(G, M, T1, vidx.reshape(-1)))
        zi.append(zidx.reshape(-1))
        padded += G * M * T1

    # ---- stage 2: row tiles, (T2, M) panels of U entries, reading rows of [Z; 0; X]
    lines2, buckets2 = ([], []) if skip2 else _stage(r_start, r_width, m, T2, bucket_cost)
    stage2: list[_Bucket] = []
    zg, order = [], []
    for M, ids in buckets2:
        ids = sorted(ids)
        G = len(ids)
        uidx = torch.full((G, T2, M), uo, dtype=torch.long)  # uo: the appended zero
        sidx = torch.full((G, M), S, dtype=torch.long)  # padding reads the zero scratch row
        for g, tid in enumerate(ids):
            order.append(tid)
            for a, (i, runs) in enumerate(lines2[tid]):
                src = r_src[i]
                sidx[g, a] = src if src >= 0 else S + 1 + (-1 - src)
                for _, p0, t0, length in runs:
                    uidx[g, p0 : p0 + length, a] = _value_index(r_val[i], t0, length)
        stage2.append(_Bucket(G, T2, M, uidx.reshape(-1)))
        zg.append(sidx.reshape(-1))
        padded += G * T2 * M
    # stage-2 outputs come bucket by bucket; y_order puts tile rows back in place
    empty = torch.zeros(0, dtype=torch.long)
    rows = torch.cat([t * T2 + torch.arange(T2) for t in order]) if order else empty
    y_order = None if bool((rows == torch.arange(rows.numel())).all()) else torch.argsort(rows)
    x_gather = torch.cat(xg) if xg else empty
    if x_gather.numel() == n and bool((x_gather == torch.arange(n)).all()):
        x_gather = None  # the tiles read X in order: stage 1 runs on views of X
    z_gather = torch.cat(zg) if zg else empty
    return GBLRPlan(
        (m, n),
        S,
        (T1, T2),
        stage1,
        stage2,
        x_gather,
        torch.cat(zi) if zi else empty,
        z_gather,
        y_order,
        padded,
        flops,
        bool((z_gather > S).any()),
        row_form,
        wide1,
        wide2,
        wide_v,
        wide_u,
    )


# ------------------------------------------------------------------ segment plans
#: Equal column intervals side by side (a tile grid's block columns) run stage 1 as one
#: ``bmm`` over panels zero-padded to the run's most slots, when the real multiply-adds fill
#: at least this share of the padded ones. One launch and two views replace two slices, a
#: transpose and a GEMM per interval: on the 64-grid MiniLM layouts at 51 columns (one
#: sentence) the per-interval Python and dispatch work was about half of the product time
#: (measured 1.55 -> 1.29 of the dense time on a 384 x 384 layer, 1.42 -> 1.21 on 384 x 1536;
#: unchanged at 256-1024 columns). The same runs in stage 2 (row intervals, panels padded to
#: the most operand rows, accumulated into strided views of a batch-major result) were
#: slower at every size measured, so stage 2 keeps one GEMM per row interval.
RUN_FILL = 0.5
#: Column blocks of a segment product: at least ``SEGMENT_CHUNK`` columns, more while the
#: intermediates (``[Z; X]`` and the gathered rows, in the thread's scratch buffer) stay
#: under ``SEGMENT_CHUNK_FLOATS`` floats (1 MiB). MiniLM 64-grid layouts at 50 %, layer forward /
#: ``nn.Linear``, one thread, 2-core Intel Xeon host, at 1024 / 2048 rows (a batch of 16 / 32
#: sentences): one block in freshly allocated buffers 1.48 / 1.59 (384 x 384), 1.89 / 2.01
#: (1536 x 384), 0.99 / 1.18 (384 x 1536); 256-column blocks in scratch 0.98 / 0.97,
#: 0.95 / 0.99, 0.89 / 0.90 (docs/benchmarks.md). Up to 256 rows: one block, as before.
#: 2 MiB -> 1 MiB (sixteenth session): the 128-grid layouts, with half the intermediates per
#: column, ran 960 rows of a 384 x 384 layer as one block whose operands and result (4.4 MiB
#: with the intermediates) left the cache: 1.65 -> 1.04 of ``nn.Linear``; the other MiniLM
#: layers at 512-3232 rows equal or up to 15 % faster.
SEGMENT_CHUNK = 256
SEGMENT_CHUNK_FLOATS = 1 << 18
#: A one-block segment product whose intermediates exceed this many floats (2 MiB) keeps
#: them in the thread's scratch buffer too: fresh ones page-faulted in some processes
#: (MiniLM 1536 x 384 64-grid layer at 256 rows, 0.86 M floats: 2.0-2.1 of ``nn.Linear``
#: against 0.87-0.99 in others, 0.94-0.96 in scratch). Smaller ones stay fresh (at 128
#: rows, 0.43 M floats, scratch was 5-10 % slower).
SEGMENT_FRESH_FLOATS = 1 << 19


@dataclass
class _Segment:
    """One GEMM on contiguous slices: ``out[o : o + rows] (+)= P @ src[s : s + len]``.

    ``value_index`` gathers the panel from a padded flat factor buffer, shape ``shape``
    (stage 1: ``(length, rows)``, transposed by :meth:`GBLRSegments.pack`; stage 2:
    ``(rows, length)``); ``accumulate`` adds into the output instead of writing it.
    A stage-1 *run* (``count > 0``) is ``count`` such GEMMs on equal column intervals side
    by side, one ``bmm``: ``out[o : o + count rows]`` viewed ``(count, rows, B)`` = ``P`` of
    shape ``(count, rows, length)`` (``V`` panels, transposed and zero-padded to equal slot
    counts) times ``src[s : s + count length]`` viewed ``(count, length, B)``.
    """

    src: int
    length: int
    out: int
    rows: int
    accumulate: bool
    shape: tuple[int, ...]
    value_index: torch.Tensor
    count: int = 0

    @property
    def count_or_1(self) -> int:
        """GEMMs in this segment (1 unless a run)."""
        return self.count or 1


@dataclass
class GBLRSegments:
    """A GBLR product as a few real GEMMs over contiguous slices (aligned layouts).

    Components are grouped by interval instead of cut into tiles:

    1. ``Z = V^T X``: one GEMM per distinct column interval of the factored components,
       ``Z[slots of the group] = [V_1 .. V_J]^T X[c0 : c0 + w]`` (a wrapping interval is two
       GEMMs), written in place into ``Z``;
    2. ``Y = U Z``: one GEMM per distinct row interval of all components,
       ``Y[r0 : r0 + h] += [U_1 .. U_J | D_1 ..] [Z rows; X rows]`` after a single gather of
       each group's input rows (slots of its factored members, ``X`` rows of its dense blocks).

    Equal column intervals side by side (the block columns of a tile grid) form *runs* in
    stage 1: one ``bmm`` per run over zero-padded panels (:data:`RUN_FILL`; their padding
    rows of ``Z`` are never read). Equal row intervals one under the other (the block rows)
    form runs in stage 2 the same way, their gathered operands padded with a zeroed last
    row of ``[Z; X]`` (``zero_row``). Otherwise no padding and no partial sums; the row
    traffic is one gather of ``gathered`` rows. ``len(stage1) + len(stage2) +
    3`` kernel launches, so it pays off for layouts with few distinct intervals
    (:func:`build_segments` returns ``None`` past ``max_segments``). Used for products
    without autograd; the tiled plan serves gradients.
    """

    shape: tuple[int, int]
    slots: int
    stage1: list[_Segment]
    stage2: list[_Segment]
    gather: torch.Tensor | None  # rows of [Z; X] read by stage 2 (None: Z itself, in order)
    padded_macs: int
    flops: int
    reads_x: bool = True
    zero_row: bool = False  # [Z; X] ends in a zeroed row (read by stage-2 run padding)

    @property
    def fill(self) -> float:
        return self.flops / self.padded_macs if self.padded_macs else 1.0

    @property
    def gathered(self) -> int:
        """Rows copied by the gather between the stages (0 when stage 2 reads ``Z``)."""
        return 0 if self.gather is None else int(self.gather.numel())

    def to(self, device: torch.device) -> GBLRSegments:
        def mv(s: _Segment) -> _Segment:
            return _Segment(
                s.src, s.length, s.out, s.rows, s.accumulate, s.shape,
                s.value_index.to(device), s.count,
            )

        return GBLRSegments(
            self.shape,
            self.slots,
            [mv(s) for s in self.stage1],
            [mv(s) for s in self.stage2],
            None if self.gather is None else self.gather.to(device),
            self.padded_macs,
            self.flops,
            self.reads_x,
            self.zero_row,
        )

    def pack(
        self, U: torch.Tensor, V: torch.Tensor
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Panels: ``(rows, length)`` blocks of ``V^T`` (stage 1; runs ``(count, rows,
        length)``), ``(rows, length)`` of ``U`` (stage 2; runs ``(count, rows, length)``).

        Single-GEMM panels are stored in the orientation MKL multiplies fastest here: stage 1
        row-major (``V`` blocks transposed), stage 2 column-major (a transposed view of a
        contiguous ``(length, rows)`` block). Against the other orientation, at 51 columns
        (one sentence) 11-26 % less time per stage-1 GEMM and 11-19 % per stage-2 GEMM on
        batch-major operands, 0-10 % at 256 columns, never slower (docs/benchmarks.md,
        fourteenth session).
        """
        zero = U.new_zeros(1)
        Vz = torch.cat([V.reshape(-1), zero])
        Uz = torch.cat([U.reshape(-1), zero])
        p1 = [Vz[s.value_index].view(s.shape) if s.count else
              Vz[s.value_index].view(s.shape).T.contiguous() for s in self.stage1]
        p2 = [Uz[s.value_index].view(s.shape) if s.count else
              Uz[s.value_index].view(s.shape).T.contiguous().T for s in self.stage2]
        return p1, p2

    def matmul(
        self,
        panels: tuple[list[torch.Tensor], list[torch.Tensor]],
        X: torch.Tensor,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``A @ X`` (``+ bias[:, None]`` with a ``bias`` of shape ``(m,)``: added by the
        first stage-2 GEMM, not in a pass of its own) for ``X`` of shape ``(n, k)`` (no
        autograd: in-place GEMMs).

        When ``X`` is the transpose of a row-major ``(k, n)`` operand (``X.stride(0) == 1``:
        ``StructuredLinear`` on batch-major inputs, ``X @ A``), the result is the transpose
        of a row-major ``(k, m)`` tensor too: the stage-2 GEMMs write it in that layout, so
        callers that need ``(k, m)`` row-major get it without a transposing copy (measured
        at 51 rows: 40-100 us, 15-20 % of the dense product of a 384-wide layer).

        Past :data:`SEGMENT_CHUNK_FLOATS` floats of intermediates, column blocks (written into
        the result in place) keep them in cache between the stages.
        """
        B = X.shape[1]
        m = self.shape[0]
        batch_major = X.stride(0) == 1 and B > 1
        Y = X.new_empty(B, m).T if batch_major else X.new_empty(m, B)
        if B == 0:
            return Y
        per_column = self.slots + (self.shape[1] if self.reads_x else 0) + self.gathered
        step = balanced_step(B, max(SEGMENT_CHUNK, SEGMENT_CHUNK_FLOATS // max(per_column, 1)))
        # one small block: fresh buffers (measured faster at 51 columns); several blocks, or
        # one past SEGMENT_FRESH_FLOATS: the scratch buffer
        blocks = step < B or per_column * B > SEGMENT_FRESH_FLOATS
        for a in range(0, B, step):
            self._matmul_columns(panels, X[:, a : a + step], bias, Y[:, a : a + step], blocks)
        return Y

    def _matmul_columns(
        self,
        panels: tuple[list[torch.Tensor], list[torch.Tensor]],
        X: torch.Tensor,
        bias: torch.Tensor | None,
        Y: torch.Tensor,
        in_scratch: bool = False,
    ) -> None:
        """:meth:`matmul` of the columns ``X`` (n, c), written into ``Y`` (m, c).

        With ``in_scratch``, ``[Z; X]`` and the gathered stage-2 operand are views of this
        thread's scratch buffer on the CPU (:func:`~gblr_approx.formats.base.scratch`: no
        page faults per column block), each starting on a 64-byte boundary.
        """
        p1, p2 = panels
        B = X.shape[1]
        n = self.shape[1]
        S = self.slots
        zx_rows = S + (n if self.reads_x else 0) + self.zero_row
        g_at = -(-zx_rows * B // 16) * 16  # (floats: the gathered rows start 64-byte aligned)
        buf = scratch(g_at + self.gathered * B, X) if in_scratch else None
        ZX = X.new_empty(zx_rows, B) if buf is None else buf[: zx_rows * B].view(zx_rows, B)
        if self.reads_x:  # dense blocks read rows of X after the slots
            ZX[S : S + n].copy_(X)
        if self.zero_row:  # (read by the padding of stage-2 runs)
            ZX[-1].zero_()
        Z = ZX[:S]
        for s, P in zip(self.stage1, p1, strict=True):
            if s.count:
                c = s.count
                src = X[s.src : s.src + c * s.length].unflatten(0, (c, s.length))
                torch.bmm(P, src, out=Z[s.out : s.out + c * s.rows].unflatten(0, (c, s.rows)))
                continue
            out = Z[s.out : s.out + s.rows]
            src = X[s.src : s.src + s.length]
            if s.accumulate:
                out.addmm_(P, src)
            else:
                torch.mm(P, src, out=out)
        if self.gather is None:
            G = ZX
        else:
            G = _rows(ZX, self.gather, None if buf is None else (
                buf[g_at : g_at + self.gathered * B].view(self.gathered, B)))
        m = self.shape[0]
        if self.stage2 and not self.stage2[0].accumulate:  # first segment covers every row
            s, P = self.stage2[0], p2[0]
            if bias is None:
                torch.mm(P, G[s.src : s.src + s.length], out=Y)
            else:
                torch.addmm(bias.unsqueeze(1), P, G[s.src : s.src + s.length], out=Y)
            rest = zip(self.stage2[1:], p2[1:], strict=True)
        else:
            if bias is None:
                Y.zero_()
            else:
                Y.copy_(bias.unsqueeze(1).expand(m, B))
            rest = zip(self.stage2, p2, strict=True)
        splits = self._stage2_splits(G.shape[0])
        if splits is None:
            for s, P in rest:
                _stage2_gemm(s, P, G[s.src : s.src + s.count_or_1 * s.length],
                             Y[s.out : s.out + s.count_or_1 * s.rows])
            return
        # ordered, disjoint row intervals: all operand and output views in two split calls
        # (one slice per segment cost ~1 us each; 6-24 segments on the MiniLM layouts)
        g_sizes, g_pick, y_sizes, y_pick = splits
        gs, ys = G.split_with_sizes(g_sizes), Y.split_with_sizes(y_sizes)
        for (s, P), gi, yi in zip(rest, g_pick, y_pick, strict=True):
            _stage2_gemm(s, P, gs[gi], ys[yi])

    def _stage2_splits(self, g_rows: int) -> tuple[list[int], ...] | None:
        """Split sizes of the stage-2 operand (``g_rows`` rows) and of the result for the
        accumulating stage-2 segments, with the piece each segment reads and writes, or
        ``None`` when their source or output intervals are not ordered and disjoint."""
        key = ("_splits2", g_rows)
        cache = self.__dict__.setdefault("_split_cache", {})
        if key not in cache:
            rest = self.stage2[1:] if self.stage2 and not self.stage2[0].accumulate else (
                self.stage2)
            g = _ordered_split([(s.src, s.count_or_1 * s.length) for s in rest], g_rows)
            y = _ordered_split([(s.out, s.count_or_1 * s.rows) for s in rest], self.shape[0])
            cache[key] = None if g is None or y is None else (*g, *y)
        return cache[key]


def _stage2_gemm(s: _Segment, P: torch.Tensor, G: torch.Tensor, Y: torch.Tensor) -> None:
    """``Y += P @ G`` for one accumulating stage-2 segment: ``G`` its operand rows
    ``(length, B)`` (a run: ``(count length, B)``), ``Y`` its output rows. A run is one
    ``bmm``: into the rows in place for a feature-major ``Y``; for the transposed view of a
    row-major result (``Y.stride(0) == 1``: batch-major products) in row form, ``(count, B,
    rows)`` into a fresh tensor then added (``bmm`` into the strided rows in place runs one
    GEMM per block; the row form measured 10-15 % faster per MiniLM layer at 51 rows)."""
    if not s.count:
        Y.addmm_(P, G)
        return
    c, B = s.count, G.shape[1]
    Gr = G.view(c, s.length, B)
    if Y.stride(0) == 1 and B > 1:
        Z = torch.bmm(Gr.transpose(1, 2), P.transpose(1, 2))  # (c, B, rows)
        Y.T.view(B, c, s.rows).add_(Z.transpose(0, 1))
    else:
        Y.view(c, s.rows, B).baddbmm_(P, Gr)


def _ordered_split(
    ranges: list[tuple[int, int]], total: int
) -> tuple[list[int], list[int]] | None:
    """``(sizes, pick)`` with ``torch.split_with_sizes(sizes)`` cutting ``[0, total)`` so that
    piece ``pick[i]`` is ``ranges[i]`` (start, length); ``None`` unless the ranges are in
    increasing order and disjoint."""
    sizes: list[int] = []
    pick: list[int] = []
    at = 0
    for a, length in ranges:
        if a < at:
            return None
        if a > at:
            sizes.append(a - at)
        pick.append(len(sizes))
        sizes.append(length)
        at = a + length
    if at > total:
        return None
    if at < total:
        sizes.append(total - at)
    return sizes, pick


def _runs(
    groups: list[tuple[int, int]], side: int, size: dict[tuple[int, int], int]
) -> list[list[tuple[int, int]]]:
    """Column intervals ``(start, width)`` cut into runs: chains of equal, non-wrapping
    intervals side by side (``start_{j+1} = start_j + width``) whose slot counts, padded to
    the run's largest, are filled at least :data:`RUN_FILL` (greedy longest prefixes);
    every other interval is a run of one. Runs are ordered by their first interval."""
    chains: list[list[tuple[int, int]]] = []
    last: dict[int, list[tuple[int, int]]] = {}  # the open chain of each width
    for g in sorted(groups, key=lambda g: (g[1], g[0])):
        s, w = g
        chain = last.get(w)
        if chain is not None and chain[-1][0] + w == s and s + w <= side:
            chain.append(g)
        else:
            chain = [g]
            chains.append(chain)
            if s + w <= side:
                last[w] = chain
            else:  # (a wrapping interval runs alone)
                last.pop(w, None)
    runs: list[list[tuple[int, int]]] = []
    for chain in chains:
        at = 0
        while at < len(chain):  # longest prefix that fills enough, at least one interval
            end = at + 1
            for e in range(len(chain), at + 1, -1):
                part = [size[g] for g in chain[at:e]]
                if sum(part) >= RUN_FILL * len(part) * max(part):
                    end = e
                    break
            runs.append(chain[at:end])
            at = end
    order = {g: i for i, g in enumerate(groups)}
    runs.sort(key=lambda r: order[r[0]])
    return runs


def build_segments(
    shape: tuple[int, int],
    row_start: list[int],
    row_width: list[int],
    col_start: list[int],
    col_width: list[int],
    ranks: list[int],
    is_dense: list[bool],
    *,
    max_segments: int = 48,
    runs: bool = True,
) -> GBLRSegments | None:
    """The segment plan of a GBLR structure, or ``None`` when it needs more than
    ``max_segments`` GEMMs (many distinct intervals: the tiled plan is then faster; the
    count is taken before runs are formed).

    Same flat-buffer layout as :func:`build_plan`. ``runs=False`` gives one GEMM per column
    interval (no stage-1 runs, no padding). ``O(sum_k r_k (h_k + w_k))`` index work.
    """
    m, n = shape
    K = len(ranks)
    offs = factor_offsets(row_width, col_width, ranks, is_dense)
    live = [k for k in range(K) if row_width[k] and col_width[k] and (is_dense[k] or ranks[k])]
    by_col: dict[tuple[int, int], list[int]] = {}
    by_row: dict[tuple[int, int], list[int]] = {}
    for k in live:
        if not is_dense[k]:
            by_col.setdefault((col_start[k], col_width[k]), []).append(k)
        by_row.setdefault((row_start[k], row_width[k]), []).append(k)

    def wraps(s: int, w: int, side: int) -> int:
        return 2 if s + w > side else 1

    count = sum(wraps(s, w, n) for s, w in by_col) + sum(wraps(s, h, m) for s, h in by_row)
    if count > max_segments:
        return None

    slots_of = {g: sum(ranks[k] for k in ks) for g, ks in by_col.items()}
    col_runs = _runs(list(by_col), n, slots_of) if runs else [[g] for g in by_col]
    padded = 0

    # stage 1: slots grouped by column interval; V panel (w, R) gathered from V's buffer
    stage1: list[_Segment] = []
    slot_of: dict[int, int] = {}
    S = 0
    for run in col_runs:
        big = max(slots_of[g] for g in run)
        panels = []
        for c0, w in run:
            ks = by_col[(c0, w)]
            cols = []
            at = S
            for k in ks:
                r, v0 = ranks[k], offs[k][1]
                slot_of[k] = at
                at += r
                cols.append(v0 + torch.arange(w)[:, None] * r + torch.arange(r)[None, :])
            idx = torch.cat(cols, 1)  # (w, R)
            if len(run) == 1:
                R = idx.shape[1]
                first = min(w, n - c0)
                stage1.append(
                    _Segment(c0, first, S, R, False, (first, R), idx[:first].reshape(-1))
                )
                if first < w:
                    rest = w - first
                    stage1.append(
                        _Segment(0, rest, S, R, True, (rest, R), idx[first:].reshape(-1))
                    )
                S += R
            else:
                pad = torch.full((w, big - idx.shape[1]), -1, dtype=idx.dtype)
                panels.append(torch.cat([idx, pad], 1).T)  # (big, w)
                S += big
        if len(run) > 1:
            c0, w = run[0]
            idx = torch.stack(panels)  # (count, big, w); -1: padding
            stage1.append(
                _Segment(c0, w, S - len(run) * big, big, False, tuple(idx.shape),
                         idx.reshape(-1), len(run))
            )
            padded += (len(run) * big - sum(slots_of[g] for g in run)) * w
    zero_v = offs[-1][1]  # padding reads the zero that pack() appends to V's flat buffer
    for sg in stage1:
        sg.value_index[sg.value_index < 0] = zero_v
    # stage 2: groups by row interval; inputs = slots (rows of Z) and X rows (dense blocks)
    stage2: list[_Segment] = []
    gather = []
    at = 0
    for (r0, h), ks in by_row.items():
        src, cols = [], []
        for k in ks:
            u0 = offs[k][0]
            if is_dense[k]:
                w = col_width[k]
                src.append(S + (col_start[k] + torch.arange(w)) % n)
                cols.append(u0 + torch.arange(h)[:, None] * w + torch.arange(w)[None, :])
            else:
                r = ranks[k]
                src.append(slot_of[k] + torch.arange(r))
                cols.append(u0 + torch.arange(h)[:, None] * r + torch.arange(r)[None, :])
        rows = torch.cat(src)
        idx = torch.cat(cols, 1)  # (h, M)
        M = rows.numel()
        gather.append(rows)
        first = min(h, m - r0)
        stage2.append(_Segment(at, M, r0, first, True, (first, M), idx[:first].reshape(-1)))
        if first < h:
            rest = h - first
            stage2.append(_Segment(at, M, 0, rest, True, (rest, M), idx[first:].reshape(-1)))
        at += M
    flops = sum(
        row_width[k] * col_width[k] if is_dense[k] else ranks[k] * (row_width[k] + col_width[k])
        for k in live
    )
    reads_x = any(bool((p >= S).any()) for p in gather)
    zero_row = False
    if runs:
        stage2, gather, pad2 = _stage2_runs(stage2, gather, S + (n if reads_x else 0), offs[-1][0])
        padded += pad2
        zero_row = pad2 > 0
    g = torch.cat(gather) if gather else torch.zeros(0, dtype=torch.long)
    if not reads_x and g.numel() == S and bool((g == torch.arange(S)).all()):
        g = None  # stage 2 reads Z in order
    full = [i for i, sg in enumerate(stage2) if sg.out == 0 and sg.rows == m]
    if full:  # a segment that writes every output row goes first, without zero-filling
        sg = stage2.pop(full[0])
        sg.accumulate = False
        stage2.insert(0, sg)
    return GBLRSegments((m, n), S, stage1, stage2, g, flops + padded, flops, reads_x, zero_row)


def _stage2_runs(
    stage2: list[_Segment], gather: list[torch.Tensor], zero_row: int, zero_u: int
) -> tuple[list[_Segment], list[torch.Tensor], int]:
    """Stage-2 segments of equal height on adjacent row intervals (a tile grid's block rows)
    joined into runs: one ``bmm`` per run, each member's operand rows padded to the run's
    longest with ``zero_row`` (a zeroed row of ``[Z; X; 0]``) and its ``U`` panel with
    ``zero_u`` (the zero that ``pack()`` appends to ``U``'s flat buffer), filled at least
    :data:`RUN_FILL` as stage 1's runs. ``gather`` holds the operand rows of each segment
    in order (wrapping pairs share theirs and stay single). Returns the segments, their
    gather pieces and the padded MACs added."""
    at, piece_of = 0, {}
    for i, p in enumerate(gather):
        piece_of[at] = i
        at += p.numel()
    uses: dict[int, int] = {}
    for sg in stage2:
        uses[sg.src] = uses.get(sg.src, 0) + 1
    free = [sg for sg in stage2 if sg.accumulate and uses[sg.src] == 1]
    chains: list[list[_Segment]] = []
    for sg in sorted(free, key=lambda sg: (sg.rows, sg.out)):
        c = chains[-1] if chains else None
        if c is not None and c[-1].rows == sg.rows and c[-1].out + sg.rows == sg.out:
            c.append(sg)
        else:
            chains.append([sg])
    run_of: dict[int, list[_Segment]] = {}  # id of a run's first member -> the run
    in_run: set[int] = set()
    for chain in chains:
        i = 0
        while i < len(chain):
            end = i + 1
            for e in range(len(chain), i + 1, -1):
                lengths = [sg.length for sg in chain[i:e]]
                if sum(lengths) >= RUN_FILL * len(lengths) * max(lengths):
                    end = e
                    break
            if end - i > 1:
                run_of[id(chain[i])] = chain[i:end]
                in_run.update(id(sg) for sg in chain[i:end])
            i = end
    out: list[_Segment] = []
    pieces: list[torch.Tensor] = []
    new_src: dict[int, int] = {}  # old src -> new src (wrapping pairs share one piece)
    at = padded = 0
    for sg in stage2:
        if id(sg) in in_run:
            run = run_of.get(id(sg))
            if run is None:
                continue
            L, h = max(r.length for r in run), sg.rows
            rows, idx = [], []
            for r in run:
                p = gather[piece_of[r.src]]
                rows.append(torch.cat([p, p.new_full((L - r.length,), zero_row)]))
                v = r.value_index.view(h, r.length)
                idx.append(torch.cat([v, v.new_full((h, L - r.length), zero_u)], 1))
            pieces.append(torch.cat(rows))
            out.append(_Segment(at, L, sg.out, h, True, (len(run), h, L),
                                torch.stack(idx).reshape(-1), len(run)))
            padded += (len(run) * L - sum(r.length for r in run)) * h
            at += len(run) * L
            continue
        if sg.src not in new_src:
            new_src[sg.src] = at
            pieces.append(gather[piece_of[sg.src]])
            at += sg.length
        out.append(_Segment(new_src[sg.src], sg.length, sg.out, sg.rows, sg.accumulate,
                            sg.shape, sg.value_index, sg.count))
    return out, pieces, padded
