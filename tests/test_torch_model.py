"""Model-level API on tiny transformers models (random weights, built from configs)."""

from __future__ import annotations

import copy
import json
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from bca.model import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    BCAConfig,
    adapter_modules,
    count_parameters,
    freeze_base,
    get_bca_model,
    inject_adapters,
    load_adapter,
    merge_adapters,
    merge_and_unload,
    parameter_groups,
    save_adapter,
    unmerge_adapters,
)
from bca.nn import BlockCirculantLinear, rust_available
from conftest import dense_oracle, rel_err

transformers = pytest.importorskip("transformers")

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
BACKENDS = [
    "torch",
    pytest.param("rust", marks=pytest.mark.skipif(not rust_available(), reason="no extension")),
]
VOCAB = 61


def tiny_bert(seed: int = 0, hidden: int = 32) -> nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=16,
        num_labels=3,
    )
    return transformers.BertForSequenceClassification(cfg).eval()


def tiny_roberta(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.RobertaConfig(
        vocab_size=VOCAB,
        hidden_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=40,
        max_position_embeddings=20,
        num_labels=2,
        pad_token_id=1,
    )
    return transformers.RobertaForSequenceClassification(cfg).eval()


def tiny_llama(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=44,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=16,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=1,
        n_head=2,
        n_positions=16,
        bos_token_id=0,
        eos_token_id=1,
    )
    return transformers.GPT2LMHeadModel(cfg).eval()


# (builder, config kwargs): RoBERTa-style q/v with the classifier trained fully, LLaMA with
# a shape p does not divide (44), GPT-2 Conv1D with 32 -> 96 (p = 12 pads the input)
CASES: dict[str, tuple[Callable[..., nn.Module], dict[str, object]]] = {
    "bert": (
        tiny_bert,
        {"block_size": 8, "target_modules": ["query", "value"], "modules_to_save": ["classifier"]},
    ),
    "roberta": (
        tiny_roberta,
        {
            "block_size": 6,
            "target_modules": ["query", "value", "intermediate.dense"],
            "modules_to_save": ["classifier"],
        },
    ),
    "llama": (
        tiny_llama,
        {"block_size": 16, "target_modules": ["q_proj", "v_proj", "down_proj", "up_proj"]},
    ),
    "gpt2": (tiny_gpt2, {"block_size": 12, "target_modules": ["c_attn", "mlp.c_proj"]}),
}


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out: torch.Tensor = model(input_ids=ids).logits
    return out


def ids_batch(seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(seed))


def train_steps(model: nn.Module, steps: int = 3, lr: float = 0.1) -> None:
    model.train()
    opt = torch.optim.Adam(parameter_groups(model, lr=lr))
    device = next(model.parameters()).device
    for step in range(steps):
        ids = ids_batch(10 + step).to(device)
        loss = logits(model, ids).float().pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


# ---------------------------------------------------------------------------------------
# injection, zero init, training, merge
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_inject_train_merge(case: str, backend: str) -> None:
    build, kwargs = CASES[case]
    model = build()
    base = copy.deepcopy(model)
    ids = ids_batch()
    with torch.no_grad():
        want = logits(base, ids)
    config = BCAConfig(backend=backend, **kwargs)  # type: ignore[arg-type]
    assert inject_adapters(model, config) is model and model.bca_config is config
    adapted = dict(adapter_modules(model))
    assert adapted and all(m.backend == backend for m in adapted.values())
    with torch.no_grad():
        assert torch.equal(logits(model, ids), want)  # zero init: exactly the base model
    # only kernels and modules_to_save train
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    kernels = {f"{n}.bca_kernels.default" for n in adapted}
    assert kernels <= trainable
    assert all(n in kernels or ".classifier." in "." + n for n in trainable)
    frozen_before = {
        n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad
    }

    train_steps(model)
    for n, p in model.named_parameters():
        if n in frozen_before:
            assert torch.equal(p, frozen_before[n]), n
    assert any(m.bca_kernel.abs().sum() > 0 for m in adapted.values())
    with torch.no_grad():
        y = logits(model, ids)
        assert rel_err(y.numpy(), want.numpy()) > 1e-4  # training changed the output
        weights = {n: m.base_layer.weight.detach().clone() for n, m in adapted.items()}
        merge_adapters(model)
        assert all(m.merged for m in adapted.values())
        y_merged = logits(model, ids)
        assert rel_err(y_merged.numpy(), y.numpy()) < 1e-5
        for n, m in adapted.items():
            dw = dense_oracle(m.bca_kernel.numpy(), m.in_features, m.out_features)
            w = weights[n].double().numpy()
            got = m.base_layer.weight.double().numpy()
            assert rel_err(got, w + (dw.T if m.is_conv1d else dw)) < 1e-6
            assert np.linalg.norm(dw) > 1e-3 * np.linalg.norm(w)  # a real update
        unmerge_adapters(model)
        for n, m in adapted.items():
            assert torch.equal(m.base_layer.weight, weights[n])  # bit-exact restore
        assert torch.equal(logits(model, ids), y)


def test_merge_and_unload() -> None:
    model = tiny_gpt2()
    inject_adapters(model, BCAConfig(block_size=8, target_modules=["c_attn"], init="gaussian"))
    ids = ids_batch()
    with torch.no_grad():
        y = logits(model, ids)
        merge_and_unload(model)
        assert not list(adapter_modules(model)) and not hasattr(model, "bca_config")
        assert type(model.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
        assert rel_err(logits(model, ids).numpy(), y.numpy()) < 1e-5


def test_padding_oracle_inside_model() -> None:
    """LLaMA's 44-wide MLP with p = 16: the adapted layer equals base + padded dense ΔW."""
    model = tiny_llama()
    inject_adapters(model, BCAConfig(block_size=16, target_modules=["down_proj"], init="gaussian"))
    layer = model.model.layers[0].mlp.down_proj
    assert isinstance(layer, BlockCirculantLinear) and layer.kernel_shape == (2, 3, 16)
    x = torch.randn(5, 44)
    dense = dense_oracle(layer.bca_kernel.detach().numpy(), 44, 32)
    with torch.no_grad():
        got = layer(x).numpy() - layer.base_layer(x).numpy()
    assert rel_err(got, x.numpy() @ dense.T) < 1e-5


@given(
    widths=st.lists(st.integers(1, 40), min_size=2, max_size=4),
    p=st.sampled_from([1, 2, 3, 5, 8, 13]),
    scale=st.floats(0.1, 2.0),
)
def test_mlp_any_widths_matches_dense(widths: list[int], p: int, scale: float) -> None:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:], strict=True):
        layers += [nn.Linear(a, b, dtype=torch.float64), nn.Tanh()]
    model = nn.Sequential(*layers)
    inject_adapters(
        model, BCAConfig(block_size=p, target_modules=r"\d*[02468]", scale=scale, init="gaussian")
    )
    x = torch.randn(3, widths[0], dtype=torch.float64)
    h = x.numpy()
    for module in model:
        if isinstance(module, BlockCirculantLinear):
            w = module.base_layer.weight.detach().numpy()
            b = module.base_layer.bias.detach().numpy()
            dense = dense_oracle(module.bca_kernel.detach().numpy(), w.shape[1], w.shape[0])
            h = h @ (w + scale * dense).T + b
        else:
            h = np.tanh(h)
    with torch.no_grad():
        assert rel_err(model(x).numpy(), h) < 1e-12


