"""Error-versus-budget sweeps: every (matrix, format, budget) fit as one tidy table row.

:func:`sweep` projects each matrix onto each format at each budget with
:func:`gblr_approx.project` and records one row per fit. Fits run in the calling process
(``workers=1``) or in a pool of local processes (``workers > 1``). With ``out=DIR`` every
finished row is appended to ``DIR/rows.csv`` at once (one line per row, flushed and
``fsync``-ed), so a killed sweep loses at most the fits that were running, and a rerun with the
same arguments skips the rows already there. :func:`load_sweep` reads such a folder back.

Columns
-------
``matrix, rows, cols, format, budget, flops, budget_fraction, rel_error, rel_error_2, seconds,
status, message`` (the public contract) followed by ``shape, dtype, options, budget_macs,
params, seed, version, finished_at``:

- ``budget``: as requested (float fraction of ``rows*cols`` or int MACs);
  ``budget_macs``: the same in MACs.
- ``flops``: achieved MACs of one mat-vec; ``budget_fraction = flops / (rows*cols)``;
  ``params``: stored numbers (``A.num_params``). Missing (``<NA>``) unless ``status == "ok"``.
- ``rel_error``: ``||W - A||_F / ||W||_F``; ``rel_error_2``: ``||W - A||_2 / ||W||_2``, both
  exact, in float64 (as :func:`gblr_approx.relative_error`). NaN unless ``status == "ok"``.
- ``seconds``: wall time of the ``project`` call.
- ``status``: ``"ok"``; ``"infeasible"`` (the format has no matrix within the budget,
  :class:`~gblr_approx.budget.InfeasibleBudgetError`; the message names the smallest feasible
  budget); ``"failed"`` (any other exception; the message is ``"ExceptionType: text"``).
  ``message`` also holds warnings raised by an ``ok`` fit, else ``""``.
- ``dtype``: of the matrix as given or stored (float16/bfloat16 are fitted in float32).
- ``options``: the format options as JSON; ``seed``: ``torch.manual_seed`` set before the fit
  (and passed as ``seed=`` to formats whose ``project`` takes one); ``version``:
  ``gblr_approx.__version__``; ``finished_at``: UTC time the fit finished.
"""

from __future__ import annotations

import csv
import hashlib
import inspect
import io
import json
import math
import multiprocessing
import numbers
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..budget import InfeasibleBudgetError, resolve_budget
from ..formats.base import FORMATS, StructuredMatrix, get_format
from ..validation import as_matrix, check_positive_int

if TYPE_CHECKING:  # pandas is imported when a table is built (keeps `import gblr_approx` light)
    import pandas as pd

__all__ = [
    "sweep",
    "load_sweep",
    "default_formats",
    "COLUMNS",
    "CONTRACT_COLUMNS",
    "DEFAULT_BUDGETS",
    "ROWS_FILE",
    "ARGS_FILE",
]

#: Columns every sweep table starts with (the public contract).
CONTRACT_COLUMNS = (
    "matrix", "rows", "cols", "format", "budget", "flops", "budget_fraction", "rel_error",
    "rel_error_2", "seconds", "status", "message",
)
#: All columns, in order.
COLUMNS = CONTRACT_COLUMNS + (
    "shape", "dtype", "options", "budget_macs", "params", "seed", "version", "finished_at",
)
#: Budgets used when none are given (fractions of the dense cost).
DEFAULT_BUDGETS = (0.1, 0.25, 0.5)
#: Formats tried by default, in this order, when registered.
_DEFAULT_FORMAT_ORDER = ("lowrank", "blocksparse", "blocklowrank", "monarch", "gblr")
ROWS_FILE = "rows.csv"
ARGS_FILE = "sweep.json"

_INT_COLS = ("rows", "cols", "budget_macs", "seed")
_NULLABLE_INT_COLS = ("flops", "params")
_FLOAT_COLS = ("budget_fraction", "rel_error", "rel_error_2", "seconds")
_STR_COLS = (
    "matrix", "format", "status", "message", "shape", "dtype", "options", "version",
    "finished_at",
)
_KEY_COLS = ("matrix", "format", "budget", "options", "seed")


