"""Data-aware projection: minimise the output error ``||(W - A) L||_F`` for ``G = L L^T``.

For a linear layer ``y = W x`` and calibration inputs ``X`` (columns), the output error of an
approximation ``A`` is ``||(W - A) X||_F^2 = tr((W - A) G (W - A)^T)`` with the input Gram
``G = X X^T`` (n x n, see :func:`gblr_approx.nn.collect_grams`). ``project(W, fmt, budget,
gram=G)`` minimises it instead of the weight error ``||W - A||_F``.

Ridge
-----
A Gram from fewer calibration rows than ``n`` (or with dead input features) is singular and
the minimiser is then not unique. Every algorithm here uses ``G_r = G + ridge * (tr G / n) I``
(``ridge=1e-6`` by default, relative to the mean diagonal), i.e. it minimises
``||(W - A) X||_F^2 + ridge * (tr G / n) ||W - A||_F^2``: among the output-error minimisers the
one closest to ``W``. Errors are always *reported* with the Gram as given.

Algorithms (exact or heuristic)
-------------------------------
* **lowrank** -- exact: with ``G_r = L L^T`` (Cholesky), ``A = [W L]_r L^{-1}`` where ``[.]_r``
  is the truncated SVD (the whitened SVD of SVD-LLM, Wang et al. 2024): the substitution
  ``B = A L`` turns the problem into Eckart-Young for ``W L``.
* **blocksparse** -- the support is chosen twice (by weight energy, as without ``gram``, and by
  the output energy ``||W_b L_b||_F^2`` of each block with ``G_bb = L_b L_b^T`` the Gram
  restricted to the block's columns); for a fixed support the values are the *exact* weighted
  least-squares optimum, one solve per row block: ``A_{i,S} = W_i G_{:,S} G_{S,S}^{-1}`` over
  the union ``S`` of the row block's chosen column blocks (rows decouple).
* **blocklowrank**, **monarch** -- components on disjoint row sets within each column group
  (column blocks; Monarch's contiguous input chunks with strided rows). Block-coordinate
  descent over column groups: with the other groups fixed, the best group is *exact* -- for
  residual target ``T = (W - A_other) G_{:,C} G_{C,C}^{-1}`` each block is the whitened SVD of
  its rows of ``T`` with ``G_{C,C}``. The sweep is monotone (never increases the error) but the
  joint problem is non-convex: a heuristic overall. Ranks / configuration come from the fit
  (unweighted, and on ``W D^{1/2}`` with ``D = diag(G)``, see below).
* **gblr** -- structure from :func:`~gblr_approx.fit_gblr`, then block-coordinate descent over
  its components (:mod:`gblr_approx.fit.gblr.weighted`), exact per component, heuristic overall.
* **blast** -- weighted alternating least squares on the fixed block grid and rank: exact
  per row block for ``U_i``, per column block for ``V_j`` and per block for ``s_ij``
  (each a least-squares problem), heuristic overall.

Every structured format is also fitted to ``W D^{1/2}`` (``D = diag(G_r)``) and scaled back,
``A = A' D^{-1/2}``: a column scaling keeps every format's structure, and it is the exact
data-aware projection when ``G`` is diagonal (it captures outlier input features). The result
is the best, in output error, of: the unweighted projection, its refit, the scaled projection
and its refit -- so ``gram=`` is never worse in output error than ``gram=None``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .formats.base import StructuredMatrix, get_format
from .linalg import svd

__all__ = [
    "project_data_aware",
    "output_error",
    "check_gram",
    "whitened_lowrank",
    "regularised_gram",
    "scale_columns",
    "REFITS",
]

DEFAULT_RIDGE = 1e-6
DEFAULT_SWEEPS = 6
#: A Gram is refused as not PSD when ``G + PSD_TOL * tr(G) I`` has no Cholesky factor
#: (:func:`check_gram`): an eigenvalue below ``-PSD_TOL * tr(G)``, far beyond rounding.
PSD_TOL = 1e-6


# ----------------------------------------------------------------------- basics
def check_gram(gram: Any, n: int) -> torch.Tensor:
    """Validate an input Gram matrix; return it as float64 (CPU or its device), symmetrised.

    Raises
    ------
    TypeError, ValueError
        Not a tensor/array, wrong shape, non-finite entries, or not positive semi-definite
        (an eigenvalue below ``-PSD_TOL * tr(G)``, checked by one Cholesky factorisation).
    """
    if not isinstance(gram, torch.Tensor):
        try:
            import numpy as np

            if isinstance(gram, np.ndarray):
                gram = torch.from_numpy(gram)
        except ImportError:  # pragma: no cover
            pass
    if not isinstance(gram, torch.Tensor):
        raise TypeError(f"gram must be a torch.Tensor or numpy array; got {type(gram).__name__}")
    if gram.ndim != 2 or gram.shape != (n, n):
        raise ValueError(
            f"gram must be the ({n}, {n}) input Gram matrix X X^T of the layer's {n} input "
            f"features; got shape {tuple(gram.shape)}"
        )
    if not (gram.is_floating_point()):
        raise TypeError(f"gram must be floating point; got {gram.dtype}")
    G = gram.detach().to(torch.float64)
    if not bool(torch.isfinite(G).all()):
        raise ValueError("gram contains NaN or Inf entries")
    d = torch.diagonal(G)
    if bool((d < -1e-9 * max(float(d.abs().max()), 1e-300)).any()):
        raise ValueError("gram has negative diagonal entries; it must be X X^T (PSD)")
    if float(d.sum()) <= 0:
        raise ValueError("gram is zero: the calibration inputs were all zero")
    G = 0.5 * (G + G.T)
    # PSD up to rounding: one Cholesky of G shifted by PSD_TOL * tr(G) (>= PSD_TOL * the
    # largest eigenvalue, far above float32 accumulation error); n^3 / 3 MACs, once per layer
    shift = PSD_TOL * float(d.sum())
    _, info = torch.linalg.cholesky_ex(G + shift * torch.eye(n, dtype=G.dtype, device=G.device))
    if int(info) != 0:
        low = float(torch.linalg.eigvalsh(G)[0])
        raise ValueError(
            f"gram is not positive semi-definite (smallest eigenvalue {low:.4g}, trace "
            f"{float(d.sum()):.4g}); it must be X X^T of the layer's inputs"
        )
    return G


def regularised_gram(G: torch.Tensor, ridge: float = DEFAULT_RIDGE) -> torch.Tensor:
    """``G + ridge * (tr G / n) I`` (float64), see the module docstring."""
    if not (isinstance(ridge, (int, float)) and math.isfinite(ridge) and ridge >= 0):
        raise ValueError(f"ridge must be a finite number >= 0; got {ridge!r}")
    n = G.shape[0]
    lam = float(ridge) * float(torch.diagonal(G).sum()) / n
    return G + lam * torch.eye(n, dtype=G.dtype, device=G.device)


def _chol(G: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factor, adding jitter if the factorisation fails (numerically singular)."""
    L, info = torch.linalg.cholesky_ex(G)
    jitter = 1e-12 * float(torch.diagonal(G).mean()) if G.numel() else 0.0
    while int(info) != 0:
        jitter = max(jitter * 10, 1e-300)
        L, info = torch.linalg.cholesky_ex(
            G + jitter * torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
        )
    return L


