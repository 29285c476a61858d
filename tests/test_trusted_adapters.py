"""Serving with trusted kernels (``bca.model.trusted_adapters``, ``KernelCache.freeze``).

Inside the block the per-call bitwise kernel check is skipped while a kernel is the same
parameter object at the same address with the same version counter: every edit that
bumps the version counter (or replaces the tensor or its storage) is still seen, edits
through ``.data`` or numpy are not, until the block ends. Every result here is checked
against the float64 scipy dense oracle of the kernels it should have used.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Callable
from typing import Any
from unittest import mock

import numpy as np
import pytest
import torch

import bca
from bca._errors import BcaError
from bca.model import BCAConfig, inject_adapters, load_adapter, save_adapter, trusted_adapters
from bca.nn import BASE_ADAPTER, BlockCirculantLinear, KernelCache
from conftest import dense_oracle, rel_err, run_threads

BACKENDS = ["torch"] + (["rust"] if bca.nn.rust_available() else [])
#: how the layer is called: a mixed batch, one active adapter, with autograd
CALLS = ["mixed", "one", "autograd"]
NAMES = ["a", "b", BASE_ADAPTER, "b", "a"]


def make_layer(backend: str, dtype: torch.dtype = torch.float32) -> BlockCirculantLinear:
    torch.manual_seed(0)
    base = torch.nn.Linear(24, 20).to(dtype)
    layer = BlockCirculantLinear(base, 8, backend=backend, adapter_name="a", init="xavier_uniform")
    layer.add_adapter("b", 8, scale=0.5, init="xavier_uniform")
    return layer.to(dtype).eval()


def expected(layer: BlockCirculantLinear, x: torch.Tensor, call: str) -> np.ndarray:
    """The layer's output from the float64 oracle of the kernels it holds now."""
    w = layer.base_layer.weight.detach().double().numpy()
    bias = layer.base_layer.bias.detach().double().numpy()
    names = NAMES if call == "mixed" else ["a"] * x.shape[0]
    out = []
    for r, n in enumerate(names):
        m = w
        if n != BASE_ADAPTER:
            k = layer.bca_kernels[n].detach().double().numpy()
            m = w + layer.adapter_scale(n) * dense_oracle(k, layer.in_features, layer.out_features)
        out.append(m @ x[r].double().numpy() + bias)
    return np.stack(out)


def run(layer: BlockCirculantLinear, x: torch.Tensor, call: str) -> np.ndarray:
    if call == "mixed":
        with torch.no_grad():
            return layer(x, adapter_names=NAMES).double().numpy()
    layer.set_adapter("a")
    if call == "one":
        with torch.no_grad():
            return layer(x).double().numpy()
    return layer(x.clone().requires_grad_(True)).detach().double().numpy()


def after_call(
    owner: object,
    name: str,
    hook: Callable[[], None],
    when: Callable[[dict[str, Any]], bool] = lambda kwargs: True,
) -> Any:
    """A patch of ``owner.name`` that runs ``hook()`` right after each call that ``when``
    accepts (given its keyword arguments): what another thread might do just after a
    call has read a kernel, made deterministic."""
    real = getattr(owner, name)

    def patched(*args: Any, **kwargs: Any) -> Any:
        out = real(*args, **kwargs)
        if when(kwargs):
            hook()
        return out

    return mock.patch.object(owner, name, patched)


def follows(layer: BlockCirculantLinear, x: torch.Tensor, call: str) -> bool:
    """Whether the layer's output is that of the kernels it holds now."""
    return rel_err(run(layer, x, call), expected(layer, x, call)) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("call", CALLS)
