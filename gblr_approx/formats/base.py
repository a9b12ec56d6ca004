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
``_transpose()``; optional ``num_params`` (defaults to the float entries stored) and
``_rmatmul(X)``, the left product ``X @ A`` for ``X`` of shape ``(k, m)`` (defaults to
``(A.T @ X.T).T``; formats override it to reuse their own storage instead of building ``A.T``),
and ``_linear(x, bias)``, a fused ``x @ A.T + bias`` for a row-major batch ``x`` of shape
``(k, n)`` that :class:`~gblr_approx.nn.StructuredLinear` takes when a format has one (it
may return ``None``: no fused form for that call).

Product hooks receive ``X`` with any strides (``StructuredLinear`` passes the transposed view of
a row-major batch), may return a non-contiguous view, must be differentiable by autograd and
must not synchronise with the device (no ``.item()``, ``.tolist()``, ``int(tensor)``): index
tensors are precomputed when the matrix is constructed. :func:`bmm_nk` is the shared batched
product that picks the fast memory layout.
``project(W, budget, **options)`` (classmethod)
    Best approximation of a validated float tensor ``W`` within ``budget`` MACs (int).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import math
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..validation import as_operand

__all__ = [
    "StructuredMatrix",
    "register_format",
    "FORMATS",
    "get_format",
    "FORMAT_VERSION",
    "bmm_nk",
    "batch_major",
    "stack_rows",
    "slab_maps",
    "gather_slabs",
    "scatter_slabs",
    "take_rows",
    "gather",
    "cached_layout",
    "scratch",
    "balanced_step",
    "with_autograd",
    "projection_options",
    "check_factors",
    "fit_scale",
    "scale_invariant",
]

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


#: Below this many right-hand columns a batched product is computed in the row form
#: ``X^T @ W^T`` (measured on MKL: the column form ``W @ X`` of ``torch.bmm`` costs ~60 us of
#: fixed overhead per call when ``k`` is small, the row form ~3 us).
ROW_FORM_BELOW = 32


def batch_major(X: torch.Tensor) -> bool:
    """Whether an ``(n, k)`` operand is stored batch-major (a transposed view of ``(k, n)``)."""
    return X.shape[1] > 1 and X.stride(0) == 1 and X.stride(1) != 1


def bmm_nk(W: torch.Tensor, X: torch.Tensor, row_form: bool) -> torch.Tensor:
    """Batched ``W @ X``: ``W`` (b, p, q), ``X`` (b, q, k) with any strides -> (b, p, k).

    ``row_form=True`` computes ``(X^T @ W^T)^T`` so the result is stored as ``(b, k, p)``
    (returned as its transposed view); it is the fast call for small ``k`` and for batch-major
    data. Cost: ``b p q k`` MACs, one kernel launch.
    """
    if row_form:
        return torch.bmm(X.mT, W.mT).mT
    return torch.bmm(W, X)


def stack_rows(Y: torch.Tensor, row_form: bool) -> torch.Tensor:
    """Stack ``Y`` (b, p, k) into ``(b * p, k)``: a view, or one copy into a batch-major result.

    ``row_form`` says ``Y`` is stored as ``(b, k, p)`` (as :func:`bmm_nk` returns it); the
    result is then stored as ``(k, b * p)`` and returned as its transposed view.
    """
    b, p, k = Y.shape
    if row_form and k > 1:
        return Y.permute(2, 0, 1).reshape(k, b * p).T
    return Y.reshape(b * p, k)


def slab_maps(
    splits: list[int], device: torch.device | str | None = None
) -> tuple[torch.Tensor | None, torch.Tensor | None, int]:
    """Index maps between an axis cut at ``splits`` and equal slabs padded to the longest.

    Returns ``(gather, scatter, q)``: ``gather`` (b * q,) takes the padded slabs from the axis
    extended by one zero entry (index ``L`` = the padding), ``scatter`` (L,) takes the axis
    back from the flattened slabs; both ``None`` when every slab already has ``q`` entries (a
    plain reshape then does it).
    """
    sizes = [b - a for a, b in zip(splits, splits[1:], strict=False)]
    q, L = max(sizes), splits[-1]
    if min(sizes) == q:
        return None, None, q
    gather = torch.full((len(sizes), q), L, dtype=torch.long)
    scatter = torch.empty(L, dtype=torch.long)
    for i, (a, w) in enumerate(zip(splits, sizes, strict=False)):
        gather[i, :w] = torch.arange(a, a + w)
        scatter[a : a + w] = torch.arange(i * q, i * q + w)
    return gather.flatten().to(device), scatter.to(device), q


