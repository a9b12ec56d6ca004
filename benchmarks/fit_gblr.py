"""Benchmark fit_gblr on the embedded MiniLM layers against truncated SVD and the other formats.

Prints, per layer and budget: GBLR relative Frobenius error, truncated-SVD error, their ratio,
the best other format (low-rank, block-sparse, block-low-rank on several grids) and its error,
the achieved cost / budget and the seconds spent by ``fit_gblr`` with default settings.

Usage::

    python benchmarks/fit_gblr.py [--threads 2] [--budgets 0.1,0.25,0.5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import gblr_approx as ga
from gblr_approx.budget import InfeasibleBudgetError

LAYERS = {
    "query": "encoder.layer.0.attention.self.query.weight",
    "attn-output": "encoder.layer.0.attention.output.dense.weight",
    "intermediate": "encoder.layer.0.intermediate.dense.weight",
    "output": "encoder.layer.0.output.dense.weight",
}


def best_other(W: torch.Tensor, budget: float) -> tuple[str, float]:
    tries = [("lowrank", {})]
    tries += [("blocklowrank", {"grid": g}) for g in [(2, 2), (4, 4), (8, 8), (16, 16)]]
    tries += [("blocksparse", {"block_shape": b}) for b in [(8, 8), (16, 16), (32, 32)]]
    best = ("", float("inf"))
    for fmt, opts in tries:
        try:
            A = ga.project(W, fmt, budget, **opts)
        except InfeasibleBudgetError:
            continue
        e = ga.relative_error(W, A)
        if e < best[1]:
            tag = fmt + ("" if not opts else str(next(iter(opts.values()))).replace(" ", ""))
            best = (tag, e)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budgets", default="0.1,0.25,0.5")
    ap.add_argument("--layers", default=",".join(LAYERS))
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    weights = ga.datasets.minilm_sample(torch.float32)
    # warm up LAPACK (the first SVD of a process pays a one-off initialisation)
    torch.linalg.svd(torch.randn(384, 384), full_matrices=False)
    rows = []
    hdr = (
        f"{'layer':<13} {'shape':>9} {'budget':>6} {'gblr':>7} {'svd':>7} {'ratio':>6} "
        f"{'best other':>18} {'err':>7} {'cost/budget':>11} {'seconds':>7}"
    )
    print(hdr)
    print("-" * len(hdr))
    for key in args.layers.split(","):
        W = weights[LAYERS[key]]
        m, n = W.shape
        S = torch.linalg.svdvals(W.double())
        for frac in [float(b) for b in args.budgets.split(",")]:
            B = ga.resolve_budget(frac, m, n)
            r = B // (m + n)
            svd_err = float((S[r:] ** 2).sum().sqrt() / S.norm())
            t0 = time.perf_counter()
            res = ga.fit_gblr(W, frac, progress=False)
            sec = time.perf_counter() - t0
            err = ga.relative_error(W, res.matrix)
            other, other_err = best_other(W, frac)
            row = dict(
                layer=key,
                m=m,
                n=n,
                budget=frac,
                gblr=err,
                svd=svd_err,
                ratio=err / svd_err,
                best_other=other,
                best_other_err=other_err,
                cost_over_budget=res.matrix.flops / B,
                seconds=sec,
                components=res.matrix.num_components,
                steps=len(res.history),
            )
            rows.append(row)
            print(
                f"{key:<13} {f'{m}x{n}':>9} {frac:>6.2f} {err:>7.4f} {svd_err:>7.4f} "
                f"{err / svd_err:>6.3f} {other:>18} {other_err:>7.4f} "
                f"{res.matrix.flops / B:>11.4f} {sec:>7.2f}",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
