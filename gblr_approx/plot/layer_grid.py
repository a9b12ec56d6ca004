"""Small multiples: error versus budget for every layer of a model, one panel per layer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ._common import (
    BUDGET_LABEL,
    check_sweep,
    error_label,
    failed_format_handles,
    figure_of,
    fit_title,
    grid_geometry,
    legend_columns,
    maybe_style,
    ok_rows,
    ordered_unique,
    page_capacity,
    plain_log_labels,
    select,
    short_names,
)
from .error_budget import _select_formats, curve_sets, draw_error_curves, set_handles

__all__ = ["layer_grid", "layer_grid_pages"]


def layer_grid(
    df: Any,
    ax: Any = None,
    *,
    matrix: str | Sequence[str] | None = None,
    formats: str | Sequence[str] | None = None,
    error: str = "rel_error",
    logy: bool = False,
    logx: bool = False,
    ncols: int | None = None,
    sharey: bool = True,
    legend: bool = True,
    width: str | float = "double",
    height: float | None = None,
    panel_height: float = 1.35,
) -> Any:
    """Error versus budget per layer: one small panel per matrix, shared axes and legend.

    Parameters
    ----------
    df : pandas.DataFrame
        Sweep table (see :func:`error_vs_budget`); rows whose ``status`` is not ``"ok"`` are
        left out.
    ax : sequence of Axes, optional
        Axes to draw into, one per matrix (your style is kept; no shared labels are added).
        Default: a new figure in the gblr style.
    matrix : str or sequence of str, optional
        Matrices to show, in this order; default all, in table order.
    formats : str or sequence of str, optional
        Formats to show; default all.
    error : {"rel_error", "rel_error_2"} or str
        Error column.
    logy, logx : bool
        Logarithmic axes.
    ncols : int, optional
        Panels per row; default 4 at double width, 2 at single width, more (panels down to
        1.1 in wide) when that keeps the figure within a page (9 in).
    sharey : bool
        Share the y axis across panels (compare layers at a glance).
    legend : bool
        One legend of formats above the panels.
    width : {"single", "double"} or float
        Width of a new figure.
    height : float, optional
        Height of a new figure in inches; default ``panel_height`` per row plus the legend,
        rows shrunk (down to 0.85 in) so the figure stays within 9 in. More panels than a
        page holds (54 at page width) make a taller figure: draw them with
        :func:`layer_grid_pages` instead.
    panel_height : float
        Inches per row of panels when ``height`` is not given (an upper bound).

    Returns
    -------
    matplotlib.figure.Figure
        One axes per matrix, titled with its (shortened) name; one line per format in each
        (per (options, seed) set of a format that has several, as in
        :func:`error_vs_budget`).
    """
    table = check_sweep(df, ["matrix", "format", "budget_fraction", error], ok_only=False)
    table = select(table, "matrix", matrix)
    table = _select_formats(table, formats)
    table, failed = ok_rows(table)
    table = table[np.isfinite(table[error].astype(float))]
    if logy:
        table = table[table[error].astype(float) > 0]
    if logx:
        table = table[table["budget_fraction"].astype(float) > 0]
    if matrix is not None:
        names = [matrix] if isinstance(matrix, str) else [str(m) for m in matrix]
    else:
        names = ordered_unique(table["matrix"].astype(str))
    if not names:
        raise ValueError("nothing to plot: the table has no successful fits")
    titles = short_names(names)
    k = len(names)
    sets = curve_sets(table)  # one per format, or per (options, seed) set of a format

    with maybe_style(ax is None):
        if ax is None:
            from .style import WIDTHS, new_figure

            width_in = WIDTHS.get(width, 7.0) if isinstance(width, str) else float(width)
            ncols, nrows, h = grid_geometry(k, width_in, ncols=ncols,
                                            panel_height=panel_height)
            h = height or h
            fig, grid = new_figure(width, h, nrows=nrows, ncols=ncols, squeeze=False,
                                   sharex=True, sharey=sharey)
            panels = list(grid.ravel()[:k])
            for a in grid.ravel()[k:]:
                a.remove()
            own = True
        else:
            panels = list(np.asarray(ax, dtype=object).ravel())
            if len(panels) < k:
                raise ValueError(f"{k} matrices need {k} Axes; got {len(panels)}")
            fig = figure_of(panels[0])
            ncols = ncols or k
            own = False
        panel_w = fig.get_size_inches()[0] / max(ncols, 1) - 0.3  # minus the tick labels
        for a, name, t in zip(panels, names, titles, strict=False):
            sub = table[table["matrix"].astype(str) == name]
            draw_error_curves(a, sub, aggregate="none", error=error, band=False,
                              linewidth=1.0, markersize=2.5, sets=sets)
            a.set_title(fit_title(t, panel_w, 6.5), fontsize="small", linespacing=0.95)
            if logy:
                a.set_yscale("log")
                plain_log_labels(a.yaxis)
            if logx:
                a.set_xscale("log")
        if not logx:
            panels[0].set_xlim(left=0)
        if not logy:
            for a in panels:
                a.set_ylim(bottom=0)
        if own:
            # A panel with no panel below it shows its x tick labels (shared x hides them).
            for j, a in enumerate(panels):
                if j + ncols >= k:
                    a.xaxis.set_tick_params(labelbottom=True)
            fig.supxlabel(BUDGET_LABEL, fontsize="medium")
            fig.supylabel(error_label(error), fontsize="medium")
            if legend and sets:
                handles = set_handles(sets) + failed_format_handles(failed)
                ncols = legend_columns([h.get_label() for h in handles],
                                       fig.get_size_inches()[0])
                fig.legend(handles=handles, loc="outside upper center", ncols=ncols)
        else:
            for a in panels[:k]:
                a.set_xlabel(BUDGET_LABEL)
                a.set_ylabel(error_label(error))
            if legend and sets:
                panels[0].legend(handles=set_handles(sets) + failed_format_handles(failed),
                                 loc="best")
    return fig


def layer_grid_pages(df: Any, *, per_page: int | None = None, width: str | float = "double",
                     **options: Any) -> list[Any]:
    """:func:`layer_grid` split into pages of at most ``per_page`` panels (one figure each).

    Parameters
    ----------
    df : pandas.DataFrame
        Sweep table, as for :func:`layer_grid`.
    per_page : int, optional
        Panels per page; default as many as fit a page of 9 in at the minimum panel size
        (54 at page width, 16 in a single column), balanced so pages hold about as many.
    width : {"single", "double"} or float
        Figure width.
    **options
        Passed to :func:`layer_grid` (``matrix``, ``formats``, ``error``, ``logy``, ...).

    Returns
    -------
    list of matplotlib.figure.Figure
        One figure per page, in table order; every page has the same columns and legend.
    """
    from .style import WIDTHS

    table = check_sweep(df, ["matrix", "format"], ok_only=False)
    matrix = options.pop("matrix", None)
    if matrix is None:
        names = ordered_unique(table["matrix"].astype(str))
    else:
        names = [matrix] if isinstance(matrix, str) else [str(m) for m in matrix]
    width_in = WIDTHS.get(width, 7.0) if isinstance(width, str) else float(width)
    cap = per_page or page_capacity(width_in)
    if cap < 1:
        raise ValueError(f"per_page must be >= 1; got {per_page!r}")
    pages = max(1, -(-len(names) // cap))
    chunks = [list(c) for c in np.array_split(np.array(names, dtype=object), pages)]
    return [layer_grid(df, matrix=chunk, width=width, **options) for chunk in chunks]
