"""Products of every format on every code path, against the dense matrix.

The product kernels pick their path from the operand: ``k = 1`` (mat-vec), small ``k``
(batch-major temporaries), large ``k`` (``k >= ROW_FORM_BELOW``), and the memory layout of
``X`` (feature-major ``(n, k)`` or batch-major, the transposed view ``StructuredLinear``
passes). Each path must equal ``to_dense()`` products, for ``A @ X``, ``X @ A`` and their
gradients.
"""

from __future__ import annotations

import pytest
import torch
from catalogue import instances

import gblr_approx as ga
from gblr_approx.formats.base import ROW_FORM_BELOW
from gblr_approx.formats.blocklowrank import balanced_splits

# large k: the blocked paths (GBLR column blocks, block-sparse column form) start at 128
KS = (1, 3, ROW_FORM_BELOW + 8, 160)
CASES = list(instances())
IDS = [f"{name}-{m}x{n}" for name, (m, n), _ in CASES]


def _operand(rows: int, k: int, batch_major: bool, gen: torch.Generator) -> torch.Tensor:
    """``(rows, k)`` float64, stored feature-major or as the transposed view of ``(k, rows)``."""
    if batch_major:
        return torch.randn(k, rows, dtype=torch.float64, generator=gen).T
    return torch.randn(rows, k, dtype=torch.float64, generator=gen)


def _check_products(A: ga.StructuredMatrix, gen: torch.Generator) -> None:
    m, n = A.shape
    D = A.to_dense()
    for k in KS:
        for bm in (False, True):
            X = _operand(n, k, bm, gen)
            torch.testing.assert_close(A @ X, D @ X, rtol=1e-12, atol=1e-12)
            Y = _operand(m, k, bm, gen).T  # (k, m), row-major or column-major
            torch.testing.assert_close(Y @ A, Y @ D, rtol=1e-12, atol=1e-12)
    y = torch.randn(m, dtype=torch.float64, generator=gen)
    torch.testing.assert_close(y @ A, y @ D, rtol=1e-12, atol=1e-12)


def _grads(A: ga.StructuredMatrix, X: torch.Tensor, G: torch.Tensor, left: bool, dense: bool):
    """Gradients of ``sum(G * product)`` w.r.t. the stored floats of ``A`` and ``X``."""
    ts = {k: t.detach().clone().requires_grad_(t.is_floating_point())
          for k, t in A._tensors().items()}
    B = type(A)._from_state(ts, A._config(), A.shape)
    M = B.to_dense() if dense else B
    X = X.detach().clone().requires_grad_(True)
    Y = X @ M if left else M @ X
    leaves = [t for t in ts.values() if t.requires_grad] + [X]
    return torch.autograd.grad((G * Y).sum(), leaves, allow_unused=True, materialize_grads=True)


def _check_grads(A: ga.StructuredMatrix, gen: torch.Generator, ks=(1, ROW_FORM_BELOW + 8)) -> None:
    m, n = A.shape
    for k in ks:
        for left in (False, True):
            for bm in (False, True):
                X = _operand(m, k, bm, gen).T if left else _operand(n, k, bm, gen)
                G = torch.randn(k, n, dtype=torch.float64, generator=gen) if left else (
                    torch.randn(m, k, dtype=torch.float64, generator=gen))
                got = _grads(A, X, G, left, dense=False)
                want = _grads(A, X, G, left, dense=True)
                for a, b in zip(got, want, strict=True):
                    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(("name", "shape", "A"), CASES, ids=IDS)
def test_every_path_matches_dense(name, shape, A, gen):
    _check_products(A, gen)


@pytest.mark.parametrize(("name", "shape", "A"), CASES, ids=IDS)
def test_gradients_match_autograd_through_to_dense(name, shape, A, gen):
    _check_grads(A, gen)


