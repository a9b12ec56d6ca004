"""Calibration: input Gram matrices of a model's linear layers, and text that ships with Python.

A data-aware projection of a layer ``y = W x + b`` minimises the output error over calibration
inputs ``X = [x_1, ..., x_N]`` (columns), ``||(W - A) X||_F^2 = tr((W - A) G (W - A)^T)`` with
the *input Gram matrix* ``G = X X^T`` (``n x n``, ``n`` = in_features). :func:`collect_grams`
accumulates ``G`` for every selected :class:`torch.nn.Linear` with forward hooks while user code
runs the model, without storing activations: memory ``O(n^2)`` per layer, cost ``N n^2`` MACs per
layer.

:func:`model_card_sentences` and :func:`stdlib_docstrings` return text that ships with an
installed package (a model card, the standard library's docstrings), used as calibration and
evaluation text in tests, benchmarks and docs, so no sentence is chosen by hand.
"""

from __future__ import annotations

import fnmatch
import importlib
import inspect
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

__all__ = [
    "collect_grams",
    "select_linears",
    "find_linears",
    "LinearSelection",
    "module_names",
    "model_card_sentences",
    "stdlib_docstrings",
    "STDLIB_MODULES",
    "STDLIB_EVAL_MODULES",
]

#: Standard-library modules whose docstrings :func:`stdlib_docstrings` reads by default
#: (fixed order): the calibration text of the tests, benchmarks and docs.
STDLIB_MODULES = (
    "argparse", "collections", "csv", "datetime", "email.message", "functools", "json",
    "logging", "os", "pathlib", "random", "re", "shutil", "socket", "statistics", "string",
    "subprocess", "tarfile", "textwrap", "threading", "urllib.parse", "zipfile",
)

#: A disjoint set of modules for evaluation text (``stdlib_docstrings(modules=...)``).
STDLIB_EVAL_MODULES = (
    "asyncio", "calendar", "configparser", "decimal", "difflib", "fractions", "ftplib",
    "gzip", "heapq", "http.client", "imaplib", "inspect", "ipaddress", "itertools", "locale",
    "mailbox", "operator", "pickle", "pprint", "queue", "sched", "smtplib", "sqlite3",
    "tempfile", "timeit", "typing", "unittest", "uuid", "wave", "xml.dom.minidom",
)


def _patterns(value: Any, name: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(p, str) for p in value):
        return list(value)
    raise TypeError(f"{name} must be a glob pattern or a list of them; got {value!r}")


#: Why a matching ``nn.Linear`` is left out: its owner reads ``.weight`` directly, so a
#: structured replacement (which has no dense weight) would make the model crash.
SKIP_MHA = ("owned by an nn.MultiheadAttention, which reads out_proj.weight and .bias "
            "directly and never calls the module")
SKIP_ENCODER_FASTPATH = ("linear1/linear2 of an nn.TransformerEncoderLayer: torch's eval "
                         "fast path (TransformerEncoderLayer, TransformerEncoder) reads their "
                         ".weight directly")


class LinearSelection(NamedTuple):
    """What :func:`find_linears` selects.

    Attributes
    ----------
    layers : list of (name, nn.Linear)
        One entry per selected module, under its first name in ``model.named_modules()``
        order (the name Grams, reports and saved files use).
    aliases : dict
        Name in ``layers`` -> every name of that module (itself first), for modules that are
        reachable under more than one name (tied or reused layers); absent otherwise.
    skipped : dict
        Name -> reason, for the modules that match the patterns but are not selected because
        their owner reads their weight directly (:data:`SKIP_MHA`,
        :data:`SKIP_ENCODER_FASTPATH`).
    """

    layers: list[tuple[str, nn.Linear]]
    aliases: dict[str, list[str]]
    skipped: dict[str, str]


def module_names(model: nn.Module, kind: type = nn.Module) -> dict[nn.Module, list[str]]:
    """Every module of type ``kind`` in ``model`` -> all its names, in ``named_modules()``
    order (the first is the one ``model.named_modules()`` gives; tied or reused modules have
    more than one)."""
    out: dict[nn.Module, list[str]] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        if isinstance(mod, kind):
            out.setdefault(mod, []).append(name)
    return out


