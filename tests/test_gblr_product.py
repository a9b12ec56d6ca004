"""The packed GBLR product (batched GEMM panels) against the component loop and to_dense."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import gblr_approx as ga
from gblr_approx.formats.gblr import GBLR
from gblr_approx.formats.gblr_plan import build_plan

DATA = Path(__file__).parent / "data"


def mixed_gblr(m, n, K, seed, dtype=torch.float64, device="cpu"):
    """Random components: wrapped, full-width, dense, rank 0..4, zero-width, overlapping."""
    gen = torch.Generator().manual_seed(seed)
    rs, rw, cs, cw, factors = [], [], [], [], []
    for k in range(K):
        kind = k % 6
        h = m if kind == 1 else int(torch.randint(0, m + 1, (1,), generator=gen))
        w = n if kind == 2 else int(torch.randint(0, n + 1, (1,), generator=gen))
        rs.append(int(torch.randint(0, m, (1,), generator=gen)))
        cs.append(int(torch.randint(0, n, (1,), generator=gen)))
        rw.append(h)
        cw.append(w)
        if kind == 3:
            factors.append(torch.randn(h, w, generator=gen, dtype=dtype))
        else:
            r = int(torch.randint(0, 5, (1,), generator=gen))
            factors.append(
                (
                    torch.randn(h, r, generator=gen, dtype=dtype),
                    torch.randn(w, r, generator=gen, dtype=dtype),
                )
            )
    factors = [
        f.to(device) if isinstance(f, torch.Tensor) else tuple(t.to(device) for t in f)
        for f in factors
    ]
    return GBLR((m, n), rs, rw, cs, cw, factors)


@pytest.mark.parametrize(
    "shape,K", [((1, 1), 3), ((7, 3), 9), ((24, 40), 30), ((64, 48), 120), ((97, 131), 200)]
)
@pytest.mark.parametrize("batch", [1, 5])
def test_packed_product_equals_loop_and_dense(shape, K, batch):
    m, n = shape
    G = mixed_gblr(m, n, K, seed=m * 7 + n + K)
    X = torch.randn(n, batch, dtype=torch.float64)
    D = G.to_dense()
    Y = G @ X
    assert torch.allclose(Y, G._matmul_loop(X), atol=1e-10)
    assert torch.allclose(Y, D @ X, atol=1e-10)
    # left product and transpose use the same packed path
    L = torch.randn(batch, m, dtype=torch.float64)
    assert torch.allclose(L @ G, L @ D, atol=1e-10)
    R = torch.randn(m, 2, dtype=torch.float64)
    assert torch.allclose(G.T @ R, D.T @ R, atol=1e-10)
    assert torch.allclose(G.T.to_dense(), D.T, atol=1e-12)


def test_plan_accounts_for_every_mac_and_padding():
    G = mixed_gblr(50, 70, 60, seed=3)
    plan = G.plan
    assert plan.flops == G.flops
    assert plan.padded_macs >= G.flops
    assert 0 < plan.fill <= 1
    # padded panel entries (tiles and the wide slots' dense GEMMs) are the executed MACs
    executed = sum(b.count * b.rows * b.cols for b in plan.stage1 + plan.stage2)
    m, n = G.shape
    assert plan.wide1 > 0 and plan.wide2[1] > 0  # the full-width / full-height components
    executed += plan.wide1 * n + plan.wide2[1] * m
    assert executed == plan.padded_macs


def _structure(G):
    return [G.shape] + [
        t.tolist()
        for t in (G.row_start, G.row_width, G.col_start, G.col_width, G.ranks, G.is_dense)
    ]


def test_wide_slots_leave_the_tiles_of_the_stage_they_span():
    """Slots covering >= WIDE_SHARE of a side run in that stage's dense GEMM: a low-rank
    layout needs no tiles at all; a full-width, one-row-tall slot is wide in stage 1 only."""
    L = ga.LowRank(torch.randn(40, 3, dtype=torch.float64), torch.randn(30, 3, dtype=torch.float64))
    G = GBLR.from_lowrank(L)
    plan = build_plan(*_structure(G))
    assert (plan.wide1, plan.wide2) == (3, (0, 3))
    assert plan.stage1 == [] and plan.stage2 == []
    assert plan.padded_macs == G.flops  # no padding: the intervals are the full sides
    X = torch.randn(30, 6, dtype=torch.float64)
    assert torch.allclose(G @ X, L.to_dense() @ X, atol=1e-12)
    # a wrapped near-full component (wide in both), a full-width thin one (wide in stage 1),
    # a tall narrow one (wide in stage 2) and a small one (tiles in both)
    g = torch.Generator().manual_seed(0)
    f = [(torch.randn(h, 1, generator=g, dtype=torch.float64),
          torch.randn(w, 1, generator=g, dtype=torch.float64))
         for h, w in [(38, 28), (2, 30), (40, 3), (5, 4)]]
    G = GBLR((40, 30), [30, 7, 0, 11], [38, 2, 40, 5], [25, 0, 9, 20], [28, 30, 3, 4], f)
    plan = build_plan(*_structure(G))
    assert (plan.wide1, plan.wide2) == (2, (1, 2))
    D = G.to_dense()
    for cols in (1, 7, 40):
        X = torch.randn(30, cols, dtype=torch.float64)
        assert torch.allclose(G @ X, D @ X, atol=1e-12)
    never = build_plan(*_structure(G), wide_share=2.0)
    assert never.wide1 == 0 and never.wide2 == (0, 0)
    assert torch.allclose(never.matmul(never.pack(G._Uf, G._Vf), X), D @ X, atol=1e-12)


def test_column_block_products_reuse_scratch_without_aliasing_results():
    """Large products take their intermediates from the thread's scratch buffer
    (base.scratch); results are fresh tensors, right in and out of inference mode."""
    from gblr_approx.formats import base

    A = mixed_gblr(97, 131, 200, seed=5)
    B = mixed_gblr(131, 97, 150, seed=6)
    assert A.segments is None and B.segments is None  # the tiled plan runs
    for batch in (40, 3 * A.plan_for(256).chunk_columns + 5):  # one block / column blocks
        X1 = torch.randn(131, batch, dtype=torch.float64)
        X2 = torch.randn(97, batch, dtype=torch.float64)
        with torch.inference_mode():
            Y1 = A @ X1
        with torch.no_grad():
            Y2 = B @ X2
            Y1b = A @ X1
        torch.testing.assert_close(Y1, A.to_dense() @ X1, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(Y2, B.to_dense() @ X2, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(Y1b, Y1, rtol=0, atol=0)
        buf = base._SCRATCH.bufs[torch.float64]
        for Y in (Y1, Y2, Y1b):  # no result is a view of the scratch buffer
            assert Y.untyped_storage().data_ptr() != buf.untyped_storage().data_ptr()
    # a result kept across products is not overwritten by them
    kept = (A @ X1).clone()
    Y = A @ X1
    B @ X2
    torch.testing.assert_close(Y, kept, rtol=0, atol=0)


def test_batch_major_products_write_batch_major_results():
    """A batch-major operand (``X.T`` of a row-major ``(batch, n)`` tensor, what
    StructuredLinear and ``X @ A`` pass) gets its result written batch-major by the
    column-block path: exact, and the ``(batch, m)`` result needs no transposing copy."""
    A = mixed_gblr(97, 131, 200, seed=5)
    assert A.segments is None  # the tiled plan runs
    batch = 3 * A.plan_for(256).chunk_columns + 5  # column blocks
    x = torch.randn(batch, 131, dtype=torch.float64)
    with torch.no_grad():
        Y = A @ x.T
        Yf = A @ x.T.contiguous()  # feature-major operand: feature-major result
    torch.testing.assert_close(Y, A.to_dense() @ x.T, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(Yf, Y, rtol=1e-12, atol=1e-12)  # (other GEMM rounding)
    assert Y.T.is_contiguous() and Yf.is_contiguous()
    torch.testing.assert_close(x @ A.T, Y.T, rtol=1e-10, atol=1e-10)


def test_plan_options_do_not_change_the_result():
    G = mixed_gblr(40, 30, 50, seed=11)
    X = torch.randn(30, 4, dtype=torch.float64)
    ref = G.to_dense() @ X
    args = [G.shape] + [
        t.tolist()
        for t in (G.row_start, G.row_width, G.col_start, G.col_width, G.ranks, G.is_dense)
    ]
    for opts in [
        dict(tiles=(1, 1)),
        dict(tiles=(7, 64)),
        dict(tiles=(64, 5), bucket_cost=0),
        dict(bucket_cost=1e9),
    ]:
        plan = build_plan(*args, **opts)
        assert torch.allclose(plan.matmul(plan.pack(G._Uf, G._Vf), X), ref, atol=1e-10)


def test_gradients_match_autograd_through_dense():
    G = mixed_gblr(30, 20, 25, seed=2)
    U = G._Uf.clone().requires_grad_(True)
    V = G._Vf.clone().requires_grad_(True)
    A = GBLR._from_flat(
        G.shape, G.row_start, G.row_width, G.col_start, G.col_width, G.ranks, G.is_dense, U, V
    )
    X = torch.randn(20, 3, dtype=torch.float64, requires_grad=True)
    C = torch.randn(30, 3, dtype=torch.float64)
    (A @ X * C).sum().backward()
    gU, gV, gX = U.grad.clone(), V.grad.clone(), X.grad.clone()
    U.grad = V.grad = X.grad = None
    (A.to_dense() @ X * C).sum().backward()
    assert torch.allclose(gU, U.grad, atol=1e-10)
    assert torch.allclose(gV, V.grad, atol=1e-10)
    assert torch.allclose(gX, X.grad, atol=1e-10)


def test_cached_panels_follow_in_place_updates():
    G = mixed_gblr(20, 20, 15, seed=4)
    X = torch.randn(20, 2, dtype=torch.float64)
    before = G @ X
    with torch.no_grad():
        G._Uf.mul_(2.0)  # e.g. an optimizer step on a StructuredLinear parameter
    assert torch.allclose(G @ X, 2.0 * before, atol=1e-10)


def test_structured_linear_forward_backward_and_cache():
    G = mixed_gblr(12, 9, 14, seed=8, dtype=torch.float32)
    layer = ga.nn.StructuredLinear(G, bias=torch.zeros(12))
    x = torch.randn(5, 9, generator=torch.Generator().manual_seed(0))
    y = layer(x)
    assert torch.allclose(y, x @ G.to_dense().T, rtol=1e-4, atol=1e-4)
    y.square().sum().backward()
    grads = [p.grad for p in layer.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    opt.step()
    # after the in-place step the layer runs its updated matrix, not a stale cache
    with torch.no_grad():
        expect = x @ layer.matrix.to_dense().T + layer.bias
        assert torch.allclose(layer(x), expect, rtol=1e-4, atol=1e-4)


def test_files_saved_before_packing_still_load():
    G = ga.load(DATA / "gblr_before_packing.safetensors")
    D = load_file(str(DATA / "gblr_before_packing_dense.safetensors"))["dense"]
    assert isinstance(G, GBLR) and G.num_components == 8
    # D was recorded on another CPU: the sum of 8 components may round differently (1 ulp)
    assert torch.allclose(G.to_dense(), D, rtol=0, atol=1e-6 * float(D.abs().max()))
    X = torch.randn(G.shape[1], 3)
    assert torch.allclose(G @ X, D @ X, atol=1e-5)


def test_fitted_layout_product_is_exact():
    W = next(iter(ga.datasets.minilm_sample().values()))[:96, :80]
    G = ga.project(W, "gblr", 0.25, steps=2)
    X = torch.randn(80, 7)
    assert torch.allclose(G @ X, G.to_dense() @ X, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_product_transpose_and_grad():
    G = mixed_gblr(64, 48, 60, seed=1, dtype=torch.float32, device="cuda")
    assert G.device.type == "cuda"
    X = torch.randn(48, 16, device="cuda")
    D = G.to_dense()
    assert torch.allclose(G @ X, D @ X, atol=1e-4)
    R = torch.randn(64, 3, device="cuda")
    assert torch.allclose(G.T @ R, D.T @ R, atol=1e-4)
    layer = ga.nn.StructuredLinear(G).cuda()
    out = layer(torch.randn(8, 48, device="cuda"))
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)


def test_sparse_matvec_plan_is_exact_on_every_kind_of_component():
    """The thin-product plan (wide slots dense, the rest as CSR) equals the dense product, for
    vectors and thin matrices (feature- or batch-major):
    overlapping dense blocks (entries that coincide), wrapped and zero-width components,
    rank 0, a layout of only wide slots, and after an in-place change of the factors."""
    g = torch.Generator().manual_seed(7)
    blocks = [torch.randn(6, 5, generator=g, dtype=torch.float64) for _ in range(2)]
    f = [(torch.randn(h, r, generator=g, dtype=torch.float64),
          torch.randn(w, r, generator=g, dtype=torch.float64))
         for h, w, r in [(40, 30, 2), (9, 30, 1), (5, 4, 3), (0, 7, 1), (8, 6, 0)]]
    G = GBLR((40, 30), [3, 35, 38, 30, 0, 12, 14], [40, 9, 5, 0, 8, 6, 6],
             [27, 0, 28, 1, 5, 20, 21], [30, 30, 4, 7, 6, 5, 5], f + blocks)
    plan = G.sparse_matvec
    assert plan.wide == 2 and plan.reads_x  # the full-size component, rank 2
    assert plan.u_entry.numel() > plan.u_col.numel()  # the dense blocks overlap
    x = torch.randn(30, dtype=torch.float64, generator=g)

    def sparse(M, v):  # the plan itself (A @ x takes it only where it pays)
        return M.sparse_matvec.matvec(M._panels(M.sparse_matvec), v)

    torch.testing.assert_close(sparse(G, x), G.to_dense() @ x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(G @ x, G.to_dense() @ x, rtol=1e-12, atol=1e-12)
    sp = G.sparse_matvec
    for X in (torch.randn(30, 5, dtype=torch.float64, generator=g),
              torch.randn(5, 30, dtype=torch.float64, generator=g).T):  # batch-major view
        torch.testing.assert_close(sp.matmul(G._panels(sp), X), G.to_dense() @ X,
                                   rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        G._Uf.mul_(-0.5)  # in place: the cached CSR values must follow
    torch.testing.assert_close(sparse(G, x), G.to_dense() @ x, rtol=1e-12, atol=1e-12)
    L = GBLR.from_lowrank(ga.LowRank(torch.randn(40, 3, dtype=torch.float64, generator=g),
                                     torch.randn(30, 3, dtype=torch.float64, generator=g)))
    assert L.sparse_matvec.wide == 3 and L.sparse_matvec.u_col.numel() == 0
    torch.testing.assert_close(sparse(L, x), L.to_dense() @ x, rtol=1e-12, atol=1e-12)
    G32 = G.to(dtype=torch.float32)
    torch.testing.assert_close(
        sparse(G32, x.float()), G32.to_dense() @ x.float(), rtol=1e-5, atol=1e-5
    )


def test_matvec_takes_the_sparse_plan_where_the_tiles_pad_most():
    """Many small scattered rank-1 pieces (tiles pad them a lot): the CSR plan; one large
    component (tiles fill): the tiled plan. Both exact."""
    g = torch.Generator().manual_seed(3)
    K = 120
    rs, cs = torch.randint(0, 96, (K,), generator=g), torch.randint(0, 80, (K,), generator=g)
    f = [(torch.randn(3, 1, generator=g, dtype=torch.float64),
          torch.randn(3, 1, generator=g, dtype=torch.float64)) for _ in range(K)]
    small = GBLR((96, 80), rs, [3] * K, cs, [3] * K, f)
    big = GBLR((96, 80), [0], [64], [0], [64],
               [(torch.randn(64, 8, dtype=torch.float64), torch.randn(64, 8, dtype=torch.float64))])
    assert small._sparse_matvec_pays() and not big._sparse_matvec_pays()
    x = torch.randn(80, dtype=torch.float64, generator=g)
    for M in (small, big):
        torch.testing.assert_close(M @ x, M.to_dense() @ x, rtol=1e-12, atol=1e-12)
    # half precision has no CPU sparse kernels: the tiled plan serves it
    for dt in (torch.float16, torch.bfloat16):
        H = small.to(dtype=dt)
        assert not H._sparse_matvec_pays()
        want = H.to_dense().double() @ x
        for X in (x, x[:, None].repeat(1, 3)):
            got = (H @ X.to(dt)).double()
            torch.testing.assert_close(got, want if X.ndim == 1 else want[:, None].repeat(1, 3),
                                       rtol=0.05, atol=0.05)


# ------------------------------------------------- hunt s9 (formats): empty batch
def test_structured_linear_empty_batch_under_autograd():
    W = torch.randn(24, 36, generator=torch.Generator().manual_seed(0))
    G = ga.fit_gblr(W, 0.3, steps=2).matrix
    layer = ga.nn.StructuredLinear(G)
    x = torch.randn(0, 36, requires_grad=True)
    y = layer(x)  # reshape(-1, 0) in the autograd product used to raise
    assert y.shape == (0, 24)
    y.sum().backward()
    assert x.grad.shape == (0, 36)
    assert all(p.grad is None or not bool(p.grad.any()) for p in layer.parameters())
