"""Property tests (hypothesis) of the contract every format keeps, over the format catalogue.

For random shapes, dtypes and constructor arguments (each catalogue builder draws its structure
(ranks, blocks, intervals, permutations) from the seed it is given):

- ``A @ X == A.to_dense() @ X`` (matrices and vectors);
- ``(A.T).to_dense() == A.to_dense().T``;
- save / load is bit-exact (every stored tensor and the configuration; the dense matrix and
  products then agree to rounding);
- ``A.flops`` equals the multiply-accumulates a product ``A @ x`` performs, counted by
  ``torch.utils.flop_counter.FlopCounterMode`` (block-sparse edge blocks are computed padded:
  there ``flops`` counts only the entries inside the matrix, and equality holds when the block
  shape divides the matrix);
- a projection never exceeds its budget (or refuses it with InfeasibleBudgetError).

Derandomized (the same examples on every run) and bounded so the file runs in well under 40 s.
"""

from __future__ import annotations

import pytest

hypothesis = pytest.importorskip("hypothesis")

import torch  # noqa: E402
from catalogue import CATALOGUE  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import gblr_approx as ga  # noqa: E402

FAST = settings(max_examples=30, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])

TOL = {torch.float64: 1e-10, torch.float32: 2e-5}


@st.composite
def instances(draw, formats=tuple(CATALOGUE)):
    """``(format_name, A)``: a random valid instance of a catalogue format."""
    name = draw(st.sampled_from(formats))
    m = draw(st.integers(1, 24))
    n = draw(st.integers(1, 24))
    dtype = draw(st.sampled_from([torch.float64, torch.float32]))
    seed = draw(st.integers(0, 2**31 - 1))
    A = CATALOGUE[name]((m, n), dtype, torch.Generator().manual_seed(seed))
    if A is None:  # pragma: no cover - no builder refuses a shape today
        hypothesis.reject()
    assert A.shape == (m, n) and A.dtype == dtype
    return name, A


def _close(X, Y, dtype, scale):
    err = float((X - Y).abs().max()) if X.numel() else 0.0
    assert err <= TOL[dtype] * max(1.0, scale), (err, scale)


@FAST
@given(instances(), st.integers(1, 3), st.integers(0, 2**31 - 1))
def test_product_equals_dense_product(case, k, seed):
    _, A = case
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(A.shape[1], k, dtype=A.dtype, generator=gen)
    D = A.to_dense()
    assert D.shape == A.shape
    scale = float(D.abs().sum(1).max()) * float(X.abs().max())  # bounds every |entry|
    _close(A @ X, D @ X, A.dtype, scale)
    _close(A @ X[:, 0], D @ X[:, 0], A.dtype, scale)  # a vector gives a vector
    assert (A @ X[:, 0]).shape == (A.shape[0],)


@FAST
@given(instances())
def test_transpose_is_the_transposed_matrix(case):
    name, A = case
    At = A.T
    assert At.shape == (A.shape[1], A.shape[0])
    D = A.to_dense()
    _close(At.to_dense(), D.T, A.dtype, float(D.abs().max()) * min(A.shape))
    assert At.flops == A.flops  # the transpose costs the same


@FAST
@given(case=instances())
def test_save_load_bit_exact(tmp_path_factory, case):
    name, A = case
    path = A.save(tmp_path_factory.mktemp("prop") / f"{name}.safetensors")
    B = ga.load(path)
    assert type(B) is type(A) and B.shape == A.shape and B.flops == A.flops
    assert B._config() == A._config()
    ta, tb = A._tensors(), B._tensors()
    assert set(ta) == set(tb)
    for key in ta:
        assert ta[key].dtype == tb[key].dtype and torch.equal(ta[key], tb[key]), key
    # The stored numbers are bit-exact; products may differ in the last bit only, because a
    # format that slices its factors out of one stored tensor (block-low-rank, GBLR) computes
    # on views at other memory offsets, where BLAS picks other kernels.
    D = A.to_dense()
    _close(B.to_dense(), D, A.dtype, float(D.abs().max()) * min(A.shape))
    x = torch.ones(A.shape[1], dtype=A.dtype)
    _close(B @ x, A @ x, A.dtype, float(D.abs().sum(1).max()))


def _counted_macs(A) -> int:
    x = torch.randn(A.shape[1], 1, dtype=A.dtype)
    with FlopCounterMode(display=False) as counter:
        A @ x
    return counter.get_total_flops() // 2  # the counter reports 2 flops per MAC


@FAST
@given(instances())
def test_flops_equal_counted_macs(case):
    name, A = case
    counted = _counted_macs(A)
    inner = A.inner if name == "permuted" else A
    if inner.format_name == "blocksparse":
        br, bc = inner.block_shape
        nb = int(inner.block_rows.numel())
        assert counted == nb * br * bc  # edge blocks are computed padded
        assert A.flops <= counted
        if A.shape[0] % br == 0 and A.shape[1] % bc == 0:
            assert A.flops == counted
    elif inner.format_name == "blast":
        # r (m + n) MACs of the factor products; the b1 b2 r coupling multiplications run as a
        # batched product, except when torch lowers the einsum to an elementwise product (a
        # 1-wide contraction), which the counter does not see
        b1, b2 = inner.blocks
        assert counted in (A.flops, A.flops - inner.rank * b1 * b2)
        assert counted >= inner.rank * sum(A.shape)
    else:
        assert A.flops == counted


PROJECTABLE = ("lowrank", "blocksparse", "blocklowrank", "monarch", "blast", "gblr")


@SLOW
@given(st.sampled_from(PROJECTABLE), st.integers(2, 14), st.integers(2, 14),
       st.one_of(st.floats(0.02, 1.0), st.integers(1, 300)), st.integers(0, 2**31 - 1),
       st.data())
def test_projection_within_budget(fmt, m, n, budget, seed, data):
    W = torch.randn(m, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    limit = ga.resolve_budget(budget, m, n)
    opts = {}
    if fmt == "blocksparse":  # any block shape that fits the matrix
        opts["block_shape"] = (data.draw(st.integers(1, m)), data.draw(st.integers(1, n)))
    try:
        A = ga.project(W, fmt, budget, **opts)
    except ga.InfeasibleBudgetError:
        hypothesis.event(f"{fmt}: infeasible")
        return  # refused clearly: the budget is below the format's smallest cost
    hypothesis.event(f"{fmt}: projected")
    assert A.shape == (m, n) and A.flops <= limit, (A.flops, limit)
    D = A.to_dense()
    assert torch.isfinite(D).all()
    assert ga.relative_error(W, A) <= 1.0 + 1e-9  # never worse than the zero matrix
