"""BLAST matrices (Block-Level Adaptive STructure; Lee, Kwon, Qu & Kim, NeurIPS 2024).

An ``m x n`` matrix is cut into a ``b1 x b2`` grid of contiguous blocks; block ``(i, j)`` is

    A_ij = U_i diag(s_ij) V_j^T,   U_i (p_i, r),  V_j (q_j, r),  s_ij (r,)

so every block row shares its left basis ``U_i``, every block column its right basis
``V_j``, and the blocks differ only by the diagonal couplings ``s_ij``. (The BLAST paper writes
``B_i = U_i`` and ``C_j = V_j^T``.) Low rank is the special case ``s_ij = 1``; block-diagonal
matrices are the case ``s_ij = 0`` for ``i != j``.

Block sizes need not be equal: by default the rows are split into ``b1`` contiguous pieces
whose sizes differ by at most one (and the columns likewise), so any ``m x n`` with
``b1 <= m`` and ``b2 <= n`` works; explicit ``row_splits``/``col_splits`` are accepted too.
Nothing requires divisibility.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..validation import check_pair
from .base import (
    ROW_FORM_BELOW,
    StructuredMatrix,
    balanced_step,
    batch_major,
    cached_layout,
    check_factors,
    gather_slabs,
    register_format,
    scatter_slabs,
    scratch,
    slab_maps,
    stack_rows,
)
from .blocklowrank import balanced_splits

__all__ = ["BLAST"]

#: Floats of one intermediate (``b r`` rows times a chunk of columns) in the large-``k``
#: product: 2 MiB of float32 (the L2 cache of the Xeon host). Fitted MiniLM layers at 50 %
#: (16 x 16 blocks), 960 batch-major rows, one thread: layer forward / ``nn.Linear``
#: 1.31-1.65 -> 1.18-1.38 on 384 x 384 and 0.96-1.17 -> 0.86-0.98 on the 1536-wide layers
#: against 512 KiB chunks (docs/benchmarks.md).
CHUNK_FLOATS = 1 << 19
#: One-shot products (one chunk) whose intermediate is larger than this keep ``z`` and ``u``
#: in the thread's scratch buffer; smaller ones allocate them (``bmm(out=)`` into the buffer
#: cost ~10 % at 51 rows on 384 x 384, and fresh 1 MB intermediates at 256 rows page-faulted
#: in some processes: 2.1-2.7 against 1.2 of the dense time).
FRESH_FLOATS = 1 << 17

#: Block grids tried by ``BLAST.project(..., blocks="auto")`` (kept when they fit the shape
#: and the budget); the reference BLAST results use the better of these two.
AUTO_BLOCKS: tuple[tuple[int, int], ...] = ((4, 4), (16, 16))


def _check_splits(splits: Any, size: int, parts: int, name: str) -> list[int]:
    try:
        s = [int(x) for x in splits]
    except TypeError as exc:
        raise TypeError(f"{name} must be a sequence of ints; got {splits!r}") from exc
    if len(s) != parts + 1 or s[0] != 0 or s[-1] != size:
        raise ValueError(
            f"{name} must have {parts + 1} boundaries from 0 to {size}; got {s}"
        )
    if any(b <= a for a, b in zip(s[:-1], s[1:], strict=False)):
        raise ValueError(f"{name} must be strictly increasing (no empty blocks); got {s}")
    return s


@register_format
class BLAST(StructuredMatrix):
    """BLAST matrix: ``b1 x b2`` blocks ``A_ij = U_i diag(S[i, j]) V_j^T`` of rank ``r``.

    Parameters
    ----------
    U : torch.Tensor, shape (m, r)
        Left bases ``U_i`` stacked over the row blocks.
    V : torch.Tensor, shape (n, r)
        Right bases ``V_j`` stacked over the column blocks.
    S : torch.Tensor, shape (b1, b2, r)
        Diagonal couplings ``s_ij``.
    row_splits, col_splits : sequence of int, optional
        Block boundaries ``[0, ..., m]`` (length ``b1 + 1``) and ``[0, ..., n]`` (length
        ``b2 + 1``). Default: balanced (sizes differ by at most one), which needs only
        ``b1 <= m`` and ``b2 <= n``.

    Notes
    -----
    Cost: ``r * (m + n + b1 * b2)`` MACs per mat-vec (``z_j = V_j^T x_j``: ``n r``;
    ``u_i = sum_j s_ij * z_j``: ``b1 b2 r``; ``y_i = U_i u_i``: ``m r``) and as many
    parameters. The product never forms the dense matrix.
    """

    format_name = "blast"

    def __init__(
        self,
        U: torch.Tensor,
        V: torch.Tensor,
        S: torch.Tensor,
        row_splits: Any = None,
        col_splits: Any = None,
    ) -> None:
        for name, t, nd in (("U", U, 2), ("V", V, 2), ("S", S, 3)):
            if not isinstance(t, torch.Tensor) or t.ndim != nd:
                raise ValueError(f"{name} must be a {nd}-D torch.Tensor")
        check_factors(U, V, S)
        r = U.shape[1]
        if V.shape[1] != r or S.shape[2] != r:
            raise ValueError(
                "U (m, r), V (n, r) and S (b1, b2, r) must share r; got "
                f"{tuple(U.shape)}, {tuple(V.shape)}, {tuple(S.shape)}"
            )
        m, n = U.shape[0], V.shape[0]
        b1, b2 = S.shape[0], S.shape[1]
        if not (1 <= b1 <= m and 1 <= b2 <= n):
            raise ValueError(f"need 1 <= b1 <= m and 1 <= b2 <= n; got blocks ({b1}, {b2}) "
                             f"for shape ({m}, {n})")
        super().__init__((m, n))
        self.row_splits = (balanced_splits(m, b1) if row_splits is None
                           else _check_splits(row_splits, m, b1, "row_splits"))
        self.col_splits = (balanced_splits(n, b2) if col_splits is None
                           else _check_splits(col_splits, n, b2, "col_splits"))
        self.U, self.V, self.S = U, V, S
        # padded-slab index maps for uneven blocks (None when the blocks are equal)
        self._rmaps = slab_maps(self.row_splits, U.device)
        self._cmaps = slab_maps(self.col_splits, U.device)

    # ------------------------------------------------------------ properties
    @property
    def rank(self) -> int:
        """``r``: the number of columns of every ``U_i`` and ``V_j``."""
        return int(self.U.shape[1])

    @property
    def blocks(self) -> tuple[int, int]:
        """``(b1, b2)``: block rows by block columns."""
        return int(self.S.shape[0]), int(self.S.shape[1])

    @property
    def flops(self) -> int:
        m, n = self.shape
        b1, b2 = self.blocks
        return self.rank * (m + n + b1 * b2)

    @staticmethod
    def cost(m: int, n: int, blocks: tuple[int, int], rank: int) -> int:
        """MACs of one mat-vec: ``rank * (m + n + b1 * b2)``."""
        return int(rank) * (int(m) + int(n) + int(blocks[0]) * int(blocks[1]))

    # ----------------------------------------------------------------- hooks
    def _tensors(self) -> dict[str, torch.Tensor]:
        return {"U": self.U, "V": self.V, "S": self.S}

    def _config(self) -> dict[str, Any]:
        return {"row_splits": list(self.row_splits), "col_splits": list(self.col_splits)}

    def _float_tensors(self) -> list[torch.Tensor]:
        return [self.U, self.V, self.S]

    @classmethod
    def _from_state(cls, tensors, config, shape):
        return cls(tensors["U"], tensors["V"], tensors["S"],
                   config.get("row_splits"), config.get("col_splits"))

    def _col_block_index(self) -> torch.Tensor:
        cs = self.col_splits
        sizes = torch.tensor([cs[j + 1] - cs[j] for j in range(len(cs) - 1)])
        return torch.repeat_interleave(torch.arange(len(cs) - 1), sizes).to(self.S.device)

    def to_dense(self) -> torch.Tensor:
        """Dense ``(m, n)`` matrix; ``m n r`` MACs, one block row at a time."""
        cidx = self._col_block_index()
        rs = self.row_splits
        rows = []
        for i in range(self.blocks[0]):
            Vs = self.V * self.S[i][cidx]  # (n, r): row c scaled by s_{i, block(c)}
            rows.append(self.U[rs[i] : rs[i + 1]] @ Vs.T)
        return torch.cat(rows, dim=0)

    def _apply(
        self,
        U: torch.Tensor,
        V: torch.Tensor,
        S: torch.Tensor,
        rmaps: tuple,
        cmaps: tuple,
        X: torch.Tensor,
        side: str = "",
    ) -> torch.Tensor:
        """``A @ X`` for ``A_ij = U_i diag(S[i, j]) V_j^T``: three batched GEMMs.

        ``z_j = V_j^T x_j`` (``n r k`` MACs), ``u_i = sum_j s_ij * z_j`` (``b1 b2 r k``) and
        ``y_i = U_i u_i`` (``m r k``); uneven blocks are padded to the longest by one gather of
        ``X`` and of the bases (index maps from :func:`slab_maps`). ``S`` with the rank first,
        the layout the coupling GEMMs read, is a contiguous copy cached per ``side`` (``"t"``:
        the left product) while the factors are unchanged
        (:func:`~gblr_approx.formats.base.cached_layout`).
        """
        b1, b2, _ = S.shape
        rg, rs, p = rmaps
        cg, _, q = cmaps
        k = X.shape[1]
        # uneven blocks: the padded bases are one gather each, cached like the layouts below
        Vs = gather_slabs(V, b2, q, cg, False) if cg is None else cached_layout(
            self, "Vs" + side, lambda: gather_slabs(V, b2, q, cg, False), V)  # (b2, q, r)
        Us = gather_slabs(U, b1, p, rg, False) if rg is None else cached_layout(
            self, "Us" + side, lambda: gather_slabs(U, b1, p, rg, False), U)  # (b1, p, r)
        bm = batch_major(X)
        if k == 1:  # mat-vec: the same kernels on flat views
            Xs = X.reshape(b2, 1, q) if cg is None else gather_slabs(X, b2, q, cg, True).mT
            Z = torch.bmm(Xs, Vs)  # (b2, 1, r)
            Uc = (S * Z.transpose(0, 1)).sum(1, keepdim=True)  # (b1, 1, r)
            return scatter_slabs(torch.bmm(Uc, Us.mT).view(-1, 1), rs, False)
        if k < ROW_FORM_BELOW:  # small k: batch-major temporaries, the fast bmm form
            Z = torch.bmm(gather_slabs(X, b2, q, cg, True).mT, Vs)  # (b2, k, r)
            if k <= 4:  # u_i = sum_j s_ij * z_j elementwise: no tiny GEMMs
                Uc = (S.unsqueeze(2) * Z).sum(1)  # (b1, k, r)
            else:  # one GEMM (k x b2) @ (b2 x b1) per rank index, on contiguous operands
                St = cached_layout(
                    self, "St" + side, lambda: S.permute(2, 1, 0).contiguous(), self.S
                )
                Uc = torch.bmm(Z.permute(2, 1, 0).contiguous(), St).permute(2, 1, 0).contiguous()
            Y = torch.bmm(Uc, Us.mT)  # (b1, k, p)
            return scatter_slabs(stack_rows(Y.mT, True), rs, True)
        if bm and cg is None and rs is None and not (
            torch.is_grad_enabled() and any(t.requires_grad for t in (X, U, V, S))
        ):
            return self._apply_chunked(Us, Vs, S, X, side)
        # large k: z stored (b2, r, k) so that the coupling GEMMs batch over r without copies
        Z = torch.bmm(Vs.mT, gather_slabs(X, b2, q, cg, bm))  # (b2, r, k)
        Sr = cached_layout(self, "Sr" + side, lambda: S.permute(2, 0, 1).contiguous(), self.S)
        Uc = torch.bmm(Sr, Z.transpose(0, 1))  # (r, b1, k)
        if bm:
            Y = torch.bmm(Uc.permute(1, 2, 0), Us.mT)  # (b1, k, p)
            return scatter_slabs(stack_rows(Y.mT, True), rs, True)
        Y = torch.bmm(Us, Uc.transpose(0, 1))  # (b1, p, k)
        return scatter_slabs(Y.reshape(-1, k), rs, False)

    def _apply_chunked(
        self, Us: torch.Tensor, Vs: torch.Tensor, S: torch.Tensor, X: torch.Tensor, side: str
    ) -> torch.Tensor:
        """Large-``k`` product of batch-major ``X`` for equal blocks without autograd.

        The intermediates ``z`` and ``u`` have ``b r`` rows per column (often several times
        ``n``). While they fit in :data:`CHUNK_FLOATS` floats the three batched GEMMs run once
        and the result is stored feature-major ``(m, k)`` (``StructuredLinear`` then writes
        its row-major output in the bias add); past :data:`FRESH_FLOATS` floats ``z`` and
        ``u`` then live in the thread's scratch buffer. Larger, column chunks keep them in cache
        between the GEMMs, and the last GEMM of each chunk writes into the row-major
        ``(k, m)`` result in place (``out=`` on a strided view), returned as its transposed
        view. Same MACs as the unchunked product.

        (Measured on the fitted MiniLM layers at 50 %, 16 x 16 blocks, one thread, three
        runs: the one-shot form at 51 rows took 0.85-0.90 of the dense time on 1536 x 384
        against 0.91-0.99 for the chunked form writing in place, 1.13-1.19 against 1.21-1.23
        on 384 x 1536; the same within the +-10 % run-to-run spread on 384 x 384. A
        ``bmm(out=)`` into a strided view is not torch's batched MKL kernel but a loop of one
        GEMM per block; at 1024-3232 rows a contiguous GEMM per chunk plus a copy was no
        faster. With the scratch buffer, 2 MiB chunks beat 512 KiB ones at 256-960 rows:
        :data:`CHUNK_FLOATS`.)
        """
        b1, p, r = Us.shape
        b2, q, _ = Vs.shape
        n, k = X.shape
        Sr = cached_layout(self, "Sr" + side, lambda: S.permute(2, 0, 1).contiguous(), self.S)
        step = balanced_step(k, max(ROW_FORM_BELOW, CHUNK_FLOATS // (max(b1, b2) * r)))
        Xb = X.unflatten(0, (b2, q))  # (b2, q, k) view
        if step >= k:
            step = k
        # z and u of a chunk in this thread's scratch buffer (u 64-byte aligned): fresh
        # ~0.5 MB tensors per chunk cost page faults (384 x 384 at 256 rows: 2.7 -> 1.4 of
        # the dense time in one process, 1.4 in another; 1536-wide layers 2-7 %)
        u_at = -(-b2 * r * step // 16) * 16
        fresh = step == k and max(b1, b2) * r * k <= FRESH_FLOATS
        buf = None if fresh else scratch(u_at + r * b1 * step, X)
        if step == k:
            Z = torch.bmm(Vs.mT, Xb, out=None if buf is None else (
                buf[: b2 * r * k].view(b2, r, k)))  # (b2, r, k)
            Uc = torch.bmm(Sr, Z.transpose(0, 1), out=None if buf is None else (
                buf[u_at : u_at + r * b1 * k].view(r, b1, k)))  # (r, b1, k)
            return torch.bmm(Us, Uc.transpose(0, 1)).view(b1 * p, k)
        Yt = X.new_empty(k, b1 * p)  # result stored row-major (k, m)
        for a in range(0, k, step):
            c = min(step, k - a)
            Z = torch.bmm(Vs.mT, Xb[:, :, a : a + c], out=None if buf is None else (
                buf[: b2 * r * c].view(b2, r, c)))  # (b2, r, c)
            Uc = torch.bmm(Sr, Z.transpose(0, 1), out=None if buf is None else (
                buf[u_at : u_at + r * b1 * c].view(r, b1, c)))  # (r, b1, c)
            out = Yt[a : a + c].unflatten(1, (b1, p)).transpose(0, 1)  # (b1, c, p)
            torch.bmm(Uc.permute(1, 2, 0), Us.mT, out=out)
        return Yt.T

    def _matmul(self, X: torch.Tensor) -> torch.Tensor:
        return self._apply(self.U, self.V, self.S, self._rmaps, self._cmaps, X)

    def _rmatmul(self, X: torch.Tensor) -> torch.Tensor:
        # X @ A = (A^T X^T)^T and A^T has blocks V_j diag(S[i, j]) U_i^T
        return self._apply(
            self.V, self.U, self.S.transpose(0, 1), self._cmaps, self._rmaps, X.T, "t"
        ).T

    def _transpose(self) -> BLAST:
        return BLAST(self.V, self.U, self.S.transpose(0, 1).contiguous(),
                     self.col_splits, self.row_splits)

    def block(self, i: int, j: int) -> torch.Tensor:
        """Dense block ``A_ij = U_i diag(s_ij) V_j^T`` of shape ``(p_i, q_j)``."""
        rs, cs = self.row_splits, self.col_splits
        return (self.U[rs[i] : rs[i + 1]] * self.S[i, j]) @ self.V[cs[j] : cs[j + 1]].T

    # ------------------------------------------------------------ embeddings
    @classmethod
    def from_lowrank(cls, L: Any, blocks: Any = (1, 1)) -> BLAST:
        """Exact BLAST form of a low-rank matrix ``U V^T`` (all ``s_ij = 1``).

        Cost ``r (m + n + b1 b2)``: the low-rank cost plus ``r b1 b2``; with the default
        ``blocks=(1, 1)`` that is ``r`` MACs more than the low-rank matrix.
        """
        b1, b2 = check_pair(blocks, "blocks")
        r = L.U.shape[1]
        S = L.U.new_ones(b1, b2, r)
        return cls(L.U.clone(), L.V.clone(), S)

    # ------------------------------------------------------------ projection
    @classmethod
    def min_budget(cls, m: int, n: int, blocks: Any = (4, 4), **options: Any) -> int:
        if blocks is None or blocks == "auto":
            cands = [b for b in AUTO_BLOCKS if b[0] <= m and b[1] <= n] or [(1, 1)]
            return min(m + n + b1 * b2 for b1, b2 in cands)
        b1, b2 = check_pair(blocks, "blocks")
        return m + n + b1 * b2

    @classmethod
    def project(
        cls,
        W: torch.Tensor,
        budget: int,
        *,
        blocks: Any = "auto",
        rank: int | None = None,
        steps: int | str = "auto",
        lr: float = 1.8,
        damping: float = 0.01,
        end_factor: float = 0.0,
        prune: float = 0.0,
        init: str = "svd",
        seed: int = 0,
        progress: bool | None = None,
        callback: Callable[[int, float], Any] | None = None,
    ) -> BLAST:
        """Fit a BLAST matrix to ``W`` within ``budget`` MACs.

        Preconditioned alternating gradient descent (math.md 6.5; see
        :mod:`gblr_approx.fit.blast.factors`) started from the truncated SVD, returning the best
        iterate, so the error is never above the rank-``r`` truncated SVD's.

        Parameters
        ----------
        W : (m, n) float tensor
        budget : int
            MACs; the rank is ``r = floor(budget / (m + n + b1 b2))``.
        blocks : (b1, b2), int or "auto"
            Block grid. ``"auto"`` (default) fits each of ``(16, 16)`` and ``(4, 4)`` that fits
            the shape and budget and keeps the lower error (both are recorded in ``info``);
            the second is abandoned after ``max(10, steps // 8)`` steps (a third of the
            steps when ``steps="auto"`` had to shorten the schedule) if it then trails the
            first at the same step (``steps_run`` in ``info["candidates"]``).
            Blocks need not divide the shape (balanced splits); needs ``b1 <= m``, ``b2 <= n``.
        rank : int, optional
            Fix ``r`` instead of deriving it from the budget (must fit the budget).
        steps : int or "auto"
            Outer iterations ``T``. ``"auto"`` (default): 200 (the reference code uses 300,
            which buys about 0.002 of relative error on MiniLM layers for 1.5x the time),
            except for large layers, whose iterations on all grids together are capped at
            :data:`gblr_approx.fit.blast.pipeline.AUTO_FIT_MACS` MACs (every layer up to
            1024 x 4096 at 25 % keeps 200; 4096 x 11008 gets 7; ``info["steps"]`` records
            the number, see docs/large_layers.md).
        lr : float
            Initial step, decayed linearly to ``lr * end_factor`` (``0.5`` = plain alternating
            least squares step; larger over-relaxes).
        damping : float
            ``delta``: preconditioner damping ``delta * ||W - A||_F`` in units where
            ``rms(W) = 1``.
        end_factor : float
            Final step as a fraction of ``lr``.
        prune : float
            ``lambda >= 0``: group shrinkage of each rank slice of ``S`` (rank pruning); ranks
            that reach zero are dropped, so the cost can end below the budget. The last
            iterate is then returned, and the error may exceed the truncated SVD's.
        init : {"svd", "random"}
            Starting point (``"random"`` mimics the reference code; then the SVD guarantee
            does not hold).
        seed : int
        progress : bool or None
            tqdm bar; ``None``: only when stderr is a terminal.
        callback : callable(step, rel_error) -> bool, optional
            Called after every iteration; returning ``True`` stops the fit.

        Returns
        -------
        BLAST
            ``info`` holds ``history`` (relative Frobenius error per iteration, index 0 = the
            SVD start), ``best_step``, ``stopped``, ``rel_error``, ``rank``, ``blocks`` and, for
            ``blocks="auto"``, ``candidates``.
        """
        from ..projection import get_projection  # the fitter registers itself (fit/)

        return get_projection("blast")(W, budget, blocks=blocks, rank=rank, steps=steps, lr=lr,
                                       damping=damping, end_factor=end_factor, prune=prune,
                                       init=init, seed=seed, progress=progress,
                                       callback=callback)
