"""torch.compile: adapted layers and models compile without graph breaks (fullgraph=True)
and compute what eager mode computes, forward and gradients, for both backends.

The Rust backend runs under the compiler as the custom operator
``torch.ops.bca.rust_block_circulant`` (with a fake implementation and an autograd
formula); the torch backend as ``torch.ops.bca.torch_block_circulant`` (and its mixed
twin), so that compiled graphs hold no complex tensors: inductor generates no code for
them and miscompiled such graphs on CUDA (torch 2.11). In eval mode the compiled graph computes
the kernel spectra itself instead of reading the eager-mode cache (which compares data
pointers, a graph break)."""

from __future__ import annotations

import copy
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from bca.model import BCAConfig, add_adapter, inject_adapters, set_adapter
from bca.nn import BASE_ADAPTER, BlockCirculantLinear, rust_available
from conftest import TOL, dense_oracle, kernel_grad_oracle, rel_err

needs_rust = pytest.mark.skipif(not rust_available(), reason="bca._bca extension not built")
needs_cxx = pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("c++") is None,
    reason="inductor on CPU needs a C++ compiler",
)

BACKENDS = ["torch", pytest.param("rust", marks=needs_rust)]
DTYPES = [torch.float32, torch.float64]
NP = {torch.float32: np.dtype(np.float32), torch.float64: np.dtype(np.float64)}


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> None:
    torch._dynamo.reset()


def _layer(
    d_in: int, d_out: int, p: int, backend: str, dtype: torch.dtype, seed: int = 0
) -> BlockCirculantLinear:
    torch.manual_seed(seed)
    m = BlockCirculantLinear(nn.Linear(d_in, d_out).to(dtype), p, scale=0.7, backend=backend)
    with torch.no_grad():
        m.bca_kernel.normal_()
    return m


def _step(
    fn: nn.Module, m: BlockCirculantLinear, x: torch.Tensor, g: torch.Tensor
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    m.zero_grad()
    x = x.clone().requires_grad_(True)
    y = fn(x)
    y.backward(g)
    assert x.grad is not None and m.bca_kernel.grad is not None
    return y.detach().numpy(), x.grad.numpy(), m.bca_kernel.grad.numpy()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(12, 10, 4), (7, 7, 7), (9, 5, 1), (16, 24, 8)])
