"""Error-versus-budget sweeps: every (matrix, format, budget) fit as one tidy table row.

:func:`sweep` projects each matrix onto each format at each budget with
:func:`gblr_approx.project` and records one row per fit (columns: :mod:`.rows`). The work is
split as follows:

- :mod:`.plan`: checked arguments, the matrices (:class:`~.plan.Source`) and one
  :class:`~.plan.Task` per fit;
- :mod:`.fitting`: one task -> one row (run wherever the fit runs);
- :mod:`.executors` / :mod:`.dask_executor`: where fits run (this process, local worker
  processes, or a Dask cluster);
- :mod:`.rows`: ``rows.csv`` and the DataFrame; :mod:`.outdir`: the output folder's lock and
  the data identity of its rows.

With ``out=DIR`` every finished row is appended to ``DIR/rows.csv`` at once (flushed and
``fsync``-ed), so a killed sweep loses at most the fits that were running, and a rerun with
the same arguments computes only the missing rows. :func:`load_sweep` reads such a folder.
"""

from __future__ import annotations

import numbers
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from ..validation import check_positive_int
from .executors import Executor, make_executor
from .outdir import ARGS_FILE, OutputFolder, SweepLockedError
from .plan import (
    DEFAULT_BUDGETS,
    Plan,
    Task,
    budget_text,
    check_budgets,
    check_formats,
    check_options,
    default_formats,
    jsonable,
    sources_of,
)
from .rows import (
    COLUMNS,
    CONTRACT_COLUMNS,
    ROWS_FILE,
    RowWriter,
    frame,
    load_sweep,
    read_rows,
    row_key,
)

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "sweep",
    "load_sweep",
    "default_formats",
    "COLUMNS",
    "CONTRACT_COLUMNS",
    "DEFAULT_BUDGETS",
    "ROWS_FILE",
    "ARGS_FILE",
    "SweepLockedError",
]


def _product_batch(time_products: bool | int) -> int | None:
    if time_products is False or time_products is None:
        return None
    if time_products is True:
        return 1
    return check_positive_int(time_products, "time_products")


