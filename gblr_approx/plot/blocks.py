"""Where a matrix's energy sits (block heat map) and how a budget is spread over layers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ._common import (
    BUDGET_LABEL,
    check_sweep,
    figure_of,
    legend_columns,
    maybe_style,
    ordered_unique,
    select,
    short_names,
    to_numpy,
)
from .style import format_color, format_key, format_label, format_sort_key

__all__ = ["block_energy", "budget_allocation", "allocation_table"]


def _block_energy(W: Any, grid: int | Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(share, density) arrays of shape grid from a matrix or a ``BlockEnergy`` report."""
    if hasattr(W, "energy") and hasattr(W, "row_edges"):
        report = W
    else:
        from ..analysis import block_energy as _analysis_block_energy

        if hasattr(W, "to_dense") and hasattr(W, "flops"):
            W = W.to_dense()
        report = _analysis_block_energy(W, grid)
    return to_numpy(report.energy), to_numpy(report.density)


def block_energy(
    W: Any,
    grid: int | Sequence[int] = (8, 8),
    ax: Any = None,
    *,
    relative: bool = False,
    annotate: bool | None = None,
    colorbar: bool = True,
    cmap: str = "cividis",
    title: str | None = None,
    width: str | float = "single",
    height: float | None = None,
) -> Any:
    """Heat map of the energy share of each block of ``W``.

    Parameters
    ----------
    W : matrix, shape (m, n), or BlockEnergy
        Tensor, array or StructuredMatrix (its energies are computed with
        :func:`gblr_approx.analysis.block_energy`), or that function's result.
    grid : int or (int, int)
        Row blocks x column blocks (near-equal contiguous splits); ignored for a BlockEnergy.
    ax : matplotlib.axes.Axes, optional
        Axes to draw into (your style is kept); a new figure in the gblr style otherwise.
    relative : bool
        Show each block's energy density (share of the energy / share of the entries;
        1 = average) instead of the share in percent.
    annotate : bool, optional
        Write the value in each cell; default when the grid has at most 36 cells.
    colorbar : bool
        Add a colour bar.
    cmap : str
        Sequential colour map (default cividis, colour-blind-safe).
    title : str, optional
        Axes title.
    width : {"single", "double"} or float
        Width of a new figure.
    height : float, optional
        Height of a new figure in inches.

    Returns
    -------
    matplotlib.figure.Figure
        The block map is an image on the first axes (row blocks down, column blocks across).
    """
    from matplotlib.ticker import MaxNLocator

    share, density = _block_energy(W, grid)
    gr, gc = share.shape
    values = density if relative else 100.0 * share
    if annotate is None:
        annotate = gr * gc <= 36
    with maybe_style(ax is None):
        if ax is None:
            from .style import new_figure

            fig, ax = new_figure(width, height, aspect=0.8)
        else:
            fig = figure_of(ax)
        im = ax.imshow(values, cmap=cmap, aspect="auto", interpolation="nearest",
                       vmin=0.0, extent=(0.5, gc + 0.5, gr + 0.5, 0.5))
        ax.grid(False)
        for side in ("top", "right", "bottom", "left"):
            ax.spines[side].set_visible(True)
        ax.xaxis.set_major_locator(MaxNLocator(min(gc, 8), integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(min(gr, 8), integer=True))
        ax.tick_params(length=0)
        ax.set_xlabel("column block (input)")
        ax.set_ylabel("row block (output)")
        if annotate:
            vmax = float(values.max()) if values.size else 1.0
            for i in range(gr):
                for j in range(gc):
                    v = values[i, j]
                    ax.text(j + 1, i + 1, f"{v:.2f}" if relative else f"{v:.1f}",
                            ha="center", va="center", fontsize="x-small",
                            color="white" if v < 0.55 * vmax else "black")
        if title:
            ax.set_title(title)
        if colorbar:
            cb = fig.colorbar(im, ax=ax, shrink=0.9, pad=0.02, aspect=25)
            cb.set_label("energy density (1 = uniform)" if relative
                         else r"share of $\|W\|_F^2$ (%)")
            cb.outline.set_linewidth(0.5)
            cb.ax.tick_params(length=2)
    return fig


def allocation_table(data: Any, *, target_error: float | None = None,
                     error: str = "rel_error", formats: Sequence[str] | None = None,
                     best: bool = False) -> Any:
    """Per-layer cost chosen by a sweep or a set of fits, as a tidy table.

    Parameters
    ----------
    data : pandas.DataFrame or Mapping[str, StructuredMatrix]
        A sweep table, or layer name -> fitted matrix.
    target_error : float, optional
        For a sweep table: for each layer and format, the cheapest swept fit whose ``error``
        is at most ``target_error`` (no interpolation between swept budgets; a layer/format
        that never reaches it is reported with ``reached = False`` and its most accurate
        fit). Without it the table must hold one fit per layer and format.
    error : str
        Error column used with ``target_error``.
    formats : sequence of str, optional
        Formats to keep.
    best : bool
        Keep only the cheapest format per layer (among those reaching the target).

    Returns
    -------
    pandas.DataFrame
        Columns ``matrix, format, flops, dense_flops, budget_fraction, error, reached``.
    """
    import pandas as pd

    if isinstance(data, Mapping):
        rows = []
        for name, A in data.items():
            if not (hasattr(A, "flops") and hasattr(A, "shape")):
                raise TypeError(
                    f"data[{name!r}] must be a StructuredMatrix (with .flops and .shape); "
                    f"got {type(A).__name__}"
                )
            m, n = (int(s) for s in A.shape)
            fmt = getattr(A, "format_name", "") or type(A).__name__.lower()
            err = (getattr(A, "info", None) or {}).get(error, np.nan)
            rows.append(dict(matrix=str(name), format=fmt, flops=int(A.flops),
                             dense_flops=m * n, budget_fraction=int(A.flops) / (m * n),
                             error=float(err) if err is not None else np.nan, reached=True))
        table = pd.DataFrame(rows)
    else:
        needed = ["matrix", "format", "budget_fraction"]
        if target_error is not None:
            needed.append(error)
        df = check_sweep(data, needed, what="data")
        df = df.copy()
        if "flops" not in df.columns:
            df["flops"] = np.nan
        if "rows" in df.columns and "cols" in df.columns:
            df["dense_flops"] = df["rows"].astype(float) * df["cols"].astype(float)
        else:
            df["dense_flops"] = np.nan
        df["error"] = df[error].astype(float) if error in df.columns else np.nan
        if target_error is None:
            dup = df.duplicated(["matrix", "format"])
            if dup.any():
                raise ValueError(
                    "the table has several fits per layer and format; give target_error to "
                    "pick the cheapest fit reaching it"
                )
            df["reached"] = True
            table = df
        else:
            if not target_error > 0:
                raise ValueError(f"target_error must be positive; got {target_error!r}")
            picked = []
            for (_, _), g in df.groupby(["matrix", "format"], sort=False):
                ok = g[g["error"] <= target_error]
                if len(ok):
                    r = ok.sort_values(["budget_fraction", "error"]).iloc[0].copy()
                    r["reached"] = True
                else:
                    r = g.sort_values(["error", "budget_fraction"]).iloc[0].copy()
                    r["reached"] = False
                picked.append(r)
            table = pd.DataFrame(picked)
        table = table[["matrix", "format", "flops", "dense_flops", "budget_fraction",
                       "error", "reached"]]
    table = table.astype({"matrix": str, "format": str})
    if formats is not None:
        keys = [format_key(f) for f in ([formats] if isinstance(formats, str) else formats)]
        table = table[table["format"].map(format_key).isin(keys)]
    if best and len(table):
        reached = table[table["reached"].astype(bool)]
        table = (reached.sort_values("budget_fraction").groupby("matrix", sort=False).head(1))
    return table.reset_index(drop=True)


def budget_allocation(
    data: Any,
    ax: Any = None,
    *,
    target_error: float | None = None,
    error: str = "rel_error",
    formats: Sequence[str] | None = None,
    matrix: str | Sequence[str] | None = None,
    best: bool = False,
    unit: str = "fraction",
    legend: bool = True,
    width: str | float = "single",
    height: float | None = None,
    title: str | None = None,
) -> Any:
    """Horizontal bars of the cost chosen for each layer, coloured by format.

    Parameters
    ----------
    data : pandas.DataFrame or Mapping[str, StructuredMatrix]
        A sweep table (with ``target_error``: the cheapest swept fit reaching it per layer and
        format) or layer name -> fitted matrix (its achieved cost). See
        :func:`allocation_table`.
    ax : matplotlib.axes.Axes, optional
        Axes to draw into (your style is kept); a new figure in the gblr style otherwise.
    target_error : float, optional
        Error target (e.g. 0.3 for 30 % relative Frobenius error).
    error : str
        Error column of the sweep table.
    formats : sequence of str, optional
        Formats to show (grouped bars, one per format within each layer).
    matrix : str or sequence of str, optional
        Layers to show, in this order; default all, in table order.
    best : bool
        One bar per layer: the cheapest format reaching the target.
    unit : {"fraction", "macs"}
        Bar length as a fraction of the layer's dense MACs, or absolute MACs (millions).
    legend : bool
        Legend of formats.
    width : {"single", "double"} or float
        Width of a new figure; the height grows with the number of bars.
    height : float, optional
        Height of a new figure in inches.
    title : str, optional
        Axes title.

    Returns
    -------
    matplotlib.figure.Figure
        One :class:`~matplotlib.patches.Rectangle` bar per (layer, format); bars of layers that
        never reach the target are hatched and show the most accurate fit's cost.
    """
    if unit not in ("fraction", "macs"):
        raise ValueError(f"unit must be 'fraction' or 'macs'; got {unit!r}")
    table = allocation_table(data, target_error=target_error, error=error, formats=formats,
                             best=best)
    if matrix is not None:
        table = select(table, "matrix", matrix)
        order = [matrix] if isinstance(matrix, str) else [str(x) for x in matrix]
    else:
        order = ordered_unique(table["matrix"])
    if table.empty:
        raise ValueError("nothing to plot: no fits left after filtering")
    if unit == "macs" and table["flops"].isna().any():
        raise ValueError("unit='macs' needs a flops column in the table")
    fmts = sorted(ordered_unique(table["format"]), key=format_sort_key)
    nf = 1 if best else len(fmts)
    labels = short_names(order)
    with maybe_style(ax is None):
        if ax is None:
            from .style import new_figure

            h = height or min(1.1 + 0.085 * len(order) * max(nf, 2.5), 9.0)
            fig, ax = new_figure(width, h)
            own = True
        else:
            fig = figure_of(ax)
            own = False
        bar_h = 0.8 / nf
        seen: set[str] = set()
        for i, name in enumerate(order):
            rows = table[table["matrix"] == name]
            for q, fmt in enumerate(fmts):
                r = rows[rows["format"] == fmt]
                if r.empty:
                    continue
                r = r.iloc[0]
                val = (float(r["budget_fraction"]) if unit == "fraction"
                       else float(r["flops"]) / 1e6)
                slot = 0 if best else q
                y = i - 0.4 + bar_h * (slot + 0.5)
                reached = bool(r["reached"])
                lab = format_label(fmt) if fmt not in seen else "_nolegend_"
                seen.add(fmt)
                ax.barh(y, val, height=bar_h * 0.9, color=format_color(fmt) if reached
                        else "white", edgecolor=format_color(fmt), linewidth=0.6,
                        hatch=None if reached else "////", label=lab)
        ax.set_yticks(range(len(order)), labels)
        ax.set_ylim(len(order) - 0.5, -0.5)
        ax.tick_params(axis="y", length=0)
        ax.grid(False, axis="y")
        ax.set_xlim(left=0)
        ax.set_xlabel(BUDGET_LABEL if unit == "fraction" else "cost (million MACs per product)")
        if title:
            ax.set_title(title)
        missed = not table["reached"].astype(bool).all()
        if legend and (len(seen) > 1 or best or missed or target_error is not None):
            from matplotlib.patches import Patch

            handles, labs = ax.get_legend_handles_labels()
            if missed:
                handles.append(Patch(facecolor="white", edgecolor="#555555", hatch="////",
                                     linewidth=0.6))
                labs.append("not reached")
            head = (f"cheapest fit with {_error_symbol(error)} $\\leq$ {target_error:g}"
                    if target_error is not None else None)
            ncols = legend_columns(labs, fig.get_size_inches()[0] * (1.0 if own else 0.6),
                                   limit=3)
            if own:  # centred above the whole figure: never clipped by long layer names
                fig.legend(handles, labs, loc="outside upper center", ncols=ncols, title=head)
            else:
                ax.legend(handles, labs, loc="lower left", bbox_to_anchor=(0.0, 1.0),
                          ncols=ncols, title=head, alignment="left", borderaxespad=0.2)
    return fig


def _error_symbol(error: str) -> str:
    return {"rel_error": r"$\|W-A\|_F/\|W\|_F$",
            "rel_error_2": r"$\|W-A\|_2/\|W\|_2$"}.get(error, error.replace("_", " "))
