"""Structured drop-ins for nn.Linear."""

from __future__ import annotations

import pytest
import torch
from catalogue import CATALOGUE
from torch import nn

import gblr_approx as ga
from gblr_approx.nn import StructuredLinear, compress_linear, compress_model


@pytest.mark.parametrize("fmt", sorted(CATALOGUE))
def test_forward_matches_dense_and_trains(fmt):
    g = torch.Generator().manual_seed(0)
    A = CATALOGUE[fmt]((24, 40), torch.float64, g)
    bias = torch.randn(24, dtype=torch.float64, generator=g)
    layer = StructuredLinear(A, bias)
    x = torch.randn(2, 5, 40, dtype=torch.float64, generator=g)
    y = layer(x)
    torch.testing.assert_close(y, x @ A.to_dense().T + bias, rtol=1e-12, atol=1e-12)
    assert layer.flops == A.flops
    # gradients reach every stored factor that influences the output
    y.pow(2).sum().backward()
    grads = [p.grad for n, p in layer.named_parameters() if n.startswith("factor_")]
    assert grads and all(gr is not None and torch.isfinite(gr).all() for gr in grads)


@pytest.mark.parametrize("fmt", sorted(CATALOGUE))
@pytest.mark.parametrize("with_bias", [True, False])
def test_output_is_row_major_like_nn_linear(fmt, with_bias):
    # downstream kernels expect nn.Linear's row-major output (CPU flash attention needs a
    # unit last-dimension stride); formats that write (features, batch) are made row-major
    g = torch.Generator().manual_seed(1)
    A = CATALOGUE[fmt]((24, 40), torch.float64, g)
    bias = torch.randn(24, dtype=torch.float64, generator=g) if with_bias else None
    layer = StructuredLinear(A, bias)
    x = torch.randn(3, 50, 40, dtype=torch.float64, generator=g)
    ref = x @ A.to_dense().T + (0 if bias is None else bias)
    with torch.inference_mode():
        y = layer(x)
    assert y.is_contiguous()
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    xg = x.clone().requires_grad_(True)
    y = layer(xg)
    assert y.is_contiguous()
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    y.pow(2).sum().backward()
    ref_grad = 2 * (ref @ A.to_dense())
    torch.testing.assert_close(xg.grad, ref_grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("rows", [0, 1, 7])
@pytest.mark.parametrize("with_bias", [True, False])
def test_fused_lowrank_layer_matches_nn_linear(rows, with_bias):
    """Low-rank layers take the fused ``x V U^T + bias`` path (``LowRank._linear``; one row as
    mat-vecs): outputs, input and parameter gradients equal ``nn.Linear``'s with the dense
    weight, also for an empty batch; a bias of another dtype takes the general path."""
    g = torch.Generator().manual_seed(3)
    A = ga.LowRank(torch.randn(24, 4, dtype=torch.float64, generator=g),
                   torch.randn(40, 4, dtype=torch.float64, generator=g))
    bias = torch.randn(24, dtype=torch.float64, generator=g) if with_bias else None
    layer = StructuredLinear(A, bias)
    calls = []
    real = ga.LowRank._linear
    ga.LowRank._linear = lambda self, *a: calls.append(1) or real(self, *a)
    try:
        x = torch.randn(1, rows, 40, dtype=torch.float64, generator=g, requires_grad=True)
        y = layer(x)  # (rows = 1: the mat-vec form)
    finally:
        ga.LowRank._linear = real
    assert calls and y.shape == (1, rows, 24) and y.is_contiguous()
    W = A.to_dense().requires_grad_(True)
    b = None if bias is None else bias.clone().requires_grad_(True)
    ref = nn.functional.linear(x, W, b)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    G = torch.randn(ref.shape, dtype=torch.float64, generator=g)
    gx, = torch.autograd.grad((G * y).sum(), x, retain_graph=True)
    torch.testing.assert_close(gx, torch.autograd.grad((G * ref).sum(), x)[0],
                               rtol=1e-12, atol=1e-12)
    (G * y).sum().backward()
    gU = G.reshape(-1, 24).T @ (x.detach().reshape(-1, 40) @ A.V)  # dL/dU = G^T x V
    torch.testing.assert_close(layer.factor_U.grad, gU, rtol=1e-12, atol=1e-12)
    if with_bias:
        torch.testing.assert_close(layer.bias.grad, G.reshape(-1, 24).sum(0))
        half = StructuredLinear(A, bias.float())  # bias dtype differs: Y + bias, promoted
        torch.testing.assert_close(half(x.detach()), x.detach() @ A.to_dense().T + bias.float())


def test_blocklowrank_layer_adds_the_bias_in_its_block_row_gemms():
    """Without autograd and from 32 rows, a block-low-rank layer's fused product (bias in the
    block-row GEMMs: fresh outputs up to 128 rows, in place beyond) runs and equals
    ``nn.Linear`` with the dense weight; otherwise (fewer rows, no bias, autograd) the hook
    declines and the general path gives the same numbers."""
    g = torch.Generator().manual_seed(4)
    A = CATALOGUE["blocklowrank"]((24, 40), torch.float64, g)
    bias = torch.randn(24, dtype=torch.float64, generator=g)
    seen = []
    real = ga.BlockLowRank._linear
    ga.BlockLowRank._linear = lambda self, *a: seen.append(real(self, *a)) or seen[-1]
    try:
        for rows, b, grad in [(40, bias, False), (5, bias, False), (200, bias, False),
                              (40, None, False), (40, bias, True)]:
            layer = StructuredLinear(A, b)
            x = torch.randn(rows, 40, dtype=torch.float64, generator=g)
            with torch.set_grad_enabled(grad):
                y = layer(x)
            ref = nn.functional.linear(x, A.to_dense(), b)
            torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
            assert y.is_contiguous()
            assert (seen[-1] is not None) == (rows >= 32 and b is not None and not grad)
    finally:
        ga.BlockLowRank._linear = real


@pytest.mark.parametrize("shape", [(23, 17), (24, 40)])
def test_blocksparse_layer_takes_its_fused_product_from_32_rows(shape):
    """Row-major batches of 32 rows or more without autograd run block-sparse's fused product
    (fresh outputs, bias added to them; padded edge blocks on 23 x 17); fewer rows and
    autograd decline. Every case equals ``nn.Linear`` with the dense weight."""
    g = torch.Generator().manual_seed(5)
    W = torch.randn(*shape, dtype=torch.float64, generator=g)
    A = ga.project(W, "blocksparse", 0.5, block_shape=(5, 4))
    bias = torch.randn(shape[0], dtype=torch.float64, generator=g)
    seen = []
    real = ga.BlockSparse._linear
    ga.BlockSparse._linear = lambda self, *a: seen.append(real(self, *a)) or seen[-1]
    try:
        for rows, b, grad in [(32, bias, False), (127, None, False), (51, bias, False),
                              (31, bias, False), (128, bias, False), (300, None, False),
                              (51, bias, True)]:
            layer = StructuredLinear(A, b)
            x = torch.randn(1, rows, shape[1], dtype=torch.float64, generator=g)
            with torch.set_grad_enabled(grad):
                y = layer(x)
            torch.testing.assert_close(y, nn.functional.linear(x, A.to_dense(), b),
                                       rtol=1e-12, atol=1e-12)
            assert y.is_contiguous()
            assert (seen[-1] is not None) == (32 <= rows and not grad)
    finally:
        ga.BlockSparse._linear = real


@pytest.mark.parametrize("transposed", [False, True])
def test_monarch_layer_adds_the_bias_in_its_last_copy(transposed):
    """Without autograd and from 2 rows a Monarch layer adds the bias while copying its
    regrouped output (``Monarch._linear``): the same numbers as ``nn.Linear``, for a Monarch
    matrix and for a transposed one; one row, autograd and no bias take the general path."""
    g = torch.Generator().manual_seed(5)
    A = CATALOGUE["monarch"]((24, 40), torch.float64, g)
    A = A.T if transposed else A
    m, n = A.shape
    bias = torch.randn(m, dtype=torch.float64, generator=g)
    for rows, b, grad in [(2, bias, False), (37, bias, False), (1, bias, False),
                          (37, None, False), (37, bias, True)]:
        layer = StructuredLinear(A, b)
        x = torch.randn(rows, n, dtype=torch.float64, generator=g)
        with torch.set_grad_enabled(grad):
            fused = layer._forward_matrix()._linear(x, layer.bias)
            y = layer(x)
        assert (fused is not None) == (rows > 1 and b is not None and not grad)
        ref = nn.functional.linear(x, A.to_dense(), b)
        torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
        assert y.is_contiguous()
        xt = x.T.contiguous().T  # column-major rows: not the fused form's layout
        with torch.set_grad_enabled(grad):
            assert layer._forward_matrix()._linear(xt, layer.bias) is None
            torch.testing.assert_close(layer(xt), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fmt", sorted(CATALOGUE))
def test_layer_trains_after_an_inference_mode_pass(fmt):
    g = torch.Generator().manual_seed(2)
    layer = StructuredLinear(CATALOGUE[fmt]((24, 40), torch.float64, g),
                             torch.randn(24, dtype=torch.float64, generator=g))
    for rows in (1, 5, 150):
        x = torch.randn(rows, 40, dtype=torch.float64, generator=g)
        with torch.inference_mode():
            want = layer(x)
        y = layer(x.requires_grad_(True))
        torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
        y.sum().backward()
        grads = [p.grad for n, p in layer.named_parameters() if n.startswith("factor_")]
        assert grads and all(gr is not None and torch.isfinite(gr).all() for gr in grads)


@pytest.mark.parametrize("fmt", sorted(CATALOGUE))
def test_layer_built_in_inference_mode_caches_sees_edits_and_trains(fmt):
    # built inside inference_mode, the layer keeps normal tensors: its forward used to crash
    # on inference tensors (no version counter); it must cache its matrix, see in-place
    # edits, and train afterwards
    g = torch.Generator().manual_seed(3)
    A = CATALOGUE[fmt]((24, 40), torch.float64, g)
    x = torch.randn(2, 7, 40, dtype=torch.float64, generator=g)
    with torch.inference_mode():
        layer = StructuredLinear(A, torch.zeros(24, dtype=torch.float64))
        assert not any(p.is_inference() for p in layer.parameters())
        torch.testing.assert_close(layer(x), x @ A.to_dense().T, rtol=1e-12, atol=1e-12)
        assert layer._forward_matrix() is layer._forward_matrix()  # cached
        for p in layer.parameters():
            p.mul_(2.0)  # in place, inside inference mode
        want = layer.matrix.to_dense()
        torch.testing.assert_close(layer(x), x @ want.T, rtol=1e-12, atol=1e-12)
    assert not torch.equal(want, A.to_dense())
    layer(x).sum().backward()
    assert all(p.grad is not None for p in layer.parameters())


def test_load_in_inference_mode_gives_normal_tensors(tmp_path):
    # products of a matrix loaded under inference_mode keep their cached layouts
    g = torch.Generator().manual_seed(5)
    A = CATALOGUE["gblr"]((24, 40), torch.float64, g)
    A.save(tmp_path / "a.safetensors")
    X = torch.randn(40, 64, dtype=torch.float64, generator=g)
    with torch.inference_mode():
        B = ga.load(tmp_path / "a.safetensors")
        assert not any(t.is_inference() for t in vars(B).values() if isinstance(t, torch.Tensor))
        torch.testing.assert_close(B @ X, A.to_dense() @ X, rtol=1e-12, atol=1e-12)
        assert B.__dict__.get("_layouts")  # the packed panels were kept


@pytest.mark.parametrize("fmt", ["lowrank", "gblr"])
def test_layer_with_inference_tensor_parameters_runs(fmt):
    # parameters replaced by inference tensors (e.g. .to() inside inference mode) are not
    # cached (no version counter) but still give the right result
    g = torch.Generator().manual_seed(4)
    A = CATALOGUE[fmt]((24, 40), torch.float64, g)
    x = torch.randn(5, 40, dtype=torch.float64, generator=g)
    layer = StructuredLinear(A)
    with torch.inference_mode():
        layer = layer.to(torch.float32)
        assert any(p.is_inference() for p in layer.parameters())
        torch.testing.assert_close(layer(x.float()), (x @ A.to_dense().T).float())


def test_compress_model_replaces_linears():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 64), nn.Linear(64, 10))
    x = torch.randn(8, 64)
    before = model(x)
    report = compress_model(model, "lowrank", 0.5, exclude="2")
    assert set(report.index) == {"0", "3"}  # a DataFrame indexed by module name
    assert isinstance(model[0], StructuredLinear) and isinstance(model[2], nn.Linear)
    assert (report["flops"] <= 0.5 * report["dense_flops"]).all()
    assert ((report["rel_error"] > 0) & (report["rel_error"] < 1)).all()
    after = model(x)
    assert after.shape == before.shape and torch.isfinite(after).all()


