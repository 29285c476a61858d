"""Mixed-adapter batches: each row its own adapter, in the core and the torch layer.

Every row is checked against the float64 scipy dense oracle of its own adapter; kernel
gradients against the dense kernel-gradient oracle summed over that adapter's rows.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import bca
from bca.model import (
    BCAConfig,
    add_adapter,
    inject_adapters,
    merge_adapters,
    mixed_adapter_batch,
    set_adapter,
)
from bca.nn import BASE_ADAPTER, BlockCirculantLinear
from conftest import TOL, dense_oracle, kernel_grad_oracle, rel_err, run_threads

BLOCK_SIZES = st.sampled_from([1, 2, 3, 4, 5, 7, 8, 11, 13, 16, 17])


# --------------------------------------------------------------------------------------
# core (numpy)
# --------------------------------------------------------------------------------------
@st.composite
def core_cases(draw: st.DrawFn) -> dict:
    p = draw(BLOCK_SIZES)
    q_in, q_out = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    n_ops = draw(st.integers(1, 4))
    leading = draw(st.sampled_from([(0,), (1,), (2,), (9,), (40,), (2, 3), (3, 0)]))
    return dict(
        p=p,
        q_in=q_in,
        q_out=q_out,
        d_in=q_in * p - draw(st.integers(0, p - 1)),
        d_out=q_out * p - draw(st.integers(0, p - 1)),
        n_ops=n_ops,
        leading=leading,
        dtype=np.dtype(draw(st.sampled_from([np.float32, np.float64]))),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


def make_core(case: dict) -> tuple[list[np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(case["seed"])
    dt = case["dtype"]
    shape = (case["q_out"], case["q_in"], case["p"])
    kernels = [rng.standard_normal(shape).astype(dt) for _ in range(case["n_ops"])]
    index = rng.integers(-1, case["n_ops"], size=case["leading"])
    x = rng.standard_normal((*case["leading"], case["d_in"])).astype(dt)
    g = rng.standard_normal((*case["leading"], case["d_out"])).astype(dt)
    return kernels, index, x, g


@given(core_cases())
def test_core_rows_match_their_operators_dense_oracle(case: dict) -> None:
    kernels, index, x, g = make_core(case)
    d_in, d_out, tol = case["d_in"], case["d_out"], TOL[case["dtype"]]
    ops = [bca.BlockCirculant(k, d_in, d_out) for k in kernels]
    y = bca.mixed_matmul(ops, index, x)
    assert y.shape == (*case["leading"], d_out) and y.dtype == case["dtype"]
    gx, gks = bca.mixed_matmul_backward(ops, index, x, g)
    assert gx is not None and gx.shape == x.shape and len(gks) == len(ops)

    idx = index.reshape(-1)
    x2, g2 = x.reshape(-1, d_in).astype(np.float64), g.reshape(-1, d_out).astype(np.float64)
    y2, gx2 = y.reshape(-1, d_out), gx.reshape(-1, d_in)
    dense = [dense_oracle(k, d_in, d_out) for k in kernels]
    want_y = np.zeros_like(y2, np.float64)
    want_gx = np.zeros_like(gx2, np.float64)
    for r, a in enumerate(idx):
        if a >= 0:
            want_y[r] = dense[a] @ x2[r]
            want_gx[r] = g2[r] @ dense[a]
    assert rel_err(y2, want_y) <= tol
    assert rel_err(gx2, want_gx) <= tol
    assert not y2[idx < 0].any() and not gx2[idx < 0].any()
    for a, gk in enumerate(gks):
        assert gk is not None and gk.shape == kernels[a].shape and gk.dtype == case["dtype"]
        rows = idx == a
        assert rel_err(gk, kernel_grad_oracle(x2[rows], g2[rows], kernels[a].shape)) <= tol
        if not rows.any():
            assert not gk.any()
    # one gradient alone equals the same gradient of the combined call
    gx_only, nones = bca.mixed_matmul_backward(ops, index, None, g, kernel_grad=False)
    assert nones == [None] * len(ops)
    np.testing.assert_array_equal(gx_only, gx)
    none_x, gks_only = bca.mixed_matmul_backward(ops, index, x, g, input_grad=False)
    assert none_x is None
    for a, b in zip(gks_only, gks, strict=True):
        np.testing.assert_array_equal(a, b)


def test_core_rows_equal_each_operators_own_matmul_bit_for_bit(rng: np.random.Generator) -> None:
    kernels = [rng.standard_normal((3, 4, 16)).astype(np.float32) for _ in range(5)]
    ops = [bca.BlockCirculant(k, 60, 48) for k in kernels]
    index = rng.integers(-1, 5, size=77)
    x = rng.standard_normal((77, 60)).astype(np.float32)
    y = bca.mixed_matmul(ops, index, x)
    for a, op in enumerate(ops):
        np.testing.assert_array_equal(y[index == a], op.matmul(x[index == a]))
    # a Python list of ints is a valid adapter_index
    np.testing.assert_array_equal(bca.mixed_matmul(ops, index.tolist(), x), y)


def test_core_errors_name_the_argument() -> None:
    k = np.ones((2, 3, 4), np.float32)
    ops = [bca.BlockCirculant(k, 10, 7), bca.BlockCirculant(k * 2, 10, 7)]
    x = np.ones((3, 10), np.float32)
    with pytest.raises(ValueError, match=r"adapter_index\[1\] = 2 is out of range"):
        bca.mixed_matmul(ops, [0, 2, 1], x)
    with pytest.raises(ValueError, match=r"adapter_index\[2\] = -2"):
        bca.mixed_matmul(ops, [0, 1, -2], x)
    with pytest.raises(ValueError, match="adapter_index: shape"):
        bca.mixed_matmul(ops, [0, 1], x)
    with pytest.raises(TypeError, match="adapter_index must hold integers"):
        bca.mixed_matmul(ops, np.zeros(3), x)
    with pytest.raises(TypeError, match="adapter_index must hold integers"):
        bca.mixed_matmul(ops, np.zeros(3, bool), x)
    other = bca.BlockCirculant(k, 11, 7)
    with pytest.raises(ValueError, match="operators: operator 2 has in_features=11"):
        bca.mixed_matmul([*ops, other], [0, 1, 0], x)
    with pytest.raises(TypeError, match=r"operators\[2\] has dtype float64"):
        bca.mixed_matmul([*ops, bca.BlockCirculant(k.astype(np.float64), 10, 7)], [0, 1, 0], x)
    with pytest.raises(TypeError, match=r"operators\[1\] must be a bca.BlockCirculant"):
        bca.mixed_matmul([ops[0], k], [0, 0, 0], x)
    with pytest.raises(TypeError, match="operators must be a sequence"):
        bca.mixed_matmul(ops[0], [0, 0, 0], x)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one operator"):
        bca.mixed_matmul([], [-1, -1, -1], x)
    with pytest.raises(ValueError, match="x: last dimension must be in_features = 10"):
        bca.mixed_matmul(ops, [0, 1, 0], np.ones((3, 11), np.float32))
    with pytest.raises(TypeError, match="x must have dtype float32"):
        bca.mixed_matmul(ops, [0, 1, 0], x.astype(np.float64))
    bad = x.copy()
    bad[1, 3] = np.nan
    with pytest.raises(ValueError, match="x: contains NaN"):
        bca.mixed_matmul(ops, [0, 1, 0], bad)
    assert not bca.mixed_matmul(ops, [0, -1, 0], bad)[1].any()  # a row without adapter is not read
    g = np.ones((3, 7), np.float32)
    with pytest.raises(ValueError, match="x: needed for the kernel gradients"):
        bca.mixed_matmul_backward(ops, [0, 1, 0], None, g)
    with pytest.raises(ValueError, match="same leading dimensions"):
        bca.mixed_matmul_backward(ops, [0, 1, 0], np.ones((4, 10), np.float32), g)


# --------------------------------------------------------------------------------------
# torch layer
# --------------------------------------------------------------------------------------
BACKEND_NAMES = ["rust", "torch"]


@st.composite
def layer_cases(draw: st.DrawFn) -> dict:
    p = draw(BLOCK_SIZES)
    d_in = draw(st.integers(1, 3)) * p - draw(st.integers(0, p - 1))
    d_out = draw(st.integers(1, 3)) * p - draw(st.integers(0, p - 1))
    if draw(st.booleans()):  # p = d: one circulant block
        p = d_in = d_out = draw(st.sampled_from([5, 8, 13]))
    n_adapters = draw(st.integers(1, 3))
    # a second block size exercises the grouping of adapters by block size
    sizes = [p] + [
        draw(st.sampled_from([p, p, p, max(1, p - 1), p + 2])) for _ in range(n_adapters - 1)
    ]
    batch = draw(st.sampled_from([0, 1, 2, 5]))
    names = [
        draw(st.sampled_from([BASE_ADAPTER] + [f"a{i}" for i in range(n_adapters)]))
        for _ in range(batch)
    ]
    return dict(
        d_in=d_in,
        d_out=d_out,
        sizes=sizes,
        scales=[draw(st.sampled_from([1.0, 0.5, -2.0])) for _ in range(n_adapters)],
        names=names,
        middle=draw(st.sampled_from([(), (1,), (3,), (2, 2)])),
        dtype=draw(st.sampled_from([torch.float32, torch.float64])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def make_layer(case: dict, backend: str) -> BlockCirculantLinear:
    torch.manual_seed(case["seed"])
    base = torch.nn.Linear(case["d_in"], case["d_out"]).to(case["dtype"])
    layer = BlockCirculantLinear(
        base,
        case["sizes"][0],
        scale=case["scales"][0],
        init="xavier_uniform",
        backend=backend,
        adapter_name="a0",
    )
    for i, (p, s) in enumerate(zip(case["sizes"][1:], case["scales"][1:], strict=True), 1):
        layer.add_adapter(f"a{i}", p, scale=s, init="xavier_uniform")
    return layer


def oracle_delta(layer: BlockCirculantLinear, name: str) -> np.ndarray:
    """scale · ΔW of a named adapter, float64, from the scipy oracle."""
    k = layer.bca_kernels[name].detach().numpy()
    return layer.adapter_scale(name) * dense_oracle(k, layer.in_features, layer.out_features)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@given(case=layer_cases())
def test_layer_rows_and_gradients_match_dense_oracle(backend: str, case: dict) -> None:
    layer = make_layer(case, backend)
    names, dt = case["names"], case["dtype"]
    tol = TOL[np.dtype(np.float32 if dt == torch.float32 else np.float64)]
    gen = torch.Generator().manual_seed(case["seed"])
    x = torch.randn(len(names), *case["middle"], case["d_in"], dtype=dt, generator=gen)
    x.requires_grad_(True)
    y = layer(x, adapter_names=names)
    assert y.shape == (len(names), *case["middle"], case["d_out"]) and y.dtype == dt
    g = torch.randn(y.shape, dtype=dt, generator=gen)
    kernels = {n: layer.bca_kernels[n] for n in layer.adapter_names}
    grads = torch.autograd.grad(y, [x, *kernels.values()], g, allow_unused=True)

    w = layer.base_layer.weight.detach().double().numpy()
    bias = layer.base_layer.bias.detach().double().numpy()
    x64, g64 = x.detach().double().numpy(), g.double().numpy()
    want_y = np.zeros(y.shape)
    want_gx = np.zeros(x.shape)
    want_delta = np.zeros(y.shape)
    want_gk = {n: np.zeros(k.shape) for n, k in kernels.items()}
    for b, name in enumerate(names):
        xb = x64[b].reshape(-1, case["d_in"])
        gb = g64[b].reshape(-1, case["d_out"])
        m = w + (oracle_delta(layer, name) if name != BASE_ADAPTER else 0.0)
        want_y[b] = (xb @ m.T + bias).reshape(want_y[b].shape)
        want_gx[b] = (gb @ m).reshape(want_gx[b].shape)
        if name != BASE_ADAPTER:
            want_delta[b] = (xb @ oracle_delta(layer, name).T).reshape(want_y[b].shape)
            want_gk[name] += layer.adapter_scale(name) * kernel_grad_oracle(
                xb, gb, tuple(kernels[name].shape)
            )
    # the adapter part alone, row by row (the base layer's float32 rounding left out)
    delta = layer.mixed_adapter_forward(x.detach(), names).detach().double().numpy()
    assert rel_err(delta, want_delta) <= tol * 4
    assert rel_err(y.detach().numpy(), want_y) <= tol * 4
    assert rel_err(grads[0].numpy(), want_gx) <= tol * 4
    for (n, _), gk in zip(kernels.items(), grads[1:], strict=True):
        if n in names and int(np.prod(case["middle"], dtype=int)) > 0:
            assert gk is not None, n
            assert rel_err(gk.numpy(), want_gk[n]) <= tol * 4, n
        else:  # an adapter without rows takes no part in the graph
            assert gk is None or not gk.any(), n


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_layer_gradcheck_float64(backend: str) -> None:
    torch.manual_seed(0)
    base = torch.nn.Linear(10, 7).double()
    layer = BlockCirculantLinear(base, 4, init="xavier_uniform", backend=backend, adapter_name="a")
    layer.add_adapter("b", 4, scale=0.5, init="xavier_uniform")
    layer.add_adapter("c", 3, scale=-1.5, init="xavier_uniform")  # another block size
    names = ["b", "a", BASE_ADAPTER, "c", "b"]
    x = torch.randn(5, 2, 10, dtype=torch.float64, requires_grad=True)

    def f(x: torch.Tensor, ka: torch.Tensor, kb: torch.Tensor, kc: torch.Tensor) -> torch.Tensor:
        params = {"bca_kernels.a": ka, "bca_kernels.b": kb, "bca_kernels.c": kc}
        out: torch.Tensor = torch.func.functional_call(
            layer, params, (x,), {"adapter_names": names}
        )
        return out

    kernels = (layer.bca_kernels[n].detach().clone().requires_grad_(True) for n in "abc")
    inputs = (x, *kernels)
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)
    # a backward with create_graph=True (another code path) gives the same gradients
    g = torch.randn(5, 2, 7, dtype=torch.float64)
    plain = torch.autograd.grad(f(*inputs), inputs, g)
    graph = torch.autograd.grad(f(*inputs), inputs, g, create_graph=True)
    for a, b in zip(plain, graph, strict=True):
        torch.testing.assert_close(a, b.detach(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_training_two_adapters_in_one_step_equals_two_separate_steps(backend: str) -> None:
    torch.manual_seed(1)
    base = torch.nn.Linear(24, 16)
    layer = BlockCirculantLinear(base, 8, init="xavier_uniform", backend=backend, adapter_name="a")
    layer.add_adapter("b", 8, scale=0.5, init="xavier_uniform")
    separate = copy.deepcopy(layer)
    initial = copy.deepcopy(layer)
    x = torch.randn(6, 3, 24)
    target = torch.randn(6, 3, 16)
    names = ["a", "b", "b", "a", BASE_ADAPTER, "b"]

    def loss_of(out: torch.Tensor, rows: list[int]) -> torch.Tensor:
        return ((out - target[rows]) ** 2).sum()

    # one mixed step for both adapters
    opt = torch.optim.SGD(layer.bca_kernels.parameters(), lr=0.01)
    opt.zero_grad()
    loss_of(layer(x, adapter_names=names), list(range(6))).backward()
    opt.step()
    # one step per adapter on its own rows (the base rows have no trainable part)
    for name in ("a", "b"):
        rows = [b for b, n in enumerate(names) if n == name]
        separate.set_adapter(name)
        opt = torch.optim.SGD([separate.bca_kernels[name]], lr=0.01)
        opt.zero_grad()
        loss_of(separate(x[rows]), rows).backward()
        opt.step()
    for name in ("a", "b"):
        torch.testing.assert_close(
            layer.bca_kernels[name], separate.bca_kernels[name], rtol=1e-5, atol=1e-6
        )
        assert not torch.equal(layer.bca_kernels[name], initial.bca_kernels[name])


def test_layer_errors() -> None:
    layer = BlockCirculantLinear(torch.nn.Linear(8, 8), 4, adapter_name="a")
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match=r"adapter_names\[1\]: unknown adapter 'zz'"):
        layer(x, adapter_names=["a", "zz"])
    with pytest.raises(ValueError, match="3 names for a batch of 2 rows"):
        layer(x, adapter_names=["a", "a", "a"])
    with pytest.raises(TypeError, match="adapter_names must be a list"):
        layer(x, adapter_names="a")
    with pytest.raises(TypeError, match=r"adapter_names\[0\] must be a str"):
        layer(x, adapter_names=[0, "a"])
    with pytest.raises(ValueError, match="needs x of shape"):
        layer(torch.randn(8), adapter_names=["a"])
    with pytest.raises(ValueError, match="reserved"):
        layer.add_adapter(BASE_ADAPTER, 4)
    rust = BlockCirculantLinear(torch.nn.Linear(8, 8), 4, backend="rust", adapter_name="a")
    with pytest.raises(TypeError, match="backend='rust' needs x of the kernel's dtype"):
        rust.mixed_adapter_forward(x.double(), ["a", "a"])
    layer.merge()
    with pytest.raises(ValueError, match="merged into the base weight; unmerge"):
        layer(x, adapter_names=["a", BASE_ADAPTER])
    layer.unmerge()
    layer.adapter_enabled = False  # disabled adapters: the base layer for every row
    torch.testing.assert_close(layer(x, adapter_names=["a", "a"]), layer.base_layer(x))


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_model_context_manager_equals_one_adapter_per_row(backend: str) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=48,
    )
    model = transformers.BertModel(cfg).eval()
    inject_adapters(
        model,
        BCAConfig(block_size=8, target_modules=["query", "value"], init="xavier_uniform",
                  backend=backend),
        adapter_name="s",
    )  # fmt: skip
    add_adapter(
        model,
        "l",
        BCAConfig(block_size=4, target_modules=["query", "key"], init="xavier_uniform",
                  scale=0.5, backend=backend),
    )  # fmt: skip
    ids = torch.randint(0, 50, (4, 6))
    names = ["s", "l", BASE_ADAPTER, "s"]
    with torch.no_grad():
        active_before = model(input_ids=ids).last_hidden_state
        with mixed_adapter_batch(model, names):
            mixed = model(input_ids=ids).last_hidden_state
        # hooks are gone: the active set again
        torch.testing.assert_close(model(input_ids=ids).last_hidden_state, active_before)
        rows = []
        for b, n in enumerate(names):
            set_adapter(model, [] if n == BASE_ADAPTER else n)
            rows.append(model(input_ids=ids[b : b + 1]).last_hidden_state[0])
    torch.testing.assert_close(mixed, torch.stack(rows), rtol=1e-5, atol=1e-5)

    with pytest.raises(ValueError, match=r"unknown adapters \['nope'\]"):
        with mixed_adapter_batch(model, ["s", "nope", "s", "s"]):
            pass
    set_adapter(model, "s")
    merge_adapters(model)
    with pytest.raises(ValueError, match="merged into the base weights"):
        with mixed_adapter_batch(model, names):
            pass


# --------------------------------------------------------------------------------------
# scales, add and kernel synchronisation in the core's mixed call; the layer's one-call
# inference path
# --------------------------------------------------------------------------------------
@given(core_cases(), st.sampled_from([None, [1.0], [0.5, -2.0, 3.0, 1.0], [1e-3, 0.0, 7.5, -1.0]]))
def test_core_scales_and_add_equal_the_composition_bit_for_bit(
    case: dict, scale_choice: list[float] | None
) -> None:
    """``scales=`` and ``add=`` give exactly ``add + y * row_scale`` (numpy, the dtype's
    rounding), and ``add`` is left as it was."""
    kernels, index, x, _ = make_core(case)
    d_in, d_out, dt = case["d_in"], case["d_out"], case["dtype"]
    ops = [bca.BlockCirculant(k, d_in, d_out) for k in kernels]
    scales = None if scale_choice is None else (scale_choice * 4)[: len(ops)]
    y = bca.mixed_matmul(ops, index, x)
    row_scale = np.ones(index.shape) if scales is None else np.asarray(scales)[index]
    want = y * np.where(index >= 0, row_scale, 1.0).astype(dt)[..., None]
    got = bca.mixed_matmul(ops, index, x, scales=scales)
    np.testing.assert_array_equal(got, want)
    assert got.dtype == dt
    base = np.random.default_rng(case["seed"]).standard_normal(y.shape).astype(dt)
    keep = base.copy()
    got = bca.mixed_matmul(ops, index, x, scales=scales, add=base)
    np.testing.assert_array_equal(got, base + want)
    np.testing.assert_array_equal(base, keep)
    assert got is not base


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(2, 3, 4), (8, 8, 64), (24, 24, 128)])
def test_core_sync_kernel_replaces_only_on_a_change_of_bits(shape: tuple, dtype: type) -> None:
    """``sync_kernel`` (and ``kernels=`` of the mixed call, which compares large kernels
    in parallel chunks) keeps the spectra for the same bits and replaces them for any
    change: one ulp in the first or last element, or 0.0 → -0.0."""
    rng = np.random.default_rng(3)
    k = rng.standard_normal(shape).astype(dtype)
    k.flat[len(k.flat) // 2] = 0.0
    op = bca.BlockCirculant(k)
    x = rng.standard_normal((5, shape[1] * shape[2])).astype(dtype)
    y = op.matmul(x)
    assert op.sync_kernel(k.copy()) is False
    np.testing.assert_array_equal(op.matmul(x), y)
    changes = []
    for where in (0, len(k.flat) - 1):
        k2 = k.copy()
        k2.flat[where] = np.nextafter(k2.flat[where], np.inf)
        changes.append(k2)
    k3 = changes[-1].copy()  # the kernel held when it comes: only the zero's sign differs
    k3.flat[len(k.flat) // 2] = -0.0
    changes.append(k3)
    for k2 in changes:
        assert op.sync_kernel(k2) is True
        np.testing.assert_array_equal(op.kernel, k2)
        np.testing.assert_array_equal(op.matmul(x), bca.BlockCirculant(k2).matmul(x))
        assert op.sync_kernel(k2) is False
    # the same through the mixed call, several operators, one changed in its last element
    ops = [bca.BlockCirculant(k) for _ in range(3)]
    index = np.array([0, 1, 2, 1, -1])
    got = bca._bca.mixed_forward(
        [o._op for o in ops], index, x, kernels=[k.copy(), changes[1], k.copy()]
    )
    np.testing.assert_array_equal(ops[1].kernel, changes[1])
    np.testing.assert_array_equal(ops[0].kernel, k)
    np.testing.assert_array_equal(got[[1, 3]], bca.BlockCirculant(changes[1]).matmul(x[[1, 3]]))
    np.testing.assert_array_equal(got[[0, 2]], bca.BlockCirculant(k).matmul(x[[0, 2]]))
    assert not got[4].any()


def test_core_scales_add_kernels_errors_name_the_argument() -> None:
    k = np.ones((2, 3, 4), np.float32)
    ops = [bca.BlockCirculant(k, 10, 7), bca.BlockCirculant(k * 2, 10, 7)]
    x = np.ones((3, 10), np.float32)
    idx = [0, 1, 0]
    with pytest.raises(ValueError, match=r"scales: expected one per operator \(2\), got 1"):
        bca.mixed_matmul(ops, idx, x, scales=[1.0])
    with pytest.raises(ValueError, match=r"scales\[1\] must be a finite float32 value, got NaN"):
        bca.mixed_matmul(ops, idx, x, scales=[1.0, float("nan")])
    with pytest.raises(ValueError, match=r"scales\[0\] must be a finite float32 value"):
        bca.mixed_matmul(ops, idx, x, scales=[1e300, 1.0])  # overflows float32
    with pytest.raises(TypeError, match="scales must be a list of floats"):
        bca.mixed_matmul(ops, idx, x, scales=["a", "b"])
    with pytest.raises(ValueError, match=r"add: shape must be the output's \(3, 7\), got \(3, 8\)"):
        bca.mixed_matmul(ops, idx, x, add=np.zeros((3, 8), np.float32))
    with pytest.raises(TypeError, match="add must have dtype float32"):
        bca.mixed_matmul(ops, idx, x, add=np.zeros((3, 7)))
    with pytest.raises(ValueError, match="add must be C-contiguous"):
        bca.mixed_matmul(ops, idx, x, add=np.zeros((7, 3), np.float32).T)
    with pytest.raises(TypeError, match="add must be a numpy.ndarray"):
        bca.mixed_matmul(ops, idx, x, add=[[0.0] * 7] * 3)
    raw = [o._op for o in ops]
    with pytest.raises(ValueError, match=r"kernels: expected one per operator \(2\), got 1"):
        bca._bca.mixed_forward(raw, np.array(idx), x, kernels=[k])
    with pytest.raises(TypeError, match="kernels must be a list of arrays"):
        bca._bca.mixed_forward(raw, np.array(idx), x, kernels=k)
    with pytest.raises(ValueError, match=r"kernels\[1\]: kernel must keep its shape"):
        bca._bca.mixed_forward(raw, np.array(idx), x, kernels=[k, np.ones((2, 3, 5), np.float32)])
    bad = k.copy()
    bad[0, 0, 0] = np.inf
    with pytest.raises(ValueError, match=r"kernels\[0\]: kernel: contains NaN or Inf"):
        bca._bca.mixed_forward(raw, np.array(idx), x, kernels=[bad, k])
    np.testing.assert_array_equal(ops[0].kernel, k)  # a refused kernel changes nothing
    # the new kernels are installed only when the whole call succeeds
    with pytest.raises(ValueError, match=r"x: last dimension"):
        bca._bca.mixed_forward(raw, np.array(idx), x[:, 1:].copy(), kernels=[k * 3, k * 4])
    with pytest.raises(ValueError, match=r"adapter_index"):
        bca._bca.mixed_forward(raw, np.array([0, 5, 0]), x, kernels=[k * 3, k * 4])
    np.testing.assert_array_equal(ops[0].kernel, k)
    np.testing.assert_array_equal(ops[1].kernel, k * 2)
    bca._bca.mixed_forward(raw, np.array(idx), x, kernels=[k * 3, k * 4])
    np.testing.assert_array_equal(ops[1].kernel, k * 4)
    with pytest.raises(TypeError, match=r"kernels\[1\]: kernel must have dtype float32"):
        bca._bca.mixed_forward(raw, np.array(idx), x, kernels=[k, k.astype(np.float64)])
    with pytest.raises(TypeError, match="operators must be a list"):
        bca._bca.mixed_forward("ops", np.array(idx), x, kernels=[k, k])


def _spy_fast_path() -> tuple[list[bool], object]:
    """Record whether the layer's one-call inference path ran (True) or declined."""
    from unittest import mock

    import bca.nn.layer as layer_module

    taken: list[bool] = []
    real = layer_module._rust_mixed_fast

    def spy(*args: object, **kwargs: object) -> object:
        y = real(*args, **kwargs)  # type: ignore[arg-type]
        taken.append(y is not None)
        return y

    return taken, mock.patch.object(layer_module, "_rust_mixed_fast", spy)


