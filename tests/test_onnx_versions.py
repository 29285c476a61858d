"""Opsets and IR versions of exported graphs, and the onnxruntime version floors.

torch's dynamo exporter works at opset 18: asked for opset 17, its optimizer used to leave
``Split(num_outputs=n)`` (an opset-18 form) in GPT-2's graph, which the ONNX checker
refuses; and it stamps IR 10 on every graph, which onnxruntime 1.17 (IR <= 9) refuses.
Exported graphs must be valid at the opset asked for and declare the lowest IR version
that opset needs.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from conftest import rel_err

ort = pytest.importorskip("onnxruntime")

from bca.onnx._versions import lower_ir_version, min_ir_version, split_to_opset  # noqa: E402

MODEL_TOL = 1e-5


def _session(model: onnx.ModelProto | Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    src = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


def _min_ir(opset: int) -> int:
    return int(helper.find_min_ir_version_for([helper.make_opsetid("", opset)]))


# --------------------------------------------------------------------------------------
# GPT-2 from input_ids alone, through torch's dynamo exporter (the fallback) and the default
# --------------------------------------------------------------------------------------
def _gpt2_adapted() -> object:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from bca.model import BCAConfig, inject_adapters

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=100, n_embd=64, n_layer=2, n_head=2, n_positions=64)
    model = transformers.GPT2Model(cfg).eval()
    inject_adapters(
        model,
        BCAConfig(block_size=16, target_modules=["c_attn", "c_fc"], init="xavier_uniform"),
    )
    return model.eval()


def _export_gpt2(tmp_path: Path, exporter: str, opset: int | None) -> tuple[object, Path]:
    torch = pytest.importorskip("torch")
    if exporter == "dynamo":
        pytest.importorskip("onnxscript")
    from bca.onnx import export_model

    model = _gpt2_adapted()
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(1))
    kwargs = {} if opset is None else {"opset": opset}
    path = export_model(
        model,
        tmp_path / f"gpt2_{exporter}_{opset}.onnx",
        {"input_ids": ids},  # no attention_mask
        exporter=exporter,
        progress=False,
        **kwargs,
    )
    return model, path


def _check_gpt2(model: object, path: Path, opset: int) -> None:
    torch = pytest.importorskip("torch")
    onnx.checker.check_model(str(path), full_check=True)
    got = onnx.load(str(path), load_external_data=False)
    assert [(i.domain, i.version) for i in got.opset_import if i.domain in ("", "ai.onnx")] == [
        ("", opset)
    ]
    # the lowest IR version the opset needs (opset 17 -> IR 8, 20 -> IR 9)
    assert got.ir_version == _min_ir(opset)
    if opset < 18:
        assert not any(
            a.name == "num_outputs"
            for n in got.graph.node
            if n.op_type == "Split"
            for a in n.attribute
        )
    # onnxruntime against torch, at shapes other than the export's (dynamic axes)
    sess = _session(path)
    assert [i.name for i in sess.get_inputs()] == ["input_ids"]
    for k, (b, s) in enumerate([(2, 8), (1, 3), (3, 13)]):
        ids = torch.randint(0, 100, (b, s), generator=torch.Generator().manual_seed(10 + k))
        with torch.no_grad():
            want = model(input_ids=ids).last_hidden_state.double().numpy()  # type: ignore[operator]
        out = sess.run(["last_hidden_state"], {"input_ids": ids.numpy()})[0]
        assert out.shape == want.shape
        assert rel_err(out, want) <= MODEL_TOL, (b, s, rel_err(out, want))


@pytest.mark.parametrize("opset", [None, 20])  # None: export_model's default (17)
def test_gpt2_input_ids_only_dynamo(opset: int | None, tmp_path: Path) -> None:
    from bca.onnx import DEFAULT_OPSET

    model, path = _export_gpt2(tmp_path, "dynamo", opset)
    _check_gpt2(model, path, DEFAULT_OPSET if opset is None else opset)


@pytest.mark.parametrize("opset", [None, 20])
def test_gpt2_input_ids_only_default_exporter(opset: int | None, tmp_path: Path) -> None:
    from bca.onnx import DEFAULT_OPSET

    model, path = _export_gpt2(tmp_path, "auto", opset)
    _check_gpt2(model, path, DEFAULT_OPSET if opset is None else opset)


def test_default_opset_is_17() -> None:
    from bca.onnx import DEFAULT_OPSET

    assert DEFAULT_OPSET == 17  # docs/onnx.md and the CLI say so


# --------------------------------------------------------------------------------------
# the base-graph check: a clear error that says what to pass
# --------------------------------------------------------------------------------------
def _relu_model(opset: int, **attrs: int) -> onnx.ModelProto:
    node = helper.make_node("Relu", ["x"], ["y"], name="r", **attrs)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_base_left_at_another_opset_is_a_clear_error() -> None:
    from bca.onnx._export import _fit_base_to_opset

    # what torch's dynamo exporter leaves when its conversion from opset 18 fails
    with pytest.raises(RuntimeError, match=r"opset 18, not the opset 16 .*pass opset=18"):
        _fit_base_to_opset(_relu_model(18), 16, "dynamo")


def test_base_invalid_at_its_opset_is_a_clear_error() -> None:
    from bca.onnx._export import _fit_base_to_opset

    with pytest.raises(
        RuntimeError, match=r"not valid at opset 17 \(Unrecognized attribute.*exporter='legacy'"
    ):
        _fit_base_to_opset(_relu_model(17, bogus=1), 17, "dynamo")
    _fit_base_to_opset(_relu_model(17), 17, "legacy")  # a valid graph passes


# --------------------------------------------------------------------------------------
# split_to_opset: Split(num_outputs) in the opset-13 form, same results
# --------------------------------------------------------------------------------------
def _split_model(dims: list[int | str], n: int, axis: int, value_info: bool) -> onnx.ModelProto:
    outs = [f"y{i}" for i in range(n)]
    node = helper.make_node("Split", ["x"], outs, name="split", axis=axis, num_outputs=n)
    relus = [helper.make_node("Relu", [o], [f"z{i}"]) for i, o in enumerate(outs)]
    unknown: list[int | str | None] = [None] * len(dims)
    graph = helper.make_graph(
        [node, *relus],
        "g",
        # value_info=False: rank only, no sizes
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims if value_info else unknown)],
        [helper.make_tensor_value_info(f"z{i}", TensorProto.FLOAT, unknown) for i in range(n)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _opset18_reference(x: np.ndarray, n: int, axis: int) -> list[np.ndarray]:
    """Split-18 with num_outputs: chunks of ceil(d / n), the last one smaller."""
    d = x.shape[axis]
    c = -(-d // n)
    return [np.take(x, range(i * c, min(d, (i + 1) * c)), axis=axis) for i in range(n)]


@pytest.mark.parametrize(
    "dims,n,axis,value_info",
    [
        ([2, 3, 12], 3, 2, True),  # even, static: the attribute goes, nothing is added
        ([2, 3, 12], 3, -1, True),
        ([2, 7], 3, 1, True),  # uneven, static: a constant `split` input
        (["b", "d"], 3, 1, True),  # length unknown: the sizes are computed in the graph
        ([2, 7], 3, -1, False),  # no shape at all
        ([5, 4], 1, 0, True),
    ],
)
def test_split_to_opset(dims: list[int | str], n: int, axis: int, value_info: bool) -> None:
    model = _split_model(dims, n, axis, value_info)
    with pytest.raises(onnx.checker.ValidationError, match="num_outputs"):
        onnx.checker.check_model(model)
    assert split_to_opset(model) == 1
    onnx.checker.check_model(model, full_check=True)
    split = next(n_ for n_ in model.graph.node if n_.op_type == "Split")
    assert [a.name for a in split.attribute] == ["axis"]
    even = isinstance(dims[axis], int) and value_info and dims[axis] % n == 0
    assert (len(split.input) == 1) == (even or n == 1)
    sess = _session(model)
    rng = np.random.default_rng(0)
    shapes = [[d if isinstance(d, int) else 7 for d in dims]]
    if not all(isinstance(d, int) for d in dims):
        shapes += [[3, 9], [1, 3], [2, 10]]  # any length along the axis
    for shape in shapes:
        x = rng.standard_normal(shape).astype(np.float32)
        got = sess.run(None, {"x": x})
        want = [np.maximum(p, 0) for p in _opset18_reference(x, n, axis)]
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert g.shape == w.shape and np.array_equal(g, w)


def test_split_to_opset_in_a_subgraph() -> None:
    """A Split(num_outputs) inside an If branch, length unknown: rewritten in place."""
    branch = helper.make_graph(
        [
            helper.make_node("Split", ["x"], ["a", "b"], axis=0, num_outputs=2),
            helper.make_node("Concat", ["b", "a"], ["d"], axis=0),
        ],
        "then",
        [],
        [helper.make_tensor_value_info("d", TensorProto.FLOAT, [None])],
    )
    other = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["e"])],
        "else",
        [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, [None])],
    )
    node = helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=other)
    graph = helper.make_graph(
        [node],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"]),
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    assert split_to_opset(model) == 1
    onnx.checker.check_model(model, full_check=True)
    sess = _session(model)
    for n in (7, 8):  # 7: chunks of 4 and 3 (opset-18 semantics), 8: 4 and 4
        x = np.arange(n, dtype=np.float32)
        (got,) = sess.run(None, {"x": x, "cond": np.array(True)})
        assert np.array_equal(got, np.concatenate([x[4:], x[:4]]))


def test_split_to_opset_leaves_opset_18_and_explicit_splits() -> None:
    m18 = _split_model([2, 7], 3, 1, True)
    m18.opset_import[0].version = 18
    before = m18.SerializeToString()
    assert split_to_opset(m18) == 0
    assert m18.SerializeToString() == before
    # a `split` input already there: only the attribute goes
    m = _split_model([2, 7], 2, 1, True)
    sizes = helper.make_tensor("sizes", TensorProto.INT64, [2], [3, 4])
    m.graph.initializer.append(sizes)
    m.graph.node[0].input.append("sizes")
    assert split_to_opset(m) == 1
    assert list(m.graph.node[0].input) == ["x", "sizes"]
    onnx.checker.check_model(m, full_check=True)


# --------------------------------------------------------------------------------------
# lower_ir_version
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("opset,ir", [(13, 7), (17, 8), (18, 8), (19, 9), (20, 9), (21, 10)])
def test_lower_ir_version(opset: int, ir: int) -> None:
    model = _relu_model(opset)
    model.ir_version = onnx.IR_VERSION
    model.graph.node[0].metadata_props.add(key="pkg.torch.onnx.stack_trace", value="...")
    model.graph.metadata_props.add(key="pkg.torch.export", value="...")
    model.graph.input[0].metadata_props.add(key="k", value="v")
    entry = model.metadata_props.add(key="bca.servable_layout", value="{}")
    assert lower_ir_version(model) == ir == model.ir_version == _min_ir(opset)
    keep = ir >= 10  # IR-10 metadata goes only when the model goes below IR 10
    assert (len(model.graph.node[0].metadata_props) == 1) == keep
    assert (len(model.graph.metadata_props) == 1) == keep
    assert (len(model.graph.input[0].metadata_props) == 1) == keep
    assert list(model.metadata_props) == [entry]  # the model's own metadata stays
    onnx.checker.check_model(model, full_check=True)
    _session(model).run(None, {"x": np.ones(2, np.float32)})


def test_lower_ir_version_keeps_what_the_graph_needs() -> None:
    model = _relu_model(17)
    model.ir_version = onnx.IR_VERSION
    f8 = helper.make_tensor("unused", TensorProto.FLOAT8E4M3FN, [1], [1.0])
    model.graph.initializer.append(f8)
    assert min_ir_version(model) == 9  # float8 came with IR 9
    assert lower_ir_version(model) == 9
    # never raised: a model already lower than its need is left alone
    model = _relu_model(20)
    model.ir_version = 8
    assert lower_ir_version(model) == 8


# --------------------------------------------------------------------------------------
# the ONNX Runtime adapter API exists from onnxruntime 1.20 on
# --------------------------------------------------------------------------------------
def test_adapter_api_needs_onnxruntime_1_20(monkeypatch: pytest.MonkeyPatch) -> None:
    from bca.onnx import AdapterSession, read_ort_adapter

    old = types.ModuleType("onnxruntime")
    old.__version__ = "1.17.3"  # type: ignore[attr-defined]
    old.RunOptions = type("RunOptions", (), {})  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "onnxruntime", old)
    for call in (
        lambda: read_ort_adapter("a.onnx_adapter"),
        lambda: AdapterSession("graph.onnx"),
    ):
        with pytest.raises(
            RuntimeError, match=r"need onnxruntime >= 1\.20.*1\.17\.3.*adapter_feeds"
        ):
            call()
