"""The sweep engine: data identity on resume, the folder lock, retries of failed or killed
fits, workers dying with their parent, product timing, the LLM-shaped test checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import signal
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
from gblr_approx.analysis.outdir import OutputFolder, SweepLockedError
from gblr_approx.analysis.rows import COLUMNS, ROWS_FILE
from gblr_approx.cli import main

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
TIMING = ("seconds", "finished_at", "product_seconds", "dense_product_seconds")


def _ckpt(path: Path, seed: int) -> Path:
    g = torch.Generator().manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"l.0.weight": torch.randn(24, 16, generator=g),
               "l.1.weight": torch.randn(16, 20, generator=g)}, str(path))
    return path


def _same(a: pd.DataFrame, b: pd.DataFrame) -> None:
    cols = [c for c in COLUMNS if c not in TIMING]
    pd.testing.assert_frame_equal(a[cols].reset_index(drop=True), b[cols].reset_index(drop=True))


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)])}


# ------------------------------------------------------------------------ data identity
def test_same_name_and_size_different_values_is_not_given_old_rows(tmp_path):
    a = _ckpt(tmp_path / "ft1" / "model.safetensors", seed=1)
    b = _ckpt(tmp_path / "ft2" / "model.safetensors", seed=2)  # another fine-tune
    assert a.stat().st_size == b.stat().st_size
    out = tmp_path / "run"
    first = ga.sweep(a, ["lowrank"], [0.5], out=out)
    rows_before = (out / ROWS_FILE).read_bytes()
    with pytest.raises(ValueError, match="computed from different data"):
        ga.sweep(b, ["lowrank"], [0.5], out=out)
    assert (out / ROWS_FILE).read_bytes() == rows_before  # nothing written, nothing reused
    fresh = ga.sweep(b, ["lowrank"], [0.5], out=tmp_path / "run2")  # a new folder computes
    assert not (fresh["rel_error"].to_numpy() == first["rel_error"].to_numpy()).any()
    assert set(fresh["data_hash"]).isdisjoint(first["data_hash"])

    # the same file overwritten in place with other values (same name, size and shape)
    shutil.copy(b, a)
    with pytest.raises(ValueError, match="different data"):
        ga.sweep(a, ["lowrank"], [0.5], out=out)


def test_unchanged_or_copied_data_resumes_without_refitting(tmp_path):
    a = _ckpt(tmp_path / "m.safetensors", seed=1)
    out = tmp_path / "run"
    first = ga.sweep(a, ["lowrank"], [0.25, 0.5], out=out)
    data = json.loads((out / "sweep.json").read_text())["data"]
    assert set(data) == {"l.0.weight", "l.1.weight"}
    assert data["l.0.weight"]["hash"] == first["data_hash"].iloc[0]
    # a copy elsewhere (other stat) is hashed again, found equal, and its rows are kept
    c = tmp_path / "copy" / "m.safetensors"
    c.parent.mkdir()
    shutil.copy(a, c)
    again = ga.sweep(c, ["lowrank"], [0.25, 0.5], out=out)
    pd.testing.assert_frame_equal(again, first)  # same timings: nothing refitted
    assert len(ga.load_sweep(out)) == 4


# --------------------------------------------------------------------------------- lock
def test_second_sweep_on_one_folder_is_refused(tmp_path):
    mats = {"a": torch.randn(12, 10, dtype=torch.float64)}
    with OutputFolder(tmp_path):  # another sweep holds the folder
        with pytest.raises(SweepLockedError, match=f"in use by another sweep \\(pid {os.getpid()}"):
            ga.sweep(mats, ["lowrank"], [0.5], out=tmp_path)
        res = CliRunner().invoke(main, ["sweep", "-f", "lowrank", "-b", "0.5", "-o",
                                        str(tmp_path)])
        assert res.exit_code == 1 and "in use by another sweep" in res.output
    assert not (tmp_path / ROWS_FILE).exists()
    ga.sweep(mats, ["lowrank"], [0.5], out=tmp_path)  # released: the folder works again
    ga.sweep(mats, ["lowrank"], [0.5], out=tmp_path)  # and is released after each sweep
    assert len(ga.load_sweep(tmp_path)) == 1


# ------------------------------------------------------------------------------ retries
def test_killed_worker_is_retried_once_then_recorded_and_retry_failed(tmp_path):
    W = torch.randn(20, 12, generator=torch.Generator().manual_seed(0))
    die = str(tmp_path / "deaths")
    # the fitting process is SIGKILLed (as by the OOM killer) on both runs of the fit: it is
    # run again once in a fresh pool, then recorded as failed with the cause
    opts = {"hookrank": {"hook": Hook(die_file=die, die_times=2)}}
    out = tmp_path / "run"
    df = ga.sweep({"a": W}, ["hookrank"], [0.5], options=opts, workers=2, out=out)
    assert Hook(die_file=die).deaths() == 2
    assert df["status"].tolist() == ["failed"]
    assert "worker process died while this fit was running, 2 times" in df["message"].iloc[0]
    # a plain rerun keeps the failed row; retry_failed runs it again and replaces it
    assert ga.sweep({"a": W}, ["hookrank"], [0.5], options=opts,
                    out=out)["status"].tolist() == ["failed"]
    df = ga.sweep({"a": W}, ["hookrank", "lowrank"], [0.5], options=opts, out=out,
                  retry_failed=True)
    assert df["status"].tolist() == ["ok", "ok"]
    back = ga.load_sweep(out)
    assert back["status"].tolist() == ["ok", "ok"]  # the new row supersedes the failed one
    assert len((out / ROWS_FILE).read_text().splitlines()) == 1 + 3  # appended, not rewritten
    assert back["rel_error"].iloc[0] == back["rel_error"].iloc[1]  # hookrank is low-rank


_ORPHAN_SCRIPT = """
import torch, gblr_approx as ga
from sweep_helpers import Hook
if __name__ == "__main__":
    mats = {{f"m{{i}}": torch.randn(16, 16) for i in range(12)}}
    ga.sweep(mats, ["hookrank"], [0.5], options={{"hookrank": {{"hook": Hook(0.5)}}}},
             workers=2, out={out!r})
