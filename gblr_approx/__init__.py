"""gblr_approx: structured matrix approximation (GBLR with Gaudi masks and friends)."""

__version__ = "0.1.0"

from . import datasets, nn, plot
from .analysis import (
    SpectrumReport,
    block_energy,
    block_ranks,
    gblr_coverage,
    load_sweep,
    spectrum,
    sweep,
)
from .budget import InfeasibleBudgetError, resolve_budget
from .convert import convert
from .fit import FitResult, fit_gblr
from .formats import (
    BLAST,
    FORMATS,
    GBLR,
    BlockLowRank,
    BlockSparse,
    Dense,
    LowRank,
    Monarch,
    Permuted,
    StructuredMatrix,
    get_format,
    load,
)
from .gaudi import gaudi_mask
from .io import load_weights
from .metrics import relative_error
from .projection import project

__all__ = [
    "__version__",
    "datasets",
    "nn",
    "plot",
    "InfeasibleBudgetError",
    "resolve_budget",
    "FORMATS",
    "StructuredMatrix",
    "get_format",
    "load",
    "Dense",
    "LowRank",
    "BlockSparse",
    "BlockLowRank",
    "Monarch",
    "BLAST",
    "Permuted",
    "convert",
    "GBLR",
    "gaudi_mask",
    "fit_gblr",
    "FitResult",
    "relative_error",
    "project",
    "load_weights",
    "sweep",
    "load_sweep",
    "spectrum",
    "SpectrumReport",
    "block_energy",
    "block_ranks",
    "gblr_coverage",
]
