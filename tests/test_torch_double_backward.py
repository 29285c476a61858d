"""Second and higher derivatives (``create_graph=True``) through the adapter, every path.

With ``create_graph=True`` each backward (torch backend, eager Rust backend and the
custom operator ``torch.ops.bca.rust_block_circulant`` called directly) computes its
gradients with plain differentiable torch ops, so autograd differentiates them again:
torch.autograd.gradgradcheck against finite differences, and closed forms from the dense
scipy oracle for the quantities training code asks for (gradient penalties:
∇_kernel ||∂L/∂x||², ∇_x ||∂L/∂kernel||², ∇_g ||∂L/∂kernel||²)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from bca.nn import BlockCirculantLinear, rust_available
from conftest import dense_oracle, kernel_grad_oracle, rel_err

needs_rust = pytest.mark.skipif(not rust_available(), reason="bca._bca extension not built")

# "auto" resolves to "rust" for CPU float32/float64 inputs when the extension imports
BACKENDS = ["torch", pytest.param("rust", marks=needs_rust), "auto"]
F64 = torch.float64
# (in_features, out_features, p): padding on either side, p = 1, p = d, odd and prime p
SHAPES = [(10, 7, 4), (6, 6, 1), (8, 8, 8), (7, 11, 5), (9, 5, 3)]


@st.composite
def layer_shapes(draw: st.DrawFn) -> tuple[int, int, int]:
    """(in_features, out_features, p) including p = 1, prime/odd p, p = d and padding."""
    p = draw(st.sampled_from([1, 2, 3, 4, 5, 7, 8, 11]))
    q_in = draw(st.integers(1, 3))
    q_out = draw(st.integers(1, 3))
    pad_in = draw(st.integers(0, p - 1))
    pad_out = draw(st.integers(0, p - 1))
    return q_in * p - pad_in, q_out * p - pad_out, p


def make_layer(
    d_in: int,
    d_out: int,
    p: int,
    backend: str,
    *,
    dtype: torch.dtype = F64,
    scale: float = 1.0,
    seed: int = 0,
) -> BlockCirculantLinear:
    torch.manual_seed(seed)
    m = BlockCirculantLinear(nn.Linear(d_in, d_out).to(dtype), p, scale=scale, backend=backend)
    with torch.no_grad():
        m.bca_kernel.normal_()
    return m


def adapter_fn(
    m: BlockCirculantLinear, names: tuple[str, ...] = ("default",)
) -> Callable[..., torch.Tensor]:
    """``(x, *kernels) -> layer(x)`` with the named adapters' kernels passed in."""

    def fn(x: torch.Tensor, *kernels: torch.Tensor) -> torch.Tensor:
        params = {f"bca_kernels.{n}": k for n, k in zip(names, kernels, strict=True)}
        out: torch.Tensor = torch.func.functional_call(m, params, (x,))
        return out

    return fn


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


