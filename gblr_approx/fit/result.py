"""The result of a fit: the fitted matrix and its per-step history."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..formats.base import StructuredMatrix

__all__ = ["FitResult"]


@dataclass
class FitResult:
    """Outcome of :func:`gblr_approx.fit_gblr`.

    Attributes
    ----------
    matrix : StructuredMatrix
        The fitted matrix in hard form (a :class:`~gblr_approx.GBLR`), with
        ``matrix.flops <= budget`` always. It is the best hard iterate seen, not the last.
    history : list of dict
        One record per step, in order. Keys: ``step`` (int), ``stage`` (str: which part of
        the algorithm produced it, e.g. ``"init:lowrank"``, ``"bcd"``, ``"proximal"``),
        ``loss`` (squared relative Frobenius error of the iterate, float), ``rel_error``
        (relative Frobenius error of the *hard* iterate), ``flops`` (its cost in MACs),
        ``components`` (active components) and ``seconds`` (since the start).
        :meth:`history_frame` returns it as a :class:`pandas.DataFrame`.
    rel_error : float
        Relative Frobenius error ``||W - A||_F / ||W||_F`` of ``matrix``.
    budget : int
        The budget in MACs that was enforced.
    seconds : float
        Wall time of the fit.
    info : dict
        Options used and a summary (initialisation chosen, stages run).
    """

    matrix: StructuredMatrix
    history: list[dict[str, Any]] = field(default_factory=list)
    rel_error: float = float("nan")
    budget: int = 0
    seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)

    def history_frame(self) -> Any:
        """The history as a :class:`pandas.DataFrame` (one row per step)."""
        import pandas as pd

        return pd.DataFrame.from_records(self.history)

    def __repr__(self) -> str:
        return (
            f"FitResult(rel_error={self.rel_error:.4g}, flops={self.matrix.flops}, "
            f"budget={self.budget}, steps={len(self.history)}, seconds={self.seconds:.2f})"
        )
