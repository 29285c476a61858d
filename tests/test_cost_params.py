"""Cost accounting: parameter counts equal PEFT's, FLOP formulas as documented."""

from __future__ import annotations

import math
import warnings

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from bca.cost import (  # noqa: E402
    FlopCount,
    LayerShape,
    Method,
    adapter_flops,
    adapter_parameters,
    cost_report,
    count_model_parameters,
    find_target_layers,
)


def tiny_roberta() -> torch.nn.Module:
    cfg = transformers.RobertaConfig(
        vocab_size=97,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=96,
        max_position_embeddings=40,
    )
    torch.manual_seed(0)
    return transformers.RobertaModel(cfg)


def tiny_llama() -> torch.nn.Module:
    cfg = transformers.LlamaConfig(
        vocab_size=101,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg)


def tiny_gpt2() -> torch.nn.Module:
    cfg = transformers.GPT2Config(vocab_size=97, n_embd=48, n_layer=2, n_head=4, n_positions=32)
    torch.manual_seed(0)
    return transformers.GPT2Model(cfg)


def peft_count(model: torch.nn.Module, config: object) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(model, config)
    trainable, _ = pm.get_nb_trainable_parameters()
    return int(trainable)


CASES = [
    (tiny_roberta, ["query", "value"]),
    (tiny_roberta, ["query", "key", "value", "intermediate.dense", "output.dense"]),
    (tiny_llama, ["q_proj", "v_proj"]),
    (tiny_llama, ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]),
]


@pytest.mark.parametrize("make,targets", CASES)
@pytest.mark.parametrize(
    "method",
    [
        Method("lora", r=4),
        Method("lora", r=1),
        Method("vera", r=8),
        Method("fourierft", n_frequency=50),
        Method("c3a", block_size=16),
        Method("c3a", block_size=32),
    ],
    ids=lambda m: m.display,
)
def test_parameters_match_peft(make, targets, method: Method) -> None:
    model = make()
    ours = cost_report(model, targets, [method]).methods[0].params
    if method.name == "lora":
        config = peft.LoraConfig(r=method.r, target_modules=targets)
    elif method.name == "vera":
        config = peft.VeraConfig(r=method.r, target_modules=targets)
    elif method.name == "fourierft":
        config = peft.FourierFTConfig(n_frequency=method.n_frequency, target_modules=targets)
    else:
        config = peft.C3AConfig(block_size=method.block_size, target_modules=targets)
    assert ours == peft_count(model, config)


def test_full_matches_model_parameters() -> None:
    model = tiny_roberta()
    rep = cost_report(model, ["query"], [Method("full")])
    assert rep.methods[0].params == sum(p.numel() for p in model.parameters())
    assert rep.methods[0].real_flops_per_token == 0


def test_gpt2_conv1d_lora_matches_peft() -> None:
    model = tiny_gpt2()
    layers = find_target_layers(model, ["c_attn"])
    assert all(lay.is_conv1d for lay in layers)
    assert (layers[0].in_features, layers[0].out_features) == (48, 144)
    ours = cost_report(model, ["c_attn"], [Method("lora", r=4)]).methods[0].params
    assert ours == peft_count(model, peft.LoraConfig(r=4, target_modules=["c_attn"]))


def test_regex_targets_like_peft() -> None:
    model = tiny_roberta()
    regex = r".*layer\.1\.attention\.self\.(query|value)"
    ours = cost_report(model, regex, [Method("lora", r=2)]).methods[0].params
    assert ours == 2 * 2 * (64 + 64)
    assert ours == peft_count(model, peft.LoraConfig(r=2, target_modules=regex))


def test_meta_device_roberta_base_bca_768() -> None:
    cfg = transformers.RobertaConfig(
        vocab_size=50265,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        max_position_embeddings=514,
        type_vocab_size=1,
    )
    with torch.device("meta"):
        model = transformers.RobertaModel(cfg, add_pooling_layer=False)
    rep = cost_report(model, ["query", "value"], [Method("bca", block_size=768), Method("full")])
    assert len(rep.layers) == 24
    assert rep.methods[0].params == 18_432
    assert rep.methods[1].params == count_model_parameters(model)
    # paper convention for one 768x768 matrix at p = 768, DESIGN.md 2a
    n, p = 768, 768
    one = 5 * (n * n / p) * math.log2(p) + n * n / p + 10 * n * math.log2(p) + n
    assert rep.methods[0].paper_flops_per_token == pytest.approx(24 * one)


def test_bca_parameters_pad() -> None:
    # GPT-2 c_attn 768 -> 2304 at p = 256 is exact; at p = 512 it pads 2304 -> 2560
    lay = LayerShape("c_attn", 768, 2304, True)
    assert adapter_parameters(Method("bca", block_size=256), lay) == 9 * 3 * 256
    assert adapter_parameters(Method("bca", block_size=512), lay) == 5 * 2 * 512
    with pytest.raises(ValueError, match="block_size=512"):
        adapter_parameters(Method("c3a", block_size=512), lay)


