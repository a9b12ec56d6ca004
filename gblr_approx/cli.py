"""``gblr-approx``: the command-line interface (click).

Subcommands mirror the Python API: ``inspect``, ``sweep``, ``project``, ``fit``, ``spectrum``,
``convert`` (and ``plot`` when installed). Each prints a readable table, or JSON with
``--json``. Exit codes: 0 success, 2 bad usage (unknown option or format, malformed budget,
missing file, an output that exists or is an input), 1 failure (including a ``sweep`` or
``spectrum`` in which nothing succeeded), with a one-line reason on stderr (``gblr-approx
--debug ...`` shows the traceback instead). Python warnings are printed as one line each
(``warning: ...``); ``gblr-approx --quiet ...`` hides them and the progress bars.
"""

from __future__ import annotations

import decimal
import json
import math
import os
import re
import sys
import time
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import click

__all__ = ["main"]

_SAMPLE = "the embedded MiniLM sample (gblr_approx.datasets.minilm_sample())"


# ---------------------------------------------------------------------------- error policy
class _Group(click.Group):
    """A click group turning any exception into a one-line failure (exit 1); Ctrl-C exits
    130 (what finished is kept: sweeps resume from their rows file)."""

    def invoke(self, ctx: click.Context) -> Any:
        quiet = bool(ctx.params.get("quiet"))
        saved_env = os.environ.get("PYTHONWARNINGS")
        try:
            with warnings.catch_warnings():
                if quiet:
                    warnings.simplefilter("ignore")
                    os.environ["PYTHONWARNINGS"] = "ignore"  # worker processes too
                warnings.showwarning = _show_warning
                return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except KeyboardInterrupt:  # Ctrl-C: the shell convention 128 + SIGINT, not 1
            click.echo("Interrupted.", err=True)
            ctx.exit(130)
        except BrokenPipeError:  # e.g. `gblr-approx inspect ... | head`: stop quietly
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            ctx.exit(1)
        except Exception as exc:
            if ctx.params.get("debug") or os.environ.get("GBLR_APPROX_DEBUG"):
                raise
            raise click.ClickException(_one_line(exc)) from exc
        finally:
            if quiet:
                if saved_env is None:
                    os.environ.pop("PYTHONWARNINGS", None)
                else:
                    os.environ["PYTHONWARNINGS"] = saved_env


def _show_warning(message: Warning | str, category: type[Warning], filename: str,
                  lineno: int, file: Any = None, line: str | None = None) -> None:
    """A Python warning as one line on stderr (no source file, no source line)."""
    text = " ".join(str(message).split())
    name = getattr(category, "__name__", "Warning")
    click.echo(f"warning: {text}" + ("" if name == "UserWarning" else f" ({name})"), err=True)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if isinstance(exc, KeyError) and len(exc.args) == 1:
        text = str(exc.args[0])
        if text.isidentifier() or " " not in text:  # a bare key such as 'w1' says nothing
            text = f"KeyError: missing entry {text!r}"
    if not text:
        text = type(exc).__name__
    elif isinstance(exc, (TypeError, RuntimeError, AttributeError, ImportError)):
        text = f"{type(exc).__name__}: {text}"
    return text


# --------------------------------------------------------------------------- value parsing
def _split(values: Iterable[str]) -> list[str]:
    out: list[str] = []
    for v in values:
        out.extend(p.strip() for p in v.replace(" ", ",").split(",") if p.strip())
    return out


def _split_given(values: Sequence[str], param: str, what: str) -> list[str]:
    """:func:`_split` of an option given on the command line; an empty value is refused.

    Only an absent option means "the default": ``-b ""`` or ``-f ","`` (e.g. an unset shell
    variable) is a usage error instead of silently running every default.
    """
    items = _split(values)
    if values and not items:
        raise click.BadParameter(
            f"{', '.join(repr(v) for v in values)} names no {what}; give at least one, or leave "
            f"the option out for the default", param_hint=param)
    return items


