"""Input validation used at every public entry point.

Checks happen once, at the boundary; the numerical code inside trusts its inputs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["as_matrix", "as_operand", "check_positive_int", "check_pair", "count_nonfinite"]

_FLOAT_KINDS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _to_tensor(x: Any, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (str, bytes)):
        raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray; got {type(x).__name__}")
    if isinstance(x, np.ndarray) or np.isscalar(x) or isinstance(x, (list, tuple)):
        arr = np.asarray(x)
        if arr.dtype == object:
            raise TypeError(f"{name} must be a numeric array; got an object array")
        if arr.dtype.kind not in "biufc":
            raise TypeError(f"{name} must be a real floating-point array; got dtype {arr.dtype}")
        return torch.from_numpy(np.ascontiguousarray(arr))
    raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray; got {type(x).__name__}")


def _check_float(t: torch.Tensor, name: str) -> torch.Tensor:
    if t.is_complex():
        raise TypeError(f"{name} must be real; got complex dtype {t.dtype}")
    if t.dtype not in _FLOAT_KINDS:
        raise TypeError(
            f"{name} must have a floating-point dtype (float16, bfloat16, float32 or float64); "
            f"got {t.dtype}. Convert it first, e.g. W.float()"
        )
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    return t


def as_matrix(W: Any, name: str = "W") -> torch.Tensor:
    """Validate a matrix argument and return it as a float32/float64 torch tensor.

    Parameters
    ----------
    W : torch.Tensor or numpy.ndarray, shape (m, n)
        Real floating-point matrix. float16/bfloat16 are upcast to float32.
    name : str
        Argument name used in error messages.

    Raises
    ------
    TypeError
        Not an array, integer/bool/complex dtype.
    ValueError
        Not 2-D, empty, or containing NaN/Inf.
    """
    t = _to_tensor(W, name)
    if t.ndim != 2:
        raise ValueError(f"{name} must be a 2-D matrix; got {t.ndim}-D with shape {tuple(t.shape)}")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{name} must be non-empty; got shape {tuple(t.shape)}")
    t = _check_float(t, name)
    bad = count_nonfinite(t)
    if bad:
        raise ValueError(f"{name} contains {bad} NaN or Inf entries; all entries must be finite")
    return t.detach()


#: :func:`count_nonfinite` checks this many entries at a time (its boolean scratch is one byte
#: per entry). ``2**20``: a 4096 x 11008 layer is checked in 43 pieces of 1 MB instead of one
#: whole-layer temporary (measured: ``torch.isfinite`` on the whole layer peaked at about
#: 1.7x the layer's float32 size).
FINITE_CHECK_CHUNK: int = 2**20


def count_nonfinite(t: torch.Tensor, chunk: int = FINITE_CHECK_CHUNK) -> int:
    """Number of NaN/Inf entries of ``t`` (any shape), checked about ``chunk`` entries at a time.

    Extra memory: about ``chunk`` bytes (instead of temporaries the size of ``t``); one host
    synchronisation per chunk. A tensor with at most ``chunk`` entries is checked in one call.
    """
    if t.numel() <= chunk or t.ndim == 0:
        return 0 if bool(torch.isfinite(t).all()) else int((~torch.isfinite(t)).sum())
    flat = t.reshape(t.shape[0], -1)
    rows = max(1, chunk // max(1, flat.shape[1]))
    bad = 0
    for i in range(0, flat.shape[0], rows):
        part = flat[i : i + rows]
        if not bool(torch.isfinite(part).all()):
            bad += int((~torch.isfinite(part)).sum())
    return bad


def as_operand(X: Any, n: int, name: str = "X") -> tuple[torch.Tensor, bool]:
    """Validate the right operand of ``A @ X`` for an ``m x n`` operator.

    Returns the operand as a 2-D tensor ``(n, k)`` and whether it was a vector.
    """
    t = _to_tensor(X, name)
    if t.ndim not in (1, 2):
        raise ValueError(
            f"{name} must be a vector (n,) or a matrix (n, k); got shape {tuple(t.shape)}"
        )
    if t.shape[0] != n:
        raise ValueError(
            f"{name} has {t.shape[0]} rows but the operator has {n} columns; shapes do not match"
        )
    t = _check_float(t, name)
    is_vec = t.ndim == 1
    return (t.unsqueeze(1) if is_vec else t), is_vec


def check_positive_int(value: Any, name: str, minimum: int = 1) -> int:
    """Return ``value`` as an int, raising a clear error unless it is an integer >= minimum."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer >= {minimum}; got {value!r}")
    if int(value) < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {int(value)}")
    return int(value)


def check_pair(value: Any, name: str, minimum: int = 1) -> tuple[int, int]:
    """Accept an int or a pair of ints (each >= minimum) and return a pair."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        v = check_positive_int(value, name, minimum)
        return v, v
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return (
            check_positive_int(value[0], f"{name}[0]", minimum),
            check_positive_int(value[1], f"{name}[1]", minimum),
        )
    raise TypeError(f"{name} must be an int or a pair of ints (rows, cols); got {value!r}")
