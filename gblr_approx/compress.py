"""Compress the linear layers of a model under one MAC budget (``ga.nn.compress_model``).

Two allocations of the model budget ``B`` (MACs per input row, summed over the selected layers):

``"uniform"``
    Every layer gets the same fraction ``B / sum_l m_l n_l`` of its dense cost; with several
    formats, each layer takes the one of lowest error at that fraction.
``"global"``
    Each layer ``l`` gets a curve of candidates ``(format, cost c, error e)`` -- every format on
    a grid of budget fractions (and, for low-rank, every rank from one whitened SVD) -- and the
    choice minimises ``sum_l e_l`` subject to ``sum_l c_l <= B``: a multiple-choice knapsack,
    solved greedily on the lower convex hull of each curve (take the upgrade of largest error
    decrease per MAC while it fits; the Lagrangian relaxation is solved exactly by this greedy,
    and the result is within one upgrade of it), followed by a pass that spends what is left
    on any candidate that still fits.

The error of a candidate is its output error ``||(W - A) X||_F^2`` on the calibration inputs
(relative to ``||W X||_F^2`` with ``objective="relative"``, the default, or absolute) when
calibration data is given, else the squared relative weight error.
"""

from __future__ import annotations

import heapq
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .budget import InfeasibleBudgetError
from .calibration import collect_grams, find_linears, select_linears
from .compress_dask import check_scheduler, run_layer_jobs
from .data_aware import output_error, regularised_gram, whitened_lowrank
from .formats.base import FORMATS, StructuredMatrix, get_format, projection_options
from .metrics import relative_error
from .projection import project
from .validation import check_positive_int

__all__ = ["compress_model", "AUTO_FORMATS", "DEFAULT_FRACTIONS", "GBLR_FREE_STAGE_OPTIONS",
           "GBLR_RUNNABLE", "GBLR_RUNNABLE_FIT",
           "RUNNABLE_MIN_TILES", "RUNNABLE_OPTIONS", "RUNNABLE_TILES", "gblr_layer_options",
           "layer_options", "replace_module"]

#: Formats tried by ``formats="auto"``: the ones whose projection takes about a second or less
#: on a 1536 x 384 layer. GBLR and BLAST (iterative fits, 5-20 s per layer and budget) are
#: used when named explicitly.
AUTO_FORMATS = ("lowrank", "blocksparse", "blocklowrank", "monarch")

#: Budget fractions of each layer's dense cost tried by ``allocation="global"`` for the formats
#: other than low-rank (low-rank tries every rank: its whole curve comes from one SVD).
DEFAULT_FRACTIONS = (0.2, 0.35, 0.5, 0.65, 0.8)

#: The curves use the data-aware projections without block-coordinate refits (the structure
#: fitted to ``W`` and to ``W diag(G)^{1/2}``, the better kept); the chosen candidate of each
#: layer is then projected again with the full refits, and kept only if it is better.
_CURVE_OPTIONS = {"sweeps": 0}

