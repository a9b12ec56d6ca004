"""ga.convert: exact paths, projections, candidates, round trips, errors."""

from __future__ import annotations

import pytest
import torch
from catalogue import CATALOGUE

import gblr_approx as ga
from gblr_approx.budget import InfeasibleBudgetError
from gblr_approx.convert import (
    EXACT,
    EXACT_UP_TO_PERMUTATION,
    FORMAT_ORDER,
    PROJECTION,
    conversion_kind,
    convert,
)

SHAPE = (24, 40)


def sources(shape=SHAPE, seed=1):
    out = {}
    for name in ("dense", "lowrank", "blocksparse", "blocklowrank", "monarch", "blast"):
        out[name] = CATALOGUE[name](shape, torch.float64, torch.Generator().manual_seed(seed))
    out["gblr"] = ga.GBLR.from_blocklowrank(out["blocklowrank"])
    return out


SOURCES = sources()
PAIRS = [(s, t) for s in FORMAT_ORDER for t in FORMAT_ORDER]
EXACT_PAIRS = [(s, t) for s, t in PAIRS if conversion_kind(s, t) != PROJECTION]


def rel(A, B):
    Ad, Bd = A.to_dense().double(), B.to_dense().double()
    return float((Ad - Bd).norm() / Ad.norm())


def back_options(A):
    """Format options under which projecting A's dense matrix back at A's cost is exact."""
    if isinstance(A, ga.BlockSparse):
        return {"block_shape": A.block_shape}
    if isinstance(A, ga.BlockLowRank):
        return {"grid": A.grid}
    if isinstance(A, ga.Monarch):
        return {"blocks": (A.out_blocks, A.in_blocks), "rank": A.rank}
    return {}


def test_conversion_table_shape():
    assert conversion_kind("monarch", "gblr") == EXACT_UP_TO_PERMUTATION
    assert conversion_kind("lowrank", "blast") == EXACT
    assert conversion_kind("blast", "lowrank") == PROJECTION
    assert all(conversion_kind(s, "dense") == EXACT for s in FORMAT_ORDER)
    assert all(conversion_kind(s, s) == EXACT for s in FORMAT_ORDER)


@pytest.mark.parametrize("s,t", EXACT_PAIRS, ids=[f"{s}->{t}" for s, t in EXACT_PAIRS])
def test_exact_paths_reproduce_the_source(s, t):
    A = SOURCES[s]
    out = convert(A, t)
    assert out.info["exact"] is True and out.info["conversion"] == conversion_kind(s, t)
    assert rel(A, out) < 1e-10 and out.info["rel_error"] < 1e-10
    if conversion_kind(s, t) == EXACT_UP_TO_PERMUTATION:
        assert isinstance(out, ga.Permuted) and out.inner.format_name == t
    else:
        assert out.format_name == t
    m, n = A.shape
    if t == "dense":
        assert out.flops == m * n
    elif (s, t) == ("lowrank", "blast"):
        # BLAST stores the couplings: r more MACs than the low-rank matrix
        assert out.flops == A.flops + A.rank
    elif (s, t) == ("blocksparse", "blocklowrank"):
        # each stored block at its rank: at most min(h, w) (h + w) per h x w block
        assert out.flops <= sum(min(h, w) * (h + w) for h, w in _bsp_block_sizes(A))
    else:
        assert out.flops <= A.flops


def _bsp_block_sizes(S):
    m, n = S.shape
    br, bc = S.block_shape
    for i, j in zip(S.block_rows.tolist(), S.block_cols.tolist(), strict=True):
        yield min(br, m - i * br), min(bc, n - j * bc)


ROUND_TRIPS = [(s, t) for s, t in EXACT_PAIRS if s not in ("gblr", "blast", "dense") and s != t]


@pytest.mark.parametrize("s,t", ROUND_TRIPS, ids=[f"{s}->{t}->{s}" for s, t in ROUND_TRIPS])
def test_round_trips_of_exact_paths_are_exact(s, t):
    A = SOURCES[s]
    there = convert(A, t)
    back = convert(there, s, budget=A.flops, **back_options(A))
    assert back.format_name == s
    assert back.flops <= A.flops
    assert rel(A, back) < 1e-10


