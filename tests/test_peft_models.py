"""In-memory PEFT C3A <-> bca model conversion and bca inside a PEFT workflow."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from bca.model import (  # noqa: E402
    BCAConfig,
    adapter_modules,
    count_parameters,
    inject_adapters,
    load_adapter,
    save_adapter,
)
from bca.nn import BlockCirculantLinear, rust_available  # noqa: E402
from bca.peft_interop import (  # noqa: E402
    bca_model_to_c3a,
    c3a_adapter_dir_to_bca,
    c3a_kernel_to_bca,
    c3a_model_to_bca,
    patch_peft_c3a,
    unpatch_peft_c3a,
)

BACKENDS = ["torch"] + (["rust"] if rust_available() else [])
Q = "roberta.encoder.layer.{}.attention.self.{}"


def tiny_classifier(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    cfg = transformers.RobertaConfig(
        vocab_size=97,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=96,
        max_position_embeddings=40,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    return transformers.RobertaForSequenceClassification(cfg).to(dtype).eval()


def ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 97, (3, 11), generator=torch.Generator().manual_seed(seed))


def peft_c3a(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    config = peft.C3AConfig(
        block_size=16,
        target_modules=["query", "value"],
        block_size_pattern={"layer.1.attention.self.value": 32},
        init_weights="gaussian",
        task_type="SEQ_CLS",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(tiny_classifier(dtype), config).eval()
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "modules_to_save" in name:
                p.add_(0.1 * torch.randn_like(p))
            if "c3a_kernel" in name:
                p.mul_(0.02)  # keep the adapted model in a sane range
    return pm


@pytest.mark.parametrize("backend", BACKENDS)
def test_c3a_model_to_bca_same_outputs(backend: str, tmp_path: Path) -> None:
    pm = peft_c3a()
    with torch.no_grad():
        want = pm(input_ids=ids()).logits
    peft_trainable, _ = pm.get_nb_trainable_parameters()
    model = c3a_model_to_bca(pm, backend=backend)
    assert not any("c3a" in n for n, _ in model.named_modules())
    mods = dict(adapter_modules(model))
    assert set(mods) == {Q.format(i, m) for i in (0, 1) for m in ("query", "value")}
    assert mods[Q.format(1, "value")].block_size == 32
    assert mods[Q.format(0, "value")].block_size == 16
    assert count_parameters(model).trainable == peft_trainable
    with torch.no_grad():
        got = model(input_ids=ids()).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

    # bca's own save/load round trip of the converted model
    save_adapter(model, tmp_path / "a")
    fresh = load_adapter(tiny_classifier(), tmp_path / "a", backend=backend)
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids()).logits, want, rtol=1e-5, atol=1e-6)


def test_c3a_dir_loads_with_bca_load_adapter(tmp_path: Path) -> None:
    pm = peft_c3a()
    with torch.no_grad():
        want = pm(input_ids=ids()).logits
    pm.save_pretrained(str(tmp_path / "peft"))
    c3a_adapter_dir_to_bca(tmp_path / "peft", tmp_path / "bca")
    model = load_adapter(tiny_classifier(), tmp_path / "bca")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids()).logits, want, rtol=1e-5, atol=1e-6)
    assert json.loads((tmp_path / "bca" / "adapter_config.json").read_text())["init"] == "gaussian"


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_bca_model_to_c3a_same_outputs(scale: float) -> None:
    model = inject_adapters(
        tiny_classifier(),
        BCAConfig(
            block_size=16,
            target_modules=["query", "value", "intermediate.dense"],
            block_size_pattern={"layer.0.intermediate.dense": 32},
            scale=scale,
            init="gaussian",
            modules_to_save=["classifier"],
        ),
    )
    torch.manual_seed(5)
    with torch.no_grad():
        for _, m in adapter_modules(model):
            m.bca_kernel.normal_(0, 0.02)
        model.classifier.out_proj.weight.add_(0.3)
        want = model(input_ids=ids()).logits
    trainable = count_parameters(model).trainable
    pm = bca_model_to_c3a(model, task_type="SEQ_CLS").eval()
    assert isinstance(pm, peft.PeftModelForSequenceClassification)
    assert pm.get_nb_trainable_parameters()[0] == trainable
    with torch.no_grad():
        torch.testing.assert_close(pm(input_ids=ids()).logits, want, rtol=1e-5, atol=1e-6)
    # and back again
    again = c3a_model_to_bca(pm)
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids()).logits, want, rtol=1e-5, atol=1e-6)


def test_bca_model_to_c3a_refusals() -> None:
    gcfg = transformers.GPT2Config(vocab_size=50, n_embd=32, n_layer=1, n_head=2, n_positions=16)
    gpt2 = inject_adapters(
        transformers.GPT2Model(gcfg), BCAConfig(block_size=16, target_modules=["c_attn"])
    )
    with pytest.raises(ValueError, match="Conv1D"):
        bca_model_to_c3a(gpt2)
    padded = inject_adapters(
        tiny_classifier(), BCAConfig(block_size=24, target_modules=["query"], pad=True)
    )
    with pytest.raises(ValueError, match="zero-padded"):
        bca_model_to_c3a(padded)
    assert isinstance(padded.roberta.encoder.layer[0].attention.self.query, BlockCirculantLinear)
    with pytest.raises(ValueError, match="no bca adapters"):
        bca_model_to_c3a(tiny_classifier())
    with pytest.raises(TypeError, match="peft.PeftModel"):
        c3a_model_to_bca(tiny_classifier())


# --------------------------------------------------------------------------- PEFT patch


def kernel_grads(pm: torch.nn.Module) -> dict[str, torch.Tensor]:
    pm.zero_grad()
    out = pm(input_ids=ids(), labels=torch.tensor([0, 2, 1]))
    out.loss.backward()
    return {n: p.grad.clone() for n, p in pm.named_parameters() if "c3a_kernel" in n}


@pytest.mark.parametrize("backend", BACKENDS)
def test_patch_peft_c3a_forward_and_gradients(backend: str) -> None:
    """Patched PEFT layers give PEFT's forward and the gradients of an equivalent bca model;
    PEFT's own backward (wrong input gradient) does not, for every layer below the top."""
    pm = peft_c3a(torch.float64)
    with torch.no_grad():
        want = pm(input_ids=ids()).logits
    peft_grads = kernel_grads(pm)

    assert patch_peft_c3a(pm, backend=backend) == 4
    with torch.no_grad():  # PEFT computes its adapter in float32 even for float64 models
        torch.testing.assert_close(pm(input_ids=ids()).logits, want, rtol=1e-6, atol=1e-7)
    patched = kernel_grads(pm)

    # reference: the same adapter as a bca model, gradients mapped to C3A's kernels
    ref = c3a_model_to_bca(copy.deepcopy(pm), backend="torch")
    ref.zero_grad()
    ref(input_ids=ids(), labels=torch.tensor([0, 2, 1])).loss.backward()
    errs = {}
    for name, g in patched.items():
        mod = name.removeprefix("base_model.model.").removesuffix(".c3a_kernel.default")
        layer = ref.get_submodule(mod)
        # c = flip(w) / in, so dL/dw = flip(dL/dc) / in
        g_ref = c3a_kernel_to_bca(layer.bca_kernel.grad, layer.in_features)
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-14)
        errs[mod] = float((peft_grads[name] - g_ref).norm() / g_ref.norm())
    # PEFT's wrong input gradient corrupts the kernels of layer 0 (below layer 1)
    # For the record (not asserted, PEFT may fix it): with peft 0.21.2 PEFT's own kernel
    # gradients differ from these by ~1e-7 (its float32 compute) in layer 1 but by ~5e-4 in
    # layer 0, which receives layer 1's wrong input gradient.
    assert errs[Q.format(1, "query")] < 1e-5
    assert unpatch_peft_c3a(pm) == 4
    with torch.no_grad():
        torch.testing.assert_close(pm(input_ids=ids()).logits, want, rtol=0, atol=0)


