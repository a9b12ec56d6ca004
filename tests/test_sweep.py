"""Sweeps: table contents against Eckart-Young, statuses, incremental output and resume."""

from __future__ import annotations

import math
import numbers

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

import gblr_approx as ga
from gblr_approx.analysis.sweep import COLUMNS, CONTRACT_COLUMNS, ROWS_FILE
from gblr_approx.formats.base import FORMATS, register_format
from gblr_approx.formats.lowrank import LowRank

CALLS: list[tuple[str, int]] = []
STOP_AT: list[int] = []  # raise KeyboardInterrupt (a "kill") on this call number


class _Counting(LowRank):
    """Low-rank projection that records its calls (and can simulate a kill or a bug)."""

    format_name = "countingrank"

    @classmethod
    def project(cls, W, budget, **options):
        CALLS.append((tuple(W.shape), budget))
        if STOP_AT and len(CALLS) == STOP_AT[0]:
            raise KeyboardInterrupt
        if options.get("explode"):
            raise RuntimeError("deliberate failure\nsecond line")
        return LowRank.project(W, budget)


@pytest.fixture
def counting():
    register_format(_Counting)
    CALLS.clear()
    STOP_AT.clear()
    yield "countingrank"
    FORMATS.pop("countingrank", None)
    CALLS.clear()
    STOP_AT.clear()


def _mats():
    g = torch.Generator().manual_seed(0)
    return {
        "a": torch.randn(24, 16, generator=g, dtype=torch.float64),
        "b": torch.randn(12, 20, generator=g, dtype=torch.float64),
        "c": torch.randn(16, 16, generator=g, dtype=torch.float64),
    }


def test_lowrank_rows_match_eckart_young():
    mats = _mats()
    df = ga.sweep(mats, ["lowrank"], [0.25, 0.5, 200])
    assert tuple(df.columns[: len(CONTRACT_COLUMNS)]) == CONTRACT_COLUMNS
    assert tuple(df.columns) == COLUMNS
    assert len(df) == 9 and (df["status"] == "ok").all()
    assert list(df["matrix"]) == ["a"] * 3 + ["b"] * 3 + ["c"] * 3
    assert df["budget"].tolist() == [0.25, 0.5, 200] * 3
    for _, row in df.iterrows():
        W = mats[row["matrix"]]
        m, n = W.shape
        b = row["budget"]
        macs = int(b) if isinstance(b, numbers.Integral) else math.floor(b * m * n)
        r = macs // (m + n)
        s = torch.linalg.svdvals(W)
        assert row["budget_macs"] == macs
        assert row["flops"] == r * (m + n) and row["params"] == r * (m + n)
        assert row["budget_fraction"] == pytest.approx(r * (m + n) / (m * n))
        assert row["rel_error"] == pytest.approx(float(s[r:].norm() / s.norm()), rel=1e-9)
        assert row["rel_error_2"] == pytest.approx(float(s[r] / s[0]), rel=1e-9)
        assert (row["rows"], row["cols"], row["shape"]) == (m, n, f"{m}x{n}")
        assert row["seconds"] > 0 and row["message"] == ""
    assert set(df["version"]) == {ga.__version__} and set(df["seed"]) == {0}
    assert df["budget"].dtype == object  # mixed float fractions and int MACs, as given


def test_infeasible_and_failed_rows_do_not_abort(counting):
    mats = _mats()
    df = ga.sweep(mats, ["lowrank", counting], [30, 0.5],
                  options={counting: {"explode": True}})
    assert len(df) == 12
    inf = df[(df["format"] == "lowrank") & (df["budget"] == 30)]
    assert (inf["status"] == "infeasible").all()
    assert inf["message"].str.contains("smallest feasible budget is 40 MACs").any()  # a: 24+16
    assert inf["flops"].isna().all() and inf["rel_error"].isna().all()
    ok = df[(df["format"] == "lowrank") & (df["budget"] == 0.5)]
    assert (ok["status"] == "ok").all() and ok["rel_error"].between(0, 1).all()
    failed = df[df["format"] == counting]
    assert (failed["status"] == "failed").all()
    assert set(failed["message"]) == {"RuntimeError: deliberate failure | second line"}
    assert failed["options"].iloc[0] == '{"explode": true}'
    assert failed["rel_error_2"].isna().all() and failed["params"].isna().all()


def test_output_roundtrip_and_load_sweep(tmp_path):
    df = ga.sweep(_mats(), ["lowrank", "dense"], [0.25, 30], out=tmp_path / "run")
    back = ga.load_sweep(tmp_path / "run")
    pd.testing.assert_frame_equal(df, back)  # same values, dtypes, NaN/NA and budget types
    assert (tmp_path / "run" / "sweep.json").is_file()
    lines = (tmp_path / "run" / ROWS_FILE).read_text().splitlines()
    assert len(lines) == 1 + 12 and lines[0].startswith("matrix,rows,cols,format,budget,flops")


