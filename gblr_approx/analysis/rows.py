"""The sweep table: its columns, ``rows.csv`` on disk, and the pandas DataFrame.

``rows.csv`` is written with the standard :mod:`csv` module, one complete line per finished
fit (flushed and ``fsync``-ed), so a killed sweep leaves at most one partial last line, which
readers ignore. A row appended later for the same key (matrix, format, budget, options, seed)
supersedes an earlier one — that is how retried fits replace their ``failed`` rows.

Columns
-------
``matrix, rows, cols, format, budget, flops, budget_fraction, rel_error, rel_error_2, seconds,
status, message`` (the public contract) followed by ``shape, dtype, options, budget_macs,
params, seed, version, data_hash, product_batch, product_seconds, dense_product_seconds,
finished_at`` (last, so a complete line ends with its timestamp):

- ``budget``: as requested (float fraction of ``rows*cols`` or int MACs);
  ``budget_macs``: the same in MACs.
- ``flops``: achieved MACs of one mat-vec; ``budget_fraction = flops / (rows*cols)``;
  ``params``: stored numbers (``A.num_params``). Missing (``<NA>``) unless ``status == "ok"``.
- ``rel_error``: ``||W - A||_F / ||W||_F``; ``rel_error_2``: ``||W - A||_2 / ||W||_2``, both
  exact, in float64 (as :func:`gblr_approx.relative_error`). NaN unless ``status == "ok"``.
- ``seconds``: wall time of the ``project`` call.
- ``status``: ``"ok"``; ``"infeasible"`` (the format has no matrix within the budget,
  :class:`~gblr_approx.budget.InfeasibleBudgetError`; the message names the smallest feasible
  budget); ``"failed"`` (any other exception; the message is ``"ExceptionType: text"``, or
  says that the process running the fit died).
  ``message`` also holds warnings raised by an ``ok`` fit, else ``""``.
- ``dtype``: of the matrix as given or stored (float16/bfloat16 are fitted in float32).
- ``options``: the format options as JSON; ``seed``: ``torch.manual_seed`` set before the fit
  (and passed as ``seed=`` to formats whose ``project`` takes one); ``version``:
  ``gblr_approx.__version__``; ``finished_at``: UTC time the fit finished.
- ``data_hash``: BLAKE2b digest of the matrix's stored values (how a resumed sweep knows the
  rows belong to the same data).
- ``product_batch``, ``product_seconds``, ``dense_product_seconds``: only with
  ``time_products``: median seconds of one ``A @ X`` and of the dense ``W @ X`` for ``X`` of
  ``product_batch`` columns, measured alternately in the process that fitted ``A``
  (``<NA>``/NaN otherwise).
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .plan import budget_text, parse_budget_text

if TYPE_CHECKING:  # pandas is imported when a table is built (keeps `import gblr_approx` light)
    import pandas as pd

__all__ = [
    "COLUMNS",
    "CONTRACT_COLUMNS",
    "ROWS_FILE",
    "RowWriter",
    "frame",
    "load_sweep",
    "read_rows",
    "row_key",
]

#: Columns every sweep table starts with (the public contract).
CONTRACT_COLUMNS = (
    "matrix", "rows", "cols", "format", "budget", "flops", "budget_fraction", "rel_error",
    "rel_error_2", "seconds", "status", "message",
)
#: All columns, in order.
COLUMNS = CONTRACT_COLUMNS + (
    "shape", "dtype", "options", "budget_macs", "params", "seed", "version", "data_hash",
    "product_batch", "product_seconds", "dense_product_seconds", "finished_at",
)
ROWS_FILE = "rows.csv"

_INT_COLS = ("rows", "cols", "budget_macs", "seed")
_NULLABLE_INT_COLS = ("flops", "params", "product_batch")
_FLOAT_COLS = ("budget_fraction", "rel_error", "rel_error_2", "seconds", "product_seconds",
               "dense_product_seconds")
_STR_COLS = (
    "matrix", "format", "status", "message", "shape", "dtype", "options", "version",
    "finished_at", "data_hash",
)


def _isna(v: Any) -> bool:
    if v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and v == ""):
        return True
    return type(v).__name__ == "NAType"  # pandas.NA


def row_key(row: Mapping[str, Any]) -> tuple:
    """(matrix, format, budget text, options JSON, seed): what identifies a fit in a folder."""
    return (str(row["matrix"]), str(row["format"]), budget_text(row["budget"]),
            str(row["options"]), int(row["seed"]))


def frame(records: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """The sweep DataFrame of ``records`` with the fixed column order and dtypes: ints
    ``int64``, nullable ints ``Int64``, floats ``float64``, text ``str``; ``budget`` keeps the
    requested types (``object`` when fractions and MACs are mixed)."""
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


# ------------------------------------------------------------------------------ on disk
def _cell(column: str, v: Any) -> str:
    if column == "budget":
        return budget_text(v)
    if _isna(v):
        return ""
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, str):  # one physical line per row, so a cut line is always the last
        return " | ".join(s.strip() for s in v.splitlines() if s.strip())
    return str(v)


def _parse(raw: Mapping[str, str]) -> dict[str, Any]:
    row: dict[str, Any] = {c: raw[c] for c in COLUMNS}
    row["budget"] = parse_budget_text(row["budget"])
    for c in _INT_COLS:
        row[c] = int(row[c])
    for c in _NULLABLE_INT_COLS:
        row[c] = None if row[c] == "" else int(row[c])
    for c in _FLOAT_COLS:
        row[c] = math.nan if row[c] == "" else float(row[c])
    return row


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The complete rows of a ``rows.csv``, latest per key, in the order keys first appeared.

    A partial last line (a write cut by a kill) and malformed lines are skipped; a header other
    than :data:`COLUMNS` (a folder written by another version) is a ValueError.
    """
    if not path.is_file():
        return []
    with open(path, encoding="utf-8", newline="") as f:
        text = f.read()
    if not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    reader = csv.DictReader(text.splitlines(), restkey="_extra")
    if reader.fieldnames is None:
        return []
    if tuple(reader.fieldnames) != COLUMNS:
        raise ValueError(
            f"{path} has columns {reader.fieldnames}, expected {list(COLUMNS)}; it was written "
            "by another version of gblr_approx. Use a new output folder"
        )
    latest: dict[tuple, dict[str, Any]] = {}
    for raw in reader:
        if "_extra" in raw or any(raw[c] is None for c in COLUMNS):
            continue
        try:
            row = _parse(raw)
        except ValueError:
            continue
        latest[row_key(row)] = row  # a later row replaces, keeping the first one's position
    return list(latest.values())


