"""Running one sweep task: read the matrix, fit it, measure it, return its row.

:func:`fit_row` is what every executor runs (in this process, a local worker process or a
Dask worker). It never raises for a failing fit: errors become ``failed`` rows, infeasible
budgets ``infeasible`` rows. The matrix it reads, with its norms and :func:`~.plan.tensor_hash`,
is cached for the next task on the same matrix in the same process.

Product timing (``Task.product_batch``): after the fit, ``A @ X`` and ``W @ X`` for one
random ``X`` of shape ``(cols, batch)`` in the matrix's fitted dtype are timed alternately in
this process, 7 rounds after a warm-up, each round repeating the product until it has taken
at least 2 ms; the columns hold the median seconds of one product. The dense product is
``ga.Dense(W)``'s: for 2-31 columns ``(X^T W^T)^T``, the form ``nn.Linear`` runs (MKL's
``W @ X`` with a few output columns is 2-4x slower, which would flatter every format).
"""

from __future__ import annotations

import math
import statistics
import time
import warnings
from datetime import datetime, timezone
from typing import Any

import torch

from ..budget import InfeasibleBudgetError
from ..formats.dense import Dense
from ..validation import as_matrix
from .plan import Source, Task, forget_stores, read_source, tensor_hash

__all__ = ["fit_row", "failed_row", "forget_cache", "spectral_norm", "time_products"]

_CACHE: dict[str, Any] = {"key": None}


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _one_line(text: str) -> str:
    return " | ".join(line.strip() for line in str(text).strip().splitlines() if line.strip())


def forget_cache() -> None:
    """Drop the cached matrix and the open checkpoint (after a sweep in this process)."""
    _CACHE.clear()
    _CACHE["key"] = None
    forget_stores()


#: Matrices whose smaller side is at most this get their spectral norm from a full SVD.
FULL_SVD_BELOW = 1024


def spectral_norm(M: torch.Tensor, full_below: int = FULL_SVD_BELOW) -> float:
    """Largest singular value of a float64 matrix ``M`` of shape (m, n).

    ``min(m, n) <= full_below``: all singular values (LAPACK), exact. Larger: Lanczos
    bidiagonalisation of the top singular triplet (ARPACK via
    :func:`scipy.sparse.linalg.svds`, tolerance 0 = machine precision, a fixed start vector),
    about 2-4 orders of magnitude cheaper on a 4096 x 11008 layer (a few hundred products
    with ``M`` and ``M^T``, ``O(m n)`` each, against ``O(m n min(m, n))``) and equal to the SVD's
    value to ~1e-12 relative; the full SVD is the fallback if Lanczos does not converge.
    """
    m, n = M.shape
    if min(m, n) <= full_below or not bool(M.any()):
        return float(torch.linalg.matrix_norm(M, ord=2))
    import numpy as np
    from scipy.sparse.linalg import ArpackNoConvergence, svds

    A = M.detach().cpu().numpy()
    v0 = np.random.default_rng(0).standard_normal(min(m, n))
    try:
        s = svds(A, k=1, tol=0, v0=v0, maxiter=20 * min(m, n), return_singular_vectors=False,
                 solver="arpack")
        return float(s[0])
    except ArpackNoConvergence:
        return float(torch.linalg.matrix_norm(M, ord=2))


def _matrix_of(src: Source) -> tuple[torch.Tensor, float, float, str]:
    """The matrix (float32/64), its Frobenius and spectral norms and the hash of its stored
    values, cached per process for consecutive tasks on the same matrix."""
    key = (src.name, src.path, src.data_hash, src.reshape_conv)
    if _CACHE["key"] == key:
        return _CACHE["W"], _CACHE["fro"], _CACHE["two"], _CACHE["hash"]
    _CACHE["key"] = None
    raw = read_source(src)
    digest = src.data_hash or tensor_hash(raw)  # hashed as read: no second pass over the file
    W = as_matrix(raw, src.name)
    W64 = W.to(torch.float64)
    fro = float(torch.linalg.norm(W64))
    two = spectral_norm(W64)
    _CACHE.update(key=key, W=W, fro=fro, two=two, hash=digest)
    return W, fro, two, digest


