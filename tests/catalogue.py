"""One catalogue of every format at several shapes, for the generic tests.

``CATALOGUE`` maps a format name to a builder ``f(shape, dtype, generator) -> StructuredMatrix``
that returns a random instance of that shape (or ``None`` if the format cannot take it).
Adding a format to the toolkit means adding one builder here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

import gblr_approx as ga
from gblr_approx.formats.blocklowrank import balanced_splits

#: square, rectangular (both ways), non-power-of-two, tiny
SHAPES = [(16, 16), (24, 40), (40, 24), (30, 45), (3, 5), (1, 7)]

Builder = Callable[[tuple[int, int], torch.dtype, torch.Generator], "ga.StructuredMatrix | None"]


def _randn(*shape, dtype, gen):
    return torch.randn(*shape, dtype=dtype, generator=gen)


def build_dense(shape, dtype, gen):
    return ga.Dense(_randn(*shape, dtype=dtype, gen=gen))


def build_lowrank(shape, dtype, gen):
    m, n = shape
    r = max(1, min(m, n) // 3)
    return ga.LowRank(_randn(m, r, dtype=dtype, gen=gen), _randn(n, r, dtype=dtype, gen=gen))


def build_blocksparse(shape, dtype, gen):
    m, n = shape
    br, bc = max(1, min(m, 7)), max(1, min(n, 5))  # usually does not divide: ragged edges
    gr, gc = -(-m // br), -(-n // bc)
    nb = max(1, (gr * gc) // 2)
    sel = torch.randperm(gr * gc, generator=gen)[:nb]
    rows, cols = sel // gc, sel % gc
    blocks = _randn(nb, br, bc, dtype=dtype, gen=gen)
    # zero the padding of edge blocks
    h = (m - rows * br).clamp(max=br)
    w = (n - cols * bc).clamp(max=bc)
    mask = (torch.arange(br)[None, :, None] < h[:, None, None]) & (
        torch.arange(bc)[None, None, :] < w[:, None, None]
    )
    return ga.BlockSparse(shape, (br, bc), rows, cols, blocks * mask)


def build_blocklowrank(shape, dtype, gen):
    m, n = shape
    b1, b2 = min(3, m), min(2, n)
    rs, cs = balanced_splits(m, b1), balanced_splits(n, b2)
    factors = []
    for i in range(b1):
        row = []
        for j in range(b2):
            p, q = rs[i + 1] - rs[i], cs[j + 1] - cs[j]
            r = int(torch.randint(0, min(p, q) + 1, (1,), generator=gen))
            row.append((_randn(p, r, dtype=dtype, gen=gen), _randn(q, r, dtype=dtype, gen=gen)))
        factors.append(row)
    return ga.BlockLowRank(shape, rs, cs, factors)


def build_monarch(shape, dtype, gen):
    m, n = shape
    J = next((d for d in (4, 3, 2, 1) if m % d == 0), 1)
    K = next((d for d in (4, 3, 2, 1) if n % d == 0), 1)
    R = max(1, min(m // J, n // K) // 2)
    w1 = _randn(K, R * J, n // K, dtype=dtype, gen=gen)
    w2 = _randn(J, m // J, K * R, dtype=dtype, gen=gen)
    return ga.Monarch(w1, w2)


def build_blast(shape, dtype, gen):
    m, n = shape
    b1, b2 = min(3, m), min(4, n)  # usually uneven blocks
    r = max(1, min(m, n) // 2)
    U = _randn(m, r, dtype=dtype, gen=gen)
    V = _randn(n, r, dtype=dtype, gen=gen)
    return ga.BLAST(U, V, _randn(b1, b2, r, dtype=dtype, gen=gen))


def build_permuted(shape, dtype, gen):
    m, n = shape
    inner = build_blocklowrank(shape, dtype, gen)
    return ga.Permuted(inner, torch.randperm(m, generator=gen), torch.randperm(n, generator=gen))


def build_gblr(shape, dtype, gen):
    m, n = shape
    K = 4
    rs = torch.randint(0, m, (K,), generator=gen)  # random starts: some intervals wrap around
    cs = torch.randint(0, n, (K,), generator=gen)
    rw = torch.randint(1, m + 1, (K,), generator=gen)
    cw = torch.randint(1, n + 1, (K,), generator=gen)
    factors = []
    for k in range(K):
        h, w = int(rw[k]), int(cw[k])
        r = 1 + k % 2
        factors.append((_randn(h, r, dtype=dtype, gen=gen), _randn(w, r, dtype=dtype, gen=gen)))
    return ga.GBLR(shape, rs, rw, cs, cw, factors)


CATALOGUE: dict[str, Builder] = {
    "dense": build_dense,
    "lowrank": build_lowrank,
    "blocksparse": build_blocksparse,
    "blocklowrank": build_blocklowrank,
    "monarch": build_monarch,
    "blast": build_blast,
    "permuted": build_permuted,
    "gblr": build_gblr,
}


def instances(dtype=torch.float64, seed=0):
    """Yield ``(format_name, shape, instance)`` for every catalogue entry and shape."""
    for name, build in CATALOGUE.items():
        for shape in SHAPES:
            gen = torch.Generator().manual_seed(seed)
            A = build(shape, dtype, gen)
            if A is not None:
                yield name, shape, A
