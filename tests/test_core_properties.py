"""Property tests: every core path equals the dense scipy.linalg.circulant oracle."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import bca
from conftest import TOL, dense_oracle, kernel_grad_oracle, rel_err

T = TypeVar("T")

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
    bca.set_num_threads(None)  # the environment's default, whatever an earlier test set
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


def _sample_concurrent_calls(call: Callable[[], T]) -> tuple[np.ndarray, list[T]]:
    """Run ``call`` in two threads at once; return samples ``(wall, cpu_a, cpu_b)`` taken
    by this thread about every millisecond (the two threads' CPU clocks, seconds) while
    they ran, and the two results."""
    barrier = threading.Barrier(3)
    done = [threading.Event(), threading.Event()]
    release = threading.Event()  # keeps the workers (and their CPU clocks) alive
    outs: list[T] = [None, None]  # type: ignore[list-item]
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            barrier.wait()
            outs[i] = call()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            errors.append(exc)
        finally:
            done[i].set()
            release.wait()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    try:
        clocks = [time.pthread_getcpuclockid(t.ident) for t in threads]  # type: ignore[arg-type]
        barrier.wait()
        samples = []
        while True:
            finished = all(d.is_set() for d in done)
            samples.append((time.perf_counter(), *(time.clock_gettime(c) for c in clocks)))
            if finished:
                break
            time.sleep(0.001)
    finally:
        release.set()
        for t in threads:
            t.join()
    if errors:
        raise errors[0]
    return np.array(samples), outs


def assert_calls_overlap(call: Callable[[], T], attempts: int = 5) -> list[T]:
    """Assert that ``call`` (≥ 100 ms of CPU, on the calling thread) run from two Python
    threads at once runs in both at the same time; return the last results.

    While the two calls run, this thread wakes every millisecond and reads the wall
    clock and each worker's CPU clock. Two things must hold:

    - the GIL stays free: no gap between samples is longer than a quarter of the run
      (a call that held the GIL would stop this thread for the whole call, at least
      half of a run of two calls that cannot overlap);
    - both calls make progress together: grouping the samples into windows of ≥ 20 ms,
      the CPU time both threads spent in the same window (the smaller of the two per
      window, summed) is at least half of one call's CPU time. Calls serialised by a
      lock advance one at a time, so they share at most the window where one hands
      over to the other.

    CPU clocks only advance when a thread runs and a loaded machine stretches the run
    and its stalls alike, so load does not change the verdict; the best of a few
    attempts is taken.
    """
    seen = []
    for _ in range(attempts):
        samples, outs = _sample_concurrent_calls(call)
        steps = np.diff(samples, axis=0)
        cpu = steps[:, 1:].sum(axis=0).min()
        bins, acc = [], np.zeros(3)
        for step in steps:
            acc += step
            if acc[0] >= 0.02:
                bins.append(acc)
                acc = np.zeros(3)
        bins.append(acc)
        together = float(sum(min(b[1], b[2]) for b in bins))
        gap, run = float(steps[:, 0].max()), float(samples[-1, 0] - samples[0, 0])
        assert cpu >= 0.05, f"a call used {cpu * 1e3:.0f} ms of CPU, too little to time"
        if gap < 0.25 * run and together >= 0.5 * cpu:
            return outs
        seen.append(
            f"CPU per call {cpu * 1e3:.0f} ms, run together {together * 1e3:.0f} ms, "
            f"longest stall of a Python thread {gap * 1e3:.0f} ms of {run * 1e3:.0f} ms"
        )
    raise AssertionError("calls from two threads did not run at the same time: " + "; ".join(seen))


def _long_call_inputs(
    call: Callable[..., object], rng: np.random.Generator, widths: tuple[int, ...]
) -> tuple[np.ndarray, ...]:
    """float32 inputs of the given widths, with a power-of-two row count (1024 to 32768)
    large enough that ``call(*inputs)`` takes 100 ms of CPU on this machine."""
    rows = 1024
    while True:
        inputs = tuple(rng.standard_normal((rows, w), dtype=np.float32) for w in widths)
        t0 = time.thread_time()
        call(*inputs)
        if time.thread_time() - t0 >= 0.1 or rows >= 32768:
            return inputs
        rows *= 2


def test_gil_is_released_and_concurrent_calls_agree(rng: np.random.Generator) -> None:
    """Two Python threads calling one operator (num_threads=1) run at the same time."""
    kernel = rng.standard_normal((64, 64, 16)).astype(np.float32)
    op = bca.BlockCirculant(kernel, num_threads=1)

    (x,) = _long_call_inputs(op, rng, (1024,))
    want = op(x)
    for out in assert_calls_overlap(lambda: op(x)):
        np.testing.assert_array_equal(out, want)

    x, g = _long_call_inputs(op.backward, rng, (1024, 1024))
    want_gx, want_gk = op.backward(x, g)
    for gx, gk in assert_calls_overlap(lambda: op.backward(x, g)):
        np.testing.assert_array_equal(gx, want_gx)
        np.testing.assert_array_equal(gk, want_gk)


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


# The one-pass SIMD split steps of the real FFT (AVX2 8-bin and AVX-512 16-bin tiles, the
# first tile from the periodic copy Z[h] = Z[0], the tail bin by bin) run for p ≥ 128,
# above the block sizes hypothesis draws: every even and odd p in 120..300 and a few
# large ones, square and padded on either side.
LARGE_BLOCK_SIZES = [*range(120, 301), 383, 384, 510, 512, 514, 1000, 1024]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_large_block_sizes_match_dense_oracle(dtype: type) -> None:
    rng = np.random.default_rng(2026)
    for p in LARGE_BLOCK_SIZES:
        for d_in, d_out in ((p, p), (2 * p - 3, p + 5), (p + 1, 2 * p)):
            q_out, q_in = -(-d_out // p), -(-d_in // p)
            kernel = rng.standard_normal((q_out, q_in, p)).astype(dtype)
            op = bca.BlockCirculant(kernel, d_in, d_out)
            x = rng.standard_normal((5, d_in)).astype(dtype)
            g = rng.standard_normal((5, d_out)).astype(dtype)
            dense = dense_oracle(kernel, d_in, d_out)
            shape = f"p={p} d_in={d_in} d_out={d_out}"
            assert rel_err(op(x), x @ dense.T) <= TOL[np.dtype(dtype)], shape
            gx, gk = op.backward(x, g)
            assert gx is not None and gk is not None
            assert rel_err(gx, g @ dense) <= TOL[np.dtype(dtype)], shape
            want_k = kernel_grad_oracle(x, g, kernel.shape)
            assert rel_err(gk, want_k) <= TOL[np.dtype(dtype)], shape


# Batches large enough for backward's fused path (rows in groups, partial kernel-gradient
# sums per group added in group order; chosen from 4 groups on): 200 rows leave a partial
# last group and chunk. Smaller batches take the two-pass path, which the tests above
# cover; the Rust unit tests compare the two paths directly.
FUSED_SHAPES = [(256, 768, 768), (256, 700, 650), (64, 64, 64), (7, 20, 13), (16, 64, 48)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fused_backward_batches_match_dense_oracle(dtype: type) -> None:
    rng = np.random.default_rng(77)
    for p, d_in, d_out in FUSED_SHAPES:
        q_out, q_in = -(-d_out // p), -(-d_in // p)
        kernel = rng.standard_normal((q_out, q_in, p)).astype(dtype)
        x = rng.standard_normal((200, d_in)).astype(dtype)
        g = rng.standard_normal((200, d_out)).astype(dtype)
        dense = dense_oracle(kernel, d_in, d_out)
        want_k = kernel_grad_oracle(x, g, kernel.shape)
        got = []
        for threads in (1, 2, 3):
            op = bca.BlockCirculant(kernel, d_in, d_out, num_threads=threads)
            gx, gk = op.backward(x, g)
            assert gx is not None and gk is not None
            shape = f"p={p} d_in={d_in} d_out={d_out} threads={threads}"
            assert rel_err(gx, g @ dense) <= TOL[np.dtype(dtype)], shape
            assert rel_err(gk, want_k) <= TOL[np.dtype(dtype)], shape
            got.append((gx, gk))
        for gx, gk in got[1:]:  # the same bits whatever the thread count
            assert np.array_equal(gx, got[0][0]) and np.array_equal(gk, got[0][1])