#: GBLR layers of a compressed model run their products, so ``compress_model`` fits them with
#: the runnable layout (``fit_gblr(..., layout="tiled", tile=T)``: aligned rank-r tiles that
#: multiply at GEMM rate, docs/product_speed.md "Runnable layouts") unless ``layout`` is given.
#: The free layout is more accurate per MAC but slower than the dense layer it replaces
#: (MiniLM at 50 %: 1.6x the dense encode time; docs/compress_model.md). The tile is the first
#: of :data:`RUNNABLE_TILES` whose smallest side the layer reaches (a given ``tile`` is used
#: on layers of at least :data:`RUNNABLE_MIN_TILES` such tiles per side); smaller layers keep
#: the free layout.
GBLR_RUNNABLE = {"layout": "tiled", "tile": 64}
#: ``(smallest side, tile)``: 128-entry tiles on layers of >= 384 per side, 64 on >= 256.
#: MiniLM at 50 %, 128 against 64 (sixteenth session, one thread, docs/benchmarks.md): its
#: panels are twice as tall, half as many GEMMs and gathered rows; layers at 256-2048 rows
#: 0.84-1.05 of ``nn.Linear`` against 1.04-1.33; model encode time / dense at batch 32
#: 0.97-1.03 against 1.13-1.20; weight error +0.7-2 % relative, mean cosine to the dense
#: model on 256 stdlib docstrings 0.439 -> 0.432.
RUNNABLE_TILES = ((384, 128), (256, 64))
RUNNABLE_MIN_TILES = 4
#: The runnable GBLR fits skip ``fit_gblr``'s free stage (interval ALS, ``sweeps=0``) unless
#: one of :data:`GBLR_FREE_STAGE_OPTIONS` is given: its snapped pieces changed nothing in the
#: tiled results measured. On every MiniLM layer-0 layer at 25 % and 50 % with tiles 32, 64
#: and 128, and on a power-law 2048 x 2048 at 50 % (tile 128), the tiled fit from the starts
#: alone had the same relative error to 4 decimals in 2-8 s instead of 7-46 s (about 55-128
#: s instead of 440 s at 2048 x 2048; seventeenth session, docs/benchmarks.md).
GBLR_RUNNABLE_FIT = {"sweeps": 0}
#: Options that make the free stage matter (``min_width`` learns pieces one tile wide that
#: survive the snapping) or that set it explicitly.
GBLR_FREE_STAGE_OPTIONS = ("steps", "sweeps", "min_width", "start", "algorithm")
#: Options ``compress_model`` fills in for block-sparse and BLAST layers with both sides >=
#: ``RUNNABLE_MIN_TILES * 64`` unless the option is given: block grids that multiply fast on
#: the small batches of a sentence encoder. MiniLM at 50 %, plain per-layer fits, one
#: thread (docs/compress_model.md, "Block-sparse and BLAST layers that run fast"):
#: block-sparse 64 x 64 blocks instead of 32 x 32 (a 384 x 384 layer at 51 rows 1.61 -> 0.80
#: of ``nn.Linear``, weight error +1-4 % relative, the model's mean cosine to dense on 256
#: stdlib docstrings 0.051 -> 0.106); BLAST an 8 x 8 grid instead of ``blocks="auto"`` (16 x
#: 16 on these layers: 384 x 384 at 960 rows 1.27 -> 1.01, weight error +1.5-6 %, cosine
#: 0.475 -> 0.476).
RUNNABLE_OPTIONS = {"blocksparse": {"block_shape": (64, 64)}, "blast": {"blocks": (8, 8)}}


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at the dotted module path ``name`` of ``model``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _formats(formats: Any) -> list[str]:
    if isinstance(formats, str):
        if formats == "auto":
            return list(AUTO_FORMATS)
        formats = [formats]
    if not isinstance(formats, (list, tuple)) or not formats:
        raise TypeError(f"formats must be a format name, a list of them or 'auto'; got {formats!r}")
    out = []
    for f in formats:
        cls = get_format(f)
        if cls.project is StructuredMatrix.project:
            raise ValueError(f"format {f!r} has no projection; use one of {sorted(FORMATS)}")
        out.append(cls.format_name)
    return list(dict.fromkeys(out))


def _progress(enabled: bool | None, total: int, desc: str):
    if enabled is None:
        enabled = sys.stderr.isatty()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        enabled = False
    if not enabled:
        return None
    return tqdm(total=total, desc=desc, leave=False)


class _Layer:
    """One selected layer: weight (float64), Gram, candidates."""

    def __init__(self, name: str, mod: nn.Linear, gram: torch.Tensor | None) -> None:
        self.name = name
        self.mod = mod
        self.dtype = mod.weight.dtype
        self.W = mod.weight.detach().to(torch.float64)
        self.m, self.n = self.W.shape
        self.dense = self.m * self.n
        self.gram = gram
        self.weight = 1.0  # sensitivity c_l (objective "absolute" only)
        self.cands: list[dict[str, Any]] = []

    def __getstate__(self) -> dict[str, Any]:
        # what a Dask task needs: the weight and Gram, not the module (or the model behind it)
        return {k: v for k, v in self.__dict__.items() if k != "mod"}

    def error(self, A: Any, objective: str) -> float:
        """Squared error used by the allocation (output error if a Gram is known)."""
        if self.gram is None:
            return relative_error(self.W, A) ** 2
        e = output_error(self.W, A, self.gram, relative=objective == "relative")
        return e * e * self.weight