def output_error(W: Any, A: Any, gram: torch.Tensor, relative: bool = True) -> float:
    """``||(W - A) L||_F`` (``G = L L^T``), divided by ``||W L||_F`` when ``relative``.

    Computed as ``sqrt(tr(E G E^T))`` with ``E = W - A`` in float64 (``m n^2`` MACs).
    """
    Wd = torch.as_tensor(W).to(torch.float64)
    Ad = A.to_dense() if isinstance(A, StructuredMatrix) else torch.as_tensor(A)
    G = gram.to(device=Wd.device, dtype=torch.float64)
    E = Wd - Ad.to(device=Wd.device, dtype=torch.float64)
    num = float((E * (E @ G)).sum().clamp_min(0))
    if not relative:
        return math.sqrt(num)
    den = float((Wd * (Wd @ G)).sum())
    return math.sqrt(num / den) if den > 0 else (0.0 if num == 0 else math.inf)


def _weighted_truncation(
    T: torch.Tensor, L: torch.Tensor, r: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``r`` ``U V^T`` for ``min ||(T - U V^T) L||_F`` (L lower triangular, invertible).

    ``U = P_r S_r^{1/2}``, ``V = L^{-T} Q_r S_r^{1/2}`` from the SVD ``T L = P S Q^T``.
    Cost ``O(h w min(h, w) + h w^2)``.
    """
    h, w = T.shape
    r = min(r, h, w)
    if r <= 0:
        return T.new_zeros(h, 0), T.new_zeros(w, 0)
    P, S, Qh = svd(T @ L)
    s = S[:r].sqrt()
    U = P[:, :r] * s
    V = torch.linalg.solve_triangular(L.T, Qh[:r].T * s, upper=True)
    return U, V


def whitened_lowrank(
    W: torch.Tensor, G: torch.Tensor, r: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact minimiser of ``||(W - U V^T) L||_F`` over rank ``r`` (``G = L L^T`` positive definite).

    Returns ``U (m, r)``, ``V (n, r)`` and the singular values of ``W L`` (all of them). Cost:
    Cholesky ``n^3 / 3``, ``W L`` ``m n^2``, SVD ``O(m n min(m, n))``.
    """
    L = _chol(G)
    P, S, Qh = svd(W @ L)
    s = S[:r].sqrt()
    U = P[:, :r] * s
    V = torch.linalg.solve_triangular(L.T, Qh[:r].T * s, upper=True)
    return U, V, S


# -------------------------------------------------------- column scaling (exact)
def scale_columns(A: StructuredMatrix, d: torch.Tensor) -> StructuredMatrix:
    """``A diag(d)`` in ``A``'s own format (``d`` of shape (n,)); structure and cost unchanged.

    Supported: lowrank, blocksparse, blocklowrank, monarch, blast, gblr, dense.
    """
    from .formats import BLAST, GBLR, BlockLowRank, BlockSparse, Dense, LowRank, Monarch

    d = d.to(device=A.device, dtype=A.dtype)
    if isinstance(A, LowRank):
        return LowRank(A.U, A.V * d[:, None])
    if isinstance(A, Dense):
        return Dense(A.to_dense() * d)
    if isinstance(A, BlockSparse):
        bc = A.block_shape[1]
        dp = d.new_zeros(A.grid[1] * bc)
        dp[: d.shape[0]] = d
        scale = dp.view(A.grid[1], bc)[A.block_cols]  # (nb, bc)
        return BlockSparse(A.shape, A.block_shape, A.block_rows, A.block_cols,
                           A.blocks * scale[:, None, :])
    if isinstance(A, BlockLowRank):
        cs = A.col_splits
        factors = [[(U, V * d[cs[j]: cs[j + 1], None]) for j, (U, V) in enumerate(row)]
                   for row in A.factors]
        return BlockLowRank(A.shape, A.row_splits, cs, factors)
    if isinstance(A, Monarch):
        if A.transposed:
            # A = M^T: scaling A's columns scales M's rows = w2's rows (row l*J + j of M)
            J, Lr = A.out_blocks, A.w2.shape[1]
            s = d.view(Lr, J).T  # (J, Lr)
            return Monarch(A.w1, A.w2 * s[:, :, None], transposed=True)
        K, I = A.in_blocks, A.w1.shape[2]
        return Monarch(A.w1 * d.view(K, 1, I), A.w2)
    if isinstance(A, BLAST):
        return BLAST(A.U, A.V * d[:, None], A.S, A.row_splits, A.col_splits)
    if isinstance(A, GBLR):
        factors = []
        for k in range(A.num_components):
            cols = A.col_indices(k)
            if bool(A.is_dense[k]):
                factors.append(A.block(k) * d[cols])
            else:
                U, V = A.component(k)
                factors.append((U, V * d[cols][:, None]))
        return GBLR(A.shape, A.row_start, A.row_width, A.col_start, A.col_width, factors,
                    dtype=A.dtype, device=A.device)
    raise TypeError(f"scale_columns does not support format {A.format_name!r}")


# ---------------------------------------------------------- refits (structure fixed)
def _refit_lowrank(W, A, G, sweeps):
    from .formats import LowRank

    U, V, _ = whitened_lowrank(W, G, A.rank)
    return LowRank(U, V)


def _refit_blocksparse(W, A, G, sweeps):
    """Exact weighted least squares on the fixed support, one solve per row block."""
    from .formats import BlockSparse

    m, n = W.shape
    br, bc = A.block_shape
    rows = A.block_rows.tolist()
    cols = A.block_cols.tolist()
    blocks = W.new_zeros(len(rows), br, bc)
    by_row: dict[int, list[int]] = {}
    for t, i in enumerate(rows):
        by_row.setdefault(i, []).append(t)
    for i, ts in by_row.items():
        r0, r1 = i * br, min((i + 1) * br, m)
        idx = torch.cat([torch.arange(cols[t] * bc, min((cols[t] + 1) * bc, n)) for t in ts])
        idx = idx.to(W.device)
        Gs = G[idx][:, idx]
        rhs = W[r0:r1] @ G[:, idx]  # (h, |S|)
        L = _chol(Gs)
        M = torch.cholesky_solve(rhs.T, L).T  # rhs Gs^{-1}
        off = 0
        for t in ts:
            w = min((cols[t] + 1) * bc, n) - cols[t] * bc
            blocks[t, : r1 - r0, :w] = M[:, off: off + w]
            off += w
    return BlockSparse(A.shape, A.block_shape, A.block_rows, A.block_cols, blocks)


def _group_bcd(W, G, groups, sweeps):
    """Block-coordinate descent over column groups.

    ``groups``: list of ``(cols, [(rows, rank, U, V), ...])`` with disjoint rows within a
    group; ``rank=None`` marks a dense block (``U`` is the block, ``V`` None). Updates the
    factors in place and returns ``groups``. Each step is the exact minimiser over one group.
    """
    m, n = W.shape
    chols = [_chol(G[c][:, c]) for c, _ in groups]

    def group_dense(parts, cols):
        D = W.new_zeros(m, len(cols))
        for rows, rank, U, V in parts:
            D[rows] = U if rank is None else U @ V.T
        return D

    A = W.new_zeros(m, n)
    for cols, parts in groups:
        A[:, cols] += group_dense(parts, cols)
    E = W - A
    for _ in range(sweeps):
        for g, (cols, parts) in enumerate(groups):
            old = group_dense(parts, cols)
            E[:, cols] += old  # residual without this group
            L = chols[g]
            T = torch.cholesky_solve((E @ G[:, cols]).T, L).T  # (m, |C|)
            new_parts = []
            for rows, rank, _, _ in parts:
                if rank is None:
                    new_parts.append((rows, None, T[rows], None))
                else:
                    U, V = _weighted_truncation(T[rows], L, rank)
                    new_parts.append((rows, rank, U, V))
            parts[:] = new_parts
            E[:, cols] -= group_dense(parts, cols)
    return groups


def _refit_blocklowrank(W, A, G, sweeps):
    from .formats import BlockLowRank

    rs, cs = A.row_splits, A.col_splits
    dev = W.device
    groups = []
    for j in range(len(cs) - 1):
        cols = torch.arange(cs[j], cs[j + 1], device=dev)
        parts = []
        for i in range(len(rs) - 1):
            U, V = A.factors[i][j]
            parts.append((torch.arange(rs[i], rs[i + 1], device=dev), U.shape[1], U, V))
        groups.append((cols, parts))
    _group_bcd(W, G, groups, sweeps)
    factors = [[None] * (len(cs) - 1) for _ in range(len(rs) - 1)]
    for j, (_, parts) in enumerate(groups):
        for i, (_, _, U, V) in enumerate(parts):
            factors[i][j] = (U.contiguous(), V.contiguous())
    return BlockLowRank(A.shape, rs, cs, factors)


def _refit_monarch(W, A, G, sweeps):
    from .formats import Monarch

    if A.transposed:
        return None  # projections never produce it; nothing to refit
    K, J, R = A.in_blocks, A.out_blocks, A.rank
    m, n = A.shape
    Lr, I = m // J, n // K
    dev = W.device
    # current slice factors: S_kj = P[k, j] Q[k, j] with P (Lr, R), Q (R, I)
    Q = A.w1.view(K, R, J, I).permute(0, 2, 1, 3)  # (K, J, R, I)
    P = A.w2.view(J, Lr, K, R).permute(2, 0, 1, 3)  # (K, J, Lr, R)
    groups = []
    for k in range(K):
        cols = torch.arange(k * I, (k + 1) * I, device=dev)
        parts = [(torch.arange(Lr, device=dev) * J + j, R, P[k, j], Q[k, j].T)
                 for j in range(J)]
        groups.append((cols, parts))
    _group_bcd(W, G, groups, sweeps)
    Pn = torch.stack([torch.stack([U for _, _, U, _ in parts]) for _, parts in groups])
    Qn = torch.stack([torch.stack([V.T for _, _, _, V in parts]) for _, parts in groups])
    w1 = Qn.permute(0, 2, 1, 3).reshape(K, R * J, I).contiguous()
    w2 = Pn.permute(1, 2, 0, 3).reshape(J, Lr, K * R).contiguous()
    return Monarch(w1, w2)


def _refit_gblr(W, A, G, sweeps):
    from .fit.gblr.weighted import refit_gblr_weighted

    return refit_gblr_weighted(W, A, G, sweeps=sweeps)


def _refit_blast(W, A, G, sweeps):
    """Weighted ALS for BLAST (U per row block, V per column block, s per block)."""
    from .formats import BLAST

    rs, cs = A.row_splits, A.col_splits
    b1, b2 = A.blocks
    U, V, S = A.U.clone(), A.V.clone(), A.S.clone()
    m, n = W.shape
    r = U.shape[1]
    cslices = [slice(cs[j], cs[j + 1]) for j in range(b2)]
    rslices = [slice(rs[i], rs[i + 1]) for i in range(b1)]
    chols = [_chol(G[c, c]) for c in cslices]
    eye = torch.eye(r, dtype=W.dtype, device=W.device)

    def dense():
        return BLAST(U, V, S, rs, cs).to_dense()

    for _ in range(sweeps):
        # U_i: rows of block row i are A_i = U_i Z_i, Z_i = [diag(s_ij) V_j^T]_j (r, n)
        for i, ri in enumerate(rslices):
            Z = torch.cat([(V[c] * S[i, j]).T for j, c in enumerate(cslices)], dim=1)
            H = Z @ G @ Z.T
            H = H + 1e-12 * float(torch.diagonal(H).mean().clamp_min(1e-300)) * eye
            U[ri] = torch.linalg.solve(H, (W[ri] @ G @ Z.T).T).T
        # V_j with the other column blocks fixed: exact least squares
        E = W - dense()
        for j, c in enumerate(cslices):
            Uj = torch.cat([U[ri] * S[i, j] for i, ri in enumerate(rslices)], dim=0)  # (m, r)
            E[:, c] += Uj @ V[c].T
            T = torch.cholesky_solve((E @ G[:, c]).T, chols[j]).T  # (m, q)
            H = Uj.T @ Uj + 1e-12 * float(torch.diagonal(Uj.T @ Uj).mean().clamp_min(1e-300)) * eye
            V[c] = torch.linalg.solve(H, Uj.T @ T).T
            E[:, c] -= Uj @ V[c].T
        # s_ij: per block, an r x r least-squares problem in the column block's metric
        for j, c in enumerate(cslices):
            Gc = G[c, c]
            E[:, c] = W[:, c] - torch.cat(
                [(U[ri] * S[i, j]) @ V[c].T for i, ri in enumerate(rslices)], dim=0)
            T = torch.cholesky_solve((E @ G[:, c]).T, chols[j]).T
            VGV = V[c].T @ Gc @ V[c]
            for i, ri in enumerate(rslices):
                Ui = U[ri]
                Tij = T[ri] + (Ui * S[i, j]) @ V[c].T
                H = (Ui.T @ Ui) * VGV
                H = H + 1e-12 * float(torch.diagonal(H).mean().clamp_min(1e-300)) * eye
                rhs = torch.einsum("pt,pq,qt->t", Ui, Tij @ Gc, V[c])
                S[i, j] = torch.linalg.solve(H, rhs)
            E[:, c] = W[:, c] - torch.cat(
                [(U[ri] * S[i, j]) @ V[c].T for i, ri in enumerate(rslices)], dim=0)
    return BLAST(U, V, S, rs, cs)


#: Format name -> refit ``(W, A, G_r, sweeps) -> StructuredMatrix | None`` (structure fixed).
REFITS = {
    "lowrank": _refit_lowrank,
    "blocksparse": _refit_blocksparse,
    "blocklowrank": _refit_blocklowrank,
    "monarch": _refit_monarch,
    "gblr": _refit_gblr,
    "blast": _refit_blast,
}


# ------------------------------------------------------------------------ driver
def project_data_aware(
    W: torch.Tensor,
    format: str,
    budget: int,
    gram: torch.Tensor,
    *,
    ridge: float = DEFAULT_RIDGE,
    sweeps: int = DEFAULT_SWEEPS,
    scaled: bool = True,
    **options: Any,
) -> StructuredMatrix:
    """Data-aware projection of a validated ``W`` (m, n) within ``budget`` MACs (int).

    See the module docstring for the algorithms. ``ridge``: relative ridge of the Gram;
    ``sweeps``: block-coordinate sweeps of the refits; ``scaled``: also fit the structure to
    ``W D^{1/2}`` (one more unweighted fit). Other ``options`` go to the format's projection.
    The result's ``info`` holds ``output_error`` (relative, with the Gram as given),
    ``output_error_unweighted`` (of the plain projection) and ``data_aware`` (which candidate
    won).
    """
    cls = get_format(format)
    name = cls.format_name
    m, n = W.shape
    G0 = check_gram(gram, n).to(W.device)
    if not isinstance(sweeps, int) or isinstance(sweeps, bool) or sweeps < 0:
        raise ValueError(f"sweeps must be an int >= 0; got {sweeps!r}")
    Gr = regularised_gram(G0, ridge)
    Wd = W.to(torch.float64)
    out_dtype = W.dtype

    if name == "lowrank":
        plain = cls.project(W, budget, **options)
        U, V, _ = whitened_lowrank(Wd, Gr, plain.rank)
        A = type(plain)(U.to(out_dtype).contiguous(), V.to(out_dtype).contiguous())
        # the whitened SVD is always exact: the plain fit's SVD record moves to
        # "unweighted_svd" (it chose the rank and is the fallback candidate)
        svd_keys = ("svd", "method", "oversample", "power_iters", "seed")
        A.info = {k: v for k, v in plain.info.items() if k not in svd_keys}
        A.info.update(algorithm="whitened truncated SVD (exact data-aware)", svd="exact",
                      unweighted_svd={k: plain.info[k] for k in svd_keys if k in plain.info})
        e_plain, e_new = output_error(Wd, plain, G0), output_error(Wd, A, G0)
        A.info.update(output_error=e_new, output_error_unweighted=e_plain,
                      data_aware="whitened", ridge=ridge)
        return A if e_new <= e_plain else _tag(plain, e_plain, e_plain, "unweighted", ridge)

    plain = cls.project(W, budget, **options)
    cands: list[tuple[str, StructuredMatrix]] = [("unweighted", plain)]
    refit = REFITS.get(name)
    if refit is not None:
        r = refit(Wd, plain.to(dtype=torch.float64), Gr, sweeps)
        if r is not None:
            cands.append(("unweighted+refit", r))
    if scaled and name != "dense":
        d = torch.diagonal(Gr).sqrt()
        d = torch.where(d > 0, d, torch.ones_like(d))
        Ws = (Wd * d).to(W.dtype)
        sc = scale_columns(cls.project(Ws, budget, **options).to(dtype=torch.float64), 1.0 / d)
        cands.append(("scaled", sc))
        if refit is not None:
            r = refit(Wd, sc, Gr, sweeps)
            if r is not None:
                cands.append(("scaled+refit", r))
    if name == "blocksparse":
        cands.append(("output-energy support+refit",
                      _refit_blocksparse(Wd, _output_energy_support(Wd, Gr, budget, plain), Gr,
                                         sweeps)))
    errs = [(output_error(Wd, A, G0), t, label, A) for t, (label, A) in enumerate(cands)]
    errs = [e for e in errs if math.isfinite(e[0])]
    err, _, label, best = min(errs, key=lambda e: (e[0], e[1]))
    if best.flops > budget:  # pragma: no cover - refits never change the structure
        raise RuntimeError(f"data-aware {name} exceeded the budget: {best.flops} > {budget}")
    best = best.to(dtype=out_dtype)
    best.info = {**plain.info, **({"algorithm": plain.info.get("algorithm", "") +
                                   f" + data-aware ({label})"} if label != "unweighted" else {})}
    return _tag(best, err, errs[0][0], label, ridge)


def _tag(A, err, err_plain, label, ridge):
    A.info.update(output_error=err, output_error_unweighted=err_plain, data_aware=label,
                  ridge=ridge)
    return A


def _output_energy_support(W, G, budget, plain):
    """Block-sparse support by output energy ``||W_b L_b||_F^2``, same grid and greedy as plain."""
    from .formats import BlockSparse

    m, n = W.shape
    br, bc = plain.block_shape
    gr, gc = plain.grid
    score = torch.zeros(gr, gc, dtype=torch.float64)
    size = torch.zeros(gr, gc, dtype=torch.long)
    for j in range(gc):
        c0, c1 = j * bc, min((j + 1) * bc, n)
        P = W[:, c0:c1] @ G[c0:c1, c0:c1]
        e = (P * W[:, c0:c1]).sum(dim=1)  # per row: w G_cc w^T
        for i in range(gr):
            r0, r1 = i * br, min((i + 1) * br, m)
            score[i, j] = e[r0:r1].sum()
            size[i, j] = (r1 - r0) * (c1 - c0)
    order = torch.argsort((score / size).flatten(), descending=True, stable=True).tolist()
    used, rows, cols = 0, [], []
    min_size = int(size.min())
    for idx in order:
        s = int(size.flatten()[idx])
        if used + s <= budget:
            rows.append(idx // gc)
            cols.append(idx % gc)
            used += s
        if budget - used < min_size:
            break
    rows_t = torch.tensor(rows, dtype=torch.long, device=W.device)
    cols_t = torch.tensor(cols, dtype=torch.long, device=W.device)
    blocks = W.new_zeros(len(rows), br, bc)
    return BlockSparse((m, n), (br, bc), rows_t, cols_t, blocks)
