"""Relative error versus budget, one curve per format (the central figure of a sweep).

A sweep folder can hold fits of one format with different options or seeds (the resume key is
matrix, format, budget, options, seed). Such fits are never merged into one curve: a format
with more than one (options, seed) set gets one curve per set, in the format's colour with
its own line style, labelled e.g. ``"Block-sparse (block_shape=4,4)"`` (see
:func:`curve_sets`). A table with one set per format draws exactly as before.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._common import (
    BUDGET_LABEL,
    check_sweep,
    error_label,
    failed_format_handles,
    figure_of,
    legend_columns,
    maybe_style,
    ok_rows,
    ordered_unique,
    plain_log_labels,
    select,
)
from .style import format_color, format_key, format_label, format_marker, format_sort_key

__all__ = ["error_vs_budget", "format_handles", "curve_sets", "CurveSet"]

_AGGREGATES = ("median", "mean", "none")
#: Line styles of the second, third, ... (options, seed) set of one format (the first is solid).
_SET_LINESTYLES = ("-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 3)))


def error_vs_budget(
    df: Any,
    ax: Any = None,
    *,
    matrix: str | Sequence[str] | None = None,
    formats: str | Sequence[str] | None = None,
    aggregate: str = "median",
    error: str = "rel_error",
    logy: bool = False,
    logx: bool = False,
    band: bool = True,
    legend: str | bool = "best",
    width: str | float = "single",
    height: float | None = None,
    title: str | None = None,
) -> Any:
    """Relative error against achieved budget fraction, one curve per format.

    Parameters
    ----------
    df : pandas.DataFrame
        A sweep table (:func:`gblr_approx.sweep`, :func:`gblr_approx.load_sweep`), one row per
        fit, with at least columns ``matrix``, ``format``, ``budget_fraction`` and the
        ``error`` column; rows whose ``status`` is not ``"ok"`` are left out.
    ax : matplotlib.axes.Axes, optional
        Axes to draw into (your style is kept); a new figure in the gblr style otherwise.
    matrix : str or sequence of str, optional
        Matrices (values of the ``matrix`` column) to show; default all.
    formats : str or sequence of str, optional
        Formats to show; default all in the table, in the canonical order.
    aggregate : {"median", "mean", "none"}
        How to combine several matrices: ``"median"`` draws the median with the
        interquartile range as a band, ``"mean"`` the mean with +-1 standard deviation, and
        ``"none"`` one thin curve per matrix. Fits are grouped by the *requested* budget
        (``budget`` column; ``budget_fraction`` rounded to 3 digits when absent), the x
        position is the median achieved fraction of the group, and a group holds the
        matrices with a successful fit at that budget. With a single matrix every option
        draws its curve.
    error : {"rel_error", "rel_error_2"} or str
        Error column: Frobenius (default) or spectral relative error.
    logy, logx : bool
        Logarithmic y / x axis (non-positive values are then left out).
    band : bool
        Draw the spread band when aggregating.
    legend : {"best", "outside", "right"} or False
        Legend inside the axes, above the axes in columns, to the right of the axes, or none.
    width : {"single", "double"} or float
        Width of a new figure (3.3 in, 7 in, or inches); ignored when ``ax`` is given.
    height : float, optional
        Height of a new figure in inches.
    title : str, optional
        Axes title (papers usually put this in the caption instead).

    Returns
    -------
    matplotlib.figure.Figure
        The figure holding the axes (``fig.axes[0]`` when a new figure was made). Each format
        is one line labelled with its display name (e.g. ``"GBLR"``) in its fixed colour. When
        the table holds fits of one format with different ``options`` or ``seed`` (two sweeps
        into one folder), each such set is its own line, in another line style and labelled
        with what differs, e.g. ``"Block-sparse (block_shape=4,4)"``, ``"GBLR (seed 1)"``.

    Examples
    --------
    >>> df = ga.sweep(ga.datasets.minilm_sample(), ["lowrank", "gblr"], [0.1, 0.25, 0.5])
    >>> fig = ga.plot.error_vs_budget(df, logy=True)
    >>> ga.plot.save_figure(fig, "error_vs_budget.pdf")
    """
    if aggregate not in _AGGREGATES:
        raise ValueError(f"aggregate must be one of {_AGGREGATES}; got {aggregate!r}")
    if legend not in ("best", "outside", "right", False, None):
        raise ValueError(f"legend must be 'best', 'outside', 'right' or False; got {legend!r}")
    table = check_sweep(df, ["matrix", "format", "budget_fraction", error], ok_only=False)
    table = select(table, "matrix", matrix)
    table = _select_formats(table, formats)
    table, failed = ok_rows(table)
    table = table[np.isfinite(table[error].astype(float)) & np.isfinite(
        table["budget_fraction"].astype(float))]
    if logy:
        table = table[table[error].astype(float) > 0]
    if logx:
        table = table[table["budget_fraction"].astype(float) > 0]

    with maybe_style(ax is None):
        if ax is None:
            from .style import new_figure

            fig, ax = new_figure(width, height)
        else:
            fig = figure_of(ax)
        draw_error_curves(ax, table, aggregate=aggregate, error=error, band=band)
        ax.set_xlabel(BUDGET_LABEL)
        ax.set_ylabel(error_label(error))
        _set_scales(ax, logx=logx, logy=logy)
        if title:
            ax.set_title(title)
        if failed:  # a format none of whose fits succeeded is named, not silently dropped
            for h in failed_format_handles(failed):
                ax.add_line(h)
        if legend and ax.get_legend_handles_labels()[0]:
            _place_legend(ax, legend)
    return fig


@dataclass(frozen=True)
class CurveSet:
    """One curve family of an error-versus-budget figure: a format and an (options, seed) set.

    Attributes
    ----------
    format : str
        Value of the ``format`` column.
    key : str
        The set's key (normalised ``options`` JSON and ``seed``); rows carry it in
        :func:`set_keys`.
    suffix : str
        Label suffix, ``""`` when the format has one set, else e.g. ``" (block_shape=4,4)"``.
    linestyle : str or tuple or None
        Matplotlib line style; None (the style's default, solid) for a format's first set.
    """

    format: str
    key: str
    suffix: str = ""
    linestyle: Any = None

    @property
    def label(self) -> str:
        """Legend label: the format's display name plus the suffix."""
        return format_label(self.format) + self.suffix

    def style(self) -> dict[str, Any]:
        """Colour, marker, label (and line style for a second set) of the curve."""
        kw: dict[str, Any] = dict(color=format_color(self.format),
                                  marker=format_marker(self.format), label=self.label)
        if self.linestyle is not None:
            kw["linestyle"] = self.linestyle
        return kw


def _options_key(value: Any) -> str:
    """An ``options`` cell (dict or JSON text, as ``ga.sweep`` / ``load_sweep`` give) as
    canonical JSON; missing -> ``"{}"``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "{}"
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except ValueError:
            return value
    try:
        return json.dumps(value, sort_keys=True, default=str)
    except TypeError:  # pragma: no cover - an odd cell; keep its text
        return str(value)


def _seed_key(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    try:
        return str(int(value))
    except (TypeError, ValueError):
        return str(value)


def set_keys(table: Any) -> Any:
    """A ``pandas.Series`` of the (options, seed) key of every row of a sweep table.

    Tables without ``options`` / ``seed`` columns (hand-made ones) give one key for all rows.
    """
    import pandas as pd

    opts = (table["options"].map(_options_key) if "options" in table.columns
            else pd.Series("{}", index=table.index))
    seeds = (table["seed"].map(_seed_key) if "seed" in table.columns
             else pd.Series("", index=table.index))
    return opts.astype(str) + "|" + seeds.astype(str)


def _describe(options: str, seed: str, show_options: bool, show_seed: bool) -> str:
    parts = []
    if show_options:
        try:
            d = json.loads(options)
        except ValueError:
            d = None
        if isinstance(d, dict):
            parts.append(", ".join(
                f"{k}=" + (",".join(map(str, v)) if isinstance(v, list) else str(v))
                for k, v in d.items()) or "default options")
        else:
            parts.append(options)
    if show_seed:
        parts.append(f"seed {seed}" if seed else "no seed")
    return f" ({'; '.join(parts)})"


def curve_sets(table: Any) -> list[CurveSet]:
    """The curves of a sweep table: one per format, or one per (options, seed) set of a format.

    Formats come in the canonical order, a format's sets in first-seen order. A format with a
    single set gets an empty label suffix and the default line style (the ordinary figure);
    one with several gets a suffix naming what differs between them (the options, the seed
    or both) and a line style per set.

    Parameters
    ----------
    table : pandas.DataFrame
        Sweep rows (columns ``format`` and, when present, ``options`` and ``seed``).

    Returns
    -------
    list of CurveSet
    """
    if len(table) == 0:
        return []
    keys = set_keys(table)
    fmt_col = table["format"].astype(str)
    out: list[CurveSet] = []
    for fmt in sorted(ordered_unique(fmt_col), key=format_sort_key):
        ks = ordered_unique(keys[fmt_col == fmt])
        if len(ks) == 1:
            out.append(CurveSet(fmt, ks[0]))
            continue
        split = [k.rsplit("|", 1) for k in ks]
        show_options = len({o for o, _ in split}) > 1
        show_seed = len({s for _, s in split}) > 1
        for i, (k, (o, sd)) in enumerate(zip(ks, split, strict=True)):
            out.append(CurveSet(fmt, k, _describe(o, sd, show_options, show_seed),
                                _SET_LINESTYLES[i % len(_SET_LINESTYLES)] if i else None))
    return out


def draw_error_curves(ax: Any, table: Any, *, aggregate: str, error: str, band: bool,
                      linewidth: float | None = None, markersize: float | None = None,
                      sets: Sequence[CurveSet] | None = None) -> None:
    """Draw one curve (with optional band) per format of a filtered sweep table into ``ax``.

    A format with several (options, seed) sets draws one curve per set (see
    :func:`curve_sets`; pass ``sets`` computed on a larger table to keep the styles of
    several panels consistent).
    """
    if sets is None:
        sets = curve_sets(table)
    matrices = ordered_unique(table["matrix"].astype(str))
    keys = set_keys(table) if len(table) else None
    fmt_col = table["format"].astype(str)
    for cs in sets:
        rows = table[(fmt_col == cs.format) & (keys == cs.key)] if keys is not None else table
        if rows.empty:
            continue
        style = cs.style()
        if linewidth is not None:
            style["linewidth"] = linewidth
        if markersize is not None:
            style["markersize"] = markersize
        if len(matrices) <= 1 or aggregate == "none":
            first = True
            for name in matrices:
                r = rows[rows["matrix"].astype(str) == name].sort_values("budget_fraction")
                if r.empty:
                    continue
                kw = dict(style)
                if not first:
                    kw["label"] = "_nolegend_"
                if len(matrices) > 1:
                    kw.update(alpha=0.55, linewidth=0.8, markersize=2.0)
                ax.plot(r["budget_fraction"].to_numpy(float), r[error].to_numpy(float), **kw)
                first = False
            continue
        x, y, lo, hi = _aggregate(rows, error, aggregate)
        if x.size == 0:
            continue
        ax.plot(x, y, **style)
        if band and x.size > 0:
            ax.fill_between(x, lo, hi, color=style["color"], alpha=0.18, linewidth=0,
                            label="_nolegend_")


def _aggregate(rows: Any, error: str, how: str) -> tuple[np.ndarray, ...]:
    rows = rows.copy()
    if "budget" in rows.columns and rows["budget"].notna().all():
        rows["_key"] = rows["budget"].astype(str)
    else:
        rows["_key"] = rows["budget_fraction"].astype(float).round(3).astype(str)
    out = []
    for _, g in rows.groupby("_key", sort=False):
        e = g[error].to_numpy(float)
        x = float(np.median(g["budget_fraction"].to_numpy(float)))
        if how == "median":
            y = float(np.median(e))
            lo, hi = (float(v) for v in np.quantile(e, [0.25, 0.75]))
        else:
            y = float(np.mean(e))
            s = float(np.std(e))
            lo, hi = y - s, y + s
        out.append((x, y, lo, hi))
    out.sort()
    if not out:
        return tuple(np.empty(0) for _ in range(4))
    return tuple(np.asarray(col, dtype=float) for col in zip(*out, strict=True))


def _select_formats(table: Any, formats: str | Sequence[str] | None) -> Any:
    if formats is None:
        return table
    if isinstance(formats, str):
        formats = [formats]
    wanted = [format_key(f) for f in formats]
    keys = table["format"].astype(str).map(format_key)
    unknown = [f for f, k in zip(formats, wanted, strict=True) if k not in set(keys)]
    if unknown:
        raise ValueError(
            f"format(s) {unknown} not in the table; available: {sorted(set(table['format']))}"
        )
    return table[keys.isin(wanted)]


def _set_scales(ax: Any, *, logx: bool, logy: bool) -> None:
    if logx:
        ax.set_xscale("log")
    else:
        ax.set_xlim(left=0)
    if logy:
        ax.set_yscale("log")
        plain_log_labels(ax.yaxis)
    else:
        ax.set_ylim(bottom=0)


def _place_legend(ax: Any, where: str | bool) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if where == "outside":
        width = ax.get_position().width * figure_of(ax).get_size_inches()[0]
        ax.legend(handles, labels, loc="lower left", bbox_to_anchor=(0.0, 1.01, 1.0, 0.2),
                  mode="expand", ncols=legend_columns(labels, width), borderaxespad=0.0)
    elif where == "right":
        ax.legend(handles, labels, loc="center left", bbox_to_anchor=(1.01, 0.5))
    else:
        ax.legend(handles, labels, loc="best")


def format_handles(formats: Sequence[str], *, marker: bool = True) -> list[Any]:
    """Legend handles (line + marker in the format's colour) for ``formats``, in that order."""
    from matplotlib.lines import Line2D

    return [
        Line2D([], [], color=format_color(f), marker=format_marker(f) if marker else None,
               label=format_label(f))
        for f in formats
    ]


def set_handles(sets: Sequence[CurveSet], *, marker: bool = True) -> list[Any]:
    """Legend handles of :func:`curve_sets` curves (as :func:`format_handles` for one set)."""
    from matplotlib.lines import Line2D

    handles = []
    for cs in sets:
        kw = cs.style()
        if not marker:
            kw.pop("marker")
        handles.append(Line2D([], [], **kw))
    return handles
