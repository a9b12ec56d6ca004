"""Planning a sweep: checked arguments, the matrices to read, and one task per fit.

A :class:`Plan` holds the matrices (:class:`Source`: a tensor in memory, or a tensor's name
and checkpoint file, read later by whichever process fits it), the formats, budgets, options
and seed; :meth:`Plan.tasks` yields one :class:`Task` per (matrix, format, budget), in that
nesting order. Tasks are small and picklable: a checkpoint tensor travels as its file path
and name, never as values.

Data identity
-------------
:func:`tensor_hash` is a BLAKE2b digest of a tensor's bytes as stored (its dtype and shape
included). It is computed from a tensor already in memory — by the fitting process right after
it reads the tensor, or here for in-memory inputs — so it never costs an extra read of a
file. :func:`file_stat` is the cheap ``stat`` signature (device, inode, size, modification and
change times) under which a recorded hash is trusted without reading the tensor again.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import numbers
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..budget import resolve_budget
from ..formats.base import FORMATS, StructuredMatrix, get_format
from ..validation import as_matrix

__all__ = [
    "DEFAULT_BUDGETS",
    "Plan",
    "Source",
    "Task",
    "budget_text",
    "check_budgets",
    "check_formats",
    "check_options",
    "default_formats",
    "file_stat",
    "options_text",
    "parse_budget_text",
    "read_source",
    "sources_of",
    "tensor_hash",
]

#: Budgets used when none are given (fractions of the dense cost).
DEFAULT_BUDGETS = (0.1, 0.25, 0.5)
#: Formats tried by default, in this order, when registered.
_DEFAULT_FORMAT_ORDER = ("lowrank", "blocksparse", "blocklowrank", "monarch", "gblr")


# ------------------------------------------------------------------------------ formats
def _has_projection(cls: type[StructuredMatrix]) -> bool:
    return cls.project.__func__ is not StructuredMatrix.project.__func__


def default_formats() -> list[str]:
    """Registered formats a default sweep uses: lowrank, blocksparse, blocklowrank, monarch,
    gblr (those that are registered and have a projection)."""
    return [f for f in _DEFAULT_FORMAT_ORDER if f in FORMATS and _has_projection(FORMATS[f])]


def takes_seed(cls: type[StructuredMatrix]) -> bool:
    """Whether ``cls.project`` takes ``seed=``: a named parameter, or documented in its
    docstring when it forwards ``**options`` (e.g. GBLR to ``fit_gblr``)."""
    params = inspect.signature(cls.project).parameters
    if "seed" in params:
        return True
    forwards = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return forwards and "``seed``" in (cls.project.__doc__ or "")


def check_formats(formats: str | Iterable[str] | None) -> list[str]:
    """Canonical format names, in order, without repeats (ValueError for unknown ones)."""
    if formats is None:
        names = default_formats()
    else:
        names = [formats] if isinstance(formats, str) else list(formats)
    if not names:
        raise ValueError("formats is empty; give at least one format name")
    canon: list[str] = []
    for f in names:
        cls = get_format(f)  # ValueError listing the known formats
        if not _has_projection(cls):
            raise ValueError(f"format {f!r} has no projection and cannot be swept")
        if cls.format_name not in canon:
            canon.append(cls.format_name)
    return canon


def check_options(
    options: Mapping[str, Mapping[str, Any]] | None, formats: list[str]
) -> dict[str, dict[str, Any]]:
    """``options`` keyed by canonical format name; each must be a format that is swept."""
    opts: dict[str, dict[str, Any]] = {}
    for k, v in (options or {}).items():
        name = get_format(k).format_name
        if name not in formats:
            raise ValueError(
                f"options given for format {k!r}, which is not among the formats swept {formats}"
            )
        if not isinstance(v, Mapping):
            raise TypeError(f"options[{k!r}] must be a dict of keyword options; got {v!r}")
        opts[name] = dict(v)
    return opts


# ------------------------------------------------------------------------------ budgets
def _check_budget(b: Any) -> float | int:
    if isinstance(b, np.integer):
        b = int(b)
    elif isinstance(b, np.floating):
        b = float(b)
    if isinstance(b, bool) or not isinstance(b, numbers.Real):
        raise TypeError(
            f"budgets must be floats in (0, 1] (fractions of the dense cost) or ints >= 1 "
            f"(MACs); got {b!r} of type {type(b).__name__}"
        )
    resolve_budget(b, 1, 1)  # range checks with the standard message
    return int(b) if isinstance(b, numbers.Integral) else float(b)


def check_budgets(budgets: float | int | Iterable[float | int]) -> list[float | int]:
    """Budgets as Python floats (fractions) and ints (MACs), in order, without repeats."""
    if isinstance(budgets, (numbers.Real, np.number)) and not isinstance(budgets, bool):
        budgets = [budgets]
    out: list[float | int] = []
    for b in budgets:
        b = _check_budget(b)
        if not any(budget_text(b) == budget_text(x) for x in out):
            out.append(b)
    if not out:
        raise ValueError("budgets is empty; give at least one budget")
    return out


def budget_text(b: float | int) -> str:
    """The budget as written in ``rows.csv`` and in row keys (``repr``: ``0.25``, ``200``)."""
    return repr(b)


def parse_budget_text(s: str) -> float | int:
    """Inverse of :func:`budget_text` (an int stays an int, a float a float)."""
    s = s.strip()
    if any(c in s.lower() for c in ".en"):  # "0.25", "1e-05", "nan", "inf"
        return float(s)
    return int(s)


def jsonable(v: Any) -> Any:
    """``v`` with numbers as Python numbers, tuples as lists and anything else as its repr."""
    if isinstance(v, (str, bool)) or v is None:
        return v
    if isinstance(v, numbers.Integral):
        return int(v)
    if isinstance(v, numbers.Real):
        return float(v)
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, Mapping):
        return {str(k): jsonable(x) for k, x in v.items()}
    return repr(v)


def options_text(opts: Mapping[str, Any]) -> str:
    """Format options as sorted-key JSON (the ``options`` column and part of a row's key)."""
    return json.dumps(jsonable(dict(opts)), sort_keys=True)


# ------------------------------------------------------------------------- data identity
def tensor_hash(t: torch.Tensor) -> str:
    """BLAKE2b (96-bit) digest of a tensor's values as stored, with its shape and dtype.

    One pass over the tensor's memory (about 1 GB/s); no copy unless it is not contiguous.
    """
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
    h = hashlib.blake2b(raw.numpy().reshape(-1).view(np.uint8), digest_size=12)
    h.update(f"{tuple(t.shape)}{t.dtype}".encode())
    return "sha:" + h.hexdigest()


def file_stat(path: str | os.PathLike) -> list[int]:
    """``[device, inode, size, mtime_ns, ctime_ns]`` of a file: any rewrite changes it."""
    st = os.stat(path)
    return [int(st.st_dev), int(st.st_ino), int(st.st_size), int(st.st_mtime_ns),
            int(st.st_ctime_ns)]


# ------------------------------------------------------------------------------- sources
@dataclass
class Source:
    """One matrix to sweep.

    Either ``tensor`` (held in memory; ``data_hash`` known) or ``path`` + ``name`` (a tensor
    of that checkpoint file, read by the process that fits it; ``data_hash`` is computed when
    it is read; ``stat`` is the file's :func:`file_stat` when the sweep was planned).
    """

    name: str
    shape: tuple[int, int]
    dtype: str
    tensor: torch.Tensor | None = None
    path: str | None = None
    reshape_conv: bool = False
    data_hash: str | None = None
    stat: list[int] | None = None


_STORES: dict[tuple[str, bool], Any] = {}


def read_source(src: Source) -> torch.Tensor:
    """The tensor of ``src`` as stored (one tensor read from its file; the open file's header
    is kept for the next read from the same file)."""
    if src.tensor is not None:
        return src.tensor
    from ..io import load_weights

    key = (str(src.path), src.reshape_conv)
    if key not in _STORES:
        _STORES.clear()
        _STORES[key] = load_weights(src.path, reshape_conv=src.reshape_conv,
                                    matrices_only=False)
    return _STORES[key][src.name]


def forget_stores() -> None:
    """Close the checkpoint kept open by :func:`read_source`."""
    _STORES.clear()


def sources_of(
    matrices: Any,
    include: Any = None,
    exclude: Any = None,
    reshape_conv: bool = False,
) -> tuple[list[Source], dict[str, Any]]:
    """Normalise ``matrices`` (dict, matrix, path or WeightStore) to sources, and a JSON
    description of where they come from. Only checkpoint headers are read."""
    from ..io import WeightStore, load_weights, match_names

    if isinstance(matrices, (str, os.PathLike)):
        matrices = load_weights(matrices, include, exclude, reshape_conv=reshape_conv)
    elif (include is not None or exclude is not None) and not isinstance(matrices, WeightStore):
        if not isinstance(matrices, Mapping):
            raise TypeError("include/exclude filter names; pass a dict or a checkpoint path")
        keep = set(match_names(list(matrices), include, exclude))
        if not keep:
            raise ValueError(
                f"the filters include={include!r} exclude={exclude!r} match none of the "
                f"matrices {list(matrices)[:5]}"
            )
        matrices = {k: v for k, v in matrices.items() if k in keep}

    if isinstance(matrices, WeightStore):
        names = list(matrices)
        if include is not None or exclude is not None:
            names = match_names(names, include, exclude)
            if not names:
                raise ValueError(
                    f"the filters include={include!r} exclude={exclude!r} match none of the "
                    f"{len(matrices)} matrices in {matrices.path}"
                )
        srcs = []
        for name in names:
            info = matrices.info(name)
            if len(info.shape) != 2:
                raise ValueError(
                    f"tensor {name!r} in {matrices.path} has shape {info.shape}; only matrices "
                    "can be swept"
                )
            file = str(Path(info.file).resolve())
            srcs.append(Source(name, (info.shape[0], info.shape[1]), info.dtype, path=file,
                               reshape_conv=matrices.reshape_conv, stat=file_stat(file)))
        return srcs, {"checkpoint": str(Path(matrices.path).resolve()),
                      "include": include, "exclude": exclude, "reshape_conv": reshape_conv}

    if isinstance(matrices, Mapping):
        items = list(matrices.items())
        what = "dict"
    elif isinstance(matrices, (torch.Tensor, np.ndarray, StructuredMatrix)):
        items = [("W", matrices)]
        what = "matrix"
    else:
        raise TypeError(
            "matrices must be a dict name -> matrix, a single matrix (torch.Tensor or "
            f"numpy.ndarray) or a checkpoint path; got {type(matrices).__name__}"
        )
    if not items:
        raise ValueError("matrices is empty; give at least one matrix")
    srcs = []
    for name, W in items:
        if not isinstance(name, str) or not name:
            raise TypeError(f"matrix names must be non-empty strings; got {name!r}")
        if isinstance(W, StructuredMatrix):
            W = W.to_dense()
        stored = str(getattr(W, "dtype", "")).replace("torch.", "")  # before any upcast
        t = as_matrix(W, f"matrices[{name!r}]").cpu()
        srcs.append(Source(name, (t.shape[0], t.shape[1]), stored or str(t.dtype), tensor=t,
                           data_hash=tensor_hash(t)))
    names = [s.name for s in srcs]
    if len(set(names)) != len(names):
        raise ValueError("matrix names must be unique")
    return srcs, {"memory": what}


# --------------------------------------------------------------------------------- tasks
@dataclass
class Task:
    """One fit: a matrix, a format, a budget and the options and seed to fit with.

    ``key`` (matrix, format, budget text, options JSON, seed) identifies its row in a sweep
    folder; ``attempt`` counts runs whose process died while running it.
    """

    source: Source
    format: str
    budget: float | int
    options: dict[str, Any]
    options_text: str
    seed: int
    budget_macs: int
    pass_seed: bool
    product_batch: int | None = None
    attempt: int = 0

    @property
    def key(self) -> tuple:
        return (self.source.name, self.format, budget_text(self.budget), self.options_text,
                self.seed)


@dataclass
class Plan:
    """Every (matrix, format, budget) of a sweep; see :meth:`tasks`."""

    sources: list[Source]
    formats: list[str]
    budgets: list[float | int]
    options: dict[str, dict[str, Any]]
    seed: int
    product_batch: int | None = None
    pass_seed: dict[str, bool] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for f in self.formats:
            self.pass_seed.setdefault(f, takes_seed(FORMATS[f]))

    def tasks(self) -> Iterator[Task]:
        """One task per (matrix, format, budget), in that nesting order."""
        for src in self.sources:
            for fmt in self.formats:
                opts = self.options.get(fmt, {})
                otext = options_text(opts)
                for b in self.budgets:
                    yield Task(src, fmt, b, opts, otext, self.seed,
                               resolve_budget(b, *src.shape), self.pass_seed[fmt],
                               self.product_batch)
