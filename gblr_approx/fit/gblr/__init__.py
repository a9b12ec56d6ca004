"""Fitting GBLR matrices: every stage of :func:`fit_gblr` and the Gaudi path, in one place.

* :mod:`.candidates` -- exact embeddings of low-rank / block-sparse / block-low-rank starts;
* :mod:`.mixed` -- global low-rank plus grid blocks by alternating least squares;
* :mod:`.support` -- starts whose intervals follow the matrix's own support;
* :mod:`.intervals` -- structure learning by interval ALS (the default stage);
* :mod:`.blocks` -- exact block-coordinate descent on fixed rectangles;
* :mod:`.proximal` -- proximal-gradient refinement on the Gaudi (width, location)
  parameters, with exact least-squares factor updates (also used by
  :class:`gblr_approx.nn.GaudiGBLRLinear`);
* :mod:`.weighted` -- data-aware refits under an input Gram matrix;
* :mod:`.pipeline` -- :func:`fit_gblr`, which chains them and keeps the best hard iterate.
"""

from .pipeline import fit_gblr

__all__ = ["fit_gblr"]
