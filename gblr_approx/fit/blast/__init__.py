"""Fitting BLAST matrices (Lee, Kwon, Qu & Kim, NeurIPS 2024).

* :mod:`.factors` -- preconditioned alternating gradient descent on the factors ``U_i``,
  ``V_j``, ``s_ij`` of one block grid (math.md 6.5), batched or memory-frugal;
* :mod:`.pipeline` -- :func:`fit_blast`: block-grid choice, rank from the budget, the best grid.
"""

from .factors import BlastFitResult, balanced_splits, fit_blast_factors, spd_solve
from .pipeline import fit_blast

__all__ = ["fit_blast", "fit_blast_factors", "BlastFitResult", "balanced_splits", "spd_solve"]