@pytest.mark.parametrize(("name", "shape", "A"), CASES, ids=IDS)
def test_products_after_inference_mode_still_train(name, shape, A, gen):
    # plans, panels and transposes cached during torch.inference_mode() (an evaluation pass)
    # must not be inference tensors: autograd cannot save those for a later training step
    m, n = A.shape
    D = A.to_dense()
    ks = (1, 5, ROW_FORM_BELOW + 8, 160)
    with torch.inference_mode():
        for k in ks:
            for bm in (False, True):
                X, Y = _operand(n, k, bm, gen), _operand(m, k, bm, gen).T
                torch.testing.assert_close(A @ X, D @ X, rtol=1e-12, atol=1e-12)
                torch.testing.assert_close(Y @ A, Y @ D, rtol=1e-12, atol=1e-12)
                torch.testing.assert_close(A.T @ Y.T, D.T @ Y.T, rtol=1e-12, atol=1e-12)
    for k in ks:
        X = torch.randn(n, k, dtype=torch.float64, generator=gen, requires_grad=True)
        Y = torch.randn(k, m, dtype=torch.float64, generator=gen, requires_grad=True)
        ((A @ X).sum() + (Y @ A).sum() + (A.T @ Y.T).sum()).backward()
        torch.testing.assert_close(X.grad, D.sum(0)[:, None].expand(n, k))
        torch.testing.assert_close(Y.grad, 2 * D.sum(1)[None, :].expand(k, m))


# --------------------------------------------------- grouped-shape structures
def _blocksparse(shape, block_shape, cells, gen):
    """Block-sparse matrix with blocks at ``cells`` (zero padding outside the matrix)."""
    m, n = shape
    br, bc = block_shape
    rows = torch.tensor([c[0] for c in cells])
    cols = torch.tensor([c[1] for c in cells])
    blocks = torch.randn(len(cells), br, bc, dtype=torch.float64, generator=gen)
    h = (m - rows * br).clamp(max=br)
    w = (n - cols * bc).clamp(max=bc)
    mask = (torch.arange(br)[None, :, None] < h[:, None, None]) & (
        torch.arange(bc)[None, None, :] < w[:, None, None])
    return ga.BlockSparse(shape, block_shape, rows, cols, blocks * mask)


@pytest.mark.parametrize(
    ("shape", "block_shape", "cells"),
    [
        # block rows with 0, 1, 2 and 3 blocks (four groups, an empty block row), ragged edges
        ((23, 17), (5, 4), [(0, 0), (1, 1), (1, 4), (2, 0), (2, 2), (2, 3), (4, 4)]),
        # rectangular, one full block row, an empty block column
        ((8, 30), (4, 6), [(0, 0), (0, 1), (0, 2), (0, 3), (0, 4), (1, 2)]),
        # a single block; all blocks in one block column
        ((9, 9), (3, 3), [(1, 1)]),
        ((12, 7), (3, 7), [(0, 0), (1, 0), (3, 0)]),
    ],
)
def test_blocksparse_grouped_shapes(shape, block_shape, cells, gen):
    A = _blocksparse(shape, block_shape, cells, gen)
    _check_products(A, gen)
    _check_grads(A, gen)
    _check_products(A.T, gen)


@pytest.mark.parametrize(
    ("shape", "grid", "ranks"),
    [
        ((23, 17), (3, 4), [[0, 2, 1, 3], [4, 0, 0, 1], [1, 1, 5, 2]]),  # uneven, rank-0 blocks
        ((10, 31), (1, 3), [[2, 7, 1]]),  # one block row, rectangular
        ((9, 6), (3, 3), [[0, 0, 0], [0, 1, 0], [0, 0, 0]]),  # a single non-zero block
    ],
)
def test_blocklowrank_grouped_shapes(shape, grid, ranks, gen):
    m, n = shape
    rs, cs = balanced_splits(m, grid[0]), balanced_splits(n, grid[1])
    factors = [
        [
            (torch.randn(rs[i + 1] - rs[i], r, dtype=torch.float64, generator=gen),
             torch.randn(cs[j + 1] - cs[j], r, dtype=torch.float64, generator=gen))
            for j, r in enumerate(row)
        ]
        for i, row in enumerate(ranks)
    ]
    A = ga.BlockLowRank(shape, rs, cs, factors)
    _check_products(A, gen)
    _check_grads(A, gen)
    _check_products(A.T, gen)


@pytest.mark.parametrize(("shape", "blocks"), [((23, 17), (3, 4)), ((12, 30), (4, 5))])
def test_blast_uneven_and_even_blocks(shape, blocks, gen):
    m, n = shape
    r = 3
    A = ga.BLAST(torch.randn(m, r, dtype=torch.float64, generator=gen),
                 torch.randn(n, r, dtype=torch.float64, generator=gen),
                 torch.randn(*blocks, r, dtype=torch.float64, generator=gen))
    _check_products(A, gen)
    _check_grads(A, gen)