def default_formats() -> list[str]:
    """Registered formats a default sweep uses: lowrank, blocksparse, blocklowrank, monarch,
    gblr (those that are registered and have a projection)."""
    return [f for f in _DEFAULT_FORMAT_ORDER if f in FORMATS and _has_projection(FORMATS[f])]


def _takes_seed(cls: type[StructuredMatrix]) -> bool:
    """Whether ``cls.project`` takes ``seed=``: a named parameter, or documented in its
    docstring when it forwards ``**options`` (e.g. GBLR to ``fit_gblr``)."""
    params = inspect.signature(cls.project).parameters
    if "seed" in params:
        return True
    forwards = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return forwards and "``seed``" in (cls.project.__doc__ or "")


def _has_projection(cls: type[StructuredMatrix]) -> bool:
    return cls.project.__func__ is not StructuredMatrix.project.__func__


# ------------------------------------------------------------------------- argument checks
def _check_budget(b: Any) -> float | int:
    if isinstance(b, np.integer):
        b = int(b)
    elif isinstance(b, np.floating):
        b = float(b)
    if isinstance(b, bool) or not isinstance(b, numbers.Real):
        raise TypeError(
            f"budgets must be floats in (0, 1] (fractions of the dense cost) or ints >= 1 "
            f"(MACs); got {b!r} of type {type(b).__name__}"
        )
    resolve_budget(b, 1, 1)  # range checks with the standard message
    return int(b) if isinstance(b, numbers.Integral) else float(b)


def _budget_text(b: float | int) -> str:
    return repr(b)


def _parse_budget_text(s: str) -> float | int:
    s = s.strip()
    if any(c in s.lower() for c in ".en"):  # "0.25", "1e-05", "nan", "inf"
        return float(s)
    return int(s)


def _jsonable(v: Any) -> Any:
    if isinstance(v, (str, bool)) or v is None:
        return v
    if isinstance(v, numbers.Integral):
        return int(v)
    if isinstance(v, numbers.Real):
        return float(v)
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return repr(v)


def _options_text(opts: Mapping[str, Any]) -> str:
    return json.dumps(_jsonable(dict(opts)), sort_keys=True)


# ------------------------------------------------------------------------ matrix sources
@dataclass
class _Source:
    """One matrix to sweep: held in memory or read from a checkpoint by the process fitting it."""

    name: str
    shape: tuple[int, int]
    dtype: str
    fingerprint: str
    tensor: torch.Tensor | None = None
    path: str | None = None
    reshape_conv: bool = False


def _tensor_fingerprint(t: torch.Tensor) -> str:
    t = t.detach().contiguous().cpu()
    raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
    h = hashlib.blake2b(raw.numpy().tobytes(), digest_size=12)
    h.update(f"{tuple(t.shape)}{t.dtype}".encode())
    return "sha:" + h.hexdigest()


