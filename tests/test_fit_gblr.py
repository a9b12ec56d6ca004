"""fit_gblr: budget always respected, never worse than the formats GBLR contains."""

from __future__ import annotations

import json

import pytest
import torch

import gblr_approx as ga
from gblr_approx.budget import InfeasibleBudgetError


def kernel_matrix(m, n, c=200.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(m, generator=gen, dtype=torch.float64).sort().values
    y = torch.rand(n, generator=gen, dtype=torch.float64).sort().values
    return 1.0 / (1.0 + c * (x[:, None] - y[None, :]).abs())


def best_contained_error(W, budget):
    m, n = W.shape
    errs = {}
    tries = [("lowrank", {})]
    tries += [("blocklowrank", {"grid": g}) for g in [(2, 2), (4, 4), (8, 8), (16, 16), (3, 4)]]
    tries += [("blocksparse", {"block_shape": b}) for b in [(8, 8), (16, 16), (4, 4)]]
    for fmt, opts in tries:
        try:
            A = ga.project(W, fmt, budget, **opts)
        except InfeasibleBudgetError:
            continue
        errs[f"{fmt}{opts}"] = ga.relative_error(W, A)
    return min(errs.values())


@pytest.mark.parametrize("kind", ["random", "kernel"])
@pytest.mark.parametrize("budget", [0.1, 0.25, 0.5])
def test_never_worse_than_contained_formats(kind, budget):
    m, n = 48, 64
    W = (
        kernel_matrix(m, n)
        if kind == "kernel"
        else torch.randn(m, n, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    )
    res = ga.fit_gblr(W, budget, progress=False)
    G = res.matrix
    assert isinstance(G, ga.GBLR)
    assert G.flops <= ga.resolve_budget(budget, m, n)
    err = ga.relative_error(W, G)
    assert abs(err - res.rel_error) < 1e-9
    best = best_contained_error(W, budget)
    assert err <= best + 1e-9
    if kind == "kernel" and budget == 0.1:  # hierarchical: block-low-rank >> low-rank here
        lr = ga.relative_error(W, ga.project(W, "lowrank", budget))
        assert best < lr / 2.5


def test_history_and_callback_and_project():
    W = torch.randn(40, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    seen = []
    res = ga.fit_gblr(W, 0.3, callback=seen.append, progress=False)
    assert len(seen) == len(res.history) > 3
    df = res.history_frame()
    assert {"step", "stage", "loss", "rel_error", "flops", "seconds"} <= set(df.columns)
    assert (df["flops"] <= res.budget).all()
    assert res.rel_error == pytest.approx(df["rel_error"].min())
    A = ga.project(W, "gblr", 0.3)
    assert isinstance(A, ga.GBLR) and A.flops <= res.budget
    assert ga.relative_error(W, A) == pytest.approx(res.rel_error, rel=1e-9)


def test_callback_can_stop():
    W = torch.randn(40, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    res = ga.fit_gblr(W, 0.3, callback=lambda rec: False, progress=False)
    assert len(res.history) == 1 and res.matrix.flops <= res.budget


def test_tiny_budget_still_feasible():
    W = torch.randn(10, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    res = ga.fit_gblr(W, 5, progress=False)
    assert 0 < res.matrix.flops <= 5
    assert res.rel_error < 1.0


def test_bad_arguments():
    W = torch.randn(8, 8)
    with pytest.raises(ValueError, match="budget"):
        ga.fit_gblr(W, 1.5)
    with pytest.raises(ValueError, match="algorithm"):
        ga.fit_gblr(W, 0.5, algorithm="magic")
    with pytest.raises(TypeError, match="unknown option"):
        ga.fit_gblr(W, 0.5, learning_rate=1)
    with pytest.raises(ValueError, match="rank_per_component"):
        ga.fit_gblr(W, 0.5, rank_per_component=0)
    with pytest.raises(ValueError, match="NaN"):
        ga.fit_gblr(torch.full((4, 4), float("nan")), 0.5)
    with pytest.raises(ValueError, match="grids"):
        ga.fit_gblr(W, 0.5, grids=[(9, 1)])


def test_best_cyclic_interval_matches_brute_force():
    from gblr_approx.fit.gblr.intervals import best_cyclic_interval

    gen = torch.Generator().manual_seed(0)
    for N in (1, 2, 5, 9):
        for _ in range(100):
            a = torch.randn(N, dtype=torch.float64, generator=gen)
            s, w, v = best_cyclic_interval(a)
            brute = max(
                [0.0]
                + [
                    float(sum(a[(st + k) % N] for k in range(wd)))
                    for st in range(N)
                    for wd in range(1, N + 1)
                ]
            )
            got = float(sum(a[(s + k) % N] for k in range(w)))
            assert abs(got - brute) < 1e-9 and abs(v - brute) < 1e-9


def test_best_cyclic_interval_with_min_width_matches_brute_force():
    from gblr_approx.fit.gblr.intervals import best_cyclic_interval

    gen = torch.Generator().manual_seed(1)
    for N in (1, 3, 7, 12):
        for L in sorted({1, 2, N // 2 or 1, N}):
            for _ in range(40):
                a = torch.randn(N, dtype=torch.float64, generator=gen) - 0.3
                s, w, v = best_cyclic_interval(a, min_width=L)
                brute = max(
                    [0.0]
                    + [
                        float(sum(a[(st + k) % N] for k in range(wd)))
                        for st in range(N)
                        for wd in range(min(L, N), N + 1)
                    ]
                )
                got = float(sum(a[(s + k) % N] for k in range(w)))
                assert abs(v - brute) < 1e-9 and abs(got - brute) < 1e-9
                assert w == 0 or min(L, N) <= w <= N


def test_min_width_fit_keeps_every_side_wide_and_beats_the_svd():
    W = ga.datasets.minilm_sample()["encoder.layer.0.attention.self.query.weight"][:96, :128]
    W = W.double()
    svd = ga.relative_error(W, ga.project(W, "lowrank", 0.3))
    free = ga.fit_gblr(W, 0.3, steps=8, progress=False)
    errs = {}
    for mw in (8, 24):
        res = ga.fit_gblr(W, 0.3, steps=8, min_width=mw, progress=False)
        G = res.matrix
        assert G.flops <= res.budget
        assert int(G.row_width.min()) >= mw and int(G.col_width.min()) >= mw
        assert res.rel_error == pytest.approx(ga.relative_error(W, G), rel=1e-9)
        assert res.rel_error < svd
        errs[mw] = res.rel_error
    # wider pieces are a constraint: never better than the free fit, here strictly worse
    assert free.rel_error <= errs[8] + 1e-9 and errs[8] < errs[24]
    same = ga.fit_gblr(W, 0.3, steps=8, min_width=1, progress=False)
    assert same.rel_error == free.rel_error


def test_min_width_errors_are_clear():
    W = torch.randn(40, 30, dtype=torch.float64)
    with pytest.raises(ValueError, match="min_width"):
        ga.fit_gblr(W, 0.5, min_width=31, progress=False)
    with pytest.raises(ValueError, match="min_width"):
        ga.fit_gblr(W, 0.5, min_width=0, progress=False)
    with pytest.raises(ValueError, match="proximal"):
        ga.fit_gblr(W, 0.5, min_width=4, algorithm="proximal", progress=False)
    with pytest.raises(ga.InfeasibleBudgetError, match="min_width"):
        ga.fit_gblr(W, 39, min_width=20, progress=False)  # a 20 x 20 rank-1 piece costs 40


def test_structure_learning_beats_svd_on_minilm_block():
    # a real weight block: interval ALS must clearly beat the truncated SVD at 50 %
    W = ga.datasets.minilm_sample()["encoder.layer.0.attention.self.query.weight"][:96, :128]
    W = W.double()
    res = ga.fit_gblr(W, 0.5, progress=False)
    svd = ga.relative_error(W, ga.project(W, "lowrank", 0.5))
    assert res.info["best_stage"] == "intervals"
    assert res.rel_error < 0.9 * svd
    assert res.matrix.flops <= res.budget


def test_proximal_algorithm_runs_within_budget():
    W = torch.randn(24, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    start = ga.fit_gblr(W, 0.3, steps=0, progress=False)
    res = ga.fit_gblr(W, 0.3, algorithm="proximal", steps=5, progress=False)
    prox = [h for h in res.history if h["stage"] == "proximal"]
    assert len(prox) == 5 and all(h["flops"] <= res.budget for h in prox)
    assert res.rel_error <= start.rel_error + 1e-12


def exact_gblr(m, n, seed, K=3):
    """A few overlapping low-rank blocks at random positions, the first one wrapped."""
    gen = torch.Generator().manual_seed(seed)
    rs, rw, cs, cw, fac = [], [], [], [], []
    for k in range(K):
        h = int(torch.randint(m // 4, 3 * m // 4, (1,), generator=gen))
        w = int(torch.randint(n // 4, 3 * n // 4, (1,), generator=gen))
        r0 = int(torch.randint(0, m, (1,), generator=gen))
        c0 = int(torch.randint(0, n, (1,), generator=gen))
        if k == 0:
            r0, c0 = m - h // 2, n - w // 3
        r = 1 + k % 2
        rs.append(r0)
        rw.append(h)
        cs.append(c0)
        cw.append(w)
        fac.append(
            (
                torch.randn(h, r, generator=gen, dtype=torch.float64),
                torch.randn(w, r, generator=gen, dtype=torch.float64),
            )
        )
    return ga.GBLR((m, n), rs, rw, cs, cw, fac)


@pytest.mark.parametrize("shape", [(48, 64), (48, 48)])
def test_recovers_exact_gblr_structure(shape):
    """Issue 3: median error < 0.05 over 10 seeds at the matrix's own cost."""
    import statistics

    errs = []
    for seed in range(10):
        G = exact_gblr(*shape, seed)
        res = ga.fit_gblr(G.to_dense(), G.flops, progress=False)
        assert res.matrix.flops <= G.flops
        errs.append(res.rel_error)
    assert statistics.median(errs) < 0.05
    assert sum(e < 1e-6 for e in errs) >= 3  # several structures found exactly


def test_support_start_yields_nothing_on_dense_data():
    from gblr_approx.fit.gblr.support import support_candidates

    W = torch.randn(30, 40, dtype=torch.float64)
    assert list(support_candidates(W, 600)) == []


def random_gblr(m, n, K, ranks, seed):
    """``K`` blocks with random cyclic intervals (sides m/5..m/2), the first one wrapping
    around both edges, the second overlapping it, ranks drawn from ``ranks``."""
    gen = torch.Generator().manual_seed(seed)
    rs, rw, cs, cw, fac = [], [], [], [], []
    for k in range(K):
        h = int(torch.randint(m // 5, m // 2 + 1, (1,), generator=gen))
        w = int(torch.randint(n // 5, n // 2 + 1, (1,), generator=gen))
        r0 = int(torch.randint(0, m, (1,), generator=gen))
        c0 = int(torch.randint(0, n, (1,), generator=gen))
        if k == 0:
            r0, c0 = m - h // 2, n - w // 3
        elif k == 1:  # overlaps the first one
            r0, c0 = (rs[0] + rw[0] // 2) % m, (cs[0] + cw[0] // 2) % n
        r = ranks[int(torch.randint(0, len(ranks), (1,), generator=gen))]
        rs.append(r0)
        rw.append(h)
        cs.append(c0)
        cw.append(w)
        fac.append(
            (
                torch.randn(h, r, generator=gen, dtype=torch.float64),
                torch.randn(w, r, generator=gen, dtype=torch.float64),
            )
        )
    return ga.GBLR((m, n), rs, rw, cs, cw, fac)


def test_generator_wraps_and_overlaps():
    G = random_gblr(128, 96, 4, [2], 0)
    assert int(G.row_start[0]) + int(G.row_width[0]) > 128  # wraps
    cover = torch.zeros(128, 96)
    for k in range(G.num_components):
        cover[G.row_indices(k)[:, None], G.col_indices(k)[None, :]] += 1
    assert float(cover.max()) >= 2  # overlaps


def test_recovers_random_wrapped_overlapping_structures():
    """Issue 11: four rank-2 blocks, 128 x 96, median error < 0.05 over 10 seeds."""
    import statistics

    errs = []
    for seed in range(10):
        G = random_gblr(128, 96, 4, [2], seed)
        res = ga.fit_gblr(G.to_dense(), G.flops, progress=False)
        assert res.matrix.flops <= G.flops
        errs.append(res.rel_error)
    assert statistics.median(errs) < 0.05


@pytest.mark.slow
@pytest.mark.parametrize(
    "shape,K,ranks",
    # 256x192 and 512x512: about 12 and 22 CPU seconds for the five seeds (the support
    # start's cover search runs on the cells between boundaries)
    [((96, 128), 2, [1, 3]), ((160, 120), 3, [1, 2]), ((256, 192), 4, [2]),
     ((512, 512), 3, [1, 2, 3])],
)
def test_recovers_random_structures_widely(shape, K, ranks):
    """Wider generator: shapes up to 512 x 512, mixed ranks, 5 seeds each; at least three
    recovered (error < 0.05) and none worse than the truncated SVD at the same cost."""
    good = 0
    for seed in range(5):
        G = random_gblr(*shape, K, ranks, 100 + seed)
        W = G.to_dense()
        res = ga.fit_gblr(W, G.flops, progress=False)
        assert res.matrix.flops <= G.flops
        good += res.rel_error < 0.05
        try:  # below one rank (m + n MACs) the truncated SVD does not exist
            svd = ga.project(W, "lowrank", G.flops)
        except ga.InfeasibleBudgetError:
            continue
        assert res.rel_error <= ga.relative_error(W, svd) + 1e-9
    assert good >= 3


def test_proximal_step0_is_the_start_and_params_roundtrip():
    from gblr_approx.fit.gblr.proximal import GaudiParams, proximal_gradient

    W = torch.randn(30, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    start = ga.fit_gblr(W, 0.4, progress=False).matrix
    p = GaudiParams.from_gblr(start, 1)
    assert torch.allclose(p.to_gblr().to_dense(), start.to_dense(), atol=1e-12)
    assert p.cost() == start.flops
    G0, err0, _, cost0, comps0 = next(proximal_gradient(W, start.flops, start, steps=3))
    assert comps0 == start.num_components
    assert G0 is start and cost0 == start.flops
    assert abs(err0 - ga.relative_error(W, start)) < 1e-12


def test_budget_projection_is_exact_and_minimal():
    from gblr_approx.fit.gblr.proximal import hard_cost, project_budget

    gen = torch.Generator().manual_seed(0)
    m, n, r = 40, 24, 2
    wo = torch.rand(12, generator=gen, dtype=torch.float64)
    wi = torch.rand(12, generator=gen, dtype=torch.float64)
    B = hard_cost(wo, wi, m, n, r) // 3
    po, pi = project_budget(wo, wi, m, n, r, B)
    assert hard_cost(po, pi, m, n, r) <= B
    # a common shift in entries: (wo - po) m == (wi - pi) n where not clamped
    tau = ((wo - po) * m)[po > 0]
    assert torch.allclose(tau, tau[0].expand_as(tau), atol=1e-9)
    t = float(tau[0]) - 1e-6  # any smaller shift breaks the budget
    assert hard_cost((wo - t / m).clamp(0, 1), (wi - t / n).clamp(0, 1), m, n, r) > B


def test_cg_factor_solve_matches_row_least_squares():
    from gblr_approx.fit.gblr.proximal import cg_factor_solve

    gen = torch.Generator().manual_seed(1)
    a, b, P = 9, 14, 5
    W = torch.randn(a, b, generator=gen, dtype=torch.float64)
    B = torch.randn(b, P, generator=gen, dtype=torch.float64)
    M = (torch.rand(a, P, generator=gen) < 0.6).double()
    X = cg_factor_solve(W, torch.zeros(a, P, dtype=torch.float64), M, B, iters=P + 2)
    for i in range(a):
        act = M[i] > 0
        if act.any():
            ref = torch.linalg.lstsq(B[:, act], W[i]).solution
            assert torch.allclose(X[i, act], ref, atol=1e-8)
        assert torch.all(X[i, ~act] == 0)


def test_proximal_refinement_beats_its_als_start_on_a_minilm_block():
    W = ga.datasets.minilm_sample()["encoder.layer.0.attention.self.query.weight"][:96, :128]
    W = W.double()
    als = ga.fit_gblr(W, 0.4, progress=False)
    res = ga.fit_gblr(W, 0.4, algorithm="proximal", steps=30, progress=False)
    assert res.info["best_stage"] == "proximal"
    assert res.rel_error < als.rel_error
    assert res.matrix.flops <= res.budget
    assert abs(ga.relative_error(W, res.matrix) - res.rel_error) < 1e-9
    # refining a given start never returns anything worse than it
    again = ga.fit_gblr(W, 0.4, algorithm="proximal", start=res.matrix, sweeps=0, steps=5,
                        progress=False)
    assert again.rel_error <= res.rel_error + 1e-12


def test_proximal_options_are_checked():
    W = torch.randn(20, 16, dtype=torch.float64)
    G = ga.fit_gblr(W, 0.3, steps=0, progress=False).matrix
    with pytest.raises(ValueError, match="sigma"):
        ga.fit_gblr(W, 0.3, algorithm="proximal", sigma=-1.0, steps=2, progress=False)
    with pytest.raises(ValueError, match="gradient"):
        ga.fit_gblr(W, 0.3, algorithm="proximal", gradient="x", steps=2, progress=False)
    with pytest.raises(TypeError, match="start"):
        ga.fit_gblr(W, 0.3, start=W, progress=False)
    with pytest.raises(ValueError, match="start"):
        ga.fit_gblr(W, 0.1, start=G, progress=False)


def test_projection_registry():
    from gblr_approx.projection import get_projection, register_projection

    assert callable(get_projection("gblr")) and callable(get_projection("blast"))
    with pytest.raises(LookupError, match="no projection"):
        get_projection("nope")
    with pytest.raises(TypeError):
        register_projection("x", 3)
    import inspect

    for cls in (ga.GBLR, ga.BLAST):  # the format's project() does not know its fitter
        code = inspect.getsource(cls.project).split('"""')[-1]
        assert "..fit" not in code and "fit_gblr(" not in code and "fit_blast(" not in code


def test_formats_never_import_fit():
    """formats/ is below fit/ in the layering: no format module imports the fitters."""
    import pathlib
    import re

    root = pathlib.Path(ga.__file__).parent / "formats"
    pattern = re.compile(r"^\s*(from \.\.fit\b|from gblr_approx\.fit\b|import gblr_approx\.fit\b)",
                         re.M)
    for path in sorted(root.glob("*.py")):
        assert not pattern.search(path.read_text()), f"{path.name} imports gblr_approx.fit"


def test_support_cover_search_stops_at_its_time_limit(monkeypatch):
    """The cover search of a 256x192 four-block matrix (seed 104) once ran for > 13 CPU
    minutes: its tree had few covers, so max_covers never stopped it. With a clock that
    advances one second per reading it must now stop after a few nodes."""
    import itertools

    import gblr_approx.fit.gblr.support as support

    G = random_gblr(256, 192, 4, [2], 104)
    ticks = itertools.count()
    monkeypatch.setattr(support.time, "process_time", lambda: float(next(ticks)))
    list(support.support_candidates(G.to_dense(), G.flops, time_limit=20.0))
    assert next(ticks) < 200  # readings: one per search node, a few per cover tried


def test_grid_batch_gathers_exact_blocks_and_ungrids_back():
    from gblr_approx.fit.gblr.mixed import _grid_batch, _ungrid
    from gblr_approx.formats.blocklowrank import balanced_splits

    X = torch.randn(23, 17, generator=torch.Generator().manual_seed(0))
    rs, cs = balanced_splits(23, 5), balanced_splits(17, 4)  # uneven blocks: padding
    Bb = _grid_batch(X, rs, cs)
    assert Bb.shape == (20, 5, 5)
    for i in range(5):
        for j in range(4):
            blk = Bb[i * 4 + j]
            p, q = rs[i + 1] - rs[i], cs[j + 1] - cs[j]
            assert torch.equal(blk[:p, :q], X[rs[i] : rs[i + 1], cs[j] : cs[j + 1]])
            assert not blk[p:].any() and not blk[:, q:].any()  # zero padding
    assert torch.equal(_ungrid(Bb, rs, cs, 23, 17), X)


def test_fine_regime_only_for_small_layers_at_low_budgets():
    from gblr_approx.fit.gblr.candidates import default_mixed_grids, fine_regime

    r = ga.resolve_budget
    assert fine_regime(384, 384, r(0.25, 384, 384))
    assert not fine_regime(384, 384, r(0.5, 384, 384))
    assert not fine_regime(4096, 11008, r(0.1, 4096, 11008))
    assert default_mixed_grids(384, 384, r(0.1, 384, 384)) == [(128, 128)]  # 3-entry blocks
    assert default_mixed_grids(384, 384, r(0.25, 384, 384)) == [(64, 64)]
    assert default_mixed_grids(1536, 384, r(0.1, 1536, 384)) == [(384, 96)]
    # outside the fine regime the coarse rule of before holds
    assert default_mixed_grids(384, 384, r(0.5, 384, 384)) == [(16, 16)]
    assert default_mixed_grids(1536, 384, r(0.5, 1536, 384)) == [(42, 10)]
    assert default_mixed_grids(4096, 11008, r(0.1, 4096, 11008)) == [(48, 130)]


def test_default_fit_beats_official_by_three_percent_on_minilm_query_at_10_percent():
    # issue 11's quality margin on a real layer: the best official result of any format on
    # MiniLM L0 query at 10 % is 0.8140 (find_olb, 1000 steps); the default must be 3 % below
    W = ga.datasets.minilm_sample()["encoder.layer.0.attention.self.query.weight"]
    res = ga.fit_gblr(W, 0.1, progress=False)
    assert res.matrix.flops <= res.budget
    assert ga.relative_error(W, res.matrix) <= 0.97 * 0.8140


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_fits_run_under_no_grad_and_inference_mode(mode):
    # the proximal fit takes gradient steps: under torch.no_grad() it used to fail deep in
    # autograd; results made under inference mode must be normal tensors (cacheable layouts)
    g = torch.Generator().manual_seed(0)
    W = torch.randn(40, 32, dtype=torch.float64, generator=g)
    ref = ga.fit_gblr(W, 0.3, algorithm="proximal", steps=10, seed=0).matrix
    ctx = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with ctx:
        got = ga.fit_gblr(W, 0.3, algorithm="proximal", steps=10, seed=0).matrix
        P = ga.project(W, "monarch", 0.3)
    torch.testing.assert_close(got.to_dense(), ref.to_dense(), rtol=0, atol=0)
    for A in (got, P):
        tensors = [t for t in vars(A).values() if isinstance(t, torch.Tensor)]
        assert tensors and not any(t.is_inference() or t.requires_grad for t in tensors)


# ------------------------------------------------- hunt s9 (formats): fit_gblr regressions
@pytest.mark.parametrize("s", [1e20, 1e-25, 2.0**-90])
def test_fit_gblr_is_scale_invariant(s):
    W0 = torch.randn(16, 16, generator=torch.Generator().manual_seed(0))
    ref = ga.fit_gblr(W0, 0.5, steps=2)
    R = ga.fit_gblr(W0 * s, 0.5, steps=2)  # used to return inf/NaN factors (float32 norms)
    D = R.matrix.to_dense()
    assert bool(torch.isfinite(D).all())
    assert R.rel_error == pytest.approx(ga.relative_error(W0 * s, R.matrix), abs=1e-5)
    assert R.rel_error == pytest.approx(ref.rel_error, abs=1e-4)
    assert R.matrix.flops <= 128
    if s == 2.0**-90:  # a power of two: exactly the scale-1 fit, scaled
        assert torch.equal(D / s, ref.matrix.to_dense())
        assert R.info["input_scale"] == 2.0**-88 and "input_scale" not in ref.info


def test_block_model_export_keeps_zero_columns_finite_in_float32():
    from gblr_approx.fit.gblr.blocks import BlockModel, Rect

    W = torch.zeros(8, 8)  # a rank-1 component on an all-zero block: U has a zero column
    W[4:, 4:] = torch.randn(4, 4)
    model = BlockModel(W, [Rect(0, 4, 0, 4), Rect(4, 4, 4, 4)], [1, 1])
    model.sweep()
    G = model.to_gblr()  # clamp_min(1e-300) is 0 in float32: 0 / 0 used to give NaN
    assert bool(torch.isfinite(G.to_dense()).all())


def test_fit_gblr_records_options_budget_and_component_counts():
    W = torch.randn(24, 36, generator=torch.Generator().manual_seed(0))
    R = ga.fit_gblr(W, 0.3, steps=3, components=2, rank_per_component=2, algorithm="proximal",
                    cg_iters=3)
    opts = R.info["options"]  # was {} (only proximal options were kept)
    assert opts["algorithm"] == "proximal" and opts["steps"] == 3 and opts["components"] == 2
    assert opts["rank_per_component"] == 2 and opts["cg_iters"] == 3 and opts["seed"] == 0
    assert opts["sweeps"] == 25 and opts["layout"] == "free" and opts["dtype"] == "float32"
    assert R.info["budget"] == 0.3 and R.info["budget_macs"] == R.budget == int(0.3 * 24 * 36)
    assert R.matrix.info["budget"] == 0.3
    stages = {h["stage"] for h in R.history}
    assert {"intervals", "proximal"} <= stages
    # the real component count in every record (intervals/proximal steps used to record -1)
    assert all(h["components"] >= 1 for h in R.history)
    json.dumps(R.info["options"])  # JSON-friendly, as ga.project records its options


def test_results_record_the_package_version():
    W = torch.randn(16, 16, generator=torch.Generator().manual_seed(0))
    res = ga.fit_gblr(W, 0.5, steps=2)
    assert res.info["version"] == res.matrix.info["version"] == ga.__version__
    assert ga.project(W, "lowrank", 0.5).info["version"] == ga.__version__


def test_proximal_start_with_dense_blocks_keeps_the_start():
    # a block-sparse start: every component a dense 8 x 8 block of cost 64. Split into rank-1
    # pieces (cost 16 each) it cost twice the budget, the budget projection shrank every width
    # and the proximal stage began at 0.81 from a 0.34 start
    from gblr_approx.fit.gblr.proximal import GaudiParams, proximal_gradient

    W = torch.randn(48, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    S = ga.project(W, "blocksparse", 0.25, block_shape=(8, 8))
    start = ga.GBLR.from_blocksparse(S)
    assert bool(start.is_dense.all())
    p = GaudiParams.from_gblr(start, 1)
    assert p.cost() <= start.flops and not p.exact
    G0, err0, _, cost0, _ = next(proximal_gradient(W, S.flops, start, steps=2))
    assert cost0 == G0.flops <= S.flops
    assert err0 == pytest.approx(ga.relative_error(W, G0), rel=1e-9)  # its own error
    # rank 4 of each 8 x 8 block (4 pieces of 16 MACs = the block's 64) instead of 8
    assert err0 < ga.relative_error(W, S) + 0.05  # 0.853 against 0.837
