"""Publication-quality figures (``ga.plot``).

One module per figure family, one shared style (:mod:`gblr_approx.plot.style`):

=====================  ===========================================================
:func:`error_vs_budget`  relative error against budget fraction, one curve per format
:func:`layer_grid`       the same, one small panel per layer of a model
:func:`spectrum`         normalised singular values (log) and energy curves
:func:`gblr_layout`      GBLR component rectangles over the matrix, overlaps shaded
:func:`gaudi_mask`       a Gaudi mask for several sigma against its boxcar
:func:`block_energy`     heat map of the energy share of each block of a grid
:func:`budget_allocation`  per-layer cost chosen by compress_model, a sweep or fits, as bars
:func:`save_figure`      PDF/SVG with embedded fonts, or PNG at a chosen dpi
=====================  ===========================================================

Conventions
-----------
* Every plotting function returns the :class:`matplotlib.figure.Figure` it drew into and never
  calls ``plt.show()``.
* Every plotting function takes ``ax=``: without it a new figure is made in the shipped style
  (sized for a single 3.3 in column, or ``width="double"`` for 7 in); with it, the drawing goes
  into your axes and your style is kept.
* A format has the same colour, marker and name in every figure
  (:data:`~gblr_approx.plot.style.FORMAT_COLORS`, Okabe-Ito colour-blind-safe palette).
* ``import gblr_approx`` does not import :mod:`matplotlib.pyplot`; the figure functions do,
  when called.
"""

from .allocation import budget_allocation
from .blocks import allocation_table, block_energy
from .error_budget import error_vs_budget
from .layer_grid import layer_grid, layer_grid_pages
from .layout import component_rectangles, coverage, gblr_layout
from .masks import gaudi_mask
from .spectrum import singular_values_of, spectrum
from .style import (
    FORMAT_COLORS,
    FORMAT_LABELS,
    FORMAT_MARKERS,
    STYLE_PATH,
    WIDTHS,
    figsize,
    format_color,
    format_label,
    format_marker,
    save_figure,
    style_context,
    use_style,
)

__all__ = [
    "error_vs_budget",
    "layer_grid",
    "layer_grid_pages",
    "spectrum",
    "gblr_layout",
    "gaudi_mask",
    "block_energy",
    "budget_allocation",
    "save_figure",
    "allocation_table",
    "component_rectangles",
    "coverage",
    "singular_values_of",
    "FORMAT_COLORS",
    "FORMAT_LABELS",
    "FORMAT_MARKERS",
    "STYLE_PATH",
    "WIDTHS",
    "figsize",
    "format_color",
    "format_label",
    "format_marker",
    "style_context",
    "use_style",
]
