"""GBLR format: intervals, products, cost, transpose, save/load and exact embeddings."""

from __future__ import annotations

import pytest
import torch

import gblr_approx as ga
from gblr_approx.formats.gblr import GBLR


def random_gblr(m, n, K=5, seed=0, dtype=torch.float64, max_rank=3):
    gen = torch.Generator().manual_seed(seed)
    rs = torch.randint(0, m, (K,), generator=gen)
    cs = torch.randint(0, n, (K,), generator=gen)
    rw = torch.randint(1, m + 1, (K,), generator=gen)
    cw = torch.randint(1, n + 1, (K,), generator=gen)
    factors = []
    for k in range(K):
        r = int(torch.randint(1, max_rank + 1, (1,), generator=gen))
        h, w = int(rw[k]), int(cw[k])
        factors.append(
            (
                torch.randn(h, r, generator=gen, dtype=dtype),
                torch.randn(w, r, generator=gen, dtype=dtype),
            )
        )
    return GBLR((m, n), rs, rw, cs, cw, factors)


def dense_reference(G):
    m, n = G.shape
    D = torch.zeros(m, n, dtype=G.dtype)
    for k in range(G.num_components):
        U, V = G.component(k)
        for a, i in enumerate(G.row_indices(k).tolist()):
            for b, j in enumerate(G.col_indices(k).tolist()):
                D[i, j] += (U[a] * V[b]).sum()
    return D


@pytest.mark.parametrize("shape", [(16, 16), (24, 40), (40, 24), (7, 3), (1, 5)])
def test_dense_matches_definition_and_matmul(shape):
    m, n = shape
    G = random_gblr(m, n, K=6, seed=m * 100 + n)
    D = dense_reference(G)
    assert torch.allclose(G.to_dense(), D, atol=1e-12)
    X = torch.randn(n, 3, dtype=torch.float64)
    assert torch.allclose(G @ X, D @ X, atol=1e-10)
    x = torch.randn(n, dtype=torch.float64)
    assert torch.allclose(G @ x, D @ x, atol=1e-10)
    assert torch.allclose(G.T.to_dense(), D.T, atol=1e-12)
    assert isinstance(G.T, GBLR)


def test_wraparound_block_positions():
    # one rank-1 component starting at row 3 (of 5) with width 4 covers rows 3, 4, 0, 1
    U = torch.ones(4, 1, dtype=torch.float64)
    V = torch.ones(2, 1, dtype=torch.float64)
    G = GBLR((5, 6), [3], [4], [5], [2], [(U, V)])
    D = G.to_dense()
    assert D[:, 5].tolist() == [1, 1, 0, 1, 1] and D[:, 0].tolist() == [1, 1, 0, 1, 1]
    assert float(D.sum()) == 8.0
    assert G.flops == 6  # min(1 * (4 + 2), 4 * 2)


def test_cost_is_min_of_factor_and_dense_and_matches_params():
    gen = torch.Generator().manual_seed(3)
    # rank 3 on a 4 x 2 block: factor cost 18 > dense 8 -> stored dense
    U = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    V = torch.randn(2, 3, generator=gen, dtype=torch.float64)
    U2 = torch.randn(10, 1, generator=gen, dtype=torch.float64)
    V2 = torch.randn(12, 1, generator=gen, dtype=torch.float64)
    G = GBLR((16, 16), [0, 5], [4, 10], [0, 3], [2, 12], [(U, V), (U2, V2)])
    assert G.is_dense.tolist() == [True, False]
    assert G.ranks.tolist() == [2, 1]
    assert G.flops == 8 + 22 == G.num_params
    assert G.component_costs().tolist() == [8, 22]
    Uc, Vc = G.component(0)
    assert torch.allclose(Uc @ Vc.T, U @ V.T, atol=1e-12)
    assert G.num_components == 2