def test_monarch_permutation_paths_including_transposed():
    M = SOURCES["monarch"]
    for A in (M, M.T):
        for t in ("blocklowrank", "gblr"):
            out = convert(A, t)
            assert isinstance(out, ga.Permuted)
            assert out.flops == A.flops
            torch.testing.assert_close(out.to_dense(), A.to_dense(), rtol=0, atol=1e-12)
        # without the permutation, a projection (not exact in general)
        P = convert(A, "blocklowrank", allow_permutation=False)
        assert P.format_name == "blocklowrank" and P.info["conversion"] == PROJECTION


CLOSED_FORM = ("lowrank", "blocksparse", "blocklowrank", "monarch")
PROJ_PAIRS = [(s, t) for s in FORMAT_ORDER for t in CLOSED_FORM
              if conversion_kind(s, t) == PROJECTION]


@pytest.mark.parametrize("s,t", PROJ_PAIRS, ids=[f"{s}->{t}" for s, t in PROJ_PAIRS])
def test_projections_match_projecting_the_dense_source(s, t):
    A = SOURCES[s]
    opts = {"block_shape": (8, 8)} if t == "blocksparse" else {}
    for budget in (None, 0.3):
        out = convert(A, t, budget, **opts)
        B = A.flops if budget is None else ga.resolve_budget(budget, *A.shape)
        assert out.flops <= B
        ref = ga.project(A.to_dense(), t, B, **opts)
        assert abs(rel(A, out) - rel(A, ref)) < 1e-6
        assert abs(out.info["rel_error"] - rel(A, out)) < 1e-12
        assert out.info["exact"] is False and out.info["conversion"] == PROJECTION


@pytest.mark.parametrize("s", ["dense", "blast", "monarch"])
def test_gblr_path_never_worse_than_contained_candidates(s):
    A = SOURCES[s]
    B = A.flops
    W = A.to_dense()
    out = convert(A, "gblr", allow_permutation=False)
    assert out.format_name == "gblr" and out.flops <= B
    err = rel(A, out)
    cands = [ga.project(W, "lowrank", B), ga.project(W, "blocklowrank", B),
             ga.project(W, "blocksparse", B, block_shape=(24, 32))]
    for C in cands:
        assert err <= rel(A, C) + 1e-9, C.format_name


@pytest.mark.parametrize("s", ["dense", "monarch", "blocksparse"])
def test_blast_path_never_worse_than_contained_lowrank(s):
    A = SOURCES[s]
    m, n = A.shape
    out = convert(A, "blast")
    assert out.format_name == "blast" and out.flops <= A.flops
    r = A.flops // (m + n + 1)  # low rank as a 1 x 1 BLAST within the budget
    lr = ga.project(A.to_dense(), "lowrank", r * (m + n))
    assert rel(A, out) <= rel(A, lr) + 1e-9


def test_lowrank_projection_through_products_never_densifies(monkeypatch):
    # a BLAST source of true rank <= 6 (2 x 2 blocks of rank 3)
    g = torch.Generator().manual_seed(0)
    A = ga.BLAST(torch.randn(64, 3, generator=g, dtype=torch.float64),
                 torch.randn(48, 3, generator=g, dtype=torch.float64),
                 torch.randn(2, 2, 3, generator=g, dtype=torch.float64))
    D = A.to_dense()

    def boom(*a, **k):
        raise AssertionError("densified")

    monkeypatch.setattr(ga.BLAST, "to_dense", boom)
    out = convert(A, "lowrank", budget=8 * (64 + 48), max_dense_entries=100)
    monkeypatch.undo()
    assert "randomized" in out.info["convert"]["method"]
    assert "probes" in out.info["convert"]["rel_error_method"]
    assert float((out.to_dense() - D).norm() / D.norm()) < 1e-10
    # and on a full-rank source the randomized error is close to the optimum
    S = SOURCES["monarch"]
    out = convert(S, "lowrank", budget=0.3, max_dense_entries=100, power_iters=4)
    ref = ga.project(S.to_dense(), "lowrank", 0.3)
    assert rel(S, out) <= rel(S, ref) * 1.05


