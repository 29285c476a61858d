"""BlockCirculantLinear: every backend against the dense scipy oracle and each other."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from bca.nn import BlockCirculantLinear, block_circulant_dense, rust_available
from conftest import TOL, dense_oracle, kernel_grad_oracle, rel_err

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

needs_rust = pytest.mark.skipif(not rust_available(), reason="bca._bca extension not built")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

BACKENDS = ["torch", pytest.param("rust", marks=needs_rust)]
DTYPES = [torch.float32, torch.float64]
NP = {torch.float32: np.dtype(np.float32), torch.float64: np.dtype(np.float64)}


@st.composite
def layer_shapes(draw: st.DrawFn) -> tuple[int, int, int]:
    """(in_features, out_features, p) including p = 1, prime/odd p, p = d and padding."""
    p = draw(st.sampled_from([1, 2, 3, 4, 5, 7, 8, 11, 16]))
    q_in = draw(st.integers(1, 4))
    q_out = draw(st.integers(1, 4))
    pad_in = draw(st.integers(0, p - 1))
    pad_out = draw(st.integers(0, p - 1))
    return q_in * p - pad_in, q_out * p - pad_out, p


def make_layer(
    d_in: int,
    d_out: int,
    p: int,
    *,
    backend: str = "torch",
    dtype: torch.dtype = torch.float64,
    conv1d: bool = False,
    scale: float = 1.0,
    seed: int = 0,
) -> BlockCirculantLinear:
    torch.manual_seed(seed)
    base: nn.Module = Conv1D(d_out, d_in) if conv1d else nn.Linear(d_in, d_out)
    base = base.to(dtype)
    m = BlockCirculantLinear(base, p, scale=scale, backend=backend)
    with torch.no_grad():
        m.bca_kernel.normal_()
    return m


def run_layer(
    m: BlockCirculantLinear, x: torch.Tensor, g: torch.Tensor
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    m.zero_grad()
    x = x.clone().requires_grad_(True)
    y = m.adapter_forward(x)
    y.backward(g)
    assert x.grad is not None and m.bca_kernel.grad is not None
    return y.detach().numpy(), x.grad.numpy(), m.bca_kernel.grad.numpy()


# ---------------------------------------------------------------------------------------
# oracle properties
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@given(shape=layer_shapes(), batch=st.sampled_from([(1,), (3,), (2, 3), (0,)]))
def test_forward_and_gradients_match_oracle(
    backend: str, dtype: torch.dtype, shape: tuple[int, int, int], batch: tuple[int, ...]
) -> None:
    d_in, d_out, p = shape
    m = make_layer(d_in, d_out, p, backend=backend, dtype=dtype, scale=0.75)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(*batch, d_in, generator=gen, dtype=dtype)
    g = torch.randn(*batch, d_out, generator=gen, dtype=dtype)
    y, gx, gk = run_layer(m, x, g)
    kernel = m.bca_kernel.detach().numpy()
    dense = 0.75 * dense_oracle(kernel, d_in, d_out)
    xn, gn = x.numpy().astype(np.float64), g.numpy().astype(np.float64)
    tol = TOL[NP[dtype]] * 10
    assert y.shape == (*batch, d_out) and y.dtype == NP[dtype]
    assert gx.shape == x.shape and gk.shape == kernel.shape
    assert rel_err(y, xn @ dense.T) < tol
    assert rel_err(gx, gn @ dense) < tol
    assert rel_err(gk, 0.75 * kernel_grad_oracle(xn, gn, kernel.shape)) < tol
    # the full layer adds the base output
    with torch.no_grad():
        full = m(x).numpy()
        base = m.base_layer(x).numpy()
    assert rel_err(full - base, xn @ dense.T) < tol * 10 or np.abs(xn).size == 0


@needs_rust
@pytest.mark.parametrize("dtype", DTYPES)
@given(shape=layer_shapes(), rows=st.integers(0, 5))
def test_backends_agree(dtype: torch.dtype, shape: tuple[int, int, int], rows: int) -> None:
    d_in, d_out, p = shape
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(rows, d_in, generator=gen, dtype=dtype)
    g = torch.randn(rows, d_out, generator=gen, dtype=dtype)
    out = {}
    for backend in ("torch", "rust", "auto"):
        m = make_layer(d_in, d_out, p, backend=backend, dtype=dtype, seed=3)
        out[backend] = run_layer(m, x, g)
        if backend == "auto":
            assert m.resolve_backend(x) == "rust"
    tol = TOL[NP[dtype]] * 10
    for a, b in zip(out["torch"], out["rust"], strict=True):
        assert rel_err(a, b) < tol
    for a, b in zip(out["auto"], out["rust"], strict=True):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "shape", [(6, 6, 3), (7, 5, 3), (5, 9, 4), (4, 4, 1), (7, 7, 7), (11, 3, 11)]
)
def test_gradcheck_float64(backend: str, shape: tuple[int, int, int]) -> None:
    d_in, d_out, p = shape
    m = make_layer(d_in, d_out, p, backend=backend, scale=1.3)
    x = torch.randn(3, d_in, dtype=torch.float64, requires_grad=True)

    def f(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = torch.func.functional_call(m, {"bca_kernels.default": k}, (x,))
        return out

    k = m.bca_kernel.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(f, (x, k))
    assert torch.autograd.gradgradcheck is not None  # first-order only is promised


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_eval_mode_cached_spectra(backend: str) -> None:
    m = make_layer(9, 6, 4, backend=backend).eval()
    x = torch.randn(2, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(m.adapter_forward, (x,))


def test_delta_weight_matches_oracle() -> None:
    m = make_layer(10, 7, 3, scale=0.5)
    want = 0.5 * dense_oracle(m.bca_kernel.detach().numpy(), 10, 7)
    got = m.delta_weight().detach().numpy()
    assert got.shape == (7, 10)
    assert np.array_equal(got, want)
    with pytest.raises(ValueError, match="in_features"):
        block_circulant_dense(m.bca_kernel, 13, 7)
    with pytest.raises(ValueError, match="kernel"):
        block_circulant_dense(m.bca_kernel[0])


# ---------------------------------------------------------------------------------------
# Conv1D, merge/unmerge
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_conv1d_layer(backend: str) -> None:
    m = make_layer(10, 14, 4, backend=backend, conv1d=True, dtype=torch.float32)
    assert m.is_conv1d and m.in_features == 10 and m.out_features == 14
    assert m.kernel_shape == (4, 3, 4)
    x = torch.randn(2, 5, 10)
    w, b = m.base_layer.weight.detach().numpy(), m.base_layer.bias.detach().numpy()
    dense = dense_oracle(m.bca_kernel.detach().numpy(), 10, 14)
    with torch.no_grad():
        y = m(x).numpy()
    want = x.numpy() @ w + b + x.numpy() @ dense.T
    assert rel_err(y, want) < 1e-5


@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_merge_unmerge_bit_exact(conv1d: bool, dtype: torch.dtype) -> None:
    m = make_layer(12, 9, 4, conv1d=conv1d, dtype=dtype, scale=0.3)
    x = torch.randn(4, 12, dtype=dtype)
    original = m.base_layer.weight.detach().clone()
    with torch.no_grad():
        y = m(x)
        m.merge()
        assert m.merged
        y_merged = m(x)
        dw = m.delta_weight().to(dtype)
        assert torch.equal(m.base_layer.weight, original + (dw.T if conv1d else dw))
        m.unmerge()
    assert not m.merged
    assert torch.equal(m.base_layer.weight, original)
    tol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 3e-2}[dtype]
    assert rel_err(y_merged.float().numpy(), y.float().numpy()) < tol
    with pytest.warns(UserWarning, match="not merged"):
        m.unmerge()


def test_merge_without_copy_and_double_merge() -> None:
    m = make_layer(8, 8, 4, dtype=torch.float64)
    original = m.base_layer.weight.detach().clone()
    m.merge(exact_unmerge=False)
    with pytest.warns(UserWarning, match="already merged"):
        m.merge()
    m.unmerge()
    assert torch.allclose(m.base_layer.weight, original, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------
# caching and backend state
# ---------------------------------------------------------------------------------------
def test_eval_spectra_cache_follows_kernel_version() -> None:
    m = make_layer(8, 12, 4, dtype=torch.float32).eval()
    x = torch.randn(3, 8)
    with torch.no_grad():
        y1 = m.adapter_forward(x)
        cached = m._adapters["default"].spectra
        y2 = m.adapter_forward(x)
        assert m._adapters["default"].spectra is cached and torch.equal(y1, y2)
        m.bca_kernel.mul_(2.0)  # in-place change bumps _version
        y3 = m.adapter_forward(x)
    assert m._adapters["default"].spectra is not cached
    assert rel_err(y3.numpy(), 2 * y1.numpy()) < 1e-6
    m.bca_kernel.data.mul_(0.5)  # .data edits have their own version counter: caught by value
    with torch.no_grad():
        y4 = m.adapter_forward(x)
    assert rel_err(y4.numpy(), y1.numpy()) < 1e-6
    m.clear_cache()
    assert m._adapters["default"].spectra is None
    with torch.no_grad():
        assert torch.equal(m.adapter_forward(x), y4)
    # training mode with grad enabled does not use the cache
    m.train()
    m._adapters["default"].spectra = None
    m.adapter_forward(x).sum().backward()
    assert m._adapters["default"].spectra is None


@needs_rust
def test_rust_operator_resynced_only_on_change() -> None:
    """The operator's spectra are recomputed (``sync_kernel`` returns True) only after the
    kernel's values changed: an optimizer step, or an edit through ``.data``."""
    m = make_layer(8, 12, 4, backend="rust", dtype=torch.float32)
    x = torch.randn(3, 8)
    m.adapter_forward(x)
    op = m._adapters["default"].rust_op
    real_op = op._op
    calls: list[int] = []

    class CoreSpy:
        def __getattr__(self, name: str) -> object:
            return getattr(real_op, name)

        def sync_kernel(self, k: np.ndarray) -> bool:
            replaced = bool(real_op.sync_kernel(k))
            if replaced:
                calls.append(1)
            return replaced

    op._op = CoreSpy()
    for _ in range(3):
        y = m.adapter_forward(x)
    assert calls == []
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    y.sum().backward()
    opt.step()
    y_new = m.adapter_forward(x)
    assert calls == [1]
    m.bca_kernel.data.mul_(0.5)  # a .data edit is caught by the value comparison
    y_new = m.adapter_forward(x)
    assert calls == [1, 1]
    assert m._adapters["default"].rust_op is op
    dense = dense_oracle(m.bca_kernel.detach().numpy(), 8, 12)
    assert rel_err(y_new.detach().numpy(), x.numpy() @ dense.T) < 1e-5