class RowWriter:
    """Appends rows to ``rows.csv``, one complete line per write, flushed and fsync-ed.

    Opening drops a partial last line left by a killed writer and writes the header to an
    empty file.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        if path.is_file():
            data = path.read_bytes()
            if data and not data.endswith(b"\n"):
                with open(path, "r+b") as f:
                    f.truncate(data.rfind(b"\n") + 1)
        fresh = not path.is_file() or path.stat().st_size == 0
        self._f = open(path, "a", encoding="utf-8", newline="")
        self._csv = csv.writer(self._f, lineterminator="\n")
        if fresh:
            self._csv.writerow(COLUMNS)
            self._sync()

    def _sync(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())

    def write(self, row: Mapping[str, Any]) -> None:
        """Append ``row`` (a dict with the :data:`COLUMNS`) as one line."""
        self._csv.writerow([_cell(c, row.get(c)) for c in COLUMNS])
        self._sync()

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
        One row per fit (the latest when a fit was retried), in the order the fits first
        finished, with the columns and dtypes of :func:`~gblr_approx.sweep` (a line cut short
        by a kill is skipped).
    """
    p = Path(path)
    if p.is_dir():
        p = p / ROWS_FILE
    if not p.is_file():
        raise FileNotFoundError(f"no sweep results at {p} (expected a folder holding {ROWS_FILE})")
    return frame(read_rows(p))