def test_lowrank_to_lowrank_uses_the_factors():
    L = SOURCES["lowrank"]
    out = convert(L, "lowrank", budget=4 * sum(L.shape))
    assert out.rank == 4 and "QR" in out.info["convert"]["method"]
    ref = ga.project(L.to_dense(), "lowrank", 4 * sum(L.shape))
    assert abs(rel(L, out) - rel(L, ref)) < 1e-10


def test_exact_path_replaced_by_projection_when_budget_is_smaller():
    L = SOURCES["lowrank"]
    out = convert(L, "gblr", budget=L.flops // 2)
    assert out.flops <= L.flops // 2 and out.info["exact"] is False
    assert 0 < out.info["rel_error"] < 1


def test_arrays_are_dense_sources_and_impossible_requests_say_why():
    W = torch.randn(12, 10, dtype=torch.float64)
    out = convert(W.numpy(), "lowrank", budget=0.5)
    assert out.info["convert"]["source"] == "dense"
    with pytest.raises(InfeasibleBudgetError, match="smallest feasible budget is 22"):
        convert(W, "lowrank", budget=5)
    with pytest.raises(InfeasibleBudgetError, match="dense"):
        convert(SOURCES["lowrank"], "dense", budget=0.5)
    with pytest.raises(ValueError, match="permuted"):
        convert(W, "permuted")
    with pytest.raises(ValueError, match="unknown format"):
        convert(W, "hierarchical")
    with pytest.raises(InfeasibleBudgetError):
        convert(W, "monarch", budget=3)
    out = convert(W, "dense")
    assert out.info["exact"] and torch.equal(out.to_dense(), W)


# ------------------------------------------------- hunt s9 (formats): convert regressions
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("t", ["lowrank", "blocksparse", "blocklowrank", "monarch", "gblr",
                               "blast"])
def test_half_precision_sources_are_computed_in_float32(t, dtype):
    L = SOURCES["lowrank"].to(dtype=dtype)  # QR / SVD of half factors used to crash in torch
    opts = {"steps": 2} if t in ("gblr", "blast") else {}
    out = convert(L, t, 0.2, **opts)
    ref = ga.project(L.to_dense(), t, 0.2, **opts)  # project computes half in float32 too
    assert out.dtype == ref.dtype == torch.float32
    assert out.flops <= ga.resolve_budget(0.2, *L.shape)
    assert abs(out.info["rel_error"] - rel(L.to(dtype=torch.float32), out)) < 1e-5


@pytest.mark.parametrize("opts", [{"blocks": (4, 4)}, {"rank": 3}])
def test_blast_target_with_too_small_a_budget_for_its_options(opts):
    W = torch.randn(16, 24, dtype=torch.float64)
    with pytest.raises(InfeasibleBudgetError, match="smallest feasible budget") as direct:
        ga.project(W, "blast", 41, **opts)
    with pytest.raises(InfeasibleBudgetError) as conv:  # was "min() arg is an empty sequence"
        convert(W, "blast", 41, **opts)
    assert str(conv.value) == str(direct.value)


def test_lowrank_target_rank_too_large_says_so():
    L = SOURCES["lowrank"]
    with pytest.raises(ValueError, match=r"rank must be <= min\(m, n\) = 24; got 100"):
        convert(L, "lowrank", rank=100)  # used to name a "smallest feasible budget"
    with pytest.raises(InfeasibleBudgetError, match="rank=5 costs"):
        convert(L, "lowrank", 100, rank=5)


def test_blocksparse_target_uses_the_small_layer_default():
    from gblr_approx.formats.blocksparse import default_block_shape

    L = CATALOGUE["lowrank"]((24, 36), torch.float64, torch.Generator().manual_seed(2))
    out = convert(L, "blocksparse")
    assert out.block_shape == default_block_shape(24, 36) == (6, 9)  # was (24, 32)
    assert out.block_shape == ga.project(L.to_dense(), "blocksparse", L.flops).block_shape
