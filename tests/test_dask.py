"""Sweeps on Dask distributed: same table as serial, resume after the client dies, killed
workers, and a separately started scheduler and worker on loopback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file
from sweep_helpers import Hook

import gblr_approx as ga
from gblr_approx.analysis.rows import COLUMNS, ROWS_FILE
from gblr_approx.cli import main

distributed = pytest.importorskip("dask.distributed")

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
TIMING = ("seconds", "finished_at", "product_seconds", "dense_product_seconds")
KW = dict(formats=["lowrank", "blocksparse"], budgets=[0.25, 0.5],
          options={"blocksparse": {"block_shape": (4, 4)}})


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)])}


def _same(a: pd.DataFrame, b: pd.DataFrame) -> None:
    cols = [c for c in COLUMNS if c not in TIMING]
    pd.testing.assert_frame_equal(a[cols].reset_index(drop=True), b[cols].reset_index(drop=True))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    p = tmp_path_factory.mktemp("dask") / "m.safetensors"
    save_file({f"layer.{i}.weight": torch.randn(16 + 4 * i, 20, generator=g) for i in range(3)},
              str(p))
    return p


@pytest.fixture(scope="module")
def serial(ckpt):
    return ga.sweep(ckpt, **KW)


@pytest.fixture(scope="module")
def client():
    import logging

    with distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1,
                                  dashboard_address=None, silence_logs=logging.ERROR) as cluster, \
            distributed.Client(cluster) as c:
        yield c


def test_local_cluster_gives_the_serial_table(ckpt, serial, client, tmp_path):
    df = ga.sweep(ckpt, scheduler=client, out=tmp_path, **KW)
    _same(df, serial)  # exactly: same seeds, one thread per fit
    assert (df["status"] == "ok").all() and len(df) == 12
    order = ["matrix", "format", "budget"]
    pd.testing.assert_frame_equal(  # rows on disk are in the order they finished
        ga.load_sweep(tmp_path).sort_values(order).reset_index(drop=True),
        df.sort_values(order).reset_index(drop=True))
    # a rerun computes nothing: it does not even need a scheduler
    again = ga.sweep(ckpt, scheduler=client, out=tmp_path, **KW)
    pd.testing.assert_frame_equal(again, df)


def test_killed_worker_loses_only_its_task(ckpt, client, tmp_path):
    die = str(tmp_path / "deaths")
    opts = {"hookrank": {"hook": Hook(die_file=die, die_times=1)}}
    df = ga.sweep(ckpt, ["hookrank", "lowrank"], [0.5], options=opts, scheduler=client,
                  out=tmp_path / "run", include="layer.0.*")
    assert Hook(die_file=die).deaths() == 1  # the worker running it was SIGKILLed once
    assert df["status"].tolist() == ["ok", "ok"]  # and Dask ran the task again elsewhere
    assert df["rel_error"].iloc[0] == df["rel_error"].iloc[1]
    client.wait_for_workers(2, timeout=60)  # the nanny restarts the killed worker


_CLIENT_SCRIPT = """
import gblr_approx as ga
from sweep_helpers import Hook
if __name__ == "__main__":
    ga.sweep({ckpt!r}, ["hookrank", "lowrank", "blocksparse"], [0.25, 0.5],
             options={{"hookrank": {{"hook": Hook(0.4)}},
                      "blocksparse": {{"block_shape": [4, 4]}}}},
             scheduler="local", workers=2, out={out!r})
"""


def test_resume_after_the_client_is_killed(ckpt, client, tmp_path):
    psutil = pytest.importorskip("psutil")
    out = tmp_path / "run"
    script = tmp_path / "client.py"
    script.write_text(textwrap.dedent(_CLIENT_SCRIPT.format(ckpt=str(ckpt), out=str(out))))
    proc = subprocess.Popen([sys.executable, str(script)], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        rows = out / ROWS_FILE
        while time.monotonic() < deadline and proc.poll() is None:
            if rows.is_file() and len(rows.read_text().splitlines()) >= 1 + 3:
                break
            time.sleep(0.05)
        kids = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    partial = ga.load_sweep(out)
    assert 3 <= len(partial) < 18  # killed mid-way
    # the cluster's worker processes do not outlive their client
    gone, alive = psutil.wait_procs(kids, timeout=15)
    assert not alive

    # resume with the same arguments (the Hook is part of the options, hence of the key)
    opts = {"hookrank": {"hook": Hook(0.4)}, "blocksparse": {"block_shape": (4, 4)}}
    fmts = ["hookrank", "lowrank", "blocksparse"]
    resumed = ga.sweep(ckpt, fmts, [0.25, 0.5], options=opts, scheduler=client, out=out)
    assert len(resumed) == 18 and (resumed["status"] == "ok").all()
    back = ga.load_sweep(out)
    assert len(back) == 18 and len(out.joinpath(ROWS_FILE).read_text().splitlines()) == 1 + 18
    pd.testing.assert_frame_equal(back.iloc[: len(partial)], partial)  # kept verbatim
    ser = ga.sweep(ckpt, ["lowrank", "blocksparse"], [0.25, 0.5],
                   options={"blocksparse": {"block_shape": (4, 4)}})
    _same(resumed[resumed["format"] != "hookrank"], ser)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_separately_started_scheduler_and_worker(ckpt, serial, tmp_path):
    port = _free_port()
    addr = f"tcp://127.0.0.1:{port}"
    # what `dask scheduler` and `dask worker` run, started as separate processes
    procs = [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host",
                               "127.0.0.1", "--port", str(port), "--no-dashboard"],
                              env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_worker", addr, "--nworkers", "1",
             "--nthreads", "1", "--no-dashboard"],
            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        with distributed.Client(addr, timeout="60s") as c:
            c.wait_for_workers(1, timeout=60)
        df = ga.sweep(ckpt, scheduler=addr, out=tmp_path / "py", **KW)
        _same(df, serial)
        res = CliRunner().invoke(main, ["sweep", str(ckpt), "-f", "lowrank,blocksparse",
                                        "-b", "0.25,0.5", "--option", "blocksparse.block_shape=4,4",
                                        "--scheduler", addr, "-o", str(tmp_path / "cli"),
                                        "--json"])
        assert res.exit_code == 0, res.output
        _same(ga.load_sweep(tmp_path / "cli").sort_values(["matrix", "format", "budget"],
                                                          kind="stable"),
              serial.sort_values(["matrix", "format", "budget"], kind="stable"))
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


def test_bad_scheduler_arguments(ckpt):
    with pytest.raises(TypeError, match="scheduler must be"):
        ga.sweep(ckpt, "lowrank", 0.5, scheduler=42)
    with pytest.raises(ValueError, match="not an address"):
        ga.sweep(ckpt, "lowrank", 0.5, scheduler="nonsense")
