"""bca.nn.functional: the one ΔW·x entry point (block_circulant, mixed_block_circulant,
KernelCache) that the layer, its mixed batches and the PEFT patch share."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bca.nn import rust_available
from bca.nn.functional import (
    KernelCache,
    block_circulant,
    mixed_block_circulant,
    resolve_backend,
)
from conftest import dense_oracle, rel_err

needs_rust = pytest.mark.skipif(not rust_available(), reason="bca._bca extension not built")
BACKENDS = ["torch", pytest.param("rust", marks=needs_rust)]
F64 = torch.float64
# (in_features, out_features, p): padding on either side, p = 1, p = d
SHAPES = [(10, 7, 4), (6, 6, 1), (8, 8, 8), (9, 5, 3)]


def kernel_for(d_in: int, d_out: int, p: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(-(-d_out // p), -(-d_in // p), p, generator=g, dtype=F64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("cached", [False, True])
def test_matches_dense_oracle(backend: str, shape: tuple[int, int, int], cached: bool) -> None:
    d_in, d_out, p = shape
    k = kernel_for(d_in, d_out, p)
    x = torch.randn(2, 3, d_in, dtype=F64)
    cache = KernelCache() if cached else None
    for _ in range(2):  # the second call reads the cache
        y = block_circulant(x, k, d_in, d_out, scale=0.5, backend=backend, cache=cache)
        want = 0.5 * x.numpy() @ dense_oracle(k.numpy(), d_in, d_out).T
        assert y.shape == (2, 3, d_out)
        assert rel_err(y.numpy(), want) < 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
def test_differentiable_twice_without_cache(backend: str) -> None:
    k = kernel_for(10, 7, 4).requires_grad_(True)
    x = torch.randn(3, 10, dtype=F64, requires_grad=True)

    def f(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return block_circulant(a, b, 10, 7, scale=-0.7, backend=backend)

    assert torch.autograd.gradcheck(f, (x, k))
    assert torch.autograd.gradgradcheck(f, (x, k))


@needs_rust
def test_cache_keeps_the_rust_operator() -> None:
    """With a cache the Rust operator is built once and its spectra are recomputed only
    when the values change, also for a kernel derived anew on each call (the PEFT patch's
    case): the core's ``sync_kernel`` reports a replacement only then."""
    w = kernel_for(8, 12, 4).float()
    x = torch.randn(3, 8)
    cache = KernelCache()
    block_circulant(x, w * 1.0, 8, 12, backend="rust", cache=cache)
    op = cache.rust_op
    replaced: list[bool] = []
    real_op = op._op

    class CoreSpy:
        def __getattr__(self, name: str) -> object:
            return getattr(real_op, name)

        def sync_kernel(self, k: np.ndarray) -> bool:
            replaced.append(real_op.sync_kernel(k))
            return replaced[-1]

    op._op = CoreSpy()
    try:
        for _ in range(3):
            block_circulant(x, w * 1.0, 8, 12, backend="rust", cache=cache)  # same values
        assert replaced == [False] * 3
        y = block_circulant(x, w * 2.0, 8, 12, backend="rust", cache=cache)
        assert replaced == [False] * 3 + [True]
        assert cache.rust_op is op
    finally:
        op._op = real_op
    assert rel_err(y.numpy(), x.numpy() @ dense_oracle(2 * w.numpy(), 8, 12).T) < 1e-5
    # another geometry through the same cache builds a new operator
    block_circulant(torch.randn(3, 7), w, 7, 12, backend="rust", cache=cache)
    assert cache.rust_op is not op and cache.rust_op.in_features == 7


def test_eval_spectra_only_when_not_training() -> None:
    k = kernel_for(8, 8, 4).requires_grad_(True)
    x = torch.randn(2, 8, dtype=F64)
    cache = KernelCache()
    block_circulant(x, k, backend="torch", cache=cache, training=True)
    assert cache.spectra is None
    block_circulant(x, k, backend="torch", cache=cache, training=False)
    assert cache.spectra is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_rows_equal_single_calls(backend: str) -> None:
    d_in, d_out, p = 9, 5, 3
    kernels = [kernel_for(d_in, d_out, p, seed=s) for s in range(3)]
    x = torch.randn(5, 2, d_in, dtype=F64)
    index = [2, -1, 0, 2, 1]
    scales = [1.0, 0.5, -2.0]
    y = mixed_block_circulant(x, kernels, index, d_in, d_out, scales=scales, backend=backend)
    for b, a in enumerate(index):
        want = (
            torch.zeros(2, d_out, dtype=F64)
            if a < 0
            else block_circulant(x[b], kernels[a], d_in, d_out, scale=scales[a], backend="torch")
        )
        torch.testing.assert_close(y[b], want, rtol=1e-12, atol=1e-12)


def test_errors() -> None:
    k = kernel_for(10, 7, 4)
    x = torch.randn(2, 10, dtype=F64)
    with pytest.raises(ValueError, match="backend"):
        block_circulant(x, k, 10, 7, backend="cuda")
    with pytest.raises(ValueError, match="in_features=10"):
        block_circulant(torch.randn(2, 9, dtype=F64), k, 10, 7)
    with pytest.raises(ValueError, match="in_features=13"):
        block_circulant(x, k, 13, 7)
    with pytest.raises(TypeError, match="floating point"):
        block_circulant(x.long(), k, 10, 7)
    with pytest.raises(ValueError, match="adapter_index"):
        mixed_block_circulant(x, [k], [0, 1], 10, 7)
    with pytest.raises(ValueError, match="adapter_index has 1"):
        mixed_block_circulant(x, [k], [0], 10, 7)
    with pytest.raises(ValueError, match="one shape and dtype"):
        mixed_block_circulant(x, [k, k[:, :, :2]], [0, 1], 10, 7)
    assert resolve_backend(x, k, "torch") == "torch"


@needs_rust
def test_compiles_fullgraph_without_cache() -> None:
    """The Rust path without a cache runs under torch.compile as the custom operator with
    handle 0 (a one-off operator), no graph break; gradients equal eager mode's."""
    k = kernel_for(10, 7, 4).float().requires_grad_(True)
    x = torch.randn(3, 10, requires_grad=True)

    def f(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return block_circulant(a, b, 10, 7, scale=0.3, backend="rust")

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    y = compiled(x, k)
    gx, gk = torch.autograd.grad(y.square().sum(), (x, k))
    ex, ek = torch.autograd.grad(f(x, k).square().sum(), (x, k))
    torch.testing.assert_close(y, f(x, k))
    torch.testing.assert_close(gx, ex)
    torch.testing.assert_close(gk, ek)
