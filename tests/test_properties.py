"""Property tests (hypothesis) of the contract every format keeps, over the format catalogue.

For random shapes, dtypes and constructor arguments (either a catalogue builder, which draws
the structure (ranks, blocks, intervals, permutations) from the seed it is given, or the
arguments of a constructor drawn by hypothesis: ranks, block grids, stored block positions,
Monarch factorisations of the shape, GBLR intervals that wrap around):

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


@st.composite
def constructed(draw):
    """``(format_name, A)`` built from constructor arguments drawn by hypothesis itself."""
    from gblr_approx.formats.blocklowrank import balanced_splits

    name = draw(st.sampled_from(["lowrank", "blocksparse", "blocklowrank", "monarch", "blast",
                                 "gblr"]))
    m, n = draw(st.integers(1, 20)), draw(st.integers(1, 20))
    dtype = draw(st.sampled_from([torch.float64, torch.float32]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))

    def rnd(*shape):
        return torch.randn(*shape, dtype=dtype, generator=gen)

    if name == "lowrank":
        r = draw(st.integers(1, min(m, n)))
        A = ga.LowRank(rnd(m, r), rnd(n, r))
    elif name == "blocksparse":
        br, bc = draw(st.integers(1, m)), draw(st.integers(1, n))
        gr, gc = -(-m // br), -(-n // bc)
        cells = draw(st.lists(st.integers(0, gr * gc - 1), min_size=1, max_size=gr * gc,
                              unique=True))
        pos = torch.tensor(cells)
        rows, cols = pos // gc, pos % gc
        h = (m - rows * br).clamp(max=br)
        w = (n - cols * bc).clamp(max=bc)
        inside = (torch.arange(br)[None, :, None] < h[:, None, None]) & (
            torch.arange(bc)[None, None, :] < w[:, None, None])
        A = ga.BlockSparse((m, n), (br, bc), rows, cols, rnd(len(cells), br, bc) * inside)
    elif name == "blocklowrank":
        rs = balanced_splits(m, draw(st.integers(1, min(m, 4))))
        cs = balanced_splits(n, draw(st.integers(1, min(n, 4))))
        factors = []
        for i in range(len(rs) - 1):
            row = []
            for j in range(len(cs) - 1):
                p, q = rs[i + 1] - rs[i], cs[j + 1] - cs[j]
                r = draw(st.integers(0, min(p, q)))
                row.append((rnd(p, r), rnd(q, r)))
            factors.append(row)
        A = ga.BlockLowRank((m, n), rs, cs, factors)
    elif name == "monarch":
        J = draw(st.sampled_from([d for d in range(1, m + 1) if m % d == 0]))
        K = draw(st.sampled_from([d for d in range(1, n + 1) if n % d == 0]))
        R = draw(st.integers(1, 3))
        A = ga.Monarch(rnd(K, R * J, n // K), rnd(J, m // J, K * R))
    elif name == "blast":
        b1, b2 = draw(st.integers(1, min(m, 4))), draw(st.integers(1, min(n, 4)))
        r = draw(st.integers(1, 4))
        A = ga.BLAST(rnd(m, r), rnd(n, r), rnd(b1, b2, r))
    else:
        K = draw(st.integers(1, 4))
        rs = [draw(st.integers(0, m - 1)) for _ in range(K)]
        cs = [draw(st.integers(0, n - 1)) for _ in range(K)]
        rw = [draw(st.integers(1, m)) for _ in range(K)]
        cw = [draw(st.integers(1, n)) for _ in range(K)]
        factors = []
        for h, w in zip(rw, cw, strict=True):
            r = draw(st.integers(1, 3))
            factors.append((rnd(h, r), rnd(w, r)))
        A = ga.GBLR((m, n), rs, rw, cs, cw, factors)
    assert A.shape == (m, n) and A.dtype == dtype
    return name, A


#: catalogue instances (structures drawn from a seed) or constructor arguments drawn directly
ANY = st.one_of(instances(), constructed())


def _close(X, Y, dtype, scale):
    err = float((X - Y).abs().max()) if X.numel() else 0.0
    assert err <= TOL[dtype] * max(1.0, scale), (err, scale)


@FAST
@given(ANY, st.integers(1, 3), st.integers(0, 2**31 - 1))
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
@given(ANY)
def test_transpose_is_the_transposed_matrix(case):
    name, A = case
    At = A.T
    assert At.shape == (A.shape[1], A.shape[0])
    D = A.to_dense()
    _close(At.to_dense(), D.T, A.dtype, float(D.abs().max()) * min(A.shape))
    assert At.flops == A.flops  # the transpose costs the same


@FAST
@given(case=ANY)
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


def _counted_macs(A, columns: int = 1, grad: bool = False) -> int:
    """MACs per column that torch's counter sees in ``A @ x`` (GEMM-type operations only;
    ``grad``: with ``x`` requiring a gradient, i.e. the out-of-place autograd kernels)."""
    x = torch.randn(A.shape[1], columns, dtype=A.dtype, requires_grad=grad)
    with FlopCounterMode(display=False) as counter:
        A @ x
    return counter.get_total_flops() // (2 * columns)  # the counter reports 2 flops per MAC


@FAST
@given(ANY)
def test_flops_equal_counted_macs(case):
    """``flops`` counts the structure's MACs. Dense, low-rank and Monarch execute exactly
    those (Monarch mat-vecs on padded factors: ``J K R (m + n)``); the formats whose kernels
    pad blocks to shared shapes (block-sparse, block-low-rank, GBLR) execute at least those
    and the padding (GBLR: exactly its plan's count); BLAST's coupling step may run as an
    elementwise product that the counter does not see."""
    name, A = case
    counted = _counted_macs(A)
    inner = A.inner if name == "permuted" else A
    fmt = inner.format_name
    if fmt == "gblr":
        # the tiled plan's autograd kernels (out of place: the counter sees every GEMM; the
        # inference paths use in-place addmm_ and CSR kernels, which it does not count right)
        counted = _counted_macs(A, 2, grad=True)
        assert counted == (inner.plan_for(2).padded_macs if inner.num_components else 0)
        assert A.flops <= counted
    elif fmt in ("blocksparse", "blocklowrank"):
        assert A.flops <= counted
    elif fmt == "blast":
        assert counted >= inner.rank * sum(A.shape)
        assert counted <= A.flops + inner.rank * sum(A.shape)
    elif fmt == "monarch" and inner._padded_ok:
        # mat-vecs on the zero-padded factors (PADDED_MATVEC_SHARE): J K R (m + n) MACs
        assert counted == inner.out_blocks * inner.in_blocks * inner.rank * sum(A.shape)
        assert _counted_macs(A, 2) == A.flops
    else:
        assert A.flops == counted


PROJECTABLE = ("lowrank", "blocksparse", "blocklowrank", "monarch", "blast", "gblr")


@pytest.mark.filterwarnings("ignore:the .* result costs:UserWarning")  # MAC budgets > m n
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
