"""Recovery fine-tuning of the 50 % MiniLM (lowrank, global, sensitivity-weighted) by
distillation from the dense model on the calibration docstrings; prints the evaluation cosine
before and after, per number of steps.

    python benchmarks/finetune_model.py [--steps 300] [--lr 1e-4]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from compress_model import cosine, default_model_dir, texts  # noqa: E402

import gblr_approx as ga  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--formats", default="lowrank")
    p.add_argument("--grams", default=None)
    p.add_argument("--out", default=None, help="save the fine-tuned layers here")
    args = p.parse_args()
    torch.set_num_threads(1)
    from sentence_transformers import SentenceTransformer

    md = default_model_dir()
    calib, ev = texts(md)
    dense = SentenceTransformer(md, device="cpu")
    ref = torch.as_tensor(dense.encode(ev, batch_size=64))
    inc = "*encoder.layer.*"
    if args.grams and os.path.exists(args.grams):
        grams = torch.load(args.grams)
    else:
        grams = ga.nn.collect_grams(dense, lambda: dense.encode(calib, batch_size=64), inc)
    prep = getattr(dense, "preprocess", None) or dense.tokenize
    sub = calib[:128]
    sens = ga.nn.layer_sensitivity(dense, lambda: dense(prep(sub))["sentence_embedding"], inc)
    model = copy.deepcopy(dense)
    ga.nn.compress_model(model, args.formats, 0.5, include=inc, calibration=grams,
                         allocation="global", sensitivity=sens, progress=False)
    model.eval()
    c0 = cosine(torch.as_tensor(model.encode(ev, batch_size=64)), ref)
    print(f"before fine-tuning: mean cos {float(c0.mean()):.4f}, min {float(c0.min()):.4f}",
          flush=True)

    def fwd(m, batch):
        return m(prep(batch))["sentence_embedding"]

    t0 = time.perf_counter()
    hist = ga.nn.distill(model, dense, calib, fwd, steps=args.steps, lr=args.lr,
                         batch_size=args.batch,
                         callback=lambda s, v: (s + 1) % 50 == 0 and print(
                             f"  step {s + 1}: loss {v:.4f}", flush=True))
    sec = time.perf_counter() - t0
    model.eval()
    c1 = cosine(torch.as_tensor(model.encode(ev, batch_size=64)), ref)
    print(f"after {args.steps} steps (lr {args.lr}, batch {args.batch}, {sec:.0f} s): mean cos "
          f"{float(c1.mean()):.4f}, min {float(c1.min()):.4f}; final loss {hist[-1]:.4f}")
    if args.out:
        ga.nn.save_compressed(model, args.out)


if __name__ == "__main__":
    main()
