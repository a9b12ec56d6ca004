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
from typing import Any

import torch
from torch import nn

__all__ = [
    "collect_grams",
    "select_linears",
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


def select_linears(
    model: nn.Module, include: str | list[str] = "*", exclude: str | list[str] | None = None
) -> list[tuple[str, nn.Linear]]:
    """``(name, module)`` of the ``nn.Linear`` layers of ``model`` matching the glob patterns.

    Parameters
    ----------
    include, exclude : glob pattern(s) on the names of ``model.named_modules()``.

    Raises
    ------
    ValueError
        When no ``nn.Linear`` matches.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    inc, exc = _patterns(include, "include"), _patterns(exclude, "exclude")
    out = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear)
        and any(fnmatch.fnmatchcase(name, p) for p in inc)
        and not any(fnmatch.fnmatchcase(name, p) for p in exc)
    ]
    if not out:
        raise ValueError(f"no nn.Linear module matches include={include!r}, exclude={exclude!r}")
    return out


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
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            x = args[0].detach().reshape(-1, n).to(device="cpu", dtype=torch.float64)
            if name not in grams:
                grams[name] = torch.zeros(n, n, dtype=torch.float64)
                grams.counts[name] = 0
            grams[name].addmm_(x.T, x)
            grams.counts[name] += x.shape[0]

        return hook

    for name, mod in targets:
        handles.append(mod.register_forward_hook(make_hook(name, mod.in_features)))
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
