"""Runnable GBLR layouts (fit/gblr/layout.py): lossless merge, tile snapping, tiled refit."""

from __future__ import annotations

import pytest
import torch

import gblr_approx as ga
from gblr_approx.fit.gblr.layout import (
    is_aligned,
    merge_identical,
    snap_interval,
    snapped_model,
    tiled_layout,
)
from gblr_approx.formats.blocklowrank import BlockLowRank
from gblr_approx.formats.gblr import GBLR
from gblr_approx.formats.lowrank import LowRank


def target(m, n, seed=0):
    """A low-rank-plus-local-blocks matrix with noise (GBLR structure to find)."""
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(m, 3, generator=gen, dtype=torch.float64) @ torch.randn(
        3, n, generator=gen, dtype=torch.float64
    )
    W[4:20, 10:30] += 3 * torch.randn(16, 20, generator=gen, dtype=torch.float64)
    return W + 0.1 * torch.randn(m, n, generator=gen, dtype=torch.float64)


def test_merge_identical_is_lossless_and_never_costs_more():
    gen = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    # rectangles: A twice (rank 1 + rank 2), B three times (one dense), C once (wraps rows)
    rs, rw, cs, cw = (
        [0, 5, 0, 5, 5, 30],
        [10, 8, 10, 8, 8, 6],
        [3, 0, 3, 0, 0, 35],
        [7, 9, 7, 9, 9, 9],
    )
    factors = [(r(10, 1), r(7, 1)), (r(8, 1), r(9, 1)), (r(10, 2), r(7, 2)), r(8, 9)]
    factors += [(r(8, 1), r(9, 1)), (r(6, 1), r(9, 1))]
    G = GBLR((32, 40), rs, rw, cs, cw, factors)
    M = merge_identical(G)
    assert M.num_components == 3
    assert M.flops <= G.flops
    assert torch.allclose(M.to_dense(), G.to_dense(), atol=1e-12)
    assert sorted(M.ranks.tolist()) == [1, 3, 8]  # rank 1+2 factored; dense 8x9 (min(h, w))
    X = r(40, 3)
    assert torch.allclose(M @ X, G @ X, atol=1e-10)
    with pytest.raises(TypeError, match="GBLR"):
        merge_identical(torch.zeros(3, 3))


