"""patch_model: an existing base-model ONNX file + a saved bca adapter -> adapted ONNX.

Round trips against the torch model, several adapters in one graph, modules_to_save,
and the error paths (bad adapter files, no matching node, ambiguous matches, opset too
old)."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import dense_oracle, rel_err, tiny_model

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
transformers = pytest.importorskip("transformers")

from bca.model import BCAConfig, inject_adapters, save_adapter  # noqa: E402
from bca.onnx import (  # noqa: E402
    AmbiguousTargetError,
    TargetMatchError,
    TargetNotFoundError,
    patch_model,
    read_adapter,
)

MODEL_TOL = 1e-5
VOCAB = 61


class _Hidden(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def _base(seed: int = 0) -> torch.nn.Module:
    return _Hidden(tiny_model("bert", seed=seed, vocab_size=VOCAB, hidden_size=24)).eval()


def _inputs(b: int, s: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, s, dtype=torch.long)
    if b > 1 and s > 2:
        mask[-1, s // 2 :] = 0
    return {"input_ids": torch.randint(0, VOCAB, (b, s), generator=g), "attention_mask": mask}


def _export_base(
    model: torch.nn.Module, path: Path, *, opset: int = 17, dynamo: bool = False
) -> Path:
    ex = _inputs(2, 6, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            dim = torch.export.Dim.AUTO
            torch.onnx.export(
                model,
                (ex["input_ids"], ex["attention_mask"]),
                str(path),
                dynamo=True,
                input_names=["input_ids", "attention_mask"],
                opset_version=max(opset, 18),
                dynamic_shapes=({0: dim, 1: dim}, {0: dim, 1: dim}),
                external_data=False,
            )
        else:
            torch.onnx.export(
                model,
                (ex["input_ids"], ex["attention_mask"]),
                str(path),
                dynamo=False,
                input_names=["input_ids", "attention_mask"],
                opset_version=opset,
                dynamic_axes={"input_ids": {0: "b", 1: "s"}, "attention_mask": {0: "b", 1: "s"}},
            )
    return path


def _adapter(
    tmp: Path, name: str, targets: list[str], p: int, seed: int, base_seed: int = 0
) -> tuple[torch.nn.Module, Path]:
    model = _base(base_seed)
    torch.manual_seed(seed)
    inject_adapters(
        model, BCAConfig(block_size=p, target_modules=targets, scale=0.7, init="xavier_uniform")
    )
    model.eval()
    return model, save_adapter(model, tmp / name)


def _run(path: Path, feed: dict[str, torch.Tensor]) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    return sess.run(None, {k: v.numpy() for k, v in feed.items() if k in names})[0]


def _assert_parity(model: torch.nn.Module, path: Path) -> None:
    onnx.checker.check_model(str(path), full_check=True)
    for k, (b, s) in enumerate([(1, 3), (3, 7)]):
        feed = _inputs(b, s, 10 + k)
        with torch.no_grad():
            want = model(**feed).double().numpy()
        assert rel_err(_run(path, feed), want) <= MODEL_TOL


@pytest.mark.parametrize("lowering", ["auto", "dft", "matmul", "matmul2"])
def test_patch_round_trip(lowering: str, tmp_path: Path) -> None:
    """Legacy-exported base: anonymous weight initializers, matched by node scope."""
    base_onnx = _export_base(_base(), tmp_path / "base.onnx")
    model, adir = _adapter(tmp_path, "ad", ["query", "value", "output.dense"], 16, seed=1)
    out = patch_model(base_onnx, adir, tmp_path / "patched.onnx", lowering=lowering, progress=False)
    _assert_parity(model, out)


def test_patch_opset_20(tmp_path: Path) -> None:
    base_onnx = _export_base(_base(), tmp_path / "base.onnx", opset=20)
    model, adir = _adapter(tmp_path, "ad", ["query", "value"], 8, seed=2)
    out = patch_model(base_onnx, adir, tmp_path / "p.onnx", lowering="dft", progress=False)
    assert onnx.load(str(out)).opset_import[0].version == 20
    _assert_parity(model, out)


def test_patch_dynamo_base_needs_weights(tmp_path: Path) -> None:
    """The dynamo exporter folds weights into anonymous transposed initializers and
    names nodes generically: name matching fails with a clear error, base weights fix it."""
    pytest.importorskip("onnxscript")
    base = _base()
    base_onnx = _export_base(base, tmp_path / "base.onnx", dynamo=True)
    model, adir = _adapter(tmp_path, "ad", ["query", "value"], 8, seed=3)
    with pytest.raises(TargetNotFoundError, match="encoder.layer.0.attention.self.query"):
        patch_model(base_onnx, adir, tmp_path / "p.onnx", progress=False)
    weights = {
        name.removeprefix("model."): m.weight.detach().numpy()
        for name, m in base.named_modules()
        if isinstance(m, torch.nn.Linear)
    }
    weights.update({f"model.{k}": v for k, v in list(weights.items())})
    out = patch_model(base_onnx, adir, tmp_path / "p.onnx", base_weights=weights, progress=False)
    _assert_parity(model, out)


def test_patch_explicit_targets(tmp_path: Path) -> None:
    base_onnx = _export_base(_base(), tmp_path / "base.onnx")
    model, adir = _adapter(tmp_path, "ad", ["layer.0.attention.self.query"], 8, seed=4)
    node = "/model/encoder/layer.0/attention/self/query/MatMul"
    targets = {"model.encoder.layer.0.attention.self.query": node}
    out = patch_model(base_onnx, adir, tmp_path / "p.onnx", targets=targets, progress=False)
    _assert_parity(model, out)
    bad = {"model.encoder.layer.0.attention.self.query": "no/such/node"}
    with pytest.raises(TargetNotFoundError, match="no/such/node"):
        patch_model(base_onnx, adir, tmp_path / "q.onnx", targets=bad, progress=False)


def test_several_adapters_in_one_graph(tmp_path: Path) -> None:
    """Adapters A (query, value) and B (query, intermediate) in one graph: the result is
    the base plus both updates (they add up on the shared query layers)."""
    base = _base()
    base_onnx = _export_base(base, tmp_path / "base.onnx")
    model_a, dir_a = _adapter(tmp_path, "a", ["query", "value"], 8, seed=5)
    model_b, dir_b = _adapter(tmp_path, "b", ["query", "intermediate.dense"], 12, seed=6)
    out = patch_model(base_onnx, [dir_a, dir_b], tmp_path / "ab.onnx", progress=False)
    # reference: base weights + both dense updates from the dense oracle
    ref = _base()
    with torch.no_grad():
        for adapted in (model_a, model_b):
            for name, m in adapted.named_modules():
                if hasattr(m, "bca_kernel"):
                    k = m.bca_kernel.detach().numpy()
                    dw = m.scale * dense_oracle(k, m.in_features, m.out_features)
                    ref.get_submodule(name).weight.add_(torch.from_numpy(dw).float())
    _assert_parity(ref, out)
    # patching sequentially gives the same graph semantics
    one = patch_model(base_onnx, dir_a, tmp_path / "a.onnx", progress=False)
    two = patch_model(one, dir_b, tmp_path / "a_then_b.onnx", progress=False)
    _assert_parity(ref, two)


def test_patch_modules_to_save(tmp_path: Path) -> None:
    """A trained classifier head (modules_to_save) replaces the base's initializers."""
    base = tiny_model(
        "bert", "classifier", vocab_size=VOCAB, hidden_size=24, num_hidden_layers=1, num_labels=3
    )

    class Logits(torch.nn.Module):
        def __init__(self, m: torch.nn.Module) -> None:
            super().__init__()
            self.m = m

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.m(input_ids=input_ids, attention_mask=attention_mask).logits

    base_onnx = _export_base(Logits(base), tmp_path / "base.onnx")
    model = Logits(transformers.BertForSequenceClassification(base.config)).eval()
    model.m.load_state_dict(base.state_dict())
    inject_adapters(
        model,
        BCAConfig(
            block_size=8,
            target_modules=["query", "value"],
            init="xavier_uniform",
            modules_to_save=["classifier"],
        ),
    )
    with torch.no_grad():  # "train" the head
        model.m.classifier.weight.add_(torch.randn_like(model.m.classifier.weight))
        model.m.classifier.bias.add_(1.0)
    model.eval()
    adir = save_adapter(model, tmp_path / "ad")
    assert any(k.startswith("m.classifier") for k in read_adapter(adir).modules_to_save)
    out = patch_model(base_onnx, adir, tmp_path / "p.onnx", progress=False)
    _assert_parity(model, out)

    # one graph holds one head: adapters with different heads are refused, equal ones not
    other = Logits(transformers.BertForSequenceClassification(base.config)).eval()
    other.m.load_state_dict(model.m.state_dict(), strict=False)  # the same trained head
    torch.manual_seed(5)
    inject_adapters(
        other,
        BCAConfig(
            block_size=8, target_modules=["key"], init="xavier_uniform",
            modules_to_save=["classifier"],
        ),
    )  # fmt: skip
    other.eval()
    same_head = save_adapter(other, tmp_path / "same_head")
    both = patch_model(base_onnx, [adir, same_head], tmp_path / "both.onnx", progress=False)
    onnx.checker.check_model(str(both), full_check=True)
    with torch.no_grad():
        other.m.classifier.bias.add_(0.5)
    diff_head = save_adapter(other, tmp_path / "diff_head")
    with pytest.raises(ValueError, match=r"different values of fully trained parameter"):
        patch_model(base_onnx, [adir, diff_head], tmp_path / "never.onnx", progress=False)
    assert not (tmp_path / "never.onnx").exists()
    # a head initializer that another node reads too (an exporter's merged constants):
    # writing the trained value would change that node as well, so it is refused ...
    shared = onnx.load(str(base_onnx))
    bias = next(t.name for t in shared.graph.initializer if t.name.endswith("classifier.bias"))
    shared.graph.node.append(onnx.helper.make_node("Identity", [bias], ["echo"]))
    shared.graph.output.append(
        onnx.helper.make_tensor_value_info("echo", onnx.TensorProto.FLOAT, [3])
    )
    shared_path = tmp_path / "shared.onnx"
    onnx.save(shared, str(shared_path))
    with pytest.raises(ValueError, match=r"classifier\.bias.*2 node inputs"):
        patch_model(shared_path, adir, tmp_path / "never.onnx", progress=False)
    assert not (tmp_path / "never.onnx").exists()
    # ... unless the trained value equals the stored one (nothing changes for the reader)
    with torch.no_grad():
        model.m.classifier.bias.copy_(base.classifier.bias)
    untouched = save_adapter(model, tmp_path / "bias_untouched")
    out = patch_model(shared_path, untouched, tmp_path / "shared_ok.onnx", progress=False)
    _assert_parity(model, out)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    echo = sess.run(["echo"], {k: v.numpy() for k, v in _inputs(1, 3, 0).items()})[0]
    np.testing.assert_array_equal(echo, base.classifier.bias.detach().numpy())


