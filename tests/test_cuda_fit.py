"""Every projection and fit on a CUDA device equals its CPU result within tolerance.

Skipped without CUDA. Random draws of the randomized SVD come from a generator on the
matrix's device, so CPU and GPU draw different test matrices: the randomized paths are
compared through their errors, the exact ones through the matrices.
"""

from __future__ import annotations

import pytest
import torch

import gblr_approx as ga
import gblr_approx.fit.blast.factors as fit_blast
import gblr_approx.linalg as la

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def powerlaw(m: int, n: int, alpha: float = 0.7, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    return ((U * torch.arange(1, k + 1, dtype=torch.float64).pow(-alpha)) @ V.T).float()


def rel(W: torch.Tensor, A) -> float:
    return float(torch.linalg.norm(W - A.to_dense()) / torch.linalg.norm(W))


PROJECTIONS = [
    ("lowrank", {}),
    ("blocksparse", {"block_shape": (16, 16)}),
    ("blocklowrank", {"grid": (4, 4)}),
    ("monarch", {}),
    ("blast", {"blocks": (4, 4), "steps": 20}),
    ("gblr", {}),
]


@pytest.mark.parametrize("fmt, opts", PROJECTIONS)
def test_projection_on_cuda_matches_cpu(fmt, opts):
    W = powerlaw(128, 192)
    Wg = W.cuda()
    A = ga.project(W, fmt, 0.25, **opts)
    Ag = ga.project(Wg, fmt, 0.25, **opts)
    assert Ag.device.type == "cuda" and Ag.to_dense().is_cuda
    assert Ag.flops <= A.info["budget_macs"]
    assert rel(Wg, Ag) == pytest.approx(rel(W, A), rel=1e-3, abs=1e-4)


@pytest.mark.parametrize("fmt, opts", PROJECTIONS[:4])
def test_randomized_paths_on_cuda(monkeypatch, fmt, opts):
    monkeypatch.setattr(la, "RANDOMIZED_MIN_ENTRIES", 1000)
    W = powerlaw(128, 192)
    A = ga.project(W, fmt, 0.1, **opts)
    Ag = ga.project(W.cuda(), fmt, 0.1, **opts)
    assert Ag.device.type == "cuda"
    assert rel(W.cuda(), Ag) == pytest.approx(rel(W, A), rel=1e-2)


def test_fit_gblr_device_cuda_returns_on_input_device():
    W = powerlaw(96, 128)
    cpu = ga.fit_gblr(W, 0.2, steps=3, progress=False)
    gpu = ga.fit_gblr(W, 0.2, steps=3, device="cuda", progress=False)
    assert gpu.matrix.device.type == "cpu"  # returned on W's device
    assert gpu.rel_error == pytest.approx(cpu.rel_error, rel=1e-2)
    on = ga.fit_gblr(W.cuda(), 0.2, steps=3, progress=False)
    assert on.matrix.device.type == "cuda"
    assert on.rel_error == pytest.approx(cpu.rel_error, rel=1e-2)


def test_blast_frugal_layout_on_cuda(monkeypatch):
    monkeypatch.setattr(fit_blast, "FRUGAL_MIN_ENTRIES", 1000)
    monkeypatch.setattr(la, "RANDOMIZED_MIN_ENTRIES", 1000)
    W = powerlaw(128, 192)
    A = ga.project(W, "blast", 0.25, blocks=(4, 4), steps=15)
    Ag = ga.project(W.cuda(), "blast", 0.25, blocks=(4, 4), steps=15)
    assert Ag.U.is_cuda and A.info["layout"] == Ag.info["layout"] == "frugal"
    assert rel(W.cuda(), Ag) == pytest.approx(rel(W, A), rel=1e-2)
