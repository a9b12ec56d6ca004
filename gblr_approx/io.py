"""Reading weights of real checkpoints, one tensor at a time.

:func:`load_weights` opens a checkpoint (``.safetensors``, PyTorch ``.pt``/``.bin``/``.pth``,
NumPy ``.npz``/``.npy``, or a folder of such files) and returns a lazy, read-only mapping
``name -> torch.Tensor``: only the file headers are read when it is opened; a tensor is read
from disk each time it is accessed and is not cached, so a multi-GB checkpoint never has to fit
in memory at once.

Name filters
------------
``include`` and ``exclude`` take one pattern or a sequence of patterns. A pattern is a
**shell glob** matched against the whole tensor name, case-sensitively (``fnmatch``:
``*`` matches any characters *including dots*, ``?`` one character, ``[abc]`` a set), e.g.
``"encoder.layer.*.attention.*.weight"``. A pattern starting with ``re:`` is a **Python regular
expression** searched anywhere in the name (``re.search``), e.g. ``"re:layer\\.(0|1)\\."``.
A tensor is kept when it matches at least one ``include`` pattern (all tensors when
``include`` is None) and no ``exclude`` pattern.

Structured-matrix files
-----------------------
A ``.safetensors`` file written by :meth:`StructuredMatrix.save` (its metadata names a
registered ``format`` and a ``shape``) is recognised by that metadata wherever a path is read:
:func:`load_weights` presents it as **one matrix**, named by the file stem, whose value is the
matrix it represents (``gblr_approx.load(path).to_dense()``), not as its stored factors. So
``sweep``, ``spectrum`` and ``project`` analyse the structured matrix itself, and ``inspect``
describes it as a structured matrix (:func:`structured_metadata` tells the two kinds apart).
Hugging Face checkpoints carry ``{"format": "pt"}`` metadata; ``"pt"`` is not a registered
format, so they stay ordinary weights files. Saving and loading structured matrices is
:meth:`StructuredMatrix.save` and :func:`gblr_approx.load`.

Outputs
-------
:func:`check_output` is the guard every writing command uses: an output never replaces one of
the files it was computed from (compared with ``os.path.samefile``, so another path, a symlink
or a hard link to the input is caught), and an existing output is replaced only on request.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "load_weights", "WeightStore", "TensorInfo", "SUPPORTED_SUFFIXES", "match_names",
    "structured_metadata", "check_output",
]

#: File suffixes understood by :func:`load_weights`.
SUPPORTED_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".npz", ".npy")

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorInfo:
    """What is known about a tensor without reading its values.

    Attributes
    ----------
    name : str
        Key in the mapping.
    shape : tuple[int, ...]
        Shape as returned by the mapping (after the optional conv reshape).
    stored_shape : tuple[int, ...]
        Shape as stored in the file.
    dtype : str
        Stored dtype, e.g. ``"float32"``, ``"bfloat16"``.
    file : str
        File the tensor lives in.
    nbytes : int
        Stored size in bytes.
    structured : str or None
        For a file saved by :meth:`StructuredMatrix.save`, its format name (e.g. ``"gblr"``):
        the tensor is then the matrix the file represents (its ``to_dense()``), ``shape`` and
        ``stored_shape`` are ``(m, n)`` and ``nbytes`` is the size of the stored factors.
        None for an ordinary tensor.
    """

    name: str
    shape: tuple[int, ...]
    stored_shape: tuple[int, ...]
    dtype: str
    file: str
    nbytes: int
    structured: str | None = None

    @property
    def numel(self) -> int:
        return int(np.prod(self.stored_shape, dtype=np.int64))

    @property
    def is_matrix(self) -> bool:
        """True for 2-D floating-point tensors (after the optional reshape)."""
        return len(self.shape) == 2 and _is_float_name(self.dtype)


def _is_float_name(dtype: str) -> bool:
    return dtype.startswith("float") or dtype == "bfloat16"


def _dtype_name(dtype: Any) -> str:
    return str(dtype).replace("torch.", "")


# --------------------------------------------------------------------------- file readers
class _Reader:
    """Reads tensors of one file. ``infos()`` lists (name, stored_shape, dtype, nbytes)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def infos(self) -> list[tuple[str, tuple[int, ...], str, int]]:
        raise NotImplementedError

    def get(self, name: str) -> torch.Tensor:
        raise NotImplementedError