# ---------------------------------------------------------------------------------------
# parameter groups and counts
# ---------------------------------------------------------------------------------------
def test_parameter_groups_and_counts() -> None:
    model = tiny_bert()
    config = BCAConfig(
        block_size=8,
        target_modules=["query", "value", "intermediate.dense"],
        modules_to_save=["classifier"],
        block_size_pattern={"intermediate.dense": 4},
    )
    total_before = sum(p.numel() for p in model.parameters())
    get_bca_model(model, config)
    groups = {g["name"]: g for g in parameter_groups(model, lr=0.1, weight_decay=0.01)}
    assert set(groups) == {"bca_kernels_p4", "bca_kernels_p8", "modules_to_save"}
    assert groups["bca_kernels_p8"]["lr"] == pytest.approx(0.1 / 8)
    assert groups["bca_kernels_p4"]["lr"] == pytest.approx(0.1 / 4)
    assert groups["modules_to_save"]["lr"] == pytest.approx(0.1)
    assert len(groups["bca_kernels_p8"]["params"]) == 4  # q, v in 2 layers
    assert len(groups["bca_kernels_p4"]["params"]) == 2
    # per-layer kernels: q, v 32x32 at p = 8 -> 4*4*8; intermediate 32 -> 37 at p = 4 -> 10*8*4
    kernels = 4 * (4 * 4 * 8) + 2 * (10 * 8 * 4)
    classifier = 32 * 3 + 3
    count = count_parameters(model)
    assert count.trainable == kernels + classifier
    assert count.total == total_before + kernels
    assert "trainable params" in str(count) and 0 < count.fraction < 1
    plain = parameter_groups(model, lr=0.1, divide_by_block_size=False)
    assert all(g["lr"] == 0.1 for g in plain)
    opt = torch.optim.AdamW(parameter_groups(model, lr=0.1))
    assert len(opt.param_groups) == 3
    with pytest.raises(ValueError, match="lr"):
        parameter_groups(model, lr=-1.0)