def penalties(
    m: BlockCirculantLinear, x: torch.Tensor, h: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(∇_k ||∂L/∂x||², ∇_x ||∂L/∂k||², ∇_h ||∂L/∂k||²) for L = Σ h · adapter(x)."""
    k = m.bca_kernel
    x, h = leaf(x), leaf(h)
    loss = (h * m.adapter_forward(x)).sum()
    gx, gk = torch.autograd.grad(loss, (x, k), create_graph=True)
    pen_x = gx.pow(2).sum()
    pen_k = gk.pow(2).sum()
    kw = {"allow_unused": True, "materialize_grads": True}
    (q1,) = torch.autograd.grad(pen_x, (k,), retain_graph=True, **kw)
    q2, q3 = torch.autograd.grad(pen_k, (x, h), **kw)
    return q1, q2, q3


def oracle_penalties(
    kernel: np.ndarray, x: np.ndarray, h: np.ndarray, d_in: int, d_out: int, scale: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The same three quantities in closed form from the dense float64 ΔW.

    ∂L/∂x = s·H ΔW and ∂L/∂k = s·Aᵀ(Hᵀ X) with A: kernel -> ΔW (kernel_grad_oracle is
    Aᵀ of a dense gradient), so ∇_k ||∂L/∂x||² = 2s²·Aᵀ(Hᵀ H ΔW),
    ∇_x ||∂L/∂k||² = 2s·H A(∂L/∂k) and ∇_h ||∂L/∂k||² = 2s·X A(∂L/∂k)ᵀ."""
    dw = dense_oracle(kernel, d_in, d_out)
    x = np.asarray(x, np.float64)
    h = np.asarray(h, np.float64)
    q1 = 2 * scale**2 * kernel_grad_oracle(h @ dw, h, kernel.shape)
    gk = scale * kernel_grad_oracle(x, h, kernel.shape)
    dgk = dense_oracle(gk, d_in, d_out)
    return q1, 2 * scale * h @ dgk, 2 * scale * x @ dgk.T


# ---------------------------------------------------------------------------------------
# gradgradcheck (finite differences of the analytic gradients), float64
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gradgradcheck_input_and_kernel(backend: str, shape: tuple[int, int, int]) -> None:
    d_in, d_out, p = shape
    m = make_layer(d_in, d_out, p, backend, scale=0.7)
    x = torch.randn(3, d_in, dtype=F64)
    if backend == "auto" and rust_available():
        assert m.resolve_backend(x) == "rust"
    fn = adapter_fn(m)
    k = leaf(m.bca_kernel)
    assert torch.autograd.gradcheck(fn, (leaf(x), k))
    assert torch.autograd.gradgradcheck(fn, (leaf(x), k))
    # with respect to the input alone (frozen kernel) and the kernel alone (data input)
    assert torch.autograd.gradgradcheck(
        lambda a: fn(a, m.bca_kernel.detach()), (leaf(x),), fast_mode=True
    )
    assert torch.autograd.gradgradcheck(lambda b: fn(x, b), (k,), fast_mode=True)


@pytest.mark.parametrize("backend", BACKENDS)
@given(shape=layer_shapes(), n=st.sampled_from([0, 1, 2]), scale=st.sampled_from([1.0, -1.5]))
def test_gradgradcheck_drawn_shapes(
    backend: str, shape: tuple[int, int, int], n: int, scale: float
) -> None:
    d_in, d_out, p = shape
    m = make_layer(d_in, d_out, p, backend, scale=scale)
    x = torch.randn(n, d_in, dtype=F64)
    assert torch.autograd.gradgradcheck(
        adapter_fn(m), (leaf(x), leaf(m.bca_kernel)), fast_mode=True
    )


@needs_rust
@pytest.mark.parametrize("shape", SHAPES[:3], ids=lambda s: "x".join(map(str, s)))
def test_gradgradcheck_custom_operator(shape: tuple[int, int, int]) -> None:
    """The compiled path's operator, called eagerly, differentiates twice as well."""
    d_in, d_out, p = shape
    m = make_layer(d_in, d_out, p, "rust")
    handle = m._adapters["default"].handle

    def op(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = torch.ops.bca.rust_block_circulant(a, b, handle, d_in, d_out, -0.6)
        return out

    x = torch.randn(3, d_in, dtype=F64)
    assert torch.autograd.gradgradcheck(op, (leaf(x), leaf(m.bca_kernel)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_third_order(backend: str) -> None:
    """The double-backward graph is plain torch ops, so a third derivative is right too."""
    m = make_layer(7, 5, 3, backend, scale=1.3)
    fn = adapter_fn(m)

    def input_grad(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        (gx,) = torch.autograd.grad(fn(a, b).pow(2).sum(), (a,), create_graph=True)
        return gx

    x = leaf(torch.randn(2, 7, dtype=F64))
    assert torch.autograd.gradgradcheck(input_grad, (x, leaf(m.bca_kernel)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradgradcheck_named_adapters(backend: str) -> None:
    """Two weighted adapters of different block sizes and scales, through forward()."""
    torch.manual_seed(1)
    m = BlockCirculantLinear(
        nn.Linear(9, 7).double(), 4, scale=0.5, backend=backend, init="gaussian"
    )
    m.add_adapter("other", 3, scale=-2.0, init="kaiming")
    m.set_adapter(["default", "other"], weights=[1.5, 0.25])
    fn = adapter_fn(m, ("default", "other"))
    inputs = (
        leaf(torch.randn(2, 9, dtype=F64)),
        leaf(m.bca_kernels["default"]),
        leaf(m.bca_kernels["other"]),
    )
    assert torch.autograd.gradgradcheck(fn, inputs)


# ---------------------------------------------------------------------------------------
# gradient penalties against the dense oracle
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@given(
    shape=layer_shapes(),
    batch=st.sampled_from([(1,), (3,), (2, 3), (0,)]),
    scale=st.sampled_from([1.0, 0.5, -1.75]),
)
def test_penalties_match_dense_oracle(
    backend: str,
    dtype: torch.dtype,
    shape: tuple[int, int, int],
    batch: tuple[int, ...],
    scale: float,
) -> None:
    d_in, d_out, p = shape
    m = make_layer(d_in, d_out, p, backend, dtype=dtype, scale=scale)
    x = torch.randn(*batch, d_in, dtype=dtype)
    h = torch.randn(*batch, d_out, dtype=dtype)
    got = penalties(m, x, h)
    want = oracle_penalties(
        m.bca_kernel.detach().numpy(),
        x.reshape(-1, d_in).numpy(),
        h.reshape(-1, d_out).numpy(),
        d_in,
        d_out,
        scale,
    )
    tol = 1e-10 if dtype == F64 else 2e-5
    for name, g, w in zip(("d/dk|gx|^2", "d/dx|gk|^2", "d/dh|gk|^2"), got, want, strict=True):
        assert g.dtype == dtype
        err = rel_err(g.detach().reshape(w.shape).numpy(), w)
        assert err <= tol, f"{name}: relative error {err:.3g} > {tol}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_penalty_matches_finite_differences(backend: str) -> None:
    """∇_k ||∂L/∂x||² by central differences of the first-order gradient (the issue's check)."""
    d_in, d_out, p = 10, 7, 4
    m = make_layer(d_in, d_out, p, backend, scale=0.7)
    x = torch.randn(5, d_in, dtype=F64)
    h = torch.randn(5, d_out, dtype=F64)
    q1, _, _ = penalties(m, x, h)

    def pen_x(k: torch.Tensor) -> float:
        with torch.no_grad():
            m.bca_kernel.copy_(k)
        xx = leaf(x)
        (gx,) = torch.autograd.grad((h * m.adapter_forward(xx)).sum(), (xx,))
        return float(gx.pow(2).sum())

    k0 = m.bca_kernel.detach().clone()
    fd = torch.zeros_like(k0).reshape(-1)
    eps = 1e-6
    for i in range(fd.numel()):
        e = torch.zeros_like(fd)
        e[i] = eps
        e = e.reshape(k0.shape)
        fd[i] = (pen_x(k0 + e) - pen_x(k0 - e)) / (2 * eps)
    err = rel_err(q1.numpy(), fd.reshape(k0.shape).numpy())
    assert err < 1e-6, f"relative error {err:.3g} against finite differences"


@pytest.mark.parametrize("backend", BACKENDS)
def test_create_graph_first_order_equals_fast_path(backend: str) -> None:
    """The differentiable backward gives the fast path's first-order gradients."""
    m = make_layer(13, 9, 4, backend, dtype=torch.float32, scale=0.3)
    x = torch.randn(6, 13)
    h = torch.randn(6, 9)
    grads = []
    for create_graph in (False, True):
        xx = leaf(x)
        loss = (h * m(xx)).sum()
        grads.append(torch.autograd.grad(loss, (xx, m.bca_kernel), create_graph=create_graph))
    for fast, slow in zip(*grads, strict=True):
        torch.testing.assert_close(slow.detach(), fast, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_views_and_batched_inputs(backend: str) -> None:
    """Non-contiguous views (a transpose, a strided slice) and a 3-d batch."""
    d_in, d_out, p = 10, 7, 4
    m = make_layer(d_in, d_out, p, backend, scale=0.7)
    base = torch.randn(d_in, 8, dtype=F64)
    for x in (base.T, base.T[::2], base.T.reshape(2, 4, d_in)):
        assert not x.is_contiguous() or x.dim() == 3
        h = torch.randn(*x.shape[:-1], d_out, dtype=F64)
        got = penalties(m, x, h)
        want = oracle_penalties(
            m.bca_kernel.detach().numpy(),
            x.reshape(-1, d_in).numpy(),
            h.reshape(-1, d_out).numpy(),
            d_in,
            d_out,
            0.7,
        )
        for g, w in zip(got, want, strict=True):
            assert rel_err(g.reshape(w.shape).numpy(), w) <= 1e-10
    assert torch.autograd.gradgradcheck(
        lambda a, b: adapter_fn(m)(a.T, b), (leaf(base), leaf(m.bca_kernel))
    )


@pytest.mark.parametrize("xdtype", [torch.float16, torch.bfloat16])
def test_half_precision_input(xdtype: torch.dtype) -> None:
    """Half inputs run in float32 like the forward; the penalties follow float32's."""
    d_in, d_out, p = 12, 10, 4
    m = make_layer(d_in, d_out, p, "auto", dtype=torch.float32, scale=0.7)
    x = torch.randn(4, d_in).to(xdtype)
    h = torch.randn(4, d_out)
    assert m.resolve_backend(x) == "torch"

    def pen(inp: torch.Tensor) -> torch.Tensor:
        inp = leaf(inp)
        loss = (h * m.adapter_forward(inp).float()).sum()
        gx, _ = torch.autograd.grad(loss, (inp, m.bca_kernel), create_graph=True)
        (q,) = torch.autograd.grad(gx.float().pow(2).sum(), (m.bca_kernel,))
        return q

    got, want = pen(x), pen(x.float())
    assert got.dtype == torch.float32
    assert rel_err(got.numpy(), want.numpy()) < 3e-2


def test_compiled_double_backward_errors_or_agrees() -> None:
    """torch.compile (aot_autograd) refuses double backward itself with a clear error;
    should a future torch allow it, the result must equal eager mode's."""
    torch._dynamo.reset()
    m = make_layer(10, 7, 4, "auto", scale=0.7)
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    x = torch.randn(3, 10, dtype=F64)

    def pen(fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        xx = leaf(x)
        (gx,) = torch.autograd.grad(fn(xx).pow(2).sum(), (xx,), create_graph=True)
        (q,) = torch.autograd.grad(gx.pow(2).sum(), (m.bca_kernel,))
        return q

    want = pen(m)
    try:
        got = pen(compiled)
    except RuntimeError as exc:
        assert "double backward" in str(exc)
    else:
        torch.testing.assert_close(got, want)
    torch._dynamo.reset()
