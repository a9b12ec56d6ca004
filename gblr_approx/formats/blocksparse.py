"""Block-sparse matrices on a regular grid, and their projection (keep the heaviest blocks)."""

from __future__ import annotations

import itertools
import math
import weakref
from typing import Any

import torch

from ..budget import InfeasibleBudgetError
from ..validation import check_pair
from .base import (
    ROW_FORM_BELOW,
    StructuredMatrix,
    balanced_step,
    batch_major,
    cached_layout,
    check_factors,
    plan_building,
    register_format,
    scale_invariant,
)

__all__ = ["BlockSparse", "block_rectangles", "grid_sizes", "default_block_shape"]

#: Largest default block side: the default block shape of an ``m x n`` matrix is
#: :func:`default_block_shape`, ``(32, 32)`` whenever both sides are at least 128.
DEFAULT_BLOCK_SHAPE = (32, 32)


def default_block_shape(m: int, n: int) -> tuple[int, int]:
    """The default block shape of an ``m x n`` matrix: ``min(32, max(1, side // 4))`` per side.

    ``(32, 32)`` for sides of 128 and more; smaller matrices get a grid of at least 4 x 4
    blocks (per side of at least 4), so every budget down to one block is feasible (the old
    default, ``(32, 32)`` clipped to the matrix, made a matrix with both sides <= 32 a single
    block, and every budget below dense infeasible).
    """
    return (min(DEFAULT_BLOCK_SHAPE[0], max(1, int(m) // 4)),
            min(DEFAULT_BLOCK_SHAPE[1], max(1, int(n) // 4)))

#: (id(block_rows), id(block_cols), grid) -> (weak refs, versions, plans): rebuilding a matrix
#: from the same, unchanged index tensors (``StructuredLinear`` does it every forward) skips
#: validation and planning. Identity is checked through the weak references.
_PLANS: dict[tuple, tuple] = {}
_PLANS_MAX = 256

#: Floats of gathered input slabs per chunk of the large-``k`` product (256 KiB of float32: the
#: gathered operand stays in L2 for its GEMM).
GATHER_CHUNK = 1 << 16

#: Largest ``grid * nb`` for which a mat-vec sums block outputs with a 0/1 matrix product.
SCATTER_MATRIX_MAX = 1 << 16

#: Products of at least this many columns (no autograd) run in *rectangle form*: the stored
#: blocks cut into rectangles of adjacent blocks, one in-place GEMM per rectangle on slices of
#: ``X`` and of the result (no gather, no scatter, no copy). Below it the rectangle form runs
#: only when it needs few GEMMs (:data:`RECT_PER_GROUP_CALL`). Measured interleaved on the
#: MiniLM layers at 25 % / 50 % (one thread, benchmarks/matmul.py): efficiency at 256 columns
#: 0.43-0.66 -> 0.71-0.96 feature-major and 0.35-0.72 -> 0.54-0.82 batch-major; at 96-128
#: columns rectangle and row form tie on layers with 50-95 rectangles.
RECT_FORM_FROM = 128
#: Batch-major products without autograd with this many rows (inclusive) take the gathered
#: row form into fresh outputs (one ``bmm`` per group, one ``cat``, one ``index_select``:
#: :meth:`BlockSparse._fresh_rows`) before the rectangle form and the in-place row form,
#: whose GEMMs write strided slices. MiniLM layers at 50 %, 51 rows, on a 2-core Intel Xeon
#: host (MKL, one thread), layer forward / ``nn.Linear``: 384 x 384 1.56 -> 1.47, 1536 x 384
#: 1.36 -> 1.24, 384 x 1536 1.30 -> 1.05 (at 25 %: 1.15 -> 0.98, 1.00 -> 0.81, 0.78 -> 0.65).
#: From :data:`RECT_FORM_FROM` rows the rectangle form is faster on the 384 x 384 layouts.
FRESH_ROWS = (ROW_FORM_BELOW, RECT_FORM_FROM - 1)
#: Within :data:`FRESH_ROWS` the rectangle form runs instead of the fresh row form where it
#: needs at most one GEMM per this many rows. MiniLM layers at 50 % (one thread, layer
#: forward / ``nn.Linear``, both forms on transposed panels): 384 x 384 layouts with 6-21
#: rectangles at 100 rows 1.18-1.44 in rectangle form against 1.33-1.68 fresh, with 6 at 51
#: rows 1.11 against 1.42, with 12-21 at 51 rows a tie or a loss (up to 2.08 against 1.56);
#: the 1536-wide layouts (79-93 rectangles) lose at 100 rows (1.24-1.48 against 1.07-1.35).
RECT_ROWS_PER_GEMM = 5
#: Below :data:`RECT_FORM_FROM` columns the rectangle form runs when its GEMM count is at most
#: this many times the row form's kernel count (3 per group of block rows, 1 per full group):
#: 384x384 MiniLM layouts (9-13 rectangles) ran 1.1-1.45x faster in it from 32 columns on.
RECT_PER_GROUP_CALL = 1.5
#: The rectangle form needs at least this many blocks per rectangle on average. Scattered
#: layouts (random 4096x4096 at 25 %: 1.5 blocks per rectangle) ran slower in it than in the
#: gathered row form (efficiency at 256 columns 0.71 -> 0.62 feature-major, 0.54 -> 0.40
#: batch-major); MiniLM layouts have 2.25-6.
RECT_MIN_BLOCKS = 2.0


def grid_sizes(length: int, block: int) -> list[int]:
    """Sizes of the blocks cutting ``length`` into pieces of ``block`` (the last may be shorter)."""
    nb = math.ceil(length / block)
    return [min(block, length - i * block) for i in range(nb)]


def block_rectangles(occupied: torch.Tensor) -> list[tuple[int, int, int, int]]:
    """Cut the stored blocks of a grid into few rectangles of adjacent blocks.

    Greedy: every maximal run of stored blocks in a block row is extended down over the next
    block rows that store all of it; the same is done on the transposed grid, and the cut with
    fewer rectangles is returned. Parameters: ``occupied`` BoolTensor (gr, gc). Returns
    ``(i0, i1, j0, j1)`` block ranges (end exclusive) that partition the stored blocks.
    ``O(gr gc)`` host work.
    """

    def cut(occ: list[list[bool]]) -> list[tuple[int, int, int, int]]:
        gr, gc = len(occ), len(occ[0]) if occ else 0
        out = []
        for i in range(gr):
            j = 0
            while j < gc:
                if not occ[i][j]:
                    j += 1
                    continue
                j1 = j
                while j1 < gc and occ[i][j1]:
                    j1 += 1
                i1 = i + 1
                while i1 < gr and all(occ[i1][j:j1]):
                    i1 += 1
                for r in range(i, i1):
                    occ[r][j:j1] = [False] * (j1 - j)
                out.append((i, i1, j, j1))
                j = j1
        return out

    rows = cut(occupied.tolist())
    cols = [(i0, i1, j0, j1) for j0, j1, i0, i1 in cut(occupied.T.tolist())]
    return cols if len(cols) < len(rows) else rows


def _panel_plan(out_idx: torch.Tensor, in_idx: torch.Tensor, out_grid: int) -> dict[str, Any]:
    """Group the block rows (``out_idx``) by their number of stored blocks.

    The blocks of one block row side by side form a ``p x (c q)`` panel; block rows with the
    same count ``c`` are one batched GEMM. Returns the block order ``perm`` (LongTensor
    (nb,)), the groups ``(start, rows, c)`` as Python ints, each group's input slab indices
    and ``inv`` (out_grid,): the position of every block row in the concatenated group
    outputs (``len(order)`` = the zero slab for block rows without blocks).
    """
    dev = out_idx.device
    out_l, in_l = out_idx.tolist(), in_idx.tolist()
    per: list[list[int]] = [[] for _ in range(out_grid)]
    for b, i in enumerate(out_l):
        per[i].append(b)
    by_count: dict[int, list[int]] = {}
    for i, bl in enumerate(per):
        if bl:
            by_count.setdefault(len(bl), []).append(i)
    perm: list[int] = []
    order: list[int] = []
    groups = []
    for c in sorted(by_count):
        rows = by_count[c]
        groups.append((len(perm), len(rows), c))
        for i in rows:
            perm.extend(sorted(per[i], key=lambda b: in_l[b]))
            order.append(i)
    inv = [len(order)] * out_grid
    for pos, i in enumerate(order):
        inv[i] = pos
    perm_t = torch.tensor(perm, dtype=torch.long, device=dev)
    sizes = [g * c for _, g, c in groups]
    slabs = in_idx[perm_t] if perm else in_idx
    counts = [g for _, g, _ in groups]
    row_spans = list(zip([0, *itertools.accumulate(counts)], counts, strict=False))
    return {
        "perm": perm_t,
        "groups": groups,
        "sizes": sizes,
        "slabs": slabs,
        "inv": torch.tensor(inv, dtype=torch.long, device=dev),
        "empty": len(order) < out_grid,
        # per group: its input slabs and its block rows (for the in-place batched path)
        "group_slabs": list(slabs.split(sizes)) if perm else [],
        "group_rows": [
            torch.tensor(order[a : a + g], dtype=torch.long, device=dev) for a, g in row_spans
        ],
    }


class _RectProduct(torch.autograd.Function):
    """``A @ X`` (``t=1``: ``A^T @ X``) in rectangle form with its backward in rectangle form
    too: ``dX = A^T G`` (the transposed rectangle product) and one GEMM per rectangle for the
    blocks' gradient. Training through ``StructuredLinear`` gets the in-place kernels of
    inference instead of the gathered row form. First-order only (``once_differentiable``)."""

    @staticmethod
    def forward(ctx: Any, blocks: torch.Tensor, X: torch.Tensor, A: BlockSparse, t: int):
        ctx.save_for_backward(blocks, X)
        ctx.A, ctx.t = A, t
        return A._rect_form(t, X)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, G: torch.Tensor):
        _, X = ctx.saved_tensors  # (saving the blocks checks they are unchanged since)
        A, t = ctx.A, ctx.t
        d_blocks = A._rect_block_grad(t, X, G) if ctx.needs_input_grad[0] else None
        d_X = A._rect_form(1 - t, G) if ctx.needs_input_grad[1] else None
        return d_blocks, d_X, None, None


def _index_tensor(idx: Any, name: str, device: torch.device) -> torch.Tensor:
    """Block coordinates as a LongTensor on ``device``; non-integer values raise TypeError
    (``torch.as_tensor(.., dtype=long)`` would truncate 0.5 to 0). An integer tensor already
    there is returned as it is (the plan cache keys on its identity)."""
    t = idx if isinstance(idx, torch.Tensor) else torch.as_tensor(idx)
    if t.numel() and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
        raise TypeError(f"{name} must hold integers; got {t.dtype}")
    return t.to(device=device, dtype=torch.long)


@register_format
class BlockSparse(StructuredMatrix):
    """Block-sparse ``m x n`` matrix on a regular grid of ``br x bc`` blocks.

    Block ``(i, j)`` covers rows ``[i*br, min((i+1)*br, m))`` and columns
    ``[j*bc, min((j+1)*bc, n))``; when ``br`` does not divide ``m`` (or ``bc`` does not divide
    ``n``) the last block row (column) is shorter. Only the stored (non-zero) blocks are kept.

    Parameters
    ----------
    shape : (m, n)
    block_shape : (br, bc)
    block_rows, block_cols : LongTensor, shape (nb,)
        Grid coordinates of the stored blocks (no duplicates).
    blocks : Tensor, shape (nb, br, bc)
        Block contents; entries of edge blocks that fall outside the matrix must be zero.

    Cost: the number of stored in-matrix entries, ``sum_b rows_b * cols_b`` MACs per mat-vec
    (equal to ``nb * br * bc`` when the grid divides the shape); same number of parameters.

    Notes
    -----
    ``A @ X`` with few columns is one gather of the ``nb`` input slabs, one batched GEMM over
    all stored blocks (every block has the same padded shape) and one ``index_add_`` onto the
    block rows. With many columns and no autograd it runs in *rectangle form*: the stored
    blocks are cut into rectangles of adjacent blocks (:func:`block_rectangles`) and each is
    one GEMM on slices of ``X`` and of the result, in place; with autograd the same form runs
    forward and backward (:class:`_RectProduct`). Layouts it does not pay on (scattered
    blocks): per group of block rows of equal block count, one gather and one batched GEMM.
    ``X @ A`` is the same with the roles of block rows and columns swapped. Raises
    ``ValueError`` when a block position is repeated (the product would add both blocks while
    ``to_dense`` keeps one).
    """

    format_name = "blocksparse"

    def __init__(
        self,
        shape: tuple[int, int],
        block_shape: tuple[int, int],
        block_rows: torch.Tensor,
        block_cols: torch.Tensor,
        blocks: torch.Tensor,
    ) -> None:
        super().__init__(shape)
        m, n = self.shape
        if not isinstance(blocks, torch.Tensor):
            raise TypeError(f"blocks must be a torch.Tensor; got {type(blocks).__name__}")
        check_factors(blocks)
        br, bc = check_pair(tuple(block_shape) if isinstance(block_shape, list) else block_shape,
                            "block_shape")
        self.block_shape = (br, bc)
        self.grid = (math.ceil(m / br), math.ceil(n / bc))
        block_rows = _index_tensor(block_rows, "block_rows", blocks.device)
        block_cols = _index_tensor(block_cols, "block_cols", blocks.device)
        nb = blocks.shape[0]
        if blocks.shape != (nb, br, bc) or block_rows.shape != (nb,) or block_cols.shape != (nb,):
            raise ValueError(
                f"blocks must be (nb, {br}, {bc}) with block_rows/block_cols (nb,); got "
                f"{tuple(blocks.shape)}, {tuple(block_rows.shape)}, {tuple(block_cols.shape)}"
            )
        # index tensors made in inference mode have no version counter: planned, not shared
        shared = not (block_rows.is_inference() or block_cols.is_inference())
        key = (id(block_rows), id(block_cols), self.grid)
        plans = _PLANS.get(key) if shared else None
        if plans is not None:  # the same index tensors, unchanged: validated and planned before
            rref, cref, rv, cv, plans = plans
            if not (rref() is block_rows and cref() is block_cols
                    and rv == block_rows._version and cv == block_cols._version):
                plans = None
        if plans is None:
            self._validate(block_rows, block_cols, nb)
            # product plans (host work done once): A @ X groups block rows, X @ A block columns
            with plan_building():  # (shared across modes: never inference tensors)
                plans = (
                    _panel_plan(block_rows, block_cols, self.grid[0]),
                    _panel_plan(block_cols, block_rows, self.grid[1]),
                )
            if shared:
                if len(_PLANS) >= _PLANS_MAX:
                    _PLANS.pop(next(iter(_PLANS)))
                _PLANS[key] = (weakref.ref(block_rows), weakref.ref(block_cols),
                               block_rows._version, block_cols._version, plans)
        self._plans = plans
        self.block_rows = block_rows
        self.block_cols = block_cols
        self.blocks = blocks
        self._scatter: list[torch.Tensor | None] = [None, None]

    def _validate(self, block_rows: torch.Tensor, block_cols: torch.Tensor, nb: int) -> None:
        """Indices inside the grid and no repeated block position (clear ValueErrors)."""
        if nb and (
            int(block_rows.min()) < 0
            or int(block_rows.max()) >= self.grid[0]
            or int(block_cols.min()) < 0
            or int(block_cols.max()) >= self.grid[1]
        ):
            raise ValueError(f"block indices must lie in the {self.grid} grid")
        if nb:
            key = block_rows * self.grid[1] + block_cols
            uniq, counts = torch.unique(key, return_counts=True)
            if int(counts.max()) > 1:
                dup = int(uniq[counts > 1][0])
                raise ValueError(
                    f"block position ({dup // self.grid[1]}, {dup % self.grid[1]}) is stored "
                    f"{int(counts.max())} times; block_rows/block_cols must not repeat a position"
                )

    # ------------------------------------------------------------ geometry
    def _block_extent(self) -> tuple[torch.Tensor, torch.Tensor]:
        """In-matrix rows and columns of each stored block, LongTensors (nb,)."""
        m, n = self.shape
        br, bc = self.block_shape
        h = (m - self.block_rows * br).clamp(max=br)
        w = (n - self.block_cols * bc).clamp(max=bc)
        return h, w

    @property
    def num_blocks(self) -> int:
        return int(self.blocks.shape[0])

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {"block_rows": self.block_rows, "block_cols": self.block_cols, "blocks": self.blocks}

    def _config(self) -> dict[str, Any]:
        return {"block_shape": list(self.block_shape)}

    @classmethod
    def _from_state(cls, tensors, config, shape):
        return cls(
            shape,
            tuple(config["block_shape"]),
            tensors["block_rows"],
            tensors["block_cols"],
            tensors["blocks"],
        )

    @property
    def flops(self) -> int:
        h, w = self._block_extent()
        return int((h * w).sum())

    @property
    def num_params(self) -> int:
        return self.flops

    # ------------------------------------------------------------ algebra
    def _padded(self) -> tuple[int, int]:
        br, bc = self.block_shape
        return self.grid[0] * br, self.grid[1] * bc

    def to_dense(self) -> torch.Tensor:
        m, n = self.shape
        br, bc = self.block_shape
        gr, gc = self.grid
        D = torch.zeros(gr, gc, br, bc, dtype=self.blocks.dtype, device=self.blocks.device)
        D[self.block_rows, self.block_cols] = self.blocks
        return D.permute(0, 2, 1, 3).reshape(gr * br, gc * bc)[:m, :n].contiguous()

    def _panels(self, t: int, rows: bool = False) -> list[torch.Tensor]:
        """Block-row panels ``(g, p, c q)`` of every group (``t=1``: of ``A^T``), contiguous.

        ``rows=True``: the same panels transposed, contiguous ``(g, c q, p)``, the operand
        layout in which MKL runs the batch-major products ``x_g @ P_g^T`` fastest (MiniLM
        layers at 50 %, 32-100 rows, one thread on a 2-core Xeon: layer forward 10-25 % faster
        than on the transposed view of the ``(g, p, c q)`` panels).
        """

        def build() -> list[torch.Tensor]:
            plan = self._plans[t]
            B = self.blocks.mT if t else self.blocks
            # torch.split (not slicing): its backward is one cat, not a zero-filled copy per piece
            segs = B.index_select(0, plan["perm"]).split(plan["sizes"])
            panels = []
            p, q = B.shape[1:]
            for seg, (_, g, c) in zip(segs, plan["groups"], strict=True):
                seg = seg.unflatten(0, (g, c))  # (g, c, p, q)
                if rows:
                    panels.append(seg.permute(0, 1, 3, 2).reshape(g, c * q, p).contiguous())
                else:
                    panels.append(seg.permute(0, 2, 1, 3).reshape(g, p, c * q))
            return panels

        return cached_layout(self, ("panels", t, rows), build, self.blocks)

    def _rects(self) -> list[tuple[int, int, int, int, torch.Tensor]]:
        """Rectangles of adjacent stored blocks covering every block once (kept in the shared
        plan): ``(r0, r1, c0, c1, block ids)`` with in-matrix row and column ranges and the
        ids (LongTensor, row-major over the rectangle); see :func:`block_rectangles`."""
        plan = self._plans[0]
        key = ("rects", self.shape, self.block_shape)  # (the plans are shared by index tensors)
        if key not in plan:
            with plan_building():
                plan[key] = self._build_rects()
        return plan[key]

    def _build_rects(self) -> list[tuple[int, int, int, int, torch.Tensor]]:
        """:meth:`_rects` from the index tensors (host work, once per structure)."""
        m, n = self.shape
        br, bc = self.block_shape
        ids = torch.full(self.grid, -1, dtype=torch.long)
        ids[self.block_rows.cpu(), self.block_cols.cpu()] = torch.arange(self.num_blocks)
        dev = self.block_rows.device
        return [
            (i0 * br, min(i1 * br, m), j0 * bc, min(j1 * bc, n),
             ids[i0:i1, j0:j1].reshape(-1).to(dev))
            for i0, i1, j0, j1 in block_rectangles(ids >= 0)
        ]

    def _rect_layout(self) -> bool:
        """Whether the stored blocks form rectangles of :data:`RECT_MIN_BLOCKS` or more blocks
        on average (the layouts the rectangle form can pay off on)."""
        return self.num_blocks > 0 and self.num_blocks >= RECT_MIN_BLOCKS * len(self._rects())

    def _few_rects(self, k: int) -> bool:
        """Within :data:`FRESH_ROWS`: whether the rectangle form needs at most one GEMM per
        :data:`RECT_ROWS_PER_GEMM` rows on a :meth:`_rect_layout`, so it beats the fresh row
        form."""
        return self._rect_layout() and len(self._rects()) * RECT_ROWS_PER_GEMM <= k

    def _uses_rect_form(self, t: int, k: int) -> bool:
        """Rectangle form for layouts of :data:`RECT_MIN_BLOCKS` or more blocks per rectangle:
        from :data:`RECT_FORM_FROM` columns, and from ``ROW_FORM_BELOW`` columns where it needs
        at most :data:`RECT_PER_GROUP_CALL` times the row form's kernels (3 per group of block
        rows, 1 per group of full block rows)."""
        if not self._rect_layout():
            return False
        if k >= RECT_FORM_FROM:
            return True
        full = self.grid[1 - t]
        calls = sum(1 if c == full else 3 for _, _, c in self._plans[t]["groups"])
        return len(self._rects()) <= RECT_PER_GROUP_CALL * calls

    def _rect_form(self, t: int, X: torch.Tensor) -> torch.Tensor:
        """``A @ X`` (``t=1``: ``A^T @ X``) in rectangle form, not recorded by autograd
        (:class:`_RectProduct` differentiates it): per rectangle of adjacent blocks one GEMM
        of its panel ``(h, w)`` with ``w`` rows of ``X`` sliced in place, added in place into
        ``h`` rows of the result (``addmm_``; a batch-major ``X`` keeps the result
        batch-major). ``flops * k`` MACs, one kernel per rectangle."""
        rects = self._rects()
        br, bc = self.block_shape

        bm = batch_major(X)
        # x @ P^T (batch-major, t=0) reads a contiguous P^T: MKL's fast operand layout there
        # (MiniLM layers at 50 %, 128-1536 rows: layer forward 5-15 % faster than on P.T)
        transposed = bm and not t

        def build() -> list[torch.Tensor]:
            panels = []
            for r0, r1, c0, c1, ids in rects:
                h, w = -(-(r1 - r0) // br), -(-(c1 - c0) // bc)
                P = self.blocks.index_select(0, ids).view(h, w, br, bc)
                P = P.permute(0, 2, 1, 3).reshape(h * br, w * bc)[: r1 - r0, : c1 - c0]
                panels.append((P.T if transposed else P).contiguous())
            return panels

        panels = cached_layout(self, ("rect_panels", transposed), build, self.blocks)
        k = X.shape[1]
        out_len = self.shape[1] if t else self.shape[0]
        if bm:  # X = x.T for a row-major batch x (k, n): y = x @ A^T in place
            x = X.T
            y = X.new_zeros(k, out_len)
            for (r0, r1, c0, c1, _), P in zip(rects, panels, strict=True):
                if t:
                    y[:, c0:c1].addmm_(x[:, r0:r1], P)
                else:
                    y[:, r0:r1].addmm_(x[:, c0:c1], P)  # (P: the stored P^T)
            return y.T
        Y = X.new_zeros(out_len, k)
        for (r0, r1, c0, c1, _), P in zip(rects, panels, strict=True):
            if t:
                Y[c0:c1].addmm_(P.T, X[r0:r1])
            else:
                Y[r0:r1].addmm_(P, X[c0:c1])
        return Y

    def _rect_block_grad(self, t: int, X: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
        """Gradient of ``<G, A @ X>`` (``t=1``: ``<G, A^T @ X>``) w.r.t. the stored blocks
        ``(nb, br, bc)``: per rectangle one GEMM ``G[rows] @ X[cols]^T`` (``t=1``:
        ``X[rows] @ G[cols]^T``) on slices, cut back into its blocks; entries of edge blocks
        outside the matrix get zero. ``flops * k`` MACs."""
        br, bc = self.block_shape
        grad = self.blocks.new_zeros(self.blocks.shape)
        for r0, r1, c0, c1, ids in self._rects():
            gP = G[r0:r1] @ X[c0:c1].T if t == 0 else X[r0:r1] @ G[c0:c1].T
            h, w = -(-(r1 - r0) // br), -(-(c1 - c0) // bc)
            if gP.shape != (h * br, w * bc):  # ragged edge blocks: zero padding
                gP = torch.nn.functional.pad(gP, (0, w * bc - gP.shape[1], 0, h * br - gP.shape[0]))
            grad.index_copy_(0, ids, gP.view(h, br, w, bc).transpose(1, 2).reshape(-1, br, bc))
        return grad

    def _scatter_matrix(self, t: int, like: torch.Tensor) -> torch.Tensor | None:
        """0/1 matrix (grid, nb) summing block outputs into block rows (``None`` if large).

        Built on the device without a host round trip and kept (last dtype); for a mat-vec one
        ``(grid x nb) @ (nb x p)`` GEMM is cheaper than ``index_add_`` on small matrices.
        """
        out_idx = self.block_cols if t else self.block_rows
        grid, nb = self.grid[t], out_idx.shape[0]
        if grid * nb > SCATTER_MATRIX_MAX:
            return None
        S = self._scatter[t]
        if S is None or S.dtype != like.dtype or S.device != like.device:
            with plan_building():
                S = torch.zeros(grid, nb, dtype=like.dtype, device=like.device)
                S[out_idx, torch.arange(nb, device=like.device)] = 1.0
            self._scatter[t] = S
        return S

    def _product(self, t: int, X: torch.Tensor) -> torch.Tensor:
        """``A @ X`` (``t=0``) or ``A^T @ X`` (``t=1``) for ``X`` (n, k) with any strides.

        Small ``k``: one gather of the input slabs, one batched GEMM over all stored blocks
        and one ``index_add_``. Larger ``k`` without autograd: the rectangle form
        (:meth:`_rect_form`) where it pays, else the grouped row form written in place
        (:meth:`_grouped_in_place`). With autograd: the rectangle form forward and backward
        where it pays, else per group of block rows with ``c`` blocks one gather and one
        batched GEMM with inner dimension ``c q`` (the block-row panels), then one gather
        that puts the block rows in order. ``flops * k`` MACs either way.
        """
        out_idx, in_idx = (self.block_cols, self.block_rows) if t else (
            self.block_rows, self.block_cols)
        out_grid = self.grid[t]
        out_len = self.shape[1] if t else self.shape[0]
        p, q = self.block_shape[::-1] if t else self.block_shape
        n, k = X.shape
        pad = -n % q
        pad_out = out_grid * p - out_len
        F = torch.nn.functional
        bm = batch_major(X)
        B = self.blocks if t else self.blocks.mT  # (nb, q, p)
        if k == 1:  # mat-vec: the block sums by one small GEMM with the 0/1 scatter matrix
            g = (X if pad == 0 else F.pad(X.reshape(-1), (0, pad))).reshape(-1, 1, q)
            yb = torch.bmm(g.index_select(0, in_idx), B).view(-1, p)  # (nb, p)
            S = self._scatter_matrix(t, yb)
            if S is None:
                y = yb.new_zeros(out_grid, p).index_add_(0, out_idx, yb)
            else:
                y = S @ yb
            y = y.view(-1, 1)
            return y if pad_out == 0 else y[:out_len]
        if k < ROW_FORM_BELOW:  # every temporary batch-major: the fast bmm form for small k
            Xr = X.T if pad == 0 else F.pad(X.T, (0, pad))
            G = Xr.unflatten(1, (-1, q)).index_select(1, in_idx).transpose(0, 1)  # (nb, k, q)
            Yb = torch.bmm(G, B)  # (nb, k, p)
            Y = Yb.new_zeros(out_grid, k, p).index_add_(0, out_idx, Yb)
            if k == 1:
                return Y.view(-1, 1)[:out_len]
            return Y.transpose(0, 1).reshape(k, out_grid * p)[:, :out_len].T
        plan = self._plans[t]
        if not (torch.is_grad_enabled() and (X.requires_grad or self.blocks.requires_grad)):
            if bm and FRESH_ROWS[0] <= k <= FRESH_ROWS[1]:
                if self._few_rects(k):
                    return self._rect_form(t, X)
                return self._fresh_rows(t, X.T, plan, pad, out_len).T
            if self._uses_rect_form(t, k):
                return self._rect_form(t, X)
            return self._grouped_in_place(t, X, plan, self._panels(t), pad, out_len, bm)
        if self._uses_rect_form(t, k):  # training: rectangle form forward and backward
            return _RectProduct.apply(self.blocks, X, self, t)
        panels = self._panels(t)
        outs = []
        if bm:  # X = x.T for a row-major batch x (k, n): gather columns of x
            Xr = X.T if pad == 0 else F.pad(X.T, (0, pad))
            # one gather for all groups, split into per-group views (one backward scatter)
            Gs = Xr.unflatten(1, (-1, q)).index_select(1, plan["slabs"]).split(plan["sizes"], 1)
            for (_, g, c), P, G in zip(plan["groups"], panels, Gs, strict=True):
                G = G.reshape(k, g, c * q).transpose(0, 1)  # (g, k, c q)
                outs.append(torch.bmm(G, P.mT))  # (g, k, p)
            if plan["empty"]:
                outs.append(X.new_zeros(1, k, p))
            Y = torch.cat(outs).transpose(0, 1).index_select(1, plan["inv"])  # (k, grid, p)
            return Y.view(k, out_grid * p)[:, :out_len].T
        Xs = (X if pad == 0 else F.pad(X, (0, 0, 0, pad))).reshape(-1, q * k)  # (gc, q k)
        Gs = Xs.index_select(0, plan["slabs"]).split(plan["sizes"])
        for (_, g, c), P, G in zip(plan["groups"], panels, Gs, strict=True):
            outs.append(torch.bmm(P, G.view(g, c * q, k)))  # (g, p, k)
        if plan["empty"]:
            outs.append(X.new_zeros(1, p, k))
        Y = torch.cat(outs).index_select(0, plan["inv"])  # (grid, p, k)
        return Y.view(out_grid * p, k)[:out_len]

    def _fresh_rows(
        self, t: int, x: torch.Tensor, plan: dict, pad: int, out_len: int
    ) -> torch.Tensor:
        """``x @ A^T`` (``t=1``: ``x @ A``) for a row-major batch ``x`` (k, n), no autograd.

        One gather of the input slabs of every group, per group of block rows with ``c``
        blocks one ``bmm`` into a fresh ``(g, k, p)`` output, one ``cat`` and one
        ``index_select`` that puts the block rows in order: the result is row-major
        ``(k, out_len)``. ``flops * k`` MACs.
        """
        p, q = self.block_shape[::-1] if t else self.block_shape
        k = x.shape[0]
        xr = x if pad == 0 else torch.nn.functional.pad(x, (0, pad))
        Gs = xr.unflatten(1, (-1, q)).index_select(1, plan["slabs"]).split(plan["sizes"], 1)
        outs = [
            torch.bmm(G.reshape(k, g, c * q).transpose(0, 1), P)  # (g, k, p)
            for (_, g, c), P, G in zip(plan["groups"], self._panels(t, True), Gs, strict=True)
        ]
        if plan["empty"]:
            outs.append(x.new_zeros(1, k, p))
        Y = torch.cat(outs).transpose(0, 1).index_select(1, plan["inv"])  # (k, grid, p)
        Y = Y.view(k, -1)
        return Y if Y.shape[1] == out_len else Y[:, :out_len].contiguous()

    def _linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
        """``x @ A.T + bias`` for a row-major batch ``x`` (k, n) of at least ``FRESH_ROWS[0]``
        rows without autograd: the product's fresh row-major result (fresh row form, or
        rectangle / grouped form from :data:`RECT_FORM_FROM` rows), the bias added to it in
        place (3-7 % of a 384 x 384 layer forward at 128-256 rows against a second pass).
        ``None`` otherwise (``StructuredLinear`` then runs :meth:`_matmul`)."""
        k = x.shape[0]
        if k < FRESH_ROWS[0] or self.num_blocks == 0 or not batch_major(x.T) or (
            torch.is_grad_enabled() and (x.requires_grad or self.blocks.requires_grad)
        ):
            return None
        Y = self._product(0, x.T).T  # (a new tensor; row-major unless edge padding was cut)
        if not Y.is_contiguous():
            return Y.contiguous() if bias is None else Y + bias
        return Y if bias is None else Y.add_(bias)

    def _grouped_in_place(
        self, t: int, X: torch.Tensor, plan: dict, panels: list, pad: int, out_len: int, bm: bool
    ) -> torch.Tensor:
        """Large-``k`` product without autograd, written into the result with ``index_copy_``.

        Per group of block rows: its input slabs gathered and one batched GEMM, in chunks of
        columns small enough (:data:`GATHER_CHUNK` floats) that the gathered slabs are still in
        cache when the GEMM reads them (the gather duplicates each slab of ``X`` once per
        stored block reading it, which at large ``k`` is memory-bound); full block rows read
        ``X`` in place (one GEMM, no gather). ``flops * k`` MACs.
        """
        p, q = self.block_shape[::-1] if t else self.block_shape
        out_grid, full = self.grid[t], self.grid[1 - t]
        k = X.shape[1]
        F = torch.nn.functional
        groups = zip(plan["groups"], panels, plan["group_slabs"], plan["group_rows"], strict=True)
        if bm:  # X = x.T for a row-major batch x (k, n): the row form, batch-major throughout
            xr = X.T if pad == 0 else F.pad(X.T, (0, pad))  # (k, n')
            xs = xr.unflatten(1, (-1, q))
            Y = X.new_zeros(k, out_grid, p)
            for (_, g, c), P, sl, rows in groups:
                if c == full:
                    Y.index_copy_(1, rows, (xr @ P.reshape(g * p, c * q).T).view(k, g, p))
                    continue
                step = balanced_step(k, max(ROW_FORM_BELOW, GATHER_CHUNK // (g * c * q)))
                for a in range(0, k, step):
                    G = xs[a : a + step].index_select(1, sl).view(-1, g, c * q)  # (step, g, c q)
                    out = torch.bmm(G.transpose(0, 1), P.mT).transpose(0, 1)  # (step, g, p)
                    Y[a : a + step].index_copy_(1, rows, out)
            return Y.view(k, out_grid * p)[:, :out_len].T
        Xp = X if pad == 0 else F.pad(X, (0, 0, 0, pad))  # (n', k)
        Xs = Xp.unflatten(0, (-1, q))  # (gc, q, k)
        Y = X.new_zeros(out_grid, p, k)
        for (_, g, c), P, sl, rows in groups:
            if c == full:
                Y.index_copy_(0, rows, (P.reshape(g * p, c * q) @ Xp).view(g, p, k))
                continue
            step = balanced_step(k, max(ROW_FORM_BELOW, GATHER_CHUNK // (g * c * q)))
            for a in range(0, k, step):
                G = Xs[:, :, a : a + step].index_select(0, sl)  # (g c, q, step) contiguous
                out = torch.bmm(P, G.view(g, c * q, -1))
                if step >= k:
                    Y.index_copy_(0, rows, out)
                else:
                    Y[:, :, a : a + step].index_copy_(0, rows, out)
        return Y.view(out_grid * p, k)[:out_len]

    def _matmul(self, X: torch.Tensor) -> torch.Tensor:
        return self._product(0, X)

    def _rmatmul(self, X: torch.Tensor) -> torch.Tensor:
        # X @ A = (A^T X^T)^T: the transposed blocks, roles of rows and columns swapped
        return self._product(1, X.T).T

    def _float_tensors(self) -> list[torch.Tensor]:
        return [self.blocks]

    def _transpose(self) -> BlockSparse:
        return BlockSparse(
            (self.shape[1], self.shape[0]),
            (self.block_shape[1], self.block_shape[0]),
            self.block_cols.clone(),
            self.block_rows.clone(),
            self.blocks.transpose(1, 2).contiguous(),
        )

    # ---------------------------------------------------------- projection
    @classmethod
    def _resolve_block_shape(cls, m: int, n: int, block_shape: Any) -> tuple[int, int]:
        if block_shape is None:  # the default adapts to small matrices
            return default_block_shape(m, n)
        br, bc = check_pair(block_shape, "block_shape")
        if br > m or bc > n:
            raise ValueError(
                f"block_shape={block_shape!r} does not fit a {m}x{n} matrix; each side must be "
                f"at most the matrix side (rows <= {m}, cols <= {n})"
            )
        return br, bc

    @classmethod
    def min_budget(cls, m: int, n: int, block_shape: Any = None, **options: Any) -> int:
        br, bc = cls._resolve_block_shape(m, n, block_shape)
        hs, ws = grid_sizes(m, br), grid_sizes(n, bc)
        return min(hs) * min(ws)

    @classmethod
    @scale_invariant
    def project(cls, W: torch.Tensor, budget: int, *, block_shape: Any = None) -> BlockSparse:
        """Keep the blocks of largest Frobenius norm whose total size fits ``budget``.

        With equal block sizes this is the optimal Frobenius projection onto block-sparse
        matrices on the grid (exchange argument, math.md 6.2). With ragged edge blocks the
        selection is a 0/1 knapsack; blocks are then taken greedily in order of energy per entry
        (``||W_b||_F^2 / size_b``, optimal for the fractional relaxation), skipping any block
        that no longer fits the remaining budget.

        Parameters
        ----------
        block_shape : int or (br, bc), optional
            Block rows x block columns; any shape up to the matrix shape (edge blocks are
            shorter when it does not divide the matrix). Default :func:`default_block_shape`:
            ``min(32, max(1, side // 4))`` per side, i.e. ``(32, 32)`` when both sides are at
            least 128 and at least a 4 x 4 grid on smaller matrices. An explicit shape larger
            than the matrix is an error.
        """
        m, n = W.shape
        br, bc = cls._resolve_block_shape(m, n, block_shape)
        gr, gc = math.ceil(m / br), math.ceil(n / bc)
        Wp = W.new_zeros(gr * br, gc * bc)
        Wp[:m, :n] = W
        B = Wp.view(gr, br, gc, bc).permute(0, 2, 1, 3)  # (gr, gc, br, bc)
        energy = B.pow(2).sum(dim=(2, 3)).flatten().to(torch.float64)
        hs = torch.tensor(grid_sizes(m, br), dtype=torch.long)
        ws = torch.tensor(grid_sizes(n, bc), dtype=torch.long)
        size = (hs[:, None] * ws[None, :]).flatten().to(energy.device)
        min_size = int(size.min())
        if budget < min_size:
            raise InfeasibleBudgetError(
                "blocksparse", budget, min_size, f"smallest block of the {br}x{bc} grid"
            )
        uniform = bool((size == size[0]).all())
        order = torch.argsort(energy if uniform else energy / size, descending=True, stable=True)
        # the greedy scan runs on host lists (one transfer of gr * gc block sizes and of the
        # order, explicit on a GPU; no per-block tensor indexing or device synchronisation)
        size_l = size.tolist()
        chosen = []
        used = 0
        for idx in order.tolist():
            s = size_l[idx]
            if used + s <= budget:
                chosen.append(idx)
                used += s
            if budget - used < min_size:
                break
        sel = torch.tensor(sorted(chosen), dtype=torch.long, device=W.device)
        rows, cols = sel // gc, sel % gc
        out = cls((m, n), (br, bc), rows, cols, B[rows, cols].contiguous())
        out.info = {
            "algorithm": "top blocks by Frobenius norm",
            "block_shape": [br, bc],
            "optimal": uniform,
        }
        return out
