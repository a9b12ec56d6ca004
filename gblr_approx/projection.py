"""``project``: best approximation of a matrix in a format within a budget."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

from . import __version__
from .budget import resolve_budget
from .formats.base import StructuredMatrix, get_format, with_autograd
from .linalg import fallback_summary, recording_svd_fallbacks
from .validation import as_matrix

__all__ = ["project", "register_projection", "get_projection"]

#: format name -> fitter ``fn(W, budget_macs, **options) -> StructuredMatrix``, for formats
#: whose projection is an algorithm living outside ``formats/`` (GBLR, BLAST: ``fit/``).
_PROJECTIONS: dict[str, Callable[..., StructuredMatrix]] = {}


def register_projection(format_name: str, fn: Callable[..., StructuredMatrix]) -> None:
    """Register ``fn(W, budget, **options)`` as the projection of ``format_name``.

    The format class's ``project`` classmethod looks it up with :func:`get_projection`, so a
    format module need not import its fitter (``gblr_approx.fit`` registers GBLR's and
    BLAST's when the package is imported). Registering again replaces the previous one.
    """
    if not isinstance(format_name, str) or not format_name:
        raise TypeError(f"format_name must be a non-empty str; got {format_name!r}")
    if not callable(fn):
        raise TypeError(f"fn must be callable; got {type(fn).__name__}")
    _PROJECTIONS[format_name.lower()] = fn


def get_projection(format_name: str) -> Callable[..., StructuredMatrix]:
    """The projection registered for ``format_name`` (see :func:`register_projection`)."""
    key = str(format_name).lower()
    if key not in _PROJECTIONS:
        from . import fit  # noqa: F401  (registers the fitted formats' projections)
    if key not in _PROJECTIONS:
        raise LookupError(
            f"no projection registered for format {format_name!r}; "
            f"registered: {sorted(_PROJECTIONS)}"
        )
    return _PROJECTIONS[key]


@with_autograd
def project(
    W: Any, format: str, budget: float | int, *, gram: Any = None, **options: Any
) -> StructuredMatrix:
    """Best approximation of ``W`` in ``format`` with cost at most ``budget``.

    Without ``gram`` it minimises the weight error ``||W - A||_F``; with the input Gram
    ``G = X X^T = L L^T`` of calibration inputs ``X`` it minimises the output error
    ``||(W - A) L||_F = ||(W - A) X||_F`` (:mod:`gblr_approx.data_aware`: exact whitened SVD
    for low-rank, exact weighted least squares on the chosen support for block-sparse,
    block-coordinate refits for the others; never worse in output error than ``gram=None``).

    Parameters
    ----------
    W : torch.Tensor or numpy.ndarray, shape (m, n)
        Real matrix; float16/bfloat16 are computed in float32. The result lives on ``W``'s
        device with dtype float32 or float64.
    format : str
        One of ``"dense"``, ``"lowrank"``, ``"blocksparse"``, ``"blocklowrank"``,
        ``"monarch"``, ``"gblr"``, ``"blast"``.
    budget : float or int
        Float in (0, 1]: fraction of the dense cost ``m * n``; int >= 1: MACs.
    **options
        Format options, e.g. ``block_shape=(32, 32)`` (blocksparse), ``grid=(4, 4)``
        (blocklowrank), ``blocks``/``rank`` (monarch), ``blocks`` (blast); see each format's
        ``project`` docstring.
    gram : torch.Tensor or numpy.ndarray, shape (n, n), optional
        Input Gram matrix of the layer (see :func:`gblr_approx.nn.collect_grams`). With it,
        the options ``ridge`` (relative ridge added to ``G``, default ``1e-6``, see
        :mod:`gblr_approx.data_aware`), ``sweeps`` (refit passes, default 6) and ``scaled``
        (also fit the structure to ``W diag(G)^{1/2}``, default True) are accepted too.
        ``A.info["output_error"]`` is the relative output error ``||(W - A) L|| / ||W L||``.

    Returns
    -------
    StructuredMatrix
        With ``A.flops <= budget`` (MACs). ``A.info`` records the algorithm, options, the
        requested budget and the seconds spent.

    Raises
    ------
    ValueError
        Bad input, or a budget too small for the format (the message names the smallest
        feasible budget; the exception is a :class:`~gblr_approx.budget.InfeasibleBudgetError`).
    """
    W = as_matrix(W, "W")
    cls = get_format(format)
    m, n = W.shape
    b = resolve_budget(budget, m, n)
    t0 = time.perf_counter()
    with torch.no_grad(), recording_svd_fallbacks() as fallbacks:
        if gram is None:
            A = cls.project(W, b, **options)
        else:
            from .data_aware import project_data_aware

            A = project_data_aware(W, format, b, gram, **options)
    seconds = time.perf_counter() - t0
    if A.flops > b:  # pragma: no cover - a format bug; never hide it
        raise RuntimeError(f"{cls.__name__}.project exceeded the budget: {A.flops} > {b}")
    A.info = {
        **A.info,
        "format": cls.format_name,
        "budget": budget,
        "budget_macs": b,
        "seconds": seconds,
        "options": {k: jsonable_option(v) for k, v in options.items()},
        "version": __version__,
    }
    if gram is not None:
        A.info["options"]["gram"] = f"({n}, {n}) input Gram"
    if fallbacks:  # (an SVD that had to be retried: same mathematics, another LAPACK path)
        A.info["svd_fallbacks"] = fallback_summary(fallbacks)
    if A.flops > m * n:
        warnings.warn(
            f"the {cls.format_name} result costs {A.flops} MACs, more than the dense matrix "
            f"({m * n}); storing W densely would be cheaper",
            stacklevel=2,
        )
    return A


def jsonable_option(v: Any) -> Any:
    """An option value as JSON-friendly values (scalars, lists; anything else as its repr),
    the form results record their options in (``info["options"]``)."""
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [jsonable_option(x) for x in v]
    return repr(v)
