"""The Gaudi mask for several smoothing levels against its hard (boxcar) limit."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ._common import figure_of, maybe_style, to_numpy
from .style import sequential_colors

__all__ = ["gaudi_mask", "boxcar"]


def boxcar(width: float, location: float, n: int) -> np.ndarray:
    """The hard mask: 1 on the cyclic interval of ``round(width*n)`` entries from
    ``round(location*n) mod n``, 0 elsewhere.

    Parameters
    ----------
    width, location : float
        Fractions of ``n`` (location taken mod 1).
    n : int
        Length of the side.

    Returns
    -------
    numpy.ndarray of float64, shape (n,)
    """
    W = int(np.round(width * n))
    L = int(np.round(location * n)) % n
    j = np.arange(n)
    return (((j - L) % n) < W).astype(np.float64)


def gaudi_mask(
    width: float = 0.25,
    location: float = 0.3,
    n: int = 128,
    sigmas: Sequence[float | None] = (2.0, 8.0, 32.0),
    ax: Any = None,
    *,
    show_boxcar: bool = True,
    legend: bool = True,
    fig_width: str | float = "single",
    height: float | None = None,
) -> Any:
    """Gaudi masks ``ga.gaudi_mask(width, location, n, sigma)`` for several ``sigma``, with the
    boxcar they converge to.

    Parameters
    ----------
    width, location : float
        Width and start of the interval as fractions of ``n`` (as in
        :func:`gblr_approx.gaudi_mask`); an interval running past the end wraps around.
    n : int
        Length of the side (number of rows or columns).
    sigmas : sequence of float or None
        Smoothing levels (frequency units: the mask is the boxcar blurred by a Gaussian of
        standard deviation about ``n / (2 pi sigma)`` entries); ``None`` means no Gaussian
        factor. Larger sigma is sharper.
    ax : matplotlib.axes.Axes, optional
        Axes to draw into (your style is kept); a new figure in the gblr style otherwise.
    show_boxcar : bool
        Draw the hard boxcar (black steps).
    legend : bool
        Legend naming each sigma.
    fig_width : {"single", "double"} or float
        Width of a new figure (``width`` is the mask's width here).
    height : float, optional
        Height of a new figure in inches.

    Returns
    -------
    matplotlib.figure.Figure
        One line per sigma (coloured from smooth to sharp), plus the boxcar line.
    """
    from .. import gaudi_mask as _gaudi_mask  # lazily: the mask lives in gblr_approx.gaudi

    if not (isinstance(n, (int, np.integer)) and n >= 2):
        raise ValueError(f"n must be an int >= 2; got {n!r}")
    if not 0.0 <= float(width) <= 1.0:
        raise ValueError(f"width must be a fraction in [0, 1]; got {width!r}")
    masks = []
    for s in sigmas:
        g = _gaudi_mask(float(width), float(location), int(n), sigma=s)
        masks.append((s, to_numpy(g).ravel()))
    j = np.arange(n)
    with maybe_style(ax is None):
        if ax is None:
            from .style import new_figure

            fig, ax = new_figure(fig_width, height)
        else:
            fig = figure_of(ax)
        finite = [s for s in sigmas if s is not None]
        order = sorted(finite)
        colors = dict(zip(order, sequential_colors(len(order), "plasma"), strict=True))
        if show_boxcar:
            ax.step(j, boxcar(float(width), float(location), int(n)), where="mid",
                    color="#000000", linewidth=0.9, label=r"boxcar ($\sigma = \infty$)",
                    zorder=3)
        for s, g in masks:
            if s is None:
                ax.plot(j, g, color="#777777", linestyle="--", linewidth=0.9,
                        label="no Gaussian factor")
            else:
                ax.plot(j, g, color=colors[s], label=rf"$\sigma = {float(s):g}$")
        ax.set_xlim(0, n - 1)
        ax.set_xlabel("index $j$")
        ax.set_ylabel("mask value")
        if legend and ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best")
    return fig