def _skip_reason(model: nn.Module, name: str) -> str | None:
    """Why the linear at ``name`` may not be replaced (its owner reads its weight), or None."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if name else None
    if isinstance(parent, nn.MultiheadAttention):
        return SKIP_MHA
    if isinstance(parent, nn.TransformerEncoderLayer) and child in ("linear1", "linear2"):
        return SKIP_ENCODER_FASTPATH
    return None


def find_linears(
    model: nn.Module, include: str | list[str] = "*", exclude: str | list[str] | None = None
) -> LinearSelection:
    """The ``nn.Linear`` modules of ``model`` matching the glob patterns, with their aliases
    and the matching modules that cannot be replaced.

    A module reachable under several names (``model.b = model.a``) is one layer: selected
    when any of its names matches ``include`` and none matches ``exclude`` (excluding one
    name keeps the shared module as it is, so tied weights stay tied). A module owned by an
    ``nn.MultiheadAttention`` (its ``out_proj``), or ``linear1``/``linear2`` of an
    ``nn.TransformerEncoderLayer``, is skipped with a reason: torch reads their ``.weight``
    directly. Does not raise when nothing matches (see :func:`select_linears`).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    inc, exc = _patterns(include, "include"), _patterns(exclude, "exclude")
    names = module_names(model, nn.Linear)
    layers: list[tuple[str, nn.Linear]] = []
    aliases: dict[str, list[str]] = {}
    skipped: dict[str, str] = {}
    for mod, all_names in names.items():
        if not any(fnmatch.fnmatchcase(n, p) for n in all_names for p in inc):
            continue
        if any(fnmatch.fnmatchcase(n, p) for n in all_names for p in exc):
            continue
        reason = next(filter(None, (_skip_reason(model, n) for n in all_names)), None)
        if reason is not None:
            skipped[all_names[0]] = reason
            continue
        layers.append((all_names[0], mod))
        if len(all_names) > 1:
            aliases[all_names[0]] = list(all_names)
    return LinearSelection(layers, aliases, skipped)


def select_linears(
    model: nn.Module, include: str | list[str] = "*", exclude: str | list[str] | None = None
) -> list[tuple[str, nn.Linear]]:
    """``(name, module)`` of the ``nn.Linear`` layers of ``model`` matching the glob patterns.

    Parameters
    ----------
    include, exclude : glob pattern(s) on the names of ``model.named_modules()``.

    Returns
    -------
    list of (name, nn.Linear)
        One entry per module (a module shared under several names appears once, under its
        first name); modules whose owner reads their weight directly (the ``out_proj`` of
        ``nn.MultiheadAttention``, ``linear1``/``linear2`` of ``nn.TransformerEncoderLayer``)
        are left out. :func:`find_linears` also returns the aliases and the skipped modules.

    Raises
    ------
    ValueError
        When no ``nn.Linear`` matches.
    """
    sel = find_linears(model, include, exclude)
    if not sel.layers:
        why = "".join(f"; {n!r} skipped: {r}" for n, r in list(sel.skipped.items())[:3])
        raise ValueError(
            f"no nn.Linear module matches include={include!r}, exclude={exclude!r}{why}")
    return sel.layers