# --------------------------------------------------------------------------------------
# error paths
# --------------------------------------------------------------------------------------
def test_bad_adapter_files(tmp_path: Path) -> None:
    base_onnx = _export_base(_base(), tmp_path / "base.onnx")
    _, good = _adapter(tmp_path, "good", ["query"], 8, seed=7)

    def variant(name: str) -> Path:
        d = tmp_path / name
        shutil.copytree(good, d)
        return d

    with pytest.raises(FileNotFoundError, match="does not exist"):
        patch_model(base_onnx, tmp_path / "missing", tmp_path / "o.onnx", progress=False)
    d = variant("no_config")
    (d / "adapter_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        patch_model(base_onnx, d, tmp_path / "o.onnx", progress=False)
    d = variant("bad_json")
    (d / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        patch_model(base_onnx, d, tmp_path / "o.onnx", progress=False)
    d = variant("wrong_format")
    doc = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**doc, "format": "lora"}))
    with pytest.raises(ValueError, match="not a bca adapter config"):
        patch_model(base_onnx, d, tmp_path / "o.onnx", progress=False)
    d = variant("bad_tensors")
    (d / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        patch_model(base_onnx, d, tmp_path / "o.onnx", progress=False)
    d = variant("bad_shape")
    doc = json.loads((d / "adapter_config.json").read_text())
    for info in doc["modules"].values():
        info["block_size"] = 4
    (d / "adapter_config.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="expected"):
        patch_model(base_onnx, d, tmp_path / "o.onnx", progress=False)
    d = variant("half_kernels")
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(d / "adapter_model.safetensors"))
    save_file({k: v.astype(np.float16) for k, v in tensors.items()},
              str(d / "adapter_model.safetensors"))  # fmt: skip
    with pytest.raises(ValueError, match="dtype float16, expected float32 or float64"):
        patch_model(base_onnx, d, tmp_path / "o.onnx", progress=False)
    with pytest.raises(FileNotFoundError, match="ONNX file"):
        patch_model(tmp_path / "nope.onnx", good, tmp_path / "o.onnx", progress=False)
    (tmp_path / "garbage.onnx").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable ONNX model"):
        patch_model(tmp_path / "garbage.onnx", good, tmp_path / "o.onnx", progress=False)
    assert not (tmp_path / "o.onnx").exists()


def test_no_matching_node(tmp_path: Path) -> None:
    base_onnx = _export_base(_base(), tmp_path / "base.onnx")
    # an adapter saved from a model with other widths
    other = _Hidden(
        tiny_model(
            "bert",
            seed=None,
            vocab_size=VOCAB,
            hidden_size=16,
            num_hidden_layers=1,
            intermediate_size=20,
        )
    ).eval()
    inject_adapters(other, BCAConfig(block_size=8, target_modules=["query"]))
    adir = save_adapter(other, tmp_path / "other")
    with pytest.raises(TargetNotFoundError, match="No MatMul/Gemm node with a constant weight"):
        patch_model(base_onnx, adir, tmp_path / "o.onnx", progress=False)
    # a module name that does not exist in the graph, shapes that do
    _, adir = _adapter(tmp_path, "renamed", ["query"], 8, seed=8)
    doc = json.loads((adir / "adapter_config.json").read_text())
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(adir / "adapter_model.safetensors"))
    renamed = {k.replace("encoder.layer", "decoder.block"): v for k, v in tensors.items()}
    save_file(renamed, str(adir / "adapter_model.safetensors"))
    doc["modules"] = {
        k.replace("encoder.layer", "decoder.block"): v for k, v in doc["modules"].items()
    }
    (adir / "adapter_config.json").write_text(json.dumps(doc))
    with pytest.raises(TargetNotFoundError, match="have its shape"):
        patch_model(base_onnx, adir, tmp_path / "o.onnx", progress=False)