def test_trusted_layer_sees_every_edit_the_version_counter_sees(backend: str, call: str) -> None:
    layer = make_layer(backend)
    x = torch.randn(5, 24)
    checked = make_layer(backend)  # the same kernels, never trusted: the bitwise reference
    with trusted_adapters(layer):
        for _ in range(3):  # the first call takes the kernels, the next ones trust them
            assert follows(layer, x, call)
            assert np.array_equal(run(layer, x, call), run(checked, x, call))
        with torch.no_grad():
            layer.bca_kernels["a"].mul_(-2.0)  # in place: a new version
        assert follows(layer, x, call)
        with torch.no_grad():
            layer.bca_kernels["a"].view(-1)[3] += 1.0  # through a view: shares the counter
        assert follows(layer, x, call)
        with torch.no_grad():
            layer.bca_kernels["b"].copy_(torch.randn(3, 3, 8))
        assert follows(layer, x, call)
        layer.load_state_dict({k: torch.randn_like(v) for k, v in layer.state_dict().items()})
        assert follows(layer, x, call)
        layer.bca_kernels["a"].data = torch.randn(3, 3, 8)  # new storage under the parameter
        assert follows(layer, x, call)
        layer.bca_kernels["a"] = torch.nn.Parameter(torch.randn(3, 3, 8))  # another object
        assert follows(layer, x, call)
        opt = torch.optim.SGD(layer.parameters(), lr=0.5)
        layer.train()
        layer(torch.randn(4, 24), adapter_names=["a", "b", "a", "b"]).square().sum().backward()
        opt.step()  # an optimizer step: in place, a new version
        layer.eval()
        assert follows(layer, x, call)
        for fused in (torch.optim.Adam, torch.optim.SGD):  # no version bump: the step hook
            opt = fused(layer.parameters(), lr=0.5, fused=True)
            layer.train()
            layer(torch.randn(4, 24), adapter_names=["a", "b", "a", "b"]).square().sum().backward()
            version = layer.bca_kernels["a"]._version
            opt.step()
            assert layer.bca_kernels["a"]._version == version  # torch's fused kernels
            layer.eval()
            assert follows(layer, x, call)
        layer.set_adapter_scale("a", -3.0)
        assert follows(layer, x, call)
        layer.bca_kernels["a"].data.add_(0.25)  # no new version: still trusted
        layer.clear_cache()  # ... until the cache is cleared
        assert follows(layer, x, call)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("call", CALLS)
def test_trusted_layer_misses_data_edits_until_the_block_ends(backend: str, call: str) -> None:
    """The documented price: edits that bypass the version counter may go unseen inside
    the block; on these paths they do (which shows that the check is skipped), and they
    are seen right after."""
    layer = make_layer(backend)
    x = torch.randn(5, 24)
    with trusted_adapters(layer):
        before = run(layer, x, call)
        layer.bca_kernels["a"].data.mul_(3.0)
        assert np.array_equal(run(layer, x, call), before)
        layer.bca_kernels["b"].detach().numpy()[0, 0, 0] += 1.0  # a numpy view
        assert np.array_equal(run(layer, x, call), before)
    assert follows(layer, x, call)
    assert not np.array_equal(run(layer, x, call), before)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("call", CALLS)
def test_edits_made_between_two_trusted_blocks_are_seen(backend: str, call: str) -> None:
    """What a block trusted does not outlive it: a ``.data`` edit made between two
    blocks is seen by the first call of the second."""
    layer = make_layer(backend)
    x = torch.randn(5, 24)
    with trusted_adapters(layer):
        run(layer, x, call)
        run(layer, x, call)
    layer.bca_kernels["a"].data.mul_(-2.0)
    with trusted_adapters(layer):
        assert follows(layer, x, call)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("call", CALLS)
def test_a_new_storage_at_a_trusted_address_is_seen(backend: str, call: str) -> None:
    """``param.data = a`` then ``param.data = b`` leaves the parameter's version counter
    as it was; were the trusted kernel's storage freed, ``b`` would often be allocated at
    its very address (the allocator reuses the freed block) and pass for it."""
    layer = make_layer(backend)
    x = torch.randn(5, 24)
    k = layer.bca_kernels["a"]
    with trusted_adapters(layer):
        for _ in range(20):
            run(layer, x, call)  # takes and trusts the kernel
            k.data = torch.randn(3, 3, 8)
            k.data = torch.randn(3, 3, 8)  # may land where the trusted kernel was
            assert follows(layer, x, call)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", ["permute", "stride 0"])
