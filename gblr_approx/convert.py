"""``convert``: move a matrix from one format to another, exactly whenever possible.

A conversion is **exact** when the target format contains the source (math.md section 4):

* anything -> dense;
* low-rank, block-sparse, block-low-rank -> GBLR, at the source's own cost;
* low-rank -> block-low-rank (one 1 x 1 grid block, same cost);
* low-rank -> BLAST (all ``s_ij = 1`` on a 1 x 1 grid; cost ``r (m + n + 1)``, ``r`` MACs more
  than the low-rank matrix, because BLAST stores the couplings);
* block-sparse -> block-low-rank on the same grid (each stored block at its numerical rank;
  cost ``sum_b rank_b (h_b + w_b)``, up to ``min(h, w) (h + w)`` per block, i.e. up to twice
  the block-sparse cost for square blocks with full rank);
* Monarch -> block-low-rank and -> GBLR **up to Monarch's fixed row permutation**
  (math.md 4.4), returned as :class:`~gblr_approx.Permuted` at the Monarch cost.

Every other pair is a **projection**: the best approximation in the target format within the
budget (default: the source's own cost). Into low-rank the projection is computed from the
structure (QR of the factors for a low-rank source; a randomized range finder using only
``A @ X`` and ``A.T @ X`` for sources too large to densify); into block-sparse,
block-low-rank and Monarch the source is densified and projected optimally; into GBLR and
BLAST the fit is compared with the closed-form candidates these formats contain, and the
better one is returned.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from .budget import InfeasibleBudgetError, resolve_budget
from .formats.base import StructuredMatrix, get_format
from .formats.blast import BLAST
from .formats.blocklowrank import BlockLowRank
from .formats.blocksparse import BlockSparse, default_block_shape
from .formats.dense import Dense
from .formats.lowrank import LowRank
from .formats.monarch import Monarch
from .formats.permuted import Permuted
from .linalg import svd
from .validation import as_matrix, check_positive_int

__all__ = ["convert", "conversion_kind", "FORMAT_ORDER", "EXACT", "EXACT_UP_TO_PERMUTATION",
           "PROJECTION"]

#: The formats ``convert`` connects, in the order used by the conversion table.
FORMAT_ORDER = ("dense", "lowrank", "blocksparse", "blocklowrank", "monarch", "gblr", "blast")

EXACT = "exact"
EXACT_UP_TO_PERMUTATION = "exact up to permutation"
PROJECTION = "projection"

#: (source, target) pairs with an exact conversion (besides X -> X and X -> dense).
_EXACT_PAIRS: dict[tuple[str, str], str] = {
    ("lowrank", "gblr"): EXACT,
    ("blocksparse", "gblr"): EXACT,
    ("blocklowrank", "gblr"): EXACT,
    ("lowrank", "blocklowrank"): EXACT,
    ("lowrank", "blast"): EXACT,
    ("blocksparse", "blocklowrank"): EXACT,
    ("monarch", "blocklowrank"): EXACT_UP_TO_PERMUTATION,
    ("monarch", "gblr"): EXACT_UP_TO_PERMUTATION,
}

#: Sources with at most this many entries are densified when that is the simplest exact way
#: to project or to measure the error; larger ones use products with the structure.
MAX_DENSE_ENTRIES = 1 << 24


def conversion_kind(source: str, target: str) -> str:
    """How ``convert`` moves a ``source``-format matrix to ``target`` (without a budget).

    Returns ``"exact"``, ``"exact up to permutation"`` or ``"projection"``. This is the table
    the code itself follows; ``docs/conversion_table.md`` is generated from it.
    """
    s, t = get_format(source).format_name, get_format(target).format_name
    if t == "dense" or s == t:
        return EXACT
    return _EXACT_PAIRS.get((s, t), PROJECTION)


# ------------------------------------------------------------------ exact paths
def _blocklowrank_from_lowrank(L: LowRank) -> BlockLowRank:
    m, n = L.shape
    return BlockLowRank((m, n), [0, m], [0, n], [[(L.U.clone(), L.V.clone())]])


def _grid_splits(size: int, block: int) -> list[int]:
    return list(range(0, size, block)) + [size]


def _blocklowrank_from_blocksparse(S: BlockSparse) -> BlockLowRank:
    """Each stored block at its numerical rank on the block-sparse grid (exact to round-off)."""
    m, n = S.shape
    br, bc = S.block_shape
    rs, cs = _grid_splits(m, br), _grid_splits(n, bc)
    b1, b2 = len(rs) - 1, len(cs) - 1
    dense: dict[tuple[int, int], torch.Tensor] = {}
    for b, (i, j) in enumerate(zip(S.block_rows.tolist(), S.block_cols.tolist(), strict=True)):
        h, w = rs[i + 1] - rs[i], cs[j + 1] - cs[j]
        blk = S.blocks[b, :h, :w]
        dense[(i, j)] = dense[(i, j)] + blk if (i, j) in dense else blk
    dt, dev = S.dtype, S.device
    factors = []
    for i in range(b1):
        row = []
        for j in range(b2):
            h, w = rs[i + 1] - rs[i], cs[j + 1] - cs[j]
            blk = dense.get((i, j))
            if blk is None:
                row.append((torch.zeros(h, 0, dtype=dt, device=dev),
                            torch.zeros(w, 0, dtype=dt, device=dev)))
                continue
            U, sv, Vh = svd(blk)
            tol = max(h, w) * torch.finfo(dt).eps * (float(sv[0]) if sv.numel() else 0.0)
            k = int((sv > tol).sum())
            sq = sv[:k].sqrt()
            row.append(((U[:, :k] * sq).contiguous(), (Vh[:k].T * sq).contiguous()))
        factors.append(row)
    return BlockLowRank((m, n), rs, cs, factors)


def _monarch_as_permuted_blocklowrank(M: Monarch) -> Permuted:
    """``M = Pi B``: B block-low-rank on the J x K grid with rank R per block (math.md 4.4).

    Row ``l * J + j`` of M is row ``j * Lr + l`` of B; block ``(j, k)`` of B is
    ``w2[j, :, kR:(k+1)R] @ w1[k, r*J + j, :]`` (over r).
    """
    K, J, R = M.in_blocks, M.out_blocks, M.rank
    I, Lr = M.w1.shape[2], M.w2.shape[1]
    Q = M.w1.view(K, R, J, I)
    factors = []
    for j in range(J):
        row = []
        for k in range(K):
            U = M.w2[j, :, k * R : (k + 1) * R].contiguous()  # (Lr, R)
            V = Q[k, :, j, :].T.contiguous()  # (I, R)
            row.append((U, V))
        factors.append(row)
    B = BlockLowRank((J * Lr, K * I), [j * Lr for j in range(J + 1)],
                     [k * I for k in range(K + 1)], factors)
    perm = (torch.arange(J)[None, :] * Lr + torch.arange(Lr)[:, None]).reshape(-1)
    perm = perm.to(M.w1.device)
    if M.transposed:
        return Permuted(B.T, None, perm)
    return Permuted(B, perm, None)


def _exact(src: StructuredMatrix, target: str, allow_permutation: bool) -> StructuredMatrix | None:
    s = src.format_name
    kind = conversion_kind(s, target)
    if kind == PROJECTION or (kind == EXACT_UP_TO_PERMUTATION and not allow_permutation):
        return None
    if target == "dense":
        return Dense(src.to_dense())
    if s == target:
        out = type(src)._from_state(
            {k: t.clone() for k, t in src._tensors().items()}, src._config(), src.shape
        )
        return out
    GBLR = get_format("gblr")
    if target == "gblr":
        if s == "lowrank":
            return GBLR.from_lowrank(src)
        if s == "blocksparse":
            return GBLR.from_blocksparse(src)
        if s == "blocklowrank":
            return GBLR.from_blocklowrank(src)
        if s == "monarch":
            P = _monarch_as_permuted_blocklowrank(src)
            return Permuted(GBLR.from_blocklowrank(P.inner), P.row_perm, P.col_perm)
    if target == "blocklowrank":
        if s == "lowrank":
            return _blocklowrank_from_lowrank(src)
        if s == "blocksparse":
            return _blocklowrank_from_blocksparse(src)
        if s == "monarch":
            return _monarch_as_permuted_blocklowrank(src)
    if target == "blast" and s == "lowrank":
        return BLAST.from_lowrank(src, blocks=(1, 1))
    raise AssertionError(f"missing exact path {s} -> {target}")  # pragma: no cover


# ------------------------------------------------------------------ projections
def _lowrank_of_lowrank(L: LowRank, rank: int) -> LowRank:
    """Truncated SVD of ``U V^T`` from QR factorisations of the factors (exact, O((m+n) r^2))."""
    Qu, Ru = torch.linalg.qr(L.U)
    Qv, Rv = torch.linalg.qr(L.V)
    Uc, sv, Vch = torch.linalg.svd(Ru @ Rv.T)
    k = min(rank, sv.numel())
    sq = sv[:k].sqrt()
    return LowRank((Qu @ Uc[:, :k] * sq).contiguous(), (Qv @ Vch[:k].T * sq).contiguous())


def _lowrank_by_products(
    A: StructuredMatrix, rank: int, oversample: int, power_iters: int, seed: int
) -> LowRank:
    """Randomized SVD (Halko-Martinsson-Tropp) that touches ``A`` only through ``A @ X``."""
    m, n = A.shape
    k = min(rank + oversample, m, n)
    gen = torch.Generator().manual_seed(int(seed))
    omega = torch.randn(n, k, generator=gen, dtype=A.dtype).to(A.device)
    At = A.T
    Qm, _ = torch.linalg.qr(A @ omega)
    for _ in range(power_iters):
        Z, _ = torch.linalg.qr(At @ Qm)
        Qm, _ = torch.linalg.qr(A @ Z)
    Bt = At @ Qm  # (n, k) = (Q^T A)^T
    Ub, sv, Vh = svd(Bt.T)
    r = min(rank, sv.numel())
    sq = sv[:r].sqrt()
    return LowRank((Qm @ Ub[:, :r] * sq).contiguous(), (Vh[:r].T * sq).contiguous())


def _project_lowrank(src, B, options, max_dense):
    m, n = src.shape
    rank = options.get("rank")
    if rank is None:
        r = min(B // (m + n), m, n)
        if r < 1:
            raise InfeasibleBudgetError("lowrank", B, m + n, "one rank costs m+n MACs")
    else:
        r = check_positive_int(rank, "rank")
        if r > min(m, n):
            raise ValueError(f"rank must be <= min(m, n) = {min(m, n)}; got {r}")
        if r * (m + n) > B:
            raise InfeasibleBudgetError("lowrank", B, r * (m + n), f"rank={r} costs r*(m+n)")
    if isinstance(src, LowRank) and not options:
        out = _lowrank_of_lowrank(src, r)
        return out, "truncated SVD from QR of the low-rank factors (exact)"
    if m * n <= max_dense or options.get("method") == "exact":
        out = LowRank.project(src.to_dense(), B, **options)
        return out, "truncated SVD of the densified source"
    opts = {"oversample": 10, "power_iters": 2, "seed": 0}
    unknown = set(options) - set(opts) - {"rank", "method"}
    if unknown:
        raise TypeError(f"unknown option(s) {sorted(unknown)} for a low-rank target")
    opts.update({k: v for k, v in options.items() if k in opts})
    out = _lowrank_by_products(src, r, **opts)
    return out, (f"randomized SVD through products with the {src.format_name} structure "
                 f"(oversample={opts['oversample']}, power_iters={opts['power_iters']}, "
                 f"seed={opts['seed']})")


def _default_block_shape(m: int, n: int) -> tuple[int, int]:
    """The block-sparse default block shape (the one ``BlockSparse.project`` uses)."""
    return default_block_shape(m, n)


def _rel_err_dense(W: torch.Tensor, A: StructuredMatrix) -> float:
    nrm = float(W.double().norm())
    d = float((W.double() - A.to_dense().to(W.device).double()).norm())
    return d / nrm if nrm > 0 else (0.0 if d == 0 else math.inf)


def _project_gblr(src, W, B, options):
    """Best of ``fit_gblr`` and the closed-form candidates GBLR contains (embedded exactly)."""
    GBLR = get_format("gblr")
    from .fit import fit_gblr

    opts = dict(options)
    opts.setdefault("progress", False)
    res = fit_gblr(W, B, **opts)
    cands = [("fit_gblr", res.matrix)]
    m, n = W.shape
    if B >= m + n:
        L, _ = _project_lowrank(src, B, {}, MAX_DENSE_ENTRIES)
        cands.append(("low-rank projection embedded", GBLR.from_lowrank(L)))
    for name, fmt, embed in (("block-sparse", BlockSparse, GBLR.from_blocksparse),
                             ("block-low-rank", BlockLowRank, GBLR.from_blocklowrank)):
        try:
            C = fmt.project(W, B, **({"block_shape": _default_block_shape(m, n)}
                                     if fmt is BlockSparse else {}))
        except InfeasibleBudgetError:
            continue
        cands.append((f"{name} projection embedded", embed(C)))
    scored = [(_rel_err_dense(W, G), name, G) for name, G in cands if G.flops <= B]
    err, name, G = min(scored, key=lambda t: t[0])
    G.info = {**G.info, "candidates": {nm: e for e, nm, _ in scored}}
    return G, f"best of fit_gblr and embedded closed-form candidates: {name}"


def _project_blast(src, W, B, options):
    """Best of the BLAST fit and the low-rank candidate it contains (1 x 1 grid)."""
    m, n = W.shape
    cands = []
    infeasible = None
    try:
        A = BLAST.project(W, B, **options)
        cands.append(("BLAST fit", A))
    except InfeasibleBudgetError as exc:
        if B < m + n + 1:
            raise
        infeasible = exc
    r = B // (m + n + 1)
    if r >= 1 and "blocks" not in options and "rank" not in options:
        L, _ = _project_lowrank(src, r * (m + n), {}, MAX_DENSE_ENTRIES)
        cands.append(("low-rank projection as 1x1 BLAST", BLAST.from_lowrank(L, (1, 1))))
    if not cands:  # the given blocks / rank do not fit, and no 1x1 candidate may replace it
        raise infeasible
    scored = [(_rel_err_dense(W, A), name, A) for name, A in cands]
    err, name, A = min(scored, key=lambda t: t[0])
    A.info = {**A.info, "candidates_convert": {nm: e for e, nm, _ in scored}}
    return A, f"best of the BLAST fit and the contained low-rank candidate: {name}"


def _rel_error(src: StructuredMatrix, out: StructuredMatrix, max_dense: int, seed: int = 0):
    m, n = src.shape
    if m * n <= max_dense:
        return _rel_err_dense(src.to_dense(), out), "exact"
    k = 32
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, k, generator=gen, dtype=src.dtype).to(src.device)
    Y = src @ X
    D = Y - (out @ X.to(dtype=out.dtype)).to(Y.dtype)
    nrm = float(Y.double().norm())
    est = float(D.double().norm()) / nrm if nrm > 0 else 0.0
    return est, f"estimated from {k} Gaussian probes"


# ------------------------------------------------------------------ public entry point
def convert(
    A: Any,
    target: str,
    budget: float | int | None = None,
    *,
    allow_permutation: bool = True,
    max_dense_entries: int = MAX_DENSE_ENTRIES,
    **options: Any,
) -> StructuredMatrix:
    """Convert ``A`` to the ``target`` format: exactly when the target contains it.

    Parameters
    ----------
    A : StructuredMatrix, torch.Tensor or numpy.ndarray, shape (m, n)
        The source; arrays are treated as dense matrices. Float16/bfloat16 sources are
        computed in float32 and give float32 results (as :func:`~gblr_approx.project`).
    target : str
        ``"dense"``, ``"lowrank"``, ``"blocksparse"``, ``"blocklowrank"``, ``"monarch"``,
        ``"gblr"`` or ``"blast"``.
    budget : float, int or None
        ``None`` (default): an exact conversion when one exists (see
        :func:`conversion_kind`; its cost may exceed the source's only for low-rank -> BLAST,
        by ``r`` MACs, and block-sparse -> block-low-rank, see the module docstring), otherwise
        the best projection at the source's own cost. A float in (0, 1] (fraction of ``m n``)
        or an int (MACs): the result costs at most this; an exact conversion is used when it
        fits, otherwise a projection.
    allow_permutation : bool
        Allow exact conversions up to a fixed permutation (Monarch -> block-low-rank / GBLR),
        returned as :class:`~gblr_approx.Permuted`. ``False`` projects instead.
    max_dense_entries : int
        Sources with more entries are never densified to project into low-rank (a randomized
        range finder uses ``A @ X`` and ``A.T @ X``) or to measure the error (estimated from
        Gaussian probes).
    **options
        Format options of the target's projection (e.g. ``blocks=(4, 4)`` for BLAST,
        ``grid`` for block-low-rank, ``block_shape`` for block-sparse, ``oversample``,
        ``power_iters``, ``seed`` for the randomized low-rank path).

    Returns
    -------
    StructuredMatrix
        In the target format (or :class:`~gblr_approx.Permuted` around it). ``info`` gains
        ``exact`` (bool), ``conversion`` (``"exact"``, ``"exact up to permutation"`` or
        ``"projection"``), ``rel_error`` (relative Frobenius error to the source, 0 up to
        round-off when exact) and ``convert`` (source, target, budgets, method, seconds).

    Raises
    ------
    ValueError
        Unknown target (names the known ones), ``"permuted"`` as a target, or a budget that no
        matrix of the target format fits (:class:`~gblr_approx.InfeasibleBudgetError`, naming
        the smallest feasible budget and why).
    """
    t0 = time.perf_counter()
    if isinstance(A, StructuredMatrix):
        src = A
        if src.dtype in (torch.float16, torch.bfloat16):
            # computed in float32, as ga.project does for half inputs (torch has no half QR
            # or SVD on the CPU); the result is float32 too
            src = src.to(dtype=torch.float32)
    else:
        src = Dense(as_matrix(A, "A"))
    tcls = get_format(target)
    tname = tcls.format_name
    if tname == "permuted":
        raise ValueError(
            "'permuted' is not a conversion target: it wraps another format. Convert to one of "
            f"{', '.join(FORMAT_ORDER)}; exact conversions up to a permutation return Permuted."
        )
    if tname not in FORMAT_ORDER:  # pragma: no cover - a registered extra format
        raise ValueError(f"no conversion into {tname!r}; targets: {', '.join(FORMAT_ORDER)}")
    max_dense = check_positive_int(max_dense_entries, "max_dense_entries")
    m, n = src.shape
    B = None if budget is None else resolve_budget(budget, m, n)
    if tname == "dense" and B is not None and B < m * n:
        raise InfeasibleBudgetError("dense", B, m * n, "a dense matrix costs m*n MACs")

    out = None
    if not options:
        out = _exact(src, tname, allow_permutation)
        if out is not None and B is not None and out.flops > B:
            out = None  # the exact form does not fit the budget: project instead
    if out is not None:
        kind = conversion_kind(src.format_name, tname)
        method = "exact embedding" if kind == EXACT else "exact embedding up to a permutation"
        if src.format_name == tname:
            method = "copy"
    else:
        kind = PROJECTION
        Bp = src.flops if B is None else B
        with torch.no_grad():
            if tname == "lowrank":
                out, method = _project_lowrank(src, Bp, options, max_dense)
            else:
                W = src.to_dense()
                if tname == "gblr":
                    out, method = _project_gblr(src, W, Bp, options)
                elif tname == "blast":
                    out, method = _project_blast(src, W, Bp, options)
                else:
                    opts = dict(options)
                    if tname == "blocksparse" and "block_shape" not in opts:
                        opts["block_shape"] = _default_block_shape(m, n)
                    out = tcls.project(W, Bp, **opts)
                    method = f"{tname} projection of the densified source"
        if out.flops > Bp:  # pragma: no cover - a format bug; never hide it
            raise RuntimeError(f"conversion into {tname} exceeded the budget: {out.flops} > {Bp}")
    err, err_method = _rel_error(src, out, max_dense)
    out.info = {
        **out.info,
        "exact": kind != PROJECTION,
        "conversion": kind,
        "rel_error": err,
        "convert": {
            "source": src.format_name,
            "target": tname,
            "budget": budget,
            "budget_macs": (src.flops if B is None else B) if kind == PROJECTION else B,
            "source_flops": src.flops,
            "flops": out.flops,
            "method": method,
            "rel_error_method": err_method,
            "seconds": time.perf_counter() - t0,
        },
    }
    return out