def sweep(
    matrices: Any,
    formats: str | Iterable[str] | None = None,
    budgets: float | int | Iterable[float | int] = DEFAULT_BUDGETS,
    *,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    out: str | os.PathLike | None = None,
    workers: int = 1,
    seed: int = 0,
    progress: bool | None = None,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    reshape_conv: bool = False,
    threads_per_worker: int | None = None,
    retry_failed: bool = False,
    scheduler: Any = None,
    time_products: bool | int = False,
) -> pd.DataFrame:
    """Approximate every matrix in every format at every budget; one table row per fit.

    Parameters
    ----------
    matrices : dict[str, array], array of shape (m, n), str or Path
        A dict name -> matrix (torch tensors or numpy arrays; named ``"W"`` when a single
        matrix is given), or a checkpoint path / :class:`~gblr_approx.io.WeightStore` read
        with :func:`gblr_approx.load_weights` (each tensor is read by the process that fits
        it, so the whole checkpoint is never in memory).
    formats : str or sequence of str, optional
        Registered format names (see ``gblr_approx.FORMATS``). Default:
        :func:`default_formats` (lowrank, blocksparse, blocklowrank, monarch, gblr — those
        registered).
    budgets : float, int or sequence, default (0.1, 0.25, 0.5)
        Each a float in (0, 1] (fraction of the dense cost ``m*n``) or an int >= 1 (MACs).
    options : dict format -> dict, optional
        Options passed to ``project`` for that format, e.g.
        ``{"blocksparse": {"block_shape": (16, 16)}}``.
    out : str or Path, optional
        Folder for incremental results: ``rows.csv`` (one line appended and fsync-ed per
        finished fit) and ``sweep.json`` (the arguments and the data hash of each matrix).
        Rerunning into the same folder keeps the rows already there and computes only the
        missing ones (key: matrix, format, budget, options, seed), so more formats or budgets
        can be added later. Rows belong to the data they were computed from (a hash of each
        tensor's values, taken as it is read): a matrix name reused for different data (say
        another fine-tune saved under the same file name) is refused with a ValueError
        before any fit runs. The folder is locked while a sweep writes into it: a second
        sweep on it raises :class:`~gblr_approx.analysis.outdir.SweepLockedError`.
    workers : int, default 1
        ``1``: fits run one after another in this process (with its torch thread setting).
        ``> 1``: a pool of local processes started with ``"spawn"`` (scripts calling this
        must use an ``if __name__ == "__main__":`` guard); each worker uses
        ``threads_per_worker`` torch threads and dies with this process (no orphans when it
        is killed). The fits of a worker that dies (e.g. out of memory) run once more in a
        fresh pool; a fit whose worker died twice becomes a ``failed`` row saying so.
        Formats registered at run time (not on import) exist only with ``workers=1``. With
        ``scheduler="local"``: the number of Dask worker processes.
    seed : int, default 0
        ``torch.manual_seed(seed)`` before every fit, and ``seed=`` for formats whose
        ``project`` takes it (a named parameter, or a documented ``seed`` option of a
        projection forwarding ``**options``, such as gblr's); an explicit ``seed`` in
        ``options`` wins.
    progress : bool, optional
        Overall tqdm progress bar on stderr; default: only when stderr is a terminal.
    include, exclude : str or sequence of str, optional
        Tensor-name filters (globs, or regexes prefixed ``re:``) for a checkpoint or dict.
    reshape_conv : bool, default False
        Read 4-D conv kernels of a checkpoint as ``out x (in*kh*kw)`` matrices.
    threads_per_worker : int, optional
        ``torch.set_num_threads`` for the fits: in each worker process when ``workers > 1``
        or on Dask (default 1, so ``workers`` processes use ``workers`` cores), in this
        process for the duration of the sweep when ``workers == 1`` (default: torch's current
        setting). On a machine shared with other jobs, one thread per process avoids a severe
        slow-down of torch's multithreaded SVD under oversubscription.
    retry_failed : bool, default False
        On resume, run again the fits whose rows in ``out`` are ``failed`` (e.g. a worker
        killed by the out-of-memory killer); the new row replaces the old one.
    scheduler : None, "local", str or dask.distributed.Client, optional
        Run the fits on Dask distributed instead of local processes (needs
        ``gblr_approx[dask]``): ``"local"`` starts a LocalCluster on this machine, an address
        such as ``"tcp://host:8786"`` connects to a running scheduler, a ``Client`` is used as
        is. Workers read their tensor from the checkpoint path themselves (it must be
        readable at that path on every worker); rows are written here as they finish; a
        worker that dies loses only its fit, which Dask runs again (``failed`` row after
        repeated deaths). See docs/scale_out.md.
    time_products : bool or int, default False
        Also measure the product: ``True`` (batch 1) or a batch size ``B``: the median
        seconds of one ``A @ X`` and one dense ``W @ X`` for ``X`` of ``B`` columns, timed
        alternately in the process that fitted ``A`` (columns ``product_batch``,
        ``product_seconds``, ``dense_product_seconds``). On resume, ``ok`` rows without a
        timing are fitted again to get one.

    Returns
    -------
    pandas.DataFrame
        One row per (matrix, format, budget) in that nesting order, with the columns of
        :data:`COLUMNS` (described in :mod:`gblr_approx.analysis.rows`).

    Raises
    ------
    TypeError, ValueError
        Bad arguments (unknown format, budget out of range, options for a format not swept,
        empty input, filters matching nothing), or an ``out`` folder holding rows of other
        data under a matrix name, before any fit runs.
    FileNotFoundError
        A checkpoint path that does not exist.
    SweepLockedError
        Another sweep is writing into ``out``.
    """
    workers = check_positive_int(workers, "workers")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int; got {seed!r}")
    seed = int(seed)
    if threads_per_worker is not None:
        threads_per_worker = check_positive_int(threads_per_worker, "threads_per_worker")
    elif workers > 1 or scheduler is not None:
        threads_per_worker = 1
    batch = _product_batch(time_products)
    canon = check_formats(formats)
    blist = check_budgets(budgets)
    opts = check_options(options, canon)
    executor = make_executor(workers, threads_per_worker, scheduler)
    sources, origin = sources_of(matrices, include, exclude, reshape_conv)

    plan = Plan(sources, canon, blist, opts, seed, product_batch=batch)
    tasks = list(plan.tasks())
    if out is None:
        return _run(tasks, executor, progress, None, {})
    from .. import __version__

    with OutputFolder(out) as folder:
        previous = read_rows(folder.path / ROWS_FILE)
        folder.check_data(sources, previous)
        args = {
            "source": origin, "matrices": [s.name for s in sources], "formats": canon,
            "budgets": [budget_text(b) for b in blist],
            "options": {k: jsonable(v) for k, v in opts.items()}, "seed": seed,
            "version": __version__,
        }
        folder.record(args, sources)
        finished = {row_key(r): r for r in previous}

        def stale(row: Mapping[str, Any]) -> bool:
            if retry_failed and row["status"] == "failed":
                return True
            return batch is not None and row["status"] == "ok" and row["product_batch"] != batch

        todo_keys = {t.key for t in tasks if t.key not in finished or stale(finished[t.key])}
        unknown = {s.name for s in sources if s.data_hash is None}

        def record(row: Mapping[str, Any]) -> None:
            name = row["matrix"]
            if name in unknown and row.get("data_hash"):
                unknown.discard(name)
                for s in sources:
                    if s.name == name:
                        s.data_hash = row["data_hash"]
                folder.record(args, sources)

        writer = RowWriter(folder.path / ROWS_FILE)
        try:
            return _run(tasks, executor, progress, writer, finished, todo_keys, record)
        finally:
            writer.close()


def _run(
    tasks: list[Task],
    executor: Executor,
    progress: bool | None,
    writer: RowWriter | None,
    finished: dict[tuple, Mapping[str, Any]],
    todo_keys: set[tuple] | None = None,
    record: Callable[[Mapping[str, Any]], None] | None = None,
) -> pd.DataFrame:
    """Run the tasks not yet finished; the table of all ``tasks`` from ``finished`` rows."""
    todo = [t for t in tasks if (t.key in todo_keys if todo_keys is not None
                                 else t.key not in finished)]
    show = sys.stderr.isatty() if progress is None else bool(progress)
    from tqdm.auto import tqdm

    bar = tqdm(total=len(tasks), initial=len(tasks) - len(todo), desc="sweep", unit="fit",
               disable=not show, file=sys.stderr, dynamic_ncols=True)

    def on_row(row: dict[str, Any]) -> None:
        if writer is not None:
            writer.write(row)
        if record is not None:
            record(row)
        finished[row_key(row)] = row
        name = row["matrix"] if len(row["matrix"]) <= 32 else "..." + row["matrix"][-29:]
        bar.set_postfix_str(f"{name} {row['format']}", refresh=False)
        bar.update(1)

    try:
        executor.run(todo, on_row)
    finally:
        bar.close()
    return frame([finished[t.key] for t in tasks])

