"""Monarch matrices (Dao et al., ICML 2022) and their exact projection by per-slice SVD.

Index convention (math.md 6.4): ``K`` input blocks, ``J`` output blocks, rank ``R`` per slice,
``m = J * Lr`` and ``n = K * I``. Rows are indexed ``row = l * J + j`` (``j`` fast: strided),
columns ``col = k * I + i`` (``k`` slow: contiguous), and

    M[l*J + j, k*I + i] = sum_r w2[j, l, k*R + r] * w1[k, r*J + j, i]

with ``w1`` of shape ``(K, R*J, I)`` and ``w2`` of shape ``(J, Lr, K*R)``. As an operator:
``z = blockdiag(w1) x`` on ``K`` contiguous input chunks, a regrouping of ``z``, then
``blockdiag(w2)``. Each slice ``S_kj[l, i] = M[l*J + j, k*I + i]`` of shape ``(Lr, I)`` has
rank at most ``R`` and owns its factor entries, so truncated SVD of every slice is the exact
Frobenius projection.
"""

from __future__ import annotations

from typing import Any

import torch

from ..budget import InfeasibleBudgetError
from ..linalg import svd
from ..validation import check_pair, check_positive_int
from .base import (
    ROW_FORM_BELOW,
    StructuredMatrix,
    balanced_step,
    batch_major,
    bmm_nk,
    cached_layout,
    check_factors,
    register_format,
    scale_invariant,
)

__all__ = ["Monarch"]


#: Smallest block side (``m / J`` and ``n / K``) of the grids the default projection considers
#: (when the matrix allows it). Measured on one thread, batch 256 at 50 % of dense MACs: sides
#: >= 64 run at 0.7-0.9 of dense MAC rate, side 16 at 0.35-0.55, side 4 (96 x 96 blocks on
#: 384 x 384) at 0.15; at batch 1 the time grows with the number of blocks. On the MiniLM
#: layers the coarse grids also have the lower error, so the choice there is unchanged.
MIN_SIDE = 64

#: Mat-vecs without autograd run on the factors zero-padded to two plain matrices (one GEMM
#: each, no regrouping copies) when those hold at most this share of the ``m n`` entries of
#: the dense matrix. They hold ``J K R (m + n)`` entries, ``K`` (= ``J``) times the cost: on
#: a 384 x 384 layer at 25 % (``K = J = 2``) half the dense matrix, and the mat-vec took 12-14
#: us against 33-41 us for the two ``bmm`` and two copies (dense 17-19 us).
PADDED_MATVEC_SHARE = 0.5


