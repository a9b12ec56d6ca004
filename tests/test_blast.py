"""BLAST format: cost, product, transpose, save/load, fitting, and the batched SPD solves."""

from __future__ import annotations

import math

import pytest
import torch

import gblr_approx as ga
from gblr_approx.budget import InfeasibleBudgetError
from gblr_approx.fit.blast import balanced_splits, fit_blast_factors, spd_solve
from gblr_approx.formats.blast import BLAST


def random_blast(m, n, blocks, r, seed=0, dtype=torch.float64, splits=None):
    g = torch.Generator().manual_seed(seed)
    b1, b2 = blocks
    U = torch.randn(m, r, generator=g, dtype=dtype)
    V = torch.randn(n, r, generator=g, dtype=dtype)
    S = torch.randn(b1, b2, r, generator=g, dtype=dtype)
    rs, cs = splits if splits is not None else (None, None)
    return BLAST(U, V, S, rs, cs)


def dense_reference(A: BLAST) -> torch.Tensor:
    m, n = A.shape
    out = torch.zeros(m, n, dtype=A.dtype)
    rs, cs = A.row_splits, A.col_splits
    for i in range(A.blocks[0]):
        for j in range(A.blocks[1]):
            Ui = A.U[rs[i] : rs[i + 1]]
            Vj = A.V[cs[j] : cs[j + 1]]
            out[rs[i] : rs[i + 1], cs[j] : cs[j + 1]] = Ui @ torch.diag(A.S[i, j]) @ Vj.T
    return out


SHAPES = [
    (16, 24, (4, 4), 3),  # divisible
    (13, 22, (3, 5), 2),  # uneven blocks
    (7, 5, (7, 1), 4),  # one-row blocks, single block column
    (1, 9, (1, 3), 1),  # tiny
]


