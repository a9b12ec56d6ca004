"""Where a sweep's fits run: an executor takes tasks and hands back rows as they finish.

An :class:`Executor` has one method, :meth:`Executor.run`: run every task with
:func:`~.fitting.fit_row` and call ``on_row(row)`` in the calling process for each row as it
finishes (the caller writes it to disk at once). Implementations:

- :class:`SerialExecutor`: one fit after another in this process.
- :class:`ProcessExecutor`: a pool of local ``spawn``-ed worker processes. Each worker dies
  with its parent (``prctl(PR_SET_PDEATHSIG, SIGKILL)`` on Linux, and everywhere a watchdog
  thread polling ``os.getppid()`` every half second), so a sweep killed by SIGKILL or
  SIGTERM leaves no orphan workers (and ``sweep ... | tee log`` returns). A worker that dies
  (e.g. killed by the out-of-memory killer) breaks the pool; the fits that were running are
  run again once in a fresh pool, and a fit whose worker died on both attempts becomes a
  ``failed`` row saying so.
- :class:`~.dask_executor.DaskExecutor`: tasks on a Dask distributed cluster.

:func:`make_executor` picks one from the ``workers`` and ``scheduler`` arguments of
:func:`~gblr_approx.sweep`.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import torch

from .fitting import failed_row, fit_row, forget_cache
from .plan import Task

__all__ = ["Executor", "ProcessExecutor", "SerialExecutor", "die_with_parent", "make_executor"]

OnRow = Callable[[dict[str, Any]], None]

#: Runs of a fit whose worker process died before it is recorded as failed.
MAX_ATTEMPTS = 2


class Executor:
    """Runs sweep tasks; see the module docstring."""

    def run(self, tasks: list[Task], on_row: OnRow) -> None:
        """Run every task and call ``on_row(row)`` here as each finishes (in any order).

        Exceptions other than failing fits (which are rows) propagate: KeyboardInterrupt
        stops the fits in flight.
        """
        raise NotImplementedError


class SerialExecutor(Executor):
    """Fits one after another in this process, with ``threads`` torch threads (None: the
    current setting), restored afterwards."""

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads

    def run(self, tasks: list[Task], on_row: OnRow) -> None:
        before = torch.get_num_threads()
        try:
            for t in tasks:
                on_row(fit_row(t, self.threads))
        finally:
            torch.set_num_threads(before)
            forget_cache()  # do not keep the last matrix alive after the sweep


# ------------------------------------------------------------------------ parent death
def _watch_parent(parent: int) -> None:
    while True:
        time.sleep(0.5)
        if os.getppid() != parent:
            os._exit(1)


def die_with_parent(parent: int) -> None:
    """Make this process exit when process ``parent`` (its parent) dies.

    Linux: the kernel sends SIGKILL at the parent's death (``PR_SET_PDEATHSIG``). Everywhere:
    a daemon thread exits the process once ``os.getppid()`` is no longer ``parent``.
    """
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):  # pragma: no cover - exotic libc
            pass
    if os.getppid() != parent:  # the parent died before the watch was set up
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True,
                     name="gblr-parent-watch").start()


def _init_worker(threads: int | None, parent: int) -> None:
    die_with_parent(parent)
    if threads is not None:
        torch.set_num_threads(threads)
        torch.set_num_interop_threads(1)


class ProcessExecutor(Executor):
    """A pool of ``workers`` local processes (``spawn``), ``threads`` torch threads each."""

    def __init__(self, workers: int, threads: int | None = 1) -> None:
        self.workers = workers
        self.threads = threads

    def run(self, tasks: list[Task], on_row: OnRow) -> None:
        todo = deque(tasks)
        ctx = multiprocessing.get_context("spawn")
        while todo:
            ex = ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_init_worker,
                                     initargs=(self.threads, os.getpid()))
            # at most one task per worker in flight, so a dying worker takes no queued task
            # down with it
            pending: dict[Future, Task] = {}
            again: list[Task] = []
            broken = False
            try:
                while (todo and not broken) or pending:
                    while todo and not broken and len(pending) < self.workers:
                        t = todo.popleft()
                        try:
                            pending[ex.submit(fit_row, t, self.threads)] = t
                        except BrokenProcessPool:
                            todo.appendleft(t)
                            broken = True
                    if not pending:
                        break
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in done:
                        t = pending.pop(fut)
                        try:
                            row = fut.result()
                        except BrokenProcessPool:
                            broken = True
                            t.attempt += 1
                            if t.attempt < MAX_ATTEMPTS:
                                again.append(t)
                                continue
                            row = failed_row(
                                t, f"the worker process died while this fit was running, "
                                   f"{t.attempt} times (killed by a signal, e.g. by the "
                                   "out-of-memory killer); rerun with retry_failed / "
                                   "--retry-failed to try again")
                        on_row(row)
            except BaseException:  # Ctrl-C or a bug in on_row: stop the fits in flight now
                for proc in list((getattr(ex, "_processes", None) or {}).values()):
                    proc.terminate()
                ex.shutdown(wait=False, cancel_futures=True)
                raise
            ex.shutdown(wait=not broken, cancel_futures=True)
            todo.extendleft(reversed(again))


def make_executor(workers: int, threads: int | None, scheduler: Any = None) -> Executor:
    """The executor for :func:`~gblr_approx.sweep`'s ``workers``, ``threads_per_worker`` and
    ``scheduler`` arguments."""
    if scheduler is not None:
        from .dask_executor import DaskExecutor

        return DaskExecutor(scheduler, workers=workers, threads=threads)
    if workers == 1:
        return SerialExecutor(threads)
    return ProcessExecutor(workers, threads)
