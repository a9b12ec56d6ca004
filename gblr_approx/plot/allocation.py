"""Budget allocation of a compressed model: the report of :func:`gblr_approx.nn.compress_model`.

:func:`budget_allocation` draws a ``compress_model`` report as one horizontal bar per layer (its
cost as a fraction of the layer's dense MACs, coloured by the chosen format) with the layer's
relative output error as a dot on a second axis, and the model budget as a dashed line. Any
other input (a sweep table, a dict of fitted matrices) goes to the sweep-based figure of the
same name, :func:`gblr_approx.plot.blocks.budget_allocation`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import blocks
from ._common import figure_of, maybe_style, short_names
from .style import format_color, format_label, format_sort_key

__all__ = ["budget_allocation", "is_compress_report"]


def is_compress_report(data: Any) -> bool:
    """Whether ``data`` is a report returned by ``compress_model`` (a DataFrame with its attrs)."""
    return (hasattr(data, "attrs") and "total_flops" in getattr(data, "attrs", {})
            and hasattr(data, "columns") and {"format", "budget_fraction"} <= set(data.columns))


def budget_allocation(data: Any, ax: Any = None, **kwargs: Any) -> Any:
    """Per-layer cost and format chosen by ``compress_model`` (or by a sweep, see below).

    Parameters
    ----------
    data : pandas.DataFrame
        A ``compress_model`` report (index: layer names; columns ``format``,
        ``budget_fraction``, ``output_error``...). Anything else is passed to
        :func:`gblr_approx.plot.blocks.budget_allocation` with ``kwargs``.
    ax : matplotlib.axes.Axes, optional
        Axes to draw into (your style is kept); a new figure in the gblr style otherwise.
    width : {"single", "double"} or float, optional
        Width of a new figure (keyword); the height grows with the number of layers.
    error : bool, optional
        Draw the relative output errors (default True when the report has them).
    title : str, optional

    Returns
    -------
    matplotlib.figure.Figure
        One bar (``Rectangle``) per layer in layer order, the budget as a dashed vertical line.
    """
    if not is_compress_report(data):
        return blocks.budget_allocation(data, ax, **kwargs)
    width = kwargs.pop("width", "single")
    title = kwargs.pop("title", None)
    show_err = kwargs.pop("error", None)
    if kwargs:
        raise TypeError(f"unexpected options for a compress report: {sorted(kwargs)}")
    report = data
    names = [str(x) for x in report.index]
    if not names:
        raise ValueError("nothing to plot: the report is empty")
    errs = report["output_error"].to_numpy(dtype=float) if "output_error" in report else None
    if show_err is None:
        show_err = errs is not None and bool(np.isfinite(errs).any())
    labels = short_names(names)
    budget = report.attrs["budget"] / report.attrs["dense_flops"]
    with maybe_style(ax is None):
        if ax is None:
            from .style import new_figure

            fig, ax = new_figure(width, min(1.4 + 0.12 * len(names), 9.5))
            own = True
        else:
            fig = figure_of(ax)
            own = False
        seen: set[str] = set()
        for i, (fmt, frac) in enumerate(zip(report["format"], report["budget_fraction"],
                                            strict=True)):
            lab = format_label(fmt) if fmt not in seen else "_nolegend_"
            seen.add(fmt)
            dense = fmt == "dense"  # kept as the original layer: light, so the dot shows
            ax.barh(i, float(frac), height=0.75, label=lab,
                    color="#d9d9d9" if dense else format_color(fmt),
                    edgecolor="#777777" if dense else "none", linewidth=0.5)
        ax.axvline(budget, color="#333333", linestyle="--", linewidth=0.8,
                   label=f"budget {budget:.0%}")
        ax.set_yticks(range(len(names)), labels)
        ax.set_ylim(len(names) - 0.5, -0.5)
        ax.tick_params(axis="y", length=0)
        ax.grid(False, axis="y")
        ax.set_xlim(0, 1.0)
        ax.set_xlabel("cost / dense cost of the layer (MACs)")
        if show_err:
            ax2 = ax.twiny()
            ax2.plot(errs, range(len(names)), "o", color="black", markersize=2.5,
                     label="output error")
            ax2.set_xlim(0, max(float(np.nanmax(errs)) * 1.1, 1e-3))
            ax2.set_xlabel(r"output error $\|(W-A)X\|_F/\|WX\|_F$ (dots)")
            ax2.grid(False)
        handles, labs = ax.get_legend_handles_labels()
        order = sorted(range(len(labs)), key=lambda t: (labs[t].startswith("budget"),
                                                         format_sort_key(labs[t])))
        handles, labs = [handles[t] for t in order], [labs[t] for t in order]
        if own:  # below the axes: never over a bar
            fig.legend(handles, labs, loc="outside lower center", ncols=min(len(labs), 3))
        else:
            ax.legend(handles, labs, loc="lower right", fontsize="small")
        if title:
            ax.set_title(title)
    return fig
