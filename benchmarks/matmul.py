"""Product speed of every format against the dense matrix it replaces.

Usage::

    python benchmarks/matmul.py                       # MiniLM layers, 25 % and 50 %, 1 thread
    python benchmarks/matmul.py --sizes 1024x1024 4096x4096 4096x11008 --threads 1 2
    python benchmarks/matmul.py --model DIR           # + sentence-transformers encode row

For each (shape, budget, format, threads, batch) the structured product ``A @ X`` and the dense
product ``W @ X`` are timed interleaved in one process (median of ``--reps``), so machine load
hits both alike. Printed per row:

- ``time/dense``: structured time over dense time (< 1 is faster than dense);
- ``efficiency``: MAC-rate efficiency ``(A.flops / (m n)) * t_dense / t_A``: 1.0 means the
  structured product runs its MACs at the dense GEMM rate; 0.5 at 25 % of dense MACs means 2x
  faster than dense.

The three MiniLM shapes use the real layers of ``ga.datasets.minilm_sample()`` and each
format's default projection (GBLR: the default ``fit_gblr`` layout). Other shapes use a
synthetic matrix with a power-law spectrum and the fast projections; GBLR there is a random
layout of rank-1 components at the budget (``--gblr-components``, default 1000) and BLAST a
random 16x16-block instance, since their fits take minutes at 4096x11008 (benchmarks/scaling.py).

``--gblr-layouts free tiled32 tiled64 tiled64w wide32`` times GBLR with several layouts: the
default ("free"), runnable ones (``fit_gblr(..., layout="tiled", tile=T)``; ``tiled<T>w`` adds
``min_width=T``) and wide pieces at free positions (``fit_gblr(..., min_width=W)``); GBLR
rows then also print the layout and its relative error ``||W - A||_F / ||W||_F``. In the model
row (``--model DIR``) ``gblr`` fits every layer as ``ga.nn.compress_model`` does (the runnable
layout, ``tile=128`` on layers of >= 384 per side, ``tile=64`` from 256,
``gblr_approx.compress.gblr_layer_options``),
``gblr-free`` with the free layout of ``fit_gblr``, and ``gblr-tiled<T>`` / ``gblr-wide<W>``
with the layouts above; ``blocksparse`` and ``blast`` also as ``compress_model`` fits them
(64 x 64 blocks and an 8 x 8 grid on layers of >= 256 per side,
``gblr_approx.compress.layer_options``), ``blocksparse-default`` / ``blast-default`` with
``ga.project``'s defaults (32 x 32 blocks, ``blocks="auto"``), ``blast-b<B>`` BLAST with a
``B x B`` grid.

``--train`` times one training step instead of the product: ``layer(x).backward(g)`` for a
batch of ``B`` rows through ``ga.nn.StructuredLinear(A, bias)`` against ``nn.Linear`` with the
dense weight (forward and backward, gradients of the input and of every parameter); the
columns keep their names, ``mode`` says ``train``.

``--layer`` times the forward of ``ga.nn.StructuredLinear(A, bias)`` on a batch of ``B``
rows without autograd against ``nn.Linear`` (the batch-major products a compressed model
runs; ``mode`` says ``layer``).

``--rounds R`` times every case ``R`` times, round after round (all cases in each), and
prints one row per round (``round`` column): alternated repeats show the run-to-run spread of
a busy host next to the difference between two layouts.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import pandas as pd
import torch
from projection import markdown_table  # benchmarks/projection.py (same folder)

import gblr_approx as ga

FORMATS = ["lowrank", "blocksparse", "blocklowrank", "monarch", "blast", "gblr"]
MINILM = {
    (384, 384): "encoder.layer.0.attention.self.query.weight",
    (1536, 384): "encoder.layer.0.intermediate.dense.weight",
    (384, 1536): "encoder.layer.0.output.dense.weight",
}


def timed(fns, reps: int, clock=time.perf_counter) -> list[float]:
    """Median seconds of each callable, calls interleaved round-robin.

    ``--clock thread`` measures this thread's CPU time instead of wall time, which keeps
    ratios meaningful on a machine shared with other work (time spent descheduled is not
    counted; one thread only). Reading that clock has a cost of its own: on the 2-core VM
    of docs/benchmarks.md it added 5-30 us to calls of 15-50 us, so batch-1 ratios are best
    taken with the wall clock on a quiet machine.
    """
    for f in fns:
        f()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for i, f in enumerate(fns):
            t0 = clock()
            f()
            times[i].append(clock() - t0)
    return [statistics.median(t) for t in times]


def power_law(m: int, n: int, seed: int = 0) -> torch.Tensor:
    """``U diag(s) V^T`` with ``s_i = i^-0.5`` and random orthonormal ``U``, ``V``."""
    gen = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=gen))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=gen))
    s = torch.arange(1, k + 1, dtype=torch.float32) ** -0.5
    return (U * s) @ V.T


def random_gblr(m: int, n: int, budget: int, components: int, seed: int = 0) -> ga.GBLR:
    """``components`` rank-1 pieces with random cyclic intervals, widths scaled to ``budget``."""
    gen = torch.Generator().manual_seed(seed)
    frac_h = torch.rand(components, generator=gen)
    frac_w = torch.rand(components, generator=gen)
    scale = budget / float((frac_h * m + frac_w * n).sum())
    h = (frac_h * m * scale).long().clamp(1, m)
    w = (frac_w * n * scale).long().clamp(1, n)
    rs = torch.randint(0, m, (components,), generator=gen)
    cs = torch.randint(0, n, (components,), generator=gen)
    factors = [
        (torch.randn(int(a), 1, generator=gen), torch.randn(int(b), 1, generator=gen))
        for a, b in zip(h, w, strict=True)
    ]
    return ga.GBLR((m, n), rs, h, cs, w, factors)


def random_blast(m: int, n: int, budget: int, blocks=(16, 16), seed: int = 0) -> ga.BLAST:
    gen = torch.Generator().manual_seed(seed)
    r = max(1, budget // (m + n + blocks[0] * blocks[1]))
    return ga.BLAST(
        torch.randn(m, r, generator=gen),
        torch.randn(n, r, generator=gen),
        torch.randn(blocks[0], blocks[1], r, generator=gen),
    )


def gblr_layouts(W: torch.Tensor, budget: float, layouts: list[str], real: bool, components: int):
    """``(layout, GBLR)`` per requested layout: "free" (the default fit, or the random layout
    on synthetic shapes), "tiled<T>" (the free layout snapped to the T-grid and refitted
    exactly, as ``fit_gblr(W, budget, layout="tiled", tile=T)`` does), "tiled<T>w"
    (``fit_gblr(W, budget, layout="tiled", tile=T, min_width=T)``) and "wide<W>"
    (``fit_gblr(W, budget, min_width=W)``: free positions, every side >= W)."""
    m, n = W.shape
    free = (
        ga.project(W, "gblr", budget)
        if real
        else random_gblr(m, n, int(budget * m * n), components)
    )
    out = []
    for name in layouts:
        if name == "free":
            out.append((name, free))
        elif name.startswith("tiled") and name[5:].isdigit():
            # = fit_gblr(W, budget, layout="tiled", tile=T) on MiniLM, without a second free fit
            res = ga.fit_gblr(
                W, budget, start=free, steps=0, layout="tiled", tile=int(name[5:]), progress=False
            )
            out.append((name, res.matrix))
        elif name.startswith("tiled") and name.endswith("w") and name[5:-1].isdigit():
            tile = int(name[5:-1])  # the tiled layout from pieces >= one tile wide
            res = ga.fit_gblr(W, budget, layout="tiled", tile=tile, min_width=tile, progress=False)
            out.append((name, res.matrix))
        elif name.startswith("wide") and name[4:].isdigit():
            res = ga.fit_gblr(W, budget, min_width=int(name[4:]), progress=False)
            out.append((name, res.matrix))
        else:
            raise SystemExit(
                f"--gblr-layouts: unknown layout {name!r} (free, tiled<T>, tiled<T>w, wide<W>)"
            )
    return out


def make(fmt: str, W: torch.Tensor, budget: float, real: bool, components: int):
    m, n = W.shape
    if not real and fmt == "gblr":
        return random_gblr(m, n, int(budget * m * n), components)
    if not real and fmt == "blast":
        return random_blast(m, n, int(budget * m * n))
    return ga.project(W, fmt, budget)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=["384x384", "1536x384", "384x1536"])
    p.add_argument("--budgets", type=float, nargs="+", default=[0.25, 0.5])
    p.add_argument("--formats", nargs="+", default=FORMATS)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256, 1024])
    p.add_argument("--threads", type=int, nargs="+", default=[1])
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--rounds", type=int, default=1,
                   help="time every case this many times, alternating the cases (one row each)")
    p.add_argument("--gblr-components", type=int, default=1000)
    p.add_argument("--gblr-layouts", nargs="+", default=["free"],
                   help="free, tiled<T>, tiled<T>w, wide<W>")
    p.add_argument("--model", type=Path, help="sentence-transformers model folder (MiniLM)")
    p.add_argument("--model-budget", type=float, default=0.5)
    p.add_argument(
        "--fit-cache",
        type=Path,
        help="folder caching every fitted matrix (layer rows and model row; reruns skip fits)",
    )
    p.add_argument("--model-sentences", type=int, default=64)
    p.add_argument("--model-reps", type=int, default=7,
                   help="timed encodes per workload and format (one sentence: 6x as many)")
    p.add_argument("--model-only", action="store_true", help="only the model row, no layer table")
    p.add_argument("--csv", type=Path, help="also write the rows to this CSV file")
    p.add_argument("--clock", choices=["wall", "thread"], default="wall")
    p.add_argument("--train", action="store_true",
                   help="time a StructuredLinear training step (forward + backward) vs nn.Linear")
    p.add_argument("--layer", action="store_true",
                   help="time the StructuredLinear forward (no autograd) vs nn.Linear")
    args = p.parse_args()
    if args.train and args.layer:
        p.error("--train and --layer are two modes; give one")
    mode = "train" if args.train else "layer" if args.layer else "product"
    clock = time.thread_time if args.clock == "thread" else time.perf_counter

    sample = ga.datasets.minilm_sample()
    rows = []
    for size in [] if args.model_only else args.sizes:
        m, n = (int(v) for v in size.lower().split("x"))
        real = (m, n) in MINILM
        W = sample[MINILM[(m, n)]] if real else power_law(m, n)
        for budget in args.budgets:
            cases = []
            for fmt in args.formats:
                torch.set_num_threads(1)
                if fmt == "gblr" and args.gblr_layouts != ["free"]:
                    layouts = gblr_layouts(W, budget, args.gblr_layouts, real, args.gblr_components)
                    cases += [(fmt, lay, A) for lay, A in layouts]
                else:
                    A = cached_fit(
                        args.fit_cache,
                        f"{size}--{fmt}--{budget:g}--{'real' if real else 'synthetic'}",
                        make,
                        fmt,
                        W,
                        budget,
                        real,
                        args.gblr_components,
                    )
                    cases.append((fmt, None, A))
            for rnd, (fmt, layout, A) in ((r, c) for r in range(args.rounds) for c in cases):
                extra = {}
                if layout is not None:
                    err = float((W - A.to_dense()).norm() / W.norm())
                    extra = {"layout": layout, "rel_error": round(err, 4)}
                if args.rounds > 1:
                    extra["round"] = rnd + 1
                for threads in args.threads:
                    torch.set_num_threads(threads)
                    for B in args.batches:
                        reps = max(5, args.reps if m * n * B < 5e8 else args.reps // 5)
                        fns = (train_steps if args.train else layer_calls if args.layer
                               else product_calls)(W, A, B)
                        t_dense, t_fmt = timed(fns, reps, clock)
                        frac = A.flops / (m * n)
                        rows.append(
                            {
                                "mode": mode,
                                "shape": f"{m}x{n}",
                                "budget": budget,
                                "format": fmt,
                                "threads": threads,
                                "batch": B,
                                "macs/dense": round(frac, 3),
                                "dense_ms": round(t_dense * 1e3, 3),
                                "ms": round(t_fmt * 1e3, 3),
                                "time/dense": round(t_fmt / t_dense, 2),
                                "efficiency": round(frac * t_dense / t_fmt, 2),
                                **extra,
                            }
                        )
                        print(rows[-1], flush=True)
    df = pd.DataFrame(rows)
    if args.model is not None:
        df_model = model_rows(
            args.model,
            args.formats,
            args.model_budget,
            args.threads,
            cache=args.fit_cache,
            sentences=args.model_sentences,
            reps=args.model_reps,
            clock=clock,
        )
        print("\n" + markdown_table(df_model))
    print(f"\n# torch {torch.__version__}, {platform.processor() or platform.machine()}")
    if rows:
        print(markdown_table(df))
    if args.csv:
        df.to_csv(args.csv, index=False)


def product_calls(W: torch.Tensor, A, batch: int) -> list:
    """``W @ X`` and ``A @ X`` for one random ``X`` of ``batch`` columns.

    The dense product is ``ga.Dense(W)``'s: below ``ROW_FORM_BELOW`` columns (but more than
    one) it runs in ``nn.Linear``'s form ``(X^T W^T)^T``, since MKL runs ``W @ X`` with 2-31
    output columns 2-4x slower (384x384, 4 columns: 172 against 34 us), which would flatter
    every format."""
    X = torch.randn(W.shape[1], batch)
    D = ga.Dense(W)
    return [lambda: D._matmul(X), lambda: A @ X]


def layer_calls(W: torch.Tensor, A, batch: int) -> list:
    """The forward of ``nn.Linear`` with weight ``W`` and of ``ga.nn.StructuredLinear(A,
    bias)`` on one batch of ``batch`` rows, without autograd: the batch-major products (and
    the bias add) that a compressed model runs."""
    m, n = W.shape
    dense = torch.nn.Linear(n, m)
    with torch.no_grad():
        dense.weight.copy_(W)
    structured = ga.nn.StructuredLinear(A, dense.bias.detach().clone())
    x = torch.randn(batch, n)

    def call(layer):
        with torch.no_grad():
            return layer(x)

    return [lambda: call(dense), lambda: call(structured)]


def train_steps(W: torch.Tensor, A, batch: int) -> list:
    """One training step (forward + backward, gradients of input and parameters) through
    ``nn.Linear`` with weight ``W`` and through ``ga.nn.StructuredLinear(A, bias)``, on a
    batch of ``batch`` rows."""
    m, n = W.shape
    dense = torch.nn.Linear(n, m)
    with torch.no_grad():
        dense.weight.copy_(W)
    structured = ga.nn.StructuredLinear(A, dense.bias.detach().clone())
    x = torch.randn(batch, n, requires_grad=True)
    g = torch.randn(batch, m)
    return [lambda: dense(x).backward(g), lambda: structured(x).backward(g)]


def cached_fit(cache: Path | None, key: str, fit, *args):
    """``fit(*args)``, or the matrix ``A.save``-d as ``cache/<key>.safetensors`` by a former run."""
    path = None if cache is None else Path(cache) / f"{key}.safetensors"
    if path is not None and path.is_file():
        return ga.load(path)
    torch.set_num_threads(1)
    A = fit(*args)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        A.save(path)
    return A


def model_texts(folder: Path, count: int) -> list[str]:
    """``count`` prose lines of the model folder's README (its model card), cycled in order.

    Code blocks, headings, tables, lists and lines under four words are skipped; nothing is
    picked by hand, so the text is whatever the model ships with.
    """
    readme = Path(folder) / "README.md"
    if not readme.is_file():
        raise ValueError(f"--model folder {folder} has no README.md to take the text from")
    lines, code = [], False
    for line in readme.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line.startswith("```"):
            code = not code
            continue
        if code or not line or line.startswith(("|", "#", "---", "<", "-", "*")):
            continue
        if len(line.split()) >= 4:
            lines.append(line)
    if not lines:
        raise ValueError(f"{readme} has no prose lines to encode")
    return [lines[i % len(lines)] for i in range(count)]


def model_fit_options(fmt: str, m: int, n: int) -> tuple[str, dict]:
    """``(format, options)`` of the model row's fit of an ``m x n`` layer for ``fmt``.

    ``"gblr"``, ``"blocksparse"`` and ``"blast"`` are fitted as ``ga.nn.compress_model``
    fits them (the runnable layout, 64 x 64 blocks, an 8 x 8 grid on large layers:
    ``compress.layer_options``), ``"blocksparse-default"`` / ``"blast-default"`` with
    ``ga.project``'s defaults, ``"gblr-free"`` the free layout of ``fit_gblr``,
    ``"gblr-tiled<T>"`` ``layout="tiled", tile=T``, ``"gblr-wide<W>"`` ``min_width=W``,
    ``"blast-b<B>"`` ``blocks=(B, B)``; other formats their default projection."""
    from gblr_approx.compress import layer_options

    if fmt in ("gblr", "blocksparse", "blast"):
        return fmt, layer_options(fmt, m, n, {})
    if fmt in ("blocksparse-default", "blast-default"):
        return fmt.split("-")[0], {}
    if fmt.startswith("blast-b"):
        b = int(fmt[len("blast-b"):])
        return "blast", {"blocks": (b, b)}
    if fmt == "gblr-free":
        return "gblr", {"layout": "free"}
    if fmt.startswith("gblr-tiled"):
        return "gblr", {"layout": "tiled", "tile": int(fmt[len("gblr-tiled"):])}
    if fmt.startswith("gblr-wide"):
        return "gblr", {"min_width": int(fmt[len("gblr-wide"):])}
    return fmt, {}


def model_fit_key(fmt: str, m: int, n: int) -> str:
    """The fit-cache name of the model row's fit (one name per distinct fit: ``gblr`` on a
    large layer shares the ``gblr-tiled<T>`` entry of its tile, ``gblr-free`` the former
    ``gblr`` one; ``gblr`` skips the free stage, ``gblr-tiled<T>`` runs it, with the same
    result on the MiniLM layers: docs/fit_gblr.md)."""
    name, opts = model_fit_options(fmt, m, n)
    # (the former "blocksparse" and "blast" entries are ga.project's default fits)
    if name == "blocksparse":
        shape = opts.get("block_shape")
        return "blocksparse" if shape is None else f"blocksparse{shape[0]}x{shape[1]}"
    if name == "blast":
        grid = opts.get("blocks")
        return "blast" if grid is None else f"blast-b{grid[0]}" if grid[0] == grid[1] else (
            f"blast-b{grid[0]}x{grid[1]}")
    if name != "gblr" or fmt.startswith("gblr-wide"):
        return fmt
    if opts.get("layout") == "tiled":
        return f"gblr-tiled{opts['tile']}"
    return "gblr"


def model_fit(W: torch.Tensor, fmt: str, budget: float) -> ga.StructuredMatrix:
    """``ga.project`` of one layer for the model row (:func:`model_fit_options`)."""
    name, opts = model_fit_options(fmt, *W.shape)
    return ga.project(W, name, budget, **opts)


def compressed_copy(dense, fmt: str, budget: float, cache: Path | None):
    """Deep copy of ``dense`` with every encoder ``nn.Linear`` a ``StructuredLinear`` in ``fmt``.

    Each layer is :func:`model_fit` (the plain per-layer projection, as ``compress_model``
    with one format and no calibration; ``gblr-free``: GBLR's free layout). With ``cache``
    every fitted matrix is stored there as ``<layer>--<key>--<budget>.safetensors``
    (``A.save``, key :func:`model_fit_key`) and loaded (``ga.load``) on the next run, so
    reruns skip the fits.
    """
    import copy

    from torch import nn

    from gblr_approx.compress import replace_module

    model = copy.deepcopy(dense)
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
    names = [
        name
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and ".encoder.layer." in f".{name}"
    ]
    fitted = 0
    t0 = time.perf_counter()
    for name in names:
        layer = model.get_submodule(name)
        key = f"{name}--{model_fit_key(fmt, *layer.weight.shape)}--{budget:g}"
        fresh = cache is None or not (cache / f"{key}.safetensors").is_file()
        A = cached_fit(cache, key, model_fit, layer.weight.detach(), fmt, budget)
        fitted += fresh
        bias = layer.bias.detach() if layer.bias is not None else None
        replace_module(model, name, ga.nn.StructuredLinear(A.to(dtype=layer.weight.dtype), bias))
    print(
        f"# {fmt}: {len(names)} encoder linears, {fitted} fitted, {len(names) - fitted} from "
        f"cache, {time.perf_counter() - t0:.1f} s",
        flush=True,
    )
    return model


def model_rows(
    folder: Path,
    formats,
    budget: float,
    threads,
    *,
    cache: Path | None = None,
    sentences: int = 64,
    batch_size: int = 32,
    reps: int = 7,
    clock=time.perf_counter,
) -> pd.DataFrame:
    """Encode time of sentence-transformers MiniLM with every encoder linear compressed.

    Two workloads per format: ``sentences`` README lines in batches of ``batch_size``, and one
    sentence (batch 1). Each is timed interleaved with the dense model (median of ``reps``;
    ``6 reps`` for the one sentence, a ~30 ms call whose median of 7 moved by +-10 %).
    """
    from sentence_transformers import SentenceTransformer

    texts = model_texts(folder, sentences)
    dense = SentenceTransformer(str(folder), device="cpu")
    out = []
    for fmt in formats:
        model = compressed_copy(dense, fmt, budget, cache)
        for t in threads:
            torch.set_num_threads(t)
            for batch, bs in ((texts, batch_size), (texts[:1], 1)):
                t_dense, t_fmt = timed(
                    [
                        lambda b=batch, bs=bs: dense.encode(b, batch_size=bs),
                        lambda b=batch, bs=bs, m=model: m.encode(b, batch_size=bs),
                    ],
                    reps if bs > 1 else 6 * reps,
                    clock,
                )
                out.append(
                    {
                        "format": fmt,
                        "budget": budget,
                        "threads": t,
                        "sentences": len(batch),
                        "batch_size": bs,
                        "dense_ms": round(t_dense * 1e3, 1),
                        "ms": round(t_fmt * 1e3, 1),
                        "encode time/dense": round(t_fmt / t_dense, 2),
                    }
                )
                print(out[-1], flush=True)
    return pd.DataFrame(out)


if __name__ == "__main__":
    main()