@pytest.mark.parametrize("side,tile", [(384, 32), (100, 16), (50, 64), (70, 7)])
def test_snapped_intervals_are_aligned(side, tile):
    gen = torch.Generator().manual_seed(side + tile)
    for _ in range(300):
        s = int(torch.randint(0, side, (1,), generator=gen))
        w = int(torch.randint(1, side + 1, (1,), generator=gen))
        a, ww = snap_interval(s, w, side, tile)
        assert 0 <= a < side and 1 <= ww <= side
        end = a + ww if a + ww <= side else a + ww - side
        assert a % tile == 0 and (end % tile == 0 or end == side)
        # both ends moved by at most half a cell (or the interval grew to one cell / the side)
        if ww not in (side, tile, side - a):
            assert abs((a - s + side // 2) % side - side // 2) <= tile // 2 + 1


def test_snapped_model_carries_the_free_layout():
    W = target(48, 40)
    free = ga.fit_gblr(W, 0.3, steps=3, progress=False).matrix
    model = snapped_model(W, free, 8)
    G = model.to_gblr()
    assert is_aligned(G, 8)
    assert G.num_components <= free.num_components


@pytest.mark.parametrize("tile", [8, 16])
def test_tiled_fit_within_budget_aligned_and_no_worse_than_aligned_starts(tile):
    W = target(48, 64)
    budget = int(0.3 * 48 * 64)
    res = ga.fit_gblr(W, budget, steps=4, layout="tiled", tile=tile, progress=False)
    G = res.matrix
    assert G.flops <= budget
    assert is_aligned(G, tile)
    D = G.to_dense()
    err = float((W - D).norm() / W.norm())
    assert err == pytest.approx(res.rel_error, rel=1e-6)
    # aligned starts: the truncated SVD and block-low-rank on a tile grid
    L = LowRank.project(W, budget)
    assert err <= float((W - L.to_dense()).norm() / W.norm()) + 1e-9
    B = BlockLowRank.project(W, budget, grid=(48 // tile, 64 // tile))
    assert err <= float((W - B.to_dense()).norm() / W.norm()) + 1e-9
    # exact products, transpose, gradients against to_dense
    for batch in (1, 3, 40):
        X = torch.randn(64, batch, dtype=torch.float64)
        assert torch.allclose(G @ X, D @ X, atol=1e-10)
        L2 = torch.randn(batch, 48, dtype=torch.float64)
        assert torch.allclose(L2 @ G, L2 @ D, atol=1e-10)
    assert torch.allclose(G.T.to_dense(), D.T, atol=1e-12)
    X = torch.randn(64, 5, dtype=torch.float64, requires_grad=True)
    (G @ X).pow(2).sum().backward()
    X2 = X.detach().clone().requires_grad_(True)
    (D @ X2).pow(2).sum().backward()
    assert torch.allclose(X.grad, X2.grad, atol=1e-9)


def test_tiled_layout_iterates_respect_the_budget():
    W = target(32, 48, seed=3)
    budget = 400
    seen = 0
    for name, G, err in tiled_layout(W, budget, None, tile=16, iters=3, max_components=4):
        seen += 1
        assert G.flops <= budget and is_aligned(G, 16), name
        assert err == pytest.approx(float((W - G.to_dense()).norm() / W.norm()), rel=1e-6)
        if name in ("tiled", "tiled:lowrank+blocks", "tiled:lowrank+blocks+snapped"):
            assert G.num_components <= 4, name
    assert seen >= 2


def test_tiled_fit_no_worse_than_low_rank_plus_tile_blocks():
    # a free layout of narrow pieces loses most of them when snapped to a coarse grid: the
    # tile-grid low-rank + blocks split of the budget is a candidate of the tiled fit
    from gblr_approx.fit.gblr.mixed import lowrank_plus_blocks

    W = target(64, 64, seed=7)
    W[40:56, 8:24] += 2 * torch.randn(16, 16, generator=torch.Generator().manual_seed(2),
                                      dtype=torch.float64)
    budget = int(0.25 * 64 * 64)
    res = ga.fit_gblr(W, budget, steps=3, layout="tiled", tile=16, progress=False)
    _, mixed_err = lowrank_plus_blocks(W, budget, (4, 4))
    assert res.matrix.flops <= budget and is_aligned(res.matrix, 16)
    assert res.rel_error <= mixed_err + 1e-9
    names = {h["stage"] for h in res.history}
    assert {"tiled:lowrank+blocks", "tiled:lowrank+blocks+snapped"} <= names


def test_tiled_fit_from_pieces_at_least_one_tile_wide():
    # min_width=tile: the free stage learns pieces that survive the snapping; the result is
    # aligned, within the budget and exact; a given start must respect min_width
    W = target(64, 64, seed=5)
    kw = dict(steps=3, layout="tiled", tile=16, progress=False)
    res = ga.fit_gblr(W, 0.3, min_width=16, **kw)
    G = res.matrix
    assert G.flops <= res.budget and is_aligned(G, 16)
    assert res.rel_error == pytest.approx(float((W - G.to_dense()).norm() / W.norm()), rel=1e-9)
    assert res.rel_error <= ga.relative_error(W, ga.project(W, "lowrank", 0.3)) + 1e-9
    free = ga.fit_gblr(W, 0.3, steps=3, progress=False).matrix
    assert int(free.row_width.min()) < 16  # (the free layout has narrow pieces here)
    with pytest.raises(ValueError, match="narrower than min_width"):
        ga.fit_gblr(W, 0.3, start=free, min_width=16, progress=False)


def test_aligned_plan_reads_x_in_place_and_fills_tiles():
    # factored components on 16-aligned rectangles of a 64 x 64 matrix
    gen = torch.Generator().manual_seed(5)
    rs, rw, cs, cw = [0, 16, 32, 0], [32, 16, 32, 64], [0, 16, 48, 0], [16, 32, 16, 64]
    factors = [
        (torch.randn(h, 2, generator=gen), torch.randn(w, 2, generator=gen))
        for h, w in zip(rw, cw, strict=True)
    ]
    G = GBLR((64, 64), rs, rw, cs, cw, factors)
    plan = G.plan
    assert plan.x_gather is None and not plan.reads_x
    assert plan.fill > 0.7
    for batch in (1, 7, 64):
        X = torch.randn(64, batch)
        assert torch.allclose(G @ X, G.to_dense() @ X, atol=1e-4)


def test_layout_option_errors_name_the_argument():
    W = torch.randn(16, 16)
    with pytest.raises(ValueError, match="layout"):
        ga.fit_gblr(W, 0.5, layout="grid", progress=False)
    with pytest.raises(ValueError, match="tile"):
        ga.fit_gblr(W, 0.5, layout="tiled", tile=0, progress=False)
    with pytest.raises(ValueError, match="tile"):
        list(tiled_layout(W, 64, None, tile=2.5))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_segment_plan_is_exact_on_wrapped_dense_and_rank0_components(seed):
    from gblr_approx.formats.gblr_plan import build_segments

    gen = torch.Generator().manual_seed(seed)
    m, n = 40, 56
    rs, rw, cs, cw, factors = [], [], [], [], []
    for k in range(9):
        h = m if k == 0 else int(torch.randint(1, m + 1, (1,), generator=gen))
        w = n if k == 0 else int(torch.randint(1, n + 1, (1,), generator=gen))
        rs.append(0 if k == 0 else int(torch.randint(0, m, (1,), generator=gen)))
        cs.append(0 if k == 0 else int(torch.randint(0, n, (1,), generator=gen)))
        rw.append(h)
        cw.append(w)
        if k % 4 == 3:
            factors.append(torch.randn(h, w, generator=gen, dtype=torch.float64))
        else:
            r = k % 3  # includes rank 0
            factors.append(
                (
                    torch.randn(h, r, generator=gen, dtype=torch.float64),
                    torch.randn(w, r, generator=gen, dtype=torch.float64),
                )
            )
    G = GBLR((m, n), rs, rw, cs, cw, factors)
    args = [G.shape] + [
        t.tolist()
        for t in (G.row_start, G.row_width, G.col_start, G.col_width, G.ranks, G.is_dense)
    ]
    seg = build_segments(*args)
    assert seg is not None and seg.flops == G.flops and seg.fill == 1.0
    D = G.to_dense()
    for batch in (1, 33):
        X = torch.randn(n, batch, dtype=torch.float64)
        assert torch.allclose(seg.matmul(seg.pack(G._Uf, G._Vf), X), D @ X, atol=1e-10)
        assert torch.allclose(G @ X, D @ X, atol=1e-10)  # the dispatch picks it at 33
        # batch-major operand (the transpose of a row-major (batch, n) tensor, as
        # StructuredLinear passes it): same numbers, result written batch-major
        Xb = X.T.contiguous().T
        Yb = seg.matmul(seg.pack(G._Uf, G._Vf), Xb)
        assert torch.allclose(Yb, D @ X, atol=1e-10)
        assert Yb.T.is_contiguous()
    assert build_segments(*args, max_segments=2) is None


def _grid_gblr(m, n, tile, seed, lowrank=True, wrap=True):
    """Low-rank part (unless ``lowrank=False``) plus a tile grid of blocks of varying rank
    (rank 0 and a dense block included, last tiles shorter when the side is not a multiple),
    plus one wrapping piece (unless ``wrap=False``)."""
    gen = torch.Generator().manual_seed(seed)
    rs, rw, cs, cw, factors = [0], [m], [0], [n], []
    factors.append((torch.randn(m, 5, generator=gen, dtype=torch.float64),
                    torch.randn(n, 5, generator=gen, dtype=torch.float64)))
    if not lowrank:
        rs, rw, cs, cw, factors = [], [], [], [], []
    for i, r0 in enumerate(range(0, m, tile)):
        for j, c0 in enumerate(range(0, n, tile)):
            h, w = min(tile, m - r0), min(tile, n - c0)
            rs.append(r0), rw.append(h), cs.append(c0), cw.append(w)
            if (i, j) == (1, 0):
                factors.append(torch.randn(h, w, generator=gen, dtype=torch.float64))
                continue
            r = (3 * i + j + seed) % 5  # 0 .. 4
            factors.append((torch.randn(h, r, generator=gen, dtype=torch.float64),
                            torch.randn(w, r, generator=gen, dtype=torch.float64)))
    if wrap:
        rs.append(m - 3), rw.append(7), cs.append(n - 4), cw.append(9)  # wraps on both sides
        factors.append((torch.randn(7, 2, generator=gen, dtype=torch.float64),
                        torch.randn(9, 2, generator=gen, dtype=torch.float64)))
    return GBLR((m, n), rs, rw, cs, cw, factors)


@pytest.mark.parametrize("lowrank", [True, False])
def test_segment_plan_adds_a_layer_bias_in_its_gemms(lowrank):
    """``StructuredLinear`` on an aligned layout from 32 rows, without autograd, takes the
    segment plan with the bias added by the stage-2 GEMMs (``GBLR._linear``): the same numbers
    as ``nn.Linear`` with the dense weight, whether the first row interval covers every row
    (a low-rank part) or not (the result starts from the bias)."""
    G = _grid_gblr(40, 53, 8, 0, lowrank=lowrank)
    assert G.segments is not None
    assert G.segments.stage2[0].accumulate is not lowrank
    bias = torch.randn(40, dtype=torch.float64)
    layer = ga.nn.StructuredLinear(G, bias)
    for rows in (33, 90):
        x = torch.randn(rows, 53, dtype=torch.float64)
        with torch.no_grad():
            assert layer._forward_matrix()._linear(x, layer.bias) is not None
            y = layer(x)
        assert y.is_contiguous()
        ref = torch.nn.functional.linear(x, G.to_dense(), bias)
        torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
        xt = x.T.contiguous().T  # column-major rows: the general path, the same numbers
        with torch.no_grad():
            assert G._linear(xt, bias) is None
            yt = layer(xt)
        assert yt.is_contiguous()
        torch.testing.assert_close(yt, ref, rtol=1e-12, atol=1e-12)
    assert G._linear(x, None) is None and G._linear(x[:5], bias) is None


@pytest.mark.parametrize("lowrank", [True, False])
def test_segment_plan_column_blocks_are_exact(lowrank, monkeypatch):
    """Large batches run the segment plan in column blocks (uneven last block, intermediates
    in the thread's scratch buffer): the same numbers as one block, feature- and batch-major,
    with and without a bias, and a layer's row-major output."""
    from gblr_approx.formats import gblr_plan

    G = _grid_gblr(40, 53, 8, 1, lowrank=lowrank)
    seg, D = G.segments, G.to_dense()
    panels = G._panels(seg)
    bias = torch.randn(40, dtype=torch.float64)
    X = torch.randn(53, 45, dtype=torch.float64)
    ones = {}
    for Xl in (X, X.T.contiguous().T):
        ones[Xl.stride(0) == 1] = [seg.matmul(panels, Xl), seg.matmul(panels, Xl, bias)]
    monkeypatch.setattr(gblr_plan, "SEGMENT_CHUNK", 8)  # 45 columns: blocks of 8, 8, ..., 5
    monkeypatch.setattr(gblr_plan, "SEGMENT_CHUNK_FLOATS", 0)
    calls = []
    real = gblr_plan.GBLRSegments._matmul_columns
    monkeypatch.setattr(gblr_plan.GBLRSegments, "_matmul_columns",
                        lambda self, p, Xc, *a: calls.append(Xc.shape[1]) or real(self, p, Xc, *a))
    for Xl in (X, X.T.contiguous().T):
        bm = Xl.stride(0) == 1
        Y, Yb = seg.matmul(panels, Xl), seg.matmul(panels, Xl, bias)
        assert Y.T.is_contiguous() == bm and Yb.T.is_contiguous() == bm
        torch.testing.assert_close(Y, D @ X, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(Yb, D @ X + bias[:, None], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(Y, ones[bm][0], rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(Yb, ones[bm][1], rtol=1e-13, atol=1e-13)
    assert calls == [8, 8, 8, 8, 8, 5] * 4  # balanced_step(45, 8) = 8
    layer = ga.nn.StructuredLinear(G, bias)
    with torch.no_grad():
        y = layer(X.T.contiguous())
    assert y.is_contiguous()
    torch.testing.assert_close(y, (D @ X + bias[:, None]).T, rtol=1e-12, atol=1e-12)


def test_segment_plan_single_large_block_uses_the_scratch_buffer(monkeypatch):
    """One column block past SEGMENT_FRESH_FLOATS floats of intermediates runs in the
    thread's scratch buffer (below it: fresh buffers); both exact, with and without bias."""
    from gblr_approx.formats import gblr_plan

    G = _grid_gblr(40, 53, 8, 1, lowrank=False)
    seg, D = G.segments, G.to_dense()
    panels = G._panels(seg)
    bias = torch.randn(40, dtype=torch.float64)
    X = torch.randn(45, 53, dtype=torch.float64).T  # batch-major, one block
    seen = []
    real = gblr_plan.GBLRSegments._matmul_columns
    monkeypatch.setattr(gblr_plan.GBLRSegments, "_matmul_columns",
                        lambda self, p, Xc, b, Y, scr=False: seen.append(scr)
                        or real(self, p, Xc, b, Y, scr))
    for fresh_floats, want in [(1 << 40, False), (0, True)]:
        monkeypatch.setattr(gblr_plan, "SEGMENT_FRESH_FLOATS", fresh_floats)
        seen.clear()
        torch.testing.assert_close(seg.matmul(panels, X), D @ X, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(seg.matmul(panels, X, bias), D @ X + bias[:, None],
                                   rtol=1e-12, atol=1e-12)
        assert seen == [want, want]


@pytest.mark.parametrize("lowrank", [True, False])
def test_segment_plan_stage2_split_views_match_slices(lowrank, monkeypatch):
    """Ordered, disjoint stage-2 intervals (a tile grid's block rows) take their views from
    two ``split_with_sizes`` calls; the result equals the per-segment slices' exactly.
    Overlapping or unordered intervals have no split plan."""
    from gblr_approx.formats import gblr_plan

    G = _grid_gblr(40, 53, 8, 2, lowrank=lowrank, wrap=False)
    seg, D = G.segments, G.to_dense()
    panels = G._panels(seg)
    rows = seg.gathered or seg.slots + (53 if seg.reads_x else 0)
    assert seg._stage2_splits(rows) is not None
    W = _grid_gblr(40, 53, 8, 2, lowrank=lowrank).segments  # + a piece wrapping rows 37-3
    assert W._stage2_splits(W.gathered or W.slots + (53 if W.reads_x else 0)) is None
    X = torch.randn(53, 37, dtype=torch.float64)
    bias = torch.randn(40, dtype=torch.float64)
    split = [seg.matmul(panels, Xl, bias) for Xl in (X, X.T.contiguous().T)]
    monkeypatch.setattr(gblr_plan.GBLRSegments, "_stage2_splits", lambda self, g: None)
    sliced = [seg.matmul(panels, Xl, bias) for Xl in (X, X.T.contiguous().T)]
    for a, b in zip(split, sliced, strict=True):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, D @ X + bias[:, None], rtol=1e-12, atol=1e-12)
    assert gblr_plan._ordered_split([(0, 4), (6, 2)], 10) == ([4, 2, 2, 2], [0, 2])
    assert gblr_plan._ordered_split([(6, 2), (0, 4)], 10) is None  # unordered
    assert gblr_plan._ordered_split([(0, 4), (3, 2)], 10) is None  # overlapping
    assert gblr_plan._ordered_split([(8, 4)], 10) is None  # past the end


@pytest.mark.parametrize("seed", [0, 1])
def test_segment_runs_batch_grid_columns_exactly(seed):
    """Equal column intervals side by side run stage 1 as one bmm over zero-padded panels:
    same product as one GEMM per interval, padding counted in padded_macs, any operand
    layout."""
    from gblr_approx.formats.gblr_plan import build_segments

    G = _grid_gblr(40, 53, 8, seed)
    args = [G.shape] + [
        t.tolist()
        for t in (G.row_start, G.row_width, G.col_start, G.col_width, G.ranks, G.is_dense)
    ]
    plain = build_segments(*args, runs=False)
    seg = build_segments(*args)
    assert plain is not None and seg is not None
    assert all(s.count == 0 for s in plain.stage1)
    runs = [s for s in seg.stage1 if s.count]
    assert runs and max(s.count for s in runs) >= 3  # the block columns, 8 wide
    assert len(seg.stage1) < len(plain.stage1)
    assert plain.padded_macs == plain.flops == G.flops
    assert seg.flops == G.flops and seg.padded_macs > seg.flops and seg.fill >= 0.5
    D = G.to_dense()
    for batch in (1, 5, 40):
        X = torch.randn(53, batch, dtype=torch.float64)
        for Xl in (X, X.T.contiguous().T):  # feature- and batch-major
            ref = D @ Xl
            assert torch.allclose(plain.matmul(plain.pack(G._Uf, G._Vf), Xl), ref, atol=1e-10)
            assert torch.allclose(seg.matmul(seg.pack(G._Uf, G._Vf), Xl), ref, atol=1e-10)
    # padding stays exact when the input holds infinities: padded rows of Z are never read
    X = torch.randn(53, 6, dtype=torch.float64)
    X[3, 2] = float("inf")
    Y = seg.matmul(seg.pack(G._Uf, G._Vf), X)
    Yp = plain.matmul(plain.pack(G._Uf, G._Vf), X)
    torch.testing.assert_close(Y, Yp, equal_nan=True)


@pytest.mark.parametrize("lowrank", [True, False])
@pytest.mark.parametrize("wrap", [True, False])
def test_segment_runs_batch_grid_block_rows_exactly(lowrank, wrap):
    """Equal row intervals one under the other (a tile grid's block rows) run stage 2 as one
    bmm over operands padded with a zeroed row of ``[Z; X; 0]`` (uninitialised memory there
    could hold NaN, and 0 x NaN = NaN): the same product as one GEMM
    per interval, feature- and batch-major (row form), with a bias and in column blocks;
    padding counted in padded_macs; wrapping pieces stay single GEMMs."""
    from gblr_approx.formats import gblr_plan
    from gblr_approx.formats.gblr_plan import build_segments

    G = _grid_gblr(40, 53, 8, 3, lowrank=lowrank, wrap=wrap)
    args = [G.shape] + [
        t.tolist()
        for t in (G.row_start, G.row_width, G.col_start, G.col_width, G.ranks, G.is_dense)
    ]
    plain, seg = build_segments(*args, runs=False), build_segments(*args)
    assert all(s.count == 0 for s in plain.stage2) and not plain.zero_row
    runs = [s for s in seg.stage2 if s.count]
    assert [(s.count, s.rows, s.out) for s in runs] == [(5, 8, 0)]  # the 5 block rows
    assert seg.zero_row and len(seg.stage2) == len(plain.stage2) - 4
    assert seg.flops == plain.flops == G.flops and seg.padded_macs > seg.flops
    singles = [(s.out, s.rows) for s in seg.stage2 if not s.count]
    assert singles == [(s.out, s.rows) for s in plain.stage2 if s.rows != 8]
    D = G.to_dense()
    bias = torch.randn(40, dtype=torch.float64)
    pp, ps = plain.pack(G._Uf, G._Vf), seg.pack(G._Uf, G._Vf)
    for batch in (1, 5, 40):
        X = torch.randn(53, batch, dtype=torch.float64)
        X[3, 0] = float("inf")  # padding reads zeros: NaN exactly where the plain plan has it
        for Xl in (X, X.T.contiguous().T):  # feature- and batch-major
            for b in (None, bias):
                Y, Yp = seg.matmul(ps, Xl, b), plain.matmul(pp, Xl, b)
                assert batch == 1 or Y.T.is_contiguous() == (Xl is not X)
                torch.testing.assert_close(Y, Yp, rtol=1e-12, atol=1e-12, equal_nan=True)
        Xf = torch.randn(53, batch, dtype=torch.float64)
        torch.testing.assert_close(seg.matmul(ps, Xf), D @ Xf, rtol=1e-12, atol=1e-12)
    X = torch.randn(53, 45, dtype=torch.float64)
    one = seg.matmul(ps, X.T.contiguous().T, bias)
    with pytest.MonkeyPatch.context() as mp:  # column blocks: ZX's zero row in scratch
        mp.setattr(gblr_plan, "SEGMENT_CHUNK", 8)
        mp.setattr(gblr_plan, "SEGMENT_CHUNK_FLOATS", 0)
        for Xl in (X, X.T.contiguous().T):
            torch.testing.assert_close(seg.matmul(ps, Xl, bias), one, rtol=1e-13, atol=1e-13)


def test_tiled_fit_stopped_by_the_callback_still_returns_a_matrix():
    W = target(32, 32, seed=4)
    seen = []

    def stop_in_tiled(rec):
        seen.append(rec["stage"])
        return not rec["stage"].startswith("tiled")

    res = ga.fit_gblr(W, 0.3, steps=2, layout="tiled", tile=8, callback=stop_in_tiled)
    assert res.matrix.flops <= res.budget and seen[-1].startswith("tiled")
    assert is_aligned(res.matrix, 8)  # the first tiled iterate was kept


def test_segment_panels_are_stored_in_the_fast_gemm_orientation():
    """Single-GEMM panels: stage 1 row-major ``(rows, length)`` (``V`` blocks transposed),
    stage 2 column-major ``(rows, length)``; runs stay row-major ``(count, rows, length)``
    (the orientations MKL multiplies fastest at one sentence, docs/benchmarks.md). Products
    with every panel in the other orientation give the same numbers."""
    G = _grid_gblr(40, 53, 8, 1, lowrank=True, wrap=False)
    seg = G.segments
    p1, p2 = seg.pack(G._Uf, G._Vf)
    single1 = [P for s, P in zip(seg.stage1, p1, strict=True) if not s.count]
    single2 = [P for s, P in zip(seg.stage2, p2, strict=True) if not s.count]
    assert single1 and single2 and any(s.count for s in seg.stage1 + seg.stage2)
    for s, P in zip(seg.stage1, p1, strict=True):
        assert P.is_contiguous() and P.shape[-2:] == (s.rows, s.length)
    for s, P in zip(seg.stage2, p2, strict=True):
        assert P.shape[-2:] == (s.rows, s.length)
        assert P.is_contiguous() if s.count else P.T.is_contiguous()
    other = (
        [P if s.count else P.T.contiguous().T for s, P in zip(seg.stage1, p1, strict=True)],
        [P if s.count else P.contiguous() for s, P in zip(seg.stage2, p2, strict=True)],
    )
    D = G.to_dense()
    for X in (torch.randn(53, 51, dtype=torch.float64),
              torch.randn(51, 53, dtype=torch.float64).T):
        torch.testing.assert_close(seg.matmul((p1, p2), X), D @ X, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(seg.matmul(other, X), D @ X, rtol=1e-12, atol=1e-12)


def test_thin_products_take_the_segment_plan_only_from_a_few_columns(monkeypatch):
    """A four-GEMM segment layout (low-rank part plus a 3 x 3 tile grid): products of fewer
    than ``SEGMENTS_THIN_COLUMNS`` columns run the tiled plan (fewer launches), from there the
    segment plan; every one exact."""
    from gblr_approx.formats import gblr as gblr_module
    from gblr_approx.formats.gblr_plan import GBLRSegments

    G = _grid_gblr(48, 48, 16, 1, wrap=False)
    seg = G.segments
    assert seg is not None and len(seg.stage1) + len(seg.stage2) <= gblr_module.SEGMENTS_THIN
    calls = []
    real = GBLRSegments.matmul
    monkeypatch.setattr(GBLRSegments, "matmul",
                        lambda self, *a, **k: calls.append(a[1].shape[1]) or real(self, *a, **k))
    D = G.to_dense()
    low = gblr_module.SEGMENTS_THIN_COLUMNS
    for k in (1, low - 1, low, gblr_module.ROW_FORM_BELOW - 1, gblr_module.ROW_FORM_BELOW):
        X = torch.randn(48, k, dtype=torch.float64)
        torch.testing.assert_close(G @ X, D @ X, rtol=1e-12, atol=1e-10)
    assert calls == [low, gblr_module.ROW_FORM_BELOW - 1, gblr_module.ROW_FORM_BELOW]
