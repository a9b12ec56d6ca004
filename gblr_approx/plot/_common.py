"""Helpers shared by the figure modules (private)."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from .style import root_figure, style_context

#: Axis labels (with units) used across figures.
BUDGET_LABEL = "budget (fraction of dense MACs)"
ERROR_LABELS = {
    "rel_error": r"relative error $\|W - A\|_F\,/\,\|W\|_F$",
    "rel_error_2": r"relative error $\|W - A\|_2\,/\,\|W\|_2$",
}

SWEEP_COLUMNS = ("matrix", "format", "budget_fraction")


def error_label(error: str) -> str:
    """Axis label for an error column of a sweep table."""
    return ERROR_LABELS.get(error, error.replace("_", " "))


@contextlib.contextmanager
def maybe_style(apply: bool) -> Iterator[None]:
    """The gblr style when we create the figure; the caller's style when they pass ``ax``."""
    if apply:
        with style_context():
            yield
    else:
        yield


def figure_of(ax: Any) -> Any:
    """The root Figure holding ``ax`` (an Axes or a sequence of Axes)."""
    if isinstance(ax, (list, tuple, np.ndarray)):
        ax = np.asarray(ax, dtype=object).ravel()[0]
    return root_figure(ax)


def is_axes(obj: Any) -> bool:
    from matplotlib.axes import Axes

    return isinstance(obj, Axes)


def to_numpy(x: Any, *, dtype: Any = np.float64) -> np.ndarray:
    """A torch tensor / array-like as a numpy array (detached, on the CPU)."""
    if hasattr(x, "detach"):
        import torch

        x = x.detach().cpu()
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        x = x.numpy()
    arr = np.asarray(x)
    return arr.astype(dtype, copy=False) if dtype is not None else arr


def short_names(names: Sequence[str]) -> list[str]:
    """Shorter layer names for tick labels and panel titles.

    Drops a ``.weight`` suffix and the dotted prefix that every name shares
    (``encoder.layer.0.attention.self.query.weight`` -> ``attention.self.query`` when all
    names start with ``encoder.layer.0.``). Names stay unique.
    """
    names = [str(n) for n in names]
    stripped = [n[: -len(".weight")] if n.endswith(".weight") else n for n in names]
    if len(stripped) > 1:
        parts = [s.split(".") for s in stripped]
        k = 0
        while all(len(p) > k + 1 for p in parts) and len({p[k] for p in parts}) == 1:
            k += 1
        stripped = [".".join(p[k:]) for p in parts]
    if len(set(stripped)) != len(set(names)):
        return names
    return stripped


def check_sweep(df: Any, needed: Iterable[str], *, what: str = "df", ok_only: bool = True
                ) -> Any:
    """Validate a sweep table and return its rows with status "ok" (if a status is given).

    With ``ok_only`` (default) an empty table or one without a successful fit is refused and
    formats without a successful fit are warned about (see :func:`ok_rows`); with
    ``ok_only=False`` every validated row is returned.
    """
    import pandas as pd

    if not isinstance(df, pd.DataFrame):
        raise TypeError(
            f"{what} must be a pandas DataFrame of sweep results (ga.sweep / ga.load_sweep); "
            f"got {type(df).__name__}"
        )
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise ValueError(
            f"{what} lacks column(s) {missing}; a sweep table has columns matrix, rows, cols, "
            f"format, budget, flops, budget_fraction, rel_error, rel_error_2, seconds, status; "
            f"got {list(df.columns)}"
        )
    if ok_only:
        df, _ = ok_rows(df)
    return df


def ok_rows(df: Any, *, what: str = "the sweep table") -> tuple[Any, list[str]]:
    """The successful rows of a sweep table and the formats that have none.

    Refuses an empty table or one in which no fit succeeded (ValueError saying how many fits
    there were and why they failed), and warns (UserWarning) naming every format none of
    whose fits succeeded, so that it does not silently vanish from a figure. Returns
    ``(ok_table, failed_formats)``.
    """
    if len(df) == 0:
        raise ValueError(f"nothing to plot: {what} is empty (0 rows)")
    if "status" not in df.columns:
        return df, []
    status = df["status"].astype(str)
    ok = df[status == "ok"]
    if ok.empty:
        raise ValueError(f"nothing to plot: none of the {len(df)} fits in {what} succeeded "
                         f"({_status_counts(df)})")
    good = set(ok["format"].astype(str))
    dead = [f for f in ordered_unique(df["format"].astype(str)) if f not in good]
    if dead:
        import warnings

        detail = ", ".join(f"{f} ({_status_counts(df[df['format'].astype(str) == f])})"
                           for f in dead)
        warnings.warn(f"no successful fit for format(s) {detail}; shown in the legend as "
                      "'no successful fit'", UserWarning, stacklevel=3)
    return ok, dead


def _status_counts(df: Any) -> str:
    """``"3 failed, 1 infeasible; first: <message>"`` for the rows of a sweep table."""
    counts = df["status"].astype(str).value_counts()
    text = ", ".join(f"{int(c)} {k}" for k, c in counts.items())
    if "message" in df.columns:
        msgs = [str(m) for m in df["message"] if isinstance(m, str) and m.strip()]
        if msgs:
            first = " ".join(msgs[0].split())
            text += f"; first: {first[:100]}{'...' if len(first) > 100 else ''}"
    return text


def failed_format_handles(formats: Sequence[str]) -> list[Any]:
    """Legend entries (no line) ``"<Format>: no successful fit"`` for formats with no data."""
    from matplotlib.lines import Line2D

    from .style import format_color, format_label

    return [Line2D([], [], linestyle="none", marker="x", color=format_color(f),
                   label=f"{format_label(f)}: no successful fit") for f in formats]