def test_compress_linear_exact_when_budget_allows():
    lin = nn.Linear(30, 20).double()
    new = compress_linear(lin, "lowrank", 1.0)  # rank 12 = floor(600/50) < 20: not exact
    assert new.info["rel_error"] > 0
    W = torch.randn(20, 3, dtype=torch.float64) @ torch.randn(3, 30, dtype=torch.float64)
    lin.weight.data = W
    new = compress_linear(lin, "lowrank", 150)
    x = torch.randn(4, 30, dtype=torch.float64)
    torch.testing.assert_close(new(x), lin(x), rtol=1e-9, atol=1e-9)


def test_errors():
    with pytest.raises(TypeError, match="layer must be a torch.nn.Linear"):
        compress_linear(nn.ReLU(), "lowrank", 0.5)
    with pytest.raises(ValueError, match="no nn.Linear module matches"):
        compress_model(nn.Sequential(nn.ReLU()), "lowrank", 0.5)
    layer = StructuredLinear(ga.project(torch.randn(6, 8), "lowrank", 0.9))
    with pytest.raises(ValueError, match="input has 7 features but the layer expects 8"):
        layer(torch.randn(2, 7))
    # integer inputs were cast to the layer's dtype in silence (nn.Linear refuses them)
    for x in (torch.ones(2, 8, dtype=torch.long), torch.ones(2, 8, dtype=torch.bool),
              torch.ones(2, 8, dtype=torch.complex64)):
        with pytest.raises(TypeError, match=f"real floating-point tensor; got {x.dtype}"):
            layer(x)
    assert layer(torch.ones(2, 8, dtype=torch.float64)).dtype == torch.float32  # (cast)