def gather_slabs(
    X: torch.Tensor, b: int, q: int, gather: torch.Tensor | None, row_form: bool
) -> torch.Tensor:
    """The rows of ``X`` (L, k) as ``b`` padded slabs ``(b, q, k)`` (see :func:`slab_maps`).

    A view when ``gather`` is ``None``; otherwise one gather, batch-major when ``row_form``.
    """
    if gather is None:
        return X.view(b, q, X.shape[1])
    if row_form:
        Xr = torch.nn.functional.pad(X.T, (0, 1))
        return Xr.index_select(1, gather).unflatten(1, (b, q)).permute(1, 2, 0)
    return torch.nn.functional.pad(X, (0, 0, 0, 1)).index_select(0, gather).unflatten(0, (b, q))


def scatter_slabs(Y: torch.Tensor, scatter: torch.Tensor | None, row_form: bool) -> torch.Tensor:
    """Drop the padding rows of stacked slabs ``Y`` (b * q, k) (inverse of gather_slabs)."""
    if scatter is None:
        return Y
    if row_form:
        return Y.T.index_select(1, scatter).T
    return Y.index_select(0, scatter)


class _Gather(torch.autograd.Function):
    """``src.index_select(dim, index)`` whose backward is the gather ``grad[inverse]``.

    For maps that hit every source entry that matters exactly once (padding entries may repeat
    and may take any gradient): the backward is then a plain gather instead of an
    ``index_add_`` (which torch runs serially on CPU when indices repeat).
    """

    @staticmethod
    def forward(ctx: Any, src: torch.Tensor, dim: int, index: torch.Tensor,
                inverse: torch.Tensor) -> torch.Tensor:
        ctx.dim = dim
        ctx.save_for_backward(inverse)
        return src.index_select(dim, index)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        (inverse,) = ctx.saved_tensors
        return grad.index_select(ctx.dim, inverse), None, None, None