def test_freeze_base_restores_trainable_set() -> None:
    model = tiny_bert()
    inject_adapters(model, BCAConfig(block_size=8, target_modules=["query"]), freeze=False)
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    assert grads["bert.embeddings.word_embeddings.weight"]  # untouched without freeze
    assert not grads["bert.encoder.layer.0.attention.self.query.base_layer.weight"]
    freeze_base(model)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(n.endswith("query.bca_kernels.default") for n in names)


# ---------------------------------------------------------------------------------------
# save / load
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["bert", "gpt2", "llama"])
def test_save_load_round_trip(case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    build, kwargs = CASES[case]
    model = build()
    inject_adapters(model, BCAConfig(**kwargs))  # type: ignore[arg-type]
    train_steps(model, steps=2)
    ids = ids_batch()
    with torch.no_grad():
        want = logits(model, ids)
    save_adapter(model, tmp_path / "adapter")
    doc = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG_NAME).read_text())
    assert doc["format"] == "bca" and doc["format_version"] == 1
    assert doc["base_model"]["class"] == type(model).__name__
    names = [n for n, _ in adapter_modules(model)]
    assert sorted(doc["modules"]) == sorted(names)
    assert sorted(doc["base_model"]["fingerprint"]) == sorted(names)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "adapter" / ADAPTER_WEIGHTS_NAME), "pt") as f:
        keys = set(f.keys())
    assert {f"{n}.bca_kernel" for n in names} <= keys
    if kwargs.get("modules_to_save"):
        assert any(k.startswith("modules_to_save.") for k in keys)

    def no_unpickling(*args: object, **kw: object) -> None:
        raise AssertionError("load_adapter must not unpickle")

    monkeypatch.setattr(torch, "load", no_unpickling)
    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    fresh = build()  # same seed: same base weights; classifier is restored from the file
    if kwargs.get("modules_to_save"):
        with torch.no_grad():
            for p in fresh.classifier.parameters():
                p.zero_()
    load_adapter(fresh, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(logits(fresh, ids), want)
    assert count_parameters(fresh) == count_parameters(model)
    # loading into a model that already has the same adapters works too
    again = build()
    inject_adapters(again, BCAConfig(**kwargs))  # type: ignore[arg-type]
    load_adapter(again, tmp_path / "adapter", backend="torch")
    with torch.no_grad():
        assert rel_err(logits(again, ids).numpy(), want.numpy()) < 1e-6


def test_load_refuses_mismatched_model(tmp_path: Path) -> None:
    model = tiny_bert()
    inject_adapters(model, BCAConfig(block_size=8, target_modules=["query", "value"]))
    save_adapter(model, tmp_path)
    wider = tiny_bert(hidden=48)
    with pytest.raises(
        ValueError,
        match=r"bert\.encoder\.layer\.0\.attention\.self\.query.*in_features=32.*in_features=48",
    ):
        load_adapter(wider, tmp_path)
    gpt2 = tiny_gpt2()
    with (
        pytest.warns(UserWarning, match="GPT2LMHeadModel"),
        pytest.raises(ValueError, match="not found"),
    ):
        load_adapter(gpt2, tmp_path)
    other = tiny_bert()
    inject_adapters(other, BCAConfig(block_size=8, target_modules=["query"]))
    with pytest.raises(ValueError, match="differ"):
        load_adapter(other, tmp_path)
    other = tiny_bert()
    inject_adapters(other, BCAConfig(block_size=4, target_modules=["query", "value"]))
    with pytest.raises(ValueError, match="block_size"):
        load_adapter(other, tmp_path)


def test_load_rejects_bad_files(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    model = tiny_bert()
    inject_adapters(model, BCAConfig(block_size=8, target_modules=["query"]))
    save_adapter(model, tmp_path)
    cfg_path = tmp_path / ADAPTER_CONFIG_NAME
    good = json.loads(cfg_path.read_text())
    for bad, msg in [({"format": "peft"}, "not a bca"), ({"format_version": 9}, "format_version")]:
        cfg_path.write_text(json.dumps({**good, **bad}))
        with pytest.raises(ValueError, match=msg):
            load_adapter(tiny_bert(), tmp_path)
    cfg_path.write_text(json.dumps(good))
    tensors = load_file(str(tmp_path / ADAPTER_WEIGHTS_NAME))
    name = next(iter(tensors))
    save_file({**tensors, name: torch.zeros(1, 2, 3)}, str(tmp_path / ADAPTER_WEIGHTS_NAME))
    with pytest.raises(ValueError, match="shape"):
        load_adapter(tiny_bert(), tmp_path)
    save_file({**tensors, "stray": torch.zeros(1)}, str(tmp_path / ADAPTER_WEIGHTS_NAME))
    with pytest.raises(ValueError, match="unexpected"):
        load_adapter(tiny_bert(), tmp_path)
    with pytest.raises(FileNotFoundError):
        load_adapter(tiny_bert(), tmp_path / "missing")
    with pytest.raises(ValueError, match="no bca adapters"):
        save_adapter(tiny_bert(), tmp_path / "x")


# ---------------------------------------------------------------------------------------
# config and injection errors
# ---------------------------------------------------------------------------------------
def test_injection_errors() -> None:
    with pytest.raises(ValueError, match=r"\['nope'\].*linear layers it has: .*query"):
        inject_adapters(tiny_bert(), BCAConfig(block_size=8, target_modules=["query", "nope"]))
    with pytest.raises(ValueError, match="match no module"):
        inject_adapters(tiny_bert(), BCAConfig(block_size=8, target_modules=r"foo\d"))
    with pytest.raises(TypeError, match="BertAttention"):
        inject_adapters(tiny_bert(), BCAConfig(block_size=8, target_modules=["attention"]))
    with pytest.raises(ValueError, match="pad=False"):
        inject_adapters(
            tiny_bert(), BCAConfig(block_size=8, target_modules=["intermediate.dense"], pad=False)
        )
    model = tiny_bert()
    inject_adapters(model, BCAConfig(block_size=8, target_modules=["query"]))
    with pytest.raises(ValueError, match="already"):
        inject_adapters(model, BCAConfig(block_size=8, target_modules=["value"]))
    with pytest.raises(ValueError, match="modules_to_save"):
        inject_adapters(
            tiny_bert(), BCAConfig(block_size=8, target_modules=["query"], modules_to_save=["head"])
        )
    with pytest.raises(ValueError, match="both"):
        inject_adapters(
            tiny_bert(),
            BCAConfig(block_size=8, target_modules=["classifier"], modules_to_save=["classifier"]),
        )
    with pytest.raises(TypeError, match="model"):
        inject_adapters("bert", BCAConfig(target_modules=["q"]))  # type: ignore[arg-type]


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="at least one"):
        BCAConfig(target_modules=[])
    with pytest.raises(ValueError, match="block_size"):
        BCAConfig(block_size=0, target_modules=["q"])
    with pytest.raises(TypeError, match="block_size"):
        BCAConfig(block_size=8.0, target_modules=["q"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="init"):
        BCAConfig(target_modules=["q"], init="ones")
    with pytest.raises(ValueError, match="backend"):
        BCAConfig(target_modules=["q"], backend="jax")
    with pytest.raises(ValueError, match="regular expression"):
        BCAConfig(target_modules="(")
    with pytest.raises(ValueError, match="scale"):
        BCAConfig(target_modules=["q"], scale=float("inf"))
    with pytest.raises(ValueError, match="block_size_pattern"):
        BCAConfig(target_modules=["q"], block_size_pattern={"q": 0})
    cfg = BCAConfig(target_modules=("q", "v"), modules_to_save="classifier")  # type: ignore[arg-type]
    assert cfg.target_modules == ["q", "v"] and cfg.modules_to_save == ["classifier"]
    assert cfg.to_dict()["block_size"] == 256


# ---------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_model_train_merge(dtype: torch.dtype, tmp_path: Path) -> None:
    model = tiny_llama().to("cuda", dtype)
    inject_adapters(
        model, BCAConfig(block_size=16, target_modules=["q_proj", "v_proj", "down_proj"])
    )
    assert all(m.bca_kernel.dtype == torch.float32 for _, m in adapter_modules(model))
    ids = ids_batch().cuda()
    with torch.no_grad():
        y0 = logits(model, ids)
    train_steps(model, steps=3, lr=0.1)
    with torch.no_grad():
        y = logits(model, ids)
        assert not torch.equal(y, y0)
        merge_adapters(model)
        tol = 1e-5 if dtype == torch.float32 else 5e-2
        assert rel_err(logits(model, ids).float().cpu().numpy(), y.float().cpu().numpy()) < tol
        unmerge_adapters(model)
    save_adapter(model, tmp_path)
    fresh = tiny_llama().to("cuda", dtype)
    load_adapter(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(logits(fresh, ids), y)