@pytest.mark.skipif(not bca.nn.rust_available(), reason="needs the Rust extension")
@given(case=layer_cases())
def test_layer_inference_call_equals_the_autograd_path_bit_for_bit(case: dict) -> None:
    """Without gradients a mixed batch on the Rust backend is one core call with the
    base output added in it; its result is bit for bit the autograd path's."""
    layer = make_layer(case, "rust")
    names, dt = case["names"], case["dtype"]
    gen = torch.Generator().manual_seed(case["seed"])
    x = torch.randn(len(names), *case["middle"], case["d_in"], dtype=dt, generator=gen)
    taken, patch = _spy_fast_path()
    with patch:
        with torch.no_grad():
            fast = layer(x, adapter_names=names)
            fast_again = layer(x, adapter_names=names)  # the cached plan and views
        ref = layer(x.clone().requires_grad_(True), adapter_names=names).detach()
    torch.testing.assert_close(fast, ref, rtol=0, atol=0)
    torch.testing.assert_close(fast_again, ref, rtol=0, atol=0)
    sizes = {layer.adapter_block_size(n) for n in names if n != BASE_ADAPTER}
    if len(sizes) == 1 and x.numel() > 0:
        assert taken[:2] == [True, True]
    else:
        assert not any(taken)


@pytest.mark.skipif(not bca.nn.rust_available(), reason="needs the Rust extension")
def test_layer_inference_call_follows_every_kernel_edit() -> None:
    """The one-call path reads kernels through cached views; every way of changing a
    kernel between calls is seen (the core compares the values with its copy)."""
    torch.manual_seed(0)
    base = torch.nn.Linear(24, 16)
    layer = BlockCirculantLinear(base, 8, backend="rust", adapter_name="a", init="xavier_uniform")
    layer.add_adapter("b", 8, scale=0.5, init="xavier_uniform")
    x = torch.randn(5, 24)
    names = ["a", "b", BASE_ADAPTER, "b", "a"]
    w = base.weight.detach().double().numpy()
    bias = base.bias.detach().double().numpy()
    taken, patch = _spy_fast_path()

    def check() -> None:
        with torch.no_grad():
            got = layer(x, adapter_names=names).double().numpy()
        x64 = x.double().numpy()
        for r, n in enumerate(names):
            m = w + (oracle_delta(layer, n) if n != BASE_ADAPTER else 0.0)
            assert rel_err(got[r], m @ x64[r] + bias) < 1e-5, (r, n)

    with patch:
        check()
        check()
        with torch.no_grad():
            layer.bca_kernels["b"].mul_(2.0)  # in place: a new version
        check()
        layer.bca_kernels["a"].data.add_(0.25)  # through .data: version unchanged
        check()
        layer.bca_kernels["a"].detach().numpy()[0, 0, 0] += 1.0  # through a numpy view
        check()
        layer.bca_kernels["b"].data = torch.randn(2, 3, 8)  # new storage under the parameter
        check()
        layer.bca_kernels["a"] = torch.nn.Parameter(torch.randn(2, 3, 8))  # a new parameter
        check()
        layer.clear_cache()
        check()
        layer.set_adapter_scale("a", -3.0)
        check()
        layer.delete_adapter("b")
        layer.add_adapter("b", 4, init="xavier_uniform")  # same name, another state and size
        check()
        check()
    assert taken == [True] * 9, taken  # the last two calls have two block sizes: no one-call path