def _sources(
    matrices: Any,
    include: Any,
    exclude: Any,
    reshape_conv: bool,
) -> tuple[list[_Source], dict[str, Any]]:
    """Normalise ``matrices`` to sources and a JSON description of their origin."""
    from ..io import WeightStore, load_weights

    if isinstance(matrices, (str, os.PathLike)):
        matrices = load_weights(matrices, include, exclude, reshape_conv=reshape_conv)
    elif (include is not None or exclude is not None) and not isinstance(matrices, WeightStore):
        from ..io import match_names

        if not isinstance(matrices, Mapping):
            raise TypeError("include/exclude filter names; pass a dict or a checkpoint path")
        keep = set(match_names(list(matrices), include, exclude))
        if not keep:
            raise ValueError(
                f"the filters include={include!r} exclude={exclude!r} match none of the "
                f"matrices {list(matrices)[:5]}"
            )
        matrices = {k: v for k, v in matrices.items() if k in keep}

    if isinstance(matrices, WeightStore):
        from ..io import match_names

        names = list(matrices)
        if include is not None or exclude is not None:
            names = match_names(names, include, exclude)
            if not names:
                raise ValueError(
                    f"the filters include={include!r} exclude={exclude!r} match none of the "
                    f"{len(matrices)} matrices in {matrices.path}"
                )
        srcs = []
        for name in names:
            info = matrices.info(name)
            if len(info.shape) != 2:
                raise ValueError(
                    f"tensor {name!r} in {matrices.path} has shape {info.shape}; only matrices "
                    "can be swept"
                )
            size = Path(info.file).stat().st_size
            fp = f"file:{Path(info.file).name}:{size}:{info.stored_shape}:{info.dtype}"
            srcs.append(
                _Source(name, (info.shape[0], info.shape[1]), info.dtype, fp,
                        path=info.file, reshape_conv=matrices.reshape_conv)
            )
        return srcs, {"checkpoint": str(Path(matrices.path).resolve()),
                      "include": include, "exclude": exclude, "reshape_conv": reshape_conv}

    if isinstance(matrices, Mapping):
        items = list(matrices.items())
        what = "dict"
    elif isinstance(matrices, (torch.Tensor, np.ndarray, StructuredMatrix)):
        items = [("W", matrices)]
        what = "matrix"
    else:
        raise TypeError(
            "matrices must be a dict name -> matrix, a single matrix (torch.Tensor or "
            f"numpy.ndarray) or a checkpoint path; got {type(matrices).__name__}"
        )
    if not items:
        raise ValueError("matrices is empty; give at least one matrix")
    srcs = []
    for name, W in items:
        if not isinstance(name, str) or not name:
            raise TypeError(f"matrix names must be non-empty strings; got {name!r}")
        if isinstance(W, StructuredMatrix):
            W = W.to_dense()
        stored = str(getattr(W, "dtype", "")).replace("torch.", "")  # before any upcast
        t = as_matrix(W, f"matrices[{name!r}]")
        srcs.append(_Source(name, (t.shape[0], t.shape[1]), stored or str(t.dtype),
                            _tensor_fingerprint(t), tensor=t.cpu()))
    return srcs, {"memory": what}


# ------------------------------------------------------------------------- one fit (worker)
_CACHE: dict[str, Any] = {"key": None}
_STORES: dict[tuple[str, bool], Any] = {}


def _init_worker(threads: int | None) -> None:
    if threads is not None:
        torch.set_num_threads(threads)
        torch.set_num_interop_threads(1)


def _matrix_of(src: _Source) -> tuple[torch.Tensor, float, float]:
    """The matrix (float32/64) with its Frobenius and spectral norms, cached per process."""
    key = (src.name, src.fingerprint)
    if _CACHE["key"] == key:
        return _CACHE["W"], _CACHE["fro"], _CACHE["two"]
    _CACHE["key"] = None
    if src.tensor is not None:
        W = src.tensor
    else:
        from ..io import load_weights

        skey = (src.path, src.reshape_conv)
        if skey not in _STORES:
            _STORES.clear()
            _STORES[skey] = load_weights(src.path, reshape_conv=src.reshape_conv,
                                         matrices_only=False)
        W = _STORES[skey][src.name]
    W = as_matrix(W, src.name)
    W64 = W.to(torch.float64)
    fro = float(torch.linalg.norm(W64))
    two = float(torch.linalg.matrix_norm(W64, ord=2))
    _CACHE.update(key=key, W=W, fro=fro, two=two)
    return W, fro, two


def _one_line(text: str) -> str:
    return " | ".join(line.strip() for line in str(text).strip().splitlines() if line.strip())


def _fit_row(task: dict[str, Any]) -> dict[str, Any]:
    """Run one fit and return its row. Never raises for a failing fit."""
    from .. import __version__
    from ..projection import project

    src: _Source = task["source"]
    m, n = src.shape
    row: dict[str, Any] = {
        "matrix": src.name, "rows": m, "cols": n, "format": task["format"],
        "budget": task["budget"], "flops": None, "budget_fraction": math.nan,
        "rel_error": math.nan, "rel_error_2": math.nan, "seconds": math.nan,
        "status": "failed", "message": "", "shape": f"{m}x{n}", "dtype": src.dtype,
        "options": task["options_text"], "budget_macs": task["budget_macs"], "params": None,
        "seed": task["seed"], "version": __version__,
    }
    t0 = time.perf_counter()
    try:
        W, fro, two = _matrix_of(src)
        opts = dict(task["options"])
        if task["pass_seed"] and "seed" not in opts:
            opts["seed"] = task["seed"]
        torch.manual_seed(task["seed"])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t0 = time.perf_counter()
            A = project(W, task["format"], task["budget"], **opts)
            row["seconds"] = time.perf_counter() - t0
        with torch.no_grad():
            D = W.to(torch.float64) - A.to_dense().to(device=W.device, dtype=torch.float64)
            e_fro = float(torch.linalg.norm(D))
            e_two = float(torch.linalg.matrix_norm(D, ord=2))
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
    except InfeasibleBudgetError as exc:
        row.update(status="infeasible", message=_one_line(str(exc)))
    except Exception as exc:  # one failing fit never aborts the sweep
        row.update(status="failed", message=_one_line(f"{type(exc).__name__}: {exc}"))
    if not math.isfinite(row["seconds"]):
        row["seconds"] = time.perf_counter() - t0
    row["finished_at"] = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return row


