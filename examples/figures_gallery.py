"""Regenerate every figure of docs/gallery.md from the embedded MiniLM sample.

Usage::

    python examples/figures_gallery.py                 # all figures into docs/figures/
    python examples/figures_gallery.py --only spectrum --only layout
    python examples/figures_gallery.py --out /tmp/figs --format pdf

The sweep behind the error figures (5 layers of all-MiniLM-L6-v2 layer 0, every projection
format installed, 7 budgets) is written to ``docs/figures/gallery_sweep/`` (``rows.csv``, a
resumable ``ga.sweep`` folder), so rerunning only redraws, and so the ``gblr-approx plot``
commands of the gallery work on it directly. Pass ``--fresh`` to recompute it.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import gblr_approx as ga  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ROOT / "docs" / "figures"
SWEEP_DIR = FIGURES / "gallery_sweep"
BUDGETS = [0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.75]
QUERY = "encoder.layer.0.attention.self.query.weight"
#: Formats and the budgets they are swept at. BLAST is an iterative fit (up to minutes per fit
#: on a CPU at large budgets): it stops at 0.5.
PLAN = (
    (("lowrank", "blocksparse", "blocklowrank", "monarch", "gblr"), BUDGETS),
    (("blast",), [b for b in BUDGETS if b <= 0.5]),
)


def sweep_table(fresh: bool = False):
    """The gallery's sweep over the MiniLM sample (cached in docs/figures/gallery_sweep/).

    Resumable sweeps into one folder (one per group of :data:`PLAN`); a rerun computes only
    what is missing.
    """
    if fresh and SWEEP_DIR.exists():
        shutil.rmtree(SWEEP_DIR)
    sample = ga.datasets.minilm_sample()
    t0 = time.perf_counter()
    planned = []
    for formats, budgets in PLAN:
        formats = [f for f in formats if f in ga.FORMATS]
        if formats:
            ga.sweep(sample, formats, budgets, out=SWEEP_DIR, seed=0)
            planned += [(f, float(b)) for f in formats for b in budgets]
    df = ga.load_sweep(SWEEP_DIR)
    keep = [(f, float(b)) in planned for f, b in zip(df["format"], df["budget"], strict=True)]
    df = df[keep].reset_index(drop=True)
    print(f"  sweep: {len(df)} fits of {', '.join(sorted(set(df['format'])))} "
          f"({time.perf_counter() - t0:.0f} s, cached in {SWEEP_DIR.relative_to(ROOT)})")
    return df


# Each figure: a function returning a matplotlib Figure. The body is what docs/gallery.md shows.
def fig_error_vs_budget(df):
    return ga.plot.error_vs_budget(df, logy=True)


def fig_error_vs_budget_layer(df):
    return ga.plot.error_vs_budget(df, matrix=QUERY, error="rel_error_2")


def fig_layer_grid(df):
    return ga.plot.layer_grid(df, width="double", ncols=5, legend=True)


def fig_budget_allocation(df):
    return ga.plot.budget_allocation(df, target_error=0.6)


def fig_spectrum(_df):
    return ga.plot.spectrum(ga.datasets.minilm_sample(), energy_levels=(0.9, 0.99))


def fig_spectrum_grid(_df):
    return ga.plot.spectrum(ga.datasets.minilm_sample(), layout="grid", ncols=5,
                            kind="both", x="fraction")


def fig_block_energy(_df):
    W = ga.datasets.minilm_sample()[QUERY]
    return ga.plot.block_energy(W, grid=(6, 6))


def fig_gblr_layout(_df):
    W = ga.datasets.minilm_sample()[QUERY]
    G = gblr_of(W, 0.25)
    return ga.plot.gblr_layout(G, title=f"GBLR, 25 % budget: {len(G.row_start)} components")


def fig_gaudi_mask(_df):
    return ga.plot.gaudi_mask(width=0.25, location=0.85, n=128, sigmas=(2, 8, 32))


def gblr_of(W: torch.Tensor, budget: float):
    """A GBLR approximation of W: ``ga.project(W, "gblr", budget)``."""
    if "gblr" not in ga.FORMATS:
        raise RuntimeError("the GBLR format is not installed in this version")
    return ga.project(W, "gblr", budget)


FIGURE_FUNCS: dict[str, tuple[Callable, str]] = {
    "error_vs_budget": (fig_error_vs_budget, "single"),
    "error_vs_budget_layer": (fig_error_vs_budget_layer, "single"),
    "layer_grid": (fig_layer_grid, "double"),
    "budget_allocation": (fig_budget_allocation, "single"),
    "spectrum": (fig_spectrum, "double"),
    "spectrum_grid": (fig_spectrum_grid, "double"),
    "block_energy": (fig_block_energy, "single"),
    "gblr_layout": (fig_gblr_layout, "single"),
    "gaudi_mask": (fig_gaudi_mask, "single"),
}
NEEDS_SWEEP = {"error_vs_budget", "error_vs_budget_layer", "layer_grid", "budget_allocation"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=FIGURES, help="output folder")
    parser.add_argument("--only", action="append", choices=sorted(FIGURE_FUNCS),
                        help="draw only this figure (repeatable)")
    parser.add_argument("--format", default="png", choices=["png", "pdf", "svg"])
    parser.add_argument("--dpi", type=int, default=200, help="PNG resolution")
    parser.add_argument("--fresh", action="store_true", help="recompute the cached sweep")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # small fits: one thread is fastest, and kind to shared machines
    names = args.only or list(FIGURE_FUNCS)
    df = sweep_table(args.fresh) if NEEDS_SWEEP & set(names) else None
    failed = []
    for name in names:
        func, _ = FIGURE_FUNCS[name]
        t0 = time.perf_counter()
        try:
            fig = func(df)
        except (RuntimeError, ImportError, AttributeError) as exc:
            print(f"  skip gallery_{name}: {exc}", file=sys.stderr)
            failed.append(name)
            continue
        path = ga.plot.save_figure(fig, args.out / f"gallery_{name}.{args.format}", dpi=args.dpi)
        plt.close(fig)
        kb = path.stat().st_size / 1024
        print(f"  {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}: "
              f"{kb:.0f} KB ({time.perf_counter() - t0:.1f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
