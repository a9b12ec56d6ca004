"""Gaudi (Gaussian-Dirichlet) masks and their hard (boxcar) limit.

A GBLR component lives on a cyclic interval of rows and a cyclic interval of columns. While
fitting, each interval is described by two real numbers, a *width* ``w`` in ``[0, 1]`` and a
*location* ``l`` (taken mod 1), both fractions of the side length ``n``. The Gaudi mask is
the smooth, differentiable indicator of that interval (math.md 2.1)::

    G[k] = w sinc(k w) / sinc(k / n) * exp(-i pi k (2 l + w - 1/n)) * exp(-k^2 / (2 sigma^2))
    g    = irfft(G, n, norm="forward"),        k = 0, 1, ..., n // 2

For whole-number ``w * n`` and ``l * n`` and ``sigma = inf`` it is *exactly* the 0/1 boxcar of
the cyclic interval ``{(L + t) mod n : t < W}`` (the division by ``sinc(k / n)`` turns the
continuous box into the sampled one). A finite ``sigma`` convolves the boxcar with a periodic
Gaussian of standard deviation ``n / (2 pi sigma)`` samples; the mass ``sum(g) = n * w`` is kept
for every ``sigma``.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

__all__ = ["gaudi_mask", "boxcar", "round_ste", "interval_indices"]


def _as_param(x: Any, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        if x.ndim > 1:
            raise ValueError(
                f"{name} must be a scalar or a 1-D tensor (K,); got shape {tuple(x.shape)}"
            )
        if x.is_complex() or not x.is_floating_point():
            raise TypeError(f"{name} must be a real floating-point tensor; got dtype {x.dtype}")
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name} contains NaN or Inf; widths and locations must be finite")
        return x
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a float or a 1-D float tensor; got {type(x).__name__}")
    if not math.isfinite(float(x)):
        raise ValueError(f"{name} must be finite; got {x}")
    return torch.tensor(float(x), dtype=torch.get_default_dtype())


def gaudi_mask(
    width: float | torch.Tensor,
    location: float | torch.Tensor,
    n: int,
    sigma: float | None = None,
) -> torch.Tensor:
    """Gaudi mask of a cyclic interval of a side of length ``n``.

    Parameters
    ----------
    width : float or Tensor (K,)
        Interval length as a fraction of ``n`` (``width * n`` entries), normally in ``[0, 1]``.
    location : float or Tensor (K,)
        Interval start as a fraction of ``n`` (taken mod 1).
    n : int
        Side length (rows or columns), ``n >= 1``.
    sigma : float or None
        Gaussian smoothing in frequency; ``None`` or ``inf`` means no Gaussian factor (the
        exact Dirichlet form). Larger ``sigma`` is sharper; the spatial blur has standard
        deviation ``n / (2 pi sigma)`` entries.

    Returns
    -------
    Tensor
        Shape ``(n,)`` for scalar inputs, ``(K, n)`` for ``(K,)`` inputs (scalars broadcast).
        Differentiable in ``width`` and ``location`` (autograd through ``irfft``). Python
        floats are computed in the default dtype; tensors keep their dtype (use float64 for
        exact boxcars to ~1e-13). Float16 and bfloat16 inputs are computed in float32 and
        the result is cast to their dtype.

    Notes
    -----
    Cost ``O(K n log n)``. For whole-number ``width * n``, ``location * n`` and no Gaussian the
    result equals :func:`boxcar` up to rounding; otherwise it is the band-limited
    interpolation between boxcars (with Gibbs ringing, values slightly outside ``[0, 1]``).
    """
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or int(n) < 1:
        raise ValueError(f"n must be an int >= 1 (side length); got {n!r}")
    n = int(n)
    w = _as_param(width, "width")
    loc = _as_param(location, "location")
    if sigma is not None:
        if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real) or not float(sigma) > 0:
            raise ValueError(f"sigma must be a positive float, inf or None; got {sigma!r}")
    out_dtype = torch.promote_types(w.dtype, loc.dtype)
    # float16/bfloat16 are computed in float32 and cast back (torch.complex and the CPU FFT
    # refuse them, and the phases pi k (2 l + w) would lose most of their accuracy at large k)
    dtype = out_dtype if out_dtype in (torch.float32, torch.float64) else torch.float32
    w, loc = torch.broadcast_tensors(w.to(dtype), loc.to(dtype))
    scalar = w.ndim == 0
    w = w.reshape(-1, 1)
    loc = loc.reshape(-1, 1)
    k = torch.arange(n // 2 + 1, dtype=dtype, device=w.device)
    amp = w * torch.sinc(k * w) / torch.sinc(k / n)
    if sigma is not None and math.isfinite(float(sigma)):
        amp = amp * torch.exp(-(k**2) / (2.0 * float(sigma) ** 2))
    phase = -math.pi * k * (2.0 * loc + w - 1.0 / n)
    spec = torch.complex(amp * torch.cos(phase), amp * torch.sin(phase))
    g = torch.fft.irfft(spec, n=n, dim=-1, norm="forward").to(out_dtype)
    return g[0] if scalar else g


def round_ste(x: torch.Tensor, n: int) -> torch.Tensor:
    """Round a fraction to the grid ``1/n`` with a straight-through gradient.

    Forward: ``round(x * n) / n`` (round half to even); backward: identity.
    """
    return x + (torch.round(x * n) / n - x).detach()


def interval_indices(start: int, width: int, n: int, device: Any = None) -> torch.Tensor:
    """Indices ``(start + t) mod n`` for ``t < width`` of a cyclic interval (LongTensor)."""
    return (int(start) + torch.arange(int(width), device=device)) % int(n)


def boxcar(
    width_entries: int | torch.Tensor,
    start: int | torch.Tensor,
    n: int,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Hard 0/1 mask of the cyclic interval ``{(start + t) mod n : t < width_entries}``.

    Parameters
    ----------
    width_entries : int or LongTensor (K,)
        Interval length in entries, ``0 <= width_entries <= n``.
    start : int or LongTensor (K,)
        First index (any integer; taken mod ``n``).
    n : int
        Side length.
    dtype : torch.dtype, optional
        Of the result (default: the default float dtype).

    Returns
    -------
    Tensor
        ``(n,)`` for ints, ``(K, n)`` for ``(K,)`` tensors:
        ``b[j] = 1 if (j - start) mod n < width_entries else 0``.
    """
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or int(n) < 1:
        raise ValueError(f"n must be an int >= 1 (side length); got {n!r}")
    n = int(n)
    W = torch.as_tensor(width_entries)
    L = torch.as_tensor(start)
    if W.is_floating_point() or L.is_floating_point():
        if not (bool(torch.all(W == torch.round(W))) and bool(torch.all(L == torch.round(L)))):
            raise ValueError(
                "boxcar takes whole-number width_entries and start (entries, not fractions)"
            )
        W, L = W.round().long(), L.round().long()
    if bool((W < 0).any()) or bool((W > n).any()):
        raise ValueError(f"width_entries must lie in [0, n={n}]; got {W.tolist()}")
    W, L = torch.broadcast_tensors(W, L)
    j = torch.arange(n, device=W.device)
    b = ((j - L.unsqueeze(-1)) % n) < W.unsqueeze(-1)
    return b.to(dtype or torch.get_default_dtype())
