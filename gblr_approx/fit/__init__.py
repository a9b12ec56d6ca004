"""Fitting GBLR matrices to dense matrices.

One algorithm per module:

* :mod:`.candidates` -- exact embeddings of low-rank / block-sparse / block-low-rank starts;
* :mod:`.mixed` -- global low-rank plus grid blocks by alternating least squares;
* :mod:`.blocks` -- exact block-coordinate descent on fixed rectangles;
* :mod:`.proximal` -- proximal gradient on the Gaudi (width, location) parameters;
* :mod:`.pipeline` -- :func:`fit_gblr`, which chains them and keeps the best hard iterate.
"""

from .pipeline import fit_gblr
from .result import FitResult

__all__ = ["fit_gblr", "FitResult"]
