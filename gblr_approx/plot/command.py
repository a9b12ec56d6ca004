"""``gblr-approx plot``: a paper figure from results on disk, in one command.

Examples
--------
::

    gblr-approx sweep --out runs/minilm                      # writes runs/minilm/rows.csv
    gblr-approx plot runs/minilm --kind error-vs-budget --logy --out fig/error.pdf
    gblr-approx plot runs/minilm --kind layer-grid --width double --out fig/layers.pdf
    gblr-approx plot runs/minilm --kind budget-allocation --target-error 0.3 --out fig/alloc.pdf
    gblr-approx plot --kind spectrum --out fig/spectrum.pdf   # the embedded MiniLM sample
    gblr-approx plot model.safetensors --kind block-energy --matrix re:query --out fig/be.png
    gblr-approx plot gblr_layer.safetensors --kind gblr-layout --out fig/layout.pdf

The figure kinds reading a sweep table (``error-vs-budget``, ``layer-grid``,
``budget-allocation``) take a sweep output folder (its ``rows.csv``), a CSV file, a JSON file
(``gblr-approx sweep --json`` output: a list of row objects) or JSON lines. ``spectrum`` and
``block-energy`` read weights (any checkpoint :func:`gblr_approx.load_weights` reads; the
embedded MiniLM sample when no path is given); ``gblr-layout`` reads a structured matrix saved
with ``A.save(path)``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

__all__ = ["plot", "read_results", "KINDS"]

#: Figure kinds, and whether they read a sweep table.
KINDS: dict[str, str] = {
    "error-vs-budget": "sweep",
    "layer-grid": "sweep",
    "budget-allocation": "sweep",
    "spectrum": "weights",
    "block-energy": "weights",
    "gblr-layout": "matrix",
}
_DEFAULT_WIDTH = {"layer-grid": "double", "spectrum": "double"}


def read_results(path: str | Path) -> Any:
    """Read a sweep table from disk.

    Parameters
    ----------
    path : str or Path
        A sweep output folder (``rows.csv`` inside, written by ``ga.sweep(..., out=DIR)``), or
        a ``.csv``, ``.json`` (a list of row objects, or an object with a ``"rows"`` list),
        ``.jsonl`` or ``.parquet`` file.

    Returns
    -------
    pandas.DataFrame
        One row per fit.
    """
    import pandas as pd

    p = Path(path)
    if p.is_dir():
        if (p / "rows.csv").is_file():
            from ..analysis import load_sweep

            return load_sweep(p)
        tables = sorted(q for q in p.iterdir()
                        if q.suffix.lower() in (".csv", ".json", ".jsonl", ".parquet"))
        if len(tables) != 1:
            raise FileNotFoundError(
                f"{p} is a folder without rows.csv; expected a sweep output folder or exactly one "
                f".csv/.json/.jsonl/.parquet table in it (found {len(tables)})"
            )
        p = tables[0]
    if not p.is_file():
        raise FileNotFoundError(f"no results at {p}")
    suffix = p.suffix.lower()
    if suffix == ".csv":
        try:
            from ..analysis import load_sweep

            return load_sweep(p)
        except Exception:  # not written by ga.sweep: read it as a plain table
            return pd.read_csv(p)
    if suffix == ".jsonl":
        return pd.read_json(p, lines=True)
    if suffix == ".json":
        data = json.loads(p.read_text(encoding="utf-8"))
        if isinstance(data, dict):
            for key in ("rows", "results", "data"):
                if isinstance(data.get(key), list):
                    data = data[key]
                    break
        if not isinstance(data, list):
            raise ValueError(f"{p} does not hold a list of sweep rows (JSON objects)")
        return pd.DataFrame(data)
    if suffix == ".parquet":
        return pd.read_parquet(p)
    raise ValueError(f"cannot read results from {p}: expected a folder, .csv, .json, .jsonl "
                     f"or .parquet")


def _split(values: Sequence[str]) -> list[str]:
    out: list[str] = []
    for v in values:
        out.extend(s.strip() for s in v.split(",") if s.strip())
    return out


def _grid(text: str) -> tuple[int, int]:
    try:
        parts = [int(s) for s in text.replace("x", ",").split(",") if s.strip()]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) < 1:
        raise click.BadParameter(f"{text!r} is not a grid; give e.g. 8 or 8,8 or 4x16",
                                 param_hint="--grid")
    return parts[0], parts[1]


def _pick(names: list[str], wanted: list[str]) -> list[str]:
    """Names matching each pattern: exact name, glob, or 're:REGEX'."""
    import fnmatch
    import re

    if not wanted:
        return names
    out: list[str] = []
    for w in wanted:
        if w.startswith("re:"):
            hits = [n for n in names if re.search(w[3:], n)]
        elif w in names:
            hits = [w]
        else:
            hits = fnmatch.filter(names, w)
        if not hits:
            raise click.BadParameter(f"{w!r} matches no matrix; available: {', '.join(names)}",
                                     param_hint="--matrix")
        out.extend(h for h in hits if h not in out)
    return out


def _load_weights(path: Path | None, include: Sequence[str], exclude: Sequence[str],
                  reshape_conv: bool = False) -> dict[str, Any]:
    if path is None:
        from ..datasets import minilm_sample

        return dict(minilm_sample())
    from ..io import load_weights

    store = load_weights(path, list(include) or None, list(exclude) or None,
                         reshape_conv=reshape_conv)
    return {name: store[name] for name in store}


@click.command("plot")
@click.argument("results", type=click.Path(exists=True, path_type=Path), required=False)
@click.option("--kind", "-k", type=click.Choice(list(KINDS)), default="error-vs-budget",
              show_default=True, help="Figure to draw.")
@click.option("--out", "-o", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Output file; the suffix picks the format (.pdf, .svg, .png, .eps).")
@click.option("--matrix", "-m", "matrices", multiple=True, metavar="NAME[,NAME...]",
              help="Matrices to show (name, glob or 're:REGEX'). Repeatable.")
@click.option("--format", "-f", "formats", multiple=True, metavar="F[,F...]",
              help="Formats to show (sweep figures). Repeatable.")
@click.option("--width", type=click.Choice(["single", "double"]), default=None,
              help="single column (3.3 in) or page width (7 in). Default depends on --kind.")
@click.option("--height", type=click.FloatRange(min=0.5, max=20), default=None,
              help="Figure height in inches.")
@click.option("--error", type=click.Choice(["rel_error", "rel_error_2"]), default="rel_error",
              show_default=True, help="Error column: Frobenius or spectral relative error.")
@click.option("--logy/--no-logy", default=False, help="Logarithmic error axis.")
@click.option("--logx/--no-logx", default=False, help="Logarithmic budget axis.")
@click.option("--aggregate", type=click.Choice(["median", "mean", "none"]), default="median",
              show_default=True,
              help="error-vs-budget over several matrices: median with interquartile band, "
                   "mean +- std, or one curve per matrix.")
@click.option("--target-error", type=click.FloatRange(min=0, min_open=True), default=None,
              help="budget-allocation: cheapest swept fit with error at most this.")
@click.option("--best", is_flag=True, help="budget-allocation: only the cheapest format per layer.")
@click.option("--grid", "grid_text", default="8,8", show_default=True,
              help="block-energy: row blocks x column blocks.")
@click.option("--x-axis", "x_axis", type=click.Choice(["index", "fraction"]), default="index",
              show_default=True, help="spectrum: x axis as index i or i / min(m, n).")
@click.option("--layout", type=click.Choice(["overlay", "grid"]), default="overlay",
              show_default=True, help="spectrum: overlay layers or one panel per layer.")
@click.option("--include", "-i", multiple=True, metavar="PATTERN",
              help="Weights: keep tensors whose name matches (glob or 're:regex').")
@click.option("--exclude", "-x", multiple=True, metavar="PATTERN",
              help="Weights: drop tensors whose name matches (glob or 're:regex').")
@click.option("--reshape-conv", is_flag=True,
              help="Weights: read 4-D conv kernels as out x (in*kh*kw) matrices.")
@click.option("--title", default=None, help="Axes title (single-panel figures).")
@click.option("--dpi", type=click.IntRange(min=30, max=2400), default=300, show_default=True,
              help="Resolution of PNG output.")
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON.")
def plot(results: Path | None, kind: str, out: Path, matrices: Sequence[str],
         formats: Sequence[str], width: str | None, height: float | None, error: str,
         logy: bool, logx: bool, aggregate: str, target_error: float | None, best: bool,
         grid_text: str, x_axis: str, layout: str, include: Sequence[str],
         exclude: Sequence[str], reshape_conv: bool, title: str | None, dpi: int,
         as_json: bool) -> None:
    """Draw a paper figure from RESULTS and write it to --out.

    RESULTS is a sweep output folder or table (.csv/.json) for error-vs-budget, layer-grid
    and budget-allocation; a checkpoint for spectrum and block-energy (default: the embedded
    MiniLM sample); a saved GBLR matrix for gblr-layout. An empty table, or one in which no
    fit succeeded, is refused (exit 1); a format none of whose fits succeeded is named in a
    warning and in the legend. --out is replaced when it exists, but never when it is RESULTS.
    """
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from . import (
        block_energy,
        budget_allocation,
        error_vs_budget,
        gblr_layout,
        layer_grid_pages,
        save_figure,
        spectrum,
    )

    if not out.suffix:
        raise click.BadParameter(f"{out} has no suffix; use .pdf, .svg, .png or .eps",
                                 param_hint="--out")
    if results is not None:
        from ..io import check_output

        try:  # figures are redrawn in place, but a figure never replaces its input
            check_output(out, [results], force=True)
        except (FileExistsError, IsADirectoryError) as exc:
            raise click.BadParameter(str(exc), param_hint="--out") from None
    width = width or _DEFAULT_WIDTH.get(kind, "single")
    wanted = _split(matrices)
    fmts = _split(formats) or None
    source = KINDS[kind]
    record: dict[str, Any] = {"kind": kind, "out": str(out),
                              "results": str(results) if results else None}
    if source == "sweep":
        if results is None:
            raise click.UsageError(f"--kind {kind} needs RESULTS: a sweep folder or table")
        df = read_results(results)
        if len(df) == 0:
            raise click.ClickException(f"nothing to plot: {results} holds no rows (an empty "
                                       "sweep table: did the sweep write any result?)")
        if "matrix" not in df.columns:
            raise click.BadParameter(f"{results} is not a sweep table (no 'matrix' column)",
                                     param_hint="RESULTS")
        names = [str(n) for n in dict.fromkeys(df["matrix"].astype(str))]
        chosen = _pick(names, wanted) if wanted else None
        if kind == "error-vs-budget":
            fig = error_vs_budget(df, matrix=chosen, formats=fmts, aggregate=aggregate,
                                  error=error, logy=logy, logx=logx, width=width, height=height,
                                  title=title)
        elif kind == "layer-grid":
            figs = layer_grid_pages(df, matrix=chosen, formats=fmts, error=error, logy=logy,
                                    logx=logx, width=width, height=height)
            if len(figs) > 1:  # more layers than a page holds: one file per page
                record.update(rows=int(len(df)), matrices=chosen or names)
                _save_pages(figs, out, dpi, kind, record, as_json)
                return
            fig = figs[0]
        else:
            ok = df[df["status"].astype(str) == "ok"] if "status" in df.columns else df
            if target_error is None and ok.duplicated(["matrix", "format"]).any():
                raise click.UsageError(
                    "the table has several fits per layer and format: give --target-error "
                    "(e.g. --target-error 0.3) to pick the cheapest fit reaching it"
                )
            fig = budget_allocation(df, target_error=target_error, error=error, formats=fmts,
                                    matrix=chosen, best=best, width=width, height=height,
                                    title=title)
        record.update(rows=int(len(df)), matrices=chosen or names)
    elif source == "weights":
        weights = _load_weights(results, include, exclude, reshape_conv)
        if not weights:
            raise click.UsageError("no matrices found (check --include/--exclude)")
        chosen = _pick(list(weights), wanted)
        if kind == "spectrum":
            fig = spectrum({n: weights[n] for n in chosen}, layout=layout, x=x_axis,
                           width=width, height=height)
        else:
            if len(chosen) != 1 and wanted:
                raise click.BadParameter(
                    f"block-energy draws one matrix; {len(chosen)} match: {', '.join(chosen)}",
                    param_hint="--matrix")
            chosen = chosen[:1]
            fig = block_energy(weights[chosen[0]], _grid(grid_text), width=width,
                               height=height, title=title)
        record.update(matrices=chosen)
    else:
        if results is None:
            raise click.UsageError("--kind gblr-layout needs RESULTS: a saved GBLR matrix")
        from ..formats import load

        A = load(results)
        fig = gblr_layout(A, width=width, height=height, title=title)
        record.update(format=A.format_name, shape=list(A.shape), flops=int(A.flops))
    try:
        path = save_figure(fig, out, dpi=dpi)
        w_in, h_in = (float(v) for v in fig.get_size_inches())
    finally:
        plt.close(fig)
    record.update(out=str(path), width_in=round(w_in, 3), height_in=round(h_in, 3))
    if as_json:
        click.echo(json.dumps(record, indent=1))
    else:
        click.echo(f"wrote {path} ({kind}, {w_in:.2f} x {h_in:.2f} in)")


def _save_pages(figs: list[Any], out: Path, dpi: int, kind: str, record: dict[str, Any],
                as_json: bool) -> None:
    """Write the pages of a small-multiple figure as OUT-p1.SUFFIX, OUT-p2.SUFFIX, ..."""
    import matplotlib.pyplot as plt

    from . import save_figure

    paths = []
    try:
        for i, f in enumerate(figs, 1):
            paths.append(save_figure(f, out.with_name(f"{out.stem}-p{i}{out.suffix}"), dpi=dpi))
            w_in, h_in = (float(v) for v in f.get_size_inches())
    finally:
        for f in figs:
            plt.close(f)
    record.update(out=[str(p) for p in paths], pages=len(paths), width_in=round(w_in, 3),
                  height_in=round(h_in, 3))
    if as_json:
        click.echo(json.dumps(record, indent=1))
    else:
        click.echo(f"wrote {len(paths)} pages ({kind}, {w_in:.2f} x at most {h_in:.2f} in): "
                   + ", ".join(str(p) for p in paths))