"""


@pytest.mark.parametrize("sig", [signal.SIGKILL])  # SIGTERM: the same default action
def test_workers_die_with_their_parent(tmp_path, sig):
    psutil = pytest.importorskip("psutil")
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(_ORPHAN_SCRIPT.format(out=str(tmp_path / "out"))))
    # as `python run.py | cat`: the pipeline must return once the sweep is killed
    shell = subprocess.Popen(f"{sys.executable} {script} | cat", shell=True, env=_env(),
                             stdout=subprocess.PIPE, start_new_session=True)
    try:
        rows = tmp_path / "out" / ROWS_FILE
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if rows.is_file() and len(rows.read_text().splitlines()) >= 2:
                break
            time.sleep(0.05)
        sweep = next(p for p in psutil.Process(shell.pid).children()
                     if "run.py" in " ".join(p.cmdline()))
        workers = sweep.children(recursive=True)
        assert len(workers) >= 2
        sweep.send_signal(sig)
        shell.wait(timeout=10)  # `| cat` returned: no worker holds the pipe open

        def alive(p):
            try:
                return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return False

        deadline = time.monotonic() + 5
        while any(alive(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [p.pid for p in workers if alive(p)]
    finally:
        if shell.poll() is None:
            os.killpg(shell.pid, signal.SIGKILL)


# ------------------------------------------------------------------------ product times
def test_time_products_columns_and_cli(tmp_path):
    W = torch.randn(64, 48, dtype=torch.float32, generator=torch.Generator().manual_seed(0))
    df = ga.sweep({"W": W}, ["lowrank", "blocksparse"], [0.25], time_products=8,
                  options={"blocksparse": {"block_shape": (8, 8)}}, out=tmp_path)
    assert (df["product_batch"] == 8).all()
    assert (df["product_seconds"] > 0).all() and (df["dense_product_seconds"] > 0).all()
    assert ga.sweep({"W": W}, "lowrank", 0.5)["product_seconds"].isna().all()
    # an earlier folder without timings: the ok rows are fitted again to time them
    ga.sweep({"W": W}, "lowrank", 0.5, out=tmp_path / "b")
    again = ga.sweep({"W": W}, "lowrank", 0.5, out=tmp_path / "b", time_products=True)
    assert again["product_batch"].tolist() == [1] and len(ga.load_sweep(tmp_path / "b")) == 1
    with pytest.raises(ValueError, match="time_products"):
        ga.sweep({"W": W}, "lowrank", 0.5, time_products=0)
    res = CliRunner().invoke(main, ["sweep", "-f", "lowrank", "-b", "0.25", "-i", "*query*",
                                    "--time-products", "--product-batch", "4"])
    assert res.exit_code == 0, res.output
    assert "measured speed-up of A @ X over the dense W @ X (X with 4 column(s)" in res.output
    line = next(ln for ln in res.output.splitlines() if "query" in ln and ln.endswith("x"))
    assert float(line.split()[-1].rstrip("x")) > 0


# ------------------------------------------------------------------------ LLM-like data
def test_llm_like_checkpoint_shapes_and_spectrum(tmp_path):
    from gblr_approx.datasets import LLM_LAYER_SHAPES, llm_like_checkpoint

    p = llm_like_checkpoint(tmp_path / "llm.safetensors", layers=2, scale=1 / 32, rank=32,
                            decay=0.6)
    store = ga.load_weights(p, matrices_only=False)
    assert len(store) == 2 * (len(LLM_LAYER_SHAPES) + 2)
    up = store.info("model.layers.1.mlp.up_proj.weight")
    assert up.shape == (344, 128) and up.dtype == "bfloat16"  # 11008/32, 4096/32
    assert store.info("model.layers.0.self_attn.q_proj.weight").shape == (128, 128)
    s = torch.linalg.svdvals(store["model.layers.0.self_attn.q_proj.weight"].float())
    head = s[:32] / s[0]
    # the head follows i^-0.6 (the bulk adds its energy on top near the end of the head)
    ref = torch.arange(1, 33, dtype=torch.float32).pow(-0.6)
    assert torch.allclose(head[:16], ref[:16], rtol=0.15)
    assert s[40] < 1.2 * s[31] and s[-1] > 0  # a noise bulk below the head, full rank
    again = llm_like_checkpoint(tmp_path / "again.safetensors", layers=2, scale=1 / 32,
                                rank=32, decay=0.6)
    for name, t in ga.load_weights(again).items():  # deterministic
        assert torch.equal(t, store[name])
    with pytest.raises(ValueError, match="scale"):
        llm_like_checkpoint(tmp_path / "x.safetensors", scale=0)


@pytest.mark.slow
def test_sweep_of_a_scaled_down_llm_checkpoint(tmp_path):
    from gblr_approx.datasets import llm_like_checkpoint

    p = llm_like_checkpoint(tmp_path / "llm.safetensors", scale=1 / 16)
    df = ga.sweep(p, ["lowrank"], [0.1, 0.25], out=tmp_path / "run")
    assert len(df) == 14 and (df["status"] == "ok").all()
    assert set(df["dtype"]) == {"bfloat16"}
    store = ga.load_weights(p)
    for _, r in df.iterrows():  # Eckart-Young: the rows are the best low-rank errors
        W = store[r["matrix"]].double()
        rank = r["flops"] // (r["rows"] + r["cols"])
        s = torch.linalg.svdvals(W)
        assert r["rel_error"] == pytest.approx(float(s[rank:].norm() / s.norm()), rel=1e-4)


def test_spectral_norm_by_lanczos_equals_the_svd():
    from gblr_approx.analysis.fitting import spectral_norm

    g = torch.Generator().manual_seed(3)
    for m, n in [(90, 60), (60, 90)]:
        M = torch.randn(m, n, generator=g, dtype=torch.float64)
        M[:, 0] *= 1.0001  # nearly tied top singular values converge too
        exact = float(torch.linalg.svdvals(M)[0])
        assert spectral_norm(M, full_below=0) == pytest.approx(exact, rel=1e-12)
        assert spectral_norm(M) == pytest.approx(exact, rel=1e-14)  # small: the full SVD
    assert spectral_norm(torch.zeros(50, 40, dtype=torch.float64), full_below=0) == 0.0


def test_cli_sweep_engine_options_are_checked():
    res = CliRunner().invoke(main, ["sweep", "-f", "lowrank", "-b", "0.5", "--retry-failed"])
    assert res.exit_code == 2 and "give --out DIR" in res.output
    res = CliRunner().invoke(main, ["sweep", "-f", "lowrank", "-b", "0.5", "--product-batch",
                                    "0"])
    assert res.exit_code == 2 and "--product-batch" in res.output
