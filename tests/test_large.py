"""Large-layer code paths: size-gated randomized SVD and memory-frugal fits (issue 13).

The size thresholds are lowered with ``monkeypatch`` so that the large-layer paths run on
small matrices; each test checks that the path was selected (recorded in ``info``) and that
its result is within a stated tolerance of the exact path, or equal to it where the path is
exact (the memory-frugal BLAST layout).
"""

from __future__ import annotations

import math

import pytest
import torch

import gblr_approx as ga
import gblr_approx.fit.blast.factors as fit_blast
import gblr_approx.linalg as la


def powerlaw(m: int, n: int, alpha: float = 1.0, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=dtype))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=dtype))
    s = torch.arange(1, k + 1, dtype=dtype).pow(-alpha)
    return (U * s) @ V.T


def rel(W, A) -> float:
    return float(torch.linalg.norm(W - A.to_dense()) / torch.linalg.norm(W))


@pytest.fixture
def low_threshold(monkeypatch):
    """Every matrix of at least 1000 entries counts as large."""
    monkeypatch.setattr(la, "RANDOMIZED_MIN_ENTRIES", 1000)
    monkeypatch.setattr(fit_blast, "FRUGAL_MIN_ENTRIES", 1000)


# ------------------------------------------------------------------------ method choice
def test_choose_svd_method_rules(monkeypatch):
    assert la.choose_svd_method(384, 1536, 100) == "exact"  # MiniLM-sized: below threshold
    assert la.choose_svd_method(4096, 11008, 746) == "randomized"
    assert la.choose_svd_method(4096, 11008, 2040) == "exact"  # rank too close to min(m, n)
    assert la.choose_svd_method(10, 10, 3, method="randomized") == "randomized"
    assert la.choose_svd_method(10**4, 10**4, 3, method="exact") == "exact"
    monkeypatch.setattr(la, "RANDOMIZED_MIN_ENTRIES", 100)
    assert la.choose_svd_method(40, 60, 4) == "randomized"
    assert la.choose_svd_method(20, 30, 4) == "exact"  # 4 + 10 > min(m, n) / 2
    with pytest.raises(ValueError, match="method"):
        la.choose_svd_method(40, 60, 4, method="fast")


def test_frob2_matches_float64_sum_without_copy():
    W = torch.randn(37, 53)
    ref = float(W.double().pow(2).sum())
    assert la.frob2(W) == pytest.approx(ref, rel=1e-12)
    assert la.frob2(W, chunk=7) == pytest.approx(ref, rel=1e-12)  # many chunks
    assert la.frob2(torch.randn(3, 4, 5)) > 0  # batched input