def _lowrank_curve(layer: _Layer, ridge: float, objective: str) -> list[dict[str, Any]]:
    """Every rank's (cost, squared error) from one (whitened) SVD; matrices built on demand."""
    W, m, n = layer.W, layer.m, layer.n
    if layer.gram is None:
        S = torch.linalg.svdvals(W)
        total = float(W.pow(2).sum())
    else:
        Gr = regularised_gram(layer.gram, ridge)
        _, _, S = whitened_lowrank(W, Gr, 0)
        total = (float((W * (W @ layer.gram)).sum()) if objective == "relative"
                 else 1.0 / layer.weight)
    tail = torch.flip(torch.cumsum(torch.flip(S.double().pow(2), [0]), 0), [0])
    out = []
    rmax = min(m, n, layer.dense // (m + n))
    for r in range(1, rmax + 1):
        e2 = float(tail[r]) if r < S.shape[0] else 0.0
        out.append({"format": "lowrank", "flops": r * (m + n), "err": e2 / total,
                    "matrix": None, "rank": r})
    return out


def _build_candidates(layer, formats, fractions, ridge, objective, options, fmt_options,
                      keep_dense):
    cands = []
    if keep_dense:
        cands.append({"format": "dense", "flops": layer.dense, "err": 0.0, "matrix": None})
    for fmt in formats:
        if fmt == "lowrank" and not options.get("rank"):
            cands += _lowrank_curve(layer, ridge, objective)
            continue
        for f in fractions:
            b = max(int(math.floor(f * layer.dense)), 1)
            A = _project(layer, fmt, b, ridge, {**fmt_options.get(fmt, {}), **_CURVE_OPTIONS}
                         if layer.gram is not None else fmt_options.get(fmt, {}))
            if A is None:
                continue
            cands.append({"format": fmt, "flops": int(A.flops), "err": layer.error(A, objective),
                          "matrix": A, "budget": b})
    return cands


def _uniform_layer(L: _Layer, fmts: list[str], b: int, ridge: float,
                   fmt_options: Mapping[str, Mapping[str, Any]], objective: str) -> dict[str, Any]:
    """The format of lowest error for one layer at ``b`` MACs (``allocation="uniform"``)."""
    best = None
    for fmt in fmts:
        t0 = time.perf_counter()
        A = (_project(L, fmt, b, ridge, fmt_options.get(fmt, {})) if len(fmts) > 1
             else _project_strict(L, fmt, b, ridge, fmt_options.get(fmt, {})))
        if A is None:
            continue
        c = {"format": fmt, "flops": int(A.flops), "err": L.error(A, objective),
             "matrix": A, "seconds": time.perf_counter() - t0}
        if best is None or c["err"] < best["err"]:
            best = c
    if best is None:
        raise InfeasibleBudgetError(
            "compress_model", b, min(get_format(f).min_budget(L.m, L.n) for f in fmts),
            f"layer {L.name!r}")
    return best


def _curve_layer(L: _Layer, *args: Any) -> tuple[list[dict[str, Any]], float]:
    """One layer's candidate curve (``allocation="global"``) and the seconds it took."""
    t0 = time.perf_counter()
    cands = _build_candidates(L, *args)
    return cands, time.perf_counter() - t0


def _final_layer(L: _Layer, c: dict[str, Any], ridge: float,
                 fmt_options: Mapping[str, Mapping[str, Any]], objective: str) -> dict[str, Any]:
    """The matrix of the candidate chosen for one layer (refitted in full where it pays)."""
    t0 = time.perf_counter()
    if c["format"] == "dense":
        return {**c, "seconds": L.curve_seconds}
    if c["format"] == "lowrank" and c.get("rank"):
        opts = {**fmt_options.get("lowrank", {}), "rank": c["rank"]}
        A = _project_strict(L, "lowrank", c["flops"], ridge, opts)
    elif L.gram is not None:
        # the curve used cheap refits: redo the chosen one in full
        A = _project_strict(L, c["format"], c["budget"], ridge, fmt_options.get(c["format"], {}))
        if L.error(A, objective) > c["err"]:
            A = c["matrix"]
    else:
        A = c["matrix"]
    return {**c, "matrix": A, "err": L.error(A, objective),
            "seconds": L.curve_seconds + time.perf_counter() - t0}


def _project(layer, fmt, budget, ridge, opts):
    """The projection, or None when the format does not fit this layer or budget."""
    try:
        return _project_strict(layer, fmt, budget, ridge, opts)
    except ValueError:  # InfeasibleBudgetError, or options that do not fit the shape
        return None


def _allocate(layers: list[_Layer], budget: int) -> list[dict[str, Any]]:
    """Greedy multiple-choice knapsack on the lower convex hulls; see the module docstring."""
    hulls = []
    for L in layers:
        if not L.cands:
            raise ValueError(f"no format fits layer {L.name!r} ({L.m} x {L.n}) at any of the "
                             "budget fractions tried")
        pts = sorted(L.cands, key=lambda c: (c["flops"], c["err"]))
        # Pareto front, then lower convex hull
        front: list[dict[str, Any]] = []
        for c in pts:
            if not front or c["err"] < front[-1]["err"] - 1e-15:
                if front and c["flops"] == front[-1]["flops"]:
                    front[-1] = c
                else:
                    front.append(c)
        hull: list[dict[str, Any]] = []
        for c in front:
            while len(hull) >= 2:
                a, b = hull[-2], hull[-1]
                # b is above the segment a-c: drop it
                lhs = (b["err"] - a["err"]) * (c["flops"] - a["flops"])
                rhs = (c["err"] - a["err"]) * (b["flops"] - a["flops"])
                if lhs >= rhs:
                    hull.pop()
                else:
                    break
            hull.append(c)
        hulls.append((hull, front))
    pos = [0] * len(layers)
    used = sum(h[0]["flops"] for h, _ in hulls)
    if used > budget:
        raise InfeasibleBudgetError(
            "compress_model", budget, used,
            "the cheapest candidate of every layer already costs more; lower the smallest "
            "fraction or raise the budget")
    heap: list[tuple[float, int]] = []

    def push(i: int) -> None:
        h = hulls[i][0]
        t = pos[i]
        if t + 1 < len(h):
            dc = h[t + 1]["flops"] - h[t]["flops"]
            de = h[t]["err"] - h[t + 1]["err"]
            heapq.heappush(heap, (-de / dc, i))

    for i in range(len(layers)):
        push(i)
    while heap:
        _, i = heapq.heappop(heap)
        h = hulls[i][0]
        t = pos[i]
        dc = h[t + 1]["flops"] - h[t]["flops"]
        if used + dc <= budget:
            used += dc
            pos[i] = t + 1
            push(i)
    chosen = [hulls[i][0][pos[i]] for i in range(len(layers))]
    # spend the rest: best error decrease per MAC among all Pareto candidates that fit
    improved = True
    while improved:
        improved = False
        best = None
        for i, (_, front) in enumerate(hulls):
            cur = chosen[i]
            for c in front:
                dc = c["flops"] - cur["flops"]
                de = cur["err"] - c["err"]
                if de > 0 and used + dc <= budget:
                    score = de / max(dc, 1)
                    if best is None or score > best[0]:
                        best = (score, i, c, dc)
        if best is not None:
            _, i, c, dc = best
            chosen[i] = c
            used += dc
            improved = True
    return chosen


def compress_model(
    model: nn.Module,
    formats: str | Sequence[str],
    budget: float | int,
    *,
    include: str | list[str] = "*",
    exclude: str | list[str] | None = None,
    calibration: Callable[[], Any] | Mapping[str, torch.Tensor] | None = None,
    allocation: str = "uniform",
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    objective: str = "relative",
    ridge: float = 1e-6,
    format_options: Mapping[str, Mapping[str, Any]] | None = None,
    sensitivity: Mapping[str, float] | None = None,
    keep_dense: bool = True,
    progress: bool | None = None,
    scheduler: Any = None,
    workers: int = 1,
    **options: Any,
):
    """Replace the selected ``nn.Linear`` layers of ``model`` (in place) by structured ones.

    Parameters
    ----------
    model : torch.nn.Module
    formats : str or sequence of str
        A format name, a list of them, or ``"auto"`` (:data:`AUTO_FORMATS`: lowrank,
        blocksparse, blocklowrank, monarch -- the fast projections; name ``"gblr"`` or
        ``"blast"`` explicitly to include them, at 5-20 s per layer and candidate).
    budget : float or int
        Float in (0, 1]: fraction of the selected layers' *total* dense MACs; int: MACs (total
        over the selected layers, per input row).
    include, exclude : glob pattern(s) on module names (``model.named_modules()``).
        A module shared under several names (tied or reused) is one layer: its MACs count
        once, and every name gets the same :class:`StructuredLinear` (the weights stay
        tied); it is selected when any name matches ``include`` and none matches
        ``exclude``. Linears whose owner reads ``.weight`` directly are skipped (the
        ``out_proj`` of ``nn.MultiheadAttention``, ``linear1``/``linear2`` of
        ``nn.TransformerEncoderLayer``, whose eval fast path reads them): they stay dense
        and are listed in ``report.attrs["skipped"]`` with the reason.
    calibration : callable or mapping, optional
        ``run()`` executing the model on calibration data (e.g. ``lambda: st.encode(texts)``;
        the Grams are collected with :func:`~gblr_approx.nn.collect_grams` before any layer
        is replaced), or a precomputed mapping name -> Gram. With it every projection is
        data-aware (``project(..., gram=G)``) and the report has ``output_error``.
    allocation : {"uniform", "global"}
        See the module docstring. ``"uniform"`` with one format and no calibration is the
        plain per-layer projection at the same fraction (for GBLR, with the options of
        :func:`gblr_layer_options`).
    fractions : sequence of float
        Budget fractions per layer tried by ``"global"`` (low-rank tries every rank).
    objective : {"relative", "absolute"}
        ``"global"`` minimises the sum of squared relative output errors (each layer's error
        divided by its dense output energy ``||W X||_F^2``) or of absolute ones (multiplied by
        ``sensitivity``). Passing ``sensitivity`` implies ``"absolute"``.
    sensitivity : mapping, optional
        Module name -> ``c_l`` from :func:`~gblr_approx.nn.layer_sensitivity`: the allocation
        minimises ``sum_l c_l ||(W_l - A_l) X_l||_F^2``, the first-order damage to the model
        output (much better than either unweighted objective on MiniLM: docs/benchmarks.md).
    ridge : float
        Relative ridge of the Grams (:mod:`gblr_approx.data_aware`).
    format_options : mapping, optional
        Format name -> options for that format (e.g. ``{"gblr": {"steps": 5}}``). GBLR
        layers of at least 256 x 256 are fitted with the runnable layout
        (``layout="tiled"``, ``tile`` 128 from 384 x 384 up, else 64: :data:`RUNNABLE_TILES`,
        :func:`gblr_layer_options`) unless ``layout`` is given:
        ``{"gblr": {"layout": "free"}}`` keeps the free layout, more accurate per MAC and
        slower than the dense layer (docs/compress_model.md, "GBLR layers that run fast").
        Block-sparse and BLAST layers of at least 256 x 256 get 64 x 64 blocks and an 8 x 8
        grid (:data:`RUNNABLE_OPTIONS`) unless ``block_shape`` / ``blocks`` is given.
    keep_dense : bool
        ``"global"`` may leave a layer dense (its original ``nn.Linear``, format ``"dense"``
        in the report, cost ``m n``) when that is the best use of its MACs.
    progress : bool, optional
        tqdm bar over layers (default: when stderr is a terminal).
    scheduler : None, "local", str or dask.distributed.Client, optional
        Where the per-layer fits run (:mod:`gblr_approx.compress_dask`): ``None`` (default)
        in this process, one layer after the other; ``"local"``, a Dask ``LocalCluster`` of
        ``workers`` processes (the number of cores when ``workers == 1``); an address such as
        ``"tcp://host:8786"``; or a connected Client. Each layer is one task carrying only its
        weight and Gram; results equal the serial ones (one torch thread per task, the same
        seeds). Needs ``pip install 'gblr_approx[dask]'``.
    workers : int
        LocalCluster size for ``scheduler="local"``.
    **options
        Passed to every projection (e.g. ``block_shape=(32, 32)`` for a single format).

    Returns
    -------
    pandas.DataFrame
        Indexed by module name (``index.name == "layer"``), one row per replaced layer:
        ``matrix`` (the name again, for :func:`gblr_approx.plot.budget_allocation`),
        ``format``, ``flops`` (MACs per row), ``dense_flops``, ``budget_fraction``,
        ``rel_error`` (relative Frobenius weight error), ``output_error`` (relative output
        error on the calibration inputs; NaN without calibration), ``seconds``.
        ``report.attrs`` holds ``budget`` (MACs), ``total_flops``, ``dense_flops``,
        ``allocation``, ``formats``, ``seconds``, ``skipped`` (module name -> why it was
        left dense although it matched) and ``aliases`` (name in the report -> every name
        of that shared module, itself first; only shared modules). (Before 0.2 the report was a dict
        name -> row dict; ``report.loc[name, "flops"]`` replaces ``report[name]["flops"]``.)
    """
    import pandas as pd

    t_start = time.perf_counter()
    fmts = _formats(formats)
    if allocation not in ("uniform", "global"):
        raise ValueError(f"allocation must be 'uniform' or 'global'; got {allocation!r}")
    if objective not in ("relative", "absolute"):
        raise ValueError(f"objective must be 'relative' or 'absolute'; got {objective!r}")
    fractions = [float(f) for f in fractions]
    if not fractions or any(not (0 < f <= 1) for f in fractions):
        raise ValueError(f"fractions must be numbers in (0, 1]; got {fractions!r}")
    fmt_options = {get_format(k).format_name: dict(v) for k, v in (format_options or {}).items()}
    if options:
        # each format gets the options its projection takes (block_shape -> blocksparse, ...)
        used: set[str] = set()
        for f in fmts:
            takes = projection_options(get_format(f))  # None: any (forwarded to a fitter)
            mine = {k: v for k, v in options.items() if takes is None or k in takes}
            used |= set(mine)
            fmt_options[f] = {**mine, **fmt_options.get(f, {})}
        unknown = sorted(set(options) - used)
        if unknown:
            raise TypeError(f"options {unknown} are not accepted by any of the formats {fmts}")
    selection = find_linears(model, include, exclude)
    targets = selection.layers
    if not targets:
        select_linears(model, include, exclude)  # raises the ValueError that names why
    dense_total = sum(mod.in_features * mod.out_features for _, mod in targets)
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise TypeError(f"budget must be a float in (0, 1] or an int (MACs); got {budget!r}")
    if isinstance(budget, float):
        if not (0 < budget <= 1):
            raise ValueError(f"budget as a float is a fraction in (0, 1]; got {budget}")
        total_budget = int(math.floor(budget * dense_total + 1e-9))
    else:
        if budget < 1:
            raise ValueError(f"budget must be an int >= 1 (MACs); got {budget}")
        total_budget = int(budget)

    grams: Mapping[str, torch.Tensor] | None
    if calibration is None:
        grams = None
    elif callable(calibration):
        grams = collect_grams(model, calibration, [n for n, _ in targets])
    elif isinstance(calibration, Mapping):
        grams = calibration
        missing = [n for n, _ in targets if n not in grams]
        if missing:
            raise ValueError(f"calibration has no Gram for the layers {missing[:5]}")
    else:
        raise TypeError("calibration must be a callable run() or a mapping name -> Gram; got "
                        f"{type(calibration).__name__}")
    layers = [_Layer(n, mod, None if grams is None else grams[n].to(torch.float64))
              for n, mod in targets]
    if sensitivity is not None:
        objective = "absolute"
        missing = [L.name for L in layers if L.name not in sensitivity]
        if missing:
            raise ValueError(f"sensitivity has no entry for the layers {missing[:5]}")
        for L in layers:
            w = float(sensitivity[L.name])
            if not (math.isfinite(w) and w > 0):
                raise ValueError(f"sensitivity[{L.name!r}] must be a finite number > 0; got {w}")
            L.weight = w

    workers = check_positive_int(workers, "workers")
    if scheduler is not None:
        check_scheduler(scheduler)  # a clear error before any work (imports Dask)
    bar = _progress(progress, len(layers), f"compress ({allocation})")
    if allocation == "uniform":
        frac = budget if isinstance(budget, float) else total_budget / dense_total
        jobs = [(_uniform_layer, L, fmts, max(int(math.floor(frac * L.dense + 1e-9)), 1),
                 ridge, fmt_options, objective) for L in layers]
        chosen = run_layer_jobs(jobs, scheduler, workers, bar)
    else:
        jobs = [(_curve_layer, L, fmts, fractions, ridge, objective, options, fmt_options,
                 keep_dense) for L in layers]
        for L, (cands, secs) in zip(layers, run_layer_jobs(jobs, scheduler, workers, bar),
                                    strict=True):
            L.cands, L.curve_seconds = cands, secs
        picks = _allocate(layers, total_budget)
        for L in layers:
            L.cands = []  # the curves' matrices are not needed (nor shipped to workers) now
        jobs = [(_final_layer, L, c, ridge, fmt_options, objective)
                for L, c in zip(layers, picks, strict=True)]
        chosen = run_layer_jobs(jobs, scheduler, workers, None)
    if bar is not None:
        bar.close()

    from .nn import StructuredLinear

    rows = []
    for L, c in zip(layers, chosen, strict=True):
        if c["format"] == "dense":  # kept as the original nn.Linear
            rows.append({"layer": L.name, "matrix": L.name, "format": "dense",
                         "flops": L.dense, "dense_flops": L.dense, "budget_fraction": 1.0,
                         "rel_error": 0.0, "output_error": 0.0 if L.gram is not None
                         else float("nan"), "seconds": c.get("seconds", float("nan"))})
            continue
        A = c["matrix"]
        W32 = L.mod.weight.detach()
        new = StructuredLinear(A.to(dtype=W32.dtype, device=W32.device),
                               L.mod.bias.detach() if L.mod.bias is not None else None)
        new.info["rel_error"] = relative_error(L.W, A)
        for alias in selection.aliases.get(L.name, [L.name]):  # tied: one layer, every name
            replace_module(model, alias, new)
        rows.append({
            "layer": L.name, "matrix": L.name, "format": A.format_name, "flops": int(A.flops),
            "dense_flops": L.dense, "budget_fraction": A.flops / L.dense,
            "rel_error": new.info["rel_error"],
            "output_error": (output_error(L.W, A, L.gram) if L.gram is not None
                             else float("nan")),
            "seconds": c.get("seconds", float("nan")),
        })
    report = pd.DataFrame(rows).set_index("layer")
    report.attrs.update(budget=total_budget, total_flops=int(report["flops"].sum()),
                        dense_flops=dense_total, allocation=allocation, formats=fmts,
                        skipped=dict(selection.skipped),
                        aliases={n: list(a) for n, a in selection.aliases.items()},
                        seconds=time.perf_counter() - t_start)
    if report.attrs["total_flops"] > total_budget:  # pragma: no cover - an allocation bug
        raise RuntimeError(f"compression exceeded the budget: {report.attrs['total_flops']} > "
                           f"{total_budget}")
    return report


def gblr_layer_options(m: int, n: int, options: Mapping[str, Any]) -> dict[str, Any]:
    """The GBLR options ``compress_model`` uses for an ``m x n`` layer.

    ``options`` with the runnable layout filled in when ``layout`` is not given: ``tile`` from
    :data:`RUNNABLE_TILES` (128 on layers of >= 384 per side, 64 on >= 256), or a given
    ``tile`` when both sides hold at least :data:`RUNNABLE_MIN_TILES` of it. Smaller layers
    keep the free layout (a tile grid of fewer cells is close to low-rank). Runnable fits
    skip the free stage (:data:`GBLR_RUNNABLE_FIT`) unless an option of
    :data:`GBLR_FREE_STAGE_OPTIONS` is given.
    """
    opts = dict(options)
    if "layout" in opts:
        return opts
    fit = {} if set(GBLR_FREE_STAGE_OPTIONS) & set(opts) else GBLR_RUNNABLE_FIT
    if "tile" in opts:
        tile = opts["tile"]
        if isinstance(tile, int) and not isinstance(tile, bool) and tile >= 1 \
                and min(m, n) >= RUNNABLE_MIN_TILES * tile:
            return {**GBLR_RUNNABLE, **fit, **opts}
        return opts
    for side, tile in RUNNABLE_TILES:
        if min(m, n) >= side:
            return {**GBLR_RUNNABLE, "tile": tile, **fit, **opts}
    return opts


def layer_options(fmt: str, m: int, n: int, options: Mapping[str, Any]) -> dict[str, Any]:
    """The options ``compress_model`` projects an ``m x n`` layer into ``fmt`` with.

    GBLR: :func:`gblr_layer_options`. Block-sparse and BLAST: ``options`` with
    :data:`RUNNABLE_OPTIONS` filled in when its option is not given and both sides are at
    least ``RUNNABLE_MIN_TILES * 64``. Other formats: ``options`` unchanged.
    """
    if fmt == "gblr":
        return gblr_layer_options(m, n, options)
    opts = dict(options)
    runnable = RUNNABLE_OPTIONS.get(fmt, {})
    if runnable and min(m, n) >= RUNNABLE_MIN_TILES * 64 and not set(runnable) & set(opts):
        return {**runnable, **opts}
    return opts


def _project_strict(layer, fmt, budget, ridge, opts):
    opts = layer_options(fmt, layer.m, layer.n, opts)
    if layer.gram is None:
        return project(layer.W.to(layer.dtype), fmt, budget, **opts)
    return project(layer.W, fmt, budget, gram=layer.gram, ridge=ridge, **opts)