def _edit(layer: StructuredLinear, how: str) -> None:
    """Change every factor of ``layer`` in one of the ways a user or a trainer does."""
    ps = [p for n, p in layer.named_parameters() if n.startswith("factor_")]
    if how == "no_grad":
        with torch.no_grad():
            for p in ps:
                p.mul_(1.5)
    elif how == "detach":
        for p in ps:
            p.detach().mul_(0.7)
    elif how == "copy_":
        with torch.no_grad():
            for p in ps:
                p.copy_(p * 1.25)
    elif how == "foreach":  # (what EMA helpers such as torch.optim.swa_utils run)
        with torch.no_grad():
            torch._foreach_mul_(ps, 0.9)
    elif how in ("sgd", "adam"):
        cls = torch.optim.SGD if how == "sgd" else torch.optim.Adam
        opt = cls(layer.parameters(), lr=0.1)
        x = torch.randn(3, layer.in_features, dtype=ps[0].dtype)
        layer(x).pow(2).mean().backward()
        opt.step()
    elif how in ("load_state_dict", "load_state_dict_assign"):
        sd = {k: v * 1.3 if v.is_floating_point() else v for k, v in layer.state_dict().items()}
        layer.load_state_dict(sd, assign=how.endswith("assign"))
    else:  # pragma: no cover
        raise AssertionError(how)


