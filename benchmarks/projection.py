"""Projection error, cost and time of every closed-form format on the embedded MiniLM layers.

Usage::

    python benchmarks/projection.py [--threads 2] [--budgets 0.1 0.25 0.5]

Prints one row per (layer, budget, format): relative Frobenius error, cost used (MACs and
fraction of dense) and wall-clock seconds (best of 3 runs).
"""

from __future__ import annotations

import argparse
import platform
import time

import pandas as pd
import torch

import gblr_approx as ga

FORMATS = ["lowrank", "blocksparse", "blocklowrank", "monarch"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--budgets", type=float, nargs="+", default=[0.1, 0.25, 0.5])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name, W in ga.datasets.minilm_sample().items():
        short = name.replace("encoder.layer.0.", "L0.").replace(".weight", "")
        for budget in args.budgets:
            for fmt in FORMATS:
                best = float("inf")
                for _ in range(3):
                    t0 = time.perf_counter()
                    A = ga.project(W, fmt, budget)
                    best = min(best, time.perf_counter() - t0)
                rows.append(
                    {
                        "layer": short,
                        "shape": "x".join(map(str, W.shape)),
                        "budget": budget,
                        "format": fmt,
                        "rel_error": round(ga.relative_error(W, A), 4),
                        "flops": A.flops,
                        "cost/dense": round(A.flops / W.numel(), 4),
                        "seconds": round(best, 4),
                    }
                )
    df = pd.DataFrame(rows)
    cpu = platform.processor() or platform.machine()
    print(f"# torch {torch.__version__}, {args.threads} threads, {cpu}")
    print(markdown_table(df))


def markdown_table(df: pd.DataFrame) -> str:
    """Render a DataFrame as a GitHub markdown table (no extra dependency)."""
    head = "| " + " | ".join(map(str, df.columns)) + " |"
    rule = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(map(str, row)) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, rule, *body])


if __name__ == "__main__":
    main()
