"""Permuted: row/column permutations around any structured matrix."""

from __future__ import annotations

import pytest
import torch
from catalogue import CATALOGUE

import gblr_approx as ga
from gblr_approx.formats.permuted import Permuted

INNER = ["lowrank", "blocksparse", "blocklowrank", "monarch", "blast", "dense"]


def make(name, shape=(24, 40), seed=0, rows=True, cols=True):
    gen = torch.Generator().manual_seed(seed)
    inner = CATALOGUE[name](shape, torch.float64, gen)
    m, n = shape
    rp = torch.randperm(m, generator=gen) if rows else None
    cp = torch.randperm(n, generator=gen) if cols else None
    return Permuted(inner, rp, cp), inner, rp, cp


@pytest.mark.parametrize("name", INNER)
@pytest.mark.parametrize("rows,cols", [(True, True), (True, False), (False, True)])
def test_definition_product_transpose(name, rows, cols):
    A, inner, rp, cp = make(name, rows=rows, cols=cols)
    D = inner.to_dense()
    ref = D
    if rp is not None:
        ref = ref[rp]
    if cp is not None:
        ref = ref[:, cp]
    # A[a, b] = inner[row_perm[a], col_perm[b]]
    assert torch.equal(A.to_dense(), ref)
    X = torch.randn(40, 3, dtype=torch.float64)
    torch.testing.assert_close(A @ X, ref @ X, rtol=1e-12, atol=1e-12)
    x = torch.randn(40, dtype=torch.float64)
    torch.testing.assert_close(A @ x, ref @ x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(A.T.to_dense(), ref.T, rtol=0, atol=1e-12)
    assert isinstance(A.T, Permuted)
    assert A.flops == inner.flops and A.num_params == inner.num_params
    assert A.dtype == torch.float64


@pytest.mark.parametrize("name", INNER)
def test_save_load_nests_inner_format(name, tmp_path):
    A, inner, _, _ = make(name, shape=(30, 45), seed=3)
    inner.info = {"inner": "note"}
    A.info = {"outer": 1}
    B = ga.load(A.save(tmp_path / "p.safetensors"))
    assert isinstance(B, Permuted) and type(B.inner) is type(inner)
    assert B.inner.info == {"inner": "note"} and B.info == {"outer": 1}
    for k, t in A._tensors().items():
        assert torch.equal(t, B._tensors()[k]), k
    torch.testing.assert_close(B.to_dense(), A.to_dense(), rtol=0, atol=1e-14)
    C = A.to(dtype=torch.float32)
    assert isinstance(C, Permuted) and C.dtype == torch.float32
    torch.testing.assert_close(C.to_dense(), A.to_dense().float())


def test_identity_and_validation():
    A, inner, _, _ = make("lowrank", rows=False, cols=False)
    assert torch.equal(A.to_dense(), inner.to_dense())
    assert "identity" in repr(A)
    with pytest.raises(ValueError, match="permutation"):
        Permuted(inner, torch.zeros(24, dtype=torch.long))
    with pytest.raises(ValueError, match="length 40"):
        Permuted(inner, None, torch.arange(39))
    with pytest.raises(TypeError, match="StructuredMatrix"):
        Permuted(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="wrapper"):
        ga.project(torch.randn(4, 4), "permuted", 0.5)


def test_nested_permuted_round_trip(tmp_path):
    A, _, _, _ = make("blast")
    B = Permuted(A, torch.randperm(24), None)
    C = ga.load(B.save(tmp_path / "nested.safetensors"))
    torch.testing.assert_close(C.to_dense(), B.to_dense(), rtol=0, atol=1e-14)
