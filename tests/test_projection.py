"""Optimal projections onto low-rank, block-sparse, block-low-rank and Monarch matrices."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from catalogue import build_blocklowrank, build_blocksparse, build_monarch

import gblr_approx as ga

SHAPES = [(40, 40), (36, 52), (53, 29)]


def rand(m, n, seed=0, dtype=torch.float64):
    return torch.randn(m, n, dtype=dtype, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ low-rank
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("budget", [0.1, 0.25, 0.5, 1000])
def test_lowrank_eckart_young(shape, budget):
    W = rand(*shape)
    A = ga.project(W, "lowrank", budget)
    m, n = shape
    b = ga.resolve_budget(budget, m, n)
    r = min(b // (m + n), m, n)
    assert A.rank == r and A.flops == r * (m + n) <= b
    s = torch.linalg.svdvals(W)
    err2 = torch.linalg.norm(W - A.to_dense()) ** 2
    expected = (s[r:] ** 2).sum()
    assert abs(float(err2 / expected) - 1) < 1e-6
    # spectral error is sigma_{r+1}
    assert ga.relative_error(W, A, ord=2) == pytest.approx(float(s[r] / s[0]), rel=1e-6)


def test_lowrank_randomized_close_to_exact():
    # decaying spectrum, as in trained weights
    U, _ = torch.linalg.qr(rand(200, 200, 1))
    V, _ = torch.linalg.qr(rand(120, 120, 2))
    s = torch.logspace(0, -3, 120, dtype=torch.float64)
    W = U[:, :120] @ torch.diag(s) @ V.T
    exact = ga.relative_error(W, ga.project(W, "lowrank", 0.25))
    rnd = ga.project(W, "lowrank", 0.25, method="randomized", power_iters=2, seed=3)
    assert rnd.info["power_iters"] == 2 and rnd.info["seed"] == 3
    assert ga.relative_error(W, rnd) <= exact * 1.01
    again = ga.project(W, "lowrank", 0.25, method="randomized", power_iters=2, seed=3)
    assert torch.equal(again.U, rnd.U)  # seeded: reproducible


def test_lowrank_fixed_rank_and_numpy_input():
    W = rand(30, 20).numpy()
    A = ga.project(W, "lowrank", 1.0, rank=4)
    assert A.rank == 4 and isinstance(A.U, torch.Tensor)
    with pytest.raises(ValueError, match="rank"):
        ga.project(W, "lowrank", 100, rank=4)  # needs 200 MACs


# ------------------------------------------------------- exact recovery
def _recover(A, fmt, **options):
    W = A.to_dense()
    P = ga.project(W, fmt, A.flops, **options)
    assert P.flops <= A.flops
    return ga.relative_error(W, P)


@pytest.mark.parametrize("shape", [(40, 40), (36, 52), (53, 29), (7, 3)])
def test_recover_lowrank(shape):
    m, n = shape
    r = min(m, n) // 3 or 1
    g = torch.Generator().manual_seed(5)
    A = ga.LowRank(
        torch.randn(m, r, generator=g, dtype=torch.float64),
        torch.randn(n, r, generator=g, dtype=torch.float64),
    )
    assert _recover(A, "lowrank") <= 1e-10


@pytest.mark.parametrize("shape", [(40, 40), (36, 52), (53, 29)])
def test_recover_blocksparse_ragged(shape):
    A = build_blocksparse(shape, torch.float64, torch.Generator().manual_seed(2))
    assert shape[0] % A.block_shape[0] or shape[1] % A.block_shape[1]  # ragged on purpose
    assert _recover(A, "blocksparse", block_shape=A.block_shape) <= 1e-12


@pytest.mark.parametrize("shape", [(40, 40), (36, 52), (53, 29)])
def test_recover_blocklowrank(shape):
    A = build_blocklowrank(shape, torch.float64, torch.Generator().manual_seed(3))
    assert _recover(A, "blocklowrank", grid=A.grid) <= 1e-10


@pytest.mark.parametrize("shape", [(48, 48), (36, 52), (24, 60), (30, 45)])
def test_recover_monarch(shape):
    A = build_monarch(shape, torch.float64, torch.Generator().manual_seed(4))
    assert _recover(A, "monarch", blocks=(A.out_blocks, A.in_blocks)) <= 1e-10
    assert _recover(A, "monarch", blocks=(A.out_blocks, A.in_blocks), rank=A.rank) <= 1e-10


def test_monarch_projection_error_is_discarded_slice_energy():
    W = rand(32, 16, 7)
    A = ga.project(W, "monarch", 0.5, blocks=4, rank=1)
    slices = W.reshape(8, 4, 4, 4).permute(2, 1, 0, 3)  # (K, J, Lr, I)
    s = torch.linalg.svdvals(slices)
    expected = (s[..., 1:] ** 2).sum()
    assert float(torch.linalg.norm(W - A.to_dense()) ** 2 / expected) == pytest.approx(1, rel=1e-9)
    assert A.flops == 1 * 4 * (32 + 16)


def test_monarch_picks_largest_cost_that_fits():
    W = rand(64, 64, 1)
    A = ga.project(W, "monarch", 0.25)
    assert A.flops <= 1024
    # nothing feasible costs more
    for nb in (2, 4, 8, 16, 32, 64):
        R = min(1024 // (nb * 128), 64 // nb)
        assert R * nb * 128 <= A.flops or R < 1


def test_monarch_infeasible_names_valid_blocks():
    W = rand(12, 20, 2)
    with pytest.raises(ga.InfeasibleBudgetError, match="smallest feasible budget") as exc:
        ga.project(W, "monarch", 10)
    assert exc.value.min_budget == min(J * 20 + K * 12 for J, K in [(2, 2), (4, 4)])
    with pytest.raises(ValueError, match="blocks=5"):
        ga.project(W, "monarch", 0.5, blocks=5)


# ------------------------------------------------------- block-sparse details
def test_blocksparse_keeps_heaviest_blocks():
    W = rand(64, 64, 3)
    W[:32, :32] *= 10
    A = ga.project(W, "blocksparse", 32 * 32, block_shape=32)
    assert A.num_blocks == 1 and (int(A.block_rows[0]), int(A.block_cols[0])) == (0, 0)
    B = ga.project(W, "blocksparse", 0.5, block_shape=(16, 16))
    energies = W.reshape(4, 16, 4, 16).pow(2).sum(dim=(1, 3)).flatten()
    kept = set((B.block_rows * 4 + B.block_cols).tolist())
    assert kept == set(torch.topk(energies, 8).indices.tolist())


def test_blocklowrank_greedy_equals_global_top_singular_values():
    W = rand(40, 40, 9)
    A = ga.project(W, "blocklowrank", 0.3, grid=(4, 4))
    s = torch.linalg.svdvals(W.reshape(4, 10, 4, 10).permute(0, 2, 1, 3)).flatten()
    k = A.flops // 20
    expected = s.pow(2).sum() - torch.topk(s, k).values.pow(2).sum()
    err2 = torch.linalg.norm(W - A.to_dense()) ** 2
    assert float(err2 / expected) == pytest.approx(1, rel=1e-9)


@pytest.mark.parametrize("fmt", ["lowrank", "blocksparse", "blocklowrank", "monarch"])
@pytest.mark.parametrize("budget", [0.1, 0.25, 0.5])
def test_budget_respected_on_real_weights(fmt, budget):
    for name, W in list(ga.datasets.minilm_sample().items())[::2]:
        A = ga.project(W, fmt, budget)
        assert A.flops <= ga.resolve_budget(budget, *W.shape), name
        assert A.dtype == torch.float32
        err = ga.relative_error(W, A)
        assert 0 < err < 1


def test_real_weights_ordering_sanity():
    W = ga.datasets.minilm_sample()["encoder.layer.0.attention.self.query.weight"]
    errs = [ga.relative_error(W, ga.project(W, "lowrank", b)) for b in (0.1, 0.25, 0.5)]
    assert errs[0] > errs[1] > errs[2]
    # published reference (math.md issue 4 table): truncated SVD on L0 query
    assert errs == pytest.approx([0.823, 0.657, 0.463], abs=2e-3)


def test_half_precision_is_computed_in_float32():
    W = rand(20, 30, 1).to(torch.float16)
    A = ga.project(W, "lowrank", 0.5)
    assert A.dtype == torch.float32
    W = rand(20, 30, 1).to(torch.bfloat16)
    assert ga.project(W, "monarch", 0.5).dtype == torch.float32


def test_warns_when_result_costs_more_than_dense():
    W = rand(10, 10)
    with pytest.warns(UserWarning, match="more than the dense"):
        ga.project(W, "lowrank", 10_000)


def test_minilm_sample_contents():
    S = ga.datasets.minilm_sample()
    shapes = {k: tuple(v.shape) for k, v in S.items()}
    assert shapes["encoder.layer.0.intermediate.dense.weight"] == (1536, 384)
    assert shapes["encoder.layer.0.output.dense.weight"] == (384, 1536)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in S.values())
    assert float(np.mean([v.std() for v in S.values()])) > 0.01


def test_blocklowrank_buys_no_rank_beyond_the_numerical_rank():
    A = build_blocklowrank((36, 52), torch.float64, torch.Generator().manual_seed(3))
    P = ga.project(A.to_dense(), "blocklowrank", 2 * A.flops, grid=A.grid)
    assert P.flops == A.flops
    assert torch.equal(P.ranks, A.ranks)


def test_svd_retries_when_lapack_does_not_converge(monkeypatch):
    # gesdd sometimes reports non-convergence on finite input (MKL, one thread): the helper
    # retries in float64, then with gesvd, and returns W's dtype
    from gblr_approx import linalg

    gen = torch.Generator().manual_seed(0)
    W = torch.randn(2, 30, 12, generator=gen)
    real = torch.linalg.svd
    for failures in (1, 2):
        calls = []

        def flaky(A, *args, _left=[failures], _calls=calls, **kwargs):  # noqa: B006
            _calls.append(A.dtype)
            if _left[0] > 0:
                _left[0] -= 1
                raise torch.linalg.LinAlgError("did not converge")
            return real(A, *args, **kwargs)

        monkeypatch.setattr(torch.linalg, "svd", flaky)
        U, S, Vh = linalg.svd(W)
        monkeypatch.setattr(torch.linalg, "svd", real)
        assert U.dtype == S.dtype == Vh.dtype == torch.float32
        assert (U.shape, S.shape, Vh.shape) == ((2, 30, 12), (2, 12), (2, 12, 12))
        assert torch.allclose(U @ torch.diag_embed(S) @ Vh, W, atol=1e-5)
        assert torch.allclose(S, torch.linalg.svdvals(W), atol=1e-5)
        assert calls[1] == torch.float64  # the first retry is in float64
        assert len(calls) == min(failures, 2) + (failures < 2)
    monkeypatch.setattr(
        torch.linalg, "svd", lambda *a, **k: (_ for _ in ()).throw(torch.linalg.LinAlgError("x"))
    )
    with pytest.raises(ValueError, match="NaN or infinite"):
        linalg.svd(torch.full((3, 3), float("nan")))


def _failing_first_svds(monkeypatch, failures):
    """torch.linalg.svd raising LinAlgError on its first ``failures`` calls (as gesdd can)."""
    real, left = torch.linalg.svd, [failures]

    def flaky(A, *args, **kwargs):
        if left[0] > 0:
            left[0] -= 1
            raise torch.linalg.LinAlgError("did not converge")
        return real(A, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", flaky)


def test_svd_retries_are_recorded(monkeypatch):
    # users.md 8/9: no silent backend switch; the retries reach the result's info record
    from gblr_approx import linalg

    W = rand(12, 9, seed=1, dtype=torch.float32)
    with linalg.recording_svd_fallbacks() as outer:
        _failing_first_svds(monkeypatch, 1)
        with linalg.recording_svd_fallbacks() as inner:
            linalg.svd(W)
        _failing_first_svds(monkeypatch, 2)
        linalg.svd(W)
    assert inner == ["svd: gesdd did not converge on a (12, 9) float32 input; recomputed in "
                     "float64"]
    assert outer == inner + ["svd: gesdd did not converge on a (12, 9) float32 input, nor in "
                             "float64; recomputed with the gesvd driver"]
    assert linalg.fallback_summary(inner * 3 + outer[1:]) == [
        inner[0] + " (x3)", outer[1]]
    monkeypatch.undo()
    linalg.svd(W)  # outside a block: nothing recorded, nothing raised
    assert len(outer) == 2

    W = rand(16, 16, seed=2, dtype=torch.float32)
    clean = ga.project(W, "monarch", 0.5)
    assert "svd_fallbacks" not in clean.info
    _failing_first_svds(monkeypatch, 1)
    A = ga.project(W, "monarch", 0.5)
    monkeypatch.undo()
    [msg] = A.info["svd_fallbacks"]  # (Monarch's batched block SVD)
    assert msg.startswith("svd: gesdd did not converge on a (") and msg.endswith(
        " float32 input; recomputed in float64")
    assert torch.allclose(A.to_dense(), clean.to_dense(), atol=1e-5)

    _failing_first_svds(monkeypatch, 1)
    res = ga.fit_gblr(W, 0.5, steps=2)
    monkeypatch.undo()
    assert len(res.info["svd_fallbacks"]) == 1
    assert res.matrix.info["svd_fallbacks"] == res.info["svd_fallbacks"]


# ------------------------------------------------- hunt s9 (formats): projections
_SCALE_FORMATS = [("lowrank", {}), ("blocksparse", {}), ("blocklowrank", {}), ("monarch", {}),
                  ("gblr", {"steps": 2}), ("blast", {"steps": 4})]


@pytest.mark.parametrize(("fmt", "opts"), _SCALE_FORMATS, ids=[f for f, _ in _SCALE_FORMATS])
def test_projections_are_scale_invariant(fmt, opts):
    W0 = rand(16, 24, seed=3, dtype=torch.float32)
    ref = ga.project(W0, fmt, 0.5, **opts)
    D0, e0 = ref.to_dense(), ga.relative_error(W0, ref)
    # a power of two: the rescaled fit is the scale-1 fit, exactly
    A = ga.project(W0 * 2.0**70, fmt, 0.5, **opts)
    assert torch.equal(A.to_dense() / 2.0**70, D0)
    # squares of these entries over- or underflow float32 (GBLR used to return inf/NaN
    # factors, BLAST to raise ZeroDivisionError at 1e20 and return zeros at 1e-25)
    for s in (1e20, 1e-25):
        A = ga.project(W0 * s, fmt, 0.5, **opts)
        D = A.to_dense()
        assert bool(torch.isfinite(D).all())
        assert ga.relative_error(W0 * s, A) == pytest.approx(e0, abs=1e-4)
        torch.testing.assert_close(D / s, D0, rtol=1e-4, atol=1e-4 * float(D0.abs().max()))


def test_monarch_explicit_rank_above_slice_rank_is_refused():
    W = rand(16, 24)
    with pytest.raises(ValueError, match=r"rank must be <= min\(m/J, n/K\) = 8"):
        ga.project(W, "monarch", 8000, blocks=(2, 2), rank=100)  # was clamped to 8 silently
    with pytest.raises(ValueError, match=r"rank must be <= min\(m/J, n/K\) = 8"):
        ga.Monarch.min_budget(16, 24, blocks=(2, 2), rank=100)
    # the smallest feasible budget named for a rank that exists is the right one
    assert ga.Monarch.min_budget(16, 24, blocks=(2, 2), rank=8) == 8 * (2 * 24 + 2 * 16)
    with pytest.raises(ga.InfeasibleBudgetError, match="smallest feasible budget is 640 MACs"):
        ga.project(W, "monarch", 345, blocks=(2, 2), rank=8)
    with pytest.warns(UserWarning, match="more than the dense matrix"):
        assert ga.project(W, "monarch", 640, blocks=(2, 2), rank=8).flops == 640


@pytest.mark.parametrize(("shape", "expect"), [((32, 32), (8, 8)), ((16, 24), (4, 6)),
                                               ((3, 200), (1, 32)), ((128, 512), (32, 32))])
def test_blocksparse_default_block_shape_small_layers(shape, expect):
    from gblr_approx.formats.blocksparse import default_block_shape

    assert default_block_shape(*shape) == expect
    W = rand(*shape)
    A = ga.project(W, "blocksparse", 0.25)  # both sides <= 32 used to be one block: infeasible
    assert A.block_shape == expect and 0 < A.flops <= 0.25 * shape[0] * shape[1]


@pytest.mark.parametrize("shape", [(7, 13), (2, 3), (17, 23)])
def test_monarch_default_grid_falls_back_to_one_block_on_coprime_shapes(shape):
    # every grid with blocks costs more than the dense matrix here; blocks=None used to
    # refuse even budget 1.0 while blocks=(1, 1) fits
    W = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    m, n = shape
    A = ga.project(W, "monarch", 1.0)
    B = ga.project(W, "monarch", 1.0, blocks=(1, 1))
    assert A.flops == B.flops <= m * n
    assert torch.allclose(A.to_dense(), B.to_dense())
    assert ga.Monarch.min_budget(m, n) == m + n
    with pytest.raises(ga.InfeasibleBudgetError, match=f"smallest feasible budget is {m + n} "):
        ga.project(W, "monarch", m + n - 1)