def _unreadable(path: Path, kind: str, exc: BaseException) -> ValueError:
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ValueError(
        f"{path} is not a readable {kind} file (truncated or corrupt?): {detail}"
    )


def _pickled_objects(path: Path, exc: BaseException) -> ValueError:
    """The error for a ``.pt`` file that ``torch.load(weights_only=True)`` refuses: it holds
    pickled Python objects (a whole module saved with ``torch.save(model)``, an optimizer,
    custom classes), not only tensors."""
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
    detail = f" (first refused: {found.group(1)})" if found else ""
    return ValueError(
        f"{path} holds pickled Python objects{detail}, which weights_only loading refuses to "
        "unpickle (they could run arbitrary code); it is not corrupt. A file made by "
        "torch.save(model) stores the whole module: if you trust it, re-save its weights with "
        f"torch.save(torch.load({str(path)!r}, weights_only=False).state_dict(), "
        "'weights.pt') and read that file"
    )


def structured_metadata(path: str | Path) -> dict[str, str] | None:
    """The metadata of a structured-matrix file, or None for any other file.

    A file counts as a structured matrix when it is a ``.safetensors`` file whose metadata
    names a registered format (``"format"``, e.g. ``"gblr"``) and a ``"shape"``, as
    :meth:`StructuredMatrix.save` writes. Only the header is read. Folders, other suffixes,
    unreadable files and weights files (Hugging Face writes ``{"format": "pt"}``) give None.
    """
    p = Path(path)
    if p.suffix != ".safetensors" or not p.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
    except Exception:  # unreadable: the reader that opens it says why
        return None
    return meta if _is_structured(meta) else None


def _is_structured(meta: Mapping[str, str]) -> bool:
    from .formats.base import FORMATS

    fmt = str(meta.get("format", "")).lower().replace("-", "").replace("_", "")
    return fmt in FORMATS and "shape" in meta


class _SafetensorsReader(_Reader):
    def __init__(self, path: Path) -> None:
        super().__init__(path)
        from safetensors import safe_open

        self._open = safe_open
        #: format name when the file holds a structured matrix (see structured_metadata)
        self.structured: str | None = None
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                self._infos = []
                for k in f.keys():
                    sl = f.get_slice(k)
                    shape = tuple(int(s) for s in sl.get_shape())
                    dt = _ST_DTYPES.get(sl.get_dtype())
                    dname = _dtype_name(dt) if dt is not None else sl.get_dtype().lower()
                    size = dt.itemsize if dt is not None else 1
                    nbytes = int(np.prod(shape, dtype=np.int64)) * size
                    self._infos.append((k, shape, dname, nbytes))
        except Exception as exc:  # safetensors raises its own error types
            raise _unreadable(path, ".safetensors", exc) from exc
        if _is_structured(meta):
            self._as_structured(meta)

    def _as_structured(self, meta: Mapping[str, str]) -> None:
        """Present a file saved by StructuredMatrix.save as the one matrix it represents."""
        from .formats.base import get_format

        try:
            shape = tuple(json.loads(meta["shape"]))
            if len(shape) != 2 or not all(isinstance(v, int) and v >= 1 for v in shape):
                raise ValueError(f"shape {meta['shape']} is not two positive integers")
        except ValueError as exc:
            raise ValueError(
                f"{self.path} is a structured-matrix file (format {meta['format']!r}) with "
                f"invalid 'shape' metadata: {exc}"
            ) from exc
        floats = [d for _, _, d, _ in self._infos if _is_float_name(d)]
        self.structured = get_format(meta["format"]).format_name
        self._stored = self._infos
        self._infos = [(self.path.stem, shape, floats[0] if floats else "float32",
                        sum(nb for *_, nb in self._stored))]

    def infos(self):
        return self._infos

    def get(self, name: str) -> torch.Tensor:
        if self.structured is not None:
            from .formats.base import load

            return load(self.path).to_dense()
        try:
            with self._open(str(self.path), framework="pt", device="cpu") as f:
                return f.get_tensor(name)
        except Exception as exc:
            raise _unreadable(self.path, ".safetensors", exc) from exc