def _assert_follows_parameters(layer: StructuredLinear, x: torch.Tensor) -> None:
    with torch.no_grad():
        want = x @ layer.matrix.to_dense().T + layer.bias
        for rows in (x, x[:1]):  # batch and mat-vec paths (their own plans / layouts)
            torch.testing.assert_close(layer(rows), want[: rows.shape[0]],
                                       rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("fmt", sorted(CATALOGUE))
@pytest.mark.parametrize("how", ["no_grad", "detach", "copy_", "foreach", "sgd", "adam",
                                 "load_state_dict", "load_state_dict_assign"])
def test_cached_forward_follows_tracked_parameter_edits(fmt, how):
    # the inference caches (layer matrix, format layouts and plans) key on the version
    # counters: every edit that bumps them gives fresh no-grad results (docs/nn.md)
    g = torch.Generator().manual_seed(6)
    layer = StructuredLinear(CATALOGUE[fmt]((24, 40), torch.float64, g),
                             torch.randn(24, dtype=torch.float64, generator=g))
    x = torch.randn(150, 40, dtype=torch.float64, generator=g)
    _assert_follows_parameters(layer, x)  # warms every cache
    before = layer.matrix.to_dense().clone()
    _edit(layer, how)
    assert not torch.equal(layer.matrix.to_dense(), before)
    _assert_follows_parameters(layer, x)


@pytest.mark.parametrize("fmt", sorted(CATALOGUE))
def test_clear_cache_after_edits_through_data(fmt):
    # p.data.mul_() bypasses the version counter (blocklowrank, gblr and blast kept the old
    # numbers in their packed panels); clear_cache() drops the layer's and the formats' caches
    g = torch.Generator().manual_seed(7)
    layer = StructuredLinear(CATALOGUE[fmt]((24, 40), torch.float64, g),
                             torch.randn(24, dtype=torch.float64, generator=g))
    x = torch.randn(150, 40, dtype=torch.float64, generator=g)
    _assert_follows_parameters(layer, x)
    cached = layer._forward_matrix()
    for n, p in layer.named_parameters():
        if n.startswith("factor_"):
            p.data.mul_(2.0)
    layer.clear_cache()
    assert "_matrix_cache" not in layer.__dict__
    assert not any(a in cached.__dict__ for a in cached._CACHE_ATTRS)
    _assert_follows_parameters(layer, x)
    layer.clear_cache()  # nothing cached: a no-op
    layer.clear_cache()


@pytest.mark.parametrize("fmt", sorted(CATALOGUE))
def test_cached_forward_follows_module_conversions(fmt):
    # .to(dtype) and .to(device) set p.data (version counter unchanged): the cache key's
    # pointers must see the new storage, also when the conversion goes back and forth
    g = torch.Generator().manual_seed(8)
    layer = StructuredLinear(CATALOGUE[fmt]((24, 40), torch.float64, g),
                             torch.randn(24, dtype=torch.float64, generator=g))
    x = torch.randn(150, 40, dtype=torch.float64, generator=g)
    _assert_follows_parameters(layer, x)
    layer.float()
    with torch.no_grad():
        y = layer(x.float())
    assert y.dtype == torch.float32
    want = x.float() @ layer.matrix.to_dense().T + layer.bias
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4)
    layer.double()
    with torch.no_grad():
        next(p for n, p in layer.named_parameters() if n.startswith("factor_")).mul_(1.5)
    _assert_follows_parameters(layer, x)