def test_resume_after_kill_recomputes_only_missing(tmp_path, counting):
    mats = _mats()
    fmts, budgets = [counting, "lowrank"], [0.2, 0.4, 0.6]
    total_counting = len(mats) * len(budgets)  # 9 calls of the counting format in a full run
    STOP_AT.append(5)
    with pytest.raises(KeyboardInterrupt):
        ga.sweep(mats, fmts, budgets, out=tmp_path)
    partial = ga.load_sweep(tmp_path)
    # matrix a: 3 counting + 3 lowrank rows, then b: 1 counting row before the kill
    assert len(partial) == 7
    # a row cut short by a kill mid-write is ignored and later recomputed
    with open(tmp_path / ROWS_FILE, "a") as f:
        f.write("c,16,16,countingrank,0.6,40,0.15")
    assert len(ga.load_sweep(tmp_path)) == 7

    CALLS.clear()
    STOP_AT.clear()
    resumed = ga.sweep(mats, fmts, budgets, out=tmp_path)
    assert len(CALLS) == total_counting - 4  # the 4 finished counting fits were not rerun
    assert len(resumed) == 18 and not resumed.duplicated(["matrix", "format", "budget"]).any()
    rows = ga.load_sweep(tmp_path)
    assert len(rows) == 18  # no duplicated or lost rows on disk either
    # the rows finished before the kill are kept verbatim (same timings and timestamps)
    pd.testing.assert_frame_equal(rows.iloc[:7], partial)
    kept = resumed.merge(partial[["matrix", "format", "budget", "finished_at", "seconds"]],
                         on=["matrix", "format", "budget"], suffixes=("", "_before"))
    assert len(kept) == 7 and (kept["finished_at"] == kept["finished_at_before"]).all()

    # same table as an uninterrupted sweep (apart from timings)
    CALLS.clear()
    fresh = ga.sweep(mats, fmts, budgets, out=tmp_path / "fresh")
    cols = [c for c in COLUMNS if c not in ("seconds", "finished_at")]
    pd.testing.assert_frame_equal(resumed[cols], fresh[cols])

    # a rerun of a finished sweep computes nothing
    CALLS.clear()
    again = ga.sweep(mats, fmts, budgets, out=tmp_path)
    assert CALLS == []
    pd.testing.assert_frame_equal(again, resumed)
    # adding a budget computes only the new rows
    more = ga.sweep(mats, fmts, budgets + [0.8], out=tmp_path)
    assert len(CALLS) == 3 and len(more) == 24


def test_resume_refuses_different_data_under_same_name(tmp_path):
    mats = _mats()
    ga.sweep({"a": mats["a"]}, ["lowrank"], [0.5], out=tmp_path)
    with pytest.raises(ValueError, match="different data"):
        ga.sweep({"a": mats["b"]}, ["lowrank"], [0.5], out=tmp_path)


def test_checkpoint_input_parallel_matches_serial(tmp_path):
    mats = {f"layer.{i}.weight": w.float() for i, w in enumerate(_mats().values())}
    mats["layer.0.bias"] = torch.ones(24)
    save_file(mats, str(tmp_path / "m.safetensors"))
    kw = dict(formats=["lowrank", "blocksparse"], budgets=[0.25, 0.5], exclude="*.2.*",
              options={"blocksparse": {"block_shape": (4, 4)}})
    serial = ga.sweep(tmp_path / "m.safetensors", **kw)
    parallel = ga.sweep(str(tmp_path / "m.safetensors"), workers=2, out=tmp_path / "par", **kw)
    assert sorted(set(serial["matrix"])) == ["layer.0.weight", "layer.1.weight"]
    assert len(parallel) == 8 and (parallel["status"] == "ok").all()
    cols = ["matrix", "format", "budget", "flops", "status"]
    pd.testing.assert_frame_equal(serial[cols], parallel[cols])
    np.testing.assert_allclose(serial["rel_error"], parallel["rel_error"], rtol=1e-5)
    assert set(serial["dtype"]) == {"float32"}
    store = ga.load_weights(tmp_path / "m.safetensors")  # an open store, filtered here
    df = ga.sweep(store, ["lowrank"], [0.5], include="re:layer\\.1\\.")
    assert df["matrix"].tolist() == ["layer.1.weight"]
    with pytest.raises(ValueError, match="match none"):
        ga.sweep(store, ["lowrank"], [0.5], include="nothing*")


def test_single_matrix_numpy_and_relative_error_agree():
    W = np.random.default_rng(0).standard_normal((10, 14))
    df = ga.sweep(W, "lowrank", 0.5, seed=3)
    assert df["matrix"].tolist() == ["W"] and df["seed"].tolist() == [3]
    A = ga.project(W, "lowrank", 0.5)
    assert df["rel_error"].iloc[0] == pytest.approx(ga.relative_error(W, A), rel=1e-12)
    assert df["rel_error_2"].iloc[0] == pytest.approx(ga.relative_error(W, A, ord=2), rel=1e-12)


def test_bad_arguments_fail_before_any_fit(counting):
    mats = _mats()
    with pytest.raises(ValueError, match="unknown format 'nope'"):
        ga.sweep(mats, ["lowrank", "nope"], [0.5])
    with pytest.raises(ValueError, match=r"must lie in \(0, 1\]; got 1.5"):
        ga.sweep(mats, ["lowrank"], [0.5, 1.5])
    with pytest.raises(TypeError, match="budgets must be floats"):
        ga.sweep(mats, ["lowrank"], ["0.5"])
    with pytest.raises(ValueError, match="not among the formats swept"):
        ga.sweep(mats, ["lowrank"], [0.5], options={"dense": {}})
    with pytest.raises(ValueError, match="workers must be an integer >= 1"):
        ga.sweep(mats, ["lowrank"], [0.5], workers=0)
    with pytest.raises(ValueError, match="NaN"):
        ga.sweep({"x": torch.full((3, 3), float("nan"))}, ["lowrank"], [0.5])
    with pytest.raises(ValueError, match="match none"):
        ga.sweep(mats, ["lowrank"], [0.5], include="zzz*")
    with pytest.raises(FileNotFoundError):
        ga.sweep("/no/such/checkpoint.safetensors", ["lowrank"], [0.5])
    assert CALLS == []


def test_default_formats_are_the_fast_projections():
    from gblr_approx.analysis.sweep import default_formats

    fmts = default_formats()
    assert fmts[:4] == ["lowrank", "blocksparse", "blocklowrank", "monarch"]
    assert "dense" not in fmts and "blast" not in fmts
    assert set(fmts) <= set(FORMATS)
