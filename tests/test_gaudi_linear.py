"""ga.nn.GaudiGBLRLinear: exact start, proximal step, budget, hardening, model helper."""

from __future__ import annotations

import pytest
import torch

import gblr_approx as ga


def small_linear(m=24, n=32, seed=0):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(n, m).double()
    return lin


def test_from_linear_reproduces_fit_and_hardens_exactly():
    lin = small_linear()
    layer = ga.nn.GaudiGBLRLinear.from_linear(lin, 0.3)
    assert layer.flops <= layer.budget == ga.resolve_budget(0.3, 24, 32)
    x = torch.randn(7, 32, dtype=torch.float64)
    H = layer.harden()
    assert isinstance(H, ga.nn.StructuredLinear) and H.format_name == "gblr"
    assert H.flops <= layer.budget
    # sigma=None: the smooth forward is the hard matrix
    assert torch.allclose(layer(x), H(x), atol=1e-10)
    W = lin.weight.detach()
    err = float((H.matrix.to_dense().detach() - W).norm() / W.norm())
    assert abs(err - layer.fit_info["rel_error"]) < 1e-9


def test_gradients_reach_widths_and_locations():
    layer = ga.nn.GaudiGBLRLinear.from_linear(small_linear(), 0.3, sigma=20.0)
    x = torch.randn(5, 32, dtype=torch.float64)
    layer(x).pow(2).sum().backward()
    for p in (layer.U, layer.V, layer.widths, layer.locations, layer.bias):
        assert p.grad is not None and torch.isfinite(p.grad).all()
    assert float(layer.widths.grad.abs().sum()) > 0


def test_prox_step_soft_thresholds_and_projects_budget():
    layer = ga.nn.GaudiGBLRLinear.from_linear(small_linear(), 0.5, penalty=0.0)
    with torch.no_grad():
        layer.widths.add_(0.3)  # grow everything: far over the budget
        layer.locations.add_(1.25)
    w_before = layer.widths.detach().clone()
    layer.prox_step()
    assert layer.flops <= layer.budget
    assert float(layer.widths.detach().min()) >= 0 and float(layer.widths.detach().max()) <= 1
    assert float(layer.locations.detach().min()) >= 0 and float(layer.locations.detach().max()) < 1
    # the projection is a common shift (in entries) of all widths, clamped at 0
    m, n = 24, 32
    shift = ((w_before.clamp(0, 1) - layer.widths) * torch.tensor([[m], [n]])).detach()
    live = (layer.widths > 0) & (w_before < 1)
    assert torch.allclose(shift[live], shift[live][0].expand_as(shift[live]), atol=1e-9)
    # the penalty shrinks every width by penalty * lr before projection
    layer2 = ga.nn.GaudiGBLRLinear.from_linear(small_linear(), 0.5, penalty=0.01)
    w0 = layer2.widths.detach().clone()
    layer2.prox_step(lr=2.0)
    assert torch.allclose(layer2.widths, (w0 - 0.02).clamp(0, 1), atol=1e-12)


def test_budget_can_be_lowered_and_cost_falls():
    layer = ga.nn.GaudiGBLRLinear.from_linear(small_linear(), 0.5)
    c0 = layer.flops
    layer.budget = ga.resolve_budget(0.2, 24, 32)
    layer.prox_step()
    assert layer.flops <= layer.budget < c0
    assert layer.harden().flops <= layer.budget


def test_sigma_schedule_steps():
    layer = ga.nn.GaudiGBLRLinear.from_linear(small_linear(), 0.3, sigma=(1.0, 100.0, 4))
    seen = [layer.sigma] + [layer.step_sigma() for _ in range(5)]
    assert seen[0] == 1.0 and abs(seen[4] - 100.0) < 1e-9 and seen[5] == seen[4]
    assert all(a < b for a, b in zip(seen[:4], seen[1:5], strict=True))
    layer.set_sigma((2.0, float("inf"), 2))
    layer.step_sigma()
    assert layer.step_sigma() is None


