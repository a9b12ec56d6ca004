"""Structured matrix formats: one module per format, registered in :data:`FORMATS`."""

from .base import FORMATS, StructuredMatrix, get_format, load, register_format
from .dense import Dense
from .lowrank import LowRank

__all__ = [
    "FORMATS",
    "StructuredMatrix",
    "get_format",
    "load",
    "register_format",
    "Dense",
    "LowRank",
]