def _parse_budget(text: str, param: str = "--budget") -> float | int:
    """``0.25`` or ``25%`` -> fraction 0.25; ``10000`` -> 10000 MACs.

    A percentage is divided by 100 in decimal arithmetic, so ``2.8%`` is the float ``0.028``
    (the same budget, and the same resume key, as ``-b 0.028``), not 0.027999999999999997.
    """
    from .budget import resolve_budget

    t = text.strip()
    try:
        if t.endswith("%"):
            b: float | int = float(decimal.Decimal(t[:-1].strip()) / 100)
        elif any(c in t.lower() for c in ".e"):
            b = float(t)
        else:
            b = int(t)
        resolve_budget(b, 1, 1)
    except (ValueError, TypeError, ArithmeticError) as exc:  # decimal.InvalidOperation too
        raise click.BadParameter(
            f"{text!r} is not a budget: give a fraction of the dense cost in (0, 1] (e.g. 0.25 "
            f"or 25%) or an integer number of MACs >= 1 ({exc})",
            param_hint=param,
        ) from None
    return b


def _parse_value(text: str) -> Any:
    """JSON (``3``, ``[16, 16]``, ``true``), a comma list (``16,16`` -> tuple) or a string."""
    try:
        v = json.loads(text)
        return tuple(v) if isinstance(v, list) else v
    except ValueError:
        pass
    if "," in text:
        return tuple(_parse_value(p.strip()) for p in text.split(","))
    if text.lower() in ("none", "null"):
        return None
    return text


def _parse_kv(text: str, param: str) -> tuple[str, Any]:
    if "=" not in text:
        raise click.BadParameter(f"{text!r} is not KEY=VALUE", param_hint=param)
    k, v = text.split("=", 1)
    if not k.strip():
        raise click.BadParameter(f"{text!r} has an empty KEY", param_hint=param)
    return k.strip(), _parse_value(v.strip())


def _format_options(
    options: tuple[str, ...], fmts: list[str], verb: str, extra: Sequence[str] = ()
) -> dict[str, dict[str, Any]]:
    """``--option FORMAT.KEY=VALUE`` values as ``{format: {key: value}}``.

    Raises ``click.BadParameter`` for a missing ``FORMAT.``, an unknown format, a format
    not among ``fmts`` (the formats the command runs, ``verb`` e.g. "swept"), or a KEY the
    format's projection does not take (``extra``: keys the command adds, see
    :func:`_check_option_key`), before any fit runs."""
    opts: dict[str, dict[str, Any]] = {}
    for o in options:
        k, v = _parse_kv(o, "--option")
        if "." not in k:
            raise click.BadParameter(f"{o!r}: write FORMAT.KEY=VALUE, e.g. "
                                     "blocksparse.block_shape=16,16", param_hint="--option")
        f, key = k.split(".", 1)
        f = _check_format(f, "--option")
        if f not in fmts:
            raise click.BadParameter(f"{o!r} is for format {f!r}, which is not {verb} ({fmts})",
                                     param_hint="--option")
        _check_option_key(f, key, o, extra)
        opts.setdefault(f, {})[key] = v
    return opts


def _accepted_options(fmt: str) -> list[str] | None:
    """Keyword options of format ``fmt``'s projection; None when it takes any (``**options``:
    GBLR checks its own option names when it runs)."""
    from .formats.base import get_format, projection_options

    return projection_options(get_format(fmt))


def _check_option_key(fmt: str, key: str, given: str, extra: Sequence[str] = ()) -> None:
    """Refuse (usage error) an option ``key`` that format ``fmt``'s projection does not take.

    ``extra``: keys the command accepts on top of the projection's own (e.g. the data-aware
    ``ridge``, ``sweeps``, ``scaled`` of ``compress``).
    """
    accepted = _accepted_options(fmt)
    if accepted is None or key in accepted or key in extra:
        return
    known = [*accepted, *(k for k in extra if k not in accepted)]
    raise click.BadParameter(
        f"{given!r}: format {fmt!r} has no option {key!r}; its options are "
        f"{', '.join(known) if known else '(none)'}", param_hint="--option")


def _check_format(name: str, param: str = "--format") -> str:
    from .formats.base import get_format

    try:
        return get_format(name).format_name
    except (ValueError, TypeError) as exc:
        raise click.BadParameter(str(exc), param_hint=param) from None


# ------------------------------------------------------------------------------- output
def _jsonable(v: Any) -> Any:
    import numpy as np
    import pandas as pd

    if v is None or v is pd.NA:
        return None
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return float(v) if math.isfinite(float(v)) else None
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if hasattr(v, "tolist"):
        return _jsonable(v.tolist())
    return v if isinstance(v, str) else str(v)


def _print_json(obj: Any) -> None:
    click.echo(json.dumps(_jsonable(obj), indent=1, allow_nan=False))