@pytest.mark.parametrize(("J", "K", "R", "Lr", "I"), [(2, 3, 2, 5, 4), (4, 1, 3, 3, 7)])
def test_monarch_rectangular_and_transposed(J, K, R, Lr, I, gen):
    w1 = torch.randn(K, R * J, I, dtype=torch.float64, generator=gen)
    w2 = torch.randn(J, Lr, K * R, dtype=torch.float64, generator=gen)
    A = ga.Monarch(w1, w2)
    for M in (A, A.T):
        _check_products(M, gen)
        _check_grads(M, gen)


@pytest.mark.parametrize("transposed", [False, True])
def test_monarch_row_blocks_are_exact(transposed, gen, monkeypatch):
    """Batch-major products past ``ROW_BLOCK`` rows run in row blocks (uneven last block)
    written into one row-major result: ``A @ X``, ``X @ A`` and a biased layer forward."""
    from gblr_approx.formats import monarch

    w1 = torch.randn(3, 2 * 2, 4, dtype=torch.float64, generator=gen)
    w2 = torch.randn(2, 5, 3 * 2, dtype=torch.float64, generator=gen)
    A = ga.Monarch(w1, w2, transposed=transposed)
    m, n = A.shape
    D = A.to_dense()
    bias = torch.randn(m, dtype=torch.float64, generator=gen)
    X = _operand(n, 45, True, gen)  # batch-major (n, 45)
    Y = _operand(m, 45, True, gen).T  # row-major (45, m)
    whole = [A @ X, Y @ A, A._linear(X.T, bias)]
    monkeypatch.setattr(monarch, "ROW_BLOCK", 8)  # blocks of 8, ..., 5
    blocked = [A @ X, Y @ A, A._linear(X.T, bias)]
    for got, want, ref in zip(blocked, whole, [D @ X, Y @ D, X.T @ D.T + bias], strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)
    assert blocked[0].T.is_contiguous() and blocked[2].is_contiguous()
    with torch.enable_grad():  # autograd: one block, differentiable
        Xg = X.clone().requires_grad_(True)
        (A @ Xg).sum().backward()
    torch.testing.assert_close(Xg.grad, D.sum(0)[:, None].expand(n, 45))


def test_monarch_row_form_reads_contiguous_transposed_factors(gen):
    """The no-autograd row form multiplies on cached contiguous ``w^T`` copies (MKL's fast
    operand layout, docs/benchmarks.md): exact, and rebuilt after an in-place update."""
    w1 = torch.randn(3, 2 * 2, 4, dtype=torch.float64, generator=gen)
    w2 = torch.randn(2, 5, 3 * 2, dtype=torch.float64, generator=gen)
    A = ga.Monarch(w1, w2)
    X = _operand(A.shape[1], 40, True, gen)  # batch-major
    torch.testing.assert_close(A @ X, A.to_dense() @ X, rtol=1e-12, atol=1e-12)
    W1, W2 = A._layouts["row_factors"][2]
    assert W1.mT.is_contiguous() and W2.mT.is_contiguous()
    assert torch.equal(W1, w1) and torch.equal(W2, w2)
    with torch.no_grad():
        A.w1.mul_(-2.0)
    torch.testing.assert_close(A @ X, A.to_dense() @ X, rtol=1e-12, atol=1e-12)


