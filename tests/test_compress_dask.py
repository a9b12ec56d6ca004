"""compress_model with its per-layer fits on Dask: the same model and report as serially,
and a layer whose workers keep dying is fitted in the calling process instead."""

from __future__ import annotations

import logging
import os

import pytest
import torch
from torch import nn

import gblr_approx as ga
from gblr_approx.compress_dask import run_layer_jobs

distributed = pytest.importorskip("dask.distributed")

TIMING = ["seconds"]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(40, 48), nn.ReLU(), nn.Linear(48, 32), nn.ReLU(),
                         nn.Linear(32, 40))


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1,
                                  dashboard_address=":0", silence_logs=logging.ERROR) as cluster, \
            distributed.Client(cluster) as c:
        yield c


def _compress(scheduler, **kw):
    model = _model()
    X = torch.randn(64, 40, generator=torch.Generator().manual_seed(1))
    report = ga.nn.compress_model(model, **kw, scheduler=scheduler, progress=False)
    with torch.no_grad():
        y = model(X)
    return report.drop(columns=TIMING), y


@pytest.mark.parametrize("kw", [
    dict(formats=["lowrank", "blocklowrank", "monarch"], budget=0.4),
    dict(formats=["lowrank", "blocksparse"], budget=0.5, allocation="global",
         fractions=(0.3, 0.6), block_shape=(4, 4)),
], ids=["uniform", "global"])
def test_dask_equals_serial(client, kw):
    serial, y_serial = _compress(None, **kw)
    with distributed.get_task_stream(client=client) as stream:
        on_dask, y_dask = _compress(client, **kw)
    keys = [str(t["key"]) for t in stream.data]
    assert sum("gblr-compress" in k for k in keys) >= 3  # one task per layer (and phase)
    import pandas as pd

    pd.testing.assert_frame_equal(on_dask, serial)  # same seeds, one thread per fit
    assert torch.equal(y_dask, y_serial)
    assert serial["flops"].sum() <= serial.attrs["budget"]


def test_global_with_calibration_on_dask(client):
    model = _model()

    def run():
        model(torch.randn(128, 40, generator=torch.Generator().manual_seed(2)))

    kw = dict(formats=["lowrank", "blocklowrank"], budget=0.5, allocation="global",
              fractions=(0.3, 0.6))
    on_dask = ga.nn.compress_model(model, **kw, calibration=run, scheduler=client,
                                   progress=False)
    ref_model = _model()

    def run_ref():
        ref_model(torch.randn(128, 40, generator=torch.Generator().manual_seed(2)))

    serial = ga.nn.compress_model(ref_model, **kw, calibration=run_ref, progress=False)
    assert on_dask["output_error"].tolist() == serial["output_error"].tolist()
    assert on_dask["format"].tolist() == serial["format"].tolist()


def _square_or_die(layer, k):
    """A job that kills any Dask worker running it, and works in the calling process."""
    try:
        distributed.get_worker()
    except ValueError:  # not on a worker
        return layer.value ** k
    os._exit(1)


class _Job:
    def __init__(self, name, value):
        self.name, self.value = name, value


def test_layer_whose_workers_die_is_fitted_here():
    import dask

    with dask.config.set({"distributed.scheduler.allowed-failures": 0}), \
            distributed.LocalCluster(n_workers=1, processes=True, threads_per_worker=1,
                                     dashboard_address=":0", silence_logs=logging.CRITICAL
                                     ) as cluster, distributed.Client(cluster) as c:
        jobs = [(_square_or_die, _Job("a", 3), 2), (_square_or_die, _Job("b", 4), 3)]
        with pytest.warns(RuntimeWarning, match="died"):
            assert run_layer_jobs(jobs, c) == [9, 64]


def test_bad_scheduler_is_refused_before_any_work():
    model = _model()
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="not an address"):
        ga.nn.compress_model(model, "lowrank", 0.5, scheduler="nowhere")
    with pytest.raises(TypeError, match="scheduler"):
        ga.nn.compress_model(model, "lowrank", 0.5, scheduler=3)
    with pytest.raises(ValueError, match="workers"):
        ga.nn.compress_model(model, "lowrank", 0.5, scheduler="local", workers=0)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert all(isinstance(m, nn.Linear) for m in model if not isinstance(m, nn.ReLU))
