"""Block-sparse matrices on a regular grid, and their projection (keep the heaviest blocks)."""

from __future__ import annotations

import math
from typing import Any

import torch

from ..budget import InfeasibleBudgetError
from ..validation import check_pair
from .base import StructuredMatrix, register_format

__all__ = ["BlockSparse", "grid_sizes"]

DEFAULT_BLOCK_SHAPE = (32, 32)


def grid_sizes(length: int, block: int) -> list[int]:
    """Sizes of the blocks cutting ``length`` into pieces of ``block`` (the last may be shorter)."""
    nb = math.ceil(length / block)
    return [min(block, length - i * block) for i in range(nb)]


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
        br, bc = int(block_shape[0]), int(block_shape[1])
        self.block_shape = (br, bc)
        self.grid = (math.ceil(m / br), math.ceil(n / bc))
        block_rows = torch.as_tensor(block_rows, dtype=torch.long, device=blocks.device)
        block_cols = torch.as_tensor(block_cols, dtype=torch.long, device=blocks.device)
        nb = blocks.shape[0]
        if blocks.shape != (nb, br, bc) or block_rows.shape != (nb,) or block_cols.shape != (nb,):
            raise ValueError(
                f"blocks must be (nb, {br}, {bc}) with block_rows/block_cols (nb,); got "
                f"{tuple(blocks.shape)}, {tuple(block_rows.shape)}, {tuple(block_cols.shape)}"
            )
        if nb and (
            int(block_rows.min()) < 0
            or int(block_rows.max()) >= self.grid[0]
            or int(block_cols.min()) < 0
            or int(block_cols.max()) >= self.grid[1]
        ):
            raise ValueError(f"block indices must lie in the {self.grid} grid")
        self.block_rows = block_rows
        self.block_cols = block_cols
        self.blocks = blocks

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

    def _matmul(self, X: torch.Tensor) -> torch.Tensor:
        m, n = self.shape
        br, bc = self.block_shape
        mp, np_ = self._padded()
        k = X.shape[1]
        Xp = X.new_zeros(np_, k)
        Xp[:n] = X
        Xb = Xp.view(self.grid[1], bc, k)[self.block_cols]  # (nb, bc, k)
        Yb = torch.bmm(self.blocks, Xb)  # (nb, br, k)
        Y = X.new_zeros(self.grid[0], br, k)
        Y.index_add_(0, self.block_rows, Yb)
        return Y.view(mp, k)[:m]

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
        if block_shape is None:
            block_shape = DEFAULT_BLOCK_SHAPE
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
    def project(cls, W: torch.Tensor, budget: int, *, block_shape: Any = None) -> BlockSparse:
        """Keep the blocks of largest Frobenius norm whose total size fits ``budget``.

        With equal block sizes this is the optimal Frobenius projection onto block-sparse
        matrices on the grid (exchange argument, math.md 6.2). With ragged edge blocks the
        selection is a 0/1 knapsack; blocks are then taken greedily in order of energy per entry
        (``||W_b||_F^2 / size_b``, optimal for the fractional relaxation), skipping any block
        that no longer fits the remaining budget.

        Parameters
        ----------
        block_shape : int or (br, bc), default (32, 32)
            Block rows x block columns; any shape up to the matrix shape (edge blocks are
            shorter when it does not divide the matrix).
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
