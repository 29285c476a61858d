"""Named adapters: several adapters on one base model, switched, combined and merged.

The combined output of several active adapters must equal the base model with their
(weighted) updates merged into the weights -- unlike PEFT 0.21.2's C3A, which chains
active adapters (the second receives the first's output).
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from bca.model import (
    BCAConfig,
    active_adapters,
    adapter_modules,
    adapter_names,
    adapters_disabled,
    add_adapter,
    delete_adapter,
    freeze_base,
    inject_adapters,
    load_adapter,
    merge_adapters,
    merge_and_unload,
    parameter_groups,
    save_adapter,
    set_adapter,
    set_adapters_enabled,
    unmerge_adapters,
)
from bca.nn import BlockCirculantLinear, rust_available
from conftest import TOL, dense_oracle, kernel_grad_oracle, rel_err

transformers = pytest.importorskip("transformers")
from test_torch_model import ids_batch, logits, tiny_bert, train_steps  # noqa: E402

needs_rust = pytest.mark.skipif(not rust_available(), reason="bca._bca extension not built")
BACKENDS = ["torch", pytest.param("rust", marks=needs_rust)]
DTYPES = [torch.float32, torch.float64]
NP = {torch.float32: np.dtype(np.float32), torch.float64: np.dtype(np.float64)}


def layer_with_adapters(
    d_in: int,
    d_out: int,
    sizes: dict[str, tuple[int, float]],
    *,
    backend: str = "torch",
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
) -> BlockCirculantLinear:
    """A Linear with named adapters ``{name: (p, scale)}``, kernels random."""
    torch.manual_seed(seed)
    base = nn.Linear(d_in, d_out).to(dtype)
    items = list(sizes.items())
    first, (p0, s0) = items[0]
    m = BlockCirculantLinear(base, p0, scale=s0, backend=backend, adapter_name=first)
    for name, (p, s) in items[1:]:
        m.add_adapter(name, p, scale=s)
    with torch.no_grad():
        for k in m.bca_kernels.values():
            k.normal_()
    return m


def expected_output(
    m: BlockCirculantLinear, x: np.ndarray, names: list[str], weights: list[float]
) -> np.ndarray:
    """Dense float64 oracle: base + Σ w_a scale_a ΔW_a x."""
    w = m.base_layer.weight.detach().double().numpy()
    b = m.base_layer.bias.detach().double().numpy()
    dw = np.zeros_like(w)
    for n, wt in zip(names, weights, strict=True):
        k = m.bca_kernels[n].detach().double().numpy()
        dw += wt * m.adapter_scale(n) * dense_oracle(k, m.in_features, m.out_features)
    return x @ (w + dw).T + b


def terms_magnitude(
    m: BlockCirculantLinear, x: np.ndarray, names: list[str], weights: list[float]
) -> np.ndarray:
    """|base(x)| + Σ |w_a scale_a ΔW_a x|, elementwise: the scale of the rounding error
    of the weighted sum, which floating point cannot make smaller than a few ulps of
    its terms however much they cancel."""
    w = m.base_layer.weight.detach().double().numpy()
    b = m.base_layer.bias.detach().double().numpy()
    total = np.abs(x @ w.T + b)
    for n, wt in zip(names, weights, strict=True):
        k = m.bca_kernels[n].detach().double().numpy()
        dw = wt * m.adapter_scale(n) * dense_oracle(k, m.in_features, m.out_features)
        total = total + np.abs(x @ dw.T)
    return total


def sum_err(got: np.ndarray, want: np.ndarray, terms: np.ndarray) -> float:
    """||got - want|| relative to the norm of the terms' magnitudes (not of the sum: a
    sum that cancels, e.g. 0.36 + 4.79 - 5.12 = 0.025, keeps only the terms' absolute
    rounding error, which is large against the small result)."""
    diff = float(np.linalg.norm(np.asarray(got, np.float64) - want))
    return diff / max(float(np.linalg.norm(terms)), 1e-30)


# ---------------------------------------------------------------------------------------
# layer level
# ---------------------------------------------------------------------------------------
@st.composite
def multi_shapes(draw: st.DrawFn) -> tuple[int, int, list[int], list[float]]:
    d_in = draw(st.integers(1, 24))
    d_out = draw(st.integers(1, 24))
    k = draw(st.integers(1, 3))
    ps = [draw(st.integers(1, max(d_in, d_out))) for _ in range(k)]
    weights = [draw(st.floats(-2, 2, allow_nan=False, width=32)) for _ in range(k)]
    return d_in, d_out, ps, weights


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@settings(deadline=None, max_examples=25)
@given(shape=multi_shapes(), rows=st.integers(0, 5))
def test_weighted_sum_equals_dense_oracle(
    backend: str, dtype: torch.dtype, shape: tuple[int, int, list[int], list[float]], rows: int
) -> None:
    d_in, d_out, ps, weights = shape
    sizes = {f"a{i}": (p, 0.5 + i) for i, p in enumerate(ps)}
    m = layer_with_adapters(d_in, d_out, sizes, backend=backend, dtype=dtype)
    names = list(sizes)
    m.set_adapter(names, weights)
    x = np.random.default_rng(1).standard_normal((rows, d_in))
    with torch.no_grad():
        got = m(torch.from_numpy(x).to(dtype)).double().numpy()
    want = expected_output(m, x, names, weights)
    terms = terms_magnitude(m, x, names, weights)
    assert got.shape == (rows, d_out)
    assert sum_err(got, want, terms) < TOL[NP[dtype]]
    # merged weights give the same function
    with torch.no_grad():
        m.merge()
        merged = m(torch.from_numpy(x).to(dtype)).double().numpy()
        m.unmerge()
    assert sum_err(merged, want, terms) < TOL[NP[dtype]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_of_several_active_adapters(backend: str) -> None:
    m = layer_with_adapters(10, 7, {"a": (4, 1.5), "b": (3, -0.5)}, backend=backend)
    m.set_adapter(["a", "b"], [0.7, 2.0])
    x = torch.randn(5, 10, dtype=torch.float64, requires_grad=True)
    g = torch.randn(5, 7, dtype=torch.float64)
    m(x).backward(g)
    w = m.base_layer.weight.detach().numpy()
    dense = {
        n: m.adapter_scale(n) * dense_oracle(m.bca_kernels[n].detach().numpy(), 10, 7)
        for n in ("a", "b")
    }
    want_x = g.numpy() @ (w + 0.7 * dense["a"] + 2.0 * dense["b"])
    assert rel_err(x.grad.numpy(), want_x) < 1e-12
    for n, wt in (("a", 0.7), ("b", 2.0)):
        p = m.adapter_block_size(n)
        q_out, q_in = -(-7 // p), -(-10 // p)
        xp = np.zeros((5, q_in * p))
        xp[:, :10] = x.detach().numpy()
        gp = np.zeros((5, q_out * p))
        gp[:, :7] = g.numpy()
        want_k = wt * m.adapter_scale(n) * kernel_grad_oracle(xp, gp, (q_out, q_in, p))
        assert rel_err(m.bca_kernels[n].grad.numpy(), want_k) < 1e-12
    kernels = [m.bca_kernels[n].detach().clone().requires_grad_() for n in ("a", "b")]
    xx = x.detach().clone().requires_grad_()

    def f(x_: torch.Tensor, ka: torch.Tensor, kb: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = torch.func.functional_call(
            m, {"bca_kernels.a": ka, "bca_kernels.b": kb}, (x_,)
        )
        return out

    assert torch.autograd.gradcheck(f, (xx, *kernels))


def test_switching_and_disabling() -> None:
    m = layer_with_adapters(12, 8, {"a": (4, 1.0), "b": (6, 2.0), "c": (12, 0.3)})
    x = torch.randn(3, 12, dtype=torch.float64)
    base = m.base_layer(x).detach().numpy()
    for name in ("a", "b", "c", "a"):
        m.set_adapter(name)
        assert m.current_adapter == name and m.block_size == m.adapter_block_size(name)
        with torch.no_grad():
            got = m(x).numpy()
        assert rel_err(got, expected_output(m, x.numpy(), [name], [1.0])) < 1e-12
    m.set_adapter([])
    with torch.no_grad():
        assert torch.equal(m(x), m.base_layer(x))
    m.set_adapter(["a", "b"])
    m.adapter_enabled = False
    with torch.no_grad():
        assert np.array_equal(m(x).numpy(), base)
    m.adapter_enabled = True
    m.delete_adapter("a")
    assert m.adapter_names == ["b", "c"] and m.active_adapters == ["b"]
    assert "bca_kernels.a" not in dict(m.named_parameters())


def test_merge_set_and_unmerge_bit_exact() -> None:
    m = layer_with_adapters(9, 9, {"a": (3, 1.0), "b": (9, 0.5), "c": (2, 1.0)})
    w0 = m.base_layer.weight.detach().clone()
    x = torch.randn(4, 9, dtype=torch.float64)
    m.set_adapter(["a", "b", "c"], [1.0, -1.0, 0.25])
    with torch.no_grad():
        live = m(x)
    m.merge(adapter_names=["a", "b"], weights=[1.0, -1.0])
    assert m.merged_adapters == {"a": 1.0, "b": -1.0}
    with torch.no_grad():  # c is still added on top of the merged a and b
        assert rel_err(m(x).numpy(), live.numpy()) < 1e-12
    with pytest.raises(ValueError, match="merged"):
        m.adapter_enabled = False
    with pytest.raises(ValueError, match="merged"):
        m.delete_adapter("a")
    m.unmerge()
    assert torch.equal(m.base_layer.weight, w0) and not m.merged


def test_layer_errors() -> None:
    m = layer_with_adapters(8, 8, {"a": (4, 1.0)})
    with pytest.raises(ValueError, match="already exists"):
        m.add_adapter("a", 4)
    with pytest.raises(ValueError, match="unknown adapter 'zz'.*\\['a'\\]"):
        m.set_adapter("zz")
    with pytest.raises(ValueError, match="duplicates"):
        m.set_adapter(["a", "a"])
    with pytest.raises(ValueError, match="weights has 2 entries"):
        m.set_adapter(["a"], [1.0, 2.0])
    with pytest.raises(ValueError, match="weights must be finite"):
        m.set_adapter(["a"], [float("nan")])
    with pytest.raises(ValueError, match="'copy' is reserved"):
        m.add_adapter("copy", 4)
    with pytest.raises(ValueError, match="must not contain"):
        m.add_adapter("x.y", 4)
    with pytest.raises(TypeError, match="adapter_name"):
        m.add_adapter("", 4)
    with pytest.raises(ValueError, match="block_size"):
        m.add_adapter("b", 0)
    m.set_adapter([])
    with pytest.raises(ValueError, match="no active adapter"):
        m.adapter_forward(torch.zeros(1, 8, dtype=torch.float64))
    m2 = BlockCirculantLinear(nn.Linear(8, 6), 2, pad=False)
    with pytest.raises(ValueError, match="pad=False"):
        m2.add_adapter("b", 4)


def test_combined_kernel() -> None:
    m = layer_with_adapters(8, 8, {"a": (4, 2.0), "b": (4, 0.5), "c": (2, 1.0)})
    m.set_adapter(["a", "b"], [1.0, 3.0])
    got = m.combined_kernel()
    assert got is not None
    k, s = got
    assert s == 1.0
    want = 2.0 * m.bca_kernels["a"] + 1.5 * m.bca_kernels["b"]
    assert torch.allclose(k, want.detach(), rtol=0, atol=1e-14)
    m.set_adapter(["a", "c"])
    with pytest.raises(ValueError, match="different block sizes"):
        m.combined_kernel()
    m.set_adapter([])
    assert m.combined_kernel() is None


# ---------------------------------------------------------------------------------------
# model level
# ---------------------------------------------------------------------------------------
def two_adapter_bert(backend: str = "torch") -> nn.Module:
    model = tiny_bert()
    inject_adapters(
        model,
        BCAConfig(
            block_size=8, target_modules=["query", "value"], backend=backend, init="xavier_uniform"
        ),
        adapter_name="a",
    )
    add_adapter(
        model,
        "b",
        BCAConfig(
            block_size=16,
            target_modules=["query", "key"],
            scale=0.5,
            backend=backend,
            init="xavier_uniform",
        ),
    )
    return model


def merged_copy(model: nn.Module, names: list[str], weights: list[float]) -> nn.Module:
    other = copy.deepcopy(model)
    merge_and_unload(other, names, weights)
    assert not list(adapter_modules(other))
    return other


@pytest.mark.parametrize("backend", BACKENDS)
def test_model_switch_combine_merge(backend: str) -> None:
    model = two_adapter_bert(backend)
    assert adapter_names(model) == ["a", "b"] and active_adapters(model) == ["a"]
    ids = ids_batch()
    base = copy.deepcopy(model)
    set_adapter(base, [])
    with torch.no_grad():
        want_base = logits(base, ids)
    for names, weights in ((["a"], [1.0]), (["b"], [1.0]), (["a", "b"], [0.6, -1.5])):
        set_adapter(model, names, weights)
        with torch.no_grad():
            got = logits(model, ids)
            want = logits(merged_copy(model, names, weights), ids)
        assert rel_err(got.numpy(), want.numpy()) < 1e-5, names
        assert rel_err(got.numpy(), want_base.numpy()) > 1e-4  # the adapters do something
    with adapters_disabled(model), torch.no_grad():
        assert rel_err(logits(model, ids).numpy(), want_base.numpy()) < 1e-6
    set_adapters_enabled(model, False)
    with torch.no_grad():
        assert rel_err(logits(model, ids).numpy(), want_base.numpy()) < 1e-6
    set_adapters_enabled(model, True)
    # merge a weighted set in place, unmerge bit-exact
    state = {k: v.clone() for k, v in model.state_dict().items()}
    set_adapter(model, ["a", "b"], [0.6, -1.5])
    with torch.no_grad():
        live = logits(model, ids)
        merge_adapters(model)
        assert rel_err(logits(model, ids).numpy(), live.numpy()) < 1e-5
    unmerge_adapters(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_training_one_adapter_leaves_the_other() -> None:
    model = two_adapter_bert()
    set_adapter(model, "b")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".bca_kernels.b" in n for n in trainable)
    groups = parameter_groups(model, lr=0.1)
    assert [g["name"] for g in groups] == ["bca_kernels_p16"]
    a_before = {n: p.detach().clone() for n, p in model.named_parameters() if ".bca_kernels.a" in n}
    b_before = {n: p.detach().clone() for n, p in model.named_parameters() if ".bca_kernels.b" in n}
    train_steps(model, steps=2)
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in a_before.items())
    assert any(not torch.equal(after[n], v) for n, v in b_before.items())
    set_adapter(model, ["a", "b"])
    freeze_base(model)
    assert any(".bca_kernels.a" in n for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_save_load_named_adapters(tmp_path: Path, backend: str) -> None:
    model = two_adapter_bert(backend)
    set_adapter(model, ["a", "b"])
    with pytest.raises(ValueError, match="pass adapter_name"):
        save_adapter(model, tmp_path / "x")
    save_adapter(model, tmp_path / "a", adapter_name="a")
    save_adapter(model, tmp_path / "b", adapter_name="b")
    fresh = tiny_bert()
    load_adapter(fresh, tmp_path / "a", adapter_name="a", backend=backend)
    load_adapter(fresh, tmp_path / "b", adapter_name="b", backend=backend)
    assert adapter_names(fresh) == ["a", "b"] and active_adapters(fresh) == ["a"]
    ids = ids_batch()
    for names, weights in ((["a"], [1.0]), (["b"], [1.0]), (["a", "b"], [1.0, 0.25])):
        set_adapter(model, names, weights)
        set_adapter(fresh, names, weights)
        with torch.no_grad():
            assert torch.equal(logits(fresh, ids), logits(model, ids))
    # overwrite a named adapter in place
    with pytest.raises(ValueError, match="differs from the saved one"):
        load_adapter(fresh, tmp_path / "b", adapter_name="a")
    load_adapter(fresh, tmp_path / "a", adapter_name="a")
    # a file for another model
    wider = tiny_bert(hidden=48)
    inject_adapters(wider, BCAConfig(block_size=8, target_modules=["query"]), adapter_name="x")
    with pytest.raises(ValueError, match="in_features=32.*in_features=48"):
        load_adapter(wider, tmp_path / "a", adapter_name="a")


def test_delete_adapter_restores_plain_layers() -> None:
    model = two_adapter_bert()
    reference = tiny_bert()
    delete_adapter(model, "b")
    assert adapter_names(model) == ["a"]
    # key layers carried only b: they are plain again
    key = model.get_submodule("bert.encoder.layer.0.attention.self.key")
    assert isinstance(key, nn.Linear)
    delete_adapter(model, "a")
    assert not list(adapter_modules(model)) and not hasattr(model, "bca_config")
    ids = ids_batch()
    with torch.no_grad():
        assert torch.equal(logits(model, ids), logits(reference, ids))


def test_model_level_errors(tmp_path: Path) -> None:
    model = two_adapter_bert()
    with pytest.raises(ValueError, match="already has an adapter 'b'"):
        add_adapter(model, "b", BCAConfig(block_size=8, target_modules=["query"]))
    with pytest.raises(ValueError, match="unknown adapters \\['zz'\\]"):
        set_adapter(model, ["zz"])
    with pytest.raises(ValueError, match="modules_to_save"):
        add_adapter(
            model,
            "c",
            BCAConfig(block_size=8, target_modules=["query"], modules_to_save=["classifier"]),
        )
    with pytest.raises(ValueError, match="runs once per model.*add_adapter"):
        inject_adapters(model, BCAConfig(block_size=8, target_modules=["query"]))
    merge_adapters(model, ["a"])
    with pytest.raises(ValueError, match="merged"), adapters_disabled(model):
        pass
    with pytest.raises(ValueError, match="merged"):
        delete_adapter(model, "a")
    unmerge_adapters(model)
    head = tiny_bert()
    inject_adapters(
        head, BCAConfig(block_size=8, target_modules=["query"], modules_to_save=["classifier"])
    )
    save_adapter(head, tmp_path / "head")
    with pytest.raises(ValueError, match="modules_to_save"):
        load_adapter(model, tmp_path / "head", adapter_name="c")


# ---------------------------------------------------------------------------------------
# against PEFT's C3A with two active adapters
# ---------------------------------------------------------------------------------------
def test_two_active_c3a_adapters_equal_peft_merged_weights() -> None:
    """Ours equals PEFT's *merged* weights; PEFT's own two-adapter forward is recorded."""
    peft = pytest.importorskip("peft")
    from bca.peft_interop import c3a_kernel_to_bca

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 16, dtype=torch.float64))
    cfg_a = peft.C3AConfig(block_size=4, target_modules=["0"], init_weights="xavier_uniform")
    cfg_b = peft.C3AConfig(block_size=8, target_modules=["0"], init_weights="xavier_uniform")
    pm = peft.get_peft_model(copy.deepcopy(base), cfg_a, adapter_name="a")
    pm.add_adapter("b", cfg_b)
    pm.base_model.set_adapter(["a", "b"])
    layer = pm.base_model.model[0]
    x = torch.randn(5, 16, dtype=torch.float64)

    ours = BlockCirculantLinear(copy.deepcopy(base[0]), 4, adapter_name="a")
    ours.add_adapter("b", 8)
    with torch.no_grad():
        for name in ("a", "b"):
            w = layer.c3a_kernel[name].detach().double()
            ours.bca_kernels[name].copy_(c3a_kernel_to_bca(w))
    ours.set_adapter(["a", "b"])
    merged = copy.deepcopy(pm)
    with torch.no_grad():
        merged.base_model.merge_adapter(["a", "b"])
        want = merged(x).numpy()
        got = ours(x).numpy()
        peft_live = pm(x).numpy()
    oracle = expected_output(ours, x.numpy(), ["a", "b"], [1.0, 1.0])
    assert rel_err(got, oracle) < TOL[np.dtype(np.float64)]
    # PEFT builds its merged ΔW at float32 precision (measured ~1e-8 here)
    assert rel_err(want, oracle) < TOL[np.dtype(np.float32)]
    err = rel_err(peft_live, oracle)
    if err > 1e-10:
        pytest.xfail(
            f"peft {peft.__version__} C3A with two active adapters differs from its own "
            f"merged weights (relative error {err:.3g}): it chains the adapters"
        )