def test_ambiguous_match(tmp_path: Path) -> None:
    base_onnx = _export_base(_base(), tmp_path / "base.onnx")
    _, adir = _adapter(tmp_path, "short", ["layer.0.attention.self.query"], 8, seed=9)
    doc = json.loads((adir / "adapter_config.json").read_text())
    from safetensors.numpy import load_file, save_file

    (name,) = doc["modules"]
    tensors = load_file(str(adir / "adapter_model.safetensors"))
    # "query" alone is a suffix of every layer's query projection
    save_file(
        {"query.bca_kernel": tensors[f"{name}.bca_kernel"]}, str(adir / "adapter_model.safetensors")
    )
    doc["modules"] = {"query": doc["modules"][name]}
    (adir / "adapter_config.json").write_text(json.dumps(doc))
    with pytest.raises(AmbiguousTargetError, match="matches 2 nodes"):
        patch_model(base_onnx, adir, tmp_path / "o.onnx", progress=False)
    assert issubclass(AmbiguousTargetError, TargetMatchError)
    assert issubclass(TargetMatchError, ValueError)


def test_opset_too_old(tmp_path: Path) -> None:
    base_onnx = _export_base(_base(), tmp_path / "base14.onnx", opset=14)
    model, adir = _adapter(tmp_path, "ad", ["query"], 8, seed=10)
    with pytest.raises(ValueError, match="opset 14 is too old for lowering='dft'"):
        patch_model(base_onnx, adir, tmp_path / "o.onnx", lowering="dft", progress=False)
    # "auto" (and "matmul") need only opset 13 ops
    out = patch_model(base_onnx, adir, tmp_path / "o.onnx", progress=False)
    _assert_parity(model, out)