def test_save_load_bit_exact(tmp_path):
    G = random_gblr(20, 30, K=7, seed=5, dtype=torch.float32)
    G.info = {"note": "x"}
    p = G.save(tmp_path / "g.safetensors")
    H = ga.load(p)
    assert isinstance(H, GBLR)
    assert torch.equal(H.to_dense(), G.to_dense())
    for a in ("row_start", "row_width", "col_start", "col_width", "ranks", "is_dense"):
        assert torch.equal(getattr(H, a), getattr(G, a))
    assert H.flops == G.flops and H.dtype == torch.float32 and H.info == {"note": "x"}


def test_to_and_empty():
    G = random_gblr(8, 9, K=3, seed=1, dtype=torch.float64)
    H = G.to(dtype=torch.float32)
    assert H.dtype == torch.float32 and torch.allclose(
        H.to_dense().double(), G.to_dense(), atol=1e-5
    )
    Z = GBLR.zeros((4, 5), dtype=torch.float64)
    assert Z.flops == 0 and Z.num_components == 0 and Z.dtype == torch.float64
    assert torch.equal(Z @ torch.ones(5, dtype=torch.float64), torch.zeros(4, dtype=torch.float64))


def test_constructor_errors():
    U = torch.ones(3, 1)
    V = torch.ones(2, 1)
    with pytest.raises(ValueError, match="row_start"):
        GBLR((4, 4), [4], [3], [0], [2], [(U, V)])
    with pytest.raises(ValueError, match="col_width"):
        GBLR((4, 4), [0], [3], [0], [5], [(U, V)])
    with pytest.raises(ValueError, match="component 0"):
        GBLR((4, 4), [0], [2], [0], [2], [(U, V)])
    with pytest.raises(ValueError, match="one entry per component"):
        GBLR((4, 4), [0, 1], [3], [0], [2], [(U, V)])
    with pytest.raises(TypeError, match="integers"):
        GBLR((4, 4), [0.5], [3], [0], [2], [(U, V)])


# ------------------------------------------------------------------ embeddings
@pytest.mark.parametrize("shape", [(24, 40), (33, 17)])
def test_from_lowrank_exact_same_cost(shape):
    m, n = shape
    gen = torch.Generator().manual_seed(0)
    L = ga.LowRank(
        torch.randn(m, 4, generator=gen, dtype=torch.float64),
        torch.randn(n, 4, generator=gen, dtype=torch.float64),
    )
    G = GBLR.from_lowrank(L)
    assert G.flops == L.flops
    assert float((G.to_dense() - L.to_dense()).abs().max()) < 1e-10


@pytest.mark.parametrize(
    "shape,block", [((24, 40), (7, 5)), ((32, 32), (8, 8)), ((10, 13), (10, 1))]
)
def test_from_blocksparse_exact_same_cost(shape, block):
    W = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    S = ga.project(W, "blocksparse", 0.4, block_shape=block)
    G = GBLR.from_blocksparse(S)
    assert G.flops == S.flops
    assert float((G.to_dense() - S.to_dense()).abs().max()) < 1e-10


@pytest.mark.parametrize("shape,grid", [((24, 40), (3, 4)), ((31, 17), (4, 2)), ((16, 16), (1, 1))])
def test_from_blocklowrank_exact_same_cost(shape, grid):
    W = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    B = ga.project(W, "blocklowrank", 0.3, grid=grid)
    G = GBLR.from_blocklowrank(B)
    assert G.flops == B.flops
    assert float((G.to_dense() - B.to_dense()).abs().max()) < 1e-10


def test_catalogue_instances_embed_exactly():
    from catalogue import instances

    for name, _shape, A in instances():
        conv = {
            "lowrank": GBLR.from_lowrank,
            "blocksparse": GBLR.from_blocksparse,
            "blocklowrank": GBLR.from_blocklowrank,
        }.get(name)
        if conv is None:
            continue
        G = conv(A)
        assert G.flops <= A.flops
        assert float((G.to_dense() - A.to_dense()).abs().max()) < 1e-10