def collect_grams(
    model: nn.Module,
    run: Callable[[], Any],
    include: str | list[str] = "*",
    *,
    exclude: str | list[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Input Gram matrices ``G = sum_t x_t x_t^T`` of the selected linear layers.

    Parameters
    ----------
    model : torch.nn.Module
    run : callable
        Called once with no arguments; it runs the model on calibration data, e.g.
        ``lambda: st_model.encode(texts)``. Every input row reaching a selected layer (all
        tokens of all sequences, padding included if the caller feeds it) adds ``x x^T``.
    include, exclude : glob pattern(s) on module names, as in :func:`select_linears`.

    Returns
    -------
    GramDict
        A ``dict`` module name -> Gram matrix of shape ``(in_features, in_features)``, float64
        on the CPU, in model order; ``.counts`` maps each name to the number of input rows.

    Notes
    -----
    Accumulation is in float64 on the CPU (``N n^2`` MACs per layer for ``N`` rows); the hooks
    are removed even if ``run`` raises.

    Raises
    ------
    RuntimeError
        If ``run()`` never calls a selected layer.
    """
    if not callable(run):
        raise TypeError(f"run must be a callable taking no arguments; got {type(run).__name__}")
    targets = select_linears(model, include, exclude)
    grams = GramDict()
    handles = []

    def make_hook(name: str, n: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                 output: Any) -> None:
            inp = args[0] if args else kwargs["input"]  # nn.Linear.forward(input)
            x = inp.detach().reshape(-1, n).to(device="cpu", dtype=torch.float64)
            if name not in grams:
                grams[name] = torch.zeros(n, n, dtype=torch.float64)
                grams.counts[name] = 0
            grams[name].addmm_(x.T, x)
            grams.counts[name] += x.shape[0]

        return hook

    for name, mod in targets:
        handles.append(mod.register_forward_hook(make_hook(name, mod.in_features),
                                                 with_kwargs=True))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    missing = [name for name, _ in targets if name not in grams]
    if len(missing) == len(targets):
        raise RuntimeError("run() never called any selected layer; no Gram matrix was collected")
    if missing:
        raise RuntimeError(f"run() never called the selected layers {missing}")
    return GramDict({name: grams[name] for name, _ in targets}, counts=grams.counts)


class GramDict(dict):
    """``dict`` name -> Gram matrix, with ``counts`` (name -> number of input rows)."""

    def __init__(self, *args: Any, counts: dict[str, int] | None = None) -> None:
        super().__init__(*args)
        self.counts: dict[str, int] = dict(counts or {})


# ------------------------------------------------------------------ shipped text
def model_card_sentences(model_dir: str | Path, min_words: int = 4) -> list[str]:
    """Sentences of the ``README.md`` model card in a Hugging Face model folder.

    Markdown markup (code fences, tables, links, headings markers, YAML front matter) is
    dropped; the prose is split at sentence ends. Lines with fewer than ``min_words`` words
    are skipped. The order is the file's.
    """
    path = Path(model_dir)
    path = path / "README.md" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"no model card at {path}")
    text = path.read_text(encoding="utf-8")
    text = re.sub(r"\A---\n.*?\n---\n", "", text, flags=re.S)  # YAML front matter
    text = re.sub(r"```.*?```", " ", text, flags=re.S)  # code blocks
    out: list[str] = []
    for para in re.split(r"\n\s*\n", text):
        lines = [ln for ln in para.splitlines() if not ln.lstrip().startswith(("|", "#", "<"))]
        para = " ".join(ln.strip(" -*>") for ln in lines)
        para = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", para)  # links -> their text
        para = re.sub(r"[`*_]", "", para)
        for sent in re.split(r"(?<=[.!?])\s+", para):
            sent = sent.strip()
            if len(sent.split()) >= min_words:
                out.append(sent)
    return out


def stdlib_docstrings(
    limit: int | None = None, modules: tuple[str, ...] = STDLIB_MODULES, min_words: int = 4
) -> list[str]:
    """First paragraphs of the docstrings of public standard-library functions and classes.

    Walks ``modules`` in the given order and their public members in alphabetical order,
    keeping each docstring's first paragraph (whitespace collapsed, at most 400 characters)
    when it has at least ``min_words`` words; duplicates are dropped. Deterministic for a
    given Python version.
    """
    out: list[str] = []
    seen: set[str] = set()
    for modname in modules:
        mod = importlib.import_module(modname)
        for attr in sorted(dir(mod)):
            if attr.startswith("_"):
                continue
            obj = getattr(mod, attr, None)
            if not (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj)):
                continue
            doc = inspect.getdoc(obj)
            if not doc:
                continue
            para = " ".join(doc.split("\n\n")[0].split())[:400]
            if len(para.split()) < min_words or para in seen:
                continue
            seen.add(para)
            out.append(para)
            if limit is not None and len(out) >= limit:
                return out
    return out
