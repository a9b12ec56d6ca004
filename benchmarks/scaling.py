"""Time and peak memory of every format versus matrix size (384x384 -> 4096x11008).

Usage (``--from-json a.json b.json`` reprints / replots saved runs)::

    python benchmarks/scaling.py [--sizes 384x384 1024x4096 4096x11008] [--budget 0.25]
                                 [--formats lowrank monarch blocksparse blocklowrank blast gblr]
                                 [--blast-steps auto] [--gblr-steps N] [--timeout 1800]
                                 [--device cpu] [--csv out.csv] [--plot out.png]

Each (size, format) is measured in a **fresh subprocess** on one thread
(``torch.set_num_threads(1)``), so that its peak memory is its own: the child builds the
matrix, resets the kernel's peak-RSS counter (``/proc/self/clear_refs``; where that is not
available the peak is ``ru_maxrss`` minus the RSS before the fit, an upper bound), then runs
``ga.project`` (``ga.fit_gblr`` for GBLR) and reports CPU seconds (``time.process_time``, which
on a loaded machine is a fairer clock than wall time), wall seconds, peak RSS above the level
before the fit and the relative Frobenius error. The memory target of issue 13 is a multiple of
the layer's float32 size, printed as ``x layer``.

The test matrix is synthetic: ``W = U diag(s) V^T`` with ``s_t = t^-alpha`` (``alpha = 0.5``
by default, ``k = min(m, n)``) and Haar-random orthonormal ``U``, ``V`` (QR of Gaussian
panels; about 25 s at 4096 x 11008, outside the measurement). A cheaper construction from
permuted DCT bases was tried and rejected: its rows share a smooth kernel structure that
BLAST exploits (relative error 0.25 against 0.56 for low rank at 384 x 384), which would
bias the comparison between formats. ``--device cuda`` runs the fits on the GPU (CPU
time is then not the cost: read the wall seconds; the peak RSS is host memory only).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from typing import Any

FORMATS = ["lowrank", "monarch", "blocksparse", "blocklowrank", "blast", "gblr"]
SIZES = ["384x384", "1024x1024", "1024x4096", "2048x5504", "4096x4096", "4096x11008"]


# ------------------------------------------------------------------------ test matrix
def haar_basis(N: int, k: int, gen: Any) -> Any:
    """``(N, k)`` orthonormal columns, uniformly distributed (QR of a Gaussian panel, signs
    fixed by ``diag(R) > 0``). ``O(N k^2)``: about 10 s for 11008 x 4096 on two threads."""
    import torch

    Q, R = torch.linalg.qr(torch.randn(N, k, generator=gen))
    return Q.mul_(torch.sign(torch.diagonal(R)).clamp_min(0).mul_(2).sub_(1))


def powerlaw_matrix(m: int, n: int, alpha: float = 0.5, seed: int = 0) -> Any:
    """``(m, n)`` float32 matrix with singular values ``t^-alpha`` (``t = 1..min(m, n)``),
    normalised to ``||W||_F = sqrt(m n)`` (unit RMS entry)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    k = min(m, n)
    s = torch.arange(1, k + 1, dtype=torch.float64).pow(-alpha)
    s = (s * math.sqrt(m * n) / s.norm()).to(torch.float32)
    U = haar_basis(m, k, gen).mul_(s)
    V = haar_basis(n, k, gen)
    return U @ V.T


