"""The shared figure style: format colours, figure sizes, the style sheet, saving.

Every figure of :mod:`gblr_approx.plot` uses the same colour, marker and label for a format,
so a reader can compare figures side by side. Colours are the Okabe & Ito (2008)
colour-blind-safe palette (yellow left out: too faint on white); markers differ too, so
figures stay readable in greyscale.

Figures created by :mod:`gblr_approx.plot` use the shipped style sheet ``gblr.mplstyle``
(8 pt text, thin spines, no top/right spines, light grid, constrained layout, TrueType fonts
embedded in PDF). When you pass your own ``ax=``, your current style is kept and only the
format colours are imposed. Use :func:`use_style` to apply the style to your own figures.

Nothing here imports :mod:`matplotlib.pyplot`.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = [
    "FORMAT_COLORS",
    "FORMAT_MARKERS",
    "FORMAT_LABELS",
    "FORMAT_ORDER",
    "WIDTHS",
    "STYLE_PATH",
    "format_key",
    "format_color",
    "format_marker",
    "format_label",
    "sequential_colors",
    "figsize",
    "style_context",
    "use_style",
    "save_figure",
]

#: Okabe-Ito colours, by name.
OKABE_ITO = {
    "black": "#000000",
    "orange": "#E69F00",
    "sky_blue": "#56B4E9",
    "bluish_green": "#009E73",
    "yellow": "#F0E442",
    "blue": "#0072B2",
    "vermillion": "#D55E00",
    "reddish_purple": "#CC79A7",
}

#: Canonical order of formats in legends and grouped bars (cheapest idea first, GBLR last
#: but one so the general class sits next to its newest relative BLAST).
FORMAT_ORDER: tuple[str, ...] = (
    "dense",
    "lowrank",
    "blocksparse",
    "blocklowrank",
    "monarch",
    "gblr",
    "blast",
)

#: Fixed colour per format (registry key -> hex colour), the same in every figure.
FORMAT_COLORS: dict[str, str] = {
    "dense": OKABE_ITO["black"],
    "lowrank": OKABE_ITO["blue"],
    "blocksparse": OKABE_ITO["orange"],
    "blocklowrank": OKABE_ITO["sky_blue"],
    "monarch": OKABE_ITO["reddish_purple"],
    "gblr": OKABE_ITO["vermillion"],
    "blast": OKABE_ITO["bluish_green"],
}

#: Fixed marker per format (distinct shapes so figures survive greyscale printing).
FORMAT_MARKERS: dict[str, str] = {
    "dense": "X",
    "lowrank": "o",
    "blocksparse": "s",
    "blocklowrank": "D",
    "monarch": "^",
    "gblr": "P",
    "blast": "v",
}

#: Display name per format.
FORMAT_LABELS: dict[str, str] = {
    "dense": "Dense",
    "lowrank": "Low-rank",
    "blocksparse": "Block-sparse",
    "blocklowrank": "Block-low-rank",
    "monarch": "Monarch",
    "gblr": "GBLR",
    "blast": "BLAST",
}

# Colours for formats outside the table (e.g. a user's own registered format): greys and the
# darker relatives of the palette, picked deterministically from the name.
_EXTRA_COLORS = ("#666666", "#999933", "#882255", "#44AA99", "#332288", "#AA4499")
_EXTRA_MARKERS = ("h", "p", "d", "<", ">", "*")

#: Figure widths in inches: a single column and a full page width of a two-column paper.
WIDTHS: dict[str, float] = {"single": 3.3, "double": 7.0}

#: Path of the shipped matplotlib style sheet.
STYLE_PATH: Path = Path(str(resources.files("gblr_approx").joinpath("plot/gblr.mplstyle")))


def format_key(name: str) -> str:
    """Normalise a format name the way the registry does: lower case, '-'/'_' removed."""
    return str(name).lower().replace("-", "").replace("_", "").replace(" ", "")


def format_color(name: str) -> str:
    """Hex colour of format ``name`` (the same in every figure).

    Known formats use :data:`FORMAT_COLORS`; any other name gets a stable colour derived
    from the name (not from the order it is plotted in).
    """
    key = format_key(name)
    if key in FORMAT_COLORS:
        return FORMAT_COLORS[key]
    return _EXTRA_COLORS[zlib.crc32(key.encode()) % len(_EXTRA_COLORS)]


def format_marker(name: str) -> str:
    """Matplotlib marker of format ``name`` (stable, like :func:`format_color`)."""
    key = format_key(name)
    if key in FORMAT_MARKERS:
        return FORMAT_MARKERS[key]
    return _EXTRA_MARKERS[zlib.crc32(key.encode()) % len(_EXTRA_MARKERS)]


def format_label(name: str) -> str:
    """Display name of format ``name`` ("gblr" -> "GBLR"); unknown names are returned as given."""
    return FORMAT_LABELS.get(format_key(name), str(name))


def format_sort_key(name: str) -> tuple[int, str]:
    """Sort key putting formats in :data:`FORMAT_ORDER`, unknown ones after, alphabetically."""
    key = format_key(name)
    idx = FORMAT_ORDER.index(key) if key in FORMAT_ORDER else len(FORMAT_ORDER)
    return (idx, key)


def sequential_colors(k: int, cmap: str = "viridis") -> list[tuple[float, float, float, float]]:
    """``k`` colours along a perceptually uniform colour map, for layers (not formats).

    The bright yellow end is left out so every colour reads on white.
    """
    from matplotlib import colormaps

    cm = colormaps[cmap]
    if k <= 1:
        return [cm(0.0)]
    return [cm(0.78 * i / (k - 1)) for i in range(k)]


def figsize(width: str | float = "single", height: float | None = None, *,
            aspect: float = 0.72) -> tuple[float, float]:
    """Figure size in inches.

    Parameters
    ----------
    width : {"single", "double"} or float
        ``"single"`` = 3.3 in (one column), ``"double"`` = 7.0 in (page width), or inches.
    height : float, optional
        Inches; default ``aspect * width``.
    aspect : float
        Height / width when ``height`` is not given.

    Returns
    -------
    (float, float)
        ``(width, height)`` in inches.
    """
    if isinstance(width, str):
        if width not in WIDTHS:
            raise ValueError(f"width must be one of {sorted(WIDTHS)} or inches; got {width!r}")
        w = WIDTHS[width]
    else:
        w = float(width)
        if not w > 0:
            raise ValueError(f"width must be positive inches; got {width!r}")
    h = float(height) if height is not None else aspect * w
    if not h > 0:
        raise ValueError(f"height must be positive inches; got {height!r}")
    return (w, h)


@contextlib.contextmanager
def style_context() -> Iterator[None]:
    """Context manager applying the gblr style sheet on top of the current rcParams."""
    import matplotlib.style

    with matplotlib.style.context(str(STYLE_PATH), after_reset=False):
        yield


def use_style() -> None:
    """Apply the gblr style sheet globally (e.g. for your own figures next to ours)."""
    import matplotlib.style

    matplotlib.style.use(str(STYLE_PATH))


def new_figure(width: str | float = "single", height: float | None = None, *,
               aspect: float = 0.72, **subplots: Any) -> Any:
    """A new pyplot-managed figure in the gblr style, and its axes.

    Must be called inside :func:`style_context` for the style to apply to the artists
    drawn afterwards. ``subplots`` go to :meth:`matplotlib.figure.Figure.subplots`.

    Returns
    -------
    (Figure, Axes or array of Axes)
    """
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=figsize(width, height, aspect=aspect))
    axes = fig.subplots(**subplots)
    return fig, axes


_VECTOR = {"pdf", "svg", "svgz", "eps", "ps"}


def save_figure(fig: Any, path: str | Path, dpi: int = 300, *, transparent: bool = False,
                tight: bool = False) -> Path:
    """Save ``fig`` for a paper: vector with embedded fonts, or PNG at ``dpi``.

    Parameters
    ----------
    fig : matplotlib.figure.Figure or Axes
        The figure (an Axes is taken to mean its figure).
    path : str or Path
        Output file; the suffix picks the format (``.pdf``, ``.svg``, ``.eps``, ``.png``, ...).
        Parent folders are created.
    dpi : int
        Resolution of raster output (PNG), and of raster parts (images) inside vector files.
    transparent : bool
        Transparent background.
    tight : bool
        Crop to the drawn content (``bbox_inches="tight"``). Off by default so the saved
        figure keeps the exact width it was made for (e.g. 3.3 in for a column).

    Returns
    -------
    Path
        The written file.

    Notes
    -----
    PDF and PostScript embed TrueType fonts (``fonttype 42``, editable text, accepted by
    publishers that reject Type 3 fonts); SVG stores glyphs as paths so it renders the same
    without the fonts installed. Creation dates are left out so the files are reproducible.
    """
    import matplotlib

    fig = root_figure(fig)
    path = Path(path)
    suffix = path.suffix.lower().lstrip(".")
    if not suffix:
        raise ValueError(f"path needs a suffix naming the format (.pdf, .svg, .png); got {path}")
    if not (isinstance(dpi, int) and dpi > 0):
        raise ValueError(f"dpi must be a positive int; got {dpi!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata: dict[str, Any] | None
    if suffix == "pdf":
        metadata = {"Creator": _creator(), "CreationDate": None}
    elif suffix in {"svg", "svgz"}:
        metadata = {"Creator": _creator(), "Date": None}
    elif suffix == "png":
        metadata = {"Software": _creator()}
    else:
        metadata = None
    rc = {"pdf.fonttype": 42, "ps.fonttype": 42, "svg.fonttype": "path", "svg.hashsalt": "gblr"}
    with matplotlib.rc_context(rc):
        kwargs: dict[str, Any] = {"dpi": dpi, "transparent": transparent}
        if metadata is not None:
            kwargs["metadata"] = metadata
        if tight:
            kwargs["bbox_inches"] = "tight"
            kwargs["pad_inches"] = 0.02
        fig.savefig(path, **kwargs)
    return path


def root_figure(obj: Any) -> Any:
    """The top-level :class:`~matplotlib.figure.Figure` of an Axes, SubFigure or Figure."""
    from matplotlib.figure import Figure

    for _ in range(16):
        if isinstance(obj, Figure):
            return obj
        parent = getattr(obj, "figure", None)
        if parent is None or parent is obj:
            break
        obj = parent
    raise TypeError(f"expected a matplotlib Figure, SubFigure or Axes; got {type(obj).__name__}")


def _creator() -> str:
    from .. import __version__

    return f"gblr_approx {__version__}"
