"""Sweep tasks on a Dask distributed cluster (``sweep(..., scheduler=...)``).

Install with ``pip install gblr_approx[dask]``; :mod:`dask.distributed` is imported only when
a scheduler is given. Each fit is one Dask task (``fit_row`` on one :class:`~.plan.Task`):
a checkpoint tensor travels as its file path and name and is read by the worker that fits
it, so the checkpoint must be readable at the same path on every worker (a shared file
system); matrices given in memory travel with their tasks. Rows come back to the calling
process as they finish and are written there, so resuming works exactly as with local
processes, and results equal a serial sweep's (each fit seeds torch and uses
``threads_per_worker`` threads, default 1).

A worker that dies loses only the task it was running: the scheduler runs it again on another
worker, and after ``distributed.scheduler.allowed-failures`` deaths (Dask's default: 3) the
task is recorded as a ``failed`` row whose message says the workers died
(``KilledWorker``).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from typing import Any

from .executors import Executor, OnRow
from .fitting import failed_row, fit_row
from .plan import Task

__all__ = ["DaskExecutor", "check_scheduler", "connect"]


def _distributed() -> Any:
    try:
        import dask.distributed as distributed
    except ImportError as exc:
        raise ImportError(
            "scheduler= needs Dask distributed: pip install 'gblr_approx[dask]' "
            "(or 'dask[distributed]>=2023.1')"
        ) from exc
    return distributed


def check_scheduler(scheduler: Any) -> None:
    """TypeError / ValueError unless ``scheduler`` is a Client, ``"local"`` or an address."""
    distributed = _distributed()
    if isinstance(scheduler, distributed.Client):
        return
    if not isinstance(scheduler, str) or not scheduler:
        raise TypeError(
            "scheduler must be None, 'local', a scheduler address such as "
            f"'tcp://host:8786', or a dask.distributed.Client; got {scheduler!r}"
        )
    if scheduler != "local" and ":" not in scheduler:
        raise ValueError(
            f"scheduler {scheduler!r} is not an address; write e.g. 'tcp://host:8786' "
            "(or 'local' for a cluster on this machine)"
        )


def connect(scheduler: Any, workers: int = 1, threads: int | None = None) -> tuple[Any, list]:
    """A Dask client for ``scheduler`` and the objects to close after the sweep.

    ``scheduler``: a :class:`dask.distributed.Client` (used as is, left open), a scheduler
    address such as ``"tcp://10.0.0.5:8786"`` (a client is opened and closed), or
    ``"local"``: a :class:`~dask.distributed.LocalCluster` of ``workers`` processes
    (``os.cpu_count() // threads`` when ``workers == 1``) with one thread each, closed after
    the sweep.
    """
    distributed = _distributed()
    check_scheduler(scheduler)
    if isinstance(scheduler, distributed.Client):
        return scheduler, []
    if scheduler == "local":
        import logging

        n = workers if workers > 1 else max(1, (os.cpu_count() or 1) // (threads or 1))
        cluster = distributed.LocalCluster(
            n_workers=n, threads_per_worker=1, processes=True, dashboard_address=":0",
            silence_logs=logging.ERROR)
        client = distributed.Client(cluster)
        return client, [client, cluster]
    try:
        client = distributed.Client(scheduler, timeout="30s")
    except (OSError, TimeoutError) as exc:
        raise OSError(f"could not reach the Dask scheduler at {scheduler}: {exc}") from exc
    return client, [client]


@contextmanager
def connected(
    scheduler: Any, workers: int, threads: int | None, pending: Collection[Any]
) -> Iterator[Any]:
    """:func:`connect`'s client for the ``with`` block. If the block raises (an error,
    Ctrl-C), the futures still in ``pending`` are cancelled; whatever :func:`connect` started
    (client, local cluster) is closed either way."""
    client, owned = connect(scheduler, workers, threads)
    try:
        yield client
    except BaseException:
        if pending:
            client.cancel(list(pending))
        raise
    finally:
        for obj in owned:
            obj.close()


class DaskExecutor(Executor):
    """Runs each fit as a Dask task; see the module docstring."""

    def __init__(self, scheduler: Any, workers: int = 1, threads: int | None = None) -> None:
        check_scheduler(scheduler)  # before the sweep starts (and Dask is imported here)
        self.scheduler = scheduler
        self.workers = workers
        self.threads = 1 if threads is None else threads

    def run(self, tasks: list[Task], on_row: OnRow) -> None:
        if not tasks:
            return
        distributed = _distributed()
        futures: dict[Any, Task] = {}
        with connected(self.scheduler, self.workers, self.threads, futures) as client:
            tag = uuid.uuid4().hex[:8]
            for i, t in enumerate(tasks):
                fut = client.submit(fit_row, t, self.threads, key=f"gblr-fit-{tag}-{i}",
                                    pure=False, priority=-i)
                futures[fut] = t
            for fut in distributed.as_completed(list(futures)):
                t = futures.pop(fut)
                try:
                    row = fut.result()
                except distributed.KilledWorker as exc:
                    row = failed_row(t, f"the Dask workers running this fit died "
                                        f"(KilledWorker: {exc}); rerun with retry_failed / "
                                        "--retry-failed to try again")
                except Exception as exc:  # e.g. the task could not be unpickled there
                    row = failed_row(t, f"{type(exc).__name__} on the Dask worker: {exc}")
                on_row(row)
