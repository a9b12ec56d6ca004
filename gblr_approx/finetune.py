"""Recovery fine-tuning of a compressed model by distillation from the dense one.

After :func:`gblr_approx.nn.compress_model`, the structure of every
:class:`~gblr_approx.nn.StructuredLinear` is fixed but its factors and bias are trainable.
:func:`distill` trains them (only them, by default, so :func:`~gblr_approx.nn.save_compressed`
keeps everything that changed) to reproduce the dense model's outputs on calibration inputs:
loss ``1 - cos(student(x), teacher(x))`` per example (``loss="cosine"``, for embeddings) or the
mean squared error (``loss="mse"``), Adam, a linear warm-up over the first 10 % of the steps
and a linear decay to zero. The teacher outputs are computed once, without gradients.
Cost per step: one forward and backward pass of the student on ``batch_size`` inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .formats.base import with_autograd

__all__ = ["distill"]


@with_autograd
def distill(
    student: nn.Module,
    teacher: nn.Module,
    inputs: Sequence[Any],
    forward: Callable[[nn.Module, list[Any]], torch.Tensor],
    *,
    steps: int = 300,
    lr: float = 1e-4,
    batch_size: int = 16,
    loss: str = "cosine",
    only_structured: bool = True,
    seed: int = 0,
    callback: Callable[[int, float], Any] | None = None,
) -> list[float]:
    """Train ``student`` to match ``teacher`` on ``inputs``; returns the loss of every step.

    Parameters
    ----------
    student, teacher : torch.nn.Module
        The compressed model (trained in place) and the dense one (unchanged).
    inputs : sequence
        Calibration examples (e.g. texts); batches are drawn without replacement, reshuffled
        each epoch.
    forward : callable(model, batch) -> Tensor (B, d)
        Runs a model on a list of examples with autograd, e.g. for sentence-transformers
        ``lambda m, b: m(m.preprocess(b))["sentence_embedding"]``.
    steps, lr, batch_size : int, float, int
    loss : {"cosine", "mse"}
    only_structured : bool
        Train only the parameters of :class:`StructuredLinear` modules (factors and bias).
    seed : int
    callback : callable(step, loss), optional

    Returns
    -------
    list[float]
        Training loss per step.

    Notes
    -----
    The student trains in train mode (dropout on); afterwards every submodule gets back its
    own ``training`` flag, as it was before the call.
    """
    from .nn import StructuredLinear

    if loss not in ("cosine", "mse"):
        raise ValueError(f"loss must be 'cosine' or 'mse'; got {loss!r}")
    for name, v in (("steps", steps), ("batch_size", batch_size)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be an int >= 1; got {v!r}")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"lr must be a number > 0; got {lr!r}")
    inputs = list(inputs)
    if not inputs:
        raise ValueError("inputs is empty")
    if only_structured:
        params = [p for m in student.modules() if isinstance(m, StructuredLinear)
                  for p in m.parameters() if p.is_floating_point()]
        if not params:
            raise ValueError("student has no StructuredLinear layer to train "
                             "(pass only_structured=False to train every parameter)")
        frozen = [p for p in student.parameters() if all(p is not q for q in params)]
    else:
        params, frozen = [p for p in student.parameters() if p.is_floating_point()], []
    flags = [p.requires_grad for p in frozen]
    for p in frozen:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    teacher_out: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for i in range(0, len(inputs), batch_size):
            out = forward(teacher, inputs[i: i + batch_size]).detach()
            for t in range(out.shape[0]):
                teacher_out[i + t] = out[t]
    opt = torch.optim.Adam(params, lr=lr)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(steps - warm, 1))))
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    history: list[float] = []
    # every module's own flag (student.train(flag) would set all of them to the top one's:
    # a freshly loaded SentenceTransformer is in train mode with its BERT in eval mode)
    modes = [(m, m.training) for m in student.modules()]
    student.train()
    try:
        for step in range(steps):
            if len(order) < batch_size:
                order += torch.randperm(len(inputs), generator=gen).tolist()
            idx, order = order[:batch_size], order[batch_size:]
            y = forward(student, [inputs[i] for i in idx])
            t = torch.stack([teacher_out[i] for i in idx]).to(y)
            if loss == "cosine":
                val = (1 - torch.nn.functional.cosine_similarity(y, t, dim=1)).mean()
            else:
                val = torch.nn.functional.mse_loss(y, t)
            if not torch.isfinite(val):
                raise FloatingPointError(f"the distillation loss became {float(val)} at step "
                                         f"{step}; lower lr")
            opt.zero_grad(set_to_none=True)
            val.backward()
            opt.step()
            sched.step()
            history.append(float(val.detach()))
            if callback is not None:
                callback(step, history[-1])
    finally:
        for m, mode in modes:
            m.training = mode
        for p, f in zip(frozen, flags, strict=True):
            p.requires_grad_(f)
        opt.zero_grad(set_to_none=True)
    return history