def _base_row(task: Task, status: str, message: str) -> dict[str, Any]:
    from .. import __version__

    src = task.source
    m, n = src.shape
    return {
        "matrix": src.name, "rows": m, "cols": n, "format": task.format,
        "budget": task.budget, "flops": None, "budget_fraction": math.nan,
        "rel_error": math.nan, "rel_error_2": math.nan, "seconds": math.nan,
        "status": status, "message": message, "shape": f"{m}x{n}", "dtype": src.dtype,
        "options": task.options_text, "budget_macs": task.budget_macs, "params": None,
        "seed": task.seed, "version": __version__, "finished_at": None,
        "data_hash": src.data_hash or "", "product_batch": None,
        "product_seconds": math.nan, "dense_product_seconds": math.nan,
    }


def failed_row(task: Task, message: str) -> dict[str, Any]:
    """A ``failed`` row for a task that produced none (e.g. its process died)."""
    row = _base_row(task, "failed", message)
    row["finished_at"] = _now()
    return row


def time_products(A: Any, W: torch.Tensor, batch: int, rounds: int = 7) -> tuple[float, float]:
    """Median seconds of one ``A @ X`` and one ``W @ X``, ``X`` of shape ``(cols, batch)``,
    timed alternately in this process (see the module docstring)."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(W.shape[1], batch, generator=g, dtype=W.dtype)

    def reps_for(f) -> int:
        k = 1
        while True:
            t0 = time.perf_counter()
            for _ in range(k):
                f()
            if time.perf_counter() - t0 >= 2e-3 or k >= 1 << 16:
                return k
            k *= 2

    def timed(f, k: int) -> float:
        t0 = time.perf_counter()
        for _ in range(k):
            f()
        return (time.perf_counter() - t0) / k

    with torch.no_grad():
        D = Dense(W)
        fa, fw = (lambda: A @ X), (lambda: D._matmul(X))
        ka, kw = reps_for(fa), reps_for(fw)
        ta, tw = [], []
        for _ in range(rounds):
            ta.append(timed(fa, ka))
            tw.append(timed(fw, kw))
    return statistics.median(ta), statistics.median(tw)


def fit_row(task: Task, threads: int | None = None) -> dict[str, Any]:
    """Run one fit and return its row (a dict with the sweep's columns). Never raises for a
    failing fit. ``threads``: ``torch.set_num_threads`` for this fit (None: leave it)."""
    from ..projection import project

    if threads is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    row = _base_row(task, "failed", "")
    m, n = task.source.shape
    t0 = time.perf_counter()
    try:
        W, fro, two, digest = _matrix_of(task.source)
        row["data_hash"] = digest
        opts = dict(task.options)
        if task.pass_seed and "seed" not in opts:
            opts["seed"] = task.seed
        torch.manual_seed(task.seed)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t0 = time.perf_counter()
            A = project(W, task.format, task.budget, **opts)
            row["seconds"] = time.perf_counter() - t0
        with torch.no_grad():
            D = W.to(torch.float64) - A.to_dense().to(device=W.device, dtype=torch.float64)
            e_fro = float(torch.linalg.norm(D))
            e_two = spectral_norm(D)
        rel = e_fro / fro if fro > 0 else (0.0 if e_fro == 0 else math.inf)
        rel2 = e_two / two if two > 0 else (0.0 if e_two == 0 else math.inf)
        if not (math.isfinite(rel) and math.isfinite(rel2)):
            raise FloatingPointError(
                f"the approximation has non-finite error (rel_error={rel}, rel_error_2={rel2})"
            )
        row.update(
            flops=int(A.flops), params=int(A.num_params),
            budget_fraction=int(A.flops) / float(m * n), rel_error=rel, rel_error_2=rel2,
            status="ok",
            message=_one_line("; ".join(f"{w.category.__name__}: {w.message}" for w in caught)),
        )
        if task.product_batch is not None:
            ta, tw = time_products(A, W, task.product_batch)
            row.update(product_batch=task.product_batch, product_seconds=ta,
                       dense_product_seconds=tw)
    except InfeasibleBudgetError as exc:
        row.update(status="infeasible", message=_one_line(str(exc)))
    except Exception as exc:  # one failing fit never aborts the sweep
        row.update(status="failed", message=_one_line(f"{type(exc).__name__}: {exc}"))
    if not math.isfinite(row["seconds"]):
        row["seconds"] = time.perf_counter() - t0
    row["finished_at"] = _now()
    return row
