"""Torch modules: structured drop-in replacements for :class:`torch.nn.Linear`.

:class:`StructuredLinear` wraps any :class:`~gblr_approx.StructuredMatrix`; its floating-point
tensors become trainable :class:`torch.nn.Parameter` objects, and the forward pass uses the
structured product (never the dense matrix). :func:`compress_linear` and :func:`compress_model`
project pretrained ``nn.Linear`` layers into a format at a budget.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .formats.base import StructuredMatrix, get_format
from .metrics import relative_error
from .projection import project

__all__ = [
    "StructuredLinear",
    "compress_linear",
    "compress_model",
    "collect_grams",
    "save_compressed",
    "load_compressed",
    "layer_sensitivity",
    "distill",
]


class StructuredLinear(nn.Module):
    """``y = x @ A.T + bias`` with ``A`` stored in a structured format.

    Parameters
    ----------
    matrix : StructuredMatrix, shape (out_features, in_features)
        Its floating-point tensors become parameters of this module (trainable); integer index
        tensors and the configuration (intervals, grids) stay fixed.
    bias : Tensor of shape (out_features,), optional

    Notes
    -----
    Cost per input row: ``matrix.flops`` MACs (plus ``out_features`` additions for the bias).
    Inputs of shape ``(..., in_features)`` are flattened to ``(N, in_features)``; floating-point
    inputs of another dtype are cast to the layer's, integer, bool and complex inputs raise
    ``TypeError``.
    """

    def __init__(self, matrix: StructuredMatrix, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if not isinstance(matrix, StructuredMatrix):
            raise TypeError(f"matrix must be a StructuredMatrix; got {type(matrix).__name__}")
        self.format_name = matrix.format_name
        self.out_features, self.in_features = matrix.shape
        self._config = matrix._config()
        self.info = dict(matrix.info)
        self._names: list[str] = []
        if bias is not None and bias.shape != (self.out_features,):
            raise ValueError(
                f"bias must have shape ({self.out_features},); got {tuple(bias.shape)}"
            )
        # normal tensors even when built under torch.inference_mode(): inference tensors have
        # no version counter, so the inference caches could not be kept (2-4x slower
        # forwards) and the layer could not be trained later
        with torch.inference_mode(False):
            for name, t in matrix._tensors().items():
                key = f"factor_{name}"
                if t.is_floating_point():
                    self.register_parameter(key, nn.Parameter(t.detach().clone()))
                else:
                    self.register_buffer(key, t.detach().clone())
                self._names.append(name)
            if bias is not None:
                self.bias = nn.Parameter(bias.detach().clone())
            else:
                self.register_parameter("bias", None)

    @property
    def matrix(self) -> StructuredMatrix:
        """The current structured matrix (sharing storage with the parameters)."""
        tensors = dict(zip(self._names, self._factor_tensors(), strict=True))
        cls = get_format(self.format_name)
        return cls._from_state(tensors, self._config, (self.out_features, self.in_features))

    def _factor_tensors(self) -> list[torch.Tensor]:
        """The ``factor_*`` parameters and buffers, in ``_names`` order (direct dictionary
        lookups: ``nn.Module.__getattr__`` costs ~1.5 us per name, a tenth of a small
        product on the inference path)."""
        params, buffers = self._parameters, self._buffers
        return [params[k] if k in params else buffers[k] for k in self._factor_keys()]

    def _factor_keys(self) -> list[str]:
        """``factor_<name>`` for each of ``_names`` (built once; layers pickled before it
        existed build it on first use)."""
        keys = self.__dict__.get("_keys")
        if keys is None or len(keys) != len(self._names):
            keys = [f"factor_{name}" for name in self._names]
            self.__dict__["_keys"] = keys
        return keys

    def _forward_matrix(self) -> StructuredMatrix:
        """:attr:`matrix`, cached while no gradient is needed (inference).

        Rebuilding the matrix object costs more than a small product, so inference reuses it
        until a parameter changes (in place, or replaced by ``.to()`` / ``load_state_dict``).
        With gradients on, the matrix is rebuilt
        at every call so that autograd sees fresh operations on the parameters. Edits through
        ``p.data`` do not bump the version counter: :meth:`clear_cache` then drops the cache.
        """
        tensors = self._factor_tensors()
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            self.__dict__["_matrix_cache"] = None
            return self.matrix
        try:
            # (pointer, version) per tensor: the cache holds the tensors it was built from,
            # so their storage stays alive and a replacement (``.to()``, a new parameter,
            # ``load_state_dict(assign=True)``) cannot reuse a pointer; in-place changes bump
            # the version. ~2 us for GBLR's 8 tensors (the dtype/device/shape key cost ~8 us)
            key = [(t.data_ptr(), t._version) for t in tensors]
        except RuntimeError:  # inference tensors (e.g. after .to() in inference mode) have
            return self.matrix  # no version counter to see an in-place change by: not cached
        key.append(torch.is_inference_mode_enabled())
        cache = self.__dict__.get("_matrix_cache")
        if cache is None or cache[0] != key:
            cache = (key, self.matrix, tensors)
            self.__dict__["_matrix_cache"] = cache
        return cache[1]

    def clear_cache(self) -> None:
        """Drop the cached matrix and what its products cached (layouts, packed panels, plans).

        Forwards without autograd reuse the matrix built from the parameters, and the formats
        reuse layouts of the stored numbers, until a parameter's version counter changes or
        a parameter is replaced. That covers in-place edits of the parameters themselves
        (``with torch.no_grad(): p.mul_(2)``, ``p.detach().mul_(2)``, ``p.copy_(...)``),
        optimizer steps and ``load_state_dict``. An in-place edit through ``p.data``
        (``p.data.mul_(2)``, as EMA and weight-clipping code often does) bypasses the version
        counter: call this method after it, or the next forwards without autograd keep using
        the old numbers. Cost: the next forward rebuilds the matrix (and its caches) once.
        """
        cache = self.__dict__.pop("_matrix_cache", None)
        if cache is not None:
            cache[1]._drop_caches()

    @property
    def flops(self) -> int:
        """MACs of one input row."""
        return self.matrix.flops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"input has {x.shape[-1]} features but the layer expects {self.in_features}"
            )
        if not x.is_floating_point():  # (a cast would hide a bug upstream; nn.Linear raises)
            raise TypeError(f"input must be a real floating-point tensor; got {x.dtype}")
        lead = x.shape[:-1]
        A = self._forward_matrix()
        bias = self._parameters["bias"]  # (not self.bias: Module.__getattr__ costs ~1.5 us)
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype != A.dtype:
            x2 = x2.to(A.dtype)
        if A._linear is not None and (bias is None or bias.dtype == A.dtype):
            # the format's fused x A^T + bias (low-rank: nn.Linear's addmm), if it has one here
            Y = A._linear(x2, bias)
            if Y is not None:
                return Y.reshape(*lead, self.out_features) if len(lead) != 1 else Y
        Y = A._matmul(x2.T).T
        if not Y.is_contiguous():
            Y = _row_major(Y, bias)
        elif bias is not None:
            Y = Y + bias
        return Y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"format={self.format_name}, flops={self.flops}, bias={self.bias is not None}"
        )


def _row_major(Y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``Y + bias`` stored row-major, for a ``(batch, features)`` product ``Y`` that a format
    returned as a strided view (GBLR's plans write ``(features, batch)``; padded layouts
    return a slice).

    ``nn.Linear``'s output is row-major, and kernels downstream expect that: on the CPU,
    ``scaled_dot_product_attention`` takes its flash kernel only for a unit last-dimension
    stride, and on a transposed view it falls back to the unfused math path (MiniLM
    encode with GBLR layers: 12 flash calls, 153 ms, became bmm + softmax + masking, 266
    ms). Without autograd the bias add writes the row-major result itself (one pass);
    with it, a copy and an in-place add.
    """
    if torch.is_grad_enabled() and (Y.requires_grad or (bias is not None and bias.requires_grad)):
        Y = Y.contiguous()
        return Y if bias is None else Y.add_(bias)
    dtype = Y.dtype if bias is None else torch.result_type(Y, bias)  # (as Y + bias)
    out = torch.empty(Y.shape, dtype=dtype, device=Y.device)
    if bias is None:
        return out.copy_(Y)
    return torch.add(Y, bias, out=out)


def compress_linear(
    layer: nn.Linear, format: str, budget: float | int, **options: Any
) -> StructuredLinear:
    """Project an ``nn.Linear`` weight into ``format`` within ``budget``.

    Returns a :class:`StructuredLinear` whose ``info`` records the relative Frobenius error.
    """
    if not isinstance(layer, nn.Linear):
        raise TypeError(f"layer must be a torch.nn.Linear; got {type(layer).__name__}")
    W = layer.weight.detach()
    A = project(W, format, budget, **options)
    A.info["rel_error"] = relative_error(W, A)
    bias = layer.bias.detach() if layer.bias is not None else None
    return StructuredLinear(A.to(dtype=W.dtype), bias)


# model-level compression lives in its own modules (data-aware, global allocation, I/O)
from .calibration import collect_grams  # noqa: E402
from .compress import compress_model  # noqa: E402
from .compressed import load_compressed, save_compressed  # noqa: E402
from .finetune import distill  # noqa: E402
from .gaudi_linear import GaudiGBLRLinear, gaudi_model  # noqa: E402, I001 (trainable Gaudi-GBLR)
from .sensitivity import layer_sensitivity  # noqa: E402

__all__ += ["GaudiGBLRLinear", "gaudi_model"]
