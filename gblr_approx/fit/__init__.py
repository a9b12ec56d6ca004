"""Fitting GBLR matrices to dense matrices.

One algorithm per module:

* :mod:`.candidates` -- exact embeddings of low-rank / block-sparse / block-low-rank starts;
* :mod:`.mixed` -- global low-rank plus grid blocks by alternating least squares;
* :mod:`.blocks` -- exact block-coordinate descent on fixed rectangles;
* :mod:`.proximal` -- proximal-gradient refinement on the Gaudi (width, location)
  parameters, with exact least-squares factor updates;
* :mod:`.pipeline` -- :func:`fit_gblr`, which chains them and keeps the best hard iterate.
"""

from ..projection import register_projection
from .pipeline import fit_gblr
from .result import FitResult

__all__ = ["fit_gblr", "FitResult"]


def _project_gblr(W, budget, **options):
    return fit_gblr(W, budget, **options).matrix


def _project_blast(W, budget, **options):
    from ..formats.blast import fit_blast

    return fit_blast(W, budget, **options).matrix


# each fitted format's projection, found by the format classes through the registry
register_projection("gblr", _project_gblr)
register_projection("blast", _project_blast)