def test_monarch_padded_matvec_is_exact_and_follows_its_factors(gen):
    """Mat-vecs without autograd on few, low-rank blocks run on the zero-padded factors
    (``M = P2 @ P1``, PADDED_MATVEC_SHARE); with gradients they take the bmm path."""
    J, K, R, Lr, I = 2, 2, 3, 24, 20  # padded entries 2*2*3*(48+40) = 1056 > 0.5 * 48 * 40
    w1 = torch.randn(K, R * J, I, dtype=torch.float64, generator=gen)
    w2 = torch.randn(J, Lr, K * R, dtype=torch.float64, generator=gen)
    assert not ga.Monarch(w1, w2)._padded_ok
    J, K, R, Lr, I = 2, 2, 2, 48, 40  # 2*2*2*(96+80) = 1408 <= 0.5 * 96 * 80
    w1 = torch.randn(K, R * J, I, dtype=torch.float64, generator=gen)
    w2 = torch.randn(J, Lr, K * R, dtype=torch.float64, generator=gen)
    A = ga.Monarch(w1, w2)
    assert A._padded_ok and A.T._padded_ok
    P1, P2 = A._padded_factors()
    assert P1.shape == (J * K * R, K * I) and P2.shape == (J * Lr, J * K * R)
    torch.testing.assert_close(P2 @ P1, A.to_dense(), rtol=1e-12, atol=1e-12)
    for M in (A, A.T):
        D = M.to_dense()
        x = torch.randn(M.shape[1], dtype=torch.float64, generator=gen)
        y = torch.randn(M.shape[0], dtype=torch.float64, generator=gen)
        torch.testing.assert_close(M @ x, D @ x, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(y @ M, y @ D, rtol=1e-12, atol=1e-12)
    assert "padded" in A._layouts  # the mat-vecs above ran on the padded factors
    x = torch.randn(K * I, dtype=torch.float64, generator=gen)
    before = A @ x
    with torch.no_grad():
        w2.mul_(2)  # in place: the padded copy is rebuilt
    torch.testing.assert_close(A @ x, 2 * before, rtol=1e-12, atol=1e-12)
    w1.requires_grad_(True)  # gradients: the bmm path, and they reach w1
    (A @ x).sum().backward()
    assert w1.grad is not None and torch.isfinite(w1.grad).all()


# ------------------------------------------------------------- caches, syncs
def test_blocklowrank_sees_in_place_factor_updates(gen):
    A = next(a for name, _, a in instances() if name == "blocklowrank")
    x = torch.randn(A.shape[1], dtype=torch.float64, generator=gen)
    A @ x  # fills the packed-bases cache
    U, V = next((U, V) for row in A.factors for U, V in row if U.shape[1])
    with torch.no_grad():
        U.mul_(3.0)
        V.add_(1.0)
    torch.testing.assert_close(A @ x, A.to_dense() @ x, rtol=1e-12, atol=1e-12)


def test_projected_blocklowrank_has_flat_factors_that_products_follow(gen):
    # project() returns the flat storage a loaded matrix has (factors are views of two
    # buffers; the packed-bases cache then checks 2 versions, not 2 b1 b2): edits of a factor
    # view, in place, still reach every product
    W = torch.randn(48, 40, dtype=torch.float64, generator=gen)
    A = ga.BlockLowRank.project(W, 600, grid=(3, 4))
    assert A._flat is not None and len(A._sources()) == 2
    loaded = ga.BlockLowRank._from_state(A._tensors(), A._config(), A.shape)
    torch.testing.assert_close(loaded.to_dense(), A.to_dense())
    x = torch.randn(40, dtype=torch.float64, generator=gen)
    X = torch.randn(40, 64, dtype=torch.float64, generator=gen)
    A @ x, A @ X  # fill the caches
    U, V = next((U, V) for row in A.factors for U, V in row if U.shape[1])
    with torch.no_grad():
        U.mul_(-2.0)
        V.add_(0.5)
    D = A.to_dense()
    torch.testing.assert_close(A @ x, D @ x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(A @ X, D @ X, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(X.T @ A.T, (D @ X).T, rtol=1e-12, atol=1e-12)


def test_every_format_pickles_compactly_and_exactly(gen):
    # Dask and multiprocessing ship matrices by pickle: the result must equal the original,
    # keep working after in-place edits, and carry each stored number about once (a flat
    # block-low-rank pickled view by view carried its whole buffer once per block)
    import pickle

    for name, _, A in instances():
        B = pickle.loads(pickle.dumps(A))
        assert type(B) is type(A) and B.shape == A.shape, name
        torch.testing.assert_close(B.to_dense(), A.to_dense(), rtol=1e-12, atol=1e-12, msg=name)
        stored = sum(t.numel() * t.element_size() for t in A._tensors().values())
        assert len(pickle.dumps(A)) <= 2 * stored + 20_000, name
        # products fill caches (plans, padded or transposed layouts): they are not shipped
        for k in (1, 70):
            A @ torch.randn(A.shape[1], k, dtype=torch.float64, generator=gen)
            torch.randn(k, A.shape[0], dtype=torch.float64, generator=gen) @ A
        assert len(pickle.dumps(A)) <= 2 * stored + 20_000, name
        C = pickle.loads(pickle.dumps(A))
        X = torch.randn(A.shape[1], 5, dtype=torch.float64, generator=gen)
        torch.testing.assert_close(C @ X, A.to_dense() @ X, rtol=1e-12, atol=1e-12, msg=name)
    W = torch.randn(48, 40, dtype=torch.float64, generator=gen)
    B = pickle.loads(pickle.dumps(ga.BlockLowRank.project(W, 600, grid=(3, 4))))
    x = torch.randn(40, dtype=torch.float64, generator=gen)
    B @ x
    with torch.no_grad():
        next(U for row in B.factors for U, _ in row if U.shape[1]).mul_(3.0)
    torch.testing.assert_close(B @ x, B.to_dense() @ x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fmt", ["monarch", "blast", "blocklowrank"])
def test_cached_layouts_follow_in_place_updates_and_modes(fmt, gen):
    """The contiguous layouts cached for products (``cached_layout``) are rebuilt after an
    in-place change of any factor, and a copy made in inference mode is not reused outside."""
    A = next(a for name, _, a in instances() if name == fmt)
    m, n = A.shape
    xs = [torch.randn(n, k, dtype=torch.float64, generator=gen) for k in (1, ROW_FORM_BELOW + 8)]
    ys = [torch.randn(k, m, dtype=torch.float64, generator=gen) for k in (1, ROW_FORM_BELOW + 8)]

    def check() -> None:
        D = A.to_dense()
        for X, Y in zip(xs, ys, strict=True):
            torch.testing.assert_close(A @ X, D @ X, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(Y @ A, Y @ D, rtol=1e-12, atol=1e-12)

    check()  # fills the caches
    with torch.no_grad():
        for i, t in enumerate(A._float_tensors()):
            t.mul_(1.5 + i)
    check()
    with torch.inference_mode():
        check()
    X = xs[1].clone().requires_grad_(True)  # autograd through X only, after inference mode
    (A @ X).sum().backward()
    torch.testing.assert_close(X.grad, A.to_dense().sum(0, keepdim=True).T.expand_as(X))


def test_blocksparse_chunked_large_k_product_is_exact(gen, monkeypatch):
    """Column chunks of the large-k product (forced small here) cover every column once."""
    from gblr_approx.formats import blocksparse

    monkeypatch.setattr(blocksparse, "GATHER_CHUNK", 64)
    cells = [(0, 0), (0, 2), (1, 1), (2, 0), (2, 1), (2, 2), (2, 3), (3, 3)]
    A = _blocksparse((23, 17), (6, 5), cells, gen)  # ragged edges, a full block row
    _check_products(A, gen)


def test_block_rectangles_partition_the_stored_blocks(gen):
    """Every stored block lies in exactly one rectangle, and no rectangle holds an empty one;
    runs shared by block rows (or columns) become one rectangle."""
    from gblr_approx.formats.blocksparse import block_rectangles

    for density in (0.2, 0.5, 0.9):
        occ = torch.rand(9, 13, generator=gen) < density
        cover = torch.zeros(9, 13, dtype=torch.long)
        for i0, i1, j0, j1 in block_rectangles(occ):
            assert occ[i0:i1, j0:j1].all()
            cover[i0:i1, j0:j1] += 1
        assert torch.equal(cover, occ.long())
    occ = torch.zeros(6, 8, dtype=torch.bool)
    occ[1:4, 2:7] = True  # one 3 x 5 rectangle
    occ[5, :] = True  # a full block row
    assert sorted(block_rectangles(occ)) == [(1, 4, 2, 7), (5, 6, 0, 8)]
    occ = torch.zeros(6, 8, dtype=torch.bool)
    occ[:, 3] = True  # a full block column: the column cut needs one rectangle, not six
    occ[0, 5] = True
    assert sorted(block_rectangles(occ)) == [(0, 1, 5, 6), (0, 6, 3, 4)]
    assert block_rectangles(torch.zeros(3, 4, dtype=torch.bool)) == []


def test_blocksparse_rectangle_form_is_exact_and_chosen_by_size(gen, monkeypatch):
    """The rectangle form (one in-place GEMM per rectangle of adjacent blocks) runs without
    autograd from RECT_FORM_FROM columns, and below it only where it needs few GEMMs; it is
    exact for A, A.T, feature- and batch-major operands and ragged edge blocks."""
    from gblr_approx.formats import blocksparse

    cells = [(0, 0), (0, 1), (1, 0), (1, 1), (2, 3), (3, 0), (3, 1), (3, 2), (3, 3)]
    A = _blocksparse((23, 17), (6, 5), cells, gen)  # 4 x 4 grid, ragged last row and column
    assert len(A._rects()) == 3  # a 2 x 2 square, a column pair and a row triple
    for t in (0, 1):
        assert A._uses_rect_form(t, blocksparse.RECT_FORM_FROM)
    scattered = _blocksparse((23, 17), (6, 5), [(0, 0), (1, 2), (3, 3), (3, 1)], gen)
    assert not scattered._uses_rect_form(0, blocksparse.RECT_FORM_FROM)  # 1 block each
    monkeypatch.setattr(blocksparse, "RECT_PER_GROUP_CALL", 0.0)
    assert not A._uses_rect_form(0, blocksparse.RECT_FORM_FROM - 1)
    monkeypatch.setattr(blocksparse, "RECT_PER_GROUP_CALL", 100.0)
    assert A._uses_rect_form(0, ROW_FORM_BELOW)
    calls = []
    real = blocksparse.BlockSparse._rect_form
    monkeypatch.setattr(blocksparse.BlockSparse, "_rect_form",
                        lambda self, t, X: calls.append(t) or real(self, t, X))
    _check_products(A, gen)  # KS reach ROW_FORM_BELOW and beyond: the rectangle form runs
    _check_products(A.T, gen)
    assert 0 in calls and 1 in calls
    calls.clear()  # with autograd: forward and backward (dX, d blocks) in rectangle form
    _check_grads(A, gen)
    _check_grads(A.T, gen)
    assert 0 in calls and 1 in calls
    # another matrix on the same index tensors and grid but another shape: its own rectangles
    B = ga.BlockSparse((24, 20), (6, 5), A.block_rows, A.block_cols, A.blocks.clone())
    assert B._plans is A._plans and B._rects()[-1][:4] != A._rects()[-1][:4]
    _check_products(B, gen)
    with torch.inference_mode():  # the cached panels follow in-place updates of the blocks
        X = torch.randn(17, 40, dtype=torch.float64, generator=gen)
        torch.testing.assert_close(A @ X, A.to_dense() @ X, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        A.blocks.mul_(-3.0)
    torch.testing.assert_close(A @ X, A.to_dense() @ X, rtol=1e-12, atol=1e-12)


def test_blocksparse_fresh_row_range_takes_the_rectangle_form_for_few_rectangles(
        gen, monkeypatch):
    """Batch-major products of 32-127 rows without autograd run the rectangle form where it
    needs at most one GEMM per RECT_ROWS_PER_GEMM rows, else the fresh row form; both
    exact for A and A.T."""
    from gblr_approx.formats import blocksparse

    cells = [(0, 0), (0, 1), (1, 0), (1, 1), (2, 3), (3, 0), (3, 1), (3, 2), (3, 3)]
    A = _blocksparse((23, 17), (6, 5), cells, gen)  # 3 rectangles
    calls = []
    for name in ("_rect_form", "_fresh_rows"):
        real = getattr(blocksparse.BlockSparse, name)
        monkeypatch.setattr(blocksparse.BlockSparse, name,
                            lambda self, *a, real=real, name=name: calls.append(name)
                            or real(self, *a))
    for per_gemm, want in [(5, "_rect_form"), (100, "_fresh_rows")]:
        monkeypatch.setattr(blocksparse, "RECT_ROWS_PER_GEMM", per_gemm)
        for M in (A, A.T):
            calls.clear()
            x = torch.randn(40, M.shape[1], dtype=torch.float64, generator=gen)
            with torch.no_grad():
                torch.testing.assert_close(M._matmul(x.T).T, x @ M.to_dense().T,
                                           rtol=1e-12, atol=1e-12)
            assert calls == [want]


def test_blocksparse_batch_major_products_read_transposed_contiguous_panels(gen):
    """Batch-major products ``x @ A^T`` read their block-row and rectangle panels as
    contiguous transposes (``(g, c q, p)`` and ``(w, h)``), the operand layout MKL runs
    fastest there (docs/benchmarks.md); both give ``x @ A^T`` exactly, ragged edges too."""
    cells = [(0, 0), (0, 1), (1, 0), (1, 1), (2, 3), (3, 0), (3, 1), (3, 2), (3, 3)]
    A = _blocksparse((23, 17), (6, 5), cells, gen)
    for P, R in zip(A._panels(0, True), A._panels(0), strict=True):
        assert P.is_contiguous() and torch.equal(P, R.mT)
    D = A.to_dense()
    with torch.no_grad():
        for rows in (40, 300):  # the fresh row form, then the rectangle form
            x = torch.randn(rows, 17, dtype=torch.float64, generator=gen)
            torch.testing.assert_close(A._matmul(x.T).T, x @ D.T, rtol=1e-12, atol=1e-12)
    stored = A._layouts[("rect_panels", True)][2]
    for (r0, r1, c0, c1, _), P in zip(A._rects(), stored, strict=True):
        assert P.is_contiguous() and P.shape == (c1 - c0, r1 - r0)
        torch.testing.assert_close(P, D[r0:r1, c0:c1].T, rtol=0, atol=0)


@pytest.mark.parametrize(("chunk_floats", "fresh_floats"), [(8, 1 << 17), (1 << 17, 1 << 17),
                                                          (1 << 17, 0)])
def test_blast_chunked_product_is_exact(gen, monkeypatch, chunk_floats, fresh_floats):
    """Column chunks of BLAST's no-autograd batch-major product (forced small here: chunks
    of ROW_FORM_BELOW columns; or one chunk, the feature-major result, its intermediates
    fresh or in the scratch buffer) cover every column once; feature-major operands and
    left products stay exact beside it."""
    from gblr_approx.formats import blast

    U, V = (torch.randn(d, 3, dtype=torch.float64, generator=gen) for d in (12, 10))
    A = ga.BLAST(U, V, torch.randn(3, 2, 3, dtype=torch.float64, generator=gen))
    assert A._rmaps[0] is None and A._cmaps[0] is None  # equal blocks: the chunked path
    calls = []
    real = blast.BLAST._apply_chunked
    monkeypatch.setattr(blast.BLAST, "_apply_chunked",
                        lambda self, *a: calls.append(1) or real(self, *a))
    monkeypatch.setattr(blast, "CHUNK_FLOATS", chunk_floats)
    monkeypatch.setattr(blast, "FRESH_FLOATS", fresh_floats)
    _check_products(A, gen)
    assert calls


def test_blocksparse_rebuild_reuses_plan_and_sees_block_updates(gen):
    A = _blocksparse((23, 17), (5, 4), [(0, 0), (1, 1), (2, 0), (2, 3)], gen)
    B = ga.BlockSparse(A.shape, A.block_shape, A.block_rows, A.block_cols, A.blocks)
    assert B._plans is A._plans  # same index tensors: planned once
    X = torch.randn(17, ROW_FORM_BELOW + 8, dtype=torch.float64, generator=gen)
    B @ X  # fills the panel cache
    with torch.no_grad():
        B.blocks.mul_(-2.0)
    torch.testing.assert_close(B @ X, B.to_dense() @ X, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("name", "shape", "A"), CASES, ids=IDS)
def test_products_never_read_tensors_back_to_the_host(name, shape, A, gen, monkeypatch):
    """No ``.item()``, ``.tolist()``, ``int()``/``bool()`` of a tensor inside a product (on
    CUDA each would be a device synchronisation)."""
    if name == "gblr":
        pytest.skip("GBLR's product belongs to formats/gblr.py")
    m, n = shape
    X = torch.randn(n, ROW_FORM_BELOW + 8, dtype=torch.float64, generator=gen)
    Y = torch.randn(4, m, dtype=torch.float64, generator=gen)
    A @ X[:, 0], A @ X, Y @ A  # first calls fill caches, which must not read back either

    def boom(*args, **kwargs):
        raise AssertionError("host read-back inside a product")

    for attr in ("item", "tolist", "__int__", "__bool__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, attr, boom)
    A @ X[:, 0], A @ X, A @ X[:, :3], Y @ A, A._matmul(X.T.contiguous().T)


def test_blocksparse_rectangle_form_never_reads_back_to_the_host(gen, monkeypatch):
    """After the first call (which plans the rectangles), the rectangle form and its
    backward run without host read-backs (device synchronisations on CUDA)."""
    cells = [(0, 0), (0, 1), (1, 0), (1, 1), (2, 3), (3, 0), (3, 1), (3, 2), (3, 3)]
    A = _blocksparse((23, 17), (6, 5), cells, gen)
    blocks = A.blocks.clone().requires_grad_(True)
    B = ga.BlockSparse(A.shape, A.block_shape, A.block_rows, A.block_cols, blocks)
    X = torch.randn(17, 160, dtype=torch.float64, generator=gen, requires_grad=True)
    Y = torch.randn(160, 23, dtype=torch.float64, generator=gen, requires_grad=True)

    def run():
        with torch.no_grad():
            A @ X, Y @ A  # the rectangle form of A and of A^T
        (B @ X).sum().backward()
        (Y @ B).sum().backward()

    run()

    def boom(*args, **kwargs):
        raise AssertionError("host read-back inside a product")

    for attr in ("item", "tolist", "__int__", "__bool__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, attr, boom)
    run()


# ------------------------------------------------------------------ issue 10
def test_blocksparse_refuses_repeated_block_position():
    blocks = torch.ones(3, 2, 2)
    with pytest.raises(ValueError, match=r"block position \(1, 0\) is stored 2 times"):
        ga.BlockSparse((4, 4), (2, 2), [1, 0, 1], [0, 1, 0], blocks)
    ga.BlockSparse((4, 4), (2, 2), [1, 0, 1], [0, 1, 1], blocks)  # distinct positions: fine


@pytest.mark.parametrize(("shape", "budget"), [((16, 20), 1.0), ((40, 12), 0.5), ((5, 70), 0.5)])
def test_blocksparse_default_block_shape_adapts_to_small_matrices(shape, budget):
    W = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    A = ga.project(W, "blocksparse", budget)  # (32, 32) used to raise "does not fit"
    # (32, 32) clipped to a quarter of each side, so small matrices get several blocks
    assert A.block_shape == (min(32, max(1, shape[0] // 4)), min(32, max(1, shape[1] // 4)))
    assert A.block_shape == ga.formats.blocksparse.default_block_shape(*shape)
    assert 0 < A.flops <= budget * shape[0] * shape[1]
    with pytest.raises(ValueError, match="does not fit"):
        ga.project(W, "blocksparse", 0.5, block_shape=(64, 64))  # explicit: still refused


# ----------------------------------------------------------------------- CUDA
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("name", "shape", "A"), CASES, ids=IDS)
def test_cuda_products_transposes_and_gradients(name, shape, A, gen):
    C = A.to(device="cuda")
    m, n = shape
    D = C.to_dense()
    X = torch.randn(n, ROW_FORM_BELOW + 8, dtype=torch.float64, device="cuda")
    Y = torch.randn(5, m, dtype=torch.float64, device="cuda")
    C @ X, Y @ C, C @ X[:, 0]  # warm the caches before checking for synchronisations
    if name != "gblr":  # GBLR's product belongs to formats/gblr.py
        torch.cuda.set_sync_debug_mode("error")
    try:
        got = (C @ X, C @ X[:, 0], C @ X[:, :3], Y @ C, C.T @ Y.T)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    want = (D @ X, D @ X[:, 0], D @ X[:, :3], Y @ D, D.T @ Y.T)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(C.T.to_dense(), D.T, rtol=0, atol=1e-12)
    G = torch.randn(m, 3, dtype=torch.float64, device="cuda")
    got = _grads(C, X[:, :3], G, left=False, dense=False)
    want = _grads(C, X[:, :3], G, left=False, dense=True)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_products_of_a_matrix_without_float_tensors():
    """An empty GBLR (no components) still multiplies (its dtype comes from its metadata)."""
    G = ga.GBLR.zeros((4, 5), dtype=torch.float64)
    assert torch.equal(G @ torch.ones(5, dtype=torch.float64), torch.zeros(4, dtype=torch.float64))
    assert torch.equal(torch.ones(3, 4, dtype=torch.float64) @ G,
                       torch.zeros(3, 5, dtype=torch.float64))