@pytest.mark.parametrize("n,p", [(768, 1), (768, 768), (1024, 256), (4096, 64)])
def test_paper_formula_square(n: int, p: int) -> None:
    lay = LayerShape("m", n, n)
    got = adapter_flops(Method("bca", block_size=p), lay, "paper")
    lg = math.log2(p)
    assert got.per_token == pytest.approx(
        5 * (n * n / p) * lg + n * n / p + 10 * n * lg + n, rel=1e-12
    )
    assert got.per_call == 0
    if p == 1:  # a dense ΔW: n^2 multiply-accumulates plus the residual add
        assert got.per_token == n * n + n
    assert adapter_flops(Method("lora", r=8), lay, "paper").per_token == 2 * 8 * n
    nn_ = n * n
    assert adapter_flops(Method("fourierft", n_frequency=1000), lay, "paper").per_token == (
        pytest.approx(5 * nn_ * math.log2(nn_) + 4 * nn_)
    )


def test_real_formula_bca() -> None:
    lay = LayerShape("m", 4096, 4096)
    f = adapter_flops(Method("bca", block_size=256), lay, "real")
    q = 16
    assert f.per_token == pytest.approx(2.5 * 2 * 4096 * 8 + 8 * q * q * 129 + 2 * 4096)
    assert f.per_call == pytest.approx(2.5 * q * q * 256 * 8)
    assert f.total(10) == pytest.approx(10 * f.per_token + f.per_call)
    c3a = adapter_flops(Method("c3a", block_size=256), lay, "real")
    assert c3a.per_token > f.per_token and c3a.per_call == 2 * f.per_call
    assert FlopCount(1, 2) + FlopCount(3, 4) == FlopCount(4, 6)


def test_errors() -> None:
    model = tiny_roberta()
    with pytest.raises(ValueError, match="matched no module"):
        find_target_layers(model, ["nonexistent"])
    with pytest.raises(ValueError, match="not a linear layer"):
        find_target_layers(model, ["attention"])
    with pytest.raises(ValueError, match="target_modules"):
        find_target_layers(model, [])
    with pytest.raises(ValueError, match="block_size"):
        Method("bca")
    with pytest.raises(ValueError, match="does not apply"):
        Method("lora", r=4, block_size=8)
    with pytest.raises(ValueError, match="name must be one of"):
        Method("dora", r=4)
    with pytest.raises(ValueError, match="convention"):
        adapter_flops(Method("lora", r=4), LayerShape("m", 4, 4), "exact")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="in_features"):
        LayerShape("m", 0, 4)
    with pytest.raises(ValueError, match="model_parameters"):
        cost_report([LayerShape("m", 4, 4)], None, [Method("full")])


def test_report_serialises() -> None:
    rep = cost_report(
        tiny_roberta(), ["query", "value"], [Method("bca", block_size=16), Method("lora", r=2)]
    )
    d = rep.to_dict()
    assert d["num_layers"] == 4 and d["layer_shapes"] == [(64, 64)]
    md = rep.to_markdown()
    assert "| bca p=16 | 1,024 |" in md and "| lora r=2 | 1,024 |" in md
    assert '"method": "lora"' in rep.to_json()


@pytest.mark.parametrize(
    "make,targets,p",
    [
        (tiny_roberta, ["query", "value"], 16),
        (tiny_roberta, ["query", "value", "intermediate.dense", "output.dense"], 24),  # padded
        (tiny_llama, ["q_proj", "v_proj", "up_proj", "down_proj"], 48),  # 160 padded at 48
        (tiny_gpt2, ["c_attn", "c_fc"], 32),  # Conv1D, 48 and 144 padded at 32
    ],
)
def test_bca_parameters_match_injected_kernels(make, targets, p: int) -> None:
    from bca.model import BCAConfig, count_parameters, inject_adapters

    model = make()
    want = cost_report(model, targets, [Method("bca", block_size=p)]).methods[0].params
    inject_adapters(model, BCAConfig(block_size=p, target_modules=targets))
    assert count_parameters(model).trainable == want
    # the accounting also reads an already adapted model (through each base layer)
    again = cost_report(model, targets, [Method("bca", block_size=p)]).methods[0].params
    assert again == want


def test_real_matmul_flops_match_torch_flop_counter() -> None:
    """The matmul part of the 'real' LoRA and FourierFT counts equals what torch's
    FlopCounterMode measures on PEFT's layers (it counts matmuls only, not the
    elementwise scale/add terms, 2·d_out and d_out, nor FFTs)."""
    from torch.utils.flop_counter import FlopCounterMode

    d_in, d_out, tokens = 48, 40, 7
    lay = LayerShape("lin", d_in, d_out)
    for method, config, elementwise in (
        (Method("lora", r=4), peft.LoraConfig(r=4, target_modules=["lin"]), 2 * d_out),
        (
            Method("fourierft", n_frequency=30),
            peft.FourierFTConfig(n_frequency=30, target_modules=["lin"]),
            d_out,
        ),
    ):
        torch.manual_seed(0)
        base = torch.nn.Sequential()
        base.add_module("lin", torch.nn.Linear(d_in, d_out, bias=False))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = peft.get_peft_model(base, config)
        x = torch.randn(tokens, d_in)
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            pm(x)
        measured = fc.get_total_flops() - 2 * tokens * d_in * d_out  # minus the frozen W x
        want = adapter_flops(method, lay, "real")
        assert measured == tokens * (want.per_token - elementwise)
