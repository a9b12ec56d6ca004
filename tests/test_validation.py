"""Every bad input raises a clear error that names the argument."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import gblr_approx as ga

W = torch.randn(12, 16, dtype=torch.float64)


@pytest.mark.parametrize(
    ("bad", "exc", "pattern"),
    [
        (torch.randn(3, 4, 5), ValueError, "W must be a 2-D"),
        (torch.randn(5), ValueError, "W must be a 2-D"),
        (torch.zeros(0, 4), ValueError, "W must be non-empty"),
        (torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), ValueError, "W contains 1 NaN or Inf"),
        (torch.tensor([[1.0, float("inf")], [0.0, 1.0]]), ValueError, "W contains 1 NaN or Inf"),
        (torch.ones(3, 3, dtype=torch.int64), TypeError, "W must have a floating-point dtype"),
        (torch.ones(3, 3, dtype=torch.bool), TypeError, "W must have a floating-point dtype"),
        (torch.ones(3, 3, dtype=torch.complex64), TypeError, "W must be real"),
        (np.ones((3, 3), dtype=np.int32), TypeError, "W must have a floating-point dtype"),
        ("matrix", TypeError, "W must be a torch.Tensor or numpy.ndarray"),
    ],
)
@pytest.mark.parametrize("fmt", ["lowrank", "blocksparse", "blocklowrank", "monarch"])
def test_bad_matrix(bad, exc, pattern, fmt):
    with pytest.raises(exc, match=pattern):
        ga.project(bad, fmt, 0.5)


@pytest.mark.parametrize(
    ("budget", "exc", "pattern"),
    [
        (0.0, ValueError, r"budget as a float .* must lie in \(0, 1\]; got 0.0"),
        (-0.5, ValueError, "budget as a float"),
        (1.5, ValueError, "budget as a float .* got 1.5"),
        (float("nan"), ValueError, "budget as a float"),
        (0, ValueError, "budget must be an int >= 1"),
        (-3, ValueError, "budget must be an int >= 1"),
        ("0.5", TypeError, "budget must be a float"),
        (True, TypeError, "budget must be a float"),
    ],
)
def test_bad_budget(budget, exc, pattern):
    with pytest.raises(exc, match=pattern):
        ga.project(W, "lowrank", budget)


@pytest.mark.parametrize(
    ("fmt", "budget", "options", "min_budget"),
    [
        ("lowrank", 27, {}, 28),
        ("blocksparse", 3, {"block_shape": (2, 2)}, 4),
        ("blocklowrank", 6, {"grid": (2, 2)}, 14),
        ("dense", 100, {}, 192),
    ],
)
def test_budget_too_small_names_smallest(fmt, budget, options, min_budget):
    with pytest.raises(ga.InfeasibleBudgetError, match=f"smallest feasible budget is {min_budget}"):
        ga.project(W, fmt, budget, **options)


@pytest.mark.parametrize(
    ("fmt", "options", "exc", "pattern"),
    [
        ("blocksparse", {"block_shape": (13, 4)}, ValueError, "block_shape=.* does not fit"),
        ("blocksparse", {"block_shape": (0, 4)}, ValueError, r"block_shape\[0\] must be"),
        ("blocksparse", {"block_shape": "big"}, TypeError, "block_shape must be an int or a pair"),
        ("blocklowrank", {"grid": (13, 2)}, ValueError, "grid=.* asks for more blocks"),
        ("blocklowrank", {"grid": 2.5}, TypeError, "grid must be an int or a pair"),
        ("monarch", {"blocks": 5}, ValueError, "blocks=5"),
        ("monarch", {"rank": 0}, ValueError, "rank must be an integer >= 1"),
        ("lowrank", {"method": "magic"}, ValueError, "method must be"),
        ("lowrank", {"colour": 1}, TypeError, "colour"),
    ],
)
def test_bad_format_options(fmt, options, exc, pattern):
    with pytest.raises(exc, match=pattern):
        ga.project(W, fmt, 0.5, **options)


def test_unknown_format():
    with pytest.raises(ValueError, match="unknown format 'sparse'; known formats: .*lowrank"):
        ga.project(W, "sparse", 0.5)


def test_matmul_operand_checks():
    A = ga.project(W, "lowrank", 0.5)
    with pytest.raises(ValueError, match="X has 5 rows but the operator has 16 columns"):
        A @ torch.randn(5)
    with pytest.raises(ValueError, match="X must be a vector"):
        A @ torch.randn(16, 2, 2)
    with pytest.raises(TypeError, match="X must have a floating-point dtype"):
        A @ torch.ones(16, dtype=torch.long)


def test_relative_error_checks():
    with pytest.raises(ValueError, match="ord must be"):
        ga.relative_error(W, W, ord=1)
    with pytest.raises(ValueError, match="A has shape"):
        ga.relative_error(W, W.T)
    assert ga.relative_error(W, W) == 0.0
    assert ga.relative_error(torch.zeros(2, 2), torch.zeros(2, 2)) == 0.0


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        ga.load(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable .safetensors file"):
        ga.load(bad)


@pytest.mark.parametrize(
    ("opts", "exc", "pattern"),
    [
        ({"oversample": -9}, ValueError, "oversample must be an integer >= 0; got -9"),
        ({"oversample": -1}, ValueError, "oversample must be an integer >= 0"),
        ({"power_iters": -1}, ValueError, "power_iters must be an integer >= 0; got -1"),
        ({"oversample": 2.5}, TypeError, "oversample must be an integer"),
        ({"power_iters": "2"}, TypeError, "power_iters must be an integer"),
    ],
)
@pytest.mark.parametrize("method", ["randomized", "exact"])
def test_randomized_lowrank_refuses_bad_sketch(opts, exc, pattern, method):
    # before: oversample=-9 silently gave a rank-0 sketch and power_iters=-1 was accepted
    with pytest.raises(exc, match=pattern):
        ga.project(W, "lowrank", 0.5, method=method, **opts)


def test_randomized_svd_refuses_bad_sketch_directly():
    from gblr_approx.linalg import randomized_svd

    with pytest.raises(ValueError, match="oversample"):
        randomized_svd(W, 3, oversample=-9)
    with pytest.raises(ValueError, match="power_iters"):
        randomized_svd(W, 3, power_iters=-1)
    U, S, Vh = randomized_svd(W, 3, oversample=0, power_iters=0)  # zero is valid
    assert U.shape == (12, 3) and S.shape == (3,) and Vh.shape == (3, 16)


# ------------------------------------------------- hunt s9 (formats): constructor checks
def _constructors(dtype_a, dtype_b):
    """Each format built from factors of ``dtype_a`` and (where it has two) ``dtype_b``."""
    def t(*shape, dtype):
        return torch.arange(int(np.prod(shape))).reshape(shape).to(dtype)

    a, b = dtype_a, dtype_b
    return {
        "Dense": lambda: ga.Dense(t(3, 3, dtype=a)),
        "LowRank": lambda: ga.LowRank(t(4, 2, dtype=a), t(6, 2, dtype=b)),
        "Monarch": lambda: ga.Monarch(t(2, 4, 3, dtype=a), t(2, 2, 4, dtype=b)),
        "BLAST": lambda: ga.BLAST(t(4, 2, dtype=a), t(6, 2, dtype=b), t(2, 2, 2, dtype=a)),
        "BlockSparse": lambda: ga.BlockSparse((4, 4), (2, 2), [0], [1], t(1, 2, 2, dtype=a)),
        "BlockLowRank": lambda: ga.BlockLowRank(
            (4, 6), [0, 4], [0, 6], [[(t(4, 1, dtype=a), t(6, 1, dtype=b))]]),
        "GBLR": lambda: ga.GBLR((4, 6), [0], [4], [0], [6], [(t(4, 1, dtype=a), t(6, 1, dtype=b))]),
    }


@pytest.mark.parametrize("fmt", list(_constructors(torch.int64, torch.int64)))
def test_constructors_refuse_integer_factors(fmt):
    with pytest.raises(TypeError, match="factors must be floating point"):
        _constructors(torch.int64, torch.int64)[fmt]()  # used to truncate x in A @ x
    _constructors(torch.float64, torch.float64)[fmt]()  # floating point: fine


@pytest.mark.parametrize("fmt", ["LowRank", "Monarch", "BLAST", "BlockLowRank", "GBLR"])
def test_constructors_refuse_mixed_dtypes(fmt):
    with pytest.raises(ValueError, match="all factors must share dtype and device"):
        _constructors(torch.float32, torch.float64)[fmt]()


def test_blocksparse_refuses_bad_block_shape_and_float_coordinates():
    with pytest.raises(ValueError, match=r"block_shape\[0\] must be an integer >= 1"):
        ga.BlockSparse((4, 4), (0, 2), [0], [0], torch.randn(1, 0, 2))  # was ZeroDivisionError
    with pytest.raises(TypeError, match="block_shape"):
        ga.BlockSparse((4, 4), (2.0, 2), [0], [0], torch.randn(1, 2, 2))
    with pytest.raises(TypeError, match="block_rows must hold integers"):
        ga.BlockSparse((4, 4), (2, 2), [0.5], [0], torch.randn(1, 2, 2))  # was truncated to 0
    with pytest.raises(TypeError, match="block_cols must hold integers"):
        ga.BlockSparse((4, 4), (2, 2), [0], torch.tensor([1.0]), torch.randn(1, 2, 2))
    empty = ga.BlockSparse((4, 4), (2, 2), [], [], torch.randn(0, 2, 2))  # no blocks: fine
    assert empty.flops == 0