# ----------------------------------------------------------------------------- the table
def _frame(records: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Build the sweep DataFrame with fixed column order and dtypes."""
    import pandas as pd

    records = list(records)
    budgets = [r["budget"] for r in records]  # before pandas unifies int and float
    df = pd.DataFrame.from_records(records, columns=list(COLUMNS))
    for c in _INT_COLS:
        df[c] = df[c].astype("int64")
    for c in _NULLABLE_INT_COLS:
        df[c] = pd.array([None if _isna(v) else int(v) for v in df[c]], dtype="Int64")
    for c in _FLOAT_COLS:
        df[c] = df[c].astype("float64")
    for c in _STR_COLS:
        df[c] = df[c].fillna("").astype(str)
    if budgets and all(isinstance(b, int) for b in budgets):
        df["budget"] = df["budget"].astype("int64")
    elif budgets and all(isinstance(b, float) for b in budgets):
        df["budget"] = df["budget"].astype("float64")
    else:
        df["budget"] = pd.Series(budgets, dtype=object)
    return df


def _isna(v: Any) -> bool:
    if v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and v == ""):
        return True
    return type(v).__name__ == "NAType"  # pandas.NA


def _row_key(row: Mapping[str, Any]) -> tuple:
    return (str(row["matrix"]), str(row["format"]), _budget_text(row["budget"]),
            str(row["options"]), int(row["seed"]))


def _to_csv_line(row: Mapping[str, Any]) -> str:
    buf = io.StringIO()
    vals = []
    for c in COLUMNS:
        v = row.get(c)
        if c == "budget":
            v = _budget_text(v)
        elif _isna(v):
            v = ""
        elif isinstance(v, float):
            v = repr(v)
        elif isinstance(v, str):
            v = _one_line(v) if c == "message" else v.replace("\n", " ")
        vals.append(v)
    csv.writer(buf, lineterminator="\n").writerow(vals)
    return buf.getvalue()


def _parse_csv_row(vals: Sequence[str]) -> dict[str, Any]:
    row: dict[str, Any] = dict(zip(COLUMNS, vals, strict=True))
    row["budget"] = _parse_budget_text(row["budget"])
    for c in _INT_COLS:
        row[c] = int(row[c])
    for c in _NULLABLE_INT_COLS:
        row[c] = None if row[c] == "" else int(row[c])
    for c in _FLOAT_COLS:
        row[c] = math.nan if row[c] == "" else float(row[c])
    return row


def _read_rows(path: Path) -> list[dict[str, Any]]:
    """Complete rows of a rows.csv; a partial last line (killed mid-write) is ignored."""
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8")
    if not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    lines = text.splitlines()
    if not lines:
        return []
    header = next(csv.reader([lines[0]]))
    if tuple(header) != COLUMNS:
        raise ValueError(
            f"{path} has columns {header}, expected {list(COLUMNS)}; it was written by another "
            "version of gblr_approx. Use a new output folder"
        )
    rows = []
    for vals in csv.reader(lines[1:]):
        if len(vals) != len(COLUMNS):
            continue
        try:
            rows.append(_parse_csv_row(vals))
        except ValueError:
            continue
    return rows


class _RowWriter:
    """Appends rows to rows.csv, one complete line per write, flushed and fsync-ed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if path.is_file():
            data = path.read_bytes()
            if data and not data.endswith(b"\n"):  # drop a partial line from a killed run
                with open(path, "r+b") as f:
                    f.truncate(data.rfind(b"\n") + 1)
        fresh = not path.is_file() or path.stat().st_size == 0
        self._f = open(path, "a", encoding="utf-8", newline="")
        if fresh:
            buf = io.StringIO()
            csv.writer(buf, lineterminator="\n").writerow(COLUMNS)
            self._write(buf.getvalue())

    def _write(self, text: str) -> None:
        self._f.write(text)
        self._f.flush()
        os.fsync(self._f.fileno())

    def write(self, row: Mapping[str, Any]) -> None:
        self._write(_to_csv_line(row))

    def close(self) -> None:
        self._f.close()


def load_sweep(path: str | os.PathLike) -> pd.DataFrame:
    """Read the rows of a sweep written with ``sweep(..., out=DIR)``.

    Parameters
    ----------
    path : str or Path
        The output folder (or its ``rows.csv``).

    Returns
    -------
    pandas.DataFrame
        All complete rows, in the order they finished, with the columns and dtypes of
        :func:`sweep` (a line cut short by a kill is skipped).
    """
    p = Path(path)
    if p.is_dir():
        p = p / ROWS_FILE
    if not p.is_file():
        raise FileNotFoundError(f"no sweep results at {p} (expected a folder holding {ROWS_FILE})")
    return _frame(_read_rows(p))


# --------------------------------------------------------------------------------- driver
@dataclass
class _Plan:
    sources: list[_Source]
    formats: list[str]
    budgets: list[float | int]
    options: dict[str, dict[str, Any]]
    seed: int
    pass_seed: dict[str, bool] = field(default_factory=dict)

    def tasks(self) -> Iterator[dict[str, Any]]:
        for src in self.sources:
            for fmt in self.formats:
                opts = self.options.get(fmt, {})
                otext = _options_text(opts)
                for b in self.budgets:
                    yield {
                        "source": src, "format": fmt, "budget": b, "options": opts,
                        "options_text": otext, "seed": self.seed,
                        "budget_macs": resolve_budget(b, *src.shape),
                        "pass_seed": self.pass_seed[fmt],
                        "key": (src.name, fmt, _budget_text(b), otext, self.seed),
                    }


def _run_tasks(
    tasks: list[dict[str, Any]],
    workers: int,
    threads: int | None,
    on_row: Callable[[dict[str, Any]], None],
) -> None:
    if workers == 1:
        before = torch.get_num_threads()
        if threads is not None:
            torch.set_num_threads(threads)
        try:
            for t in tasks:
                on_row(_fit_row(t))
        finally:
            torch.set_num_threads(before)
            _CACHE.clear()  # do not keep the last matrix alive after the sweep
            _CACHE["key"] = None
            _STORES.clear()
        return
    todo = list(reversed(tasks))
    ctx = multiprocessing.get_context("spawn")
    while todo:
        ex = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                 initargs=(threads,))
        pending: dict[Future, dict[str, Any]] = {}
        broken = False
        try:
            while todo or pending:
                while todo and len(pending) < 2 * workers and not broken:
                    t = todo.pop()
                    pending[ex.submit(_fit_row, t)] = t
                if not pending:
                    break
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    t = pending.pop(fut)
                    try:
                        on_row(fut.result())
                    except BrokenProcessPool:
                        broken = True
                        row = _fit_row_failed(t, "the worker process died while this fit was "
                                                 "running (killed, or out of memory)")
                        on_row(row)
        except BaseException:  # Ctrl-C or a bug in on_row: stop the fits in flight now
            for proc in list(getattr(ex, "_processes", {}).values()):
                proc.terminate()
            ex.shutdown(wait=False, cancel_futures=True)
            raise
        ex.shutdown(wait=not broken, cancel_futures=broken)