def test_patch_peft_c3a_trains_and_saves(tmp_path: Path) -> None:
    pm = peft_c3a()
    pm.train()
    patch_peft_c3a(pm)
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.05)
    labels = torch.tensor([0, 2, 1])
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = pm(input_ids=ids(), labels=labels).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    pm.eval()
    with torch.no_grad():
        want = pm(input_ids=ids()).logits
    pm.save_pretrained(str(tmp_path / "p"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(tiny_classifier(), str(tmp_path / "p")).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids()).logits, want, rtol=1e-5, atol=1e-6)


def test_patch_peft_c3a_reuses_operator_in_eval() -> None:
    """Each patched layer keeps one bca.nn.KernelCache per adapter: in eval mode its Rust
    operator is built once and not rebuilt per forward (the kernel is unchanged)."""
    pm = peft_c3a().eval()
    patch_peft_c3a(pm, backend="rust" if rust_available() else "torch")
    layers = [m for m in pm.modules() if "_bca_caches" in m.__dict__]
    assert len(layers) == 4
    with torch.no_grad():
        first = pm(input_ids=ids()).logits
        if rust_available():
            ops = [m._bca_caches["default"].rust_op for m in layers]
            assert all(op is not None for op in ops)
        second = pm(input_ids=ids()).logits
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    if rust_available():
        assert [m._bca_caches["default"].rust_op for m in layers] == ops
    unpatch_peft_c3a(pm)
    assert not any("_bca_caches" in m.__dict__ for m in pm.modules())