def test_bad_arguments():
    with pytest.raises(TypeError, match="linear"):
        ga.nn.GaudiGBLRLinear.from_linear(torch.nn.Conv1d(2, 2, 1), 0.3)
    with pytest.raises(ValueError, match="sigma"):
        ga.nn.GaudiGBLRLinear.from_linear(small_linear(), 0.3, sigma=-1.0)
    with pytest.raises(ValueError, match="penalty"):
        ga.nn.GaudiGBLRLinear.from_linear(small_linear(), 0.3, penalty=-1.0)
    layer = ga.nn.GaudiGBLRLinear.from_linear(small_linear(), 0.3)
    with pytest.raises(ValueError, match="features"):
        layer(torch.randn(3, 5, dtype=torch.float64))


def test_gaudi_model_replaces_matching_linears():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)
    ).double()
    x = torch.randn(4, 16, dtype=torch.float64)
    layers = ga.nn.gaudi_model(model, 0.5, include="0")
    assert list(layers) == ["0"] and isinstance(model[0], ga.nn.GaudiGBLRLinear)
    assert isinstance(model[2], torch.nn.Linear)
    assert model(x).shape == (4, 8)
    with pytest.raises(ValueError, match="no nn.Linear"):
        ga.nn.gaudi_model(model, 0.5, include="nothing*")


def test_distilled_minilm_layer_beats_svd_after_hardening():
    """Issue 11: ~150 Adam steps of distillation on Gaussian inputs, hardened within 25 %."""
    W = ga.datasets.minilm_sample()["encoder.layer.0.attention.self.query.weight"]
    m, n = W.shape
    lin = torch.nn.Linear(n, m)
    with torch.no_grad():
        lin.weight.copy_(W)
        lin.bias.zero_()
    layer = ga.nn.GaudiGBLRLinear.from_linear(lin, 0.25, steps=10)
    slr = 0.2 / n  # widths/locations: a fifth of an entry per step
    opt = torch.optim.Adam(
        [
            {"params": layer.factor_parameters(), "lr": 3e-6},
            {"params": layer.structure_parameters(), "lr": slr, "betas": (0.0, 0.999)},
        ]
    )
    gen = torch.Generator().manual_seed(0)
    for _ in range(150):
        x = torch.randn(128, n, generator=gen)
        loss = (layer(x) - lin(x).detach()).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        layer.prox_step(lr=slr)
        assert layer.flops <= layer.budget
    H = layer.harden()
    assert H.flops <= ga.resolve_budget(0.25, m, n)
    svd = ga.nn.compress_linear(lin, "lowrank", H.flops)
    x = torch.randn(1024, n, generator=gen)
    with torch.no_grad():
        y = lin(x)
        e_h = float((H(x) - y).norm() / y.norm())
        e_s = float((svd(x) - y).norm() / y.norm())
    assert e_h < e_s


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_layer_runs_and_trains_on_the_cpu(dtype):
    import copy

    torch.manual_seed(0)
    L = ga.nn.GaudiGBLRLinear.from_linear(torch.nn.Linear(64, 48), 0.25, steps=3)
    x = torch.randn(4, 64)
    ref = L(x).detach()
    H = copy.deepcopy(L).to(dtype)
    y = H(x.to(dtype))
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), ref, rtol=0.05, atol=0.05 * float(ref.abs().max()))
    y.float().pow(2).sum().backward()
    assert H.widths.grad is not None and torch.isfinite(H.widths.grad).all()
    assert H.harden()(x.to(dtype)).dtype == dtype


def test_gaudi_model_keeps_a_shared_linear_shared():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 12), torch.nn.ReLU())
    model.tied = model[0]  # the same module under a second name
    layers = ga.nn.gaudi_model(model, 0.5, steps=5)
    assert list(layers) == ["0"]
    assert isinstance(model[0], ga.nn.GaudiGBLRLinear)
    assert model.tied is model[0]
