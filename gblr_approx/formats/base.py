"""The :class:`StructuredMatrix` contract and the format registry.

Every format is an ``m x n`` linear operator with a known cost (MACs of one mat-vec). A format
subclass implements a handful of small hooks; everything user-facing (products, transpose,
device moves, saving) is defined once here.

Subclass hooks
--------------
``format_name`` (class attribute)
    Registry key, e.g. ``"lowrank"``.
``_tensors() -> dict[str, Tensor]``
    The stored numbers (and integer index tensors) that define the matrix.
``_config() -> dict``
    JSON-serialisable, non-tensor configuration (e.g. grid sizes).
``_from_state(tensors, config, shape)`` (classmethod)
    Rebuild an instance from the two dicts above.
``flops`` (property), ``to_dense()``, ``_matmul(X)`` with ``X`` of shape ``(n, k)``,
``_transpose()``; optional ``num_params`` (defaults to the float entries stored).
``project(W, budget, **options)`` (classmethod)
    Best approximation of a validated float tensor ``W`` within ``budget`` MACs (int).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..validation import as_operand

__all__ = ["StructuredMatrix", "register_format", "FORMATS", "get_format", "FORMAT_VERSION"]

FORMAT_VERSION = 1

#: Registry: format name -> class.
FORMATS: dict[str, type[StructuredMatrix]] = {}


def register_format(cls: type[StructuredMatrix]) -> type[StructuredMatrix]:
    """Class decorator adding a format to :data:`FORMATS` under ``cls.format_name``."""
    name = cls.format_name
    if not name:
        raise TypeError(f"{cls.__name__} must set format_name")
    FORMATS[name] = cls
    return cls


def get_format(name: str) -> type[StructuredMatrix]:
    """Return the class registered under ``name`` (case-insensitive, '-' and '_' ignored)."""
    if not isinstance(name, str):
        raise TypeError(f"format must be a string, one of {sorted(FORMATS)}; got {name!r}")
    key = name.lower().replace("-", "").replace("_", "")
    if key not in FORMATS:
        raise ValueError(f"unknown format {name!r}; known formats: {', '.join(sorted(FORMATS))}")
    return FORMATS[key]


class StructuredMatrix(ABC):
    """An ``m x n`` matrix stored in a structured format.

    Attributes
    ----------
    shape : tuple[int, int]
        ``(m, n)``: rows (outputs) by columns (inputs).
    dtype, device
        Of the stored floating-point tensors.
    flops : int
        Multiply-accumulates of one product ``A @ x`` using the structure.
    num_params : int
        Stored floating-point numbers.
    info : dict
        Provenance of how the matrix was obtained (algorithm, options, errors); saved with it.
    """

    format_name: ClassVar[str] = ""

    def __init__(self, shape: tuple[int, int]) -> None:
        self.shape = (int(shape[0]), int(shape[1]))
        self.info: dict[str, Any] = {}

    # ----------------------------------------------------------------- hooks
    @abstractmethod
    def _tensors(self) -> dict[str, torch.Tensor]: ...

    def _config(self) -> dict[str, Any]:
        return {}

    @classmethod
    @abstractmethod
    def _from_state(
        cls, tensors: dict[str, torch.Tensor], config: dict[str, Any], shape: tuple[int, int]
    ) -> StructuredMatrix: ...

    @property
    @abstractmethod
    def flops(self) -> int: ...

    @abstractmethod
    def to_dense(self) -> torch.Tensor:
        """Return the matrix as a dense ``(m, n)`` tensor."""

    @abstractmethod
    def _matmul(self, X: torch.Tensor) -> torch.Tensor:
        """``A @ X`` for ``X`` of shape ``(n, k)`` (already validated, same dtype/device)."""

    @abstractmethod
    def _transpose(self) -> StructuredMatrix: ...

    @classmethod
    def project(cls, W: torch.Tensor, budget: int, **options: Any) -> StructuredMatrix:
        raise NotImplementedError(f"format {cls.format_name!r} has no projection")

    @classmethod
    def min_budget(cls, m: int, n: int, **options: Any) -> int:
        """Smallest cost (MACs) of any non-trivial matrix of this format for an m x n shape."""
        return 1

    # ------------------------------------------------------- derived members
    def _float_tensors(self) -> list[torch.Tensor]:
        return [t for t in self._tensors().values() if t.is_floating_point()]

    @property
    def dtype(self) -> torch.dtype:
        ts = self._float_tensors()
        return ts[0].dtype if ts else torch.get_default_dtype()

    @property
    def device(self) -> torch.device:
        ts = self._float_tensors()
        return ts[0].device if ts else torch.device("cpu")

    @property
    def num_params(self) -> int:
        return int(sum(t.numel() for t in self._float_tensors()))

    @property
    def T(self) -> StructuredMatrix:  # noqa: N802 - mirrors torch/numpy
        """Transpose, in the same format where the format allows it."""
        return self._transpose()

    def __matmul__(self, X: Any) -> torch.Tensor:
        X2, is_vec = as_operand(X, self.shape[1], "X")
        X2 = X2.to(device=self.device, dtype=self.dtype)
        Y = self._matmul(X2)
        return Y[:, 0] if is_vec else Y

    def __rmatmul__(self, X: Any) -> torch.Tensor:
        # X @ A = (A^T @ X^T)^T
        t = X if isinstance(X, torch.Tensor) else torch.as_tensor(X)
        if t.ndim == 1:
            return self.T @ t
        return (self.T @ t.T).T

    def matvec(self, x: Any) -> torch.Tensor:
        """Alias of ``A @ x``."""
        return self @ x

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> StructuredMatrix:
        """Copy to another device and/or floating dtype (index tensors keep their dtype)."""
        new = {}
        for k, t in self._tensors().items():
            if t.is_floating_point():
                new[k] = t.to(device=device, dtype=dtype)
            else:
                new[k] = t.to(device=device)
        out = type(self)._from_state(new, self._config(), self.shape)
        out.info = dict(self.info)
        return out

    def __repr__(self) -> str:
        m, n = self.shape
        cfg = ", ".join(f"{k}={v}" for k, v in self._config().items() if not isinstance(v, list))
        cfg = f", {cfg}" if cfg else ""
        return (
            f"{type(self).__name__}(shape=({m}, {n}){cfg}, flops={self.flops} "
            f"({self.flops / (m * n):.1%} of dense), dtype={self.dtype})"
        )

    # ------------------------------------------------------------------- I/O
    def save(self, path: str | Path) -> Path:
        """Save to one ``.safetensors`` file.

        The metadata holds the format name, shape, format version, the configuration and
        ``info``; loading with :func:`gblr_approx.load` is bit-exact.
        """
        from safetensors.torch import save_file

        from .. import __version__

        path = Path(path)
        tensors = {k: t.detach().contiguous().cpu() for k, t in self._tensors().items()}
        meta = {
            "format": self.format_name,
            "shape": json.dumps(list(self.shape)),
            "format_version": str(FORMAT_VERSION),
            "config": json.dumps(self._config()),
            "info": json.dumps(self.info, default=str),
            "gblr_approx_version": __version__,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata=meta)
        return path


def load(path: str | Path, device: torch.device | str | None = None) -> StructuredMatrix:
    """Load a structured matrix saved with :meth:`StructuredMatrix.save`.

    Parameters
    ----------
    path : str or Path
        A ``.safetensors`` file written by ``save``.
    device : optional
        Device to place the tensors on (default CPU).
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            # clone: the tensors read sit at unaligned offsets of the file buffer, where BLAS
            # takes other kernels and products differ from the saved matrix's in the last bit
            tensors = {k: f.get_tensor(k).clone() for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types
        raise ValueError(f"{path} is not a readable .safetensors file: {exc}") from exc
    fmt = str(meta.get("format", ""))
    if fmt.lower().replace("-", "").replace("_", "") not in FORMATS:
        what = f"its metadata says format={fmt!r}, " if fmt else "it has no 'format' metadata, "
        raise ValueError(
            f"{path} is a weights file ({len(tensors)} tensors; {what}not a structured matrix "
            "written by StructuredMatrix.save); read it with gblr_approx.load_weights(path)"
        )
    damaged = f"{path} is a damaged {fmt} file (edited or not written by StructuredMatrix.save)"
    if "shape" not in meta:
        raise ValueError(f"{damaged}: its metadata has no 'shape'")
    try:
        version = int(meta.get("format_version", "1"))
        shape = tuple(json.loads(meta["shape"]))
        config = json.loads(meta.get("config", "{}"))
        info = json.loads(meta.get("info", "{}"))
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{damaged}: unreadable metadata: {exc}") from exc
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{path} uses format version {version}; this gblr_approx reads up to {FORMAT_VERSION}"
        )
    try:
        out = get_format(fmt)._from_state(tensors, config, shape)
    except KeyError as exc:
        raise ValueError(f"{damaged}: tensor or setting {exc.args[0]!r} is missing; it holds "
                         f"{', '.join(sorted(tensors)) or 'no tensors'}") from exc
    except (ValueError, TypeError, RuntimeError, IndexError) as exc:
        raise ValueError(f"{damaged}: {' '.join(str(exc).split())}") from exc
    if tuple(out.shape) != shape:
        raise ValueError(f"{damaged}: its metadata says shape {list(shape)} but its tensors "
                         f"make a {out.shape[0]}x{out.shape[1]} matrix")
    out.info = info
    if device is not None:
        out = out.to(device=device)
    return out
