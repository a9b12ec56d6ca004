"""A low-rank format with test hooks (sleep, die), importable by sweep worker processes.

Worker processes (local ``spawn`` pools, Dask workers) start with a fresh interpreter, where
formats registered by a test do not exist. Passing a :class:`Hook` in the format's options
makes each worker import this module when it unpickles its task, which registers the format
there too.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from gblr_approx.formats.base import register_format
from gblr_approx.formats.lowrank import LowRank


class Hook:
    """Options of :class:`HookRank`: ``sleep`` seconds per fit; ``die_file`` and ``die_times``:
    the fitting process SIGKILLs itself while the count in ``die_file`` is below
    ``die_times`` (each death adds one)."""

    def __init__(self, sleep: float = 0.0, die_file: str | None = None,
                 die_times: int = 0) -> None:
        self.sleep, self.die_file, self.die_times = sleep, die_file, die_times

    def __repr__(self) -> str:  # stable: part of the sweep's options text (the row key)
        return f"Hook({self.sleep!r}, {self.die_file!r}, {self.die_times!r})"

    def deaths(self) -> int:
        p = Path(self.die_file)
        return int(p.read_text()) if p.is_file() else 0


@register_format
class HookRank(LowRank):
    format_name = "hookrank"

    @classmethod
    def project(cls, W, budget, hook: Hook | None = None, **options):
        if hook is not None:
            time.sleep(hook.sleep)
            if hook.die_file is not None and hook.deaths() < hook.die_times:
                Path(hook.die_file).write_text(str(hook.deaths() + 1))
                os.kill(os.getpid(), signal.SIGKILL)
        return LowRank.project(W, budget)