def test_layer_mixed_plans_are_bounded_and_names_checked() -> None:
    layer = BlockCirculantLinear(torch.nn.Linear(8, 8), 4, adapter_name="a")
    layer.add_adapter("b", 4)
    x = torch.randn(3, 8)
    rng = np.random.default_rng(0)
    with torch.no_grad():
        for _ in range(30):
            layer(x, adapter_names=[str(n) for n in rng.choice(["a", "b", BASE_ADAPTER], 3)])
    assert 1 <= len(layer.__dict__["_mixed_plans"]) <= 8
    with pytest.raises(TypeError, match=r"adapter_names\[1\] must be a str, got list"):
        layer(x, adapter_names=["a", ["b"], "a"])  # unhashable: still named
    layer.delete_adapter("b")
    with pytest.raises(ValueError, match=r"adapter_names\[0\]: unknown adapter 'b'"):
        layer(x, adapter_names=["b", "a", "a"])  # a cached plan does not outlive its adapter


@pytest.mark.skipif(not bca.nn.rust_available(), reason="needs the Rust extension")
def test_layer_inference_call_from_threads_while_kernels_move() -> None:
    """Threads run mixed batches on one layer while another thread swaps each kernel
    between two versions (new storage each time, as ``param.data = ...`` does) and clears
    the caches: every result is exactly one of the 8 combinations of versions."""
    import itertools
    import threading

    torch.manual_seed(1)
    layer = BlockCirculantLinear(
        torch.nn.Linear(48, 40), 8, backend="rust", adapter_name="a", init="xavier_uniform"
    )
    for n in ("b", "c"):
        layer.add_adapter(n, 8, scale=0.5, init="xavier_uniform")
    adapters = ("a", "b", "c")
    versions = {n: (layer.bca_kernels[n].detach().clone(), torch.randn(5, 6, 8)) for n in adapters}
    x = torch.randn(6, 48)
    names = ["a", "b", "c", BASE_ADAPTER, "c", "a"]
    valid = []
    for combo in itertools.product((0, 1), repeat=3):
        for n, v in zip(adapters, combo, strict=True):
            layer.bca_kernels[n].data = versions[n][v].clone()
        valid.append(layer(x.clone().requires_grad_(True), adapter_names=names).detach())
    stop = threading.Event()
    bad: list[str] = []
    calls = [0]

    def user() -> None:
        with torch.no_grad():
            while not stop.is_set():
                got = layer(x, adapter_names=names)
                calls[0] += 1
                if not any(torch.equal(got, v) for v in valid):
                    bad.append(f"not one of the versions: {got[:, :3]}")

    def mover() -> None:
        rng = np.random.default_rng(0)
        while not stop.is_set():
            n = str(rng.choice(adapters))
            if rng.random() < 0.8:
                layer.bca_kernels[n].data = versions[n][int(rng.integers(0, 2))].clone()
            else:
                layer.clear_cache()

    run_threads([user, user, user, mover], stop, 1.5)
    assert bad == [] and calls[0] > 50