def select(df: Any, column: str, values: Any) -> Any:
    """Rows of ``df`` whose ``column`` is in ``values`` (a str or a sequence); checks they exist."""
    if values is None:
        return df
    if isinstance(values, (str, os.PathLike)):
        values = [values]
    values = [str(v) for v in values]
    present = set(df[column].astype(str))
    unknown = [v for v in values if v not in present]
    if unknown:
        raise ValueError(
            f"{column} {unknown} not in the table; available: {sorted(present)}"
        )
    return df[df[column].astype(str).isin(values)]


def ordered_unique(values: Iterable[Any]) -> list[Any]:
    """Unique values in first-seen order."""
    seen: dict[Any, None] = {}
    for v in values:
        seen.setdefault(v, None)
    return list(seen)


def plain_log_labels(axis: Any) -> None:
    """Label a log axis with plain numbers (0.3, 0.5, 1) instead of 3 x 10^-1.

    Major ticks (powers of ten) are always labelled; minor ticks are labelled when the axis
    spans at most 1.2 decades (at 2, 3 and 5 times a power of ten; all of them below 0.6
    decades), else they would crowd.
    Values outside [0.001, 10^4) are written as powers of ten.
    """
    import math

    from matplotlib.ticker import Formatter

    def plain(x: float) -> str:
        if 1e-3 <= x < 1e4:
            return f"{x:g}"
        k = math.log10(x)
        return f"$10^{{{round(k)}}}$" if abs(k - round(k)) < 1e-9 else f"{x:.0e}"

    class _Plain(Formatter):
        def __init__(self, minor: bool) -> None:
            self.minor = minor

        def __call__(self, x: float, pos: int | None = None) -> str:
            if not x > 0:
                return ""
            if self.minor:
                lo, hi = self.axis.get_view_interval()
                span = math.log10(hi / lo) if lo > 0 and hi > lo else math.inf
                if span > 1.2:
                    return ""
                subs = (2, 3, 5) if span > 0.6 else (2, 3, 4, 5, 6, 7, 8, 9)
                mant = x / 10 ** math.floor(math.log10(x) + 1e-9)
                if min(abs(mant - s) for s in subs) > 1e-6:
                    return ""
            return plain(x)

    axis.set_major_formatter(_Plain(minor=False))
    axis.set_minor_formatter(_Plain(minor=True))


def legend_columns(labels: Sequence[str], width_in: float, *, fontsize_pt: float = 7.0,
                   limit: int = 7) -> int:
    """How many legend columns of ``labels`` (with line+marker handles) fit in ``width_in``.

    A rough estimate (average glyph width 0.55 em, handle and spacing 2.6 em) that errs on
    the side of fewer columns, so a legend above a single-column figure is not clipped.
    """
    if not labels:
        return 1
    em = fontsize_pt / 72.0
    longest = max(len(str(s)) for s in labels)
    entry = (0.58 * longest + 2.8) * em
    return max(1, min(len(labels), limit, int(width_in // entry)))


#: Tallest figure the small-multiple figures make (inches): the text height of a page.
MAX_HEIGHT = 9.0
#: Smallest panel of a small-multiple figure (inches) before a second page is needed.
MIN_PANEL_WIDTH = 1.1
MIN_PANEL_HEIGHT = 0.85


def grid_geometry(k: int, width_in: float, *, ncols: int | None = None,
                  panel_height: float = 1.35, extra: float = 0.55,
                  max_height: float = MAX_HEIGHT,
                  min_panel_height: float = MIN_PANEL_HEIGHT) -> tuple[int, int, float]:
    """Columns, rows and height of a grid of ``k`` panels that stays within a page.

    Starts from 4 columns at page width (2 in a single column) and adds columns, down to
    :data:`MIN_PANEL_WIDTH`, until ``rows * panel_height + extra <= max_height``; then shrinks
    the rows, down to :data:`MIN_PANEL_HEIGHT`. Only more than :func:`page_capacity` panels
    make a taller figure (split them into pages instead). ``ncols`` fixes the columns.

    Returns
    -------
    (ncols, nrows, height_in)
    """
    widest = max(1, int(width_in // MIN_PANEL_WIDTH))
    if ncols is None:
        ncols = min(4 if width_in >= 5 else 2, widest)
        while ncols < widest and math.ceil(k / ncols) * panel_height + extra > max_height:
            ncols += 1
    ncols = max(1, min(ncols, k))
    nrows = math.ceil(k / ncols)
    ph = max(min_panel_height, min(panel_height, (max_height - extra) / nrows))
    return ncols, nrows, nrows * ph + extra


def page_capacity(width_in: float, *, extra: float = 0.55, max_height: float = MAX_HEIGHT,
                  rows_per_panel: int = 1) -> int:
    """Most panels :func:`grid_geometry` fits on one page of ``max_height`` inches."""
    widest = max(1, int(width_in // MIN_PANEL_WIDTH))
    rows = max(1, int((max_height - extra) // (MIN_PANEL_HEIGHT * rows_per_panel)))
    return widest * rows


def fit_title(text: str, width_in: float, fontsize_pt: float) -> str:
    """``text`` broken at a dot (or space) into two lines when it is wider than ``width_in``.

    The width is estimated (0.58 em per character), so that panel titles of small multiples
    do not run into their neighbours.
    """
    if len(text) * 0.58 * fontsize_pt / 72.0 <= width_in:
        return text
    cuts = [i for i, c in enumerate(text) if c in ". _"]
    if not cuts:
        return text
    mid = len(text) / 2
    i = min(cuts, key=lambda j: abs(j + 0.5 - mid))
    keep = text[i] if text[i] == "." else ""
    return text[: i + 1 if keep else i] + "\n" + text[i + 1:]
