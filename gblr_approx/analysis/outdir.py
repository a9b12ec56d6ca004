"""A sweep's output folder: one writer at a time, and rows that belong to the data swept.

``DIR/.lock`` is held with an exclusive :func:`fcntl.flock` for the whole sweep, so a second
sweep on the same folder is refused at once (:class:`SweepLockedError`, naming the process
that holds it) instead of interleaving rows. The lock dies with its process: a killed sweep
never leaves a stale lock. (On systems without ``fcntl`` the folder is not locked.)

``DIR/sweep.json`` records the arguments of the last sweep and, per matrix, the
:func:`~.plan.tensor_hash` of the data its rows were computed from, with the checkpoint file's
:func:`~.plan.file_stat`. On resume the rows of each matrix are compared with the data given
now: an unchanged file (same stat) is trusted without reading it; a changed or moved file is
hashed again (one read of each tensor that has rows); rows of different data under the same
name are refused with a ValueError before any fit runs.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .plan import Source, file_stat, forget_stores, read_source, tensor_hash

__all__ = ["ARGS_FILE", "LOCK_FILE", "OutputFolder", "SweepLockedError"]

ARGS_FILE = "sweep.json"
LOCK_FILE = ".lock"


class SweepLockedError(RuntimeError):
    """Another sweep is writing into the same output folder."""


class OutputFolder:
    """The ``out=`` folder of a sweep; use as a context manager to hold its lock."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._fd: int | None = None
        self._record: dict[str, Any] = {}

    # ------------------------------------------------------------------------- the lock
    def __enter__(self) -> OutputFolder:
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not on Linux/macOS
            self._fd = fd
            return self
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise SweepLockedError(
                f"{self.path} is in use by another sweep ({holder}); wait for it to finish or "
                "give another output folder (two sweeps on one folder would mix their rows)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the flock
            self._fd = None

    # ------------------------------------------------------------------------ sweep.json
    def _read_record(self) -> dict[str, Any]:
        path = self.path / ARGS_FILE
        if not path.is_file():
            return {}
        try:
            rec = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            return {}
        return rec if isinstance(rec, dict) else {}

    def check_data(self, sources: list[Source], rows: Iterable[Mapping[str, Any]]) -> None:
        """Refuse rows computed from other data than ``sources`` (see the module docstring).

        Sets ``data_hash`` of checkpoint sources whose hash is now known.
        """
        self._record = self._read_record()
        data = self._record.setdefault("data", {})
        if not isinstance(data, dict):
            data = self._record["data"] = {}
        seen: dict[str, set[str]] = {}
        for r in rows:
            if r.get("data_hash"):
                seen.setdefault(str(r["matrix"]), set()).add(str(r["data_hash"]))
        for src in sources:
            old = seen.get(src.name)
            if not old:
                continue
            if src.data_hash is None:
                rec = data.get(src.name) or {}
                stat = src.stat or file_stat(src.path)
                if (rec.get("hash") and rec.get("file") == src.path
                        and rec.get("stat") == stat):
                    src.data_hash = rec["hash"]
                else:  # changed, touched or moved: read this tensor once to know
                    src.data_hash = tensor_hash(read_source(src))
                    forget_stores()
                    data[src.name] = {"hash": src.data_hash, "file": src.path, "stat": stat}
            if old != {src.data_hash}:
                where = f" ({src.path})" if src.path else ""
                raise ValueError(
                    f"{self.path} already holds results for a matrix named {src.name!r} "
                    f"computed from different data ({', '.join(sorted(old))} there, "
                    f"{src.data_hash} now{where}); use a new output folder or delete it"
                )

    def record(self, args: Mapping[str, Any], sources: list[Source]) -> None:
        """Write ``sweep.json``: ``args`` and the known data identity of each matrix."""
        data = dict(self._record.get("data", {}))
        for src in sources:
            if src.data_hash is not None:
                entry: dict[str, Any] = {"hash": src.data_hash}
                if src.path is not None:
                    prev = data.get(src.name) or {}
                    if prev.get("hash") == src.data_hash and prev.get("file") == src.path:
                        entry = prev
                    else:
                        entry.update(file=src.path, stat=src.stat or file_stat(src.path))
                data[src.name] = entry
        self._record = {**args, "data": data}
        path = self.path / ARGS_FILE
        tmp = path.with_name(ARGS_FILE + ".tmp")
        tmp.write_text(json.dumps(self._record, indent=1, default=repr), encoding="utf-8")
        os.replace(tmp, path)
