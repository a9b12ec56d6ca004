"""``gblr-approx compress`` and ``gblr-approx evaluate``: a local Hugging Face model folder.

``compress MODEL_DIR --budget 0.5 --formats auto --calibration TEXTS --out FILE`` loads the model
(sentence-transformers when the folder has ``modules.json``, else ``transformers.AutoModel``),
collects the input Grams of the selected linear layers on the calibration text, estimates each
layer's sensitivity (:func:`gblr_approx.nn.layer_sensitivity`, on the first 128 texts), runs
:func:`gblr_approx.nn.compress_model` with ``allocation="global"`` and writes the structured
layers with :func:`gblr_approx.nn.save_compressed`. ``evaluate MODEL_DIR FILE --texts TEXTS``
prints the cosine similarity of the compressed model's embeddings to the dense model's
(sentence embeddings; mean-pooled last hidden states for a plain transformers model).

TEXTS is a UTF-8 file with one text per line (blank lines skipped), or ``stdlib`` for the
docstrings of the Python standard library (:func:`gblr_approx.calibration.stdlib_docstrings`)
or ``stdlib-eval`` for those of a disjoint module list. Needs the ``hf`` extra.

``--out`` is never a file of MODEL_DIR and an existing ``--out`` needs ``--force`` (exit 2,
as for ``project``). ``gblr-approx --quiet`` (and ``--json``) silence the status lines; with
``--quiet`` the transformers / Hugging Face Hub progress bars and log messages are off too
(their switches are restored afterwards).
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

__all__ = ["compress", "evaluate"]

SENSITIVITY_TEXTS = 128

#: Options ``compress`` accepts for every format on top of its projection's own: those of the
#: data-aware projection (:func:`gblr_approx.data_aware.project_data_aware`).
DATA_AWARE_OPTIONS = ("ridge", "sweeps", "scaled")


def _texts(spec: str, param: str) -> list[str]:
    from .calibration import STDLIB_EVAL_MODULES, stdlib_docstrings

    if spec == "stdlib":
        return stdlib_docstrings()
    if spec == "stdlib-eval":
        seen = set(stdlib_docstrings())
        return [d for d in stdlib_docstrings(modules=STDLIB_EVAL_MODULES) if d not in seen]
    path = Path(spec)
    if not path.is_file():
        raise click.BadParameter(f"no such file: {spec} (or give 'stdlib' / 'stdlib-eval')",
                                 param_hint=param)
    out = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not out:
        raise click.BadParameter(f"{spec} has no non-empty line", param_hint=param)
    return out


@contextlib.contextmanager
def _hf_quiet(quiet: bool) -> Iterator[None]:
    """Turn off the transformers / huggingface_hub progress bars and info logs while inside.

    Does nothing unless ``quiet``; the previous switches (progress bars, transformers log
    verbosity) are restored on exit, so a Python caller's settings survive the command.
    """
    if not quiet:
        yield
        return
    with contextlib.ExitStack() as stack:
        try:
            from transformers.utils import logging as tf_logging
        except ImportError:
            tf_logging = None
        if tf_logging is not None:
            bars_on = tf_logging.is_progress_bar_enabled()
            verbosity = tf_logging.get_verbosity()
            tf_logging.disable_progress_bar()
            tf_logging.set_verbosity_error()

            def _restore_transformers() -> None:
                tf_logging.set_verbosity(verbosity)
                if bars_on:
                    tf_logging.enable_progress_bar()

            stack.callback(_restore_transformers)
        try:
            from huggingface_hub.utils import (
                are_progress_bars_disabled,
                disable_progress_bars,
                enable_progress_bars,
            )
        except ImportError:
            pass
        else:
            if not are_progress_bars_disabled():
                disable_progress_bars()
                stack.callback(enable_progress_bars)
        yield


class _Loaded:
    """A model with ``encode(texts) -> Tensor (N, d)`` and a differentiable ``forward``."""

    def __init__(self, model_dir: Path, batch_size: int = 32, quiet: bool = False) -> None:
        import torch

        self.batch_size = batch_size
        if not model_dir.is_dir():
            raise click.BadParameter(f"{model_dir} is not a folder", param_hint="MODEL_DIR")
        if (model_dir / "modules.json").is_file():
            try:
                from sentence_transformers import SentenceTransformer
            except ImportError as exc:
                raise click.ClickException(
                    "this is a sentence-transformers folder: pip install 'gblr_approx[hf]'"
                ) from exc
            st = SentenceTransformer(str(model_dir), device="cpu")
            self.model = st
            self.kind = "sentence-transformers"

            def encode(texts: list[str]) -> torch.Tensor:
                kw = {"show_progress_bar": False} if quiet else {}
                return torch.as_tensor(st.encode(texts, batch_size=batch_size,
                                                 convert_to_numpy=True, **kw))

            prep = getattr(st, "preprocess", None) or st.tokenize  # tokenize: before ST 5

            def forward(texts: list[str]) -> torch.Tensor:
                return st(prep(texts))["sentence_embedding"]
        else:
            try:
                from transformers import AutoModel, AutoTokenizer
            except ImportError as exc:
                raise click.ClickException("pip install 'gblr_approx[hf]'") from exc
            tok = AutoTokenizer.from_pretrained(str(model_dir))
            hf = AutoModel.from_pretrained(str(model_dir)).eval()
            self.model = hf
            self.kind = "transformers"

            def forward(texts: list[str]) -> torch.Tensor:
                batch = tok(texts, padding=True, truncation=True, return_tensors="pt")
                h = hf(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
                return (h * mask).sum(1) / mask.sum(1).clamp_min(1)

            def encode(texts: list[str]) -> torch.Tensor:
                with torch.no_grad():
                    return torch.cat([forward(texts[i: i + batch_size])
                                      for i in range(0, len(texts), batch_size)])
        self.encode: Callable[[list[str]], torch.Tensor] = encode
        self.forward: Callable[[list[str]], torch.Tensor] = forward


def _default_include(model: Any) -> str:
    from torch import nn

    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return "*encoder.layer.*" if any(".encoder.layer." in f".{n}" for n in names) else "*"


def _say(msg: str, quiet: bool) -> None:
    if not quiet:
        click.echo(msg, err=True)


@click.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--budget", default="0.5", show_default=True,
              help="Fraction of the selected layers' dense MACs (0.5 or 50%) or total MACs.")
@click.option("--formats", "formats", default="auto", show_default=True,
              help="'auto' or a comma list of formats.")
@click.option("--calibration", "calibration", required=True,
              help="Text file (one text per line), or 'stdlib'.")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Output .safetensors file (structured layers + manifest); never a file "
                   "of MODEL_DIR.")
@click.option("--force", is_flag=True,
              help="Overwrite --out if it exists (never when it is a file of MODEL_DIR).")
@click.option("--allocation", type=click.Choice(["global", "uniform"]), default="global",
              show_default=True)
@click.option("--include", multiple=True, help="Glob(s) on module names (default: the "
              "encoder layers when there are any, else every nn.Linear).")
@click.option("--exclude", multiple=True, help="Glob(s) on module names to skip.")
@click.option("--option", "options", multiple=True, metavar="FORMAT.KEY=VALUE",
              help="Format option, e.g. gblr.layout=free (GBLR layers default to the "
              "runnable tiled layout). Repeatable.")
@click.option("--sensitivity/--no-sensitivity", default=True, show_default=True,
              help="Weight each layer's output error by its estimated effect on the output.")
@click.option("--max-texts", type=click.IntRange(min=1), default=None,
              help="Use only the first N texts (N >= 1).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch intra-op threads.")
@click.option("--scheduler", metavar="ADDRESS",
              help="Fit the layers on Dask: 'local' (a LocalCluster of --workers processes) "
                   "or a scheduler address such as tcp://host:8786. Needs gblr_approx[dask].")
@click.option("--workers", "-j", type=click.IntRange(min=1), default=1, show_default=True,
              help="LocalCluster size with --scheduler local (1: one per core).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def compress(model_dir, budget, formats, calibration, out, force, allocation, include, exclude,
             options, sensitivity, max_texts, threads, scheduler, workers, as_json) -> None:
    """Compress the linear layers of a local Hugging Face model folder.

    --out never replaces a file of MODEL_DIR, and an existing --out needs --force.
    """
    import torch

    from . import cli
    from .compress import AUTO_FORMATS

    if threads:
        torch.set_num_threads(threads)
    b = cli._parse_budget(budget)
    fmts: Any = "auto" if formats == "auto" else [
        cli._check_format(f, "--formats")
        for f in cli._split_given([formats], "--formats", "format")]
    fmt_options = cli._format_options(
        options, list(AUTO_FORMATS) if fmts == "auto" else fmts, "compressed to",
        extra=DATA_AWARE_OPTIONS)
    texts = _texts(calibration, "--calibration")
    if max_texts is not None:
        texts = texts[:max_texts]
    out = cli._guard_out(out, _model_files(model_dir), force)
    quiet = as_json or cli._quiet()
    with _hf_quiet(cli._quiet()):
        _compress(model_dir, b, fmts, formats, fmt_options, texts, out, allocation, include,
                  exclude, sensitivity, scheduler, workers, as_json, quiet)


def _model_files(model_dir: Path) -> list[Path]:
    """Every file of MODEL_DIR: the inputs ``--out`` may not be (a new file beside them is
    fine, e.g. ``MODEL_DIR/compressed.safetensors``)."""
    if not model_dir.is_dir():
        return [model_dir]
    return sorted(p for p in model_dir.rglob("*") if p.is_file())


def _compress(model_dir: Path, b: float | int, fmts: Any, formats: str,
              fmt_options: dict[str, dict[str, Any]], texts: list[str], out: Path,
              allocation: str, include: tuple[str, ...], exclude: tuple[str, ...],
              sensitivity: bool, scheduler: str | None, workers: int, as_json: bool,
              quiet: bool) -> None:
    """The body of ``compress`` once its arguments are checked (see :func:`compress`)."""
    from . import cli
    from .nn import collect_grams, compress_model, layer_sensitivity, save_compressed

    t0 = time.perf_counter()
    _say(f"loading {model_dir} ...", quiet)
    loaded = _Loaded(model_dir, quiet=cli._quiet())
    model = loaded.model
    inc: Any = list(include) if include else _default_include(model)
    exc: Any = list(exclude) if exclude else None
    _say(f"calibration: input Grams on {len(texts)} texts ...", quiet)
    grams = collect_grams(model, lambda: loaded.encode(texts), inc, exclude=exc)
    sens = None
    if sensitivity and allocation == "global":
        sub = texts[:SENSITIVITY_TEXTS]
        _say(f"sensitivities on {len(sub)} texts ...", quiet)
        sens = layer_sensitivity(model, lambda: loaded.forward(sub), inc, exclude=exc)
    _say(f"compressing {len(grams)} layers ({allocation}, formats={formats}) ...", quiet)
    report = compress_model(model, fmts, b, include=list(grams), calibration=grams,
                            allocation=allocation, sensitivity=sens,
                            format_options=fmt_options,
                            progress=None if not quiet else False, scheduler=scheduler,
                            workers=workers)
    save_compressed(model, out)
    seconds = time.perf_counter() - t0
    a = report.attrs
    summary = {
        "model": str(model_dir), "kind": loaded.kind, "layers": len(report),
        "budget_macs": a["budget"], "flops": a["total_flops"], "dense_flops": a["dense_flops"],
        "budget_fraction": a["total_flops"] / a["dense_flops"], "allocation": allocation,
        "formats": a["formats"], "calibration_texts": len(texts), "out": str(out),
        "seconds": seconds,
    }
    rows = [{"layer": name, **{k: r[k] for k in ("format", "flops", "budget_fraction",
                                                  "rel_error", "output_error")}}
            for name, r in report.iterrows()]
    if as_json:
        cli._print_json({"summary": summary, "layers": rows})
        return
    cli._print_table(rows, ["layer", "format", "flops", "budget_fraction", "rel_error",
                            "output_error"], {"budget_fraction": ".3f", "rel_error": ".3f",
                                              "output_error": ".3f"})
    click.echo("")
    counts = report.groupby("format")["flops"].agg(["count", "sum"])
    click.echo("formats: " + ", ".join(f"{f} x{int(c['count'])}" for f, c in counts.iterrows()))
    cli._print_kv({k: v for k, v in summary.items() if k != "formats"})


@click.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.argument("compressed_file", type=click.Path(path_type=Path))
@click.option("--texts", "texts_spec", required=True,
              help="Text file (one text per line), or 'stdlib-eval' / 'stdlib'.")
@click.option("--max-texts", type=click.IntRange(min=1), default=None,
              help="Use only the first N texts (N >= 1).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch intra-op threads.")
@click.option("--json", "as_json", is_flag=True)
def evaluate(model_dir, compressed_file, texts_spec, max_texts, threads, as_json) -> None:
    """Cosine similarity of the compressed model's embeddings to the dense model's."""
    import torch

    from . import cli
    from .nn import StructuredLinear, load_compressed

    if threads:
        torch.set_num_threads(threads)
    if not compressed_file.is_file():
        raise click.BadParameter(f"no such file: {compressed_file}",
                                 param_hint="COMPRESSED_FILE")
    texts = _texts(texts_spec, "--texts")
    if max_texts is not None:
        texts = texts[:max_texts]
    quiet = cli._quiet()
    with _hf_quiet(quiet):
        dense = _Loaded(model_dir, quiet=quiet)
        ref = dense.encode(texts)
        small = _Loaded(model_dir, quiet=quiet)
        load_compressed(small.model, compressed_file)
        emb = small.encode(texts)
    cos = torch.nn.functional.cosine_similarity(emb.double(), ref.double(), dim=1)
    layers = [m for m in small.model.modules() if isinstance(m, StructuredLinear)]
    rec = {
        "texts": len(texts), "mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()),
        "median_cosine": float(cos.median()), "structured_layers": len(layers),
        "structured_flops": sum(m.flops for m in layers),
    }
    cli._print_json(rec) if as_json else cli._print_kv(rec)
    sys.stdout.flush()
