"""Where ``compress_model``'s per-layer fits run: in this process, or as Dask tasks.

Each job is ``(function, layer, *args)``; the layer object carries only its weight, Gram and
dtype (not the module or the model), so a Dask task ships one layer's tensors and returns its
fitted candidate(s). Jobs run with one torch thread and the same seeds as in this process, so
the results equal a serial run's. A job whose Dask workers keep dying (``KilledWorker`` after
Dask's ``distributed.scheduler.allowed-failures`` retries) is run here instead, with a warning:
a model cannot be half compressed, so no layer is dropped.
"""

from __future__ import annotations

import uuid
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .analysis.dask_executor import _distributed, check_scheduler, connected

__all__ = ["run_layer_jobs", "check_scheduler"]

Job = tuple  # (function, layer, *args)


def _run_one_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn(*args)`` with one torch thread (on a Dask worker, or for a local fallback)."""
    before = torch.get_num_threads()
    if before != 1:
        torch.set_num_threads(1)
    try:
        return fn(*args)
    finally:
        if before != 1:
            torch.set_num_threads(before)


def run_layer_jobs(jobs: Sequence[Job], scheduler: Any = None, workers: int = 1,
                   bar: Any = None) -> list[Any]:
    """Results of ``fn(layer, *args)`` for every job, in the order of ``jobs``.

    ``scheduler=None`` runs them here one after the other (torch's thread setting untouched);
    otherwise see :func:`gblr_approx.analysis.dask_executor.connect` for what ``scheduler``
    and ``workers`` may be. ``bar``: a tqdm bar advanced once per finished job.
    """
    if scheduler is None:
        out = []
        for fn, *args in jobs:
            out.append(fn(*args))
            if bar is not None:
                bar.update(1)
        return out
    distributed = _distributed()
    results: list[Any] = [None] * len(jobs)
    futures: dict[Any, int] = {}
    with connected(scheduler, workers, 1, futures) as client:
        tag = uuid.uuid4().hex[:8]
        for i, (fn, *args) in enumerate(jobs):
            fut = client.submit(_run_one_thread, fn, *args, key=f"gblr-compress-{tag}-{i}",
                                pure=False, priority=-i)
            futures[fut] = i
        for fut in distributed.as_completed(list(futures)):
            i = futures.pop(fut)
            try:
                results[i] = fut.result()
            except distributed.KilledWorker as exc:
                fn, layer, *args = jobs[i]
                warnings.warn(f"the Dask workers fitting layer {layer.name!r} died ({exc}); "
                              "fitting it in this process instead", RuntimeWarning,
                              stacklevel=2)
                results[i] = _run_one_thread(fn, layer, *args)
            if bar is not None:
                bar.update(1)
    return results
