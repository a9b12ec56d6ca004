"""Per-layer sensitivity of a model's output to errors in each linear layer's output.

For a model output ``o`` (e.g. sentence embeddings) and a linear layer ``l`` with outputs
``Y_l`` (all tokens), a small error ``dY_l`` changes ``o`` by ``J_l dY_l`` to first order. With
the isotropic approximation ``J_l^T J_l ~ c_l I``, the output damage of a compressed layer is
``c_l ||(W - A) X||_F^2 = c_l tr((W - A) G (W - A)^T)``, so ``c_l`` turns per-layer output errors
into one comparable currency for the global budget allocation
(:func:`gblr_approx.nn.compress_model` with ``sensitivity=``).

Estimate (Hutchinson): ``c_l = E_v ||J_l^T v||^2 / (N m_l)`` for random probes ``v`` with
``E[v v^T] = I`` in the output space: one backward pass per probe gives ``J_l^T v`` at every
layer at once (tensor hooks on the layer outputs). ``N`` rows reach layer ``l`` and ``m_l`` is
its output width, so ``c_l`` is the mean squared gradient entry. Cost: one forward and
``probes`` backward passes of ``forward()``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .calibration import select_linears

__all__ = ["layer_sensitivity"]


def layer_sensitivity(
    model: nn.Module,
    forward: Callable[[], torch.Tensor],
    include: str | list[str] = "*",
    *,
    exclude: str | list[str] | None = None,
    probes: int = 2,
    seed: int = 0,
) -> dict[str, float]:
    """Mean squared output-gradient ``c_l`` of each selected ``nn.Linear`` (see module doc).

    Parameters
    ----------
    model : torch.nn.Module
    forward : callable
        Runs the model on calibration data *with autograd* and returns the output tensor whose
        changes matter (e.g. for sentence-transformers
        ``lambda: st(st.tokenize(texts))["sentence_embedding"]``).
    include, exclude : glob pattern(s) on module names.
    probes : int
        Random Gaussian probes (backward passes).
    seed : int

    Returns
    -------
    dict[str, float]
        Module name -> ``c_l`` (squared output units per squared layer-output unit).
    """
    if not callable(forward):
        raise TypeError(f"forward must be a callable; got {type(forward).__name__}")
    if not isinstance(probes, int) or probes < 1:
        raise ValueError(f"probes must be an int >= 1; got {probes!r}")
    targets = select_linears(model, include, exclude)
    sums = {name: 0.0 for name, _ in targets}
    counts = {name: 0 for name, _ in targets}
    outputs: dict[str, torch.Tensor] = {}
    handles = []

    def make_hook(name: str) -> Callable[..., Any]:
        def hook(module: nn.Module, args: Any, out: torch.Tensor) -> None:
            if out.requires_grad:
                outputs[name] = out
                counts[name] += out.numel()  # a layer called several times: every call

                def grad_hook(g: torch.Tensor) -> None:
                    sums[name] += float(g.detach().double().pow(2).sum())

                out.register_hook(grad_hook)

        return hook

    for name, mod in targets:
        handles.append(mod.register_forward_hook(make_hook(name)))
    # the caller's flags and accumulated gradients are put back afterwards; parameters are
    # switched to requires_grad so that a frozen model's layer outputs carry gradients
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    for p in params:
        p.grad = None
        if p.is_floating_point():
            p.requires_grad_(True)
    try:
        with torch.inference_mode(False), torch.enable_grad():  # (also under inference mode)
            out = forward()
            if not isinstance(out, torch.Tensor) or not out.requires_grad:
                raise ValueError("forward() must return a tensor that depends on the model "
                                 "with autograd enabled (not a numpy array / detached tensor)")
            gen = torch.Generator().manual_seed(seed)
            for p in range(probes):
                v = torch.randn(out.shape, generator=gen, dtype=torch.float32).to(out)
                out.backward(v, retain_graph=p + 1 < probes)
    finally:
        for h in handles:
            h.remove()
        for p, flag, grad in zip(params, flags, grads, strict=True):
            p.requires_grad_(flag)
            p.grad = grad
    missing = [n for n, _ in targets if counts[n] == 0]
    if missing:
        raise RuntimeError(f"forward() did not reach the layers {missing[:5]} with autograd")
    return {n: sums[n] / (probes * counts[n]) for n, _ in targets}