class _TorchReader(_Reader):
    """``torch.load(weights_only=True)``; memory-mapped when the file is in the zip format."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        try:
            try:
                obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                # legacy (non-zip) serialisation cannot be memory-mapped: read it whole
                if "mmap" not in str(exc) and "zip" not in str(exc):
                    raise
                obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:
            if "weights only load failed" in str(exc).lower():
                raise _pickled_objects(path, exc) from exc
            raise _unreadable(path, "PyTorch checkpoint", exc) from exc
        state = _find_state_dict(obj)
        if state is None:
            raise ValueError(
                f"{path} holds a {type(obj).__name__}, not a state dict (a mapping of names to "
                "tensors); save model.state_dict() instead"
            )
        self._state = state

    def infos(self):
        return [
            (k, tuple(t.shape), _dtype_name(t.dtype), t.numel() * t.element_size())
            for k, t in self._state.items()
        ]

    def get(self, name: str) -> torch.Tensor:
        return self._state[name]


def _find_state_dict(obj: Any, prefix: str = "") -> dict[str, torch.Tensor] | None:
    """Flatten nested dicts of tensors (e.g. ``{"state_dict": {...}}``) into ``a.b`` names."""
    if isinstance(obj, torch.Tensor):
        return {prefix.rstrip("."): obj} if prefix else None
    if not isinstance(obj, Mapping):
        return None
    out: dict[str, torch.Tensor] = {}
    for k, v in obj.items():
        if isinstance(v, torch.Tensor):
            out[f"{prefix}{k}"] = v
        elif isinstance(v, Mapping):
            sub = _find_state_dict(v, f"{prefix}{k}.")
            if sub:
                out.update(sub)
    return out or None


def _npy_header(fp) -> tuple[tuple[int, ...], np.dtype]:
    version = np.lib.format.read_magic(fp)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(fp)
    else:
        shape, _, dtype = np.lib.format.read_array_header_2_0(fp)
    return tuple(int(s) for s in shape), dtype


class _NpzReader(_Reader):
    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._infos = []
        try:
            with zipfile.ZipFile(path) as zf:
                for member in zf.namelist():
                    if not member.endswith(".npy"):
                        continue
                    with zf.open(member) as fp:
                        shape, dtype = _npy_header(fp)
                    name = member[: -len(".npy")]
                    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
                    self._infos.append((name, shape, _np_dtype_name(dtype), nbytes))
        except Exception as exc:
            raise _unreadable(path, ".npz", exc) from exc

    def infos(self):
        return self._infos

    def get(self, name: str) -> torch.Tensor:
        try:
            with np.load(self.path, allow_pickle=False) as z:
                arr = z[name]
        except Exception as exc:
            raise _unreadable(self.path, ".npz", exc) from exc
        return _from_numpy(arr, self.path, name)


class _NpyReader(_Reader):
    def __init__(self, path: Path) -> None:
        super().__init__(path)
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except Exception as exc:
            raise _unreadable(path, ".npy", exc) from exc
        self._name = path.stem
        self._info = (
            self._name, tuple(int(s) for s in arr.shape), _np_dtype_name(arr.dtype), arr.nbytes
        )

    def infos(self):
        return [self._info]

    def get(self, name: str) -> torch.Tensor:
        try:
            arr = np.load(self.path, mmap_mode="r", allow_pickle=False)
            arr = np.array(arr)  # copy out of the memory map
        except Exception as exc:
            raise _unreadable(self.path, ".npy", exc) from exc
        return _from_numpy(arr, self.path, name)


def _np_dtype_name(dtype: np.dtype) -> str:
    return str(np.dtype(dtype))


def _from_numpy(arr: np.ndarray, path: Path, name: str) -> torch.Tensor:
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{path}: array {name!r} has dtype {arr.dtype}; expected a numeric array")
    return torch.from_numpy(np.ascontiguousarray(arr))


_READERS = {
    ".safetensors": _SafetensorsReader,
    ".pt": _TorchReader,
    ".pth": _TorchReader,
    ".bin": _TorchReader,
    ".npz": _NpzReader,
    ".npy": _NpyReader,
}


# --------------------------------------------------------------------------------- filters
def _as_patterns(patterns: str | Iterable[str] | None, name: str) -> list[str] | None:
    if patterns is None:
        return None
    if isinstance(patterns, str):
        patterns = [patterns]
    out = []
    for p in patterns:
        if not isinstance(p, str):
            raise TypeError(f"{name} must be a string or a sequence of strings; got {p!r}")
        if p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as exc:
                raise ValueError(f"{name}: invalid regular expression {p!r}: {exc}") from exc
        out.append(p)
    return out


def _matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def match_names(
    names: Iterable[str],
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
) -> list[str]:
    """Names kept by the ``include``/``exclude`` filters (see the module docstring)."""
    inc = _as_patterns(include, "include")
    exc = _as_patterns(exclude, "exclude")
    return [
        n
        for n in names
        if (inc is None or any(_matches(n, p) for p in inc))
        and not (exc and any(_matches(n, p) for p in exc))
    ]


# ----------------------------------------------------------------------------- the mapping
class WeightStore(Mapping):
    """Lazy read-only mapping ``name -> torch.Tensor`` over one checkpoint.

    Each access reads the tensor from disk (nothing is cached). Use :meth:`info` for shapes and
    dtypes without reading values.

    Attributes
    ----------
    path : Path
        The file or folder that was opened.
    files : list[Path]
        The files read.
    """

    def __init__(
        self,
        path: Path,
        entries: dict[str, tuple[_Reader, TensorInfo]],
        reshape_conv: bool,
    ) -> None:
        self.path = path
        self._entries = entries
        self.reshape_conv = reshape_conv
        self.files = sorted({r.path for r, _ in entries.values()})

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._entries:
            raise KeyError(
                f"no tensor {name!r} in {self.path} (after filtering); "
                f"{len(self)} available, e.g. {_preview(list(self._entries))}"
            )
        reader, info = self._entries[name]
        t = reader.get(name)
        if tuple(t.shape) != info.stored_shape:
            raise ValueError(
                f"{reader.path}: tensor {name!r} has shape {tuple(t.shape)} but its header says "
                f"{info.stored_shape}; the file is corrupt"
            )
        if t.shape != info.shape:
            t = t.reshape(info.shape)
        return t

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def info(self, name: str) -> TensorInfo:
        """Shape, dtype, file and size of ``name`` without reading its values."""
        if name not in self._entries:
            raise KeyError(f"no tensor {name!r} in {self.path}")
        return self._entries[name][1]

    def infos(self) -> list[TensorInfo]:
        """:class:`TensorInfo` of every tensor, in mapping order."""
        return [info for _, info in self._entries.values()]

    def __repr__(self) -> str:
        return f"WeightStore({str(self.path)!r}, {len(self)} tensors)"


def _preview(names: Sequence[str], k: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:k])
    return shown + (f", ... ({len(names)} in all)" if len(names) > k else "") if names else "none"


def _files_of(path: Path) -> list[Path]:
    """Checkpoint files of a folder; safetensors preferred over .pt/.bin over numpy files."""
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in SUPPORTED_SUFFIXES)
    for group in ((".safetensors",), (".pt", ".pth", ".bin"), (".npz", ".npy")):
        chosen = [p for p in files if p.suffix in group]
        if chosen:
            return chosen
    raise ValueError(
        f"folder {path} holds no checkpoint file; expected files ending in "
        f"{', '.join(SUPPORTED_SUFFIXES)}"
    )


def load_weights(
    path: str | Path,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    *,
    reshape_conv: bool = False,
    matrices_only: bool = True,
) -> WeightStore:
    """Open a checkpoint as a lazy mapping ``name -> torch.Tensor``.

    Parameters
    ----------
    path : str or Path
        A ``.safetensors`` file (read one tensor at a time with ``safe_open``), a PyTorch state
        dict ``.pt``/``.pth``/``.bin`` (``torch.load(weights_only=True)``, memory-mapped when
        the file is in the zip format; nested dicts such as ``{"state_dict": ...}`` are
        flattened to dotted names), a ``.npz`` archive, a ``.npy`` array (named by the file
        stem), a structured matrix saved by :meth:`StructuredMatrix.save` (one matrix named
        by the file stem, read as its ``to_dense()``), or a folder of such files (not
        recursive). In a folder, ``.safetensors`` files
        are used when present, else ``.pt``/``.pth``/``.bin``, else ``.npz``/``.npy``, so a
        Hugging Face model folder holding both ``model.safetensors`` and
        ``pytorch_model.bin`` is read once.
    include, exclude : str or sequence of str, optional
        Name filters: shell globs (``fnmatch``, whole name) or, prefixed with ``re:``, regular
        expressions (``re.search``). A tensor is kept if it matches any ``include`` pattern
        (all when None) and no ``exclude`` pattern.
    reshape_conv : bool, default False
        Reshape 4-D convolution kernels ``(out, in, kh, kw)`` to matrices
        ``(out, in * kh * kw)`` (so they count as matrices).
    matrices_only : bool, default True
        Keep only 2-D floating-point tensors (weight matrices); biases, norms, integer buffers
        and (unless ``reshape_conv``) conv kernels are skipped. ``False`` keeps every tensor.

    Returns
    -------
    WeightStore
        A ``Mapping[str, torch.Tensor]`` in file order; values keep their stored dtype and are
        read on access. ``store.info(name)`` gives shape/dtype/size without reading.

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    ValueError
        Unsupported suffix, unreadable or truncated file, duplicate tensor names across the
        files of a folder, or filters that leave no tensor (the message lists what exists).
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"no such file or folder: {p}")
    if p.is_dir():
        files = _files_of(p)
    else:
        if p.suffix not in _READERS:
            raise ValueError(
                f"cannot read {p}: unsupported file type {p.suffix!r}; expected one of "
                f"{', '.join(SUPPORTED_SUFFIXES)} or a folder of them"
            )
        files = [p]
    inc = _as_patterns(include, "include")
    exc = _as_patterns(exclude, "exclude")

    all_infos: list[tuple[_Reader, TensorInfo]] = []
    seen: dict[str, Path] = {}
    for f in files:
        reader = _READERS[f.suffix](f)
        structured = getattr(reader, "structured", None)
        for name, shape, dtype, nbytes in reader.infos():
            if name in seen:
                raise ValueError(
                    f"tensor {name!r} appears in both {seen[name]} and {f}; open one file at a time"
                )
            seen[name] = f
            out_shape = shape
            if reshape_conv and len(shape) == 4:
                out_shape = (shape[0], shape[1] * shape[2] * shape[3])
            all_infos.append(
                (reader, TensorInfo(name, out_shape, shape, dtype, str(f), int(nbytes),
                                    structured))
            )

    if not all_infos:
        raise ValueError(f"{p} holds no tensors")
    candidates = [(r, i) for r, i in all_infos if not matrices_only or i.is_matrix]
    if not candidates:
        raise ValueError(
            f"{p} holds {len(all_infos)} tensors but none is a 2-D floating-point matrix"
            + ("" if reshape_conv else " (pass reshape_conv=True to read 4-D conv kernels)")
        )
    kept_names = set(match_names([i.name for _, i in candidates], inc, exc))
    entries = {i.name: (r, i) for r, i in candidates if i.name in kept_names}
    if not entries:
        what = "matrices" if matrices_only else "tensors"
        raise ValueError(
            f"the filters include={include!r} exclude={exclude!r} match none of the "
            f"{len(candidates)} {what} in {p} (globs match the whole name; prefix 're:' for a "
            f"regular expression); names are e.g. {_preview([i.name for _, i in candidates])}"
        )
    return WeightStore(p, entries, reshape_conv)


