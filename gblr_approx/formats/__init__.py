"""Structured matrix formats: one module per format, registered in :data:`FORMATS`."""

from .base import FORMATS, StructuredMatrix, get_format, load, register_format
from .blast import BLAST
from .blocklowrank import BlockLowRank
from .blocksparse import BlockSparse
from .dense import Dense
from .gblr import GBLR
from .lowrank import LowRank
from .monarch import Monarch
from .permuted import Permuted

__all__ = [
    "FORMATS",
    "StructuredMatrix",
    "get_format",
    "load",
    "register_format",
    "Dense",
    "LowRank",
    "BlockSparse",
    "BlockLowRank",
    "Monarch",
    "BLAST",
    "Permuted",
    "GBLR",
]
