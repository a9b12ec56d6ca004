"""Data-aware refit of a GBLR matrix with its structure fixed.

Minimises the output error ``tr((W - A) G (W - A)^T)`` (``G`` an ``n x n`` positive definite
input Gram, see :mod:`gblr_approx.data_aware`) over the factors of every component of a hard
GBLR matrix, keeping every rectangle and rank. Block-coordinate descent over components: with
the others fixed, component ``k`` on rows ``R`` and columns ``C`` is best when it is the
whitened rank-``r_k`` truncation of ``T = E_R G_{:,C} G_{C,C}^{-1}`` (``E`` the residual
without component ``k``) in the metric ``G_{C,C}`` (exact per step, completing the square).
Forming ``T`` costs ``h_k w_k n`` MACs, too much for GBLR's many wide rank-1 components, so a
factored component takes one exact alternating step instead: ``U_k`` by least squares with
``V_k`` fixed, ``U_k = E_R G_{:,C} V_k (V_k^T G_{C,C} V_k)^{-1}``, then ``V_k`` with ``U_k`` fixed,
``V_k = G_{C,C}^{-1} G_{C,:} E_R^T U_k (U_k^T U_k)^{-1}``, at ``O((h_k + w_k) n r_k)`` MACs. Every
step minimises the error exactly over one factor, so every sweep is monotone; the joint problem
is non-convex, so the result is a local optimum (a heuristic). A dense component gets ``T``
itself (exact least squares).

Cost per sweep: ``sum_k (h_k + w_k) n r_k + h_k w_k`` MACs for factored components, plus
``h_k w_k n`` for dense ones, plus a Cholesky factor of each ``G_{C,C}`` (once).
"""

from __future__ import annotations

from typing import Any

import torch

from ...formats.gblr import GBLR
from ..result import FitResult

__all__ = ["refit_gblr_weighted", "fit_gblr_data_aware"]


def refit_gblr_weighted(W: torch.Tensor, A: GBLR, G: torch.Tensor, *, sweeps: int = 6) -> GBLR:
    """Refit the factors of ``A`` (same rectangles and ranks) to minimise ``||(W - A) L||_F``.

    Parameters
    ----------
    W : Tensor (m, n), float64
    A : GBLR, shape (m, n)
        The structure (and starting factors).
    G : Tensor (n, n), float64, positive definite (regularised; ``G = L L^T``).
    sweeps : int
        Passes over all components.

    Returns
    -------
    GBLR
        Same intervals, ranks and cost (``flops``) as ``A``, float64.
    """
    from ...data_aware import _chol

    A = A.to(dtype=torch.float64, device=W.device)
    K = A.num_components
    rows = [A.row_indices(k).to(W.device) for k in range(K)]
    cols = [A.col_indices(k).to(W.device) for k in range(K)]
    dense = [bool(A.is_dense[k]) for k in range(K)]
    ranks = [int(A.ranks[k]) for k in range(K)]
    facs: list = []
    for k in range(K):
        facs.append(A.block(k) if dense[k] else A.component(k))
    E = W - A.to_dense()
    chols: dict[int, torch.Tensor] = {}
    for _ in range(sweeps):
        for k in range(K):
            R, C = rows[k], cols[k]
            if R.numel() == 0 or C.numel() == 0 or (not dense[k] and ranks[k] == 0):
                continue
            ix = (R[:, None], C[None, :])
            old = facs[k] if dense[k] else facs[k][0] @ facs[k][1].T
            E.index_put_(ix, old, accumulate=True)
            if k not in chols:
                chols[k] = _chol(G[C][:, C])
            L = chols[k]
            ER = E[R]  # (h, n): residual rows without component k
            if dense[k]:
                T = torch.cholesky_solve((ER @ G[:, C]).T, L).T  # (h, w)
                facs[k] = T
                new = T
            else:
                U, V = facs[k]
                r = U.shape[1]
                eye = torch.eye(r, dtype=W.dtype, device=W.device)
                GV = G[:, C] @ V  # (n, r)
                H = V.T @ GV[C]  # V^T G_CC V
                H = H + 1e-12 * float(torch.diagonal(H).mean().clamp_min(1e-300)) * eye
                U = torch.linalg.solve(H, (ER @ GV).T).T  # (h, r)
                HU = U.T @ U
                HU = HU + 1e-12 * float(torch.diagonal(HU).mean().clamp_min(1e-300)) * eye
                rhs = G[C] @ (ER.T @ U)  # (w, r) = G_{C,:} E_R^T U
                V = torch.linalg.solve(HU, torch.cholesky_solve(rhs, L).T).T
                facs[k] = (U, V)
                new = U @ V.T
            E.index_put_(ix, -new, accumulate=True)
    out = GBLR(A.shape, A.row_start, A.row_width, A.col_start, A.col_width, facs,
               dtype=torch.float64, device=W.device)
    out.info = dict(A.info)
    return out


def fit_gblr_data_aware(W: Any, budget: float | int, gram: Any, **options: Any) -> FitResult:
    """``fit_gblr(W, budget, gram=G)``: the data-aware GBLR fit.

    Runs :func:`gblr_approx.data_aware.project_data_aware` for ``"gblr"`` (``fit_gblr`` on
    ``W`` and on ``W diag(G)^{1/2}``, each refitted by :func:`refit_gblr_weighted`; the best in
    output error is kept, never worse than the plain fit). ``ridge``, ``sweeps`` and
    ``scaled`` are taken from ``options``; the rest go to ``fit_gblr``. The history is that of
    the winning candidate's structure fit only when it is the plain one; ``info`` records
    ``output_error`` and ``output_error_unweighted``.
    """
    import time

    from ...budget import resolve_budget
    from ...data_aware import project_data_aware
    from ...metrics import relative_error
    from ...validation import as_matrix

    Wt = as_matrix(W, "W")
    b = resolve_budget(budget, *Wt.shape)
    t0 = time.perf_counter()
    with torch.no_grad():
        A = project_data_aware(Wt, "gblr", b, gram, **options)
    info = dict(A.info)
    return FitResult(matrix=A, history=[], rel_error=relative_error(Wt, A), budget=b,
                     seconds=time.perf_counter() - t0, info=info)