@pytest.mark.skipif(not rust_available(), reason="bca._bca extension not built")
def test_patch_peft_c3a_compiles_fullgraph() -> None:
    """A patched model compiles with fullgraph=True on the Rust backend (the custom
    operator, no graph break); compiled logits and kernel gradients equal eager mode's."""
    pm = peft_c3a()
    patch_peft_c3a(pm, backend="rust")
    labels = torch.tensor([0, 2, 1])
    pm.zero_grad()
    eager_loss = pm(input_ids=ids(), labels=labels).loss
    eager_loss.backward()
    eager = {n: p.grad.clone() for n, p in pm.named_parameters() if "c3a_kernel" in n}
    pm.zero_grad()
    compiled = torch.compile(pm, fullgraph=True, backend="aot_eager")
    loss = compiled(input_ids=ids(), labels=labels).loss
    loss.backward()
    torch.testing.assert_close(loss, eager_loss)
    for n, p in pm.named_parameters():
        if "c3a_kernel" in n:
            torch.testing.assert_close(p.grad, eager[n])


def test_patch_errors() -> None:
    with pytest.raises(ValueError, match="no PEFT C3A layers"):
        patch_peft_c3a(tiny_classifier())
    with pytest.raises(ValueError, match="backend"):
        patch_peft_c3a(peft_c3a(), backend="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_patch_and_convert() -> None:
    dev = torch.device("cuda")
    labels = torch.tensor([0, 2, 1], device=dev)
    pm = peft_c3a().to(dev)
    with torch.no_grad():
        want = pm(input_ids=ids().to(dev)).logits
    patch_peft_c3a(pm)  # "auto" -> torch.fft on CUDA
    with torch.no_grad():
        torch.testing.assert_close(pm(input_ids=ids().to(dev)).logits, want, rtol=1e-4, atol=1e-5)
    pm.zero_grad()
    pm(input_ids=ids().to(dev), labels=labels).loss.backward()
    patched = {n: p.grad.clone() for n, p in pm.named_parameters() if "c3a_kernel" in n}

    model = c3a_model_to_bca(copy.deepcopy(pm))
    assert all(m.bca_kernel.is_cuda for _, m in adapter_modules(model))
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=ids().to(dev)).logits, want, rtol=1e-4, atol=1e-5
        )
    model.zero_grad()
    model(input_ids=ids().to(dev), labels=labels).loss.backward()
    for name, g in patched.items():
        layer = model.get_submodule(
            name.removeprefix("base_model.model.").removesuffix(".c3a_kernel.default")
        )
        g_ref = c3a_kernel_to_bca(layer.bca_kernel.grad, layer.in_features)
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-7)
    back = bca_model_to_c3a(model, task_type="SEQ_CLS").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids().to(dev)).logits, want, rtol=1e-4, atol=1e-5)


def test_c3a_model_to_bca_picks_adapter_and_refuses_merged() -> None:
    pm = peft_c3a()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.add_adapter(
            "other",
            peft.C3AConfig(
                block_size=32,
                target_modules=["query"],
                init_weights="gaussian",
                task_type="SEQ_CLS",
            ),
        )
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "c3a_kernel.other" in n:
                p.mul_(0.02)
    pm.set_adapter("other")
    with torch.no_grad():
        want = pm(input_ids=ids()).logits
    with pytest.raises(ValueError, match="adapter_name 'nope'"):
        c3a_model_to_bca(copy.deepcopy(pm), adapter_name="nope")
    model = c3a_model_to_bca(copy.deepcopy(pm), adapter_name="other")
    mods = dict(adapter_modules(model))
    assert set(mods) == {Q.format(i, "query") for i in (0, 1)}
    assert all(m.block_size == 32 for m in mods.values())
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids()).logits, want, rtol=1e-5, atol=1e-6)

    pm.set_adapter("default")
    pm.base_model.model.roberta.encoder.layer[0].attention.self.query.merge()
    with pytest.raises(ValueError, match="is merged"):
        c3a_model_to_bca(pm)