def test_short_wide_svd_is_an_svd():
    B = torch.randn(12, 200, dtype=torch.float64)
    U, S, Vh = la._short_wide_svd(B)
    assert torch.allclose((U * S) @ Vh, B, atol=1e-12)
    assert torch.allclose(Vh @ Vh.T, torch.eye(12, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(S, torch.linalg.svdvals(B), atol=1e-12)


def test_top_svd_randomized_close_to_exact(monkeypatch):
    W = powerlaw(120, 200)
    U0, S0, V0, info0 = la.top_svd(W, 10)
    assert info0["svd"] == "exact"
    monkeypatch.setattr(la, "RANDOMIZED_MIN_ENTRIES", 1000)
    U, S, V, info = la.top_svd(W, 10, seed=1)
    assert info == {"svd": "randomized", "oversample": 10, "power_iters": 2, "seed": 1}
    # stated tolerance: leading singular values within 0.5 %, error within 0.1 % of optimal
    assert torch.allclose(S, S0, rtol=5e-3)
    e0 = torch.linalg.norm(W - (U0 * S0) @ V0)
    e = torch.linalg.norm(W - (U * S) @ V)
    assert e <= e0 * 1.001
    # batched: one record, every matrix close to its exact truncation
    Wb = torch.stack([W, 2 * W])
    Ub, Sb, Vb, infob = la.top_svd(Wb, 10)
    assert infob["svd"] == "randomized" and Sb.shape == (2, 10)
    assert torch.allclose(Sb[1], 2 * S0, rtol=5e-3)


# ------------------------------------------------------------------------- projections
@pytest.mark.parametrize(
    "fmt, budget, opts",
    [("lowrank", 0.2, {}), ("blocklowrank", 0.1, {"grid": (2, 2)}),
     ("monarch", 0.2, {"blocks": (2, 2)})],
)
def test_projection_switches_to_randomized_above_threshold(monkeypatch, fmt, budget, opts):
    W = powerlaw(128, 192)
    exact = ga.project(W, fmt, budget, **opts)
    assert exact.info["svd"] == "exact"
    monkeypatch.setattr(la, "RANDOMIZED_MIN_ENTRIES", 1000)
    rnd = ga.project(W, fmt, budget, **opts)
    assert rnd.info["svd"] == "randomized"
    assert rnd.flops <= exact.info["budget_macs"]
    # stated tolerance: within 1 % (relative) of the exact projection's error
    assert rel(W, rnd) <= 1.01 * rel(W, exact)


def test_lowrank_explicit_exact_is_optimal_even_when_large(monkeypatch):
    monkeypatch.setattr(la, "RANDOMIZED_MIN_ENTRIES", 1000)
    W = powerlaw(64, 96)
    A = ga.project(W, "lowrank", 0.25, method="exact")
    s = torch.linalg.svdvals(W)
    r = A.rank
    assert A.info["svd"] == "exact"
    assert rel(W, A) == pytest.approx(math.sqrt(float(s[r:].pow(2).sum() / s.pow(2).sum())),
                                      rel=1e-9)


def test_blocklowrank_cap_grows_for_a_block_that_needs_more(monkeypatch):
    # one block holds all the energy: its randomized cap (2 x mean rank + 8) is too small at
    # first and must be enlarged until the allocation no longer saturates it
    g = torch.Generator().manual_seed(0)
    W = 1e-3 * torch.randn(320, 320, generator=g, dtype=torch.float64)
    W[:160, :160] += powerlaw(160, 160, alpha=0.3)
    exact = ga.project(W, "blocklowrank", 0.1, grid=(2, 2))
    monkeypatch.setattr(la, "RANDOMIZED_MIN_ENTRIES", 100)
    A = ga.project(W, "blocklowrank", 0.1, grid=(2, 2))
    # mean rank 10240 / (4 * 320) = 8, first cap 2 * 8 + 8 = 24; block (0, 0) needs more
    assert A.info["svd"] == "randomized" and max(A.info["rank_caps"]) > 24
    assert rel(W, A) <= 1.01 * rel(W, exact)


# -------------------------------------------------------------------------------- BLAST
@pytest.mark.parametrize("shape, blocks, kw", [
    ((96, 128), (4, 4), {}),
    ((90, 130), (3, 4), {}),  # uneven splits: padded copies in the frugal layout too
    ((96, 128), (4, 4), {"prune": 0.002}),
    ((64, 64), (2, 2), {"init": "random"}),
])
def test_blast_frugal_layout_equals_batched(monkeypatch, shape, blocks, kw):
    W = powerlaw(*shape, alpha=0.5)
    a = ga.project(W, "blast", 0.3, blocks=blocks, steps=12, **kw)
    monkeypatch.setattr(fit_blast, "FRUGAL_MIN_ENTRIES", 1000)
    # small chunks: force several block-row / block-column chunks
    b = ga.project(W, "blast", 0.3, blocks=blocks, steps=12, **kw)
    assert a.rank == b.rank
    assert torch.allclose(a.to_dense(), b.to_dense(), atol=1e-10 * float(W.abs().max()))
    assert b.info["rel_error"] == pytest.approx(a.info["rel_error"], rel=1e-10)


def test_blast_frugal_records_layout_and_svd(low_threshold):
    W = powerlaw(96, 160, alpha=0.5, dtype=torch.float32)
    res = fit_blast.fit_blast_factors(W, 12, fit_blast.balanced_splits(96, 4),
                                      fit_blast.balanced_splits(160, 4), steps=5)
    assert res.info["layout"] == "frugal" and res.info["init_svd"] == "randomized"
    assert len(res.info["chunks"]) == 2
    # the loss tracked from Gram identities equals the dense error of the returned factors
    B = ga.BLAST(res.U, res.V, res.S)
    assert rel(W, B) == pytest.approx(res.rel_error, rel=1e-3)


def test_blast_frugal_chunking_is_exercised(monkeypatch):
    # with FRUGAL_MIN_ENTRIES = 1 the chunk caps (m n / 4 entries) split the work
    monkeypatch.setattr(fit_blast, "FRUGAL_MIN_ENTRIES", 1)
    W = powerlaw(64, 96, alpha=0.5)
    res = fit_blast.fit_blast_factors(W, 20, fit_blast.balanced_splits(64, 4),
                                      fit_blast.balanced_splits(96, 4), steps=3)
    assert res.info["chunks"][0] > 1 and res.info["chunks"][1] > 1


# --------------------------------------------------------------------------------- GBLR
def test_fit_gblr_large_paths_close_to_exact(monkeypatch):
    W = powerlaw(96, 128, alpha=0.7)
    exact = ga.fit_gblr(W, 0.2, steps=3, progress=False)
    monkeypatch.setattr(la, "RANDOMIZED_MIN_ENTRIES", 1000)
    big = ga.fit_gblr(W, 0.2, steps=3, progress=False)
    assert big.matrix.flops <= big.budget
    assert big.rel_error <= 1.02 * exact.rel_error
    # the reported error is the true error of the returned matrix
    assert rel(W, big.matrix) == pytest.approx(big.rel_error, rel=1e-6)


def test_mixed_start_records_global_svd(monkeypatch):
    from gblr_approx.fit.gblr.mixed import lowrank_plus_blocks

    W = powerlaw(96, 128, alpha=0.7)
    model0, err0 = lowrank_plus_blocks(W, 3000, (4, 4), iters=3)
    assert model0.to_gblr().info["global_svd"] == "exact"
    monkeypatch.setattr(la, "RANDOMIZED_MIN_ENTRIES", 1000)
    model, err = lowrank_plus_blocks(W, 3000, (4, 4), iters=3)
    assert model.to_gblr().info["global_svd"] == "randomized"
    assert err <= 1.01 * err0
    assert model.rel_error() == pytest.approx(err, rel=1e-6)


def test_interval_model_own_residual_is_exact():
    from gblr_approx.fit.gblr.intervals import IntervalComponent, IntervalModel

    W = powerlaw(40, 50)
    c = IntervalComponent(3, 10, 5, 20, torch.randn(10, 1, dtype=W.dtype),
                          torch.randn(20, 1, dtype=W.dtype))
    a = IntervalModel(W, [c])
    scratch = W.clone()
    b = IntervalModel(scratch, [IntervalComponent(3, 10, 5, 20, c.U.clone(), c.V.clone())],
                      own=True)
    assert b.R is scratch and torch.equal(a.R, b.R)
    assert a.rel_error() == pytest.approx(b.rel_error(), rel=1e-12)


def test_residual_equals_dense_difference_with_wrapping_components():
    from gblr_approx.fit.gblr.pipeline import _residual

    g = torch.Generator().manual_seed(1)
    W = torch.randn(30, 40, generator=g, dtype=torch.float64)
    G = ga.GBLR((30, 40), [25, 0, 4], [10, 30, 3], [35, 2, 38], [12, 40, 5],
                [(torch.randn(10, 2, generator=g, dtype=W.dtype),
                  torch.randn(12, 2, generator=g, dtype=W.dtype)),
                 (torch.randn(30, 1, generator=g, dtype=W.dtype),
                  torch.randn(40, 1, generator=g, dtype=W.dtype)),
                 torch.randn(3, 5, generator=g, dtype=W.dtype)], dtype=W.dtype)
    assert bool(G.is_dense[2])
    R = _residual(W, G)
    assert torch.allclose(R, W - G.to_dense(), atol=1e-12)
    assert torch.equal(W, W.clone())  # W itself untouched


def test_fit_gblr_large_schedule(monkeypatch):
    import gblr_approx.fit.gblr.pipeline as pipe

    W = powerlaw(60, 80, alpha=0.5)
    full = ga.fit_gblr(W, 0.3, progress=False)
    assert full.info["schedule"] == {"large": False}
    assert len({h["stage"] for h in full.history}) > 3  # the many starts
    monkeypatch.setattr(pipe, "LARGE_MIN_ENTRIES", 1000)
    monkeypatch.setattr(pipe, "LARGE_SWEEP_WORK", 5 * 4800 * 10)
    res = ga.fit_gblr(W, 0.3, progress=False)
    stages = [h["stage"] for h in res.history]
    assert stages[0] == "init:lowrank" and set(stages[1:]) == {"intervals"}
    rank = int(0.3 * 60 * 80) // 140  # 10 rank-1 pieces of 60 x 80: 5 sweeps
    assert rank == 10 and len(stages) - 1 == 5 == res.matrix.info["steps"]
    assert res.info["schedule"]["sweeps"].startswith("5")
    assert res.info["schedule"]["price"] == "sigma_r of the low-rank start"
    lr = ga.project(W, "lowrank", 0.3)
    # never worse than its low-rank start (on this spectrum low rank is hard to beat)
    assert res.rel_error <= rel(W, lr) + 1e-12 and res.matrix.flops <= res.budget
    assert rel(W, res.matrix) == pytest.approx(res.rel_error, rel=1e-6)
    # given options win over the schedule
    res2 = ga.fit_gblr(W, 0.3, steps=2, grids=[(2, 2)], progress=False)
    stages2 = [h["stage"] for h in res2.history]
    assert "init:blocklowrank2x2" in stages2 and stages2.count("intervals") <= 2
    # proximal: the schedule sets the ALS sweeps, steps stay gradient steps
    res3 = ga.fit_gblr(W, 0.3, algorithm="proximal", steps=2, progress=False)
    assert res3.info["schedule"]["sweeps"].startswith("5")
    assert [h["stage"] for h in res3.history].count("intervals") == 5
    assert res3.rel_error <= res.rel_error + 1e-12


def test_large_sweeps_counts_piece_entries(monkeypatch):
    import gblr_approx.fit.gblr.pipeline as pipe

    G = ga.GBLR((10, 20), [0, 2], [10, 4], [0, 5], [20, 3],
                [(torch.ones(10, 3), torch.ones(20, 3)), torch.ones(4, 3)])
    monkeypatch.setattr(pipe, "LARGE_SWEEP_WORK", 3 * 200 * 4)
    assert pipe.large_sweeps(G) == 4  # 3 pieces of 10 x 20; the dense block is fixed
    monkeypatch.setattr(pipe, "LARGE_SWEEP_WORK", 1)
    assert pipe.large_sweeps(G) == 1
    monkeypatch.setattr(pipe, "LARGE_SWEEP_WORK", 10**12)
    assert pipe.large_sweeps(G) == 25


# --------------------------------------------------------------- BLAST steps="auto"
def test_blast_auto_steps_rule():
    from gblr_approx.fit.blast import pipeline as bp

    def grids(m, n):
        b = int(0.25 * m * n)
        return [(16, 16, b // (m + n + 256)), (4, 4, b // (m + n + 16))]

    for m, n in ((384, 384), (384, 1536), (1536, 384), (1024, 4096)):
        assert bp.auto_steps(m, n, grids(m, n)) == bp.AUTO_STEPS == 200
    s = bp.auto_steps(4096, 11008, grids(4096, 11008))
    per = sum(bp.iteration_macs(4096, 11008, r, a, b) for a, b, r in grids(4096, 11008))
    assert s == int(bp.AUTO_FIT_MACS // per) and bp.AUTO_MIN_STEPS <= s < 200
    assert s * per <= bp.AUTO_FIT_MACS < (s + 1) * per
    assert bp.auto_steps(10**5, 10**5, grids(10**5, 10**5)) == bp.AUTO_MIN_STEPS
    # 2 m n r + 6 (m + n) r^2 + (b1 b2 + b1 + b2) r^3 / 3
    assert bp.iteration_macs(10, 20, 3, 2, 2) == 2 * 200 * 3 + 6 * 30 * 9 + 8 * 27 // 3


def test_blast_auto_default_equals_200_steps_on_small_layers():
    W = powerlaw(48, 64, alpha=0.5, dtype=torch.float32)
    a = ga.project(W, "blast", 0.3, blocks=(4, 4))
    b = ga.project(W, "blast", 0.3, blocks=(4, 4), steps=200)
    assert a.info["steps"] == 200 and a.info["steps_rule"] == "auto"
    assert b.info["steps_rule"] == "given"
    assert torch.equal(a.to_dense(), b.to_dense())
    with pytest.raises(TypeError, match="steps"):
        ga.project(W, "blast", 0.3, steps="many")


def test_blast_auto_steps_budgeted(monkeypatch):
    from gblr_approx.fit.blast import pipeline as bp

    W = powerlaw(48, 64, alpha=0.5, dtype=torch.float32)
    monkeypatch.setattr(bp, "AUTO_FIT_MACS", 6e6)
    A = ga.project(W, "blast", 0.3)
    per = sum(bp.iteration_macs(48, 64, c["rank"], *c["blocks"]) for c in A.info["candidates"])
    assert A.info["steps"] == int(6e6 // per) < 200
    assert A.info["steps_rule"] == "auto (AUTO_FIT_MACS)"
    for c in A.info["candidates"]:
        assert c["steps_run"] <= A.info["steps"]
    assert A.info["rel_error"] <= A.info["history"][0] + 1e-7  # never above its SVD start
    assert rel(W, A) == pytest.approx(A.info["rel_error"], rel=1e-4)


# ------------------------------------------------------------------------- validation
def test_count_nonfinite_in_chunks_matches_whole(monkeypatch):
    from gblr_approx import validation

    W = torch.randn(37, 29)
    W[3, 4] = float("nan")
    W[20, 0] = float("inf")
    W[36, 28] = -float("inf")
    assert validation.count_nonfinite(W) == 3
    assert validation.count_nonfinite(W, chunk=50) == 3  # 1 row of 29 per piece
    assert validation.count_nonfinite(W[:, 1:], chunk=7) == 2  # a strided view
    assert validation.count_nonfinite(torch.randn(5, 6), chunk=4) == 0
    monkeypatch.setattr(validation, "FINITE_CHECK_CHUNK", 100)
    with pytest.raises(ValueError, match="3 NaN or Inf"):
        validation.as_matrix(W)


def test_lu_basis_spans_its_input():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 12, generator=g, dtype=torch.float64)
    B = la._lu_basis(X)
    assert B.shape == X.shape
    Q, _ = torch.linalg.qr(B)
    assert float(torch.linalg.norm(X - Q @ (Q.T @ X))) < 1e-10 * float(torch.linalg.norm(X))
    assert float(B.abs().max()) <= 1.0 + 1e-12  # partial pivoting: |L_ij| <= 1


@pytest.mark.parametrize("rank_of_W", [1, 5])
def test_randomized_svd_of_an_exactly_low_rank_matrix(rank_of_W):
    # the power iteration's sketch is then rank-deficient (rank(W) < rank + oversample):
    # lu_factor refused its exact zero pivot ("U[51,51] is zero"), e.g. for a layer whose
    # pruned output rows are zero
    g = torch.Generator().manual_seed(0)
    W = torch.zeros(200, 300)
    W[:rank_of_W] = torch.randn(rank_of_W, 300, generator=g)
    U, S, Vh = la.randomized_svd(W, 20, oversample=10, power_iters=2)
    assert torch.isfinite(U).all() and torch.isfinite(S).all() and torch.isfinite(Vh).all()
    assert torch.allclose(S[:rank_of_W], torch.linalg.svdvals(W)[:rank_of_W], rtol=1e-4)
    A = ga.project(W, "lowrank", 0.1, method="randomized")
    assert ga.relative_error(W, A) < 1e-5
