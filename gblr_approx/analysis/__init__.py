"""Analysis of weight matrices and checkpoints: error-versus-budget sweeps, spectra, structure."""

from .spectrum import SpectrumReport, spectrum
from .structure import (
    BlockEnergy,
    BlockRanks,
    GBLRCoverage,
    block_energy,
    block_ranks,
    gblr_coverage,
)
from .sweep import COLUMNS, CONTRACT_COLUMNS, default_formats, load_sweep, sweep

__all__ = [
    "sweep",
    "load_sweep",
    "default_formats",
    "COLUMNS",
    "CONTRACT_COLUMNS",
    "spectrum",
    "SpectrumReport",
    "block_energy",
    "block_ranks",
    "gblr_coverage",
    "BlockEnergy",
    "BlockRanks",
    "GBLRCoverage",
]