@pytest.mark.skipif(not bca.nn.rust_available(), reason="needs the Rust extension")
@given(case=layer_cases(), weight=st.sampled_from([1.0, 0.5, -1.5]))
def test_layer_one_adapter_inference_call_equals_the_autograd_path(
    case: dict, weight: float
) -> None:
    """With one live adapter and no gradients the layer also makes one core call (every
    row on the one operator) that adds the base output: bit for bit the autograd path,
    and each edit of the kernel is seen."""
    from unittest import mock

    import bca.nn.layer as layer_module

    layer = make_layer(case, "rust")
    layer.set_adapter(["a0"], weights=[weight])
    dt = case["dtype"]
    gen = torch.Generator().manual_seed(case["seed"])
    x = torch.randn(len(case["names"]), *case["middle"], case["d_in"], dtype=dt, generator=gen)
    if x.dim() == 3 and x.shape[1] > 1:
        x = x.transpose(0, 1)  # not contiguous
    taken: list[bool] = []
    real = layer_module._rust_single_fast

    def spy(*args: object) -> object:
        y = real(*args)  # type: ignore[arg-type]
        taken.append(y is not None)
        return y

    with mock.patch.object(layer_module, "_rust_single_fast", spy):
        with torch.no_grad():
            fast = layer(x)
        ref = layer(x.clone().requires_grad_(True)).detach()
        torch.testing.assert_close(fast, ref, rtol=0, atol=0)
        layer.bca_kernels["a0"].data.mul_(-2.0)  # through .data: seen
        with torch.no_grad():
            fast = layer(x)
        ref = layer(x.clone().requires_grad_(True)).detach()
        torch.testing.assert_close(fast, ref, rtol=0, atol=0)
    # the no_grad calls take the one-call path; the autograd calls decline it
    assert taken == ([True, False] * 2 if x.numel() else [False] * 4)