def check_output(
    out: str | Path, inputs: Iterable[str | Path] = (), *, force: bool = False,
    option: str = "--out",
) -> Path:
    """Refuse an output path that is one of the inputs, or that exists (unless ``force``).

    Parameters
    ----------
    out : str or Path
        The file about to be written.
    inputs : iterable of str or Path
        Files (or folders: every file directly inside counts) the output is computed from.
        An output that is the same file as an input, by any path, symlink or hard link
        (``os.path.samefile``), is refused even with ``force``.
    force : bool, default False
        Allow replacing an existing output that is not an input.
    option : str
        How the output is named in messages (the CLI option).

    Returns
    -------
    Path
        ``out`` with ``~`` expanded.

    Raises
    ------
    FileExistsError
        ``out`` is an input, or exists and ``force`` is False.
    IsADirectoryError
        ``out`` is a folder.
    """
    p = Path(out).expanduser()
    if not os.path.lexists(p):
        return p
    if p.is_dir():
        raise IsADirectoryError(f"{option} {p} is a folder; give a file name")
    for inp in inputs:
        q = Path(inp).expanduser()
        candidates = [c for c in q.iterdir() if c.is_file()] if q.is_dir() else [q]
        for c in candidates:
            try:
                same = os.path.samefile(p, c)
            except OSError:  # a dangling symlink or a vanished file is not the input
                same = False
            if same:
                raise FileExistsError(
                    f"{option} {p} is the input {c}"
                    + (f" (resolved: {p.resolve()})" if p.resolve() != p.absolute() else "")
                    + "; writing it would destroy the input: choose another output file"
                )
    if not force:
        raise FileExistsError(f"{option} {p} already exists; pass --force to overwrite it")
    return p