# --------------------------------------------------------------------------- the child
def _status_mb(key: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child(args: argparse.Namespace) -> None:
    import gc
    import resource

    import torch

    import gblr_approx as ga

    m, n = (int(x) for x in args.child_size.split("x"))
    fmt = args.child_format
    torch.set_num_threads(max(1, os.cpu_count() or 1))  # build the matrix quickly
    W = powerlaw_matrix(m, n, alpha=args.alpha, seed=args.seed)
    if args.device != "cpu":
        W = W.to(args.device)
    torch.set_num_threads(1)
    gc.collect()
    exact_peak = _reset_peak()
    base = _status_mb("VmRSS")
    if base is None:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    sync = torch.cuda.synchronize if W.is_cuda else (lambda: None)
    t_wall, t_cpu = time.perf_counter(), time.process_time()
    if fmt == "gblr":
        res = ga.fit_gblr(W, args.budget, steps=args.gblr_steps)
        A, info = res.matrix, {"best_stage": res.info.get("best_stage"),
                               "records": len(res.history), "steps": res.matrix.info["steps"],
                               # wall seconds since the start at each record (first 8)
                               "trace": [[h["stage"], round(h["seconds"], 1),
                                          round(h["rel_error"], 4)] for h in res.history[:8]]}
    else:
        steps = args.blast_steps
        opts = {"steps": steps if steps == "auto" else int(steps)} if fmt == "blast" else {}
        A = ga.project(W, fmt, args.budget, **opts)
        info = {k: v for k, v in A.info.items()
                if k in ("svd", "init_svd", "layout", "blocks", "rank", "grid", "best_step",
                         "block_shape", "steps")}
    sync()
    cpu, wall = time.process_time() - t_cpu, time.perf_counter() - t_wall
    peak = _status_mb("VmHWM") if exact_peak else None
    if peak is None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    if fmt == "gblr":
        # GBLR.to_dense scatters every component with index_put_ (minutes for the 746
        # full-size components of a 4096 x 11008 fit); the fit's own residual is exact
        from gblr_approx.fit.gblr.pipeline import _residual

        D = _residual(W, A)
    else:
        D = W - A.to_dense()
    err = float(torch.linalg.vector_norm(D) / torch.linalg.vector_norm(W))
    del D
    layer_mb = m * n * 4 / 2**20
    print(json.dumps({
        "size": f"{m}x{n}", "format": fmt, "budget": args.budget, "cpu_s": round(cpu, 2),
        "wall_s": round(wall, 2), "peak_mb": round(peak - base, 1),
        "x_layer": round((peak - base) / layer_mb, 2), "layer_mb": round(layer_mb, 1),
        "rel_error": round(err, 5), "flops": int(A.flops), "info": info,
        "peak_exact": exact_peak,
    }))


# -------------------------------------------------------------------------- the parent
def run_one(size: str, fmt: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--child-size", size, "--child-format",
           fmt, "--budget", str(args.budget), "--blast-steps", str(args.blast_steps),
           "--alpha", str(args.alpha), "--seed", str(args.seed), "--device", args.device]
    if args.gblr_steps is not None:
        cmd += ["--gblr-steps", str(args.gblr_steps)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"size": size, "format": fmt, "error": f"timeout {args.timeout} s"}
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        return {"size": size, "format": fmt, "error": out.stderr.strip().splitlines()[-1:]}
    return json.loads(lines[-1])


def table(rows: list[dict[str, Any]]) -> str:
    cols = ["size", "format", "cpu_s", "wall_s", "peak_mb", "x_layer", "rel_error", "info"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['size']} | {r['format']} | failed: {r['error']} |")
            continue
        info = ", ".join(f"{k}={v}" for k, v in r["info"].items())
        lines.append("| " + " | ".join(str(r[c]) if c != "info" else info for c in cols) + " |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from gblr_approx.plot.style import (
        format_color,
        format_label,
        format_marker,
        new_figure,
        save_figure,
        style_context,
    )

    ok = [r for r in rows if "error" not in r]
    with style_context():
        fig, axes = new_figure("double", 2.6, ncols=2)
        for fmt in dict.fromkeys(r["format"] for r in ok):
            rs = sorted((r for r in ok if r["format"] == fmt),
                        key=lambda r: math.prod(int(x) for x in r["size"].split("x")))
            x = [math.prod(int(v) for v in r["size"].split("x")) for r in rs]
            kw = dict(color=format_color(fmt), marker=format_marker(fmt),
                      label=format_label(fmt))
            axes[0].plot(x, [max(r["cpu_s"], 0.01) for r in rs], **kw)  # 0.01 s: clock floor
            axes[1].plot(x, [max(r["x_layer"], 0.01) for r in rs], **kw)
        for ax, ylab in zip(axes, ("CPU seconds (1 thread)", "peak memory / layer size"),
                            strict=True):
            ax.set_xscale("log")
            ax.set_xlabel("entries m n")
            ax.set_ylabel(ylab)
        axes[0].set_yscale("log")
        axes[1].set_yscale("log")
        axes[1].axhline(4.0, color="0.5", lw=0.6, ls="--")
        axes[0].legend(fontsize=6)
        save_figure(fig, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=SIZES)
    p.add_argument("--formats", nargs="+", default=FORMATS, choices=FORMATS)
    p.add_argument("--budget", type=float, default=0.25)
    p.add_argument("--blast-steps", default="auto",
                   help="BLAST iterations: an integer or 'auto' (the default schedule)")
    p.add_argument("--gblr-steps", type=int, default=None)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per fit")
    p.add_argument("--csv", default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None)
    p.add_argument("--from-json", nargs="+", default=None,
                   help="print the table / draw the plot from saved --json files, no fits")
    p.add_argument("--child-size", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-format", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child_size is not None:
        child(args)
        return
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}, budget {args.budget}, "
          f"one thread per fit, blast steps {args.blast_steps}", flush=True)
    rows = []
    if args.from_json:
        for path in args.from_json:
            with open(path) as f:
                rows.extend(json.load(f))
    else:
        for size in args.sizes:
            for fmt in args.formats:
                row = run_one(size, fmt, args)
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(table(rows))
    print(f"# load average at the end: {os.getloadavg()[0]:.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.csv:
        import csv

        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}))
            w.writeheader()
            w.writerows(rows)
    if args.plot:
        plot(rows, args.plot)
        print(f"# plot written to {args.plot}")


if __name__ == "__main__":
    main()