def test_a_strided_view_at_the_trusted_address_is_seen(backend: str, how: str) -> None:
    """``param.data = param.data.permute(...)`` (or any view of other strides) keeps the
    address and the version counter: the strides tell it apart."""
    torch.manual_seed(0)
    layer = BlockCirculantLinear(torch.nn.Linear(24, 24), 8, backend=backend, adapter_name="a")
    with torch.no_grad():
        layer.bca_kernels["a"].normal_()
    layer.eval()
    x = torch.randn(5, 24)
    k = layer.bca_kernels["a"]
    with trusted_adapters(layer), torch.no_grad():
        layer(x)
        layer(x)
        if how == "permute":
            k.data = k.data.permute(1, 0, 2)
        else:
            k.data = k.data.as_strided(k.shape, (0, 8, 1))
        dense = layer.delta_weight().double().numpy()
        want = layer.base_layer(x).double().numpy() + x.double().numpy() @ dense.T
        assert rel_err(layer(x).double().numpy(), want) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_clear_cache_during_a_call_leaves_nothing_trusted(backend: str) -> None:
    """``clear_cache()`` from another thread while a call reads the kernel (here: from
    inside the read, after a ``.data`` edit): the record that call makes must not be
    trusted afterwards."""
    import bca.nn.functional as functional

    layer = make_layer(backend)
    x = torch.randn(5, 24)
    done: list[bool] = []

    def meanwhile() -> None:
        if not done:
            done.append(True)
            layer.bca_kernels["a"].data.mul_(-2.0)
            layer.clear_cache()

    if backend == "torch":
        patch = after_call(functional, "_kernel_spectra", meanwhile)
    else:  # the first call builds the operator, which reads the kernel
        patch = after_call(functional._rust_core(), "BlockCirculant", meanwhile)
    with trusted_adapters(layer):
        with patch:
            run(layer, x, "one")
        assert done == [True]
        for call in CALLS:
            assert follows(layer, x, call)