def test_patch_checks_the_base_weights(tmp_path: Path) -> None:
    """An adapter trained on another checkpoint of the same architecture is reported when
    patched into this base graph (its saved weight sketch differs from the located
    layers' weights); the sketch computed from the ONNX weights equals the torch one."""
    from bca import _sketch
    from bca.model.io import _weight_sketch

    base = _base(0)
    base_onnx = _export_base(base, tmp_path / "base.onnx")
    _, other = _adapter(tmp_path, "other", ["query", "value"], 8, seed=3, base_seed=1)
    with pytest.warns(UserWarning, match=r"trained on other base weights.* 4 of its 4 layers"):
        patch_model(base_onnx, other, tmp_path / "o.onnx", progress=False)
    with pytest.raises(ValueError, match="trained on other base weights"):
        patch_model(base_onnx, other, tmp_path / "x.onnx", progress=False, check_base="error")
    assert not (tmp_path / "x.onnx").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        patch_model(base_onnx, other, tmp_path / "i.onnx", progress=False, check_base="ignore")
        model, same = _adapter(tmp_path, "same", ["query", "value"], 8, seed=3)
        out = patch_model(base_onnx, same, tmp_path / "s.onnx", progress=False, check_base="error")
    _assert_parity(model, out)
    # numpy (ONNX side) and torch compute the same sketch
    lin = base.model.encoder.layer[0].attention.self.query
    a = _sketch.sketch(lin.weight.detach().numpy())
    b = _weight_sketch(lin)
    assert b is not None and not _sketch.differ(a, b)
    np.testing.assert_allclose([a["rms"], *a["projections"]], [b["rms"], *b["projections"]],
                               rtol=1e-5, atol=1e-7 * a["rms"])  # fmt: skip
    with pytest.raises(ValueError, match="check_base must be one of"):
        patch_model(base_onnx, same, tmp_path / "y.onnx", progress=False, check_base="no")
