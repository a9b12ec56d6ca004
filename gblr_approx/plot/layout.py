"""Where the components of a GBLR matrix sit: rectangles over the matrix, overlaps shaded."""

from __future__ import annotations

from typing import Any

import numpy as np

from ._common import figure_of, maybe_style, to_numpy
from .style import format_color

__all__ = ["gblr_layout", "component_rectangles", "coverage"]

_AUTO_OUTLINE_MAX = 40


def _params(G: Any) -> tuple[int, int, np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                             np.ndarray]:
    needed = ("shape", "row_start", "row_width", "col_start", "col_width")
    if not all(hasattr(G, a) for a in needed):
        if hasattr(G, "to_dense") and hasattr(G, "flops"):
            try:
                from .. import convert
            except ImportError:  # pragma: no cover - depends on the conversion module
                convert = None
            if convert is not None:
                return _params(convert(G, "gblr"))
        raise TypeError(
            "gblr_layout needs a GBLR matrix (attributes shape, row_start, row_width, "
            f"col_start, col_width, ranks); got {type(G).__name__}"
        )
    m, n = (int(s) for s in G.shape)
    rs, rw, cs, cw = (to_numpy(getattr(G, a), dtype=np.int64).ravel()
                      for a in ("row_start", "row_width", "col_start", "col_width"))
    K = rs.size
    if not (rw.size == cs.size == cw.size == K):
        raise ValueError(
            f"row_start, row_width, col_start, col_width must have one entry per component; "
            f"got sizes {rs.size}, {rw.size}, {cs.size}, {cw.size}"
        )
    ranks = getattr(G, "ranks", None)
    rk = np.ones(K, dtype=np.int64) if ranks is None else to_numpy(ranks, dtype=np.int64).ravel()
    if rk.size != K:
        raise ValueError(f"ranks must have one entry per component ({K}); got {rk.size}")
    if np.any(rw < 0) or np.any(cw < 0):
        raise ValueError("row_width and col_width must be non-negative")
    return m, n, rs % max(m, 1), np.minimum(rw, m), cs % max(n, 1), np.minimum(cw, n), rk


def _pieces(start: int, width: int, size: int) -> list[tuple[int, int]]:
    """A cyclic interval ``{(start + t) mod size : t < width}`` as 1 or 2 plain intervals."""
    if width <= 0:
        return []
    if start + width <= size:
        return [(start, width)]
    return [(start, size - start), (0, start + width - size)]


def component_rectangles(G: Any) -> list[list[tuple[int, int, int, int]]]:
    """The rectangles covering each component's support, wrap-around split into pieces.

    Returns
    -------
    list of list of (row, col, height, width)
        One list per component (empty for a component of zero width), in entries; a block
        that wraps around the last row and/or column gives 2 or 4 rectangles.
    """
    m, n, rs, rw, cs, cw, _ = _params(G)
    out = []
    for k in range(rs.size):
        out.append([(r0, c0, h, w)
                    for r0, h in _pieces(int(rs[k]), int(rw[k]), m)
                    for c0, w in _pieces(int(cs[k]), int(cw[k]), n)])
    return out


def coverage(G: Any, weight: str = "count") -> np.ndarray:
    """How many components cover each entry.

    Parameters
    ----------
    G : GBLR
        Needs ``shape``, ``row_start``, ``row_width``, ``col_start``, ``col_width`` (and
        ``ranks`` for ``weight="rank"``).
    weight : {"count", "rank"}
        Count components, or add up their ranks.

    Returns
    -------
    numpy.ndarray of int64, shape (m, n)
    """
    if weight not in ("count", "rank"):
        raise ValueError(f"weight must be 'count' or 'rank'; got {weight!r}")
    m, n, rs, rw, cs, cw, rk = _params(G)
    K = rs.size
    rows = np.zeros((K, m), dtype=np.int64)
    cols = np.zeros((K, n), dtype=np.int64)
    for k in range(K):
        for a, h in _pieces(int(rs[k]), int(rw[k]), m):
            rows[k, a:a + h] = 1
        for a, w in _pieces(int(cs[k]), int(cw[k]), n):
            cols[k, a:a + w] = 1
    wts = rk if weight == "rank" else np.ones(K, dtype=np.int64)
    return rows.T @ (cols * wts[:, None])