@pytest.mark.parametrize("backend", BACKENDS)
def test_trusted_kernels_can_be_swapped(backend: str) -> None:
    """With ``torch.__future__.set_swap_module_params_on_conversion(True)``,
    ``load_state_dict`` and ``module.double()`` swap tensors, which torch refuses for a
    tensor with a weak reference: a trusted cache holds none, and the swap is seen."""
    layer = make_layer(backend)
    x = torch.randn(5, 24)
    before = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        with trusted_adapters(layer):
            run(layer, x, "mixed")
            layer.load_state_dict({k: torch.randn_like(v) for k, v in layer.state_dict().items()})
            assert follows(layer, x, "mixed")
            layer.double()
            x64 = x.double()
            for call in CALLS:
                got = run(layer, x64, call)
                assert rel_err(got, expected(layer, x64, call)) < 1e-12
    finally:
        torch.__future__.set_swap_module_params_on_conversion(before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_trusted_model_nests_restores_and_covers_every_layer(backend: str) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    model = inject_adapters(
        model, BCAConfig(block_size=4, target_modules=["0", "2"], init="kaiming")
    )
    for m in model.modules():
        if isinstance(m, BlockCirculantLinear):
            m.backend = backend
    states = [
        st
        for m in model.modules()
        if isinstance(m, BlockCirculantLinear)
        for st in m._adapters.values()
    ]
    assert len(states) == 2
    x = torch.randn(3, 16)
    with torch.no_grad():
        ref = model(x)
    with trusted_adapters(model) as same:
        assert same is model
        assert [st.frozen for st in states] == [1, 1]
        with trusted_adapters(model):
            assert [st.frozen for st in states] == [2, 2]
            with torch.no_grad():
                assert torch.equal(model(x), ref)
        assert [st.frozen for st in states] == [1, 1]
        model[0].bca_kernels["default"].data.mul_(2.0)
        with torch.no_grad():
            assert torch.equal(model(x), ref)  # still inside the outer block: trusted
    assert [st.frozen for st in states] == [0, 0]
    with torch.no_grad():
        assert not torch.equal(model(x), ref)
    with pytest.raises(RuntimeError, match="boom"), trusted_adapters(model):
        raise RuntimeError("boom")
    assert [st.frozen for st in states] == [0, 0]
    with pytest.raises(BcaError, match=r"unfreeze\(\) without a matching freeze\(\)"):
        KernelCache().unfreeze()


@pytest.mark.parametrize("backend", BACKENDS)
def test_trusted_adapters_survive_save_and_load(backend: str, tmp_path) -> None:
    """load_adapter writes the kernels in place or as new parameters: seen either way."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16))
    model = inject_adapters(model, BCAConfig(block_size=4, target_modules=["0"], init="kaiming"))
    model[0].backend = backend
    save_adapter(model, tmp_path / "one")
    x = torch.randn(3, 16)
    with torch.no_grad():
        ref = model(x)
        with trusted_adapters(model):
            model(x)
            model[0].bca_kernels["default"].mul_(5.0)
            assert not torch.equal(model(x), ref)
            load_adapter(model, tmp_path / "one")
            assert torch.equal(model(x), ref)


@pytest.mark.parametrize("trusted", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("call", ["mixed", "one"])
def test_inference_tensor_kernels_are_never_trusted(backend: str, call: str, trusted: bool) -> None:
    """A kernel without a version counter (made under inference_mode) is compared (or
    its spectra recomputed) on every call, trusted or not; the cache keys do not need
    the counter to exist (the torch backend's eval cache used to raise there)."""
    with torch.inference_mode():
        layer = make_layer(backend)
        x = torch.randn(5, 24)
        with trusted_adapters(layer) if trusted else contextlib.nullcontext():
            assert follows(layer, x, call)
            layer.bca_kernels["a"].mul_(2.0)
            assert follows(layer, x, call)
            layer.bca_kernels["a"].data.mul_(2.0)
            assert follows(layer, x, call)


@pytest.mark.parametrize("trusted", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_an_edit_made_while_the_kernel_is_read_is_seen_next_call(
    backend: str, trusted: bool
) -> None:
    """Another thread may edit a kernel in place after a call has read it but before
    the call records what it has taken (trust record, snapshot): the record must then be
    of the older version (made before the read), so that the next call compares again.
    The edit is made here from inside the read itself, deterministically."""
    import bca.nn.functional as functional

    layer = make_layer(backend)
    x = torch.randn(5, 24)
    edits = []

    def edit_once() -> None:
        if not edits:
            with torch.no_grad():
                layer.bca_kernels["b"].mul_(-1.5)  # a new version, after the read
            edits.append(True)

    if backend == "torch":
        patch = after_call(functional, "_kernel_spectra", edit_once)
    else:  # a mixed call given kernels= takes them
        patch = after_call(
            functional._rust_core()._bca,
            "mixed_forward",
            edit_once,
            when=lambda kwargs: kwargs.get("kernels") is not None,
        )
    with trusted_adapters(layer) if trusted else contextlib.nullcontext():
        run(layer, x, "mixed")  # takes (and trusts) the kernels
        with torch.no_grad():
            layer.bca_kernels["b"].add_(1.0)  # a new version: the next call takes "b" ...
        with patch:
            run(layer, x, "mixed")  # ... and edited again meanwhile
        assert edits == [True]
        assert follows(layer, x, "mixed")
        assert follows(layer, x, "mixed")


@pytest.mark.parametrize("trusted", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_calls_from_threads_while_kernels_are_edited_in_place(backend: str, trusted: bool) -> None:
    """Threads run (trusted) mixed batches while another thread copies one of two versions
    into each kernel in place (a new version each time). A call that overlaps a copy may
    read a half-written kernel (as without trust), but once the writer stops every call
    follows the final kernels exactly."""
    layer = make_layer(backend)
    layer.add_adapter("c", 8, scale=2.0, init="xavier_uniform")
    adapters = ("a", "b", "c")
    versions = {n: (layer.bca_kernels[n].detach().clone(), torch.randn(3, 3, 8)) for n in adapters}
    names = ["a", "b", "c", BASE_ADAPTER, "c", "a"]
    x = torch.randn(6, 24)
    valid = []
    with torch.no_grad():
        for combo in itertools.product((0, 1), repeat=3):
            for n, v in zip(adapters, combo, strict=True):
                layer.bca_kernels[n].copy_(versions[n][v])
            valid.append(layer(x, adapter_names=names))
    stop = threading.Event()
    errors: list[BaseException] = []
    calls = [0]

    def user() -> None:
        try:
            with torch.no_grad():
                while not stop.is_set():
                    layer(x, adapter_names=names)
                    calls[0] += 1
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def writer() -> None:
        rng = np.random.default_rng(0)
        with torch.no_grad():
            while not stop.is_set():
                n = str(rng.choice(adapters))
                layer.bca_kernels[n].copy_(versions[n][int(rng.integers(0, 2))])

    with trusted_adapters(layer) if trusted else contextlib.nullcontext():
        run_threads([user, user, user, writer], stop, 1.5)
        assert errors == [] and calls[0] > 50
        final = [
            next(i for i in (0, 1) if torch.equal(layer.bca_kernels[n], versions[n][i]))
            for n in adapters
        ]
        want = valid[final[0] * 4 + final[1] * 2 + final[2]]
        with torch.no_grad():
            for _ in range(2):
                assert torch.equal(layer(x, adapter_names=names), want)
