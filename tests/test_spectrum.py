"""Spectral statistics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import gblr_approx as ga
from gblr_approx.analysis.spectrum import POWERLAW_METHOD, powerlaw_fit

SIGMA = [10.0, 6.0, 3.0, 2.0, 1.0, 0.5]


def _with_singular_values(s, m, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, len(s), generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, len(s), generator=g, dtype=torch.float64))
    return U @ torch.diag(torch.tensor(s, dtype=torch.float64)) @ V.T


def test_known_singular_values():
    W = _with_singular_values(SIGMA, 9, 6)
    rep = ga.spectrum(W, min_tail=3)
    assert isinstance(rep, ga.SpectrumReport)
    assert rep.shape == (9, 6)
    torch.testing.assert_close(rep.singular_values, torch.tensor(SIGMA, dtype=torch.float64))
    # sum sigma^2 = 100 + 36 + 9 + 4 + 1 + 0.25 = 150.25
    assert rep.fro_norm == pytest.approx(math.sqrt(150.25), rel=1e-12)
    assert rep.spectral_norm == pytest.approx(10.0, rel=1e-12)
    assert rep.stable_rank == pytest.approx(1.5025, rel=1e-12)
    # exp(entropy of sigma / 22.5), computed by hand: 4.135673450497493
    assert rep.effective_rank == pytest.approx(4.135673450497493, rel=1e-10)
    # cumulative energy 100, 136, 145, 149, 150, 150.25 over 150.25
    expected = [100 / 150.25, 136 / 150.25, 145 / 150.25, 149 / 150.25, 150 / 150.25, 1.0]
    torch.testing.assert_close(rep.energy, torch.tensor(expected, dtype=torch.float64))
    assert rep.energy_ranks == {0.9: 2, 0.95: 3, 0.99: 4}
    assert rep.numerical_rank == 6
    assert rep.rank_for(0.6655574043261231) == 1  # exactly the rank-1 energy
    assert rep.rank_for(1.0) == 6
    torch.testing.assert_close(rep.eigenvalues[:2], torch.tensor([100.0, 36.0],
                                                                 dtype=torch.float64))


def test_rank_deficient_and_float16():
    W = _with_singular_values([4.0, 2.0], 20, 12).to(torch.float16)
    rep = ga.spectrum(W)
    assert rep.singular_values.shape == (12,)
    assert rep.energy_ranks[0.99] == 2
    assert rep.numerical_rank == 2  # float16 rounding noise is below eps16 * ||W||_F
    assert rep.stable_rank == pytest.approx(1.25, rel=2e-3)  # (16 + 4) / 16, float16 input
    # two non-zero eigenvalues: too few for a tail fit, said so, no NaN
    assert rep.alpha is None
    assert "too few" in rep.powerlaw.status
    s = rep.summary()
    assert s["alpha"] is None and s["rank_90"] == 2 and s["rows"] == 20


def test_numerical_rank_of_bfloat16_checkpoint():
    W = _with_singular_values([4.0, 2.0], 384, 384).to(torch.bfloat16)
    s = torch.linalg.svdvals(W.double())
    assert 1e-4 < float(s[2]) < 1e-2  # rounding to bfloat16 made it full rank
    assert ga.spectrum(W).numerical_rank == 2
    assert ga.spectrum(W.double()).numerical_rank == 384  # as float64 data, it is full rank


def test_powerlaw_mle_formula_and_recovery():
    rng = np.random.default_rng(0)
    alpha, xmin, n = 3.0, 2.0, 3000
    x = xmin * (1 - rng.random(n)) ** (-1.0 / (alpha - 1.0))  # Pareto(alpha) above xmin
    fit = powerlaw_fit(x)
    assert fit.status == "ok" and fit.method == POWERLAW_METHOD
    tail = np.sort(x)[np.sort(x) >= fit.xmin]
    assert fit.n_tail == tail.size
    # the estimate is the continuous MLE at the chosen xmin
    assert fit.alpha == pytest.approx(1 + tail.size / np.log(tail / fit.xmin).sum(), rel=1e-12)
    assert fit.alpha_std == pytest.approx((fit.alpha - 1) / math.sqrt(tail.size), rel=1e-12)
    assert abs(fit.alpha - alpha) < 4 * fit.alpha_std
    assert fit.xmin < 2.5  # the whole sample is a power law: xmin stays near the true one
    assert 0 < fit.ks_distance < 0.05


def test_powerlaw_finds_tail_above_bulk():
    rng = np.random.default_rng(1)
    bulk = rng.uniform(0.1, 1.0, 2000)
    tail = 5.0 * (1 - rng.random(400)) ** (-1.0 / 1.5)  # alpha = 2.5 above 5
    fit = powerlaw_fit(np.concatenate([bulk, tail]))
    assert fit.xmin >= 1.0  # the uniform bulk is excluded
    assert abs(fit.alpha - 2.5) < 4 * fit.alpha_std


def test_spectrum_alpha_is_fit_of_eigenvalues():
    rng = np.random.default_rng(2)
    lam = np.sort(1.0 * (1 - rng.random(120)) ** (-1.0 / 2.0))[::-1]  # alpha = 3
    W = _with_singular_values(list(np.sqrt(lam)), 150, 120, seed=3)
    rep = ga.spectrum(W)
    direct = powerlaw_fit(lam)
    assert rep.alpha == pytest.approx(direct.alpha, rel=1e-8)
    assert rep.powerlaw.n_tail == direct.n_tail
    assert "Clauset" in rep.summary()["powerlaw_method"]


def test_errors():
    with pytest.raises(ValueError, match="zero matrix"):
        ga.spectrum(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="2-D"):
        ga.spectrum(torch.ones(3))
    with pytest.raises(ValueError, match="levels"):
        ga.spectrum(torch.eye(3), levels=(1.5,))
    W = torch.eye(4)
    W[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        ga.spectrum(W)


def test_summary_keys_keep_levels_apart():
    W = torch.randn(60, 80, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    rep = ga.spectrum(W, levels=(0.9, 0.995, 0.999, 0.9995))
    keys = [k for k in rep.summary() if k.startswith("rank_")]
    assert keys == ["rank_90", "rank_99.5", "rank_99.9", "rank_99.95"]  # were rank_100 x3


def test_powerlaw_needs_min_tail_distinct_values():
    fit = powerlaw_fit(np.ones(50), min_tail=10)
    assert fit.alpha is None and "distinct" in fit.status and "1 distinct" in fit.status
    fit = powerlaw_fit(np.r_[np.ones(25), 2 * np.ones(25)], min_tail=10)  # 2 distinct values
    assert fit.alpha is None and fit.status != "ok"


@pytest.mark.parametrize("scale", [1e-200, 1e160])
def test_spectrum_at_extreme_float64_scales(scale):
    W = torch.randn(30, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref, rep = ga.spectrum(W), ga.spectrum(W * scale)
    assert rep.numerical_rank == ref.numerical_rank == 30
    assert rep.stable_rank == pytest.approx(ref.stable_rank, rel=1e-12)
    assert rep.fro_norm == pytest.approx(ref.fro_norm * scale, rel=1e-12)
    assert rep.powerlaw.alpha == pytest.approx(ref.powerlaw.alpha, rel=1e-9)
