"""Singular value spectra and energy curves of weight matrices."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ._common import (
    figure_of,
    fit_title,
    grid_geometry,
    is_axes,
    legend_columns,
    maybe_style,
    plain_log_labels,
    short_names,
    to_numpy,
)
from .style import sequential_colors

__all__ = ["spectrum", "singular_values_of"]

_KINDS = ("both", "singular", "energy")
SINGULAR_LABEL = r"normalised singular value $\sigma_i/\sigma_1$"
ENERGY_LABEL = r"cumulative energy $\Sigma_{j \leq i}\,\sigma_j^2\,/\,\|W\|_F^2$"
SHORT_LABELS = {"singular": r"$\sigma_i/\sigma_1$", "energy": "cumulative energy"}
INDEX_LABELS = {"index": "index $i$", "fraction": r"index fraction $i\,/\,\min(m, n)$"}
#: The y labels on two lines, for panels too short for one (the figures made here).
WRAPPED_LABELS = {
    SINGULAR_LABEL: "normalised singular value\n" + r"$\sigma_i/\sigma_1$",
    ENERGY_LABEL: "cumulative energy\n" + r"$\Sigma_{j \leq i}\,\sigma_j^2\,/\,\|W\|_F^2$",
}
#: Most legend entries drawn inside a panel; more go below the panels, in columns.
INSIDE_LEGEND_MAX = 6


def singular_values_of(obj: Any) -> np.ndarray:
    """Singular values (descending, float64) of a matrix, a spectrum report or a 1-D array.

    Parameters
    ----------
    obj
        An object with a ``singular_values`` attribute (e.g. :class:`gblr_approx.SpectrumReport`),
        a :class:`~gblr_approx.StructuredMatrix` (densified), a 2-D tensor/array of shape
        (m, n) (singular values computed with :func:`torch.linalg.svdvals` in float64), or a
        1-D tensor/array taken to be singular values already.

    Returns
    -------
    numpy.ndarray, shape (min(m, n),)
    """
    import torch

    if hasattr(obj, "singular_values"):
        sv = to_numpy(obj.singular_values).ravel()
    else:
        if hasattr(obj, "to_dense") and hasattr(obj, "flops"):
            obj = obj.to_dense()
        arr = obj if isinstance(obj, torch.Tensor) else torch.as_tensor(np.asarray(obj))
        if arr.ndim == 2:
            if arr.numel() == 0:
                raise ValueError(f"cannot take the spectrum of an empty {tuple(arr.shape)} matrix")
            sv = torch.linalg.svdvals(arr.detach().to("cpu", torch.float64)).numpy()
        elif arr.ndim == 1:
            sv = to_numpy(arr)
        else:
            raise ValueError(
                f"expected a matrix (m, n), singular values (k,) or a SpectrumReport; got an "
                f"array of shape {tuple(arr.shape)}"
            )
    sv = np.asarray(sv, dtype=np.float64)
    if sv.size == 0 or not np.all(np.isfinite(sv)) or np.any(sv < 0):
        raise ValueError("singular values must be a non-empty, finite, non-negative array")
    return np.ascontiguousarray(np.sort(sv)[::-1])


def spectrum(
    data: Any,
    ax: Any = None,
    *,
    kind: str | None = None,
    layout: str = "overlay",
    x: str = "index",
    normalise: bool = True,
    energy_levels: Sequence[float] = (),
    max_index: int | None = None,
    ncols: int | None = None,
    legend: bool = True,
    width: str | float | None = None,
    height: float | None = None,
) -> Any:
    """Normalised singular values (log scale) and energy curve of one or several matrices.

    Parameters
    ----------
    data : matrix, SpectrumReport, 1-D singular values, or Mapping[str, any of those]
        A matrix of shape (m, n) (tensor, array or StructuredMatrix; its singular values are
        computed), an object with ``.singular_values`` (e.g. ``ga.spectrum(W)``), or a dict
        name -> any of these to overlay several layers (names become the legend).
    ax : Axes or sequence of Axes, optional
        Where to draw (your style is kept). A single Axes draws one quantity (``kind``
        defaults to ``"singular"`` then); for ``kind="both"`` give two Axes; for
        ``layout="grid"`` give one Axes per matrix and quantity (matrix-major order).
        Default: a new figure in the gblr style.
    kind : {"both", "singular", "energy"}, optional
        What to draw: singular values ``sigma_i / sigma_1`` on a log axis, the cumulative
        energy ``sum_{j<=i} sigma_j^2 / ||W||_F^2``, or both side by side. Default
        ``"both"`` for a new figure, ``"singular"`` for a single ``ax``.
    layout : {"overlay", "grid"}
        Several matrices overlaid in one panel per quantity, or small multiples (one panel
        per matrix, ``ncols`` per row, the two quantities on consecutive rows).
    x : {"index", "fraction"}
        x axis: index i (1-based), or i / min(m, n) to compare matrices of different sizes.
    normalise : bool
        Divide singular values by the largest (otherwise raw values, "singular value").
    energy_levels : sequence of float
        Energy fractions (e.g. ``(0.9, 0.99)``) drawn as thin reference lines on the energy
        panel.
    max_index : int, optional
        Show only the first ``max_index`` singular values.
    ncols : int, optional
        Panels per row for ``layout="grid"`` (default: 4 at page width, more when that
        keeps the figure within a page of 9 in).
    legend : bool
        Legend naming the matrices (overlay with several matrices): inside the last panel
        for up to 6 matrices, else below the panels in as many columns as fit the width.
    width : {"single", "double"} or float, optional
        New figure width; default ``"double"`` for two panels or a grid, else ``"single"``.
    height : float, optional
        New figure height in inches.

    Returns
    -------
    matplotlib.figure.Figure
        One line per matrix in each panel.
    """
    if layout not in ("overlay", "grid"):
        raise ValueError(f"layout must be 'overlay' or 'grid'; got {layout!r}")
    if x not in INDEX_LABELS:
        raise ValueError(f"x must be 'index' or 'fraction'; got {x!r}")
    if kind is None:
        kind = "singular" if (is_axes(ax) or layout == "grid") else "both"
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}; got {kind!r}")
    if max_index is not None and not (isinstance(max_index, int) and max_index >= 1):
        raise ValueError(f"max_index must be a positive int; got {max_index!r}")
    for lv in energy_levels:
        if not 0 < float(lv) <= 1:
            raise ValueError(f"energy_levels must lie in (0, 1]; got {lv!r}")

    if isinstance(data, Mapping):
        if not data:
            raise ValueError("data is an empty mapping; give at least one matrix")
        names = [str(k) for k in data]
        labels = short_names(names)
        svs = [singular_values_of(v) for v in data.values()]
    else:
        labels = [str(getattr(data, "name", "") or "")]
        svs = [singular_values_of(data)]
    quantities = ["singular", "energy"] if kind == "both" else [kind]
    k = len(svs)
    nq = len(quantities)
    fig_w = None
    grid_h = None
    if ax is None:
        from .style import figsize

        fig_w = figsize(width or ("double" if (layout == "grid" or nq > 1) else "single"))[0]
    if layout == "grid":
        if fig_w is not None:
            ncols, nblocks, grid_h = grid_geometry(
                k, fig_w, ncols=ncols, panel_height=1.35 * nq, extra=0.45,
                min_panel_height=0.85 * nq)
        else:
            ncols = min(ncols or 4, k)
            nblocks = math.ceil(k / ncols)
        shape = (nblocks * nq, ncols)
    else:
        ncols = nq
        shape = (1, ncols)
    n_panels_needed = (k if layout == "grid" else 1) * nq
    below = legend and layout == "overlay" and k > INSIDE_LEGEND_MAX
    leg_font = 6.0 if k > 24 else 7.0
    leg_cols = legend_columns(labels, fig_w, fontsize_pt=leg_font, limit=8) if (
        below and fig_w) else 1

    with maybe_style(ax is None):
        if ax is None:
            from .style import new_figure

            if layout == "grid":
                h = height or grid_h
            else:  # the legend below adds its rows
                rows_below = math.ceil(k / leg_cols) if below else 0
                h = height or (2.3 + rows_below * leg_font * 1.45 / 72.0)
            fig, grid = new_figure(fig_w, h, nrows=shape[0], ncols=shape[1], squeeze=False)
            panels = _panel_order(grid, k, quantities, layout, ncols)
            used = {id(a) for a in panels}
            for a in grid.ravel():
                if id(a) not in used:
                    a.remove()
        else:
            panels = [ax] if is_axes(ax) else list(np.asarray(ax, dtype=object).ravel())
            if len(panels) < n_panels_needed:
                raise ValueError(
                    f"kind={kind!r}, layout={layout!r} with {k} matrix(es) needs "
                    f"{n_panels_needed} Axes; got {len(panels)}"
                )
            fig = figure_of(panels[0])
        own = ax is None
        quantity_of = {}
        colors = sequential_colors(k)
        for j, (sv, label) in enumerate(zip(svs, labels, strict=True)):
            n_full = len(sv)
            if max_index is not None:
                sv = sv[:max_index]
            idx = np.arange(1, len(sv) + 1, dtype=float)
            if x == "fraction":
                idx = idx / float(n_full)
            for q, quantity in enumerate(quantities):
                a = panels[j * len(quantities) + q] if layout == "grid" else panels[q]
                quantity_of[id(a)] = quantity
                lab = label if label else "_nolegend_"
                if quantity == "singular":
                    y = sv / sv[0] if normalise and sv[0] > 0 else sv
                    mask = y > 0
                    a.plot(idx[mask], y[mask], color=colors[j], label=lab)
                    a.set_yscale("log")
                    a.set_ylabel(SINGULAR_LABEL if normalise else "singular value $\\sigma_i$")
                else:
                    e2 = np.cumsum(sv**2)
                    total = e2[-1] if e2[-1] > 0 else 1.0
                    a.plot(idx, e2 / total, color=colors[j], label=lab)
                    a.set_ylim(0, 1.02)
                    a.set_ylabel(ENERGY_LABEL)
                a.set_xlabel(INDEX_LABELS[x])
                a.set_xlim(left=0)
                if layout == "grid" and label and q == 0:
                    pw = fig.get_size_inches()[0] / ncols - 0.35 if own else 1e9
                    a.set_title(fit_title(label, pw, 6.5), fontsize="small", linespacing=0.95)
        for a in panels[:n_panels_needed]:
            if quantity_of.get(id(a)) == "energy":
                for lv in energy_levels:
                    a.axhline(float(lv), color="#888888", linewidth=0.5, linestyle=":",
                              zorder=1, label="_nolegend_")
                    # at the left, where energy curves (rising from 0) leave room
                    a.annotate(f"{100 * float(lv):g} %", xy=(0.0, float(lv)),
                               xycoords=("axes fraction", "data"), xytext=(3, -1.5),
                               textcoords="offset points", ha="left", va="top",
                               fontsize="x-small", color="#555555")
        if layout == "grid":
            _outer_labels_only(panels[:n_panels_needed], ncols, len(quantities))
            if own:  # one shared x label; one shared y label when there is one quantity
                for a in panels[:n_panels_needed]:
                    a.set_xlabel("")
                    if len(quantities) == 1:
                        a.set_ylabel("")
                    elif a.get_ylabel():
                        a.set_ylabel(SHORT_LABELS[quantity_of[id(a)]])
                fig.supxlabel(INDEX_LABELS[x], fontsize="medium")
                if len(quantities) == 1:
                    q = quantities[0]
                    fig.supylabel(ENERGY_LABEL if q == "energy" else (
                        SINGULAR_LABEL if normalise else "singular value $\\sigma_i$"),
                        fontsize="medium")
        if own:  # plain tick labels (0.3, 0.5, 1): narrow panels stay legible
            for a in panels[:n_panels_needed]:
                if quantity_of.get(id(a)) == "singular":
                    plain_log_labels(a.yaxis)
        if own and layout == "overlay":  # long labels on two lines: never clipped
            for a in panels[:n_panels_needed]:
                a.set_ylabel(WRAPPED_LABELS.get(a.get_ylabel(), a.get_ylabel()))
        if legend and layout == "overlay" and k > 1:
            target = panels[len(quantities) - 1]
            if below and own:
                handles, texts = target.get_legend_handles_labels()
                fig.legend(handles, texts, loc="outside lower center", ncols=leg_cols,
                           fontsize=leg_font, handlelength=1.2, columnspacing=0.8)
            else:
                loc = "lower right" if quantities[-1] == "energy" else "upper right"
                target.legend(loc=loc, ncols=1 if k <= INSIDE_LEGEND_MAX else 2,
                              fontsize=None if k <= INSIDE_LEGEND_MAX else "x-small")
    return fig


def _panel_order(grid: np.ndarray, k: int, quantities: list[str], layout: str,
                 ncols: int) -> list[Any]:
    """Axes in matrix-major order: (matrix 0, q0), (matrix 0, q1), (matrix 1, q0), ..."""
    nq = len(quantities)
    if layout == "overlay":
        return [grid[0, q] for q in range(nq)]
    out = []
    for j in range(k):
        block, col = divmod(j, ncols)
        for q in range(nq):
            out.append(grid[block * nq + q, col])
    return out


def _outer_labels_only(panels: list[Any], ncols: int, nq: int) -> None:
    """In small multiples keep y labels in the first column and x labels on the last row
    of each quantity (the ticks stay: panels are not forced to share limits)."""
    k = len(panels) // nq
    for j in range(k):
        block, col = divmod(j, ncols)
        for q in range(nq):
            a = panels[j * nq + q]
            if col != 0:
                a.set_ylabel("")
            below = j + ncols  # the same quantity of the matrix one block down
            if q < nq - 1 or below < k:
                a.set_xlabel("")
