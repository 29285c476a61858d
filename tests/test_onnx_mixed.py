"""Mixed-adapter batches (docs/onnx.md, "Mixed-adapter batches"): one ONNX graph, one run,
each batch row with its own adapter, chosen by the int64 input ``bca.adapter_index``.

Tiny random-weight BERT and GPT-2 models carry three named adapters with different kernels
(the third on fewer modules), on widths the block size does not divide (padding); a batch
whose rows use adapters [2, 0, 1, base, 0] must equal, row by row, the torch model with
that adapter active, in float32 and float64, for graphs from export_model(mixed=[...]) and
patch_model(mixed=True) with every lowering. Out-of-range indices and an index of the wrong
length are onnxruntime errors; adapters that do not share a layout, or carry different
heads, are refused before anything is written.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from conftest import dense_oracle, rel_err, tiny_model

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
transformers = pytest.importorskip("transformers")

from bca.model import (  # noqa: E402
    BCAConfig,
    add_adapter,
    inject_adapters,
    save_adapter,
    set_adapter,
)
from bca.onnx import (  # noqa: E402
    ADAPTER_INDEX_NAME,
    MIXED_METADATA_KEY,
    AdapterSpec,
    add_mixed_adapters,
    export_model,
    make_mixed_adapter_model,
    mixed_layout,
    patch_model,
    read_adapter,
    stack_parameter_name,
)

VOCAB = 61
NAMES = ("a", "b", "c")
ROWS = [2, 0, 1, 3, 0]  # 3 = the base slot
# whole models: torch and onnxruntime order their reductions differently
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


class _Hidden(torch.nn.Module):
    """last_hidden_state only, no cache (uniform outputs for BERT and GPT-2)."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Any, attention_mask: Any) -> Any:
        return self.model(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        ).last_hidden_state


def _bert() -> Any:
    return tiny_model(
        "bert",
        seed=None,  # the callers seed
        vocab_size=VOCAB,
        hidden_size=36,  # p = 16 does not divide it: padding
        num_attention_heads=3,
        initializer_range=0.2,
        hidden_act="relu",  # onnxruntime has no float64 Erf (GELU)
    )


def _gpt2() -> Any:
    return tiny_model(
        "gpt2",
        seed=None,
        vocab_size=VOCAB,  # n_embd 32: p = 12 does not divide it (padding); c_attn's 96 = 8 * 12
        n_positions=32,
        initializer_range=0.2,
        activation_function="relu",
    )


ARCHS = {
    # builder, targets of adapters a and b, targets of c (fewer), block size
    "bert": (_bert, ["query", "value", "intermediate.dense"], ["query"], 16),
    "gpt2": (_gpt2, ["c_attn", "c_fc"], ["c_fc"], 12),  # Conv1D: weights stored (in, out)
}


def _model(arch: str, dtype: Any) -> Any:
    """A base model with three named adapters of different kernels and scales."""
    build, targets, fewer, p = ARCHS[arch]
    torch.manual_seed(0)
    model = _Hidden(build()).to(dtype).eval()
    for k, (name, scale) in enumerate(zip(NAMES, (0.7, 0.5, 1.3), strict=True)):
        torch.manual_seed(10 + k)
        cfg = BCAConfig(
            block_size=p,
            target_modules=fewer if name == "c" else targets,
            scale=scale,
            init="xavier_uniform",
        )
        if k == 0:
            inject_adapters(model, cfg, adapter_name=name)
        else:
            add_adapter(model, name, cfg)
    set_adapter(model, "a", trainable=False)
    return model.eval()