def _fit_row_failed(task: dict[str, Any], message: str) -> dict[str, Any]:
    from .. import __version__

    src: _Source = task["source"]
    m, n = src.shape
    return {
        "matrix": src.name, "rows": m, "cols": n, "format": task["format"],
        "budget": task["budget"], "flops": None, "budget_fraction": math.nan,
        "rel_error": math.nan, "rel_error_2": math.nan, "seconds": math.nan,
        "status": "failed", "message": message, "shape": f"{m}x{n}", "dtype": src.dtype,
        "options": task["options_text"], "budget_macs": task["budget_macs"], "params": None,
        "seed": task["seed"], "version": __version__,
        "finished_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
    }


def _check_args_file(out: Path, args: dict[str, Any], sources: list[_Source]) -> None:
    """Refuse to mix results of different matrices under one name in the same folder."""
    path = out / ARGS_FILE
    old: dict[str, Any] = {}
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            old = {}
    fps = dict(old.get("fingerprints", {}))
    for s in sources:
        if s.name in fps and fps[s.name] != s.fingerprint:
            raise ValueError(
                f"{out} already holds results for a matrix named {s.name!r} computed from "
                f"different data ({fps[s.name]} there, {s.fingerprint} now); use a new output "
                "folder or delete it"
            )
        fps[s.name] = s.fingerprint
    record = {**args, "fingerprints": fps}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1, default=repr), encoding="utf-8")
    os.replace(tmp, path)


