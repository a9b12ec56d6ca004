"""Block-low-rank (BLR) matrices on a grid, and their projection (per-block SVD + greedy ranks)."""

from __future__ import annotations

import heapq
from typing import Any

import torch

from ..budget import InfeasibleBudgetError
from ..validation import check_pair
from .base import StructuredMatrix, register_format

__all__ = ["BlockLowRank", "balanced_splits"]

DEFAULT_GRID = (4, 4)


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
        Us = [U.reshape(-1) for row in self.factors for U, _ in row]
        Vs = [V.reshape(-1) for row in self.factors for _, V in row]
        return {"ranks": self.ranks, "U": torch.cat(Us), "V": torch.cat(Vs)}

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
        return cls(shape, rs, cs, factors)

    def _float_tensors(self) -> list[torch.Tensor]:
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

    def _matmul(self, X: torch.Tensor) -> torch.Tensor:
        rs, cs = self.row_splits, self.col_splits
        Y = X.new_zeros(self.shape[0], X.shape[1])
        for j in range(len(cs) - 1):
            Xj = X[cs[j] : cs[j + 1]]
            for i in range(len(rs) - 1):
                U, V = self.factors[i][j]
                if U.shape[1]:
                    Y[rs[i] : rs[i + 1]] += U @ (V.T @ Xj)
        return Y

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
        out = cls((m, n), rs, cs, factors)
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