def _needs_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd records a product of ``tensors`` (then no ``out=`` kernels)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _row_major_rows(
    Y: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``Y`` (k, a, b), a strided view, copied into a row-major ``(k, a b)`` result and
    returned as its transposed ``(a b, k)`` view; with ``bias`` (``a b`` entries, no
    autograd) the copy adds it (``torch.add(..., out=)``, one pass). ``out`` (k, a b),
    row-major, no autograd: the result is written there."""
    k, a, b = Y.shape
    if out is not None:
        if bias is None:
            out.view(k, a, b).copy_(Y)
        else:
            torch.add(Y, bias.view(a, b), out=out.view(k, a, b))
        return out.T
    if bias is None:
        return Y.reshape(k, a * b).T
    out = Y.new_empty(k, a, b)
    torch.add(Y, bias.view(a, b), out=out)
    return out.view(k, a * b).T


#: Batch-major products without autograd of more rows than this run the row form in row
#: blocks of at most this many, written into the result in place: the intermediates of one
#: block stay in cache (MiniLM layers at 50 %, 1024 / 2048 rows, one thread, 2-core Intel
#: Xeon host, layer forward / ``nn.Linear``: 384 x 384 1.62 / 1.75 -> 1.00 / 0.99, 1536 x 384
#: 1.63 / 1.63 -> 0.85 / 0.84, 384 x 1536 0.77 / 0.87 -> 0.77 / 0.82; docs/benchmarks.md).
ROW_BLOCK = 256


def _in_row_blocks(product, X: torch.Tensor, m: int, bias: torch.Tensor | None) -> torch.Tensor:
    """``product(X_block, bias, out_block)`` over row blocks of a batch-major ``X`` (n, k)
    into one row-major ``(k, m)`` result, returned as its ``(m, k)`` view."""
    k = X.shape[1]
    out = X.new_empty(k, m)
    step = balanced_step(k, ROW_BLOCK)
    for a in range(0, k, step):
        product(X[:, a : a + step], bias, out[a : a + step])
    return out.T


def _divisors(x: int) -> list[int]:
    return [d for d in range(1, x + 1) if x % d == 0]


@register_format
class Monarch(StructuredMatrix):
    """Monarch matrix: two block-diagonal factors around a fixed regrouping permutation.

    Parameters
    ----------
    w1 : Tensor, shape (K, R*J, I)
        Input-side block-diagonal factor (``K`` blocks of ``R*J x I``).
    w2 : Tensor, shape (J, Lr, K*R)
        Output-side block-diagonal factor (``J`` blocks of ``Lr x K*R``).
    transposed : bool
        If True the object represents the transpose of the Monarch matrix defined by
        ``w1, w2`` (so that ``.T`` stays exact and in this format).

    Shape ``(J*Lr, K*I)`` (swapped when ``transposed``). Cost: ``R * (J*n + K*m)`` MACs per
    mat-vec, i.e. ``R * nb * (m + n)`` for ``J = K = nb``; the same number of parameters.
    """

    format_name = "monarch"

    def __init__(self, w1: torch.Tensor, w2: torch.Tensor, transposed: bool = False) -> None:
        check_factors(w1, w2)
        if w1.ndim != 3 or w2.ndim != 3:
            raise ValueError("w1 must be (K, R*J, I) and w2 (J, Lr, K*R)")
        K, RJ, I = w1.shape
        J, Lr, KR = w2.shape
        if J == 0 or K == 0 or RJ % J or KR != K * (RJ // J):
            raise ValueError(
                f"inconsistent Monarch factors: w1 {tuple(w1.shape)}, w2 {tuple(w2.shape)}; "
                "expected w1 (K, R*J, I) and w2 (J, Lr, K*R)"
            )
        self.in_blocks, self.out_blocks, self.rank = K, J, RJ // J
        self.transposed = bool(transposed)
        # mat-vecs on the zero-padded factors (see PADDED_MATVEC_SHARE)
        self._padded_ok = J * RJ * (J * Lr + K * I) <= PADDED_MATVEC_SHARE * J * Lr * K * I
        shape = (J * Lr, K * I)
        super().__init__(shape[::-1] if transposed else shape)
        self.w1, self.w2 = w1, w2

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {"w1": self.w1, "w2": self.w2}

    def _config(self) -> dict[str, Any]:
        return {
            "in_blocks": self.in_blocks,
            "out_blocks": self.out_blocks,
            "rank": self.rank,
            "transposed": self.transposed,
        }

    def _float_tensors(self) -> list[torch.Tensor]:
        return [self.w1, self.w2]

    @classmethod
    def _from_state(cls, tensors, config, shape):
        return cls(tensors["w1"], tensors["w2"], transposed=config.get("transposed", False))

    @property
    def flops(self) -> int:
        return int(self.w1.numel() + self.w2.numel())

    def _untransposed_dense(self) -> torch.Tensor:
        K, J, R = self.in_blocks, self.out_blocks, self.rank
        I, Lr = self.w1.shape[2], self.w2.shape[1]
        Q = self.w1.view(K, R, J, I)  # Q[k, r, j, i]
        P = self.w2.view(J, Lr, K, R)  # P[j, l, k, r]
        M = torch.einsum("jlkr,krji->ljki", P, Q)
        return M.reshape(Lr * J, K * I)

    def to_dense(self) -> torch.Tensor:
        M = self._untransposed_dense()
        return M.T.contiguous() if self.transposed else M

    def _forward(
        self, X: torch.Tensor, bias: torch.Tensor | None = None, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``M @ X`` for the untransposed matrix ``M``: two batched GEMMs and two regroupings.

        ``R (J n + K m) k`` MACs. Column form (feature-major ``X``, ``k >= ROW_FORM_BELOW``): no
        copies (strided views, and ``out=`` without autograd); row form: the regroupings copy
        the ``(K R J, k)`` intermediate and the ``(m, k)`` result once each.
        """
        k = X.shape[1]
        if k == 1 and self._padded_ok and not _needs_grad(X, self.w1, self.w2):
            P1, P2 = cached_layout(self, "padded", self._padded_factors, self.w1, self.w2)
            return torch.mm(P2, torch.mm(P1, X))
        K, J, R = self.in_blocks, self.out_blocks, self.rank
        Lr = self.w2.shape[1]
        if k == 1:  # mat-vec: the same kernels on flat views
            z = torch.bmm(X.reshape(K, 1, -1), self.w1.mT)  # (K, 1, R*J)
            z = z.view(K, R, J).permute(2, 0, 1).reshape(J, 1, K * R)
            return torch.bmm(z, self.w2.mT).view(J, Lr).T.reshape(-1, 1)
        row = batch_major(X) or k < ROW_FORM_BELOW
        if row and out is None and k > ROW_BLOCK and not _needs_grad(X, self.w1, self.w2):
            return _in_row_blocks(self._forward, X, Lr * J, bias)
        W1, W2 = self.w1, self.w2
        if row and not _needs_grad(X, W1, W2):
            W1, W2 = self._row_factors()  # x @ w^T on contiguous w^T: MKL's fast layout
        z = bmm_nk(W1, X.unflatten(0, (K, self.w1.shape[2])), row)  # (K, R*J, k)
        if not row:
            # column form, no copies: z's rows (k*R + r, j) are the regrouped intermediate as
            # a strided view, and the second GEMM writes output row l*J + j in place
            u = z.view(K * R, J, k).transpose(0, 1)  # (J, K*R, k)
            if _needs_grad(X, self.w1, self.w2):
                return torch.bmm(self.w2, u).transpose(0, 1).reshape(Lr * J, k)
            Y = X.new_empty(Lr * J, k)
            torch.bmm(self.w2, u, out=Y.view(Lr, J, k).transpose(0, 1))
            return Y
        # row form: stored (K, k, R*J) -> (J, k, K*R)
        z = z.mT.unflatten(2, (R, J)).permute(3, 1, 0, 2).reshape(J, k, K * R).mT
        y = bmm_nk(W2, z, row)  # (J, Lr, k); output row l*J + j
        return _row_major_rows(y.mT.permute(1, 2, 0), bias, out)

    def _backward(
        self, Y: torch.Tensor, bias: torch.Tensor | None = None, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``M^T @ Y`` for the untransposed matrix ``M`` (same cost as :meth:`_forward`)."""
        k = Y.shape[1]
        if k == 1 and self._padded_ok and not _needs_grad(Y, self.w1, self.w2):
            P1, P2 = cached_layout(self, "padded", self._padded_factors, self.w1, self.w2)
            return torch.mm(P1.T, torch.mm(P2.T, Y))
        K, J, R = self.in_blocks, self.out_blocks, self.rank
        Lr = self.w2.shape[1]
        if k == 1:
            y = Y.reshape(Lr, J).T.reshape(J, 1, Lr)
            z = torch.bmm(y, self.w2).view(J, K, R).permute(1, 2, 0).reshape(K, 1, R * J)
            return torch.bmm(z, self.w1).view(-1, 1)
        row = batch_major(Y) or k < ROW_FORM_BELOW
        if row and out is None and k > ROW_BLOCK and not _needs_grad(Y, self.w1, self.w2):
            return _in_row_blocks(self._backward, Y, K * self.w1.shape[2], bias)
        if row:
            y = Y.T.unflatten(1, (Lr, J)).permute(2, 0, 1).contiguous().mT  # stored (J, k, Lr)
        else:
            y = Y.unflatten(0, (Lr, J)).permute(1, 0, 2)  # (J, Lr, k)
        if row:  # stored (J, k, K*R) -> (K, k, R*J)
            z = bmm_nk(self.w2.mT, y, row)  # (J, K*R, k)
            z = z.mT.unflatten(2, (K, R)).permute(2, 1, 3, 0).reshape(K, k, R * J).mT
        elif _needs_grad(Y, self.w1, self.w2):
            z = torch.bmm(self.w2.mT, y).unflatten(1, (K, R)).permute(1, 2, 0, 3)
            z = z.reshape(K, R * J, k)
        else:  # the first GEMM writes the regrouped intermediate in place (strided rows)
            z = Y.new_empty(K, R * J, k)
            torch.bmm(self.w2.mT, y, out=z.view(K * R, J, k).transpose(0, 1))
        x = bmm_nk(self.w1.mT, z, row)  # (K, I, k)
        n = K * self.w1.shape[2]  # (explicit sizes: an empty batch, k = 0, has no -1 to infer)
        if row:
            return _row_major_rows(x.mT.permute(1, 0, 2), bias, out)
        return x.reshape(n, k)

    def _row_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``w1`` and ``w2`` as transposed views of contiguous ``(K, I, R J)`` / ``(J, K R, Lr)``
        copies (cached): the row form's GEMMs ``x @ w^T`` then read the weight operand in
        the layout MKL runs fastest. Fitted MiniLM layers at 50 %, 51 batch-major rows, one
        thread: layer forward 8-25 % faster (384 x 1536 0.71 -> 0.54 of ``nn.Linear``), 0-10 %
        at 256 rows (docs/benchmarks.md)."""
        return cached_layout(
            self, "row_factors",
            lambda: (self.w1.mT.contiguous().mT, self.w2.mT.contiguous().mT), self.w1, self.w2)

    def _padded_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(P1, P2)`` with ``M = P2 @ P1`` for the untransposed matrix ``M``: ``P1`` of shape
        ``(J K R, n)`` holds ``w1`` block-diagonally with its rows in ``(j, k, r)`` order, ``P2``
        of shape ``(m, J K R)`` holds ``w2`` with row ``l J + j`` reading block ``j``. Zero
        elsewhere; the regrouping permutation is folded into the row orders."""
        K, J, R = self.in_blocks, self.out_blocks, self.rank
        I, Lr = self.w1.shape[2], self.w2.shape[1]
        P1 = self.w1.new_zeros(J, K, R, K, I)
        # diagonal over the two K axes: (J, R, I, K); w1[k, r*J + j, i] -> [j, r, i, k]
        P1.diagonal(dim1=1, dim2=3).copy_(self.w1.view(K, R, J, I).permute(2, 1, 3, 0))
        P2 = self.w2.new_zeros(Lr, J, J, K * R)
        # diagonal over the two J axes: (Lr, K*R, J); w2[j, l, q] -> [l, q, j]
        P2.diagonal(dim1=1, dim2=2).copy_(self.w2.permute(1, 2, 0))
        return P1.reshape(J * K * R, K * I), P2.reshape(Lr * J, J * K * R)

    def _matmul(self, X: torch.Tensor) -> torch.Tensor:
        return self._backward(X) if self.transposed else self._forward(X)

    def _linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
        """``x @ A.T + bias`` for a row-major batch ``x`` (k, n) of at least 2 rows without
        autograd: the row form, whose last regrouping copy adds the bias (no pass of its
        own). ``None`` otherwise (other strides included)."""
        X = x.T
        if bias is None or not batch_major(X) or _needs_grad(X, self.w1, self.w2):
            return None
        return (self._backward(X, bias) if self.transposed else self._forward(X, bias)).T

    def _rmatmul(self, X: torch.Tensor) -> torch.Tensor:
        return (self._forward(X.T) if self.transposed else self._backward(X.T)).T

    def _transpose(self) -> Monarch:
        return Monarch(self.w1, self.w2, transposed=not self.transposed)

    # ---------------------------------------------------------- projection
    @staticmethod
    def _slices(W: torch.Tensor, J: int, K: int) -> torch.Tensor:
        m, n = W.shape
        Lr, I = m // J, n // K
        return W.reshape(Lr, J, K, I).permute(2, 1, 0, 3)  # (K, J, Lr, I)

    @classmethod
    def _candidates(cls, m: int, n: int, blocks: Any) -> list[tuple[int, int]]:
        """(J, K) pairs: output blocks dividing m, input blocks dividing n."""
        if blocks is not None:
            J, K = check_pair(blocks, "blocks")
            if m % J or n % K:
                raise ValueError(
                    f"blocks={blocks!r}: the output block count must divide m={m} and the input "
                    f"block count must divide n={n}; valid output counts {_divisors(m)}, valid "
                    f"input counts {_divisors(n)}"
                )
            return [(J, K)]
        common = [d for d in _divisors(m) if n % d == 0 and d >= 2]
        if common:
            cands = [(d, d) for d in common]
        else:
            cands = [(J, K) for J in _divisors(m) for K in _divisors(n) if (J, K) != (1, 1)]
            cands = cands or [(1, 1)]
        # keep the grids whose blocks are large enough to run at GEMM speed (see MIN_SIDE)
        side = min(MIN_SIDE, max(min(m // J, n // K) for J, K in cands))
        return [(J, K) for J, K in cands if min(m // J, n // K) >= side]

    @staticmethod
    def _grids_for_rank(
        m: int, n: int, cands: list[tuple[int, int]], rank: int
    ) -> list[tuple[int, int]]:
        """The grids of ``cands`` on which an explicit ``rank`` exists (``rank <= min(m/J,
        n/K)``, the rank of a slice); ``ValueError`` naming the largest rank when none."""
        ok = [(J, K) for J, K in cands if rank <= min(m // J, n // K)]
        if not ok:
            top = max(min(m // J, n // K) for J, K in cands)
            grids = ", ".join(f"{J}x{K}" for J, K in cands)
            raise ValueError(
                f"rank must be <= min(m/J, n/K) = {top} for a {m}x{n} matrix on the grid(s) "
                f"(out_blocks x in_blocks) {grids}; got {rank}"
            )
        return ok

    @staticmethod
    def _one_block_fallback(m: int, n: int, blocks: Any, cands: list[tuple[int, int]]) -> bool:
        """Whether ``blocks=None`` may fall back to the ``1 x 1`` grid: only when every
        candidate grid costs more than the dense matrix at rank 1 (coprime or tiny shapes),
        so that ordinary shapes keep their grids and their infeasible budgets."""
        return blocks is None and (1, 1) not in cands and min(
            J * n + K * m for J, K in cands) > m * n

    @classmethod
    def min_budget(
        cls, m: int, n: int, blocks: Any = None, rank: Any = None, **options: Any
    ) -> int:
        cands = cls._candidates(m, n, blocks)
        if cls._one_block_fallback(m, n, blocks, cands):
            cands = [*cands, (1, 1)]
        if rank is None:
            return min(J * n + K * m for J, K in cands)
        R = check_positive_int(rank, "rank")
        return min(R * (J * n + K * m) for J, K in cls._grids_for_rank(m, n, cands, R))

    @classmethod
    @scale_invariant
    def project(
        cls, W: torch.Tensor, budget: int, *, blocks: Any = None, rank: Any = None
    ) -> Monarch:
        """Exact Frobenius projection onto Monarch matrices by per-slice truncated SVD.

        The configuration ``(J, K, R)`` is chosen to use as much of the budget as possible:
        among the feasible configurations with the largest cost ``R * (J*n + K*m)``, the one
        with the smallest projection error (computed from the slices' singular values) wins.

        Parameters
        ----------
        blocks : int or (out_blocks, in_blocks), optional
            ``J`` must divide ``m`` and ``K`` must divide ``n``. Default: every common divisor
            ``nb >= 2`` of ``m`` and ``n`` with ``J = K = nb`` (or, if there is none, every
            pair of divisors) whose blocks are at least ``MIN_SIDE = 64`` rows and columns
            (or as large as the matrix allows): finer grids run far below dense GEMM speed.
            Where every such grid costs more than the dense matrix (coprime or tiny shapes
            such as 7 x 13), the ``1 x 1`` grid, a rank-``R`` product. Pass ``blocks``
            explicitly to use any grid.
        rank : int, optional
            Rank ``R`` per slice (``1 <= R <= min(m/J, n/K)``, else ``ValueError`` naming the
            largest; with several grids, those it exceeds are skipped); default: the largest
            that fits.
        """
        m, n = W.shape
        cands = cls._candidates(m, n, blocks)
        R_fixed = None if rank is None else check_positive_int(rank, "rank")
        if R_fixed is not None:
            cands = cls._grids_for_rank(m, n, cands, R_fixed)
        feasible = []  # (cost, J, K, R)
        for J, K in cands:
            Lr, I = m // J, n // K
            per_rank = J * n + K * m
            R = min(budget // per_rank, Lr, I) if R_fixed is None else R_fixed
            if R >= 1 and R * per_rank <= budget:
                feasible.append((R * per_rank, J, K, R))
        if not feasible and cls._one_block_fallback(m, n, blocks, cands):
            # coprime or tiny shapes (7 x 13): every grid with blocks costs more than the
            # dense matrix; the 1 x 1 grid (a rank-R product) is the Monarch left
            R = min(budget // (m + n), m, n) if R_fixed is None else R_fixed
            if 1 <= R <= min(m, n) and R * (m + n) <= budget:
                feasible.append((R * (m + n), 1, 1, R))
                cands = [*cands, (1, 1)]
        from ..linalg import choose_svd_method, frob2, top_svd

        best = None  # ((cost, -err2), J, K, R)
        top = max((c for c, *_ in feasible), default=None)
        tried = []
        # large slices (linalg.RANDOMIZED_MIN_ENTRIES): only the leading R triplets are
        # computed (randomized SVD), the error is ||W||^2 - sum of their squares
        kept: dict[tuple[int, int], tuple] = {}
        norm2 = None
        for cost, J, K, R in feasible:
            if cost != top:
                continue
            if choose_svd_method(m // J, n // K, R) == "randomized":
                norm2 = frob2(W) if norm2 is None else norm2
                out3 = top_svd(cls._slices(W, J, K), R)
                kept[J, K] = out3
                err2 = max(norm2 - float(out3[1].double().pow(2).sum()), 0.0)
            else:
                s2 = torch.linalg.svdvals(cls._slices(W, J, K)).double().pow(2)
                err2 = float(s2[..., R:].sum())
            tried.append({"blocks": [J, K], "rank": R, "cost": cost})
            if best is None or (cost, -err2) > best[0]:
                best = ((cost, -err2), J, K, R)
        if best is None:
            minb = cls.min_budget(m, n, blocks=blocks, rank=R_fixed)
            detail = "valid (out_blocks, in_blocks): " + ", ".join(f"{J}x{K}" for J, K in cands)
            if R_fixed is not None:
                detail += f"; rank={R_fixed} costs rank*(J*n + K*m)"
            raise InfeasibleBudgetError("monarch", budget, minb, detail)
        _, J, K, R = best
        svd_used = "randomized" if (J, K) in kept else "exact"
        if (J, K) in kept:
            U, S, Vh, _ = kept[J, K]
        else:
            U, S, Vh = svd(cls._slices(W, J, K))
        s = S[..., :R].sqrt()
        P = U[..., :R] * s.unsqueeze(-2)  # (K, J, Lr, R)
        Q = Vh[..., :R, :] * s.unsqueeze(-1)  # (K, J, R, I)
        w1 = Q.permute(0, 2, 1, 3).reshape(K, R * J, n // K).contiguous()
        w2 = P.permute(1, 2, 0, 3).reshape(J, m // J, K * R).contiguous()
        out = cls(w1, w2)
        out.info = {
            "algorithm": "per-slice truncated SVD (exact projection)"
            if svd_used == "exact" else "per-slice truncated SVD (randomized)",
            "svd": svd_used,
            "blocks": [J, K],
            "rank": R,
            "candidates": tried,
        }
        return out