def _inputs(b: int, s: int, seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, s, dtype=torch.long)
    if b > 1 and s > 2:
        mask[-1, s // 2 :] = 0  # padding, so the tracer keeps the mask path
    return {"input_ids": torch.randint(0, VOCAB, (b, s), generator=g), "attention_mask": mask}


def _session(path: Path) -> Any:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _torch_rows(model: Any, feed: dict[str, Any], rows: list[int]) -> np.ndarray:
    """Row b of the torch model with adapter rows[b] active (the base model for 3)."""
    outs = {}
    for a in sorted(set(rows)):
        set_adapter(model, [NAMES[a]] if a < len(NAMES) else [], trainable=False)
        with torch.no_grad():
            outs[a] = model(**feed).double().numpy()
    set_adapter(model, "a", trainable=False)
    return np.stack([outs[a][b] for b, a in enumerate(rows)])


def _run(sess: Any, feed: dict[str, Any], index: Any) -> np.ndarray:
    feeds = {k: v.numpy() for k, v in feed.items()}
    feeds[ADAPTER_INDEX_NAME] = np.asarray(index, dtype=np.int64)
    return np.asarray(sess.run(None, feeds)[0])


def _assert_rows(got: np.ndarray, want: np.ndarray, tol: float) -> None:
    assert got.shape == want.shape
    for b in range(want.shape[0]):
        err = rel_err(got[b], want[b])
        assert err <= tol, f"row {b}: norm-relative error {err:.3g} > {tol:g}"


@dataclass
class Mixed:
    arch: str
    dtype: Any
    model: Any
    graph: Path
    tol: float


@pytest.fixture(
    scope="module",
    params=[
        ("bert", torch.float32),
        ("bert", torch.float64),
        ("gpt2", torch.float32),
        ("gpt2", torch.float64),
    ],
    ids=["bert-f32", "bert-f64", "gpt2-f32", "gpt2-f64"],
)
def mixed(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Mixed:
    arch, dtype = request.param
    model = _model(arch, dtype)
    tmp = tmp_path_factory.mktemp(f"mixed_{arch}")
    graph = export_model(
        model,
        tmp / "mixed.onnx",
        _inputs(2, 6, 0),
        mixed=list(NAMES),
        progress=False,
        verify_tolerance=TOL[dtype] * 10,
    )
    return Mixed(arch, dtype, model, graph, TOL[dtype])


# --------------------------------------------------------------------------------------
# one batch, one adapter per row
# --------------------------------------------------------------------------------------
def test_rows_match_torch(mixed: Mixed) -> None:
    sess = _session(mixed.graph)
    feed = _inputs(len(ROWS), 7, 1)
    _assert_rows(_run(sess, feed, ROWS), _torch_rows(mixed.model, feed, ROWS), mixed.tol)
    # another order, another sequence length (dynamic axes)
    rows = [1, 3, 3, 2, 0, 2]
    feed = _inputs(len(rows), 5, 2)
    _assert_rows(_run(sess, feed, rows), _torch_rows(mixed.model, feed, rows), mixed.tol)


def test_batch_of_one(mixed: Mixed) -> None:
    sess = _session(mixed.graph)
    feed = _inputs(1, 6, 3)
    for a in range(len(NAMES) + 1):
        _assert_rows(_run(sess, feed, [a]), _torch_rows(mixed.model, feed, [a]), mixed.tol)
    # ONNX Gather counts a negative index from the end: -1 is the base slot
    _assert_rows(_run(sess, feed, [-1]), _torch_rows(mixed.model, feed, [3]), mixed.tol)


def test_rows_differ_between_adapters(mixed: Mixed) -> None:
    """The adapters change the output visibly, so equal rows mean the right adapter."""
    sess = _session(mixed.graph)
    feed = _inputs(1, 6, 4)
    outs = [_run(sess, feed, [a])[0] for a in range(len(NAMES) + 1)]
    for i in range(len(outs)):
        for j in range(i):
            assert rel_err(outs[i], outs[j]) > 1e-3, (i, j)


def test_layout(mixed: Mixed) -> None:
    layout = mixed_layout(mixed.graph)
    assert layout.adapters == NAMES
    assert layout.base_index == 3
    assert layout.index_input == ADAPTER_INDEX_NAME
    assert layout.batch_input == "input_ids"
    _, targets, fewer, p = ARCHS[mixed.arch]
    by_module = {x.module: x for x in layout.layers}
    assert len(by_module) == 2 * len(targets)  # two layers each
    for module, layer in by_module.items():
        assert layer.stack == stack_parameter_name(module)
        assert layer.block_size == p
        assert layer.shape[1] == len(NAMES) + 1
        assert layer.lowering == "matmul"  # "auto" at p <= 512
        assert layer.dtype == ("float32" if mixed.dtype == torch.float32 else "float64")
        in_c = any(module.endswith(t) for t in fewer)
        assert layer.adapters == ((0, 1, 2) if in_c else (0, 1))
    assert np.array_equal(layout.index(["c", "a", None, 1]), [2, 0, 3, 1])
    with pytest.raises(KeyError, match="no adapter named 'z'"):
        layout.index(["z"])
    with pytest.raises(IndexError):
        layout.index([4])
    model = onnx.load(str(mixed.graph))
    inputs = {i.name: i for i in model.graph.input}
    idx = inputs[ADAPTER_INDEX_NAME].type.tensor_type
    assert idx.elem_type == onnx.TensorProto.INT64 and len(idx.shape.dim) == 1
    inits = {t.name: t for t in model.graph.initializer}
    for layer in layout.layers:  # a constant, not an overridable input
        assert layer.stack in inits and layer.stack not in inputs
        stack = onnx.numpy_helper.to_array(inits[layer.stack])
        assert not stack[:, -1].any()  # the base slot is zeros
        for a in range(len(NAMES)):  # an adapter that does not adapt the layer: zeros
            assert stack[:, a].any() == (a in layer.adapters)
    # hostile metadata: JSON nested far deeper than Python's recursion limit
    from bca.onnx._mixed import MixedLayout

    with pytest.raises(ValueError, match="nested too deeply"):
        MixedLayout.from_json("[" * 100_000 + "]" * 100_000, source="m.onnx")


def test_index_errors(mixed: Mixed) -> None:
    """Out-of-range indices and an index of the wrong length fail in onnxruntime."""
    sess = _session(mixed.graph)
    feed = _inputs(3, 5, 5)
    for bad in ([0, 4, 1], [0, -5, 1]):
        with pytest.raises(Exception, match="indices element out of data bounds"):
            _run(sess, feed, bad)
    for wrong in ([0, 1], [0], [0, 1, 2, 0]):
        with pytest.raises(Exception, match="Non concat axis dimensions must match"):
            _run(sess, feed, wrong)


# --------------------------------------------------------------------------------------
# patch_model(mixed=True): saved adapter folders, every lowering
# --------------------------------------------------------------------------------------
def _export_base_onnx(model: Any, path: Path) -> Path:
    """A plain base model as an ONNX file, as a user would have it."""
    ex = _inputs(2, 6, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (ex["input_ids"], ex["attention_mask"]),
            str(path),
            dynamo=False,
            input_names=["input_ids", "attention_mask"],
            dynamic_axes={"input_ids": {0: "b", 1: "s"}, "attention_mask": {0: "b", 1: "s"}},
            opset_version=17,
        )
    return path


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("mixed_saved")
    model = _model("bert", torch.float32)
    torch.manual_seed(0)  # the base weights of _model
    base = _export_base_onnx(_Hidden(_bert()).eval(), tmp / "base.onnx")
    dirs = [save_adapter(model, tmp / name, adapter_name=name) for name in NAMES]
    return {"model": model, "base": base, "dirs": dirs, "tmp": tmp}


@pytest.mark.parametrize("lowering", ["auto", "dft", "matmul", "matmul2"])
def test_patch_mixed(lowering: str, saved: dict[str, Any]) -> None:
    out = patch_model(
        saved["base"],
        saved["dirs"],
        saved["tmp"] / f"patched_{lowering}.onnx",
        mixed=True,
        lowering=lowering,
        progress=False,
    )
    layout = mixed_layout(out)
    assert layout.adapters == NAMES  # the folders' names
    want_low = {"auto": "matmul", "dft": "dft", "matmul": "matmul", "matmul2": "matmul2"}
    assert {x.lowering for x in layout.layers} == {want_low[lowering]}
    tol = 1e-4 if lowering == "dft" else TOL[torch.float32]  # ORT's DFT at p = 16: 1e-6
    sess = _session(out)
    feed = _inputs(len(ROWS), 7, 6)
    _assert_rows(_run(sess, feed, ROWS), _torch_rows(saved["model"], feed, ROWS), tol)
    feed = _inputs(1, 4, 7)
    _assert_rows(_run(sess, feed, [2]), _torch_rows(saved["model"], feed, [2]), tol)


def test_export_from_folders_and_models(saved: dict[str, Any], tmp_path: Path) -> None:
    """export_model's entries may be folders, SavedAdapters and torch models too."""
    model = saved["model"]
    c_only = _model("bert", torch.float32)
    set_adapter(c_only, "c", trainable=False)
    out = export_model(
        model,
        tmp_path / "m.onnx",
        _inputs(2, 6, 0),
        mixed=[saved["dirs"][0], read_adapter(saved["dirs"][1]), c_only],
        mixed_names=list(NAMES),
        progress=False,
    )
    assert mixed_layout(out).adapters == NAMES
    feed = _inputs(len(ROWS), 6, 8)
    _assert_rows(
        _run(_session(out), feed, ROWS), _torch_rows(model, feed, ROWS), TOL[torch.float32]
    )


def test_refusals(saved: dict[str, Any], tmp_path: Path) -> None:
    model, base, dirs = saved["model"], saved["base"], saved["dirs"]
    # another block size on the same module: no common layout
    other = _model("bert", torch.float32)
    torch.manual_seed(3)
    add_adapter(other, "p8", BCAConfig(block_size=8, target_modules=["query"], init="gaussian"))
    p8 = save_adapter(other, tmp_path / "p8", adapter_name="p8")
    with pytest.raises(ValueError, match=r"differ on module .*query.*same block size"):
        patch_model(base, [dirs[0], p8], tmp_path / "x.onnx", mixed=True, progress=False)
    with pytest.raises(ValueError, match="differ on module"):
        export_model(model, tmp_path / "x.onnx", _inputs(2, 6, 0), mixed=["a", "p8"][:1] + [p8])
    # combinations that make no sense
    with pytest.raises(ValueError, match="cannot be combined"):
        patch_model(base, dirs, tmp_path / "x.onnx", mixed=True, servable=True)
    with pytest.raises(ValueError, match="cannot be combined"):
        export_model(model, tmp_path / "x.onnx", _inputs(2, 6, 0), mixed=["a"], servable=True)
    with pytest.raises(ValueError, match="mode='folded'"):
        export_model(model, tmp_path / "x.onnx", _inputs(2, 6, 0), mixed=["a"], mode="folded")
    with pytest.raises(ValueError, match="neither an adapter of the model"):
        export_model(model, tmp_path / "x.onnx", _inputs(2, 6, 0), mixed=["a", "zz"])
    with pytest.raises(ValueError, match="mixed_names has 1 names for 3"):
        patch_model(base, dirs, tmp_path / "x.onnx", mixed=True, mixed_names=["x"])
    with pytest.raises(ValueError, match="unique"):
        patch_model(base, dirs, tmp_path / "x.onnx", mixed=True, mixed_names=["x", "y", "x"])
    # a mixed graph is not mixed again
    once = patch_model(base, dirs, tmp_path / "once.onnx", mixed=True, progress=False)
    with pytest.raises(ValueError, match="mixed or servable bca graph already"):
        patch_model(once, dirs, tmp_path / "x.onnx", mixed=True, progress=False)
    assert not (tmp_path / "x.onnx").exists()


def test_add_mixed_adapters_in_memory() -> None:
    """A bare MatMul graph: float64 kernels next to float32 ones are refused; the base slot
    is the base layer; each adapter's rows are its own adapter."""
    base = onnx.helper.make_model(
        onnx.helper.make_graph(
            [onnx.helper.make_node("MatMul", ["x", "w.weight"], ["y"], name="w/MatMul")],
            "g",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["b", 16])],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["b", 16])],
            [onnx.numpy_helper.from_array(np.eye(16, dtype=np.float32), "w.weight")],
        ),
        opset_imports=[onnx.helper.make_opsetid("", 17)],
    )
    k = np.random.default_rng(0).standard_normal((2, 2, 8))
    specs = [[AdapterSpec("w", k.astype(np.float32), 16, 16)], [AdapterSpec("w", k, 16, 16)]]
    with pytest.raises(ValueError, match="kernel dtype float32 and float64"):
        add_mixed_adapters(base, specs)
    layout = add_mixed_adapters(
        base, [specs[0], [AdapterSpec("w", 2 * specs[0][0].kernel, 16, 16)]]
    )
    assert layout.batch_input == "x"
    assert any(p.key == MIXED_METADATA_KEY for p in base.metadata_props)
    sess = ort.InferenceSession(base.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((3, 16)).astype(np.float32)
    y = sess.run(None, {"x": x, ADAPTER_INDEX_NAME: np.array([0, 1, 2])})[0]
    assert np.allclose(y[2], x[2], atol=1e-6)  # the base slot: the identity MatMul
    one = ort.InferenceSession(
        make_mixed_adapter_model([(specs[0][0].kernel, 1.0)]).SerializeToString(),
        providers=["CPUExecutionProvider"],
    )
    for b, factor in ((0, 1.0), (1, 2.0)):
        want = factor * one.run(None, {"x": x[None, b : b + 1], "adapter_index": [0]})[0][0, 0]
        assert rel_err(y[b] - x[b], want) < 1e-5


@pytest.mark.parametrize("lowering", ["dft", "matmul", "matmul2"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_subgraph_against_dense_oracle(lowering: str, dtype: Any) -> None:
    """The mixed subgraph alone, every lowering and dtype, p = 16 not dividing the widths;
    rows over a sequence axis and flattened (batch * rows, features) inputs."""
    rng = np.random.default_rng(0)
    d_in, d_out, p = 37, 21, 16
    kernels = [(rng.standard_normal((2, 3, p)), s) for s in (0.5, 1.0, -0.8)]
    kernels[1] = None  # an adapter that does not adapt this layer: zeros
    model = make_mixed_adapter_model(
        kernels, in_features=d_in, out_features=d_out, lowering=lowering, dtype=dtype
    )
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = rng.standard_normal((6, 5, d_in)).astype(dtype)
    index = np.array([2, 0, 1, 3, 0, -1])
    y = sess.run(None, {"x": x, "adapter_index": index})[0]
    assert y.dtype == dtype and y.shape == (6, 5, d_out)
    tol = {np.float16: 5e-3, np.float32: 1e-5 if lowering != "dft" else 1e-4}.get(dtype, 1e-7)
    for b, a in enumerate(index):
        kv = [*kernels, None][a]
        if kv is None:
            assert not np.asarray(y[b], np.float64).any()
            continue
        want = kv[1] * np.asarray(x[b], np.float64) @ dense_oracle(kv[0], d_in, d_out).T
        assert rel_err(np.asarray(y[b], np.float64), want) < tol, (b, a)
    # the same rows flattened batch-major to (batch * rows, features): the same result
    flat = make_mixed_adapter_model(
        kernels,
        in_features=d_in,
        out_features=d_out,
        lowering=lowering,
        dtype=dtype,
        input_shape=("batch_rows", "in_features"),
    )
    sess = ort.InferenceSession(flat.SerializeToString(), providers=["CPUExecutionProvider"])
    y2 = sess.run(None, {"x": x.reshape(30, d_in), "adapter_index": index})[0]
    assert np.array_equal(y2.reshape(y.shape), y)


# --------------------------------------------------------------------------------------
# fully trained modules: one head for all adapters, or refused
# --------------------------------------------------------------------------------------
def test_heads(tmp_path: Path) -> None:
    base = tiny_model(
        "bert",
        "classifier",
        vocab_size=VOCAB,
        hidden_size=24,
        num_hidden_layers=1,
        intermediate_size=32,
        initializer_range=0.2,
        num_labels=3,
    )

    class Logits(torch.nn.Module):
        def __init__(self, m: Any) -> None:
            super().__init__()
            self.m = m

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            return self.m(input_ids=input_ids, attention_mask=attention_mask).logits

    model = Logits(base).eval()
    base_path = _export_base_onnx(model, tmp_path / "base.onnx")
    inject_adapters(
        model,
        BCAConfig(
            block_size=8,
            target_modules=["query", "value"],
            init="xavier_uniform",
            modules_to_save=["classifier"],
        ),
    )
    with torch.no_grad():
        model.m.classifier.weight.mul_(-1.5)  # "trained": differs from the base file's
    d1 = save_adapter(model, tmp_path / "h1")
    kernels = [m.bca_kernel for m in model.modules() if hasattr(m, "bca_kernels")]
    with torch.no_grad():
        for k in kernels:
            k.mul_(-2.0)
    d2 = save_adapter(model, tmp_path / "h2")  # same head, other kernels
    with torch.no_grad():
        model.m.classifier.bias.add_(0.5)
    d3 = save_adapter(model, tmp_path / "h3")  # another head
    with pytest.raises(ValueError, match=r"different fully trained parameters.*classifier"):
        patch_model(base_path, [d1, d3], tmp_path / "x.onnx", mixed=True, progress=False)
    out = patch_model(base_path, [d1, d2], tmp_path / "ok.onnx", mixed=True, progress=False)
    # every row uses the adapters' common head, the base slot too
    with torch.no_grad():
        model.m.classifier.bias.sub_(0.5)
    feed = _inputs(3, 6, 9)
    got = _run(_session(out), feed, [1, 0, 2])
    want = []
    with torch.no_grad():
        want.append(model(**feed).double().numpy())  # kernels of h2
        for k in kernels:
            k.mul_(-0.5)
        want.append(model(**feed).double().numpy())  # kernels of h1
        for m in model.modules():
            if hasattr(m, "bca_kernels"):
                m.adapter_enabled = False
        want.append(model(**feed).double().numpy())  # base encoder, common head
    _assert_rows(got, np.stack([want[0][0], want[1][1], want[2][2]]), TOL[torch.float32])
