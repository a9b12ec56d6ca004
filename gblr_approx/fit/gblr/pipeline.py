"""``fit_gblr``: fit a hard GBLR matrix to a dense matrix within a MAC budget.

Stages (only iterates within the budget that improve on the best hard matrix so far are
kept, so the result is the best hard iterate seen):

1. **Embedded starts** (:mod:`.candidates`): truncated SVD, block-low-rank on several grids,
   block-sparse on several block shapes -- all embedded into GBLR exactly -- and a "global
   low-rank + fine grid of low-rank blocks" fit (:mod:`.mixed`). The result is therefore never
   worse than any of those formats at the same budget.
2. **Structure learning by interval ALS** (:mod:`.intervals`, default): every component, split
   into rank-1 pieces, gets its exact best cyclic row interval and factor, then column interval
   and factor, under a price per MAC (the proximal soft-threshold of the width penalty) and
   the budget; widths shrink, grow and move, components vanish.
3. **Proximal-gradient refinement on Gaudi parameters** (:mod:`.proximal`,
   ``algorithm="proximal"``, after stage 2): starts exactly at the best hard matrix; Gaudi
   mask gradients, soft-thresholded widths, exact budget projection by bisection, and an
   exact joint least-squares update of the factors after every step. Beats its ALS start on
   the benchmark layers, but at equal time more ALS sweeps gain about as much, hence opt-in.
4. **Exact polishing** (:mod:`.blocks`, ``algorithm="bcd"``): block-coordinate descent with
   truncated SVDs on the fixed rectangles of the best start.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from ... import __version__, linalg
from ...budget import InfeasibleBudgetError, resolve_budget
from ...formats.base import fit_scale, with_autograd
from ...formats.gblr import GBLR
from ...projection import jsonable_option
from ...validation import as_matrix, check_positive_int
from ..result import FitResult
from .blocks import BlockModel, Rect
from .candidates import (
    FINE_PRICE_GAIN,
    default_block_shapes,
    default_grids,
    default_mixed_grids,
    embedded_candidates,
    fine_regime,
    mixed_candidates,
)
from .intervals import _col_slices, interval_stage
from .layout import check_layout, merge_identical, tiled_layout
from .support import support_candidates

__all__ = ["fit_gblr", "LARGE_MIN_ENTRIES", "LARGE_SWEEP_WORK", "large_sweeps"]

_ALGORITHMS = ("auto", "intervals", "embedded", "bcd", "proximal")

#: From this many entries (``m n``) on, the defaults of ``fit_gblr`` follow the large-layer
#: schedule (docs/large_layers.md): the low-rank start only (no block-low-rank, block-sparse
#: or mixed starts unless ``grids`` / ``block_shapes`` / ``mixed_grids`` are given), the price
#: of interval ALS read off that start, and as many sweeps as :data:`LARGE_SWEEP_WORK` buys
#: (:func:`large_sweeps`) unless ``steps`` / ``sweeps`` are given. ``2**23`` = 8,388,608
#: (e.g. 2048 x 4096): the MiniLM layers (at most 384 x 1536) and 1024 x 4096 keep the full
#: schedule. Tests lower it (``monkeypatch.setattr(pipeline, "LARGE_MIN_ENTRIES", ...)``).
LARGE_MIN_ENTRIES: int = 2**23

#: Interval-ALS work of the large-layer schedule, in piece-entries: a sweep visits every
#: rank-1 piece's rectangle (``h w`` entries) about six times (memory-bound ``addmm_`` and
#: strip products, ~20 GB/s), so a sweep from the rank-746 low-rank start of a 4096 x 11008
#: layer costs ``746 * 4096 * 11008 = 3.4e10`` piece-entries (~50 CPU seconds on one loaded
#: thread). ``4e10`` buys that layer one sweep and a 4096 x 4096 layer (512 pieces) four.
LARGE_SWEEP_WORK: int = 40_000_000_000


def large_sweeps(start: GBLR, max_sweeps: int = 25) -> int:
    """Interval-ALS sweeps of the large-layer schedule from ``start``: ``LARGE_SWEEP_WORK``
    divided by the piece-entries of one sweep (``sum_k r_k h_k w_k`` over the factored
    components), clipped to ``[1, max_sweeps]``."""
    work = 0
    for k in range(start.num_components):
        if not bool(start.is_dense[k]):
            work += int(start.ranks[k]) * int(start.row_width[k]) * int(start.col_width[k])
    return max(1, min(max_sweeps, LARGE_SWEEP_WORK // max(work, 1)))


def _resolve_device(device: Any, W: torch.Tensor) -> torch.device:
    if device is None:
        return W.device
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was requested but CUDA is not available")
    return dev


def _check_grids(value: Any, name: str, m: int, n: int) -> list[tuple[int, int]]:
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{name} must be a list of (rows, cols) pairs; got {value!r}")
    out = []
    for g in value:
        if not (isinstance(g, (list, tuple)) and len(g) == 2):
            raise TypeError(f"{name} must be a list of (rows, cols) pairs; got element {g!r}")
        a = check_positive_int(g[0], f"{name} entry")
        b = check_positive_int(g[1], f"{name} entry")
        if a > m or b > n:
            raise ValueError(f"{name} entry {tuple(g)} does not fit a {m}x{n} matrix")
        out.append((a, b))
    return out


def _model_from_gblr(W: torch.Tensor, G: GBLR) -> BlockModel:
    rects, ranks = [], []
    for k in range(G.num_components):
        rc = Rect(
            int(G.row_start[k]), int(G.row_width[k]), int(G.col_start[k]), int(G.col_width[k])
        )
        rects.append(rc)
        ranks.append(int(G.ranks[k]) if not bool(G.is_dense[k]) else rc.dense_rank())
    return BlockModel(W, rects, ranks)


def _wide_enough(G: GBLR, min_width: int) -> bool:
    """Whether every interval of ``G`` has at least ``min_width`` entries (clipped to the
    side)."""
    if min_width <= 1 or G.num_components == 0:
        return True
    m, n = G.shape
    return (int(G.row_width.min()) >= min(min_width, m)
            and int(G.col_width.min()) >= min(min_width, n))


def _residual(W: torch.Tensor, G: GBLR) -> torch.Tensor:
    """``W - G`` as one new dense matrix, component by component on (cyclic) slices.

    Extra memory: the result (``m n`` entries) and one block; ``GBLR.to_dense`` followed by a
    difference needs two matrices plus the broadcast index tensors of ``index_put_``.
    Cost: ``sum_k r_k h_k w_k`` MACs (dense blocks: ``h_k w_k`` subtractions).
    """
    m, n = W.shape
    R = W.clone()
    for k in range(G.num_components):
        r0, h = int(G.row_start[k]), int(G.row_width[k])
        c0, w = int(G.col_start[k]), int(G.col_width[k])
        if h == 0 or w == 0:
            continue
        dense = bool(G.is_dense[k])
        U, V = (G.block(k), None) if dense else G.component(k)
        for a, b, oa in _col_slices(r0, h, m):
            for p, q, op in _col_slices(c0, w, n):
                if dense:
                    R[a:b, p:q].sub_(U[oa : oa + b - a, op : op + q - p])
                else:
                    R[a:b, p:q].addmm_(U[oa : oa + b - a], V[op : op + q - p].T, alpha=-1.0)
    return R


@with_autograd
def fit_gblr(
    W: Any,
    budget: float | int,
    *,
    steps: int | None = None,
    device: Any = None,
    seed: int = 0,
    progress: bool | None = None,
    callback: Callable[[dict[str, Any]], Any] | None = None,
    rank_per_component: int = 1,
    components: int | None = None,
    **options: Any,
) -> FitResult:
    """Fit a hard GBLR matrix to ``W`` with cost at most ``budget``.

    Parameters
    ----------
    W : Tensor or ndarray, shape (m, n)
        Target matrix (float16/bfloat16 are computed in float32).
    budget : float or int
        Float in (0, 1]: fraction of the dense cost ``m n``; int >= 1: MACs.
    steps : int, optional
        Structure-learning steps: interval-ALS sweeps (default 25, fewer when ``tol`` stops
        it) or, with ``algorithm="proximal"``, gradient steps after 25 ALS sweeps (default
        from the cost of a step: 60 on a 384 x 384 layer at 25 %, at least 4). ``0`` keeps the
        best start. Layers of at least :data:`LARGE_MIN_ENTRIES` entries follow the
        large-layer schedule: the low-rank start only (given ``grids``, ``block_shapes`` or
        ``mixed_grids`` add theirs) and :func:`large_sweeps` sweeps (one at 4096 x 11008;
        a given ``steps`` or ``sweeps`` wins); ``FitResult.info["schedule"]`` records it.
    device : str or torch.device, optional
        Where to compute (default: ``W``'s device). ``"cuda"`` raises if CUDA is absent.
        The result is returned on ``W``'s device.
    seed : int
        Seed of every random choice (restarts, initial locations).
    progress : bool, optional
        tqdm progress bar; ``None`` shows it only when stderr is a terminal.
    callback : callable, optional
        Called with each history record (a dict, see :class:`FitResult`) as it is made.
        Returning ``False`` stops the fit early (the best matrix so far is returned).
    rank_per_component : int
        Rank of each component in the proximal-gradient stage. Elsewhere ranks are per
        component: starts keep their blocks' ranks, interval ALS uses rank-1 pieces.
    components : int, optional
        Cap on the number of blocks of the mixed start and on the components of the
        proximal stage (default: no cap).
    **options
        ``algorithm`` : {"auto", "intervals", "embedded", "bcd", "proximal"}, default
        "auto" (= "intervals": stages 1-2); "embedded": the exact embeddings only; "bcd":
        stage 1 + 4; "proximal": stages 1-3. ``start`` : GBLR within the budget, used
        instead of stage 1 (with "auto"/"intervals"/"proximal"). ``sweeps`` : int, ALS
        sweeps before stage 3 (default 25; ``steps`` then counts gradient steps, default
        ``60 * 6e7 / (m n P)`` clamped to [10, 60], ``P`` = rank-1 pieces of the start).
        ``grids`` : list of (b1, b2), block-low-rank
        starts (default :func:`~.candidates.default_grids`). ``mixed_grids`` : grids of the
        low-rank + blocks start (default :func:`~.candidates.default_mixed_grids`).
        ``block_shapes`` : list of (br, bc) (default
        :func:`~.candidates.default_block_shapes`). ``mixed_iters`` : int (6). ``tol`` : float
        or None (1e-3): interval ALS stops when the best error improved by less than this
        fraction over 5 sweeps. ``polish_sweeps`` : int (3). ``dtype`` : torch dtype of the
        computation (default that of ``W``). Proximal options are documented in
        :func:`.proximal.proximal_gradient` (``structure_lr``, ``sigma``, ``penalty``,
        ``gradient``, ``cg_iters``, ``refit_every``, ``refit_iters``). ``layout`` :
        {"free", "tiled"}, default "free"; "tiled" snaps the best layout to the grid of
        ``tile`` entries (``tile`` : int, default 32) and refits it exactly, for fewer,
        larger, aligned blocks that run at GEMM rate (:mod:`.layout`, docs/fit_gblr.md).
        ``min_width`` : int (default 1): every row and column interval of the free layout
        has at least this many entries (starts with narrower blocks are skipped, interval
        ALS never narrows a piece below it): fewer, wider pieces at free positions, for
        faster products at some error (docs/fit_gblr.md, "Wide pieces"). With "tiled",
        ``min_width=tile`` gives pieces that survive the snapping (more accurate, more
        components). Not with "proximal".

    Returns
    -------
    FitResult
        ``.matrix`` is a :class:`~gblr_approx.GBLR` with ``flops <= budget`` (always), the
        best hard iterate seen; ``.history`` the per-step records.

    Raises
    ------
    TypeError, ValueError
        Invalid ``W``, ``budget`` or option (the message names it).
    InfeasibleBudgetError
        ``min_width`` set and the budget below one rank-1 ``min_width`` square piece.
    """
    gram = options.pop("gram", None)
    if gram is not None:  # data-aware: minimise ||(W - A) L||_F (gblr_approx/fit/weighted.py)
        from .weighted import fit_gblr_data_aware

        return fit_gblr_data_aware(W, budget, gram, steps=steps, device=device, seed=seed,
                                   progress=progress, callback=callback,
                                   rank_per_component=rank_per_component,
                                   components=components, **options)
    threads = torch.get_num_threads()
    if threads > 1:
        # measured: the fit is made of many small products, SVDs of blocks and O(m) scans;
        # intra-op threads bring little and stall by 10-100x on a loaded machine, so the fit
        # runs single-threaded and restores the caller's setting afterwards
        torch.set_num_threads(1)
    try:
        with linalg.recording_svd_fallbacks() as fallbacks:
            result = _fit_gblr(W, budget, steps=steps, device=device, seed=seed,
                               progress=progress, callback=callback,
                               rank_per_component=rank_per_component, components=components,
                               **options)
    finally:
        torch.set_num_threads(threads)
    if fallbacks:  # (an SVD that had to be retried: same mathematics, another LAPACK path)
        result.info["svd_fallbacks"] = result.matrix.info["svd_fallbacks"] = (
            linalg.fallback_summary(fallbacks))
    return result


def _fit_gblr(
    W: Any,
    budget: float | int,
    *,
    steps: int | None,
    device: Any,
    seed: int,
    progress: bool | None,
    callback: Callable[[dict[str, Any]], Any] | None,
    rank_per_component: int,
    components: int | None,
    **options: Any,
) -> FitResult:
    t0 = time.perf_counter()
    W = as_matrix(W, "W")
    out_device = W.device
    m, n = W.shape
    B = resolve_budget(budget, m, n)
    opts = dict(options)
    algorithm = opts.pop("algorithm", "auto")
    if algorithm not in _ALGORITHMS:
        raise ValueError(f"algorithm must be one of {_ALGORITHMS}; got {algorithm!r}")
    if steps is not None:
        steps = check_positive_int(steps, "steps", minimum=0)
    rank_per_component = check_positive_int(rank_per_component, "rank_per_component")
    if components is not None:
        components = check_positive_int(components, "components")
    seed = check_positive_int(seed, "seed", minimum=0)
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"progress must be True, False or None; got {progress!r}")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable; got {type(callback).__name__}")
    dev = _resolve_device(device, W)
    dtype = opts.pop("dtype", W.dtype)
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64; got {dtype!r}")
    # large layers (LARGE_MIN_ENTRIES): the low-rank start only, unless starts are given
    large = m * n >= LARGE_MIN_ENTRIES
    grids = _check_grids(opts.pop("grids", [] if large else default_grids(m, n)), "grids", m, n)
    block_shapes = _check_grids(
        opts.pop("block_shapes", [] if large else default_block_shapes(m, n)),
        "block_shapes", m, n,
    )
    layout, tile = check_layout(opts.pop("layout", "free"), opts.pop("tile", 32))
    min_width = check_positive_int(opts.pop("min_width", 1), "min_width")
    if min_width > min(m, n):
        raise ValueError(f"min_width must be at most min(m, n) = {min(m, n)}; got {min_width}")
    if min_width > 1 and algorithm == "proximal":
        raise ValueError("min_width is not supported with algorithm='proximal' (the Gaudi "
                         "widths are not bounded below); use 'auto' or 'intervals'")
    mixed_grids = _check_grids(
        opts.pop("mixed_grids", [] if large else default_mixed_grids(m, n, B, min_block=min_width)),
        "mixed_grids", m, n,
    )
    mixed_iters = check_positive_int(opts.pop("mixed_iters", 6), "mixed_iters")
    tol = opts.pop("tol", 1e-3)
    if tol is not None and not (isinstance(tol, (int, float)) and 0 <= tol < 1):
        raise ValueError(f"tol must be a float in [0, 1) or None; got {tol!r}")
    polish_sweeps = check_positive_int(opts.pop("polish_sweeps", 3), "polish_sweeps", minimum=0)
    start = opts.pop("start", None)
    if start is not None and not isinstance(start, GBLR):
        raise TypeError(f"start must be a GBLR matrix or None; got {type(start).__name__}")
    if start is not None and (tuple(start.shape) != (m, n) or start.flops > B):
        raise ValueError(
            f"start must be a {m}x{n} GBLR within the budget ({B} MACs); got shape "
            f"{tuple(start.shape)} and {start.flops} MACs"
        )
    if start is not None and not _wide_enough(start, min_width):
        raise ValueError(f"start has intervals narrower than min_width={min_width}")
    sweeps = opts.pop("sweeps", None)
    if sweeps is not None:
        sweeps = check_positive_int(sweeps, "sweeps", minimum=0)
    prox_keys = (
        "lr", "structure_lr", "sigma", "penalty", "restarts", "cg_iters", "refit_every",
        "refit_iters", "gradient",
    )
    prox_opts = {k: opts.pop(k) for k in prox_keys if k in opts}
    if opts:
        raise TypeError(
            f"unknown option(s) {sorted(opts)} for fit_gblr; known: algorithm, start, sweeps, "
            f"grids, block_shapes, mixed_grids, mixed_iters, tol, polish_sweeps, dtype, layout, "
            f"tile, min_width, "
            f"{', '.join(prox_keys)}"
        )
    if progress is None:
        progress = bool(getattr(sys.stderr, "isatty", lambda: False)())
    steps_given = steps
    if steps is None:
        steps = 60 if algorithm == "proximal" else 25
    sweeps_given = sweeps is not None
    if sweeps is None:
        sweeps = 25 if algorithm == "proximal" else steps
    schedule: dict[str, Any] = {"large": large}

    # fit W / s (s a power of two, 1 for ordinary magnitudes): squares of entries near 1e20
    # or 1e-25 over- or underflow float32; the result is scaled back exactly at the end
    scale = fit_scale(W)
    Wc = (W if scale == 1.0 else W / scale).to(device=dev, dtype=dtype)
    # from the randomized-SVD size on: float64 sums without float64 copies of the layer
    big = m * n >= linalg.RANDOMIZED_MIN_ENTRIES
    nrm = (math.sqrt(linalg.frob2(Wc)) if big else float(Wc.double().norm())) or 1.0
    history: list[dict[str, Any]] = []
    state: dict[str, Any] = {"best": None, "err": math.inf, "stop": False, "source": None}

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(desc="fit_gblr", unit="step", leave=False)

    def record(stage: str, err: float, flops: int, comps: int, loss: float | None = None) -> None:
        rec = {
            "step": len(history),
            "stage": stage,
            "loss": err**2 if loss is None else loss,
            "rel_error": err,
            "flops": int(flops),
            "components": int(comps),
            "seconds": time.perf_counter() - t0,
        }
        history.append(rec)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(err=f"{state['err']:.4f}", stage=stage)
        if callback is not None and callback(rec) is False:
            state["stop"] = True

    def offer(stage: str, G: GBLR, err: float | None = None, aligned: bool = False) -> None:
        # (aligned: a tiled-layout iterate, whose intervals are whole grid cells)
        if G.flops > B or not (aligned or _wide_enough(G, min_width)):
            return
        if err is None and big:
            D = _residual(Wc, G)  # one dense temporary, no float64 copy
            err = math.sqrt(linalg.frob2(D)) / nrm
            del D
        elif err is None:
            err = float((Wc - G.to_dense()).double().norm()) / nrm
        if err < state["err"]:
            state["best"], state["err"], state["source"] = G, err, stage
        record(stage, err, G.flops, G.num_components)

    try:
        if start is not None:
            given = start.to(device=dev, dtype=dtype)
            offer("init:given", given if scale == 1.0 else given._scaled(1.0 / scale))
            if algorithm in ("auto", "intervals", "proximal"):
                algorithm_starts = False
            else:
                algorithm_starts = True
        else:
            algorithm_starts = True
        # ---- stage 1: embedded starts
        lam = None
        for name, G in (
            embedded_candidates(Wc, B, grids, block_shapes) if algorithm_starts else ()
        ):
            offer(f"init:{name}", G)
            if large and name == "lowrank" and not bool(G.is_dense[0]):
                # the price of interval ALS, sigma^2 / (m + n), from the start's smallest
                # singular value sigma_r (balanced factors: sigma_t = |U_t| |V_t|) instead of
                # sigma_{r+1} from a second randomized SVD (~10 s at 4096 x 11008)
                U0, V0 = G.component(0)
                sig = torch.linalg.vector_norm(U0, dim=0) * torch.linalg.vector_norm(V0, dim=0)
                lam = float(sig.min()) ** 2 / (m + n)
                schedule["price"] = "sigma_r of the low-rank start"
            if state["stop"]:
                break
        if algorithm != "embedded" and algorithm_starts and not state["stop"]:
            # matrices with exact zeros: components read off the non-zero pattern
            for name, G in support_candidates(Wc, B):
                offer(f"init:{name}", G)
        best_model: BlockModel | None = None
        if algorithm != "embedded" and algorithm_starts and not state["stop"]:
            for name, model, err in mixed_candidates(
                Wc, B, mixed_grids, iters=mixed_iters, max_components=components
            ):
                before = state["err"]
                offer(f"init:{name}", model.to_gblr(), err)
                if state["err"] < before:
                    best_model = model
                if state["stop"]:
                    break
        if state["best"] is None and min_width > 1:
            if B < 2 * min_width:
                raise InfeasibleBudgetError(
                    "gblr", B, 2 * min_width,
                    f"a rank-1 min_width={min_width} square piece costs {2 * min_width}",
                )
            # one rank-1 min_width x min_width piece (the structure learning moves it)
            U0, S0, Vh0 = linalg.svd(Wc[:min_width, :min_width])
            G = GBLR((m, n), [0], [min_width], [0], [min_width],
                     [(U0[:, :1] * S0[0], Vh0[:1].T)])
            offer("init:piece", G)
        if state["best"] is None:
            # tiny budgets: the single best dense entries (1 x 1 components)
            flat = Wc.abs().flatten()
            idx = torch.topk(flat, min(B, flat.numel())).indices.tolist()
            G = GBLR(
                (m, n),
                [i // n for i in idx],
                [1] * len(idx),
                [i % n for i in idx],
                [1] * len(idx),
                [Wc[i // n, i % n].reshape(1, 1) for i in idx],
            )
            offer("init:entries", G)

        # ---- stage 2: structure learning by interval ALS (exact prox-type updates)
        if large and not sweeps_given and (algorithm == "proximal" or steps_given is None):
            # (with "proximal", steps counts gradient steps and keeps its own default)
            sweeps = large_sweeps(state["best"])
            if algorithm != "proximal":
                steps = sweeps
            schedule["sweeps"] = f"{sweeps} (LARGE_SWEEP_WORK)"
        if algorithm in ("auto", "intervals", "proximal") and sweeps and not state["stop"]:
            gain = FINE_PRICE_GAIN if fine_regime(m, n, B) else 2.0  # price exponent
            for G, err, cost, count in interval_stage(
                Wc, B, state["best"], sweeps, components, tol=tol, lam=lam, gain=gain,
                min_width=min_width,
            ):
                before = state["err"]
                if G is None:
                    record("intervals", err, cost, count)
                else:
                    offer("intervals", G, err)
                if state["err"] < before:
                    best_model = None
                if state["stop"]:
                    break

        # ---- stage 3: proximal gradient on Gaudi parameters
        if algorithm == "proximal" and steps and not state["stop"]:
            from .proximal import proximal_gradient

            pending = None
            if steps_given is None:
                # one step costs about 10 products of size m n P (P = rank-1 pieces of the
                # start): about 60 steps for a 384 x 384 layer at 25 %, fewer for bigger ones,
                # at least 4 (on the 1536-wide MiniLM layers at 25 % the gain of steps 5-10
                # is below 1e-4 of relative error, for 2 CPU s per step)
                P = int(state["best"].ranks.sum())
                steps = max(4, min(60, round(60 * 6e7 / max(m * n * P, 1))))

            for G, err, loss, cost, count in proximal_gradient(
                Wc,
                B,
                state["best"],
                steps=steps,
                seed=seed,
                rank_per_component=rank_per_component,
                components=components,
                best=state["err"],
                **prox_opts,
            ):
                before = state["err"]
                if G is state["best"]:
                    continue  # step 0: the start itself
                if G is not None and err < state["err"]:
                    # a snapshot: materialised once the stage ends (building is a loop over
                    # the components); the error is exact already
                    pending = G
                    state["err"], state["source"] = err, "proximal"
                record("proximal", err, cost, count, loss)

                if state["err"] < before:
                    best_model = None
                if state["stop"]:
                    break
            if pending is not None:
                state["best"] = pending()

        # ---- stage 4: exact polishing on the best rectangles
        if algorithm == "bcd" and polish_sweeps and not state["stop"]:
            model = best_model if best_model is not None else _model_from_gblr(Wc, state["best"])
            for _ in range(polish_sweeps):
                err = model.sweep(keep_spectrum=False)
                offer("bcd", model.to_gblr(), err)
                if state["stop"]:
                    break

        # ---- runnable layout: snap the best to the tile grid, refit exactly (fit/gblr/layout.py)
        if layout == "tiled" and not state["stop"]:
            free, free_err = state["best"], state["err"]
            state["best"], state["err"] = None, math.inf
            for name, G, err in tiled_layout(Wc, B, free, tile=tile, max_components=components):
                offer(name, G, err, aligned=True)
                if state["stop"]:
                    break
            if state["best"] is None:  # no aligned iterate (stopped, tiny budget): the free one
                state["best"], state["err"] = free, free_err
    finally:
        if bar is not None:
            bar.close()

    G = merge_identical(state["best"])  # lossless: one component per distinct rectangle
    if scale != 1.0:
        G = G._scaled(scale)  # exact: a power of two, in the U buffer only
    if G.device != out_device:
        G = G.to(device=out_device)
    seconds = time.perf_counter() - t0
    used = {  # every option, as resolved (given or default)
        "algorithm": algorithm, "steps": steps, "sweeps": sweeps, "seed": seed,
        "rank_per_component": rank_per_component, "components": components,
        "dtype": str(dtype).replace("torch.", ""), "device": str(dev),
        "mixed_grids": [list(g) for g in mixed_grids], "mixed_iters": mixed_iters, "tol": tol,
        "polish_sweeps": polish_sweeps, "layout": layout, "tile": tile,
        "min_width": min_width,
        "start": None if start is None else (
            f"GBLR ({start.num_components} components, {start.flops} MACs)"),
        **{k: jsonable_option(v) for k, v in prox_opts.items()},
    }
    G.info = {
        "algorithm": f"fit_gblr ({algorithm})",
        "start": state["source"],
        "rel_error": state["err"],
        "budget": budget,
        "budget_macs": B,
        "seed": seed,
        "steps": steps,
        "seconds": seconds,
        "version": __version__,
    }
    assert G.flops <= B, "fit_gblr must respect the budget"
    return FitResult(
        matrix=G,
        history=history,
        rel_error=state["err"],
        budget=B,
        seconds=seconds,
        info={
            "algorithm": algorithm,
            "best_stage": state["source"],
            "grids": grids,
            "block_shapes": block_shapes,
            "options": used,
            "budget": budget,
            "budget_macs": B,
            "schedule": schedule,
            "version": __version__,
            **({"input_scale": scale} if scale != 1.0 else {}),
        },
    )
