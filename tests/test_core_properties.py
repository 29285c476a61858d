"""Property tests: every core path equals the dense scipy.linalg.circulant oracle."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import bca
from conftest import TOL, dense_oracle, kernel_grad_oracle, rel_err

BLOCK_SIZES = st.one_of(
    st.sampled_from([1, 2, 3, 4, 5, 7, 8, 13, 16, 17, 31, 32, 64]),
    st.integers(min_value=1, max_value=48),
)


@st.composite
def layers(draw: st.DrawFn) -> dict:
    p = draw(BLOCK_SIZES)
    q_in = draw(st.integers(1, 4))
    q_out = draw(st.integers(1, 4))
    pad_in = draw(st.integers(0, p - 1))
    pad_out = draw(st.integers(0, p - 1))
    leading = draw(st.sampled_from([(0,), (1,), (2,), (7,), (33,), (2, 3), (1, 1, 2)]))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    seed = draw(st.integers(0, 2**32 - 1))
    return dict(
        p=p,
        q_in=q_in,
        q_out=q_out,
        d_in=q_in * p - pad_in,
        d_out=q_out * p - pad_out,
        leading=leading,
        dtype=np.dtype(dtype),
        seed=seed,
    )


def make(case: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(case["seed"])
    dt = case["dtype"]
    kernel = rng.standard_normal((case["q_out"], case["q_in"], case["p"])).astype(dt)
    x = rng.standard_normal((*case["leading"], case["d_in"])).astype(dt)
    g = rng.standard_normal((*case["leading"], case["d_out"])).astype(dt)
    return kernel, x, g


@given(layers())
def test_forward_matches_dense_oracle(case: dict) -> None:
    kernel, x, _ = make(case)
    op = bca.BlockCirculant(kernel, case["d_in"], case["d_out"])
    y = op.matmul(x)
    assert y.dtype == case["dtype"] and y.shape == (*case["leading"], case["d_out"])
    want = x.astype(np.float64) @ dense_oracle(kernel, case["d_in"], case["d_out"]).T
    assert rel_err(y, want) <= TOL[case["dtype"]]


@given(layers())
def test_backward_matches_dense_oracle(case: dict) -> None:
    kernel, x, g = make(case)
    op = bca.BlockCirculant(kernel, case["d_in"], case["d_out"])
    gx, gk = op.backward(x, g)
    assert gx is not None and gk is not None
    assert gx.shape == x.shape and gx.dtype == x.dtype
    assert gk.shape == kernel.shape and gk.dtype == kernel.dtype
    dense = dense_oracle(kernel, case["d_in"], case["d_out"])
    assert rel_err(gx, g.astype(np.float64) @ dense) <= TOL[case["dtype"]]
    assert rel_err(gk, kernel_grad_oracle(x, g, kernel.shape)) <= TOL[case["dtype"]]
    # asking for one gradient gives the same values as asking for both
    gx_only, none_k = op.backward(None, g, kernel_grad=False)
    none_x, gk_only = op.backward(x, g, input_grad=False)
    assert none_k is None and none_x is None
    np.testing.assert_array_equal(gx_only, gx)
    np.testing.assert_array_equal(gk_only, gk)


@given(layers())
def test_dense_matches_scipy_circulant_blocks(case: dict) -> None:
    kernel, _, _ = make(case)
    got = bca.block_circulant_to_dense(kernel, case["d_in"], case["d_out"])
    assert got.dtype == case["dtype"]
    np.testing.assert_array_equal(
        got, dense_oracle(kernel, case["d_in"], case["d_out"]).astype(case["dtype"])
    )


@given(layers())
def test_one_shot_functions_match_operator(case: dict) -> None:
    kernel, x, g = make(case)
    op = bca.BlockCirculant(kernel, case["d_in"], case["d_out"])
    np.testing.assert_array_equal(bca.block_circulant_matmul(x, kernel, case["d_out"]), op(x))
    gx, gk = bca.block_circulant_matmul_backward(x, kernel, g)
    ox, ok = op.backward(x, g)
    np.testing.assert_array_equal(gx, ox)
    np.testing.assert_array_equal(gk, ok)


def test_special_block_sizes(rng: np.random.Generator) -> None:
    """p = 1 is a dense ΔW; p = d is a single circulant matrix."""
    w = rng.standard_normal((5, 3, 1))
    x = rng.standard_normal((4, 3))
    np.testing.assert_allclose(bca.block_circulant_matmul(x, w), x @ w[:, :, 0].T, rtol=1e-13)
    c = rng.standard_normal((1, 1, 24))
    x = rng.standard_normal((4, 24))
    want = x @ dense_oracle(c).T
    np.testing.assert_allclose(bca.block_circulant_matmul(x, c), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_parallel_path_is_thread_count_invariant(dtype: type, rng: np.random.Generator) -> None:
    kernel = rng.standard_normal((8, 6, 32)).astype(dtype)
    x = rng.standard_normal((257, 6 * 32 - 5)).astype(dtype)
    g = rng.standard_normal((257, 8 * 32 - 3)).astype(dtype)
    results = []
    for threads in (1, 2, 3):
        op = bca.BlockCirculant(kernel, 6 * 32 - 5, 8 * 32 - 3, num_threads=threads)
        assert op.num_threads == threads
        results.append((op(x), *op.backward(x, g)))
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            np.testing.assert_array_equal(a, b)
    dense = dense_oracle(kernel, 6 * 32 - 5, 8 * 32 - 3)
    assert rel_err(results[0][0], x.astype(np.float64) @ dense.T) <= TOL[np.dtype(dtype)]


def test_set_kernel_and_kernel_copy(rng: np.random.Generator) -> None:
    k1 = rng.standard_normal((2, 2, 8))
    k2 = rng.standard_normal((2, 2, 8))
    op = bca.BlockCirculant(k1)
    got = op.kernel
    got[:] = 0  # a copy: the operator is unaffected
    np.testing.assert_array_equal(op.kernel, k1)
    op.set_kernel(k2)
    x = rng.standard_normal((3, 16))
    np.testing.assert_array_equal(op(x), bca.BlockCirculant(k2)(x))


def test_global_thread_setting(rng: np.random.Generator) -> None:
    before = bca.get_num_threads()
    try:
        bca.set_num_threads(1)
        assert bca.get_num_threads() == 1
        kernel = rng.standard_normal((4, 4, 16))
        x = rng.standard_normal((300, 64))
        y1 = bca.BlockCirculant(kernel)(x)
        bca.set_num_threads(2)
        np.testing.assert_array_equal(bca.BlockCirculant(kernel)(x), y1)
    finally:
        bca.set_num_threads(None)
    assert bca.get_num_threads() == before


def test_gil_is_released_and_concurrent_calls_agree(rng: np.random.Generator) -> None:
    kernel = rng.standard_normal((16, 16, 64)).astype(np.float32)
    x = rng.standard_normal((2048, 1024)).astype(np.float32)
    op = bca.BlockCirculant(kernel, num_threads=1)
    want = op(x)
    ticks = 0
    stop = threading.Event()

    def count() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1

    counter = threading.Thread(target=count)
    counter.start()
    outs: list[np.ndarray] = []
    workers = [threading.Thread(target=lambda: outs.append(op(x))) for _ in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    stop.set()
    counter.join()
    assert len(outs) == 3
    for out in outs:
        np.testing.assert_array_equal(out, want)
    # while three long calls ran, the Python counting thread kept running
    assert ticks > 1000


def test_fork_after_parallel_use_does_not_hang(rng: np.random.Generator) -> None:
    import multiprocessing as mp

    kernel = rng.standard_normal((8, 8, 16))
    x = rng.standard_normal((512, 128))
    op = bca.BlockCirculant(kernel, num_threads=2)
    want = op(x)
    ctx = mp.get_context("fork")
    with ctx.Pool(1) as pool:
        got = pool.apply_async(_child_forward, (kernel, x)).get(timeout=60)
    np.testing.assert_array_equal(got, want)


def _child_forward(kernel: np.ndarray, x: np.ndarray) -> np.ndarray:
    return bca.BlockCirculant(kernel, num_threads=2)(x)


def test_float32_kernel_gradient_under_cancellation() -> None:
    """Regression (found by hypothesis): p = 1, 33 rows, Σ x·g cancels ~2000-fold.

    A float32 running sum (what torch's matmul also gives here) is off by 2.2e-5
    relative; the core accumulates the kernel gradient in float64, so the float32 result
    is the correctly rounded sum.
    """
    rng = np.random.default_rng(15012)
    kernel = rng.standard_normal((1, 1, 1)).astype(np.float32)
    x = rng.standard_normal((33, 1)).astype(np.float32)
    g = rng.standard_normal((33, 1)).astype(np.float32)
    _, gk = bca.BlockCirculant(kernel, 1, 1).backward(x, g)
    want = kernel_grad_oracle(x, g, kernel.shape)
    assert gk is not None
    assert rel_err(gk, want) <= TOL[np.dtype(np.float32)]
    assert gk.ravel()[0] == np.float32(want.ravel()[0])  # correctly rounded
