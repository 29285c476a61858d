"""Bad input to the core raises a clear TypeError/ValueError naming the argument."""

from __future__ import annotations

import re

import numpy as np
import pytest

import bca

K32 = np.ones((2, 3, 4), np.float32)
K64 = np.ones((2, 3, 4), np.float64)


def op32() -> bca.BlockCirculant:
    return bca.BlockCirculant(K32, 10, 7)


@pytest.mark.parametrize(
    ("kernel", "exc", "pattern"),
    [
        (np.ones((2, 3, 4), np.int64), TypeError, "kernel must have dtype float32 or float64"),
        (np.ones((2, 3, 4), np.float16), TypeError, "kernel must have dtype float32 or float64"),
        (np.ones((2, 3, 4), np.complex64), TypeError, "kernel must have dtype"),
        ([[[1.0]]], TypeError, "kernel must be a numpy.ndarray"),
        (np.ones((6, 4), np.float32), ValueError, "kernel must have 3 dimensions"),
        (np.ones((2, 0, 4), np.float32), ValueError, "kernel: .*no zero dimension"),
        (np.ones((2, 3, 8), np.float32)[:, :, ::2], ValueError, "kernel must be C-contiguous"),
        (np.full((2, 3, 4), np.nan, np.float32), ValueError, "kernel: contains NaN or Inf"),
        (np.full((2, 3, 4), -np.inf), ValueError, "kernel: contains NaN or Inf"),
    ],
)
def test_bad_kernel(kernel: object, exc: type, pattern: str) -> None:
    with pytest.raises(exc, match=pattern):
        bca.BlockCirculant(kernel)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "exc", "pattern"),
    [
        (
            {"in_features": 8},
            ValueError,
            r"in_features: 8 does not fit .* need 8 < in_features <= 12",
        ),
        ({"in_features": 13}, ValueError, "in_features: 13 does not fit"),
        ({"out_features": 4}, ValueError, "out_features: 4 does not fit"),
        ({"in_features": 0}, ValueError, "in_features must be a positive int"),
        ({"in_features": -3}, ValueError, "in_features must be a positive int"),
        ({"in_features": 10.0}, TypeError, "in_features must be a positive int"),
        ({"out_features": True}, TypeError, "out_features must be a positive int"),
        ({"num_threads": 0}, ValueError, "num_threads must be a positive int"),
        ({"num_threads": "2"}, TypeError, "num_threads must be a positive int"),
    ],
)
def test_bad_features_and_threads(kwargs: dict, exc: type, pattern: str) -> None:
    with pytest.raises(exc, match=pattern):
        bca.BlockCirculant(K32, **kwargs)


@pytest.mark.parametrize(
    ("x", "exc", "pattern"),
    [
        (np.ones((5, 10), np.float64), TypeError, "x must have dtype float32 .*got float64"),
        (np.ones((5, 10), np.int32), TypeError, "x must have dtype float32"),
        ([[0.0] * 10], TypeError, "x must be a numpy.ndarray, got list"),
        (
            np.ones((5, 9), np.float32),
            ValueError,
            re.escape("x: last dimension must be in_features = 10, got shape (5, 9)"),
        ),
        (np.ones((), np.float32), ValueError, "x: last dimension must be in_features"),
        (np.ones((10, 5), np.float32).T, ValueError, "x must be C-contiguous"),
        (np.ones((5, 20), np.float32)[:, ::2], ValueError, "x must be C-contiguous"),
        (np.array([[np.nan] + [0.0] * 9], np.float32), ValueError, "x: contains NaN or Inf"),
        (np.array([[0.0] * 9 + [np.inf]], np.float32), ValueError, "x: contains NaN or Inf"),
    ],
)
def test_bad_x(x: object, exc: type, pattern: str) -> None:
    with pytest.raises(exc, match=pattern):
        op32().matmul(x)  # type: ignore[arg-type]


def test_bad_backward_arguments() -> None:
    op = op32()
    x = np.ones((5, 10), np.float32)
    g = np.ones((5, 7), np.float32)
    with pytest.raises(ValueError, match="x: needed for the kernel gradient"):
        op.backward(None, g)
    with pytest.raises(ValueError, match="grad_output: last dimension must be out_features = 7"):
        op.backward(x, np.ones((5, 8), np.float32))
    with pytest.raises(ValueError, match="same leading dimensions"):
        op.backward(np.ones((4, 10), np.float32), g)
    with pytest.raises(TypeError, match="grad_output must have dtype float32"):
        op.backward(x, g.astype(np.float64))
    with pytest.raises(ValueError, match="grad_output: contains NaN or Inf"):
        op.backward(x, np.full((5, 7), np.nan, np.float32), kernel_grad=False)
    with pytest.raises(ValueError, match="x: contains NaN or Inf"):
        op.backward(np.full((5, 10), np.inf, np.float32), g)
    with pytest.raises(ValueError, match="grad_output must be C-contiguous"):
        op.backward(x, np.ones((7, 5), np.float32).T)


def test_bad_set_kernel() -> None:
    op = op32()
    with pytest.raises(ValueError, match=re.escape("kernel must keep its shape (2, 3, 4)")):
        op.set_kernel(np.ones((2, 3, 5), np.float32))
    with pytest.raises(TypeError, match="kernel must have dtype float32"):
        op.set_kernel(K64)
    with pytest.raises(ValueError, match="kernel: contains NaN or Inf"):
        op.set_kernel(np.full((2, 3, 4), np.nan, np.float32))
    # a failed update leaves the operator as it was
    np.testing.assert_array_equal(op.kernel, K32)


def test_mixed_dtypes_in_one_shot_function() -> None:
    with pytest.raises(TypeError, match="x must have dtype float64"):
        bca.block_circulant_matmul(np.ones((2, 12), np.float32), K64)


def test_overflowing_finite_input_gives_inf_not_a_crash() -> None:
    big = np.full((1, 3, 8), np.finfo(np.float32).max, np.float32)
    x = np.full((2, 24), np.finfo(np.float32).max, np.float32)
    y = bca.BlockCirculant(big)(x)  # no exception, no crash: the values overflow
    assert y.shape == (2, 8)
    assert not np.isfinite(y).all()


def test_num_blocks() -> None:
    assert bca.num_blocks(2304, 256) == 9
    assert bca.num_blocks(768, 768) == 1
    assert bca.num_blocks(11008, 256) == 43
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        bca.num_blocks(10, 0)