def gather(src: torch.Tensor, dim: int, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """``src.index_select(dim, index)``; ``inverse`` maps each source entry to a position of it.

    Source entries that the result does not contain must only receive gradients that do not
    matter (padding), since their gradient is read from ``inverse``'s position.
    """
    if torch.is_grad_enabled() and src.requires_grad:
        return _Gather.apply(src, dim, index, inverse)
    return src.index_select(dim, index)


def balanced_step(k: int, step: int) -> int:
    """Chunk width for ``k`` columns in chunks of at most ``step``, all about equally wide
    (no thin last chunk): ``ceil(k / ceil(k / step))``."""
    chunks = -(-k // max(1, step))
    return -(-k // chunks)


@contextlib.contextmanager
def plan_building() -> Iterator[None]:
    """Context for building what a product caches (index plans, packed panels): no graph,
    and never inference tensors, even inside ``torch.inference_mode()``.

    An inference tensor cannot be saved for backward, so a plan or panel first built during
    inference (e.g. an evaluation pass) and reused by a training step would make autograd
    raise "Inference tensors cannot be saved for backward". Built here, the cached tensors
    are ordinary ones, usable in both modes.
    """
    with torch.inference_mode(False), torch.no_grad():
        yield


def projection_options(cls: type[StructuredMatrix]) -> list[str] | None:
    """The keyword options ``cls.project`` takes (not ``W``, ``budget``), or None when it
    accepts any (``**options``, forwarded to a fitter that checks them itself)."""
    params = inspect.signature(cls.project).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return None
    return [k for k, p in params.items() if k not in ("W", "budget", "self", "cls")
            and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]


def with_autograd(fn: Any) -> Any:
    """Decorate an entry point that fits or trains so that it runs as in the default grad
    mode even when called under ``torch.no_grad()`` or ``torch.inference_mode()``.

    Gradient steps (GBLR's proximal fit, distillation) need autograd, and results made under
    inference mode would be inference tensors, which have no version counter, so products
    could not keep their cached layouts. Inputs that require grad stay untracked as before
    (the fits detach them); nothing else changes for callers in the default mode.
    """

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        with torch.inference_mode(False), torch.enable_grad():
            return fn(*args, **kwargs)

    return run


_SCRATCH = threading.local()


def scratch(numel: int, like: torch.Tensor) -> torch.Tensor | None:
    """A 1-D buffer of ``numel`` entries (``like``'s dtype) that this thread's CPU products
    reuse for their intermediates, or ``None`` where none is kept (not a CPU tensor).

    The intermediates of a large product (gathered rows, partial sums) are megabytes.
    Allocated per call, glibc maps fresh pages for them and returns them to the system
    after the call, so in many processes a product spent most of its time in page faults:
    a free-layout 1536 x 384 GBLR at batch 256 took 18-28 ms in five of eight fresh
    processes (about 2,800 minor faults per product) and 6-9 ms in the others, or in every
    process with glibc's trimming switched off (docs/benchmarks.md, "Page faults").

    One buffer per thread and dtype, grown to the largest request and kept (a few MB).
    Its contents are garbage; callers carve views from it, use them within one product
    without autograd, and never return them. The buffer is an ordinary tensor (made outside
    inference mode), so in-place use is valid in and out of ``torch.inference_mode()``.
    (CUDA's caching allocator already reuses memory, so CUDA products allocate as usual.)
    """
    if like.device.type != "cpu":
        return None
    bufs = getattr(_SCRATCH, "bufs", None)
    if bufs is None:
        bufs = _SCRATCH.bufs = {}
    buf = bufs.get(like.dtype)
    if buf is None or buf.numel() < numel:
        with plan_building():
            buf = torch.empty(max(numel, 1), dtype=like.dtype)
        bufs[like.dtype] = buf
    return buf[:numel]


def cached_layout(owner: Any, name: str, build: Any, *sources: torch.Tensor) -> Any:
    """``build()``, kept on ``owner`` while ``sources`` are unchanged and need no gradient.

    For the contiguous copies (transposes, permutations) of stored factors that a product
    reads faster than the strided views: built once and reused, and rebuilt when a source
    changes (in place: its version counter; replaced: another tensor object; entering or
    leaving inference mode rebuilds too). With gradients on for any source, ``build()`` runs
    every call, differentiably (autograd then sees the copy). A cached value is a layout of
    the stored numbers, never a product of factors (making it costs no MACs of the product).
    Costs ~2 us of Python per call when cached.
    """
    if torch.is_grad_enabled() and any(t.requires_grad for t in sources):
        return build()
    if any(t.is_inference() for t in sources):  # (made in inference mode: no version counter,
        with torch.no_grad():  # so a change could not be seen; built every call)
            return build()
    inference = torch.is_inference_mode_enabled()
    store = owner.__dict__.get("_layouts")
    if store is None:
        store = owner._layouts = {}
    hit = store.get(name)
    if hit is not None and hit[0] == inference:
        for (t, version), src in zip(hit[1], sources, strict=True):
            if t is not src or version != src._version:
                break
        else:
            return hit[2]
    with plan_building():
        value = build()
    store[name] = (inference, [(t, t._version) for t in sources], value)
    return value


def check_factors(*tensors: Any) -> None:
    """Check the stored numbers of a format: floating-point tensors sharing dtype and device.

    Called once by every constructor (never by the products): integer factors would make
    ``A @ x`` cast ``x`` to integers (silently wrong numbers), and mixed dtypes or devices
    fail only later, deep inside torch.

    Raises
    ------
    TypeError
        A factor is not a tensor, or not floating point.
    ValueError
        Two factors differ in dtype or device.
    """
    if not tensors:
        return
    first = tensors[0]
    if not isinstance(first, torch.Tensor):
        raise TypeError(f"factors must be torch.Tensors; got {type(first).__name__}")
    dt, dev = first.dtype, first.device
    # (one pass of cheap attribute reads: StructuredLinear rebuilds its matrix, and so runs
    # this, at every training forward; the messages are worked out only on failure)
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"factors must be torch.Tensors; got {type(t).__name__}")
        if t.dtype is not dt or t.device != dev:
            for d in (dt, t.dtype):
                if not d.is_floating_point:
                    raise TypeError(f"factors must be floating point; got {d}")
            raise ValueError(
                f"all factors must share dtype and device; got {dt}/{dev} and "
                f"{t.dtype}/{t.device}"
            )
    if not dt.is_floating_point:
        raise TypeError(f"factors must be floating point; got {dt}")


#: Fits and projections rescale ``W`` when its largest magnitude lies outside
#: ``[2**-SAFE_SCALE_EXP, 2**SAFE_SCALE_EXP]`` (:func:`fit_scale`): squares and sums of squares
#: of such entries over- or underflow float32 (``1e20 ** 2`` is inf, ``1e-25 ** 2`` is 0).
SAFE_SCALE_EXP = 16


def fit_scale(W: torch.Tensor) -> float:
    """The power of two ``s`` that a fit divides ``W`` by (1.0 for ordinary magnitudes).

    ``1.0`` when ``max |W_ij|`` lies in ``[2**-SAFE_SCALE_EXP, 2**SAFE_SCALE_EXP]`` (or ``W``
    is zero or empty), so results on ordinary matrices are untouched; otherwise ``2**e`` with
    ``W / s`` of largest magnitude in ``[0.5, 1)``. A power of two, so ``W / s`` and the
    result scaled back by ``s`` are exact (no rounding).
    """
    if W.numel() == 0:
        return 1.0
    peak = float(torch.linalg.vector_norm(W, ord=float("inf")))
    if peak == 0.0 or 2.0**-SAFE_SCALE_EXP <= peak <= 2.0**SAFE_SCALE_EXP:
        return 1.0
    return math.ldexp(1.0, math.frexp(peak)[1])


def scale_invariant(project: Any) -> Any:
    """Decorate a format's ``project(cls, W, budget, **options)`` to fit ``W / s`` and return
    the result scaled back by ``s`` (:func:`fit_scale`) in one factor.

    The projection is then as good at any finite scale of ``W`` as at an ordinary one, and
    never returns non-finite factors for a finite ``W`` whose squares would over- or
    underflow; for ``s = 1`` (ordinary magnitudes) it is the undecorated call.
    """

    @functools.wraps(project)
    def run(cls: Any, W: torch.Tensor, budget: int, **options: Any) -> StructuredMatrix:
        s = fit_scale(W)
        if s == 1.0:
            return project(cls, W, budget, **options)
        out = project(cls, W / s, budget, **options)
        scaled = out._scaled(s)
        scaled.info = {**out.info, "input_scale": s}
        return scaled

    return run


def take_rows(X: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``X[index]`` for ``X`` (n, k), keeping a batch-major ``X`` batch-major (one gather)."""
    if batch_major(X):
        return X.T.index_select(1, index).T
    return X.index_select(0, index)


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
    #: numpy defers ``ndarray @ A`` (and other operators) to this class's reflected methods
    #: (``__rmatmul__``) instead of wrapping ``A`` in a 0-d object array
    __array_ufunc__ = None
    #: Attributes that hold what products cache (layouts, plans; rebuilt on demand): not
    #: pickled, so a matrix that has run products ships as compactly as a fresh one.
    _CACHE_ATTRS: ClassVar[tuple[str, ...]] = ("_layouts", "_plan_refs")

    def __init__(self, shape: tuple[int, int]) -> None:
        self.shape = (int(shape[0]), int(shape[1]))
        self.info: dict[str, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for name in self._CACHE_ATTRS:
            state.pop(name, None)
        return state

    def _drop_caches(self) -> None:
        """Forget what products cached (:attr:`_CACHE_ATTRS`); they are rebuilt on demand."""
        for name in self._CACHE_ATTRS:
            self.__dict__.pop(name, None)

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

    def _rmatmul(self, X: torch.Tensor) -> torch.Tensor:
        """``X @ A`` for ``X`` of shape ``(k, m)`` (validated); returns ``(k, n)``."""
        return self._transpose()._matmul(X.T).T

    #: Formats with a fused layer product define ``_linear(x, bias)``: ``x @ A.T + bias``
    #: for ``x`` of shape ``(k, n)`` (same dtype and device, ``bias`` None or of shape
    #: ``(m,)`` in that dtype), returning ``(k, m)`` row-major, differentiable; or ``None``
    #: where the format has no fused form for that call.
    _linear: Any = None

    def _scaled(self, s: float) -> StructuredMatrix:
        """A copy equal to ``s * A``: the first floating tensor of :meth:`_tensors` times ``s``.

        Every format is linear in that one tensor (dense: the weight, low-rank / BLAST / GBLR /
        block-low-rank: ``U``, Monarch: ``w1``, block-sparse: the blocks); a format where it
        is not overrides this. ``info`` is copied.
        """
        tensors = dict(self._tensors())
        for k, t in tensors.items():
            if t.is_floating_point():
                tensors[k] = t * s
                break
        out = type(self)._from_state(tensors, self._config(), self.shape)
        out.info = dict(self.info)
        return out

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

    def _operand(self, X: Any, size: int) -> tuple[torch.Tensor, bool]:
        """Validated ``(size, k)`` operand on this matrix's device and dtype (cheap when it is)."""
        ts = self._float_tensors()
        dtype, device = (ts[0].dtype, ts[0].device) if ts else (self.dtype, self.device)
        if (
            isinstance(X, torch.Tensor)
            and X.dtype == dtype
            and X.device == device
            and 1 <= X.ndim <= 2
            and X.shape[0] == size
        ):
            return (X.unsqueeze(1), True) if X.ndim == 1 else (X, False)
        X2, is_vec = as_operand(X, size, "X")
        return X2.to(device=device, dtype=dtype), is_vec

    def __matmul__(self, X: Any) -> torch.Tensor:
        X2, is_vec = self._operand(X, self.shape[1])
        Y = self._matmul(X2)
        return Y.squeeze(1) if is_vec else Y

    def __rmatmul__(self, X: Any) -> torch.Tensor:
        """``X @ A`` for ``X`` of shape ``(m,)`` or ``(k, m)``; no transposed copy of ``A``."""
        t = X if isinstance(X, torch.Tensor) else torch.as_tensor(X)
        if t.ndim > 2:
            raise ValueError(
                f"X must be a vector (m,) or a matrix (k, m); got shape {tuple(t.shape)}"
            )
        X2, is_vec = self._operand(t if t.ndim < 2 else t.T, self.shape[0])
        Y = self._rmatmul(X2.T)
        return Y.squeeze(0) if is_vec else Y

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        # ``tensor @ A``: torch asks its operands first; answering here skips the TypeError that
        # torch would otherwise raise (and turn into NotImplemented) before __rmatmul__ runs
        if (
            func in (torch.Tensor.__matmul__, torch.matmul)
            and not kwargs
            and len(args) == 2
            and isinstance(args[1], StructuredMatrix)
            and not isinstance(args[0], StructuredMatrix)
        ):
            return args[1].__rmatmul__(args[0])
        return NotImplemented

    def matvec(self, x: Any) -> torch.Tensor:
        """Alias of ``A @ x``."""
        return self @ x

    def to(
        self,
        device: torch.device | str | torch.dtype | None = None,
        dtype: torch.dtype | None = None,
    ) -> StructuredMatrix:
        """Copy to another device and/or floating dtype (index tensors keep their dtype).

        As with ``torch.Tensor.to``, a dtype may be given as the first positional argument:
        ``A.to(torch.float64)`` is ``A.to(dtype=torch.float64)``.
        """
        if isinstance(device, torch.dtype):
            if dtype is not None:
                raise TypeError(
                    f"to() got two dtypes ({device} positionally and dtype={dtype}); pass "
                    "to(device, dtype) or to(dtype)"
                )
            device, dtype = None, device
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating-point torch.dtype; got {dtype}")
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
        ``info``; loading with :func:`gblr_approx.load` is bit-exact. The write is atomic
        (:func:`write_safetensors`): an interrupted save keeps the previous file.
        """
        from .. import __version__

        tensors = {k: t.detach().contiguous().cpu() for k, t in self._tensors().items()}
        meta = {
            "format": self.format_name,
            "shape": json.dumps(list(self.shape)),
            "format_version": str(FORMAT_VERSION),
            "config": json.dumps(self._config()),
            "info": json.dumps(self.info, default=str),
            "gblr_approx_version": __version__,
        }
        return write_safetensors(path, tensors, meta)


def write_safetensors(
    path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]
) -> Path:
    """Write a ``.safetensors`` file atomically: into a temporary file beside ``path``, then
    renamed over it (``os.replace``).

    An interrupted or failed write (Ctrl-C, a full disk) leaves any previous file at ``path``
    as it was and no partial file behind. Parent folders are created. Returns ``path``.
    """
    import os
    import uuid

    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return path


def read_safetensors(path: str | Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """``(metadata, tensors)`` of a ``.safetensors`` file, tensors on the CPU.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for one safetensors
    cannot read. The tensors are copies: those read sit at unaligned offsets of the file
    buffer, where BLAS takes other kernels and products differ from the saved matrix's in the
    last bit.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k).clone() for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types
        raise ValueError(f"{path} is not a readable .safetensors file: {exc}") from exc
    return meta, tensors


def load(path: str | Path, device: torch.device | str | None = None) -> StructuredMatrix:
    """Load a structured matrix saved with :meth:`StructuredMatrix.save`.

    Parameters
    ----------
    path : str or Path
        A ``.safetensors`` file written by ``save``.
    device : optional
        Device to place the tensors on (default CPU).
    """
    # normal tensors even under torch.inference_mode(): inference tensors have no version
    # counter, so the products' cached layouts would be rebuilt at every call
    with torch.inference_mode(False):
        return _load(Path(path), device)


def _load(path: Path, device: torch.device | str | None) -> StructuredMatrix:
    """:func:`load` (outside inference mode)."""
    meta, tensors = read_safetensors(path)
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