def test_compiled_layer_equals_eager_and_oracle(
    backend: str, dtype: torch.dtype, shape: tuple[int, int, int]
) -> None:
    """Forward, input and kernel gradients of the compiled layer (fullgraph) equal eager
    mode and the dense oracle; shapes include padding, p = d and p = 1."""
    d_in, d_out, p = shape
    m = _layer(d_in, d_out, p, backend, dtype)
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    gen = torch.Generator().manual_seed(1)
    for rows in (5, 1, 3):  # new shapes: recompiled or dynamic, never wrong
        x = torch.randn(rows, d_in, generator=gen, dtype=dtype)
        g = torch.randn(rows, d_out, generator=gen, dtype=dtype)
        got = _step(compiled, m, x, g)
        want = _step(m, m, x, g)
        for a, b in zip(got, want, strict=True):
            assert rel_err(a, b) <= TOL[NP[dtype]]
        dw = m.scale * dense_oracle(m.bca_kernel.detach().double().numpy(), d_in, d_out)
        x64 = x.double().numpy()
        base = m.base_layer(x).detach().double().numpy()
        assert rel_err(got[0], base + x64 @ dw.T) <= TOL[NP[dtype]]
        assert (
            rel_err(got[1], g.double().numpy() @ (m.weight.double().numpy() + dw)) <= TOL[NP[dtype]]
        )
        gk = m.scale * kernel_grad_oracle(x64, g.double().numpy(), m.kernel_shape)
        assert rel_err(got[2], gk) <= TOL[NP[dtype]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_eval_mode_follows_kernel_updates(backend: str) -> None:
    """Eval mode and no_grad compile without graph breaks and see every kernel change
    (the compiled graph recomputes the spectra; the Rust operator re-synchronises)."""
    m = _layer(12, 12, 4, backend, torch.float32).eval()
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    x = torch.randn(3, 12)
    for _ in range(3):
        with torch.no_grad():
            got = compiled(x)
            want = m.base_layer(x) + m.adapter_forward(x)
        assert rel_err(got.numpy(), want.numpy()) <= TOL[np.dtype(np.float32)]
        with torch.no_grad():
            m.bca_kernel.mul_(-1.5).add_(0.25)


@needs_rust
def test_rust_custom_operator_registration() -> None:
    """torch.library.opcheck: schema, fake implementation, autograd registration."""
    m = _layer(12, 10, 4, "rust", torch.float64)
    m(torch.randn(2, 12, dtype=torch.float64))  # create the state's operator
    handle = m._adapters[m.current_adapter].handle
    x = torch.randn(3, 12, dtype=torch.float64, requires_grad=True)
    k = m.bca_kernel.detach().clone().requires_grad_(True)
    torch.library.opcheck(torch.ops.bca.rust_block_circulant.default, (x, k, handle, 12, 10, 0.7))
    g = torch.randn(3, 10, dtype=torch.float64)
    for flags in [(True, True), (True, False), (False, True)]:
        torch.library.opcheck(
            torch.ops.bca.rust_block_circulant_backward.default,
            (x.detach(), k.detach(), g, handle, 12, 10, 0.7, *flags),
            test_utils=("test_schema", "test_faketensor"),
        )
    # the operator's own gradient formula, checked numerically
    assert torch.autograd.gradcheck(
        lambda a, b: torch.ops.bca.rust_block_circulant(a, b, handle, 12, 10, 0.7), (x, k)
    )


@needs_rust
def test_copies_get_their_own_operator_state() -> None:
    """deepcopy gives a fresh state and handle: a compiled copy trained apart from the
    original never reads the original's Rust operator."""
    m = _layer(8, 8, 4, "rust", torch.float64)
    twin = copy.deepcopy(m)
    assert twin._adapters["default"].handle != m._adapters["default"].handle
    with torch.no_grad():
        twin.bca_kernel.mul_(3.0)
    x = torch.randn(2, 8, dtype=torch.float64)
    a = torch.compile(m, backend="aot_eager", fullgraph=True)(x)
    b = torch.compile(twin, backend="aot_eager", fullgraph=True)(x)
    assert rel_err(a.detach().numpy(), m(x).detach().numpy()) <= 1e-12
    assert rel_err(b.detach().numpy(), twin(x).detach().numpy()) <= 1e-12
    assert rel_err(a.detach().numpy(), b.detach().numpy()) > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_named_adapters(backend: str) -> None:
    """Two weighted active adapters of different block sizes, and a switch to one of
    them (a recompilation), compiled as in eager mode."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 24), nn.GELU(), nn.Linear(24, 12)).double()
    cfg = {"target_modules": ["0", "2"], "init": "gaussian", "backend": backend}
    inject_adapters(model, BCAConfig(block_size=4, **cfg), adapter_name="a")
    add_adapter(model, "b", BCAConfig(block_size=6, scale=0.5, **cfg))
    x = torch.randn(5, 12, dtype=torch.float64)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    for names, weights in [(["a", "b"], [0.3, -1.2]), ("b", None)]:
        set_adapter(model, names, weights)
        for mode in (True, False):
            model.train(mode)
            got, want = compiled(x), model(x)
            assert rel_err(got.detach().numpy(), want.detach().numpy()) <= 1e-12


@needs_cxx
@pytest.mark.parametrize("backend", BACKENDS)
def test_inductor_training_matches_eager(backend: str) -> None:
    """A few optimizer steps of a compiled (inductor) float64 model give the kernels that
    eager steps give."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 8)).double()
    cfg = BCAConfig(block_size=8, target_modules=["0", "2"], init="gaussian", backend=backend)
    models = [copy.deepcopy(base), copy.deepcopy(base)]
    for m in models:
        torch.manual_seed(1)
        inject_adapters(m, cfg)
    runs = [models[0], torch.compile(models[1], fullgraph=True)]
    opts = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1) for m in models]
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        x = torch.randn(6, 16, generator=gen, dtype=torch.float64)
        t = torch.randn(6, 8, generator=gen, dtype=torch.float64)
        for run, opt in zip(runs, opts, strict=True):
            opt.zero_grad()
            torch.nn.functional.mse_loss(run(x), t).backward()
            opt.step()
    for name in ("0", "2"):
        a = models[0].get_submodule(name).bca_kernel.detach().numpy()
        b = models[1].get_submodule(name).bca_kernel.detach().numpy()
        assert rel_err(b, a) <= 1e-12


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]


@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_custom_operators_registration(dtype: torch.dtype) -> None:
    """torch.library.opcheck of the torch backend's operators (schema, fake
    implementation, autograd registration) and gradcheck of their gradient formulas."""
    x = torch.randn(3, 12, dtype=dtype, requires_grad=True)
    k = torch.randn(3, 3, 4, dtype=dtype, requires_grad=True)
    g = torch.randn(3, 10, dtype=dtype)
    torch.library.opcheck(torch.ops.bca.torch_block_circulant.default, (x, k, 0.7, 12, 10))
    for flags in [(True, True), (True, False), (False, True)]:
        torch.library.opcheck(
            torch.ops.bca.torch_block_circulant_backward.default,
            (x.detach(), k.detach(), g, 0.7, 12, *flags),
            test_utils=("test_schema", "test_faketensor"),
        )
    ks = [k, torch.randn(3, 3, 4, dtype=dtype, requires_grad=True)]
    args = (x, ks, [0.7, -1.5], [2, 1], 12, 10)
    torch.library.opcheck(torch.ops.bca.torch_mixed_block_circulant.default, args)
    for flags in [(True, [True, True]), (False, [True, False]), (True, [False, False])]:
        torch.library.opcheck(
            torch.ops.bca.torch_mixed_block_circulant_backward.default,
            (x.detach(), [t.detach() for t in ks], g, [0.7, -1.5], [2, 1], 12, *flags),
            test_utils=("test_schema", "test_faketensor"),
        )
    if dtype == torch.float64:
        assert torch.autograd.gradcheck(
            lambda a, b: torch.ops.bca.torch_block_circulant(a, b, 0.7, 12, 10), (x, k)
        )
        assert torch.autograd.gradcheck(
            lambda a, b, c: torch.ops.bca.torch_mixed_block_circulant(
                a, [b, c], [0.7, -1.5], [2, 1], 12, 10
            ),
            (x, *ks),
        )


