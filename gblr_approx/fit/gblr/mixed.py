"""Low-rank plus block-low-rank: a global low-rank part and a grid of local blocks.

Both parts are GBLR components (one full-size component of rank ``r_0`` and one component
per grid block of rank ``r_ij``), so their sum is a GBLR matrix. The parts are fitted by
alternating exact least squares: the global part is the truncated SVD of ``W - B`` and the
blocks are the per-block truncated SVDs of ``W - L``. Between the two, the budget is
re-split by a greedy knapsack on the two spectra (gain ``sigma^2`` per MAC), which lets the
fit move cost between the global and the local part.

Per iteration: one SVD of an ``m x n`` matrix and one batched SVD of the grid blocks
(``O(m n min(m, n))`` in total).
"""

from __future__ import annotations

import math

import torch

from ...formats.blocklowrank import balanced_splits
from ...linalg import choose_svd_method, frob2, svd, top_svd
from .blocks import BlockModel, Rect

__all__ = ["lowrank_plus_blocks"]


def _grid_index(splits: list[int], pad: int) -> torch.Tensor:
    """Indices of each block's entries along one side, padded with ``pad``: (blocks, longest)."""
    lens = [b - a for a, b in zip(splits, splits[1:], strict=False)]
    idx = torch.full((len(lens), max(lens)), pad, dtype=torch.long)
    for i, (a, ln) in enumerate(zip(splits, lens, strict=False)):
        idx[i, :ln] = torch.arange(a, a + ln)
    return idx


def _grid_batch(X: torch.Tensor, rs: list[int], cs: list[int]) -> torch.Tensor:
    """Blocks of ``X`` on the grid, zero-padded to the largest block: (b1*b2, pmax, qmax).

    One gather (no Python loop over blocks: fine grids have thousands of them); the padding
    indices point at an appended zero row / column.
    """
    m, n = X.shape
    ri = _grid_index(rs, m).to(X.device)
    ci = _grid_index(cs, n).to(X.device)
    Xp = torch.nn.functional.pad(X, (0, 1, 0, 1))
    b1, pmax = ri.shape
    b2, qmax = ci.shape
    out = Xp[ri[:, None, :, None], ci[None, :, None, :]]  # (b1, b2, pmax, qmax)
    return out.reshape(b1 * b2, pmax, qmax)


def _ungrid(B: torch.Tensor, rs: list[int], cs: list[int], m: int, n: int) -> torch.Tensor:
    """Inverse of :func:`_grid_batch`: the (m, n) matrix of the blocks (padding dropped)."""
    ri = _grid_index(rs, m).to(B.device)
    ci = _grid_index(cs, n).to(B.device)
    b1, pmax = ri.shape
    b2, qmax = ci.shape
    out = B.new_zeros(m + 1, n + 1)
    out[ri[:, None, :, None], ci[None, :, None, :]] = B.reshape(b1, b2, pmax, qmax)
    return out[:m, :n]


def _allocate(
    S1: torch.Tensor,
    S2: torch.Tensor,
    c1: int,
    c2: torch.Tensor,
    budget: int,
    max_blocks: int | None,
) -> tuple[int, torch.Tensor]:
    """Greedy knapsack: global ranks (cost c1 each) vs block ranks (cost c2[b] each).

    Runs on the CPU: the spectra (``min(m, n) + b1 b2 t`` numbers) are copied there once, an
    explicit transfer when the fit runs on a GPU (a no-op on the CPU).
    """
    S1, S2 = S1.detach().cpu(), S2.detach().cpu()
    nb, t = S2.shape
    g1 = S1.double().pow(2) / c1
    g2 = S2.double().pow(2) / c2.double()[:, None]
    gains = torch.cat([g1, g2.reshape(-1)])
    costs = torch.cat(
        [torch.full_like(g1, float(c1)), c2.double()[:, None].expand(nb, t).reshape(-1)]
    )
    order_t = torch.argsort(gains, descending=True, stable=True)
    used = 0
    k1 = 0
    ranks = torch.zeros(nb, dtype=torch.long)
    nS1 = S1.numel()
    active = 0
    if max_blocks is None:
        # fast path: the longest prefix of the order that fits is bought at once (the
        # spectra are sorted, so a block's ranks -- and the global ranks -- come in order);
        # the loop below then only fills the remaining room
        pos = gains[order_t] > 0
        fit = torch.cumsum(costs[order_t], 0) <= budget
        k = int((pos & fit).long().cumprod(0).sum())
        head = order_t[:k]
        k1 = int((head < nS1).sum())
        blk = head[head >= nS1] - nS1
        ranks = torch.bincount(torch.div(blk, t, rounding_mode="floor"), minlength=nb)
        used = int(costs[head].sum())
        order_t = order_t[k:]
    cmin = float(costs.min()) if costs.numel() else 0.0
    if budget - used < cmin:
        order_t = order_t[:0]
    order = order_t.tolist()
    gains_l = gains[order_t].tolist()
    costs_l = costs[order_t].tolist()
    for idx, gain, cost in zip(order, gains_l, costs_l, strict=True):
        if budget - used < cmin or gain <= 0:
            break
        c = int(cost)
        if used + c > budget:
            continue
        if idx < nS1:
            if idx != k1:  # keep prefix order
                continue
            k1 += 1
        else:
            b, tt = divmod(idx - nS1, t)
            if int(ranks[b]) != tt:
                continue
            if tt == 0:
                if max_blocks is not None and active >= max_blocks:
                    continue
                active += 1
            ranks[b] = tt + 1
        used += c
    return k1, ranks