@needs_rust
def test_deepcopy_and_state_dict_after_rust_use() -> None:
    m = make_layer(8, 12, 4, backend="rust", dtype=torch.float32)
    x = torch.randn(3, 8)
    y = m(x)
    m2 = copy.deepcopy(m)
    assert m2._adapters["default"].rust_op is None
    assert torch.equal(m2(x), y)
    m3 = make_layer(8, 12, 4, backend="torch", dtype=torch.float32, seed=9)
    m3.load_state_dict(m.state_dict())
    assert rel_err(m3(x).detach().numpy(), y.detach().numpy()) < 1e-6


def test_auto_backend_resolution() -> None:
    m = make_layer(8, 8, 4, backend="auto", dtype=torch.float32)
    want = "rust" if rust_available() else "torch"
    assert m.resolve_backend(torch.zeros(1, 8)) == want
    assert m.resolve_backend(torch.zeros(1, 8, dtype=torch.float64)) == "torch"
    assert m.resolve_backend(torch.zeros(1, 8, dtype=torch.bfloat16)) == "torch"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_computed_in_float32(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    base = nn.Linear(16, 24).to(dtype)
    m = BlockCirculantLinear(base, 8, backend="auto", init="xavier_uniform")
    assert m.bca_kernel.dtype == torch.float32
    x = torch.randn(5, 16).to(dtype).requires_grad_(True)
    y = m.adapter_forward(x)
    assert y.dtype == dtype
    dense = dense_oracle(m.bca_kernel.detach().numpy(), 16, 24)
    want = x.detach().float().numpy() @ dense.T
    assert rel_err(y.detach().float().numpy(), want) < 1e-2
    y.float().sum().backward()
    assert x.grad is not None and x.grad.dtype == dtype
    assert m.bca_kernel.grad is not None and m.bca_kernel.grad.dtype == torch.float32


# ---------------------------------------------------------------------------------------
# init options and errors
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("init", ["zeros", "xavier_uniform", "gaussian", "kaiming"])
def test_inits(init: str) -> None:
    torch.manual_seed(0)
    m = BlockCirculantLinear(nn.Linear(64, 32), 8, init=init)
    k = m.bca_kernel.detach()
    assert k.shape == (4, 8, 8) and m.bca_kernel.requires_grad
    assert not any(p.requires_grad for p in m.base_layer.parameters())
    if init == "zeros":
        x = torch.randn(2, 64)
        assert torch.equal(m(x), m.base_layer(x))
    elif init == "xavier_uniform":
        assert k.abs().max() <= math.sqrt(6 / 96) and k.std() > 0
    elif init == "kaiming":
        assert k.abs().max() <= 1 / 8 and k.std() > 0
    else:
        assert 0.5 / 64 < k.std() < 2 / 64


def test_constructor_errors() -> None:
    lin = nn.Linear(10, 6)
    with pytest.raises(ValueError, match="pad=False"):
        BlockCirculantLinear(lin, 4, pad=False)
    BlockCirculantLinear(nn.Linear(12, 8), 4, pad=False)  # divisible is fine
    with pytest.raises(ValueError, match="block_size"):
        BlockCirculantLinear(lin, 0)
    with pytest.raises(ValueError, match="block_size"):
        BlockCirculantLinear(lin, 2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="backend"):
        BlockCirculantLinear(lin, 2, backend="cuda")
    with pytest.raises(ValueError, match="init"):
        BlockCirculantLinear(lin, 2, init="ones")
    with pytest.raises(ValueError, match="scale"):
        BlockCirculantLinear(lin, 2, scale=float("nan"))
    with pytest.raises(TypeError, match="base_layer"):
        BlockCirculantLinear(nn.Conv2d(2, 2, 1), 2)
    with pytest.raises(TypeError, match="pad"):
        BlockCirculantLinear(lin, 2, pad=1)  # type: ignore[arg-type]


def test_forward_errors() -> None:
    m = make_layer(8, 6, 4, dtype=torch.float32)
    with pytest.raises(ValueError, match="in_features=8"):
        m.adapter_forward(torch.zeros(2, 7))
    with pytest.raises(TypeError, match="floating"):
        m.adapter_forward(torch.zeros(2, 8, dtype=torch.int64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        m.adapter_forward(np.zeros((2, 8)))  # type: ignore[arg-type]


@needs_rust
def test_rust_backend_errors() -> None:
    m = make_layer(8, 6, 4, backend="rust", dtype=torch.float32)
    with pytest.raises(TypeError, match="dtype"):
        m.adapter_forward(torch.zeros(2, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="CPU only"):
        m.adapter_forward(torch.zeros(2, 8, device="meta"))
    m.to(torch.bfloat16)
    with pytest.raises(TypeError, match="float32/float64"):
        m.adapter_forward(torch.zeros(2, 8, dtype=torch.bfloat16))


# ---------------------------------------------------------------------------------------
# GPU (skipped without CUDA)
# ---------------------------------------------------------------------------------------
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(64, 48, 16), (100, 70, 32), (33, 33, 11)])
def test_cuda_torch_backend_matches_oracle(dtype: torch.dtype, shape: tuple[int, int, int]) -> None:
    d_in, d_out, p = shape
    torch.manual_seed(0)
    m = BlockCirculantLinear(nn.Linear(d_in, d_out).to("cuda", dtype), p, backend="auto")
    with torch.no_grad():
        m.bca_kernel.normal_()
    x = torch.randn(4, 3, d_in, device="cuda").to(dtype).requires_grad_(True)
    assert m.resolve_backend(x) == "torch"
    y = m.adapter_forward(x)
    g = torch.randn_like(y)
    y.backward(g)
    k = m.bca_kernel.detach().cpu().numpy()
    dense = dense_oracle(k, d_in, d_out)
    xn = x.detach().float().cpu().numpy().astype(np.float64)
    gn = g.float().cpu().numpy().astype(np.float64)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert y.dtype == dtype
    assert rel_err(y.detach().float().cpu().numpy(), xn @ dense.T) < tol
    assert x.grad is not None and m.bca_kernel.grad is not None
    assert rel_err(x.grad.float().cpu().numpy(), gn @ dense) < tol
    want_gk = kernel_grad_oracle(xn, gn, k.shape)
    assert rel_err(m.bca_kernel.grad.cpu().numpy(), want_gk) < tol


@needs_cuda
def test_cuda_training_step_and_rust_refusal() -> None:
    torch.manual_seed(0)
    m = BlockCirculantLinear(nn.Linear(64, 64).cuda(), 16, backend="torch")
    opt = torch.optim.AdamW([m.bca_kernel], lr=1e-2)
    x, t = torch.randn(32, 64, device="cuda"), torch.randn(32, 64, device="cuda")
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(m(x), t)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    m.eval()
    with torch.no_grad():
        y = m(x)
        m.merge()
        assert rel_err(m(x).cpu().numpy(), y.cpu().numpy()) < 1e-5
        m.unmerge()
    with torch.no_grad():  # eval cache on CUDA: version-tracked; .data edits need clear_cache
        y1 = m.adapter_forward(x)
        m.bca_kernel.mul_(2.0)
        assert rel_err(m.adapter_forward(x).cpu().numpy(), 2 * y1.cpu().numpy()) < 1e-5
        m.bca_kernel.data.mul_(0.5)
        m.clear_cache()
        assert rel_err(m.adapter_forward(x).cpu().numpy(), y1.cpu().numpy()) < 1e-5
    if rust_available():
        m.backend = "rust"
        with pytest.raises(ValueError, match="CPU only"):
            m.adapter_forward(x)
