"""Gaudi masks: exact boxcars at whole-number parameters, mass, gradients."""

from __future__ import annotations

import math

import pytest
import torch

import gblr_approx as ga
from gblr_approx.gaudi import boxcar, gaudi_mask, round_ste


@pytest.mark.parametrize("n", [7, 8, 64, 65])
def test_boxcar_exact_all_widths_and_starts(n):
    # every (W, L), including wrap-around (L + W > n), empty and full intervals
    Ws = torch.arange(n + 1, dtype=torch.long)
    for L in range(n):
        Ls = torch.full_like(Ws, L)
        g = gaudi_mask(Ws.double() / n, Ls.double() / n, n, sigma=None)
        b = boxcar(Ws, Ls, n, dtype=torch.float64)
        assert g.shape == (n + 1, n)
        assert float((g - b).abs().max()) < 1e-10


def test_boxcar_wraps_and_definition():
    b = boxcar(4, 6, 8, dtype=torch.float64)
    assert b.tolist() == [1, 1, 0, 0, 0, 0, 1, 1]
    assert boxcar(0, 3, 5).sum() == 0
    assert boxcar(5, 3, 5).sum() == 5


def test_sigma_inf_equals_none_and_scalar_shape():
    g1 = gaudi_mask(torch.tensor(0.25, dtype=torch.float64), 0.5, 16, sigma=None)
    g2 = gaudi_mask(torch.tensor(0.25, dtype=torch.float64), 0.5, 16, sigma=math.inf)
    assert g1.shape == (16,)
    assert torch.equal(g1, g2)
    assert float((g1 - boxcar(4, 8, 16, dtype=torch.float64)).abs().max()) < 1e-12


@pytest.mark.parametrize("sigma", [0.5, 1.0, 10.0, 100.0, None])
def test_mass_is_n_times_width(sigma):
    gen = torch.Generator().manual_seed(0)
    n = 37
    w = torch.rand(6, generator=gen, dtype=torch.float64)
    loc = torch.rand(6, generator=gen, dtype=torch.float64) * 3 - 1
    g = gaudi_mask(w, loc, n, sigma=sigma)
    assert torch.allclose(g.sum(-1), n * w, atol=1e-10)


def test_gaussian_is_circular_convolution():
    # finite sigma == boxcar circularly convolved with a unit-mass periodic Gaussian of
    # standard deviation n / (2 pi sigma) samples (math.md 2.3)
    n, W, L, sigma = 64, 10, 60, 10.0
    g = gaudi_mask(torch.tensor(W / n, dtype=torch.float64), L / n, n, sigma=sigma)
    b = boxcar(W, L, n, dtype=torch.float64)
    k = torch.arange(n // 2 + 1, dtype=torch.float64)
    kern = torch.fft.irfft(torch.exp(-(k**2) / (2 * sigma**2)).to(torch.complex128), n=n)
    assert abs(float(kern.sum()) - 1.0) < 1e-12
    ref = torch.fft.irfft(torch.fft.rfft(b) * torch.fft.rfft(kern), n=n)
    assert float((g - ref).abs().max()) < 1e-12
    j = torch.arange(n, dtype=torch.float64)
    d = torch.minimum(j, n - j)  # circular distance to 0
    std = float((kern * d**2).sum().sqrt())
    assert abs(std - n / (2 * math.pi * sigma)) < 1e-3


def test_gradients_match_finite_differences():
    n = 29
    gen = torch.Generator().manual_seed(1)
    w = torch.rand(4, generator=gen, dtype=torch.float64) * 0.8 + 0.1
    loc = torch.rand(4, generator=gen, dtype=torch.float64)
    weights = torch.randn(4, n, generator=gen, dtype=torch.float64)
    for sigma in (None, 5.0):

        def f(w_, l_, sigma=sigma):
            return (gaudi_mask(w_, l_, n, sigma=sigma) * weights).sum()

        wv = w.clone().requires_grad_(True)
        lv = loc.clone().requires_grad_(True)
        f(wv, lv).backward()
        eps = 1e-6
        for k in range(4):
            e = torch.zeros(4, dtype=torch.float64)
            e[k] = eps
            fd_w = (f(w + e, loc) - f(w - e, loc)) / (2 * eps)
            fd_l = (f(w, loc + e) - f(w, loc - e)) / (2 * eps)
            assert abs(float(wv.grad[k]) - float(fd_w)) <= 1e-4 * max(1.0, abs(float(fd_w)))
            assert abs(float(lv.grad[k]) - float(fd_l)) <= 1e-4 * max(1.0, abs(float(fd_l)))
        assert abs(float(wv.grad[0])) > 1e-3  # gradients are not trivially zero


def test_zero_width_still_has_width_gradient():
    w = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    g = gaudi_mask(w, torch.zeros(1, dtype=torch.float64), 16)
    assert float(g.detach().abs().max()) < 1e-12
    g.sum().backward()
    assert abs(float(w.grad[0]) - 16.0) < 1e-9  # d(sum g)/dw = n


def test_round_ste_forward_and_backward():
    x = torch.tensor([0.26, 0.74], dtype=torch.float64, requires_grad=True)
    y = round_ste(x, 8)
    assert y.tolist() == [0.25, 0.75]
    y.sum().backward()
    assert x.grad.tolist() == [1.0, 1.0]


def test_public_name_and_errors():
    assert ga.gaudi_mask is gaudi_mask
    with pytest.raises(ValueError, match="n must be"):
        gaudi_mask(0.5, 0.0, 0)
    with pytest.raises(ValueError, match="width"):
        gaudi_mask(torch.tensor([float("nan")]), torch.tensor([0.0]), 8)
    with pytest.raises(ValueError, match="sigma"):
        gaudi_mask(0.5, 0.0, 8, sigma=-1.0)
    with pytest.raises(ValueError, match="width_entries"):
        boxcar(9, 0, 8)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_masks_are_computed_in_float32(dtype):
    # torch.complex / the CPU FFT refuse float16 and bfloat16: computed in float32, cast back
    w = torch.tensor([0.25, 0.5], dtype=dtype, requires_grad=True)
    loc = torch.tensor([0.5, 0.125], dtype=dtype)
    g = gaudi_mask(w, loc, 16)
    assert g.dtype == dtype
    want = gaudi_mask(w.detach().float(), loc.float(), 16).to(dtype)
    assert torch.equal(g.detach(), want)
    torch.testing.assert_close(g.float(), boxcar(torch.tensor([4, 8]), torch.tensor([8, 2]), 16),
                               atol=1e-2, rtol=0)
    g.sum().backward()
    assert w.grad is not None and w.grad.dtype == dtype and torch.isfinite(w.grad).all()