def _fmt(v: Any, spec: str = ".4g") -> str:
    import pandas as pd

    if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def _print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str],
                 specs: dict[str, str] | None = None) -> None:
    """Left-aligned text columns, right-aligned numbers."""
    specs = specs or {}
    cells = [[_fmt(r.get(c), specs.get(c, ".4g")) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    numeric = [bool(rows) and all(_is_num(r.get(c)) for r in rows) for c in columns]

    def line(vals: Sequence[str]) -> str:
        return "  ".join(
            v.rjust(w) if num else v.ljust(w) for v, w, num in zip(vals, widths, numeric,
                                                                    strict=True)
        ).rstrip()

    click.echo(line(list(columns)))
    click.echo(line(["-" * w for w in widths]))
    for row in cells:
        click.echo(line(row))


def _is_num(v: Any) -> bool:
    import numpy as np

    return v is None or (isinstance(v, (int, float, np.integer, np.floating))
                         and not isinstance(v, bool))


def _print_kv(d: dict[str, Any]) -> None:
    w = max(len(k) for k in d)
    for k, v in d.items():
        click.echo(f"{k.ljust(w)}  {_fmt(v, '.6g')}")


# ---------------------------------------------------------------------------- commands
@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks on failure.")
@click.option("--quiet", "-q", is_flag=True,
              help="No warnings and no progress bars (errors and results still print).")
@click.version_option(package_name="gblr_approx", prog_name="gblr-approx")
def main(debug: bool, quiet: bool) -> None:
    """Structured matrix approximation: sweeps, spectra and projections of real weights.

    Budgets are a fraction of the dense cost m*n in (0, 1] (e.g. 0.25 or 25%) or an
    integer number of multiply-accumulates (MACs). Every subcommand accepts --json.
    """


def _quiet() -> bool:
    ctx = click.get_current_context(silent=True)
    return bool(ctx and ctx.find_root().params.get("quiet"))


def _guard_out(out: Path, inputs: Sequence[Path], force: bool) -> Path:
    """Refuse an output that is an input (any path to it) or exists without --force."""
    from .io import check_output

    try:
        return check_output(out, inputs, force=force)
    except (FileExistsError, IsADirectoryError) as exc:
        raise click.BadParameter(str(exc), param_hint="--out") from None


def _check_suffix(out: Path, param: str = "--out") -> Path:
    """Refuse (usage error) an output name not ending in ``.safetensors``.

    A structured matrix is always written as one safetensors file; under a ``.npy`` or ``.pt``
    name no reader (``inspect``, ``sweep``, ``spectrum``) would recognise it.
    """
    if out.suffix.lower() != ".safetensors":
        raise click.BadParameter(
            f"{out} does not end in .safetensors: the matrix is saved as one safetensors "
            f"file; name it e.g. {out.with_suffix('.safetensors')}", param_hint=param)
    return out


_force_opt = click.option("--force", is_flag=True,
                          help="Overwrite --out if it exists (never when it is the input).")
_reshape_opt = click.option("--reshape-conv", is_flag=True,
                            help="Read 4-D conv kernels as out x (in*kh*kw) matrices.")


def _open(path: Path, include: Sequence[str], exclude: Sequence[str], *,
          reshape_conv: bool = False, matrices_only: bool = True):
    from .io import load_weights

    return load_weights(path, list(include) or None, list(exclude) or None,
                        reshape_conv=reshape_conv, matrices_only=matrices_only)


_path_arg = click.Path(exists=True, path_type=Path)
_include_opt = click.option("--include", "-i", multiple=True, metavar="PATTERN",
                            help="Keep tensors whose name matches (glob; 're:' prefix for a "
                                 "regex). Repeatable.")
_exclude_opt = click.option("--exclude", "-x", multiple=True, metavar="PATTERN",
                            help="Drop tensors whose name matches (glob or 're:regex'). "
                                 "Repeatable.")
_json_opt = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
_threads_opt = click.option(
    "--threads", type=click.IntRange(min=1), default=1, show_default=True,
    help="Torch threads (per worker for sweep). More than the free cores can make torch's "
         "SVD far slower on a busy machine.")


def _set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


@main.command()
@click.argument("path", type=_path_arg)
@_include_opt
@_exclude_opt
@click.option("--matrices", "matrices_only", is_flag=True,
              help="List only 2-D floating-point tensors (what sweep and spectrum read).")
@click.option("--reshape-conv", is_flag=True, help="Show 4-D conv kernels as out x (in*kh*kw).")
@_json_opt
def inspect(path: Path, include, exclude, matrices_only, reshape_conv, as_json) -> None:
    """List the tensors of a checkpoint: names, shapes, dtypes, sizes (no values read).

    A structured matrix saved by `project`/`fit`/`convert` (or StructuredMatrix.save) is
    described as such: its format, shape, cost, parameters and stored tensors.
    """
    from .io import structured_metadata

    if structured_metadata(path) is not None:
        _inspect_structured(path, as_json)
        return
    store = _open(path, include, exclude, reshape_conv=reshape_conv, matrices_only=matrices_only)
    rows = [
        {"name": i.name, "shape": "x".join(map(str, i.shape)) or "scalar", "dtype": i.dtype,
         "params": i.numel, "MB": i.nbytes / 1e6, "matrix": i.is_matrix,
         "structured": i.structured, "file": i.file}
        for i in store.infos()
    ]
    if as_json:
        _print_json(rows)
        return
    for r in rows:
        r["matrix"] = "yes" if r["matrix"] else "no"
    cols = ["name", "shape", "dtype", "params", "MB", "matrix"]
    if any(r["structured"] for r in rows):
        cols.append("structured")  # a folder holding saved structured matrices
    _print_table(rows, cols, {"MB": ".3f"})
    n_mat = sum(r["matrix"] == "yes" for r in rows)
    click.echo(f"\n{len(rows)} tensors ({n_mat} matrices), "
               f"{sum(r['params'] for r in rows):,} numbers, "
               f"{sum(r['MB'] for r in rows):.1f} MB in {len(store.files)} file(s)")


def _inspect_structured(path: Path, as_json: bool) -> None:
    """Describe a file written by StructuredMatrix.save (format, shape, cost, tensors)."""
    from safetensors import safe_open

    from .formats.base import load

    A = load(path)
    m, n = A.shape
    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
        stored = [{"name": k, "shape": "x".join(map(str, f.get_slice(k).get_shape())) or "scalar",
                   "dtype": f.get_slice(k).get_dtype()} for k in f.keys()]
    rec = {
        "file": str(path), "kind": "structured matrix", "format": A.format_name,
        "shape": f"{m}x{n}", "dtype": str(A.dtype).replace("torch.", ""),
        "flops": int(A.flops), "budget_fraction": A.flops / (m * n),
        "params": int(A.num_params), "params / dense": A.num_params / (m * n),
        "format_version": meta.get("format_version"),
        "written_by": meta.get("gblr_approx_version"),
        "algorithm": A.info.get("algorithm"),
    }
    if as_json:
        _print_json({**rec, "info": A.info, "tensors": stored})
        return
    _print_kv(rec)
    click.echo(f"\nstored tensors (read it with gblr_approx.load; sweep/spectrum/project read "
               f"it as the {m}x{n} matrix it represents):")
    _print_table(stored, ["name", "shape", "dtype"])


@main.command()
@click.argument("path", type=_path_arg, required=False)
@click.option("--formats", "-f", multiple=True, metavar="F[,F...]",
              help="Formats (comma-separated or repeated). Default: lowrank, blocksparse, "
                   "blocklowrank, monarch and gblr, those installed.")
@click.option("--budgets", "-b", multiple=True, metavar="B[,B...]",
              help="Budgets: fractions in (0, 1] (0.25 or 25%) or integer MACs. "
                   "Default: 0.1,0.25,0.5.")
@_include_opt
@_exclude_opt
@click.option("--option", "options", multiple=True, metavar="FORMAT.KEY=VALUE",
              help="Format option, e.g. blocksparse.block_shape=16,16. Repeatable.")
@click.option("--out", "-o", type=click.Path(file_okay=False, path_type=Path),
              help="Folder for rows.csv and sweep.json; rerunning resumes.")
@click.option("--workers", "-j", type=click.IntRange(min=1), default=1, show_default=True,
              help="Parallel worker processes.")
@_threads_opt
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--reshape-conv", is_flag=True, help="Sweep 4-D conv kernels as out x (in*kh*kw).")
@click.option("--progress/--no-progress", default=None,
              help="Progress bar (default: when stderr is a terminal).")
@click.option("--retry-failed", is_flag=True,
              help="With --out: run the fits recorded as failed again (e.g. killed workers).")
@click.option("--scheduler", metavar="ADDRESS",
              help="Run the fits on Dask: 'local' (a LocalCluster of --workers processes) or "
                   "a scheduler address such as tcp://host:8786. Needs gblr_approx[dask].")
@click.option("--time-products", is_flag=True,
              help="Also time A @ X against the dense W @ X (columns product_seconds, "
                   "dense_product_seconds) and print the speed-up.")
@click.option("--product-batch", type=click.IntRange(min=1), default=1, show_default=True,
              help="Columns of X for --time-products.")
@_json_opt
def sweep(path, formats, budgets, include, exclude, options, out, workers, threads, seed,
          reshape_conv, progress, retry_failed, scheduler, time_products, product_batch,
          as_json) -> None:
    """Error versus budget of every format for every matrix of a checkpoint.

    Without PATH, runs on the five embedded MiniLM layers. Prints relative Frobenius errors
    (rows: matrix and format, columns: budget); --json prints every row with all columns.
    A saved structured matrix as PATH is swept as the matrix it represents. Exits 1 when no
    fit succeeded (every one failed or was infeasible).
    """
    from .analysis.sweep import DEFAULT_BUDGETS, default_formats
    from .analysis.sweep import sweep as run_sweep

    if retry_failed and out is None:
        raise click.UsageError("--retry-failed reruns the failed rows of an --out folder; "
                               "give --out DIR")
    fmts = ([_check_format(f, "--formats") for f in _split_given(formats, "--formats", "format")]
            or default_formats())
    blist = ([_parse_budget(b, "--budgets") for b in _split_given(budgets, "--budgets", "budget")]
             or list(DEFAULT_BUDGETS))
    opts = _format_options(options, fmts, "swept")
    if path is None:
        from .datasets import minilm_sample

        matrices: Any = minilm_sample()
        source = _SAMPLE
    else:
        matrices = _open(path, include, exclude, reshape_conv=reshape_conv)
        source = str(path)
    if path is None and (include or exclude):
        from .io import match_names

        keep = set(match_names(matrices, list(include) or None, list(exclude) or None))
        if not keep:
            raise ValueError("the filters match none of the sample matrices: "
                             + ", ".join(matrices))
        matrices = {k: v for k, v in matrices.items() if k in keep}
    if progress is None and _quiet():
        progress = False
    t0 = time.perf_counter()
    df = run_sweep(matrices, fmts, blist, options=opts, out=out, workers=workers, seed=seed,
                   progress=progress, threads_per_worker=threads, retry_failed=retry_failed,
                   scheduler=scheduler, time_products=product_batch if time_products else False)
    wall = time.perf_counter() - t0
    if as_json:
        _print_json(df.to_dict(orient="records"))
        _sweep_verdict(df)
        return
    _print_sweep(df, blist)
    if time_products:
        _print_speedups(df, blist, product_batch)
    counts = df["status"].value_counts()
    click.echo(
        f"\n{len(df)} fits of {df['matrix'].nunique()} matrices from {source}: "
        f"{counts.get('ok', 0)} ok, {counts.get('infeasible', 0)} infeasible, "
        f"{counts.get('failed', 0)} failed; {wall:.1f} s wall"
        + (f"; rows in {out / 'rows.csv'}" if out else "")
    )
    for _, r in df[df["status"] != "ok"].drop_duplicates("message").head(5).iterrows():
        click.echo(f"  {r['status']}: {r['matrix']} {r['format']} {r['budget']}: {r['message']}")
    _sweep_verdict(df)


def _sweep_verdict(df) -> None:
    """A one-line count of failures and their causes on stderr; exit 1 when nothing succeeded.

    A format none of whose fits succeeded is named too (it would be missing from figures).
    """
    if not len(df):
        raise click.ClickException("the sweep produced no rows")
    status = df["status"].astype(str)
    n_ok = int((status == "ok").sum())
    bad = df[status != "ok"]
    if len(bad):
        causes = bad.assign(cause=[
            f"{st}: {_cause(str(msg) if isinstance(msg, str) else '', str(mat))}"
            for st, msg, mat in zip(bad["status"], bad["message"], bad["matrix"], strict=True)])
        top = causes["cause"].value_counts()
        why = "; ".join(f"{c} x {k}" for k, c in top.head(3).items())
        more = f"; {len(top) - 3} more causes" if len(top) > 3 else ""
        click.echo(f"{len(bad)} of {len(df)} fits did not succeed ({why}{more})", err=True)
        per = df.assign(ok=status == "ok").groupby("format", sort=False)["ok"].any()
        dead = [f for f, any_ok in per.items() if not any_ok]
        if dead and n_ok:
            click.echo(f"no fit succeeded for format(s): {', '.join(map(str, dead))}", err=True)
    if n_ok == 0:
        raise click.ClickException(
            f"no fit succeeded: all {len(df)} fits failed or were infeasible (see above)")


def _cause(message: str, matrix: str) -> str:
    """A failure message as a cause shared across matrices: first clause, name replaced.

    Only whole occurrences of the name become ``W`` (not inside other words or longer dotted
    names: for a matrix ``a``, ``ValueError: a contains NaN`` -> ``ValueError: W contains
    NaN``).
    """
    text = " ".join(message.split()) if message.strip() else "no message"
    if matrix:
        text = re.sub(rf"(?<![\w.]){re.escape(matrix)}(?!\w|\.\w)", "W", text)
    head = text.split(";")[0]
    return head[:80] + ("..." if len(head) > 80 else "")


def _print_sweep(df, budgets) -> None:
    rows = []
    for (mat, fmt), g in df.groupby(["matrix", "format"], sort=False):
        row: dict[str, Any] = {"matrix": mat, "shape": g["shape"].iloc[0], "format": fmt}
        for _, r in g.iterrows():
            key = f"{r['budget']:g}" if isinstance(r["budget"], float) else str(r["budget"])
            row[key] = (f"{r['rel_error']:.4f}" if r["status"] == "ok" else r["status"])
        rows.append(row)
    bcols = [f"{b:g}" if isinstance(b, float) else str(b) for b in budgets]
    click.echo("relative Frobenius error ||W - A||_F / ||W||_F by budget (fraction of dense "
               "MACs or MACs):")
    _print_table(rows, ["matrix", "shape", "format", *bcols])
    # cost side by side with the error: what each format achieved against what was asked
    per = []
    for fmt, g in df.groupby("format", sort=False):
        ok = g[g["status"] == "ok"]
        use = (ok["flops"].astype(float) / ok["budget_macs"]).mean() if len(ok) else math.nan
        per.append({"format": fmt, "ok": f"{len(ok)}/{len(g)}",
                    "mean rel_error": float(ok["rel_error"].mean()) if len(ok) else math.nan,
                    "MACs used / budget": float(use),
                    "params / dense": float((ok["params"].astype(float)
                                             / (ok["rows"] * ok["cols"])).mean())
                    if len(ok) else math.nan,
                    "fit seconds": float(g["seconds"].sum())})
    click.echo("")
    _print_table(per, ["format", "ok", "mean rel_error", "MACs used / budget", "params / dense",
                       "fit seconds"],
                 {"mean rel_error": ".4f", "MACs used / budget": ".3f", "params / dense": ".3f",
                  "fit seconds": ".2f"})


def _print_speedups(df, budgets, batch: int) -> None:
    rows = []
    for (mat, fmt), g in df.groupby(["matrix", "format"], sort=False):
        row: dict[str, Any] = {"matrix": mat, "shape": g["shape"].iloc[0], "format": fmt}
        for _, r in g.iterrows():
            key = f"{r['budget']:g}" if isinstance(r["budget"], float) else str(r["budget"])
            row[key] = (f"{r['dense_product_seconds'] / r['product_seconds']:.2f}x"
                        if r["status"] == "ok" and r["product_seconds"] > 0 else r["status"])
        rows.append(row)
    click.echo(f"\nmeasured speed-up of A @ X over the dense W @ X (X with {batch} column(s), "
               "median of 7, in the fitting process; below 1x the structured product is slower):")
    _print_table(rows, ["matrix", "shape", "format",
                        *[f"{b:g}" if isinstance(b, float) else str(b) for b in budgets]])


def _pick(store, name: str | None):
    names = list(store)
    if name is not None:
        if name not in store:
            raise click.BadParameter(
                f"no matrix {name!r} in the checkpoint; matrices are: "
                f"{', '.join(names[:8])}{' ...' if len(names) > 8 else ''}", param_hint="--name")
        return name
    if len(names) != 1:
        raise click.UsageError(
            f"the checkpoint holds {len(names)} matrices; choose one with --name "
            f"(e.g. --name {names[0]})")
    return names[0]


def _result_record(name: str, W, A, budget: float | int, seconds: float,
                   out: Path | None) -> dict[str, Any]:
    from .metrics import relative_error

    m, n = W.shape
    return {
        "matrix": name, "shape": f"{m}x{n}", "format": A.format_name,
        "budget": budget, "flops": int(A.flops),
        "budget_fraction": A.flops / (m * n), "params": int(A.num_params),
        "rel_error": relative_error(W, A), "rel_error_2": relative_error(W, A, ord=2),
        "seconds": seconds, "file": str(out) if out else None,
    }


@main.command()
@click.argument("path", type=_path_arg)
@click.option("--format", "-f", "fmt", required=True, help="Target format, e.g. lowrank.")
@click.option("--budget", "-b", required=True, help="Fraction in (0, 1] or integer MACs.")
@click.option("--out", "-o", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Output .safetensors file (read back with gblr_approx.load).")
@click.option("--name", "-n", help="Tensor to project (needed when PATH holds several).")
@click.option("--option", "options", multiple=True, metavar="KEY=VALUE",
              help="Format option, e.g. block_shape=16,16. Repeatable.")
@_reshape_opt
@_force_opt
@_threads_opt
@_json_opt
def project(path, fmt, budget, out, name, options, reshape_conv, force, threads,
            as_json) -> None:
    """Best approximation of one matrix of PATH in a format within a budget; saves it.

    --out never replaces PATH (or any file it reads), and an existing --out needs --force.
    """
    from .projection import project as run_project

    _set_threads(threads)

    fmt = _check_format(fmt)
    b = _parse_budget(budget)
    _check_suffix(out)
    opts: dict[str, Any] = {}
    for o in options:
        k, v = _parse_kv(o, "--option")
        _check_option_key(fmt, k, o)
        opts[k] = v
    store = _open(path, (), (), reshape_conv=reshape_conv)
    out = _guard_out(out, [path, *store.files], force)
    name = _pick(store, name)
    W = store[name]
    t0 = time.perf_counter()
    A = run_project(W, fmt, b, **opts)
    seconds = time.perf_counter() - t0
    A.save(out)
    rec = _result_record(name, W, A, b, seconds, out)
    _print_json(rec) if as_json else _print_kv(rec)


@main.command()
@click.argument("path", type=_path_arg)
@click.option("--budget", "-b", required=True, help="Fraction in (0, 1] or integer MACs.")
@click.option("--out", "-o", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Output .safetensors file.")
@click.option("--name", "-n", help="Tensor to fit (needed when PATH holds several).")
@click.option("--steps", type=click.IntRange(min=1), help="Optimisation steps (format default).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--option", "options", multiple=True, metavar="KEY=VALUE",
              help="GBLR fit option, e.g. rank_per_component=2. Repeatable.")
@_reshape_opt
@_force_opt
@_threads_opt
@_json_opt
def fit(path, budget, out, name, steps, seed, options, reshape_conv, force, threads,
        as_json) -> None:
    """Fit a GBLR matrix to one matrix of PATH within a budget; saves it.

    --out never replaces PATH (or any file it reads), and an existing --out needs --force.
    """
    import gblr_approx as ga

    _set_threads(threads)

    b = _parse_budget(budget)
    _check_suffix(out)
    opts = dict(_parse_kv(o, "--option") for o in options)
    store = _open(path, (), (), reshape_conv=reshape_conv)
    out = _guard_out(out, [path, *store.files], force)
    name = _pick(store, name)
    W = store[name]
    t0 = time.perf_counter()
    A = ga.fit_gblr(W, b, steps=steps, seed=seed, **opts).matrix
    seconds = time.perf_counter() - t0
    A.save(out)
    rec = _result_record(name, W, A, b, seconds, out)
    _print_json(rec) if as_json else _print_kv(rec)


@main.command()
@click.argument("path", type=_path_arg, required=False)
@_include_opt
@_exclude_opt
@click.option("--min-tail", type=click.IntRange(min=2), default=10, show_default=True,
              help="Fewest eigenvalues in the power-law tail.")
@click.option("--values", is_flag=True, help="With --json, include the singular values.")
@_reshape_opt
@_threads_opt
@_json_opt
def spectrum(path, include, exclude, min_tail, values, reshape_conv, threads, as_json) -> None:
    """Spectral statistics of every matrix of PATH (default: the embedded MiniLM sample).

    Norms, stable rank, effective (entropy) rank, ranks for 90/95/99 % of the energy and the
    power-law exponent alpha of the eigenvalues of W^T W. A matrix that cannot be read or
    analysed (e.g. all zeros, NaN) is reported by name and the others go on; exits 1 when
    none could be analysed. A saved structured matrix is analysed as the matrix it
    represents.
    """
    from .analysis.spectrum import POWERLAW_METHOD
    from .analysis.spectrum import spectrum as run_spectrum

    _set_threads(threads)

    if path is None:
        from .datasets import minilm_sample

        store: Any = minilm_sample()
        if include or exclude:
            from .io import match_names

            keep = set(match_names(store, list(include) or None, list(exclude) or None))
            if not keep:
                raise ValueError("the filters match none of the sample matrices: "
                                 + ", ".join(store))
            store = {k: v for k, v in store.items() if k in keep}
    else:
        store = _open(path, include, exclude, reshape_conv=reshape_conv)
    rows, failed = [], []
    for name in store:
        try:
            rep = run_spectrum(store[name], min_tail=min_tail)
        except Exception as exc:  # record the bad matrix and go on, as sweep does
            if _debug():
                raise
            failed.append({"matrix": name, "status": "failed", "message": _one_line(exc)})
            continue
        s = rep.summary()
        rec = {"matrix": name, "shape": f"{s['rows']}x{s['cols']}", "status": "ok", **s}
        if values:
            rec["singular_values"] = rep.singular_values.tolist()
        rows.append(rec)
    if as_json:
        _print_json(rows + failed)
        _spectrum_verdict(rows, failed)
        return
    if not rows:
        _spectrum_verdict(rows, failed)
    _print_table(rows, ["matrix", "shape", "spectral_norm", "fro_norm", "stable_rank",
                        "effective_rank", "rank_90", "rank_95", "rank_99", "alpha", "alpha_std",
                        "n_tail"],
                 {"stable_rank": ".2f", "effective_rank": ".1f", "alpha": ".3f",
                  "alpha_std": ".3f"})
    click.echo(f"\nalpha: {POWERLAW_METHOD}")
    for r in rows:
        if r["powerlaw_status"] != "ok":
            click.echo(f"  {r['matrix']}: no power-law fit ({r['powerlaw_status']})")
    _spectrum_verdict(rows, failed)


def _debug() -> bool:
    ctx = click.get_current_context(silent=True)
    return bool((ctx and ctx.find_root().params.get("debug"))
                or os.environ.get("GBLR_APPROX_DEBUG"))


def _spectrum_verdict(rows: list[dict[str, Any]], failed: list[dict[str, Any]]) -> None:
    for f in failed:
        click.echo(f"failed: {f['matrix']}: {f['message']}", err=True)
    if failed:
        click.echo(f"{len(failed)} of {len(rows) + len(failed)} matrices could not be analysed",
                   err=True)
    if not rows:
        raise click.ClickException("no matrix could be analysed (see above)")


@main.command()
@click.argument("file", type=_path_arg)
@click.option("--to", "target", required=True, help="Target format, e.g. gblr.")
@click.option("--budget", "-b", help="Budget for a lossy conversion (fraction or MACs).")
@click.option("--out", "-o", type=click.Path(dir_okay=False, path_type=Path),
              help="Save the converted matrix here (.safetensors).")
@_force_opt
@_threads_opt
@_json_opt
def convert(file, target, budget, out, force, threads, as_json) -> None:
    """Convert a saved structured matrix (from `project`/`fit`) to another format.

    --out never replaces FILE, and an existing --out needs --force.
    """
    from .formats.base import load

    _set_threads(threads)

    target = _check_format(target, "--to")
    b = _parse_budget(budget) if budget is not None else None
    if out is not None:
        out = _guard_out(_check_suffix(out), [file], force)
    from .convert import convert as run_convert

    A = load(file)
    t0 = time.perf_counter()
    B = run_convert(A, target, budget=b)
    seconds = time.perf_counter() - t0
    if out is not None:
        B.save(out)
    from .metrics import relative_error

    m, n = A.shape
    rec = {
        "source_format": A.format_name, "target_format": B.format_name, "shape": f"{m}x{n}",
        "source_flops": int(A.flops), "flops": int(B.flops),
        "budget_fraction": B.flops / (m * n), "params": int(B.num_params),
        "rel_error_to_source": relative_error(A.to_dense(), B), "seconds": seconds,
        "file": str(out) if out else None,
    }
    _print_json(rec) if as_json else _print_kv(rec)


# The `plot` subcommand lives in gblr_approx/plot/command.py (it imports matplotlib lazily).
from .plot.command import plot  # noqa: E402

main.add_command(plot)

# `compress` / `evaluate` (Hugging Face model folders) live in gblr_approx/cli_compress.py.
from .cli_compress import compress, evaluate  # noqa: E402

main.add_command(compress)
main.add_command(evaluate)

if __name__ == "__main__":
    main()