def _graph_dtypes(fn: object, *args: torch.Tensor) -> tuple[set[torch.dtype], set[str]]:
    """The dtypes of every value in the forward and backward graphs that AOTAutograd
    hands to the compiler for ``fn(*args).sum().backward()``, and their call targets."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    dtypes: set[torch.dtype] = set()
    targets: set[str] = set()

    def keep(gm: torch.fx.GraphModule, example_inputs: object) -> object:
        for node in gm.graph.nodes:
            val = node.meta.get("val")
            for v in val if isinstance(val, (list, tuple)) else [val]:
                if isinstance(v, torch.Tensor):
                    dtypes.add(v.dtype)
            if node.op == "call_function":
                targets.add(str(node.target))
        return make_boxed_func(gm.forward)

    compiled = torch.compile(fn, backend=aot_autograd(fw_compiler=keep), fullgraph=True)
    compiled(*args).sum().backward()
    return dtypes, targets


def test_compiled_torch_graphs_hold_no_complex_tensors() -> None:
    """The torch backend under torch.compile: one adapter and a mixed batch, forward and
    backward graphs, hold real tensors only (the FFTs run inside the operators)."""
    torch.manual_seed(0)
    m = _layer(12, 10, 4, "torch", torch.float32)
    m.add_adapter("b", 4, scale=0.5, init="gaussian")
    x = torch.randn(4, 12, requires_grad=True)
    for fn, want in [
        (m, "bca.torch_block_circulant"),
        (lambda t: m(t, adapter_names=["b", "default", BASE_ADAPTER, "b"]), "mixed"),
    ]:
        dtypes, targets = _graph_dtypes(fn, x)
        assert not any(d.is_complex for d in dtypes), (dtypes, targets)
        assert any(want in t for t in targets), targets


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_compiled_mixed_batch_equals_eager(device: str, dtype: torch.dtype) -> None:
    """A mixed-adapter batch (``adapter_names``) compiled with fullgraph: outputs, input
    and kernel gradients equal eager mode's, under aot_eager and (CUDA, or with a C++
    compiler) inductor."""
    torch.manual_seed(0)
    base = nn.Linear(12, 10)
    m = BlockCirculantLinear(base, 4, init="gaussian", backend="torch", adapter_name="a")
    m.add_adapter("b", 4, scale=0.5, init="gaussian")
    m.add_adapter("c", 3, scale=-1.5, init="gaussian")  # another block size
    m = m.to(device, dtype)
    names = ["b", "a", BASE_ADAPTER, "c", "b", "a"]
    compilers = ["aot_eager"]
    if device == "cuda" or shutil.which("g++") or shutil.which("c++"):
        compilers.append("inductor")
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(len(names), 3, 12, generator=gen, dtype=dtype).to(device)
    g = torch.randn(len(names), 3, 10, generator=gen, dtype=dtype).to(device)
    kernels = [m.bca_kernels[n] for n in "abc"]

    def step(fn: object) -> list[np.ndarray]:
        xi = x.clone().requires_grad_(True)
        y = fn(xi, adapter_names=names)  # type: ignore[operator]
        grads = torch.autograd.grad(y, [xi, *kernels], g)
        return [t.detach().double().cpu().numpy() for t in (y, *grads)]

    want = step(m)
    for compiler in compilers:
        torch._dynamo.reset()
        compiled = torch.compile(m, backend=compiler, fullgraph=True)
        for _ in range(2):
            got = step(compiled)
            for a, b in zip(got, want, strict=True):
                assert rel_err(a, b) <= TOL[NP[dtype]] * 4, compiler


@needs_cuda
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_cuda_compiled_training_steps_equal_eager(mode: str) -> None:
    """On a GPU (torch backend), compiled training steps, CUDA graphs included
    (``reduce-overhead``), give eager mode's outputs and gradients."""
    m = _layer(64, 48, 16, "torch", torch.float32).cuda()
    compiled = torch.compile(m, mode=mode, fullgraph=True)
    gen = torch.Generator().manual_seed(3)
    for _ in range(5):  # reduce-overhead records its CUDA graphs after warm-up calls
        x = torch.randn(8, 64, generator=gen).cuda()
        g = torch.randn(8, 48, generator=gen).cuda()
        results = []
        for fn in (compiled, m):
            m.zero_grad()
            xi = x.clone().requires_grad_(True)
            y = fn(xi)
            y.backward(g)
            assert xi.grad is not None and m.bca_kernel.grad is not None
            results.append([t.detach().cpu().numpy() for t in (y, xi.grad, m.bca_kernel.grad)])
        for a, b in zip(*results, strict=True):
            assert rel_err(a, b) <= TOL[np.dtype(np.float32)]
