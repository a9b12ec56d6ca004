"""Generic checks run over every format and shape in the catalogue."""

from __future__ import annotations

import pytest
import torch
from catalogue import instances

import gblr_approx as ga

CASES = list(instances())
IDS = [f"{name}-{m}x{n}" for name, (m, n), _ in CASES]


@pytest.mark.parametrize(("name", "shape", "A"), CASES, ids=IDS)
def test_shape_dtype_and_registry(name, shape, A):
    assert A.shape == shape
    assert A.dtype == torch.float64
    assert A.format_name == name
    assert ga.FORMATS[name] is type(A)
    assert A.to_dense().shape == shape


@pytest.mark.parametrize(("name", "shape", "A"), CASES, ids=IDS)
def test_matmul_matches_dense(name, shape, A, gen):
    m, n = shape
    D = A.to_dense()
    x = torch.randn(n, dtype=torch.float64, generator=gen)
    X = torch.randn(n, 4, dtype=torch.float64, generator=gen)
    torch.testing.assert_close(A @ x, D @ x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(A @ X, D @ X, rtol=1e-12, atol=1e-12)
    # numpy operands and left multiplication
    torch.testing.assert_close(A @ X.numpy(), D @ X, rtol=1e-12, atol=1e-12)
    Y = torch.randn(3, m, dtype=torch.float64, generator=gen)
    torch.testing.assert_close(Y @ A, Y @ D, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("name", "shape", "A"), CASES, ids=IDS)
def test_matmul_never_densifies(name, shape, A, gen, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("to_dense called inside @")

    monkeypatch.setattr(type(A), "to_dense", boom)
    A @ torch.randn(shape[1], 2, dtype=torch.float64, generator=gen)


@pytest.mark.parametrize(("name", "shape", "A"), CASES, ids=IDS)
def test_transpose(name, shape, A):
    T = A.T
    assert T.shape == shape[::-1]
    assert T.format_name == A.format_name
    torch.testing.assert_close(T.to_dense(), A.to_dense().T, rtol=0, atol=1e-12)
    torch.testing.assert_close(T.T.to_dense(), A.to_dense(), rtol=0, atol=1e-12)


@pytest.mark.parametrize(("name", "shape", "A"), CASES, ids=IDS)
def test_save_load_bit_exact(name, shape, A, tmp_path):
    A.info = {"note": "provenance survives"}
    path = A.save(tmp_path / f"{name}.safetensors")
    B = ga.load(path)
    assert type(B) is type(A) and B.shape == A.shape
    for k, t in A._tensors().items():  # stored numbers: bit-exact
        assert torch.equal(t, B._tensors()[k]), k
        assert t.dtype == B._tensors()[k].dtype
    # (BLAS may round differently for differently aligned copies, hence not torch.equal)
    torch.testing.assert_close(B.to_dense(), A.to_dense(), rtol=1e-14, atol=1e-14)
    assert B.flops == A.flops and B.num_params == A.num_params
    assert B.info["note"] == "provenance survives"


@pytest.mark.parametrize(("name", "shape", "A"), CASES, ids=IDS)
def test_to_dtype(name, shape, A):
    B = A.to(dtype=torch.float32)
    assert B.dtype == torch.float32 and type(B) is type(A)
    torch.testing.assert_close(B.to_dense(), A.to_dense().float(), rtol=1e-6, atol=1e-6)
    assert B.to(device="cpu").device.type == "cpu"
    with pytest.raises(TypeError, match="floating-point"):
        A.to(dtype=torch.int32)  # (used to return a matrix of integer factors)


def _counted_macs(A) -> int:
    """MACs counted from the stored factors, independently of ``A.flops``."""
    m, n = A.shape
    if isinstance(A, ga.Dense):
        return m * n
    if isinstance(A, ga.LowRank):
        return A.U.numel() + A.V.numel()
    if isinstance(A, ga.BlockSparse):
        # in-matrix entries of the stored blocks = non-zero pattern of the dense matrix
        pattern = torch.zeros(m, n, dtype=torch.bool)
        br, bc = A.block_shape
        for i, j in zip(A.block_rows.tolist(), A.block_cols.tolist(), strict=True):
            pattern[i * br : (i + 1) * br, j * bc : (j + 1) * bc] = True
        return int(pattern.sum())
    if isinstance(A, ga.BlockLowRank):
        return sum(U.numel() + V.numel() for row in A.factors for U, V in row)
    if isinstance(A, ga.Monarch):
        return A.w1.numel() + A.w2.numel()
    return None


@pytest.mark.parametrize(("name", "shape", "A"), CASES, ids=IDS)
def test_flops_equal_counted_macs(name, shape, A):
    counted = _counted_macs(A)
    if counted is None:
        pytest.skip("format counts its own MACs in its own test module")
    assert A.flops == counted
    assert isinstance(A.flops, int) and isinstance(A.num_params, int)


# ------------------------------------------------- hunt s9 (formats): generic regressions
def _with_tensors(A, change):
    """Rebuild ``A`` from its state with ``change(name, tensor)`` applied to every tensor."""
    tensors = {k: change(k, t) for k, t in A._tensors().items()}
    return type(A)._from_state(tensors, A._config(), A.shape)


@pytest.mark.parametrize(("name", "shape", "A"), CASES, ids=IDS)
def test_constructors_refuse_integer_and_mixed_factors(name, shape, A):
    floats = [k for k, t in A._tensors().items() if t.is_floating_point()]
    # integer factors: A @ x used to cast x to integers (silently wrong numbers)
    with pytest.raises(TypeError, match="factors must be floating point"):
        _with_tensors(A, lambda k, t: t.round().long() if k == floats[0] else t)
    if len(floats) > 1:  # mixed dtypes: used to fail only later, inside torch
        with pytest.raises(ValueError, match="all factors must share dtype and device"):
            _with_tensors(A, lambda k, t: t.float() if k == floats[-1] else t)


@pytest.mark.parametrize(("name", "shape", "A"), CASES, ids=IDS)
def test_numpy_left_operand(name, shape, A, gen):
    m, n = shape
    D = A.to_dense()
    y = torch.randn(m, dtype=torch.float64, generator=gen)
    Y = torch.randn(3, m, dtype=torch.float64, generator=gen)
    out = y.numpy() @ A  # used to fail inside numpy (A wrapped as a 0-d object array)
    assert isinstance(out, torch.Tensor)
    torch.testing.assert_close(out, y @ D, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(Y.numpy() @ A, Y @ D, rtol=1e-12, atol=1e-12)
    assert isinstance(A @ torch.ones(n, 2, dtype=torch.float64).numpy(), torch.Tensor)


@pytest.mark.parametrize(("name", "shape", "A"), CASES, ids=IDS)
def test_to_positional_dtype(name, shape, A):
    B = A.to(torch.float32)  # as torch.Tensor.to: used to raise torch's overload error
    assert B.dtype == torch.float32 and type(B) is type(A)
    torch.testing.assert_close(B.to_dense(), A.to(dtype=torch.float32).to_dense(), rtol=0, atol=0)
    assert A.to("cpu", torch.float32).dtype == torch.float32
    with pytest.raises(TypeError, match="two dtypes"):
        A.to(torch.float32, dtype=torch.float64)


@pytest.mark.parametrize("grad", [False, True], ids=["plain", "autograd"])
@pytest.mark.parametrize(("name", "shape", "A"), CASES, ids=IDS)
def test_empty_batch_products(name, shape, A, grad):
    m, n = shape
    if grad:
        A = _with_tensors(A, lambda k, t: t.clone().requires_grad_(True)
                          if t.is_floating_point() else t)
    X = torch.randn(n, 0, dtype=torch.float64)
    assert (A @ X).shape == (m, 0)
    assert (torch.randn(0, m, dtype=torch.float64) @ A).shape == (0, n)
    assert (A.T @ torch.randn(m, 0, dtype=torch.float64)).shape == (n, 0)
    assert (torch.randn(0, n, dtype=torch.float64) @ A.T).shape == (0, m)


@pytest.mark.parametrize(("name", "shape", "A"), CASES, ids=IDS)
def test_scaled_is_linear_in_one_factor(name, shape, A):
    B = A._scaled(2.0**-40)  # (fits rescale their result this way: formats.base.fit_scale)
    assert type(B) is type(A) and B.flops == A.flops
    torch.testing.assert_close(B.to_dense(), A.to_dense() * 2.0**-40, rtol=1e-13, atol=0)