@pytest.mark.parametrize("m,n,blocks,r", SHAPES)
def test_cost_product_transpose_match_dense(m, n, blocks, r):
    A = random_blast(m, n, blocks, r)
    D = dense_reference(A)
    torch.testing.assert_close(A.to_dense(), D, rtol=1e-12, atol=1e-12)
    b1, b2 = blocks
    assert A.flops == r * (m + n + b1 * b2) == A.num_params
    assert A.flops == BLAST.cost(m, n, blocks, r)
    x = torch.randn(n, dtype=torch.float64)
    X = torch.randn(n, 3, dtype=torch.float64)
    torch.testing.assert_close(A @ x, D @ x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(A @ X, D @ X, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(A.T.to_dense(), D.T, rtol=1e-12, atol=1e-12)
    assert isinstance(A.T, BLAST) and A.T.flops == A.flops
    y = torch.randn(m, dtype=torch.float64)
    torch.testing.assert_close(y @ A, y @ D, rtol=1e-12, atol=1e-12)


def test_balanced_splits_and_explicit_splits():
    assert balanced_splits(10, 3) == [0, 4, 7, 10]
    assert balanced_splits(8, 4) == [0, 2, 4, 6, 8]
    with pytest.raises(ValueError):
        balanced_splits(3, 4)
    A = random_blast(10, 9, (2, 3), 2, splits=([0, 1, 10], [0, 2, 3, 9]))
    torch.testing.assert_close(A.to_dense(), dense_reference(A))
    x = torch.randn(9, 2, dtype=torch.float64)
    torch.testing.assert_close(A @ x, dense_reference(A) @ x)
    with pytest.raises(ValueError, match="row_splits"):
        random_blast(10, 9, (2, 3), 2, splits=([0, 5, 9], None))
    with pytest.raises(ValueError, match="strictly increasing"):
        random_blast(10, 9, (2, 3), 2, splits=([0, 0, 10], None))


def test_save_load_bit_exact(tmp_path):
    A = random_blast(13, 22, (3, 5), 2, dtype=torch.float32)
    A.info = {"note": "x"}
    path = A.save(tmp_path / "a.safetensors")
    B = ga.load(path)
    assert isinstance(B, BLAST)
    assert B.row_splits == A.row_splits and B.col_splits == A.col_splits
    for k in ("U", "V", "S"):
        assert torch.equal(getattr(A, k), getattr(B, k))
    assert B.info == {"note": "x"}
    C = A.to(dtype=torch.float64)
    assert C.dtype == torch.float64 and C.blocks == (3, 5)


def test_constructor_errors():
    with pytest.raises(ValueError, match="share r"):
        BLAST(torch.zeros(4, 2), torch.zeros(5, 3), torch.zeros(2, 2, 2))
    with pytest.raises(ValueError, match="b1 <= m"):
        BLAST(torch.zeros(2, 1), torch.zeros(5, 1), torch.zeros(3, 1, 1))


def test_from_lowrank_is_exact():
    g = torch.Generator().manual_seed(1)
    L = ga.LowRank(torch.randn(11, 3, generator=g, dtype=torch.float64),
                   torch.randn(7, 3, generator=g, dtype=torch.float64))
    B = BLAST.from_lowrank(L, blocks=(2, 3))
    torch.testing.assert_close(B.to_dense(), L.to_dense(), rtol=1e-12, atol=1e-12)
    assert B.flops == 3 * (11 + 7 + 6)


def _svd_error(W, r):
    s = torch.linalg.svdvals(W.to(torch.float64))
    return float(torch.sqrt((s[r:] ** 2).sum() / (s**2).sum()))


def test_recovers_exact_blast_matrix():
    A = random_blast(48, 40, (4, 4), 4, seed=3)
    W = A.to_dense()
    fit = ga.project(W, "blast", A.flops, blocks=(4, 4))
    assert isinstance(fit, BLAST) and fit.flops <= A.flops and fit.rank == 4
    err = ga.relative_error(W, fit)
    assert err < 1e-3, err
    assert math.isclose(err, fit.info["rel_error"], rel_tol=1e-3, abs_tol=1e-6)


def test_recovers_exact_blast_uneven_blocks():
    A = random_blast(30, 27, (4, 4), 3, seed=5)  # 30 = 8+8+7+7, 27 = 7+7+7+6
    W = A.to_dense()
    fit = ga.project(W, "blast", A.flops, blocks=(4, 4), steps=400)
    assert ga.relative_error(W, fit) < 1e-3


def test_never_worse_than_truncated_svd_and_budget_on_minilm():
    W = ga.datasets.minilm_sample()["encoder.layer.0.attention.self.query.weight"][:96, :128]
    W = W.to(torch.float64)
    m, n = W.shape
    for frac in (0.1, 0.3):
        A = ga.project(W, "blast", frac, blocks=(4, 4), steps=60)
        budget = ga.resolve_budget(frac, m, n)
        assert A.flops <= budget
        r = A.rank
        assert r == budget // (m + n + 16)
        err = ga.relative_error(W, A)
        assert err <= _svd_error(W, r) + 1e-9
        # the history starts at the SVD and the returned iterate is its minimum
        h = A.info["history"]
        assert math.isclose(h[0], _svd_error(W, r), rel_tol=1e-6)
        assert math.isclose(min(h), A.info["rel_error"], rel_tol=1e-12)
        assert math.isclose(err, A.info["rel_error"], rel_tol=1e-4)


def test_auto_blocks_keeps_best_candidate():
    W = torch.randn(64, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    A = ga.project(W, "blast", 0.3, steps=20)
    cands = A.info["candidates"]
    assert sorted(c["blocks"] for c in cands) == [[4, 4], [16, 16]]
    assert cands[0]["blocks"] == [16, 16] and cands[0]["steps_run"] == 20
    best = min(cands, key=lambda c: c["rel_error"])
    assert A.info["blocks"] == best["blocks"]
    # too small for 16 x 16: only 4 x 4 is tried
    B = ga.project(W[:10, :12], "blast", 0.9, steps=5)
    assert B.blocks == (4, 4) and "candidates" not in B.info


def test_shared_svd_start_equals_the_fit_own_start():
    """``svd=`` (triplets of the matrix itself, computed once for all grids of
    ``blocks="auto"``) gives the fit its own SVD start: the same iterates; too few triplets
    are refused."""
    from gblr_approx.linalg import top_svd

    W = 3.0 * torch.randn(40, 36, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    rs, cs = balanced_splits(40, 4), balanced_splits(36, 4)
    own = fit_blast_factors(W, 5, rs, cs, steps=6)
    shared = fit_blast_factors(W, 5, rs, cs, steps=6, svd=top_svd(W, 9))  # more than needed
    torch.testing.assert_close(shared.U @ shared.V.T, own.U @ own.V.T, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(shared.S, own.S, rtol=1e-9, atol=1e-9)
    assert [h["rel_error"] for h in shared.history] == pytest.approx(
        [h["rel_error"] for h in own.history], rel=1e-9)
    with pytest.raises(ValueError, match="singular triplets"):
        fit_blast_factors(W, 5, rs, cs, steps=1, svd=top_svd(W, 3))


def test_budget_and_option_errors():
    W = torch.randn(20, 30)
    with pytest.raises(InfeasibleBudgetError, match="smallest feasible budget is 66"):
        ga.project(W, "blast", 10, blocks=(4, 4))
    with pytest.raises(ValueError, match="b1 <= m"):
        ga.project(W, "blast", 0.5, blocks=(21, 2))
    with pytest.raises(InfeasibleBudgetError):
        ga.project(W, "blast", 100, blocks=(2, 2), rank=5)
    with pytest.raises(ValueError, match="damping"):
        ga.project(W, "blast", 0.5, blocks=(2, 2), damping=-1.0)
    with pytest.raises(ValueError, match="init"):
        ga.project(W, "blast", 0.5, blocks=(2, 2), init="zeros")
    with pytest.raises(TypeError, match="blocks"):
        ga.project(W, "blast", 0.5, blocks="4x4")
    assert BLAST.min_budget(20, 30, blocks=(4, 4)) == 66


def test_prune_drops_ranks_and_lowers_cost():
    A = random_blast(40, 40, (4, 4), 2, seed=7)
    W = A.to_dense()
    fit = ga.project(W, "blast", 8 * 96, blocks=(4, 4), prune=0.3, steps=200)
    assert fit.rank < 8 and fit.flops < 8 * 96
    assert ga.relative_error(W, fit) < 0.1
    assert fit.info["pruned_ranks"] == 8 - fit.rank


def test_divergent_steps_return_best_finite_iterate():
    W = torch.randn(32, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    A = ga.project(W, "blast", 0.4, blocks=(4, 4), lr=1e6, damping=0.0, steps=30)
    assert torch.isfinite(A.to_dense()).all()
    assert ga.relative_error(W, A) <= _svd_error(W, A.rank) + 1e-9


def test_history_callback_and_progress_silent(capsys):
    W = torch.randn(24, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    seen = []
    A = ga.project(W, "blast", 0.5, blocks=(2, 2), steps=10,
                   callback=lambda t, e: seen.append((t, e)) or t >= 5)
    assert [t for t, _ in seen] == [1, 2, 3, 4, 5]
    assert A.info["stopped"] == "callback" and len(A.info["history"]) == 6
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("size", [160, 200])
def test_batched_cholesky_solves_large_systems(size):
    """The preconditioner solves at > 150 with a batch >= 2 (LU is broken there on 2.13)."""
    g = torch.Generator().manual_seed(size)
    batch, k = 3, 400
    X = torch.randn(batch, size, size + 20, generator=g)
    P = X @ X.mT / size  # SPD, float32 as in a real fit
    G = torch.randn(batch, size, k, generator=g)
    eps = 0.05
    sol = spd_solve(P, G, eps)
    assert torch.isfinite(sol).all()
    eye = torch.eye(size, dtype=torch.float64)
    for b in range(batch):
        Pd = P[b].double() + eps * eye
        ref = torch.linalg.solve(Pd, G[b].double())  # one system at a time, float64
        rel = torch.linalg.norm(sol[b].double() - ref) / torch.linalg.norm(ref)
        assert rel < 1e-3, float(rel)
        res = torch.linalg.norm(Pd @ sol[b].double() - G[b].double()) / torch.linalg.norm(G[b])
        assert res < 1e-4, float(res)


def test_fit_at_preconditioner_sizes_above_150_is_finite():
    """A fit whose r x r solves are > 150 with batches of 4 (the 50 % case of a large layer)."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(400, 340, generator=g)
    res = fit_blast_factors(W, 160, balanced_splits(400, 4), balanced_splits(340, 4), steps=4)
    assert res.stopped == "completed"
    assert all(math.isfinite(h["rel_error"]) for h in res.history)
    assert res.rel_error <= _svd_error(W, 160) + 1e-4


def test_fit_blast_returns_a_fit_result_like_fit_gblr():
    from gblr_approx.fit.blast import fit_blast

    W = torch.randn(30, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    res = fit_blast(W, 300, blocks=(2, 2), steps=8)
    assert isinstance(res, ga.FitResult) and isinstance(res.matrix, BLAST)
    assert res.budget == 300 and res.matrix.flops <= 300
    assert len(res.history) == 9 and res.history[0]["step"] == 0
    h = res.history[-1]
    assert {"step", "stage", "rel_error", "loss", "flops", "seconds"} <= set(h)
    assert h["stage"] == "blast:2x2"
    assert math.isclose(res.rel_error, ga.relative_error(W, res.matrix), rel_tol=1e-6)


# ------------------------------------------------- hunt s9 (formats): extreme scales
@pytest.mark.parametrize("s", [1e20, 1e-25])
def test_fit_blast_at_extreme_scales(s):
    W0 = torch.randn(16, 16, generator=torch.Generator().manual_seed(0))
    from gblr_approx.fit import fit_blast

    ref = fit_blast(W0, 128, steps=5)
    R = fit_blast(W0 * s, 128, steps=5)  # was ZeroDivisionError (1e20) / zeros (1e-25)
    assert bool(torch.isfinite(R.matrix.to_dense()).all())
    assert R.rel_error == pytest.approx(ref.rel_error, abs=1e-4)
    assert ga.relative_error(W0 * s, R.matrix) == pytest.approx(ref.rel_error, abs=1e-4)
