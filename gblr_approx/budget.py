"""Cost units and budget parsing.

The one cost unit of the toolkit is the number of multiply-accumulates (MACs) of one
matrix-vector product ``y = A @ x`` when the structure of ``A`` is used. A dense
``m x n`` matrix costs ``m * n`` MACs.

A *budget* is given either as a float in ``(0, 1]`` (a fraction of the dense cost) or as an
int ``>= 1`` (an absolute number of MACs). :func:`resolve_budget` turns either form into an
absolute MAC count.
"""

from __future__ import annotations

import math
import numbers

__all__ = ["InfeasibleBudgetError", "resolve_budget", "budget_fraction"]


class InfeasibleBudgetError(ValueError):
    """No matrix of the requested format fits the budget.

    Attributes
    ----------
    budget : int
        The requested budget in MACs.
    min_budget : int
        The smallest budget (MACs) for which the format has a feasible configuration.
    """

    def __init__(self, fmt: str, budget: int, min_budget: int, detail: str = "") -> None:
        self.format = fmt
        self.budget = int(budget)
        self.min_budget = int(min_budget)
        msg = (
            f"budget={budget} MACs is too small for format {fmt!r}: the smallest feasible "
            f"budget is {min_budget} MACs"
        )
        if detail:
            msg += f" ({detail})"
        super().__init__(msg)


def resolve_budget(budget: float | int, m: int, n: int) -> int:
    """Convert a budget into an absolute number of MACs.

    Parameters
    ----------
    budget : float or int
        A float in ``(0, 1]`` is a fraction of the dense cost ``m * n``; an int ``>= 1`` is an
        absolute MAC count (it may exceed ``m * n``, which then simply allows dense storage).
    m, n : int
        Shape of the matrix.

    Returns
    -------
    int
        The budget in MACs, ``floor(fraction * m * n)`` for fractions.

    Raises
    ------
    TypeError
        If ``budget`` is not a real number (bools are rejected).
    ValueError
        If ``budget`` is a float outside ``(0, 1]``, an int below 1, or not finite.
    """
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real):
        raise TypeError(
            f"budget must be a float in (0, 1] (fraction of the dense cost) or an int >= 1 "
            f"(MACs); got {budget!r} of type {type(budget).__name__}"
        )
    if isinstance(budget, numbers.Integral):
        b = int(budget)
        if b < 1:
            raise ValueError(f"budget must be an int >= 1 (MACs) or a float in (0, 1]; got {b}")
        return b
    f = float(budget)
    if not math.isfinite(f) or f <= 0.0 or f > 1.0:
        raise ValueError(
            f"budget as a float is a fraction of the dense cost and must lie in (0, 1]; got {f}. "
            "Pass an int for an absolute number of MACs."
        )
    return max(int(math.floor(f * m * n + 1e-9)), 1) if f < 1.0 else m * n


def budget_fraction(flops: int, m: int, n: int) -> float:
    """Achieved cost as a fraction of the dense cost ``m * n``."""
    return float(flops) / float(m * n)