def lowrank_plus_blocks(
    W: torch.Tensor,
    budget: int,
    grid: tuple[int, int],
    *,
    iters: int = 6,
    max_components: int | None = None,
) -> tuple[BlockModel, float]:
    """Fit ``W ~ L + B`` (global rank-``r_0`` part plus a ``grid`` of low-rank blocks).

    Parameters
    ----------
    W : Tensor (m, n)
    budget : int
        MACs; the result's cost ``r_0 (m + n) + sum_ij r_ij (p_i + q_j)`` stays within it.
    grid : (b1, b2)
        Row blocks x column blocks (balanced contiguous blocks).
    iters : int
        Alternations (each one SVD of ``W - B`` and one batched SVD of ``W - L``).
    max_components : int, optional
        Cap on the number of active components (the global part counts as one).

    Returns
    -------
    (BlockModel, float)
        The fitted components (global first, then the blocks row-major) and the best
        relative error seen; the model holds the best iterate.
    """
    m, n = W.shape
    b1, b2 = grid
    rs, cs = balanced_splits(m, b1), balanced_splits(n, b2)
    ph = torch.tensor([rs[i + 1] - rs[i] for i in range(b1) for _ in range(b2)], dtype=torch.long)
    qw = torch.tensor([cs[j + 1] - cs[j] for _ in range(b1) for j in range(b2)], dtype=torch.long)
    c2 = ph + qw
    # large layers (linalg.RANDOMIZED_MIN_ENTRIES): the global part's SVD is randomized (only
    # the r_0 <= budget / (m + n) leading triplets can ever be bought) and the error is
    # accumulated without float64 copies of the residual
    kmax = min(budget // (m + n) + 1, m, n)
    global_svd = choose_svd_method(m, n, kmax)
    big = m * n >= linalg_threshold()
    nrm2 = (frob2(W) if big else float(W.double().pow(2).sum())) or 1.0
    Bm = torch.zeros_like(W)
    L_cur = torch.zeros_like(W)
    best: tuple[float, int, torch.Tensor] = (math.inf, 0, torch.zeros(b1 * b2, dtype=torch.long))
    fac: tuple[torch.Tensor, ...] = ()
    maxb = None if max_components is None else max(max_components - 1, 0)
    for _it in range(iters):
        if global_svd == "exact":
            U1, S1, Vh1 = svd(W - Bm)
        else:
            U1, S1, Vh1, _ = top_svd(W - Bm, kmax, seed=_it)
        Rb = _grid_batch(W - L_cur, rs, cs)
        S2 = torch.linalg.svdvals(Rb)
        k1, ranks = _allocate(S1, S2, m + n, c2, budget, maxb)
        L_cur = (U1[:, :k1] * S1[:k1]) @ Vh1[:k1]
        Rb = _grid_batch(W - L_cur, rs, cs)
        U2, S2, Vh2 = svd(Rb)
        t = S2.shape[1]
        keep = (torch.arange(t)[None, :] < ranks[:, None]).to(device=S2.device, dtype=S2.dtype)
        Bb = (U2 * (S2 * keep).unsqueeze(-2)) @ Vh2
        Bm = _ungrid(Bb, rs, cs, m, n)
        if big:
            Rr = W - L_cur
            err = frob2(Rr.sub_(Bm)) / nrm2
            del Rr
        else:
            err = float((W - L_cur - Bm).double().pow(2).sum()) / nrm2
        if err < best[0]:
            best = (err, k1, ranks.clone())
            fac = (U1[:, :k1] * S1[:k1], Vh1[:k1], U2 * S2.unsqueeze(-2), Vh2)
    err, k1, ranks = best
    GU, GVh, BU, BVh = fac
    # only the blocks that were bought become components (fine grids have thousands)
    active = torch.nonzero(ranks > 0).flatten().tolist()
    rects = [Rect(0, m, 0, n)]
    rk = [k1]
    for b in active:
        i, j = divmod(b, b2)
        rects.append(Rect(rs[i], rs[i + 1] - rs[i], cs[j], cs[j + 1] - cs[j]))
        rk.append(int(ranks[b]))
    model = BlockModel(W, rects, rk)
    model.set_factors(0, GU, GVh)
    for t, b in enumerate(active):
        i, j = divmod(b, b2)
        r, p, q = rk[1 + t], rs[i + 1] - rs[i], cs[j + 1] - cs[j]
        model.set_factors(1 + t, BU[b, :p, :r], BVh[b, :r, :q])
    model.drop_inactive()
    model.info["global_svd"] = global_svd
    return model, math.sqrt(err)


def linalg_threshold() -> int:
    """The current :data:`gblr_approx.linalg.RANDOMIZED_MIN_ENTRIES` (read at call time so
    that tests can lower it)."""
    from ... import linalg

    return linalg.RANDOMIZED_MIN_ENTRIES
