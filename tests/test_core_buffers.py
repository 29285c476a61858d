"""Results backed by the core's buffer pool (rust/src/bufpool.rs).

Outputs and gradients of at least 256 KiB live in buffers that go back to a bounded pool
when their last array is gone, so repeated calls reuse mapped pages instead of faulting
in fresh ones. These tests check that reuse happens, that it is invisible (values,
views, flags, threads), that the pool stays bounded, and that ``bca.release_memory``
empties it.
"""

from __future__ import annotations

import pickle
import sys
import threading

import numpy as np
import pytest

import bca
from conftest import dense_oracle
from test_core_resources import run_child

D, N = 768, 512  # a float32 output of 1.5 MiB: pooled
P = 256


def _operator(dtype: type = np.float32, seed: int = 0) -> bca.BlockCirculant:
    rng = np.random.default_rng(seed)
    kernel = rng.standard_normal((D // P, D // P, P)).astype(dtype)
    return bca.BlockCirculant(kernel)


def _x(dtype: type = np.float32, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((N, D)).astype(dtype)


def _address(a: np.ndarray) -> int:
    return int(a.__array_interface__["data"][0])


@pytest.fixture(autouse=True)
def _empty_pool() -> None:
    bca.release_memory()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_dropped_result_is_reused_and_its_old_values_never_show(dtype: type) -> None:
    op, x = _operator(dtype), _x(dtype)
    want = dense_oracle(op.kernel, D, D) @ x.astype(np.float64).T
    y = op.matmul(x)
    at = _address(y)
    y[:] = np.nan  # garbage left in the buffer
    del y
    y2 = op.matmul(x)
    assert _address(y2) == at, "the dropped output's buffer was not reused"
    assert np.isfinite(y2).all()
    err = np.linalg.norm(y2.T - want) / np.linalg.norm(want)
    assert err < (1e-5 if dtype == np.float32 else 1e-12)
    # the input gradient of the same size reuses it too
    del y2
    gx, gk = op.backward(x, x, input_grad=True, kernel_grad=True)
    assert gx is not None and gk is not None
    assert _address(gx) == at


def test_results_are_ordinary_writable_arrays() -> None:
    op, x = _operator(), _x()
    y = op.matmul(x)
    assert y.flags.c_contiguous and y.flags.writeable and y.flags.aligned
    assert y.shape == (N, D) and y.dtype == np.float32
    y *= 2.0  # in place, as the torch wrapper scales
    z = pickle.loads(pickle.dumps(y))  # noqa: S301 - our own array, round trip
    np.testing.assert_array_equal(z, y)
    y.shape = (N * D,)  # reshaping in place works on a view-free array


def test_a_view_keeps_its_memory_after_the_array_is_dropped() -> None:
    op, x = _operator(), _x()
    y = op.matmul(x)
    view = y[::2, 5:]
    kept = view.copy()
    at = _address(y)
    del y
    other = op.matmul(_x(seed=7))  # must not land in the buffer the view still uses
    assert _address(other) != at
    np.testing.assert_array_equal(view, kept)
    del view, other


def test_small_results_do_not_use_the_pool() -> None:
    op = _operator()
    y = op.matmul(_x()[:8])  # 24 KiB
    del y
    assert bca.release_memory() == 0


def test_release_memory_frees_idle_buffers_only() -> None:
    op, x = _operator(), _x()
    y = op.matmul(x)
    alive = op.matmul(x)
    del y
    assert bca.release_memory() >= N * D * 4
    assert bca.release_memory() == 0
    # an array in use keeps its values and its buffer comes back when it goes
    np.testing.assert_array_equal(alive, op.matmul(x))
    del alive
    assert bca.release_memory() >= N * D * 4


def test_idle_memory_is_bounded() -> None:
    op, x = _operator(), _x()
    results = [op.matmul(x) for _ in range(20)]
    del results
    freed = bca.release_memory()
    assert 0 < freed <= 8 * (N * D * 4 + 8)


def test_threads_creating_and_dropping_results_get_their_own_buffers() -> None:
    op = _operator()
    xs = [_x(seed=s) for s in range(4)]
    wants = [op.matmul(x).copy() for x in xs]
    errors: list[str] = []

    def worker(i: int) -> None:
        for _ in range(40):
            y = op.matmul(xs[i])
            g, _ = op.backward(None, xs[i], input_grad=True, kernel_grad=False)
            if not np.array_equal(y, wants[i]):
                errors.append(f"thread {i}: wrong forward")
            del y, g

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="page-fault counts: Linux")
def test_repeated_training_steps_do_not_page_fault_their_results() -> None:
    # Before the pool, every training step of the torch layer at this size faulted in its
    # 3 MiB of results afresh (738 minor faults per step, a quarter of the step's time):
    # glibc handed the output and the input gradient fresh pages each time.
    pytest.importorskip("torch")
    out = run_child(
        f"""
        import resource
        import torch
        from bca.nn import BlockCirculantLinear
        torch.manual_seed(0)
        m = BlockCirculantLinear(torch.nn.Linear({D}, {D}), {P}, backend="rust")
        x = torch.randn({N}, {D}).requires_grad_(True)
        g = torch.randn({N}, {D})
        def step():
            x.grad = None
            m.bca_kernel.grad = None
            m.adapter_forward(x).backward(g)
        for _ in range(5):
            step()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(50):
            step()
        print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 50)
        """
    )
    faults = float(out.strip())
    assert faults < 50, f"{faults} page faults per step"