def sweep(
    matrices: Any,
    formats: str | Iterable[str] | None = None,
    budgets: float | int | Iterable[float | int] = DEFAULT_BUDGETS,
    *,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    out: str | os.PathLike | None = None,
    workers: int = 1,
    seed: int = 0,
    progress: bool | None = None,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    reshape_conv: bool = False,
    threads_per_worker: int | None = None,
) -> pd.DataFrame:
    """Approximate every matrix in every format at every budget; one table row per fit.

    Parameters
    ----------
    matrices : dict[str, array], array of shape (m, n), str or Path
        A dict name -> matrix (torch tensors or numpy arrays; named ``"W"`` when a single
        matrix is given), or a checkpoint path / :class:`~gblr_approx.io.WeightStore` read
        with :func:`gblr_approx.load_weights` (each tensor is read by the process that fits
        it, so the whole checkpoint is never in memory).
    formats : str or sequence of str, optional
        Registered format names (see ``gblr_approx.FORMATS``). Default:
        :func:`default_formats` (lowrank, blocksparse, blocklowrank, monarch, gblr — those
        registered).
    budgets : float, int or sequence, default (0.1, 0.25, 0.5)
        Each a float in (0, 1] (fraction of the dense cost ``m*n``) or an int >= 1 (MACs).
    options : dict format -> dict, optional
        Options passed to ``project`` for that format, e.g.
        ``{"blocksparse": {"block_shape": (16, 16)}}``.
    out : str or Path, optional
        Folder for incremental results: ``rows.csv`` (one line appended and fsync-ed per
        finished fit) and ``sweep.json`` (the arguments and a fingerprint of each matrix).
        Rerunning into the same folder keeps the rows already there and computes only the
        missing ones (key: matrix, format, budget, options, seed), so more formats or budgets
        can be added later. A matrix name reused for different data is refused. Run one sweep
        per folder at a time.
    workers : int, default 1
        ``1``: fits run one after another in this process (with its torch thread setting).
        ``> 1``: a :class:`concurrent.futures.ProcessPoolExecutor` with the ``"spawn"``
        start method (scripts calling this must use an ``if __name__ == "__main__":``
        guard); each worker uses ``threads_per_worker`` torch threads. A worker that dies
        (e.g. out of memory) turns the fits it was running into ``failed`` rows and the pool
        is restarted. Formats registered at run time (not on import) exist only with
        ``workers=1``.
    seed : int, default 0
        ``torch.manual_seed(seed)`` before every fit, and ``seed=`` for formats whose
        ``project`` takes it (a named parameter, or a documented ``seed`` option of a
        projection forwarding ``**options``, such as gblr's); an explicit ``seed`` in
        ``options`` wins.
    progress : bool, optional
        Overall tqdm progress bar on stderr; default: only when stderr is a terminal.
    include, exclude : str or sequence of str, optional
        Tensor-name filters (globs, or regexes prefixed ``re:``) for a checkpoint or dict.
    reshape_conv : bool, default False
        Read 4-D conv kernels of a checkpoint as ``out x (in*kh*kw)`` matrices.
    threads_per_worker : int, optional
        ``torch.set_num_threads`` for the fits: in each worker process when ``workers > 1``
        (default 1, so ``workers`` processes use ``workers`` cores), in this process for the
        duration of the sweep when ``workers == 1`` (default: torch's current setting).
        On a machine shared with other jobs, one thread per process avoids a severe
        slow-down of torch's multithreaded SVD under oversubscription.

    Returns
    -------
    pandas.DataFrame
        One row per (matrix, format, budget) in that nesting order, with the columns of
        :data:`COLUMNS` (described in the module docstring).

    Raises
    ------
    TypeError, ValueError
        Bad arguments (unknown format, budget out of range, options for a format not swept,
        empty input, filters matching nothing), before any fit runs.
    FileNotFoundError
        A checkpoint path that does not exist.
    """
    workers = check_positive_int(workers, "workers")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int; got {seed!r}")
    seed = int(seed)
    if threads_per_worker is not None:
        threads_per_worker = check_positive_int(threads_per_worker, "threads_per_worker")
    elif workers > 1:
        threads_per_worker = 1

    if formats is None:
        fmt_names = default_formats()
    else:
        fmt_names = [formats] if isinstance(formats, str) else list(formats)
    if not fmt_names:
        raise ValueError("formats is empty; give at least one format name")
    canon: list[str] = []
    for f in fmt_names:
        cls = get_format(f)  # ValueError listing the known formats
        if not _has_projection(cls):
            raise ValueError(f"format {f!r} has no projection and cannot be swept")
        if cls.format_name not in canon:
            canon.append(cls.format_name)

    if isinstance(budgets, (numbers.Real, np.number)) and not isinstance(budgets, bool):
        budgets = [budgets]
    blist = []
    for b in budgets:
        b = _check_budget(b)
        if not any(_budget_text(b) == _budget_text(x) for x in blist):
            blist.append(b)
    if not blist:
        raise ValueError("budgets is empty; give at least one budget")

    opts: dict[str, dict[str, Any]] = {}
    for k, v in (options or {}).items():
        name = get_format(k).format_name
        if name not in canon:
            raise ValueError(
                f"options given for format {k!r}, which is not among the formats swept {canon}"
            )
        if not isinstance(v, Mapping):
            raise TypeError(f"options[{k!r}] must be a dict of keyword options; got {v!r}")
        opts[name] = dict(v)

    sources, origin = _sources(matrices, include, exclude, reshape_conv)
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise ValueError("matrix names must be unique")

    plan = _Plan(sources, canon, blist, opts, seed,
                 pass_seed={f: _takes_seed(FORMATS[f]) for f in canon})
    tasks = list(plan.tasks())

    finished: dict[tuple, dict[str, Any]] = {}
    writer = None
    if out is not None:
        from .. import __version__

        outp = Path(out)
        outp.mkdir(parents=True, exist_ok=True)
        _check_args_file(outp, {
            "source": origin, "matrices": names, "formats": canon,
            "budgets": [_budget_text(b) for b in blist],
            "options": {k: _jsonable(v) for k, v in opts.items()}, "seed": seed,
            "version": __version__,
        }, sources)
        for r in _read_rows(outp / ROWS_FILE):
            finished.setdefault(_row_key(r), r)
        writer = _RowWriter(outp / ROWS_FILE)

    todo = [t for t in tasks if t["key"] not in finished]
    show = sys.stderr.isatty() if progress is None else bool(progress)
    from tqdm.auto import tqdm

    bar = tqdm(total=len(tasks), initial=len(tasks) - len(todo), desc="sweep", unit="fit",
               disable=not show, file=sys.stderr, dynamic_ncols=True)

    def on_row(row: dict[str, Any]) -> None:
        if writer is not None:
            writer.write(row)
        finished[_row_key(row)] = row
        name = row["matrix"] if len(row["matrix"]) <= 32 else "..." + row["matrix"][-29:]
        bar.set_postfix_str(f"{name} {row['format']}", refresh=False)
        bar.update(1)

    try:
        _run_tasks(todo, workers, threads_per_worker, on_row)
    finally:
        bar.close()
        if writer is not None:
            writer.close()
    return _frame([finished[t["key"]] for t in tasks])
