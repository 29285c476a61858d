"""The torch backend on every device: float64, mixed-adapter batches and second derivatives.

Each test runs on the CPU (always) and on CUDA (skipped without a GPU), with the same
checks against the float64 scipy dense oracle, so the GPU runs of these paths check
what the CPU runs check. The CUDA-only tests elsewhere cover float32/half precision
(test_torch_modules), a model's train/merge/save/load (test_torch_model), torch.compile
(test_torch_compile) and PEFT C3A (test_peft_models); these add float64 on the GPU, the
mixed-adapter path (``adapter_names``) and ``create_graph=True`` backwards there.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from bca.nn import BASE_ADAPTER, BlockCirculantLinear
from conftest import TOL, dense_oracle, kernel_grad_oracle, rel_err
from test_torch_double_backward import oracle_penalties, penalties

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]
F64 = torch.float64
# (in_features, out_features, p): padding on either side, p = 1, p = d, odd and prime p
SHAPES = [(10, 7, 4), (6, 6, 1), (13, 13, 13), (7, 11, 5), (100, 70, 32)]


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().cpu().numpy()


def _layer(d_in: int, d_out: int, p: int, dtype: torch.dtype, device: str) -> BlockCirculantLinear:
    torch.manual_seed(0)
    m = BlockCirculantLinear(nn.Linear(d_in, d_out), p, scale=0.7, backend="torch")
    m = m.to(device, dtype)
    with torch.no_grad():
        m.bca_kernel.normal_()
    return m


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("batch", [(0,), (1,), (3, 2)], ids=lambda b: "x".join(map(str, b)))
def test_float64_forward_and_gradients_match_oracle(
    device: str, shape: tuple[int, int, int], batch: tuple[int, ...]
) -> None:
    d_in, d_out, p = shape
    m = _layer(d_in, d_out, p, F64, device)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(*batch, d_in, dtype=F64, generator=gen).to(device).requires_grad_(True)
    y = m.adapter_forward(x)
    assert y.shape == (*batch, d_out) and y.dtype == F64 and y.device == x.device
    g = torch.randn(y.shape, dtype=F64, generator=gen).to(device)
    y.backward(g)
    k = _np(m.bca_kernel)
    dw = 0.7 * dense_oracle(k, d_in, d_out)
    xn, gn = _np(x).reshape(-1, d_in), _np(g).reshape(-1, d_out)
    tol = TOL[np.dtype(np.float64)]
    assert rel_err(_np(y).reshape(-1, d_out), xn @ dw.T) <= tol
    assert x.grad is not None and m.bca_kernel.grad is not None
    assert rel_err(_np(x.grad).reshape(-1, d_in), gn @ dw) <= tol
    want_gk = 0.7 * kernel_grad_oracle(xn, gn, k.shape)
    assert rel_err(_np(m.bca_kernel.grad), want_gk) <= tol


def _mixed_layer(dtype: torch.dtype, device: str) -> BlockCirculantLinear:
    """Three adapters over a 10 -> 7 layer: p = 4 (two of them, scales 1 and 0.5) and p = 3."""
    torch.manual_seed(0)
    base = nn.Linear(10, 7)
    layer = BlockCirculantLinear(base, 4, init="xavier_uniform", backend="torch", adapter_name="a")
    layer.add_adapter("b", 4, scale=0.5, init="xavier_uniform")
    layer.add_adapter("c", 3, scale=-1.5, init="xavier_uniform")
    return layer.to(device, dtype)


NAMES = ["b", "a", BASE_ADAPTER, "c", "b", "c"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_mixed_batch_rows_and_gradients_match_oracle(device: str, dtype: torch.dtype) -> None:
    layer = _mixed_layer(dtype, device)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(len(NAMES), 3, 10, dtype=dtype, generator=gen).to(device)
    x.requires_grad_(True)
    y = layer(x, adapter_names=NAMES)
    assert y.shape == (len(NAMES), 3, 7) and y.device == x.device and y.dtype == dtype
    g = torch.randn(y.shape, dtype=dtype, generator=gen).to(device)
    kernels = {n: layer.bca_kernels[n] for n in "abc"}
    gx, *gks = torch.autograd.grad(y, [x, *kernels.values()], g)

    w, bias = _np(layer.base_layer.weight), _np(layer.base_layer.bias)
    deltas = {n: layer.adapter_scale(n) * dense_oracle(_np(k), 10, 7) for n, k in kernels.items()}
    xn, gn = _np(x), _np(g)
    want_y, want_gx = np.zeros(y.shape), np.zeros(x.shape)
    want_gk = {n: np.zeros(k.shape) for n, k in kernels.items()}
    for b, name in enumerate(NAMES):
        m = w + (deltas[name] if name != BASE_ADAPTER else 0.0)
        want_y[b] = xn[b] @ m.T + bias
        want_gx[b] = gn[b] @ m
        if name != BASE_ADAPTER:
            want_gk[name] += layer.adapter_scale(name) * kernel_grad_oracle(
                xn[b], gn[b], tuple(kernels[name].shape)
            )
    tol = TOL[np.dtype(np.float32 if dtype == torch.float32 else np.float64)] * 4
    assert rel_err(_np(y), want_y) <= tol
    assert rel_err(_np(gx), want_gx) <= tol
    for n, gk in zip(kernels, gks, strict=True):
        assert rel_err(_np(gk), want_gk[n]) <= tol, n


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_batch_gradgradcheck_float64(device: str) -> None:
    layer = _mixed_layer(F64, device)
    x = torch.randn(len(NAMES), 2, 10, dtype=F64, device=device, requires_grad=True)

    def f(x: torch.Tensor, ka: torch.Tensor, kb: torch.Tensor, kc: torch.Tensor) -> torch.Tensor:
        params = {"bca_kernels.a": ka, "bca_kernels.b": kb, "bca_kernels.c": kc}
        out: torch.Tensor = torch.func.functional_call(
            layer, params, (x,), {"adapter_names": NAMES}
        )
        return out

    kernels = (layer.bca_kernels[n].detach().clone().requires_grad_(True) for n in "abc")
    inputs = (x, *kernels)
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_second_derivatives_match_oracle(
    device: str, dtype: torch.dtype, shape: tuple[int, int, int]
) -> None:
    """Gradient penalties (create_graph=True) against their closed forms from the dense ΔW."""
    d_in, d_out, p = shape
    m = _layer(d_in, d_out, p, dtype, device)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, d_in, dtype=dtype, generator=gen).to(device)
    h = torch.randn(2, 3, d_out, dtype=dtype, generator=gen).to(device)
    got = penalties(m, x, h)
    want = oracle_penalties(
        _np(m.bca_kernel), _np(x).reshape(-1, d_in), _np(h).reshape(-1, d_out), d_in, d_out, 0.7
    )
    tol = 1e-10 if dtype == F64 else 2e-5
    for name, g, w in zip(("d/dk|gx|^2", "d/dx|gk|^2", "d/dh|gk|^2"), got, want, strict=True):
        assert g.dtype == dtype and g.device == x.device, name
        err = rel_err(_np(g).reshape(w.shape), w)
        assert err <= tol, f"{name}: relative error {err:.3g} > {tol}"


@pytest.mark.parametrize("device", DEVICES)
def test_gradgradcheck_float64(device: str) -> None:
    m = _layer(7, 11, 5, F64, device)
    x = torch.randn(3, 7, dtype=F64, device=device, requires_grad=True)
    k = m.bca_kernel.detach().clone().requires_grad_(True)

    def f(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = torch.func.functional_call(m, {"bca_kernels.default": k}, (x,))
        return out

    assert torch.autograd.gradcheck(f, (x, k))
    assert torch.autograd.gradgradcheck(f, (x, k))


@pytest.mark.parametrize("trusted", [False, True])
@pytest.mark.parametrize("device", DEVICES)
def test_new_storage_at_the_cached_kernels_address_is_seen(device: str, trusted: bool) -> None:
    """``param.data = a`` then ``param.data = b`` keeps the parameter's version counter;
    the allocator (CUDA's caching allocator above all) would often put ``b`` at the
    address of the kernel the cache took, had that storage been freed. On devices other
    than the CPU the cache compares only version and address, so it keeps that storage
    alive; trusted caches (``trusted_adapters``) do so on every device."""
    import contextlib

    from bca.model import trusted_adapters

    m = _layer(24, 16, 8, torch.float32, device).eval()
    x = torch.randn(5, 24, device=device)
    k = m.bca_kernel
    with trusted_adapters(m) if trusted else contextlib.nullcontext(), torch.no_grad():
        for _ in range(20):
            m.adapter_forward(x)  # takes the kernel
            k.data = torch.randn(k.shape, device=device)
            k.data = torch.randn(k.shape, device=device)  # may land where it was
            want = _np(x) @ (0.7 * dense_oracle(_np(k), 24, 16)).T
            assert rel_err(_np(m.adapter_forward(x)), want) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_eval_spectra_follow_fused_optimizer_steps(device: str) -> None:
    """Fused optimizers (``Adam(fused=True)``, transformers' Trainer default) write the
    kernel without bumping its version counter. Between evaluations (eval mode: cached
    spectra) a training step must still be seen: on the CPU the cache compares values,
    elsewhere only the key, which counts optimizer steps."""
    m = _layer(24, 16, 8, torch.float32, device)
    opt = torch.optim.Adam(m.parameters(), lr=0.1, fused=True)
    x = torch.randn(5, 24, device=device)
    for _ in range(3):
        m.eval()
        with torch.no_grad():
            got = m.adapter_forward(x)
        want = _np(x) @ (0.7 * dense_oracle(_np(m.bca_kernel), 24, 16)).T
        assert rel_err(_np(got), want) < 1e-5
        m.train()
        m(x).square().sum().backward()
        opt.step()
        opt.zero_grad()


def test_the_snapshot_key_changes_with_a_fused_optimizer_step() -> None:
    """What the test above relies on off the CPU, checked on the CPU: the cache key of a
    kernel changes with a fused step, which leaves the version counter as it was."""
    from bca.nn.functional import _kernel_key

    w = nn.Parameter(torch.randn(2, 2, 4))
    opt = torch.optim.SGD([w], lr=0.1, fused=True)
    w.sum().backward()
    key, version = _kernel_key(w), w._version
    opt.step()
    assert w._version == version and _kernel_key(w) != key
