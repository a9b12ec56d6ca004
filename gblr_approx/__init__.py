"""gblr_approx: structured matrix approximation (GBLR with Gaudi masks and friends)."""

__version__ = "0.1.0"

from . import datasets
from .budget import InfeasibleBudgetError, resolve_budget
from .formats import (
    FORMATS,
    BlockLowRank,
    BlockSparse,
    Dense,
    LowRank,
    Monarch,
    StructuredMatrix,
    get_format,
    load,
)
from .metrics import relative_error
from .projection import project

__all__ = [
    "__version__",
    "datasets",
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
    "relative_error",
    "project",
]
