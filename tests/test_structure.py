"""Block-energy maps, per-block ranks and GBLR coverage against hand-computed values."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import gblr_approx as ga


def test_block_energy_known_blocks():
    W = torch.zeros(6, 9, dtype=torch.float64)
    W[0:3, 3:6] = 1.0  # 9 units of energy
    W[3:6, 6:9] = 2.0  # 36 units
    be = ga.block_energy(W, grid=(2, 3))
    expected = torch.tensor([[0.0, 0.2, 0.0], [0.0, 0.0, 0.8]], dtype=torch.float64)
    torch.testing.assert_close(be.energy, expected)
    assert be.row_edges.tolist() == [0, 3, 6] and be.col_edges.tolist() == [0, 3, 6, 9]
    torch.testing.assert_close(be.density, expected * 6)  # each block is 1/6 of the entries
    assert be.concentration == pytest.approx(1 / 6)  # one block of six holds >= half


def test_block_energy_ragged_grid():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(7, 5, generator=g, dtype=torch.float64)
    be = ga.block_energy(W, grid=2)
    assert be.row_edges.tolist() == [0, 3, 7] and be.col_edges.tolist() == [0, 2, 5]
    total = float((W**2).sum())
    assert float(be.energy[1, 0]) == pytest.approx(float((W[3:, :2] ** 2).sum()) / total)
    assert float(be.energy.sum()) == pytest.approx(1.0)
    torch.testing.assert_close(be.area.sum(), torch.tensor(1.0, dtype=torch.float64))
    assert float(be.area[1, 1]) == pytest.approx(12 / 35)
    with pytest.raises(ValueError, match="grid"):
        ga.block_energy(W, grid=(8, 2))


def test_block_ranks():
    g = torch.Generator().manual_seed(1)
    W = torch.zeros(8, 10, dtype=torch.float64)
    W[:4, :5] = torch.outer(torch.randn(4, generator=g, dtype=torch.float64),
                            torch.randn(5, generator=g, dtype=torch.float64))
    # block (1, 1): singular values 3 and 1 -> 90 % of the energy at rank 1
    U, _ = torch.linalg.qr(torch.randn(4, 2, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(5, 2, generator=g, dtype=torch.float64))
    W[4:, 5:] = U @ torch.diag(torch.tensor([3.0, 1.0], dtype=torch.float64)) @ V.T
    br = ga.block_ranks(W, grid=(2, 2), energy=0.9)
    assert br.numerical_rank.tolist() == [[1, 0], [0, 2]]
    assert br.energy_rank.tolist() == [[1, 0], [0, 1]]
    assert br.max_rank.tolist() == [[4, 4], [4, 4]]
    assert ga.block_ranks(W, grid=(2, 2), energy=0.95).energy_rank.tolist() == [[1, 0], [0, 2]]
    # a loose tolerance drops the small singular value
    assert ga.block_ranks(W, grid=(2, 2), rtol=0.5).numerical_rank[1, 1] == 1


def _coverage_by_hand(m, n, comps):
    count = [[0] * n for _ in range(m)]
    rsum = [[0] * n for _ in range(m)]
    for rs, rw, cs, cw, r in comps:
        if r == 0:
            continue
        for t in range(min(rw, m)):
            for u in range(min(cw, n)):
                i, j = (rs + t) % m, (cs + u) % n
                count[i][j] += 1
                rsum[i][j] += r
    return count, rsum


def test_gblr_coverage_wraps_and_overlaps():
    m, n = 6, 5
    comps = [(4, 3, 3, 3, 2),   # rows 4, 5, 0 and columns 3, 4, 0 (both wrap around)
             (0, 2, 0, 2, 1),   # rows 0-1, columns 0-1
             (2, 0, 1, 4, 3),   # zero width: covers nothing
             (1, 9, 2, 1, 1)]   # width above m: every row, column 2
    cols = [torch.tensor(c) for c in zip(*comps, strict=True)]
    G = SimpleNamespace(shape=(m, n), row_start=cols[0], row_width=cols[1], col_start=cols[2],
                        col_width=cols[3], ranks=cols[4])
    cov = ga.gblr_coverage(G)
    count, rsum = _coverage_by_hand(m, n, comps)
    assert cov.count.tolist() == count
    assert cov.rank_sum.tolist() == rsum
    assert cov.count[0, 0] == 2 and cov.rank_sum[0, 0] == 3
    covered = sum(c > 0 for row in count for c in row)
    overlapped = sum(c > 1 for row in count for c in row)
    assert cov.covered_fraction == pytest.approx(covered / 30)
    assert cov.overlap_fraction == pytest.approx(overlapped / covered)
    s = cov.summary()
    assert s["components"] == 4 and s["active_components"] == 3
    assert s["row_width"] == {"min": 2, "median": 3.0, "mean": pytest.approx(11 / 3), "max": 6}
    assert s["rank"]["max"] == 2


def test_gblr_coverage_rejects_other_objects():
    with pytest.raises(TypeError, match="row_start"):
        ga.gblr_coverage(ga.LowRank(torch.ones(3, 1), torch.ones(2, 1)))


def test_gblr_coverage_of_embedded_formats():
    try:
        from gblr_approx.formats.gblr import GBLR
    except ImportError:
        pytest.skip("GBLR format not installed yet")
    g = torch.Generator().manual_seed(0)
    L = ga.project(torch.randn(12, 10, generator=g), "lowrank", 3 * 22)
    cov = ga.gblr_coverage(GBLR.from_lowrank(L))
    assert cov.covered_fraction == 1.0
    assert (cov.rank_sum == 3).all()  # rank 3 spread over the whole matrix, however split
    W = torch.zeros(12, 12)
    W[0:4, 4:8] = 1.0
    W[8:12, 0:4] = 2.0
    S = ga.project(W, "blocksparse", 32, block_shape=(4, 4))
    cov = ga.gblr_coverage(GBLR.from_blocksparse(S))
    assert cov.overlap_fraction == 0.0
    assert cov.count[0:4, 4:8].min() == 1 and cov.count[8:12, 0:4].min() == 1
    assert int((cov.count > 0).sum()) == 32


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_block_ranks_use_the_input_dtype_like_spectrum(dtype):
    g = torch.Generator().manual_seed(0)
    W = (torch.randn(128, 5, generator=g) @ torch.randn(5, 128, generator=g)).to(dtype)
    br = ga.block_ranks(W, grid=(2, 2))
    # the float64 tolerance counted the storage rounding as rank (64 in every block)
    assert br.numerical_rank.tolist() == [[5, 5], [5, 5]]
    assert ga.spectrum(W).numerical_rank == 5
