"""Fitting structured matrices to dense matrices: one sub-package per fitted format.

* :mod:`.gblr` -- GBLR: embedded starts, interval ALS, block-coordinate descent and the
  proximal-gradient (Gaudi) path, chained by :func:`fit_gblr`;
* :mod:`.blast` -- BLAST: preconditioned alternating gradient descent, :func:`fit_blast`;
* :mod:`.result` -- :class:`FitResult`, what both return.

The format classes (:mod:`gblr_approx.formats`) never import this package: it registers the
two fitted projections with :func:`gblr_approx.projection.register_projection`, and
``GBLR.project`` / ``BLAST.project`` find them there.
"""

from ..projection import register_projection
from .blast import fit_blast
from .gblr import fit_gblr
from .result import FitResult

__all__ = ["fit_gblr", "fit_blast", "FitResult"]


def _project_gblr(W, budget, **options):
    return fit_gblr(W, budget, **options).matrix


def _project_blast(W, budget, **options):
    return fit_blast(W, budget, **options).matrix


# each fitted format's projection, found by the format classes through the registry
register_projection("gblr", _project_gblr)
register_projection("blast", _project_blast)