def gblr_layout(
    G: Any,
    ax: Any = None,
    *,
    weight: str = "count",
    outline: bool | None = None,
    colorbar: bool = True,
    cmap: str = "Blues",
    title: str | None = None,
    width: str | float = "single",
    height: float | None = None,
) -> Any:
    """The component rectangles of a GBLR matrix drawn over the matrix.

    Each entry is shaded by how many components cover it (white: none), and each
    component's support is outlined in the GBLR colour. A component whose rows or columns
    wrap around the end of the matrix (cyclic intervals) is drawn as its 2 or 4 pieces.

    Parameters
    ----------
    G : GBLR
        Anything with ``shape`` (m, n) and LongTensors/arrays ``row_start``, ``row_width``,
        ``col_start``, ``col_width`` of shape (K,) in entries (and ``ranks``); another
        StructuredMatrix is converted with :func:`gblr_approx.convert` when available.
    ax : matplotlib.axes.Axes, optional
        Axes to draw into (your style is kept); a new figure in the gblr style otherwise.
    weight : {"count", "rank"}
        Shade by the number of covering components, or by the sum of their ranks.
    outline : bool, optional
        Outline each component's rectangle(s) in the GBLR colour. Default: when there are at
        most 40 non-empty components (beyond that the outlines hide the shading).
    colorbar : bool
        Add a colour bar with integer ticks.
    cmap : str
        Sequential colour map for 1, 2, ... covering components (default Blues: light for
        one, darker for more, away from the vermillion outlines); 0 is drawn white.
    title : str, optional
        Axes title.
    width : {"single", "double"} or float
        Width of a new figure; its height follows the matrix's aspect ratio.
    height : float, optional
        Height of a new figure in inches.

    Returns
    -------
    matplotlib.figure.Figure
        The matrix is an image on the first axes (rows down, columns across, in entries); the
        outlines are :class:`matplotlib.patches.Rectangle` patches, one per piece.
    """
    from matplotlib import colormaps
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.patches import Rectangle
    from matplotlib.ticker import MaxNLocator

    m, n, *_ = _params(G)
    cov = coverage(G, weight)
    rects = component_rectangles(G)
    vmax = max(int(cov.max()) if cov.size else 0, 1)

    with maybe_style(ax is None):
        if ax is None:
            from .style import figsize, new_figure

            w_in, _ = figsize(width)
            img_w = w_in * (0.8 if colorbar else 0.95)
            h = height or min(max(img_w * m / max(n, 1) + 0.5, 1.5), 7.0)
            fig, ax = new_figure(width, h)
        else:
            fig = figure_of(ax)
        base = colormaps[cmap]
        # 0 is white; 1..vmax use the whole colour map, so contrast does not fade when many
        # components overlap (a few levels use its light half only).
        # The ramp runs from the least to the most covered entry (counts that do not occur
        # below it take its first colour), so a matrix covered 20 to 40 times still shows
        # its structure.
        lo = int(cov[cov > 0].min()) if np.any(cov > 0) else 1
        span = max(vmax - lo, 1)
        top = 0.6 + 0.4 * min(vmax - lo, 8) / 8
        colors = ["#FFFFFF"] + [base(0.25 + (top - 0.25) * max(i - lo, 0) / span)
                                for i in range(1, vmax + 1)]
        cm = ListedColormap(colors)
        norm = BoundaryNorm(np.arange(-0.5, vmax + 1.5), cm.N)
        im = ax.imshow(cov, cmap=cm, norm=norm, extent=(0, n, m, 0), interpolation="nearest",
                       aspect="equal")
        if outline is None:
            outline = sum(1 for p in rects if p) <= _AUTO_OUTLINE_MAX
        if outline:
            edge = format_color("gblr")
            for pieces in rects:
                for r0, c0, h_, w_ in pieces:
                    ax.add_patch(Rectangle((c0, r0), w_, h_, fill=False, edgecolor=edge,
                                           linewidth=0.6, clip_on=True))
        ax.set_xlim(0, n)
        ax.set_ylim(m, 0)
        ax.grid(False)
        for side in ("top", "right", "bottom", "left"):
            ax.spines[side].set_visible(True)
        ax.xaxis.set_major_locator(MaxNLocator(4, integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(5, integer=True))
        ax.set_xlabel("column $j$ (input)")
        ax.set_ylabel("row $i$ (output)")
        if title:
            ax.set_title(title)
        if colorbar:
            cb = fig.colorbar(im, ax=ax, shrink=0.9, pad=0.02, aspect=25)
            cb.set_label("components covering entry" if weight == "count"
                         else "sum of ranks covering entry")
            cb.ax.yaxis.set_major_locator(MaxNLocator(min(vmax + 1, 6), integer=True))
            cb.outline.set_linewidth(0.5)
            cb.ax.tick_params(length=2)
    return fig
