"""Fitting a BLAST matrix to a dense matrix: preconditioned alternating gradient descent.

The model (see :class:`gblr_approx.formats.blast.BLAST`) cuts an ``m x n`` matrix into a
``b1 x b2`` grid of blocks and writes block ``(i, j)`` as ``B_i diag(s_ij) C_j`` with
``B_i (p_i, r)``, ``C_j (r, q_j)`` and ``s_ij (r,)``. We minimise

    f(B, C, s) = sum_ij || A_ij - B_i diag(s_ij) C_j ||_F^2

by cycling over the three groups of variables (all ``B_i``, then all ``C_j``, then all
``s_ij``). For each group the loss is a convex quadratic whose Hessian is block diagonal with
small symmetric ``r x r`` blocks; each step multiplies the gradient by the inverse of that
block plus a damping ``eps * I`` with ``eps = damping * ||A - A_hat||_F`` (math.md 6.5):

    B_i  <- B_i  - w_t * grad_B_i (P_i + eps I)^-1,   P_i = sum_j (s_ij s_ij^T) * (C_j C_j^T)
    C_j  <- C_j  - w_t * (Q_j + eps I)^-1 grad_C_j,   Q_j = sum_i (s_ij s_ij^T) * (B_i^T B_i)
    s_ij <- s_ij - w_t * (M_ij + eps I)^-1 grad_s_ij, M_ij = (B_i^T B_i) * (C_j C_j^T)

(``*`` is the entry-wise product; gradients are those of ``f`` without a factor 1/2, so
``w_t = lr_t`` equals the over-relaxation factor ``2 * lr_t`` of an alternating least-squares
step of the half loss: ``lr = 0.5`` and ``eps = 0`` is exact alternating least squares). The
step ``lr_t`` decays linearly from ``lr`` to ``lr * end_factor`` over the ``steps`` outer
iterations. With ``prune > 0`` each rank slice ``s[:, :, t]`` is group-soft-thresholded after
every step (ranks whose slice reaches zero are dropped at the end, lowering the cost).

Everything is computed from the ``b1 * b2`` blocks with batched products; one outer iteration
costs ``2 m n r + O((m + n) r^2 + b1 b2 r^3)`` MACs (the residual norm and the loss are
obtained from Gram matrices, never by forming ``A_hat``). The ``r x r`` systems are symmetric
positive definite and are solved by batched Cholesky factorisation (batched LU solves return
garbage on torch 2.13 CPU for batches of systems larger than ~150, math.md 6.5).

The fit starts from the truncated SVD (low rank is contained in BLAST with every ``s_ij = 1``),
tracks the loss after every iteration and returns the best iterate, so its error is never
above that of the rank-``r`` truncated SVD.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from ...formats.blocklowrank import balanced_splits
from ...linalg import frob2, top_svd

__all__ = ["BlastFitResult", "fit_blast_factors", "balanced_splits", "spd_solve"]


def spd_solve(
    P: torch.Tensor, G: torch.Tensor, eps: float | torch.Tensor, overwrite: bool = False
) -> torch.Tensor:
    """Solve ``(P + eps I) X = G`` for a batch of symmetric positive semi-definite ``P``.

    Parameters
    ----------
    P : (..., r, r)
        Symmetric positive semi-definite.
    G : (..., r, k)
        Right-hand sides.
    eps : float or 0-d tensor
        Damping ``>= 0``.
    overwrite : bool
        Add ``eps`` to the diagonal of ``P`` in place (saves a copy; ``P`` then holds
        ``P + eps I`` on return, unless the rare jitter path is taken, which leaves it so too).

    Uses batched Cholesky (``torch.linalg.cholesky_ex`` + ``torch.cholesky_solve``). If a
    factorisation fails (``P + eps I`` numerically singular), a jitter of ``1e-6`` (float32) or
    ``1e-12`` (float64) times the mean diagonal is added and grown tenfold until it succeeds.
    Batched LU solves are avoided on purpose (wrong results on torch 2.13 CPU, math.md 6.5).
    """
    if not math.isfinite(float(eps)):
        return torch.full_like(G, float("nan"))
    Pd = P if overwrite else P.clone()
    Pd.diagonal(dim1=-2, dim2=-1).add_(float(eps))
    L, info = torch.linalg.cholesky_ex(Pd)
    if not bool(info.any()):
        return torch.cholesky_solve(G, L)
    if overwrite:
        P = P.clone()
        P.diagonal(dim1=-2, dim2=-1).sub_(float(eps))
    # rare path: a numerically singular system, or non-finite entries
    if not bool(torch.isfinite(P).all()):
        # let the caller's finiteness check see it rather than failing inside LAPACK
        return torch.full_like(G, float("nan"))
    scale = P.diagonal(dim1=-2, dim2=-1).mean(-1).abs().clamp_min(torch.finfo(P.dtype).tiny)
    jitter = (1e-6 if P.dtype != torch.float64 else 1e-12) * scale
    for _ in range(12):
        Pd = P.clone()
        Pd.diagonal(dim1=-2, dim2=-1).add_(float(eps) + jitter[..., None])
        L, info = torch.linalg.cholesky_ex(Pd)
        if not bool(info.any()):
            return torch.cholesky_solve(G, L)
        jitter = jitter * 10
    raise RuntimeError("Cholesky factorisation of the BLAST preconditioner failed repeatedly")


@dataclass
class BlastFitResult:
    """Factors of a fitted BLAST matrix and the record of the fit.

    Attributes
    ----------
    U : (m, r) tensor
        Left factors ``B_i`` stacked over the row blocks.
    V : (n, r) tensor
        Right factors ``C_j^T`` stacked over the column blocks.
    S : (b1, b2, r) tensor
        Diagonal couplings ``s_ij``.
    row_splits, col_splits : list[int]
        Block boundaries.
    history : list[dict]
        One record per outer iteration: ``step`` (1-based), ``rel_error`` (relative Frobenius
        error after the iteration), ``loss`` (its square), ``lr``, ``damping`` (``eps`` of the
        last sub-step), ``seconds`` (since the start). ``step = 0`` is the initialisation.
    best_step : int
        Iteration whose iterate is returned.
    rel_error : float
        Relative Frobenius error of the returned iterate (from the Gram identity; the caller
        may recompute it densely).
    stopped : str
        ``"completed"``, ``"non-finite"`` (iterate became NaN/Inf; the best finite one is
        returned) or ``"converged"`` (relative error below ``tol``).
    seconds : float
    info : dict
        How the fit ran: ``init_svd`` (``"exact"`` or ``"randomized"``, the SVD of the
        start, chosen by :func:`gblr_approx.linalg.choose_svd_method`), ``layout``
        (``"batched"`` or ``"frugal"``, see :data:`FRUGAL_MIN_ENTRIES`) and ``chunks``
        (block-row and block-column chunks of the large temporaries).
    """

    U: torch.Tensor
    V: torch.Tensor
    S: torch.Tensor
    row_splits: list[int]
    col_splits: list[int]
    history: list[dict[str, float]] = field(default_factory=list)
    best_step: int = 0
    rel_error: float = float("nan")
    stopped: str = "completed"
    seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)


#: Below this many MACs per product ``A_blocks @ C^T`` (``m n r``), the fit runs on one thread.
#: A fit is hundreds of small operations per iteration (batched r x r Cholesky factorisations,
#: einsums over the blocks); on a machine shared with other jobs every parallel region can
#: wait for a scheduler time slice. Measured on the 2-core container with load ~3: each
#: 0.2-1.5 ms operation took 7.8 or 15.6 ms with 2 threads, and a 384 x 384 fit ran 65x slower
#: (81.7 s instead of 1.2 s). Up to this size one thread is never much slower when the machine
#: is quiet; larger fits (big LLM layers) keep torch's thread count.
SINGLE_THREAD_BELOW = 100_000_000

#: From this many entries of ``A`` on, the fit uses its memory-frugal layout: no normalised
#: copy of ``A`` and no re-blocked copies when the grid divides the shape (the products read
#: strided views of ``A``), ``A C^T`` taken a few block columns at a time, and the
#: ``(b1, b2, r, r)`` Hadamard systems of the ``s`` step built a few block rows at a time, so
#: every temporary stays below ``m n / 4`` entries except ``H = B^T A`` (``b1 r n`` entries,
#: kept because both the ``C`` and the ``s`` steps read it). Peak extra memory: about
#: ``(b1 r / m + 1) * 4 m n`` bytes. Below it the batched layout (two re-blocked copies,
#: whole-batch einsums) is kept: it is faster for small fits and unchanged from before.
FRUGAL_MIN_ENTRIES = 2**21


@contextmanager
def _limit_threads(limit: bool):
    if not limit or torch.get_num_threads() == 1:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _progress_enabled(progress: bool | None) -> bool:
    if progress is not None:
        return bool(progress)
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _to_blocks(
    A: torch.Tensor, rs: list[int], cs: list[int]
) -> tuple[torch.Tensor, int, int]:
    """Zero-padded block view ``(b1, b2, pmax, qmax)`` of ``A``."""
    b1, b2 = len(rs) - 1, len(cs) - 1
    p = max(rs[i + 1] - rs[i] for i in range(b1))
    q = max(cs[j + 1] - cs[j] for j in range(b2))
    m, n = A.shape
    if p * b1 == m and q * b2 == n:
        blocks = A.reshape(b1, p, b2, q).permute(0, 2, 1, 3).contiguous()
        return blocks, p, q
    blocks = A.new_zeros(b1, b2, p, q)
    for i in range(b1):
        for j in range(b2):
            blk = A[rs[i] : rs[i + 1], cs[j] : cs[j + 1]]
            blocks[i, j, : blk.shape[0], : blk.shape[1]] = blk
    return blocks, p, q


def _pad_rows(X: torch.Tensor, splits: list[int], pmax: int) -> torch.Tensor:
    """``(size, r)`` -> ``(parts, pmax, r)`` with zero rows after each piece."""
    parts = len(splits) - 1
    r = X.shape[1]
    if pmax * parts == X.shape[0]:
        return X.reshape(parts, pmax, r).clone()
    out = X.new_zeros(parts, pmax, r)
    for i in range(parts):
        out[i, : splits[i + 1] - splits[i]] = X[splits[i] : splits[i + 1]]
    return out


def _unpad_rows(Xp: torch.Tensor, splits: list[int]) -> torch.Tensor:
    parts = len(splits) - 1
    return torch.cat([Xp[i, : splits[i + 1] - splits[i]] for i in range(parts)], dim=0)


def fit_blast_factors(
    A: torch.Tensor,
    rank: int,
    row_splits: list[int],
    col_splits: list[int],
    **options: Any,
) -> BlastFitResult:
    """Fit ``A`` by a BLAST matrix of rank ``rank`` on the given block grid.

    Parameters
    ----------
    A : (m, n) float tensor
        Validated, finite. Computation happens in its dtype and on its device.
    rank : int
        ``r >= 1``.
    row_splits, col_splits : list[int]
        Block boundaries ``[0, ..., m]`` and ``[0, ..., n]`` (any sizes).
    **options
        ``steps`` (200), ``lr`` (1.8), ``end_factor`` (0.0), ``damping`` (0.01), ``prune``
        (0.0), ``nonnegative`` (False), ``init`` ("svd"), ``tol`` (0.0), ``seed`` (0),
        ``progress`` (None), ``callback`` (None); see :func:`_fit` below for their meaning.
        Small problems (``m n r`` below :data:`SINGLE_THREAD_BELOW`) run on one CPU thread.

    Returns
    -------
    BlastFitResult
    """
    m, n = A.shape
    small = A.device.type == "cpu" and m * n * int(rank) < SINGLE_THREAD_BELOW
    with _limit_threads(small):
        return _fit(A, rank, row_splits, col_splits, **options)


def _fit(
    A: torch.Tensor,
    rank: int,
    row_splits: list[int],
    col_splits: list[int],
    *,
    steps: int = 200,
    lr: float = 1.8,
    end_factor: float = 0.0,
    damping: float = 0.01,
    prune: float = 0.0,
    nonnegative: bool = False,
    init: str | tuple[torch.Tensor, torch.Tensor, torch.Tensor] = "svd",
    tol: float = 0.0,
    seed: int = 0,
    progress: bool | None = None,
    callback: Callable[[int, float], Any] | None = None,
    svd: tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict] | None = None,
) -> BlastFitResult:
    """Fit ``A`` by a BLAST matrix of rank ``rank`` on the given block grid.

    Parameters
    ----------
    A : (m, n) float tensor
        Validated, finite. Computation happens in its dtype and on its device.
    rank : int
        ``r >= 1``.
    row_splits, col_splits : list[int]
        Block boundaries ``[0, ..., m]`` and ``[0, ..., n]`` (any sizes).
    steps : int
        Outer iterations ``T`` (each updates all ``B_i``, then all ``C_j``, then all ``s_ij``).
    lr : float
        Initial step (over-relaxation factor, see the module docstring; ``0.5`` with
        ``damping=0`` is alternating least squares). Decays linearly to ``lr * end_factor``.
    end_factor : float
        Final step as a fraction of ``lr``.
    damping : float
        ``delta``: the preconditioners are damped by ``delta * ||A - A_hat||_F`` (computed on
        ``A / rms(A)``, so ``delta`` is scale-free).
    prune : float
        ``lambda >= 0``: group soft-threshold of each rank slice of ``s`` after each step,
        ``s[..., t] *= max(0, 1 - lambda * lr_t * ||A||_F / ||s[..., t]||_F)`` after moving
        each rank's scale into ``s`` (unit-norm columns of ``B`` and rows of ``C``), so
        ``lambda`` is relative to ``||A||_F``; a slice that reaches zero
        stays zero (the rank is pruned). With ``prune > 0`` the
        last finite iterate is returned (not the one of least error), so the SVD guarantee
        does not hold.
    nonnegative : bool
        Clamp ``s`` at zero after each step.
    init : "svd", "random" or (U, V, S)
        ``"svd"``: truncated SVD with ``s_ij = 1`` (ranks beyond ``min(m, n)`` start at small
        random values); ``"random"``: small Gaussian ``B, C`` and standard normal ``s``;
        or explicit factors of shapes ``(m, r)``, ``(n, r)``, ``(b1, b2, r)``.
    tol : float
        Stop early once the relative error falls below ``tol``.
    seed : int
        Seeds the random parts of the initialisation.
    progress : bool or None
        tqdm progress bar; ``None``: shown only when stderr is a terminal.
    callback : callable(step, rel_error), optional
        Called after every iteration; returning ``True`` stops the fit.
    svd : (U, S, Vh, info), optional
        With ``init="svd"``: the leading singular triplets of ``A`` itself (at least
        ``min(rank, m, n)`` of them, as :func:`gblr_approx.linalg.top_svd` returns them),
        computed once by a caller that fits several grids of the same matrix.

    Returns
    -------
    BlastFitResult
    """
    t0 = time.perf_counter()
    m, n = A.shape
    rs, cs = list(row_splits), list(col_splits)
    b1, b2 = len(rs) - 1, len(cs) - 1
    r = int(rank)
    dt, dev = A.dtype, A.device
    gen = torch.Generator(device="cpu").manual_seed(int(seed))

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=dt).to(dev)

    scale = float(torch.linalg.norm(A)) / math.sqrt(m * n)
    if scale == 0.0:
        # the zero matrix is BLAST with s = 0
        z = BlastFitResult(
            A.new_zeros(m, r), A.new_zeros(n, r), A.new_zeros(b1, b2, r), rs, cs,
            history=[{"step": 0, "rel_error": 0.0, "lr": 0.0, "damping": 0.0}],
            rel_error=0.0, stopped="converged",
        )
        return z
    # memory-frugal layout for large layers (see FRUGAL_MIN_ENTRIES): no normalised or
    # re-blocked copy of A when the grid divides the shape, products taken from strided views
    # of A, and the (b1, b2, r, r) Hadamard systems built in chunks of block rows
    frugal = m * n >= FRUGAL_MIN_ENTRIES
    inv = 1.0 / scale
    if frugal:
        An = A
        normA2 = frob2(A) * inv * inv
    else:
        An = A / scale
        normA2 = float(torch.sum(An.to(torch.float64) ** 2))
    info: dict[str, Any] = {"layout": "frugal" if frugal else "batched"}

    # ---- initialisation (in normalised units)
    if isinstance(init, tuple):
        U0, V0, S0 = (t.to(device=dev, dtype=dt) for t in init)
        if U0.shape != (m, r) or V0.shape != (n, r) or S0.shape != (b1, b2, r):
            raise ValueError(
                f"init factors must have shapes {(m, r)}, {(n, r)}, {(b1, b2, r)}; got "
                f"{tuple(U0.shape)}, {tuple(V0.shape)}, {tuple(S0.shape)}"
            )
        U0, V0, S0 = U0 / math.sqrt(scale), V0 / math.sqrt(scale), S0.clone()
    elif init == "svd":
        k = min(r, m, n)
        if svd is None:
            Us, sv, Vh, svd_info = top_svd(An, k, seed=seed)
            if frugal:
                sv = sv * inv
        else:  # triplets of A (not of A / scale): the same vectors, values times 1 / scale
            Us, sv, Vh, svd_info = svd
            if sv.shape[-1] < k:
                raise ValueError(f"svd= holds {sv.shape[-1]} singular triplets; need {k}")
            sv = sv * inv
        info["init_svd"] = svd_info["svd"]
        sq = sv[:k].clamp_min(0).sqrt()
        U0 = An.new_zeros(m, r)
        V0 = An.new_zeros(n, r)
        U0[:, :k] = Us[:, :k] * sq
        V0[:, :k] = Vh[:k].T * sq
        if r > k:
            small = 1e-3 * float(sq.min()) if k else 1e-3
            U0[:, k:] = small * randn(m, r - k)
            V0[:, k:] = small * randn(n, r - k)
        S0 = An.new_ones(b1, b2, r)
        del Us, Vh
    elif init == "random":
        U0 = 1e-3 / math.sqrt(r) * randn(m, r)
        V0 = 1e-3 / math.sqrt(r) * randn(n, r)
        S0 = randn(b1, b2, r)
    else:
        raise ValueError(f"init must be 'svd', 'random' or a (U, V, S) tuple; got {init!r}")

    p = max(rs[i + 1] - rs[i] for i in range(b1))
    q = max(cs[j + 1] - cs[j] for j in range(b2))
    view_ok = frugal and p * b1 == m and q * b2 == n
    if view_ok:
        A_rows = An.view(b1, p, n)  # row block i: (p, N), a view of A
        A_cols = None  # column block j: the strided view An[:, cs[j]:cs[j+1]]
    else:
        # two layouts of the padded matrix so that the products are few large matmuls
        Ab, p, q = _to_blocks(An if not frugal else An * inv, rs, cs)  # (b1, b2, p, q)
        A_rows = Ab.permute(0, 2, 1, 3).reshape(b1, p, b2 * q)  # row block i: (p, N)
        del Ab
        A_cols = A_rows.view(b1, p, b2, q).permute(2, 0, 1, 3).reshape(b2, b1 * p, q)
    rows_scale = cols_scale = inv if view_ok else 1.0
    if not frugal:
        del An
    Bp = _pad_rows(U0, rs, p)  # (b1, p, r)
    Cp = _pad_rows(V0, cs, q).transpose(1, 2).contiguous()  # (b2, r, q)
    S = S0.clone()  # (b1, b2, r)
    del U0, V0
    f64 = torch.float64
    # chunks: at most ~m n / 4 entries per temporary (T: cj * M * r, M: ci * b2 * r * r)
    cap = max(m * n // 4, 1)
    cj = b2 if not frugal else max(1, min(b2, cap // max(b1 * p * r, 1)))
    ci = b1 if not frugal else max(1, min(b1, cap // max(b2 * r * r, 1)))
    info["chunks"] = [math.ceil(b1 / ci), math.ceil(b2 / cj)]

    def dot(x: torch.Tensor, y: torch.Tensor) -> float:
        return float(torch.sum(x * y, dtype=f64))

    def row_products(B: torch.Tensor) -> torch.Tensor:
        """``H[i, r, j, q] = (B_i^T A_ij)[r, q]``: ``b1`` products ``(r, p) @ (p, N)``."""
        H = (B.mT @ A_rows).view(b1, r, b2, q)
        return H.mul_(rows_scale) if rows_scale != 1.0 else H

    def y_products(C: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """``Y_i = sum_j (A_ij C_j^T) diag(s_ij)``: (b1, p, r), ``m n r`` MACs (batched)."""
        T = (A_cols @ C.mT).view(b2, b1, p, r)  # T[j, i] = A_ij C_j^T
        return torch.einsum("jipr,ijr->ipr", T, s)

    def col_products(C: torch.Tensor) -> torch.Tensor:
        """Frugal layout: ``T[j, i] = A_ij C_j^T``, (b2, b1, p, r) (``m b2 r`` entries, kept
        from the ``s`` step to the next ``B`` step, where ``C`` is unchanged), ``m n r``
        MACs a few block columns at a time."""
        T = C.new_empty(b2, b1 * p, r)
        for j0 in range(0, b2, cj):
            j1 = min(b2, j0 + cj)
            if A_cols is None:
                for j in range(j0, j1):
                    torch.matmul(An[:, cs[j] : cs[j + 1]], C[j].mT, out=T[j])
            else:
                torch.matmul(A_cols[j0:j1], C[j0:j1].mT, out=T[j0:j1])
        if cols_scale != 1.0:
            T.mul_(cols_scale)
        return T.view(b2, b1, p, r)

    # the loops below work in place (addcmul_, out=) on one reused buffer: fresh temporaries
    # of 10-30 MB per block made the allocator's resident set grow by ~150 MB at 4096 x 11008

    def y_from(T: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        Y = torch.zeros(b1, p, r, dtype=T.dtype, device=T.device)
        for j in range(b2):
            Y.addcmul_(T[j], s[:, j].unsqueeze(1))
        return Y

    def d_from(T: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """``d_ij = diag(B_i^T A_ij C_j^T)`` from ``T``: (b1, b2, r)."""
        d = T.new_empty(b1, b2, r)
        buf = torch.empty_like(B)
        for j in range(b2):
            torch.sum(torch.mul(T[j], B, out=buf), dim=1, out=d[:, j])
        return d

    def z_products(B: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """Frugal layout: ``Z_j = sum_i diag(s_ij) B_i^T A_ij``, (b2, r, q), one block row
        of ``B^T A`` (``r n`` entries) at a time; ``m n r`` MACs."""
        Z = torch.zeros(b2, r, q, dtype=B.dtype, device=B.device)
        Hbuf = B.new_empty(r, b2 * q)
        for i in range(b1):
            torch.matmul(B[i].mT, A_rows[i], out=Hbuf)
            if rows_scale != 1.0:
                Hbuf.mul_(rows_scale)
            Z.addcmul_(Hbuf.view(r, b2, q).permute(1, 0, 2), s[i].unsqueeze(-1))
        return Z

    def gram_sum(s: torch.Tensor, Gm: torch.Tensor, over_rows: bool) -> torch.Tensor:
        """``P_i = sum_j (s_ij s_ij^T) * Gc_j`` (or ``Q_j`` over ``i``), never (b1, b2, r, r)."""
        if not frugal:
            if over_rows:
                return torch.einsum("ijr,ijs,jrs->irs", s, s, Gm)
            return torch.einsum("ijr,ijs,irs->jrs", s, s, Gm)
        out = Gm.new_zeros(b1 if over_rows else b2, r, r)
        buf = torch.empty_like(out)
        for t in range(b2 if over_rows else b1):
            st = s[:, t] if over_rows else s[t]  # (b1, r) or (b2, r)
            torch.mul(st.unsqueeze(-1), st.unsqueeze(-2), out=buf)
            out.addcmul_(buf, Gm[t])
        return out

    Mbuf = None if ci >= b1 else S.new_empty(ci, b2, r, r)  # reused chunk of M

    def hadamard(Gb: torch.Tensor, Gc: torch.Tensor, i0: int, i1: int) -> torch.Tensor:
        """``M[i, j] = Gb_i * Gc_j`` for block rows ``i0:i1``: (i1 - i0, b2, r, r); written
        into one reused buffer when chunked (each call overwrites the previous chunk)."""
        if Mbuf is None:
            return Gb[i0:i1].unsqueeze(1) * Gc.unsqueeze(0)
        return torch.mul(Gb[i0:i1].unsqueeze(1), Gc.unsqueeze(0), out=Mbuf[: i1 - i0])

    def full_loss(B: torch.Tensor, C: torch.Tensor, s: torch.Tensor) -> float:
        if frugal:
            d = d_from(T_cur, B)
        else:
            H = row_products(B)
            d = torch.einsum("irjq,jrq->ijr", H, C)  # diag(B_i^T A_ij C_j^T)
            del H
        Gb, Gc = B.mT @ B, C @ C.mT
        quad = 0.0
        for i0 in range(0, b1, ci):
            i1 = min(b1, i0 + ci)
            M = hadamard(Gb, Gc, i0, i1)
            quad += dot(s[i0:i1], (M @ s[i0:i1].unsqueeze(-1)).squeeze(-1))
        return normA2 - 2.0 * dot(s, d) + quad

    def rel(loss: float) -> float:
        return math.sqrt(max(loss, 0.0) / normA2)

    def damp(inner: float, quad: float) -> float:
        return damping * math.sqrt(max(normA2 - 2.0 * inner + quad, 0.0))

    alive = torch.ones(r, dtype=torch.bool, device=dev)  # ranks not pruned yet
    T_cur = col_products(Cp) if frugal else None
    loss0 = full_loss(Bp, Cp, S)
    best = (loss0, 0, Bp.clone(), Cp.clone(), S.clone())
    history: list[dict[str, float]] = [
        {"step": 0, "rel_error": rel(loss0), "loss": rel(loss0) ** 2, "lr": 0.0,
         "damping": 0.0, "seconds": time.perf_counter() - t0}
    ]
    stopped = "completed"
    show = _progress_enabled(progress)
    bar = None
    if show:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=f"BLAST {b1}x{b2} r={r}", leave=False)

    for t in range(steps):
        lr_t = lr * (1.0 - (1.0 - end_factor) * t / max(steps, 1))
        # ---------------- B step: B_i <- B_i - lr (B_i P_i - Y_i)(P_i + eps I)^-1
        Gc = Cp @ Cp.mT  # (b2, r, r)
        Y = y_from(T_cur, S) if frugal else y_products(Cp, S)  # (b1, p, r)
        # T = A C^T is dead until the s step recomputes it for the new C: free it now
        # (m b2 r entries, 1.07x a 4096 x 11008 layer at 16 x 16, r = 733)
        T_cur = None
        P = gram_sum(S, Gc, over_rows=True)  # (b1, r, r)
        eps = damp(dot(Bp, Y), dot(Bp.mT @ Bp, P))
        G = Bp @ P - Y
        del Y
        Bp = Bp - lr_t * spd_solve(P, G.mT, eps, overwrite=True).mT
        del P, G, Gc
        # ---------------- C step: C_j <- C_j - lr (Q_j + eps I)^-1 (Q_j C_j - Z_j)
        Gb = Bp.mT @ Bp  # (b1, r, r)
        if frugal:
            Z = z_products(Bp, S)  # (b2, r, q)
        else:
            H = row_products(Bp)  # H[i, :, j, :] = B_i^T A_ij
            Z = torch.einsum("irjq,ijr->jrq", H, S)  # (b2, r, q)
        Q = gram_sum(S, Gb, over_rows=False)  # (b2, r, r)
        eps = damp(dot(Cp, Z), dot(Cp @ Cp.mT, Q))
        G = Q @ Cp - Z
        Cp = Cp - lr_t * spd_solve(Q, G, eps, overwrite=True)
        # Z and G ((b2, r, q) each, 0.19x a 4096 x 11008 layer) are dead: free them before
        # the s step allocates T = A C^T (1.07x the layer at 16 x 16)
        del Q, Z, G
        # ---------------- s step: s_ij <- s_ij - lr (M_ij + eps I)^-1 (M_ij s_ij - d_ij)
        Gc = Cp @ Cp.mT
        if frugal:
            T_cur = None
            T_cur = col_products(Cp)  # also serves the next B step (C is unchanged there)
            dvec = d_from(T_cur, Bp)
        else:
            dvec = torch.einsum("irjq,jrq->ijr", H, Cp)  # diag(B_i^T A_ij C_j^T)
            del H
        # M_ij = Gb_i * Gc_j, (b1, b2, r, r): whole for small fits, chunks of rows otherwise
        single = ci >= b1
        Ms = torch.empty_like(S)
        Mk = None
        for i0 in range(0, b1, ci):
            i1 = min(b1, i0 + ci)
            Mk = hadamard(Gb, Gc, i0, i1)
            Ms[i0:i1] = (Mk @ S[i0:i1].unsqueeze(-1)).squeeze(-1)
        eps = damp(dot(S, dvec), dot(S, Ms))
        G = Ms - dvec
        Snew = torch.empty_like(S)
        X = torch.empty_like(S)
        for i0 in range(0, b1, ci):
            i1 = min(b1, i0 + ci)
            Mk = Mk if single else hadamard(Gb, Gc, i0, i1)
            X[i0:i1] = spd_solve(Mk, G[i0:i1].unsqueeze(-1), eps, overwrite=True).squeeze(-1)
            Snew[i0:i1] = S[i0:i1] - lr_t * X[i0:i1]
        S = Snew
        if not single and not nonnegative and prune == 0:
            # M s_new = M s - lr M x and M x = (M + eps I) x - eps x = g - eps x: the loss
            # needs no third pass over the Hadamard systems
            Ms = Ms - lr_t * (G - eps * X)
        # Mk now holds M + eps I (when single)
        if nonnegative:
            S = S.clamp_min(0)
        if prune > 0:
            # put each rank's scale into s (unit-norm columns of B and rows of C; A_hat is
            # unchanged), so that ||s[..., t]|| measures that rank's weight, then shrink
            nb = torch.linalg.vector_norm(Bp, dim=(0, 1)).clamp_min(1e-30)
            nc = torch.linalg.vector_norm(Cp, dim=(0, 2)).clamp_min(1e-30)
            Bp, Cp, S = Bp / nb, Cp / nc[:, None], S * (nb * nc)
            if frugal:
                T_cur.div_(nc)  # T = A C^T follows the rescaled C
            norms = torch.linalg.vector_norm(S, dim=(0, 1))
            thresh = prune * lr_t * math.sqrt(normA2)
            shrink = (1 - thresh / norms.clamp_min(1e-30)).clamp_min(0)
            alive = alive & (shrink > 0)  # a pruned rank stays pruned
            S = S * (shrink * alive)
        # ---------------- loss after the iteration (cheap, from Gram matrices)
        if single:
            Ms = (Mk @ S.unsqueeze(-1)).squeeze(-1)
            loss = normA2 - 2.0 * dot(S, dvec) + dot(S, Ms) - eps * dot(S, S)
        elif not nonnegative and prune == 0:
            loss = normA2 - 2.0 * dot(S, dvec) + dot(S, Ms)
        else:
            quad = 0.0
            for i0 in range(0, b1, ci):
                i1 = min(b1, i0 + ci)
                Mk = hadamard(Gb, Gc, i0, i1)
                quad += dot(S[i0:i1], (Mk @ S[i0:i1].unsqueeze(-1)).squeeze(-1))
            loss = normA2 - 2.0 * dot(S, dvec) + quad
        del Mk
        # a NaN/Inf anywhere in B or C reaches the Gram matrices and hence the loss
        finite = math.isfinite(loss) and bool(torch.isfinite(S).all())
        if not finite:
            stopped = "non-finite"
            history.append({"step": t + 1, "rel_error": float("nan"), "lr": lr_t,
                            "damping": eps})
            break
        e = rel(loss)
        history.append({"step": t + 1, "rel_error": e, "loss": e * e, "lr": lr_t,
                        "damping": eps, "seconds": time.perf_counter() - t0})
        if loss < best[0] or prune > 0:
            # with rank pruning the objective is penalised: keep the latest (pruned) iterate
            # copied into the kept buffers: a fresh clone next to the old one held both
            # copies of the factors at once ((m + n) r entries, 0.26x a 4096 x 11008 layer)
            best[2].copy_(Bp)
            best[3].copy_(Cp)
            best[4].copy_(S)
            best = (loss, t + 1, best[2], best[3], best[4])
        if bar is not None:
            bar.update(1)
            bar.set_postfix(rel_error=f"{e:.4f}")
        if callback is not None and callback(t + 1, e):
            stopped = "callback"
            break
        if tol > 0 and e < tol:
            stopped = "converged"
            break
    if bar is not None:
        bar.close()

    loss_b, step_b, Bb, Cb, Sb = best
    U = _unpad_rows(Bb, rs) * math.sqrt(scale)
    V = _unpad_rows(Cb.mT, cs) * math.sqrt(scale)
    return BlastFitResult(
        U=U.contiguous(), V=V.contiguous(), S=Sb.contiguous(), row_splits=rs, col_splits=cs,
        history=history, best_step=step_b, rel_error=rel(loss_b), stopped=stopped,
        seconds=time.perf_counter() - t0, info=info,
    )
