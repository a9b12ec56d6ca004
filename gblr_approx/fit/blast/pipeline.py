"""``fit_blast``: the BLAST projection (block grid choice around :mod:`.factors`).

Tries the block grids of ``blocks`` (``"auto"``: :data:`AUTO_BLOCKS` that fit the shape and
budget), derives the rank from the budget (``r = floor(budget / (m + n + b1 b2))``), runs the
preconditioned alternating gradient descent of :func:`.factors.fit_blast_factors` on each, and
keeps the grid with the lowest error. Registered as the projection of ``"blast"`` by
:mod:`gblr_approx.fit`, so :meth:`gblr_approx.BLAST.project` never imports this module itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ...budget import InfeasibleBudgetError
from ...formats.base import fit_scale
from ...formats.blast import AUTO_BLOCKS, BLAST
from ...formats.blocklowrank import balanced_splits
from ...linalg import top_svd
from ...validation import check_pair, check_positive_int
from ..result import FitResult
from .factors import fit_blast_factors

__all__ = ["fit_blast", "auto_steps", "iteration_macs", "AUTO_STEPS", "AUTO_FIT_MACS"]

#: ``steps="auto"`` runs this many iterations on every grid tried, unless that would cost
#: more than :data:`AUTO_FIT_MACS` (see :func:`auto_steps`).
AUTO_STEPS: int = 200

#: MAC budget of the iterations of one ``steps="auto"`` fit (all grids together; the
#: truncated-SVD starts are not counted). ``2.0e12``: every layer up to 1024 x 4096 at 25 %
#: keeps :data:`AUTO_STEPS` (a 1024 x 4096 fit needs 1.3e12 for both default grids), while a
#: 4096 x 11008 layer gets 7 iterations per grid (~100 CPU seconds on one thread, see
#: docs/large_layers.md).
AUTO_FIT_MACS: float = 2.0e12

#: ``steps="auto"`` never runs fewer iterations than this (the SVD start is iterate 0).
AUTO_MIN_STEPS: int = 2


def iteration_macs(m: int, n: int, rank: int, b1: int, b2: int) -> int:
    """MACs of one BLAST iteration (:func:`.factors.fit_blast_factors`) at ``rank`` on a
    ``b1 x b2`` grid of an ``m x n`` matrix.

    ``2 m n r`` for the two products with the layer (``A C^T``, ``B^T A``), ``6 (m + n) r^2``
    for the Gram matrices, gradients and triangular solves of the ``B`` and ``C`` steps, and
    ``(b1 b2 + b1 + b2) r^3 / 3`` for the Cholesky factorisations of the ``r x r`` systems
    (``b1 b2`` of them in the ``s`` step). Measured at 4096 x 11008 (r ~ 740) the three terms
    are about 66e9, 50e9 and 2e9 (4 x 4) or 34e9 (16 x 16) MACs.
    """
    m, n, r = int(m), int(n), int(rank)
    return 2 * m * n * r + 6 * (m + n) * r * r + (b1 * b2 + b1 + b2) * r**3 // 3


def auto_steps(m: int, n: int, grids: list[tuple[int, int, int]]) -> int:
    """Iterations per grid for ``steps="auto"``.

    Parameters
    ----------
    m, n : int
        Shape of the layer.
    grids : list of (b1, b2, rank)
        The grids the fit will try and the rank on each.

    Returns
    -------
    int
        :data:`AUTO_STEPS` when that many iterations on every grid cost at most
        :data:`AUTO_FIT_MACS` (:func:`iteration_macs`), else the number of iterations the
        budget buys, at least :data:`AUTO_MIN_STEPS`. Every grid runs the same number, so
        their step-size schedules stay identical (the early abandonment of a later grid
        compares errors at equal steps).
    """
    per = sum(iteration_macs(m, n, r, b1, b2) for b1, b2, r in grids)
    if per * AUTO_STEPS <= AUTO_FIT_MACS:
        return AUTO_STEPS
    return max(AUTO_MIN_STEPS, int(AUTO_FIT_MACS // max(per, 1)))

def _resolve_blocks(blocks: Any, m: int, n: int, budget: int) -> list[tuple[int, int]]:
    if blocks is None or (isinstance(blocks, str) and blocks == "auto"):
        cands = [b for b in AUTO_BLOCKS if b[0] <= m and b[1] <= n
                 and budget >= m + n + b[0] * b[1]]
        if not cands:
            b = (min(4, m), min(4, n))
            if budget >= m + n + b[0] * b[1]:
                cands = [b]
            else:
                cands = [(1, 1)]
        return cands
    if isinstance(blocks, str):
        raise TypeError(f"blocks must be 'auto', an int or a pair (b1, b2); got {blocks!r}")
    b1, b2 = check_pair(blocks, "blocks")
    if b1 > m or b2 > n:
        raise ValueError(
            f"blocks={(b1, b2)} needs b1 <= m and b2 <= n (every block non-empty); the matrix "
            f"is {m} x {n}"
        )
    return [(b1, b2)]


def fit_blast(
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
) -> FitResult:
    """Fit a BLAST matrix to a validated ``(m, n)`` tensor ``W`` within ``budget`` MACs.

    Same options as :meth:`~gblr_approx.BLAST.project` (``steps="auto"``: :func:`auto_steps`,
    200 unless the layer is large). Returns a :class:`~gblr_approx.FitResult`
    (``.matrix``, ``.history`` with one record per iteration of the kept block grid: ``step``,
    ``stage`` (``"blast:4x4"``...), ``rel_error``, ``loss``, ``lr``, ``damping``, ``flops``,
    ``components`` (the rank), ``seconds``; ``.rel_error``, ``.budget``, ``.seconds``,
    ``.info``), like :func:`~gblr_approx.fit_gblr`.
    Raises :class:`~gblr_approx.budget.InfeasibleBudgetError` when even rank 1 does not fit.
    """
    m, n = W.shape
    auto = isinstance(steps, str) and steps == "auto"
    if not auto:
        if isinstance(steps, str):
            raise TypeError(f"steps must be an integer >= 0 or 'auto'; got {steps!r}")
        steps = check_positive_int(steps, "steps", minimum=0)
    for name, v, lo in (("lr", lr, 0.0), ("damping", damping, 0.0),
                        ("end_factor", end_factor, 0.0), ("prune", prune, 0.0)):
        if not isinstance(v, (int, float)) or not (v >= lo) or v != v or v == float("inf"):
            raise ValueError(f"{name} must be a finite number >= {lo}; got {v!r}")
    if lr <= 0:
        raise ValueError(f"lr must be > 0; got {lr}")
    if init not in ("svd", "random"):
        raise ValueError(f"init must be 'svd' or 'random'; got {init!r}")
    # fit W / s (s a power of two, 1 for ordinary magnitudes: formats.base.fit_scale): the
    # norms of entries near 1e20 or 1e-25 over- or underflow float32; U is scaled back by s
    scale = fit_scale(W)
    if scale != 1.0:
        W = W / scale
    # the finest grid first: it usually wins, and later candidates can stop early
    cands = sorted(_resolve_blocks(blocks, m, n, budget), key=lambda b: -b[0] * b[1])
    ranks = []
    for b1, b2 in cands:
        per_rank = m + n + b1 * b2
        if rank is None:
            r = budget // per_rank
            if r < 1:
                raise InfeasibleBudgetError(
                    "blast", budget, per_rank, f"rank 1 on a {b1}x{b2} grid costs m+n+b1*b2"
                )
        else:
            r = check_positive_int(rank, "rank")
            if r * per_rank > budget:
                raise InfeasibleBudgetError(
                    "blast", budget, r * per_rank, f"rank={r} on a {b1}x{b2} grid costs "
                    "r*(m+n+b1*b2)"
                )
        ranks.append(r)
    # large layers under steps="auto": as many iterations as AUTO_FIT_MACS buys
    budgeted = False
    if auto:
        steps = auto_steps(m, n, [(b1, b2, r) for (b1, b2), r in zip(cands, ranks, strict=True)])
        budgeted = steps < AUTO_STEPS
    # one truncated SVD for every grid's start (the largest rank; each takes its leading part)
    svd = None
    if init == "svd" and len(cands) > 1:
        svd = top_svd(W, min(max(ranks), m, n), seed=seed)
    results = []
    for (b1, b2), r in zip(cands, ranks, strict=True):
        cb = callback
        if results and prune == 0:
            # a later candidate is abandoned when it trails the best finished one at the same
            # step of the (identical) schedule: on the MiniLM layers the ranking of 4x4 vs
            # 16x16 is settled within 10 steps and never changes afterwards; a budgeted
            # (large-layer) schedule checks after a third of its few steps
            lead = min(results, key=lambda t: t[2].rel_error)[2].history
            check = max(1, steps // 3) if budgeted else min(max(10, steps // 8), steps)

            def cb(t: int, e: float, lead=lead, check=check, user=callback) -> bool:
                if user is not None and user(t, e):
                    return True
                return t == check and t < len(lead) and e > lead[t]["rel_error"]

        res = fit_blast_factors(
            W, r, balanced_splits(m, b1), balanced_splits(n, b2), steps=steps, lr=lr,
            end_factor=end_factor, damping=damping, prune=prune, init=init, seed=seed,
            progress=progress, callback=cb, svd=svd,
        )
        results.append(((b1, b2), r, res))
    (b1, b2), r, res = min(results, key=lambda t: t[2].rel_error)
    U, V, S = res.U, res.V, res.S
    pruned = 0
    if prune > 0:
        keep = torch.linalg.vector_norm(S, dim=(0, 1)) > 0
        if not bool(keep.any()):
            keep[0] = True
        pruned = int((~keep).sum())
        U, V, S = U[:, keep].contiguous(), V[:, keep].contiguous(), S[:, :, keep].contiguous()
    A = BLAST(U if scale == 1.0 else U * scale, V, S, res.row_splits, res.col_splits)
    A.info = {
        "algorithm": "preconditioned alternating gradient descent (BLAST), SVD start",
        "blocks": [b1, b2],
        "rank": A.rank,
        "rel_error": res.rel_error,
        "best_step": res.best_step,
        "stopped": res.stopped,
        "fit_seconds": res.seconds,
        "steps": steps,
        "steps_rule": "auto (AUTO_FIT_MACS)" if budgeted else "auto" if auto else "given",
        "lr": lr, "damping": damping, "end_factor": end_factor,
        "prune": prune, "init": init, "seed": seed,
        "history": [h["rel_error"] for h in res.history],
        **res.info,  # init_svd (exact/randomized), layout (batched/frugal), chunks
    }
    if prune > 0:
        A.info["pruned_ranks"] = pruned
    if scale != 1.0:
        A.info["input_scale"] = scale
    if res.stopped == "non-finite":
        A.info["warning"] = (
            f"an iterate became NaN/Inf at step {len(res.history) - 1}; the best finite "
            f"iterate (step {res.best_step}) was returned"
        )
    if len(results) > 1:
        A.info["candidates"] = [
            {"blocks": list(b), "rank": rr, "rel_error": rz.rel_error,
             "steps_run": len(rz.history) - 1} for b, rr, rz in results
        ]
    stage = f"blast:{b1}x{b2}"
    history = [{**h, "stage": stage, "flops": A.flops, "components": A.rank}
               for h in res.history]
    return FitResult(matrix=A, history=history, rel_error=res.rel_error, budget=int(budget),
                     seconds=sum(rz.seconds for _, _, rz in results), info=dict(A.info))
