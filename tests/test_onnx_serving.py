"""Serving many adapters with one servable ONNX graph (docs/onnx.md, "Serving many adapters").

One onnxruntime session of a servable graph serves several adapters chosen per run
(onnxruntime adapter files + RunOptions.add_active_adapter, or plain spectra feeds); each
run equals the corresponding torch model, runs from several threads with different adapters
each get their own adapter's output, a weighted combination equals the merged weights, and
adapters or adapter files for another model, shape, lowering or dtype give a clear error.
Adapters with fully trained modules (modules_to_save: a classification head each) are
served the same way, the head swapped per run; adapters without a head get the base head.
A float16 base model patched (or exported) servable serves its adapters the same way, within
float16 rounding; its spectra are float32, so float32-graph adapter files fit it.
"""

from __future__ import annotations

import copy
import json
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from conftest import TOL, rel_err

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
transformers = pytest.importorskip("transformers")

from bca.cli import main  # noqa: E402
from bca.model import BCAConfig, adapter_modules, inject_adapters, save_adapter  # noqa: E402
from bca.nn import block_circulant_dense  # noqa: E402
from bca.onnx import (  # noqa: E402
    LAYOUT_METADATA_KEY,
    AdapterSession,
    ServableLayout,
    adapter_feeds,
    export_model,
    patch_model,
    read_ort_adapter,
    saved_parameter_name,
    servable_layout,
    spectra_parameter_name,
    write_ort_adapter,
)

HAS_ADAPTER_API = hasattr(ort, "AdapterFormat") and hasattr(ort, "LoraAdapter")
needs_adapter_api = pytest.mark.skipif(
    not HAS_ADAPTER_API, reason="onnxruntime without AdapterFormat/LoraAdapter (< 1.20)"
)

VOCAB = 61
HIDDEN = 24
OUTPUTS = ("last_hidden_state", "pooler_output")


# --------------------------------------------------------------------------------------
# tiny models
# --------------------------------------------------------------------------------------
def _config(hidden: int = HIDDEN) -> Any:
    return transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=40,
        max_position_embeddings=32,
        initializer_range=0.2,  # larger than BERT's 0.02: adapters change outputs visibly
        hidden_act="relu",  # onnxruntime has no float64 Erf (GELU)
    )


def _base(dtype: torch.dtype = torch.float32, hidden: int = HIDDEN, seed: int = 0) -> Any:
    torch.manual_seed(seed)
    return transformers.BertModel(_config(hidden)).to(dtype).eval()


def _adapted(
    base: Any,
    targets: list[str],
    p: int,
    seed: int,
    scale: float = 0.7,
) -> Any:
    """A copy of ``base`` with random (xavier) adapters on ``targets``."""
    model = transformers.BertModel(base.config).to(base.dtype).eval()
    model.load_state_dict(base.state_dict())
    torch.manual_seed(seed)
    inject_adapters(
        model,
        BCAConfig(block_size=p, target_modules=targets, scale=scale, init="xavier_uniform"),
    )
    return model.eval()


def _merged(base: Any, terms: Sequence[tuple[Any, float]]) -> Any:
    """``base`` with ``Σ weight · scale · ΔW`` of every adapter added into its weights."""
    model = transformers.BertModel(base.config).to(base.dtype).eval()
    model.load_state_dict(base.state_dict())
    with torch.no_grad():
        for adapted, weight in terms:
            for name, m in adapter_modules(adapted):
                dw = block_circulant_dense(m.bca_kernel, m.in_features, m.out_features)
                model.get_submodule(name).weight += weight * m.scale * dw
    return model


def _inputs(b: int, s: int, seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, s, dtype=torch.long)
    if b > 1 and s > 2:
        mask[-1, s // 2 :] = 0
    return {"input_ids": torch.randint(0, VOCAB, (b, s), generator=g), "attention_mask": mask}


def _np(feed: dict[str, Any]) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in feed.items()}


def _torch_out(model: Any, feed: dict[str, Any]) -> list[np.ndarray]:
    with torch.no_grad():
        out = model(**feed)
    return [out[k].double().numpy() for k in OUTPUTS]


def _assert_close(got: Sequence[np.ndarray], want: Sequence[np.ndarray], tol: float) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        err = rel_err(g, w)
        assert err <= tol, f"norm-relative error {err:.3g} > {tol:g}"


def _opts() -> Any:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    return opts


def _plain_session(path: Path) -> Any:
    return ort.InferenceSession(str(path), _opts(), providers=["CPUExecutionProvider"])


def _tol(dtype: torch.dtype) -> float:
    return TOL[np.dtype(np.float32 if dtype == torch.float32 else np.float64)]


def _export_base_onnx(base: Any, path: Path) -> Path:
    """A plain base-model ONNX file (legacy exporter), as a user would have."""

    class Wrap(torch.nn.Module):
        def __init__(self, m: Any) -> None:
            super().__init__()
            self.m = m

        def forward(self, input_ids: Any, attention_mask: Any) -> tuple[Any, Any]:
            out = self.m(input_ids=input_ids, attention_mask=attention_mask)
            return out.last_hidden_state, out.pooler_output

    ex = _inputs(2, 6, 0)
    axes = {"input_ids": {0: "b", 1: "s"}, "attention_mask": {0: "b", 1: "s"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Wrap(base).eval(),  # a wrapper in training mode would put base there on exit
            (ex["input_ids"], ex["attention_mask"]),
            str(path),
            dynamo=False,
            input_names=["input_ids", "attention_mask"],
            output_names=list(OUTPUTS),
            dynamic_axes=axes,
            opset_version=17,
        )
    return path


# --------------------------------------------------------------------------------------
# fixtures: one servable graph per dtype with three adapters
# --------------------------------------------------------------------------------------
@dataclass
class Served:
    dtype: Any
    base: Any
    models: dict[str, Any]  # adapter name -> torch model
    dirs: dict[str, Path]  # adapter name -> saved adapter folder
    files: dict[str, Path]  # adapter name -> .onnx_adapter
    graph: Path
    tol: float


@pytest.fixture(scope="module", params=[torch.float32, torch.float64], ids=["f32", "f64"])
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Served:
    dtype = request.param
    tmp = tmp_path_factory.mktemp(f"served_{str(dtype).split('.')[-1]}")
    base = _base(dtype)
    models = {
        "a": _adapted(base, ["query", "value"], 8, seed=1),
        "b": _adapted(base, ["query", "value"], 8, seed=2, scale=1.3),
        "c": _adapted(base, ["query"], 8, seed=3),  # a subset of the layers
    }
    dirs = {k: save_adapter(m, tmp / f"dir_{k}") for k, m in models.items()}
    graph = export_model(
        models["a"], tmp / "servable.onnx", _inputs(2, 6, 0), servable=True, progress=False
    )
    files: dict[str, Path] = {}
    if HAS_ADAPTER_API:
        for k in models:  # from the torch model and from the saved folder: the same file
            src = models[k] if k == "a" else dirs[k]
            files[k] = write_ort_adapter(src, graph, tmp / f"{k}.onnx_adapter")
    return Served(dtype, base, models, dirs, files, graph, _tol(dtype))


# --------------------------------------------------------------------------------------
# the graph and its layout
# --------------------------------------------------------------------------------------
def test_layout_recorded(served: Served) -> None:
    layout = servable_layout(served.graph)
    model = onnx.load(str(served.graph))
    onnx.checker.check_model(model, full_check=True)
    modules = [
        f"encoder.layer.{i}.attention.self.{n}" for i in range(2) for n in ("query", "value")
    ]
    assert sorted(layout.modules) == sorted(modules)
    assert layout.default == "zeros"
    inputs = {i.name for i in model.graph.input}
    inits = {t.name: t for t in model.graph.initializer}
    want_dtype = "float32" if served.dtype == torch.float32 else "float64"
    for layer in layout.layers:
        assert layer.parameter == spectra_parameter_name(layer.module)
        assert layer.parameter == f"bca.{layer.module}.spectra"
        assert layer.parameter in inputs and layer.parameter in inits
        assert layer.shape == (5, 6, 6)  # (p/2 + 1, 2 q_in, 2 q_out) at p = 8, width 24
        assert (layer.block_size, layer.in_features, layer.out_features) == (8, HIDDEN, HIDDEN)
        assert layer.lowering == "matmul" and layer.dtype == want_dtype
        assert not onnx.numpy_helper.to_array(inits[layer.parameter]).any()  # zeros
    doc = json.loads(next(p.value for p in model.metadata_props if p.key == LAYOUT_METADATA_KEY))
    assert doc["layout_hash"] == layout.layout_hash
    assert doc["model_version"] == layout.model_version
    assert ServableLayout.from_json(layout.to_json()) == layout
    # session inputs: the model's real inputs only; the spectra are overridable
    sess = _plain_session(served.graph)
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask"]
    assert sorted(i.name for i in sess.get_overridable_initializers()) == sorted(
        layout.parameter_names
    )


def test_zero_default_is_base_model(served: Served) -> None:
    sess = _plain_session(served.graph)
    for k, (b, s) in enumerate([(1, 3), (3, 7)]):
        feed = _inputs(b, s, 20 + k)
        _assert_close(sess.run(list(OUTPUTS), _np(feed)), _torch_out(served.base, feed), served.tol)


# --------------------------------------------------------------------------------------
# switching adapters per run
# --------------------------------------------------------------------------------------
@needs_adapter_api
def test_switch_adapters_per_run(served: Served) -> None:
    sess = AdapterSession(served.graph, sess_options=_opts())
    for name, path in served.files.items():
        sess.load_adapter(name, path)
    assert sess.adapter_names == ["a", "b", "c"]
    assert sess.input_names == ["input_ids", "attention_mask"]
    refs = {**served.models, None: served.base}
    order: list[str | None] = ["a", "b", None, "c", "a", "a", None, "b", "c", "b", "a"]
    for k, name in enumerate(order):
        feed = _inputs(1 + k % 3, 3 + k % 5, 100 + k)
        got = sess.run(list(OUTPUTS), _np(feed), adapter=name)
        _assert_close(got, _torch_out(refs[name], feed), served.tol)
    # the adapters really differ: a run with the wrong one would be caught above
    feed = _inputs(2, 5, 7)
    outs = {n: sess.run(["last_hidden_state"], _np(feed), adapter=n)[0] for n in refs}
    for x in outs:
        for y in outs:
            if x != y:
                assert rel_err(outs[x], outs[y]) > 100 * served.tol
    sess.unload_adapter("c")
    assert sess.adapter_names == ["a", "b"]
    with pytest.raises(KeyError, match="no adapter named 'c'"):
        sess.run(None, _np(feed), adapter="c")


def test_switch_with_plain_feeds(served: Served) -> None:
    """No adapter API: the same graph takes the spectra as ordinary inputs."""
    sess = _plain_session(served.graph)
    layout = servable_layout(served.graph)
    feeds = {k: adapter_feeds(d, layout) for k, d in served.dirs.items()}
    feeds["a_torch"] = adapter_feeds(served.models["a"], served.graph)
    for name in ("a", "b", "c"):
        assert sorted(feeds[name]) == sorted(layout.parameter_names)  # every layer, always
    c_value = feeds["c"][spectra_parameter_name("encoder.layer.0.attention.self.value")]
    assert not c_value.any()  # c adapts no value layer: zeros
    for n in feeds["a"]:
        np.testing.assert_array_equal(feeds["a"][n], feeds["a_torch"][n])
    refs = {"a": served.models["a"], "b": served.models["b"], "c": served.models["c"]}
    for k, name in enumerate(["b", "a", "c", "b", "base", "a"]):
        feed = _inputs(2, 4 + k, 200 + k)
        extra = layout.zero_feeds() if name == "base" else feeds[name]
        want = _torch_out(served.base if name == "base" else refs[name], feed)
        _assert_close(sess.run(list(OUTPUTS), {**_np(feed), **extra}), want, served.tol)


@needs_adapter_api
def test_threads_each_get_their_adapter(served: Served) -> None:
    """Several threads share one session, each running its own adapter many times."""
    sess = AdapterSession(served.graph, sess_options=_opts())
    for name, path in served.files.items():
        sess.load_adapter(name, path)
    refs = {**served.models, None: served.base}
    feeds = [_inputs(2, 5, 300 + k) for k in range(3)]
    want = {(n, k): _torch_out(m, f) for n, m in refs.items() for k, f in enumerate(feeds)}
    names: list[str | None] = ["a", "b", "c", None, "b", "a"]
    errors: list[str] = []
    start = threading.Barrier(len(names))

    def worker(t: int) -> None:
        start.wait()
        for i in range(30):
            name = names[(t + i) % len(names)] if t % 2 else names[t]  # fixed or rotating
            k = (t + i) % len(feeds)
            got = sess.run(list(OUTPUTS), _np(feeds[k]), adapter=name)
            for g, w in zip(got, want[(name, k)], strict=True):
                err = rel_err(g, w)
                if err > served.tol:
                    errors.append(f"thread {t} iter {i} adapter {name}: error {err:.3g}")

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(len(names))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors[:5]


# --------------------------------------------------------------------------------------
# combined adapters
# --------------------------------------------------------------------------------------
@needs_adapter_api
def test_combined_adapter_equals_merged_weights(served: Served, tmp_path: Path) -> None:
    terms = [(served.models["a"], 0.5), (served.models["b"], -1.25), (served.models["c"], 2.0)]
    merged = _merged(served.base, terms)
    mix = [(served.models["a"], 0.5), (served.dirs["b"], -1.25), (served.dirs["c"], 2.0)]
    path = write_ort_adapter(mix, served.graph, tmp_path / "mix.onnx_adapter", adapter_version=3)
    fmt = ort.AdapterFormat.read_adapter(str(path))
    assert fmt.get_adapter_version() == 3
    assert fmt.get_model_version() == servable_layout(served.graph).model_version
    sess = AdapterSession(served.graph, sess_options=_opts())
    sess.load_adapter("mix", path)
    for k in range(2):
        feed = _inputs(2, 5, 400 + k)
        want = _torch_out(merged, feed)
        _assert_close(sess.run(list(OUTPUTS), _np(feed), adapter="mix"), want, served.tol)
        fed = {**_np(feed), **adapter_feeds(mix, served.graph)}
        _assert_close(sess.run(list(OUTPUTS), fed), want, served.tol)


@needs_adapter_api
def test_ort_does_not_add_active_adapters(served: Served) -> None:
    """Raw onnxruntime with two active adapters of the same parameters does not add them
    (1.32: the first one added wins, silently); AdapterSession activates one per run and
    refuses a RunOptions that already carries an adapter, and spectra feeds together with
    an active adapter (which onnxruntime would ignore, silently)."""
    sess = _plain_session(served.graph)
    a = ort.LoraAdapter()
    a.Load(str(served.files["a"]))
    b = ort.LoraAdapter()
    b.Load(str(served.files["b"]))
    feed = _inputs(2, 5, 500)
    ro = ort.RunOptions()
    ro.add_active_adapter(a)
    ro.add_active_adapter(b)
    both = sess.run(["last_hidden_state"], _np(feed), ro)[0]
    summed = _torch_out(
        _merged(served.base, [(served.models["a"], 1), (served.models["b"], 1)]), feed
    )
    assert rel_err(both, summed[0]) > 1e-2  # not the sum
    single = [_torch_out(served.models[n], feed)[0] for n in ("a", "b")]
    assert min(rel_err(both, s) for s in single) <= served.tol  # one of them

    ses = AdapterSession(served.graph, sess_options=_opts())
    ses.load_adapter("a", served.files["a"])
    ses.load_adapter("b", served.files["b"])
    ro = ort.RunOptions()
    ses.run(None, _np(feed), adapter="a", run_options=ro)
    with pytest.raises(ValueError, match="fresh RunOptions"):
        ses.run(None, _np(feed), adapter="b", run_options=ro)
    with pytest.raises(ValueError, match="fresh RunOptions"):
        ses.run(None, _np(feed), run_options=ro)
    spectra = adapter_feeds(served.dirs["b"], served.graph)
    with pytest.raises(ValueError, match="use one or the other"):
        ses.run(None, {**_np(feed), **spectra}, adapter="a")
    # without an adapter, spectra feeds are the plain-feeds path
    got = ses.run(["last_hidden_state"], {**_np(feed), **spectra})[0]
    assert rel_err(got, single[1]) <= served.tol


# --------------------------------------------------------------------------------------
# defaults, padding, lowerings (servable graphs made by patching a base ONNX file)
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def patched(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("patched")
    base = _base()
    base_onnx = _export_base_onnx(base, tmp / "base.onnx")
    # p = 16 does not divide 24: padded; 16 = 4 x 4 gives a real two-stage "matmul2"
    models = {
        "x": _adapted(base, ["query", "value"], 16, seed=11),
        "y": _adapted(base, ["query", "value"], 16, seed=12, scale=0.4),
    }
    dirs = {k: save_adapter(m, tmp / f"dir_{k}") for k, m in models.items()}
    return {"tmp": tmp, "base": base, "base_onnx": base_onnx, "models": models, "dirs": dirs}


@pytest.mark.parametrize("lowering", ["dft", "matmul", "matmul2"])
def test_lowerings_and_padding(lowering: str, patched: dict[str, Any]) -> None:
    tmp: Path = patched["tmp"]
    graph = patch_model(
        patched["base_onnx"],
        patched["dirs"]["x"],
        tmp / f"servable_{lowering}.onnx",
        lowering=lowering,
        servable=True,
        progress=False,
    )
    layout = servable_layout(graph)
    assert {x.lowering for x in layout.layers} == {lowering}
    assert {x.block_size for x in layout.layers} == {16}
    # dft lowering: ORT's DFT for p = 16 (a power of two) is exact to float32 rounding
    tol = 1e-5
    sess = _plain_session(graph)
    refs = {"x": patched["models"]["x"], "y": patched["models"]["y"], None: patched["base"]}
    feeds = {k: adapter_feeds(d, layout) for k, d in patched["dirs"].items()}
    if HAS_ADAPTER_API:
        files = {
            k: write_ort_adapter(d, layout, tmp / f"{lowering}_{k}.onnx_adapter")
            for k, d in patched["dirs"].items()
        }
        ases = AdapterSession(graph, sess_options=_opts())
        for k, f in files.items():
            ases.load_adapter(k, f)
    for k, name in enumerate(["x", None, "y", "x"]):
        feed = _inputs(2, 3 + k, 600 + k)
        want = _torch_out(refs[name], feed)
        extra = layout.zero_feeds() if name is None else feeds[name]
        _assert_close(sess.run(list(OUTPUTS), {**_np(feed), **extra}), want, tol)
        if HAS_ADAPTER_API:
            _assert_close(ases.run(list(OUTPUTS), _np(feed), adapter=name), want, tol)


def test_adapter_default_and_several_dirs(patched: dict[str, Any]) -> None:
    """servable_default="adapter" stores the given adapters (two folders: their sum);
    AdapterSession(adapter=None) is still the base model."""
    tmp: Path = patched["tmp"]
    graph = patch_model(
        patched["base_onnx"],
        [patched["dirs"]["x"], patched["dirs"]["y"]],
        tmp / "servable_sum.onnx",
        servable=True,
        servable_default="adapter",
        progress=False,
    )
    layout = servable_layout(graph)
    assert layout.default == "adapter" and len(layout.layers) == 4
    models = patched["models"]
    both = _merged(patched["base"], [(models["x"], 1.0), (models["y"], 1.0)])
    feed = _inputs(2, 5, 700)
    sess = _plain_session(graph)
    _assert_close(sess.run(list(OUTPUTS), _np(feed)), _torch_out(both, feed), 1e-5)
    fed = {**_np(feed), **adapter_feeds(patched["dirs"]["y"], layout)}
    _assert_close(sess.run(list(OUTPUTS), fed), _torch_out(models["y"], feed), 1e-5)
    if HAS_ADAPTER_API:
        ases = AdapterSession(graph, sess_options=_opts())
        _assert_close(ases.run(list(OUTPUTS), _np(feed)), _torch_out(patched["base"], feed), 1e-5)


def test_export_adapter_default(tmp_path: Path) -> None:
    """export_model(servable_default="adapter"): the graph alone is the adapted model."""
    base = _base(seed=5)
    model = _adapted(base, ["value"], 12, seed=13)  # p = 12: 24 = 2 blocks, F = 7
    graph = export_model(
        model,
        tmp_path / "g.onnx",
        _inputs(2, 6, 0),
        mode="matmul2",  # no factor 4 <= a <= sqrt(12): falls back to "matmul", recorded
        servable=True,
        servable_default="adapter",
        progress=False,
    )
    layout = servable_layout(graph)
    assert [x.lowering for x in layout.layers] == ["matmul", "matmul"]
    assert layout.default == "adapter"
    feed = _inputs(3, 4, 800)
    sess = _plain_session(graph)
    _assert_close(sess.run(list(OUTPUTS), _np(feed)), _torch_out(model, feed), 1e-5)
    fed = {**_np(feed), **layout.zero_feeds()}
    _assert_close(sess.run(list(OUTPUTS), fed), _torch_out(base, feed), 1e-5)


def test_export_servable_refusals(tmp_path: Path) -> None:
    base = _base()
    model = _adapted(base, ["query"], 8, seed=1)
    ex = _inputs(2, 6, 0)
    with pytest.raises(ValueError, match="folded"):
        export_model(model, tmp_path / "g.onnx", ex, mode="folded", servable=True, progress=False)
    with pytest.raises(ValueError, match="servable_default"):
        export_model(model, tmp_path / "g.onnx", ex, servable=True, servable_default="base")
    with_head = transformers.BertModel(base.config).eval()
    inject_adapters(
        with_head, BCAConfig(block_size=8, target_modules=["query"], modules_to_save=["pooler"])
    )
    with pytest.raises(ValueError, match="modules_to_save.*servable_base"):
        export_model(with_head, tmp_path / "h.onnx", ex, servable=True, progress=False)


# --------------------------------------------------------------------------------------
# adapters or files for another model, shape, lowering or dtype
# --------------------------------------------------------------------------------------
def test_adapter_dir_mismatches(served: Served, tmp_path: Path) -> None:
    base = served.base
    graph = served.graph
    # another block size
    p4 = save_adapter(_adapted(base, ["query"], 4, seed=21), tmp_path / "p4")
    with pytest.raises(ValueError, match=r"encoder\.layer\.0\.attention\.self\.query") as e:
        adapter_feeds(p4, graph)
    assert "block_size=4" in str(e.value) and "block_size=8" in str(e.value)
    assert "(6, 6, 4)" in str(e.value) and "(3, 3, 8)" in str(e.value)
    # another hidden size (another model)
    wide = save_adapter(
        _adapted(_base(served.dtype, hidden=32), ["query"], 8, seed=22), tmp_path / "wide"
    )
    with pytest.raises(ValueError, match="in_features=32") as e:
        adapter_feeds(wide, graph)
    assert "in_features=24" in str(e.value)
    # a module the graph has no slot for
    key = save_adapter(_adapted(base, ["key"], 8, seed=23), tmp_path / "key")
    with pytest.raises(ValueError, match=r"attention\.self\.key.*no adapter slot"):
        adapter_feeds(key, graph)
    with pytest.raises(ValueError, match="no adapter slot"):
        adapter_feeds([(served.dirs["a"], 1.0), (key, 1.0)], graph)
    # another dtype
    other = torch.float64 if served.dtype == torch.float32 else torch.float32
    typed = save_adapter(_adapted(_base(other), ["query"], 8, seed=24), tmp_path / "typed")
    with pytest.raises(ValueError, match="kernel dtype"):
        adapter_feeds(typed, graph)
    if HAS_ADAPTER_API:
        with pytest.raises(ValueError, match="block_size=4"):
            write_ort_adapter(p4, graph, tmp_path / "never.onnx_adapter")
        assert not (tmp_path / "never.onnx_adapter").exists()
    # malformed weighted lists and inputs
    with pytest.raises(ValueError, match="empty"):
        adapter_feeds([], graph)
    with pytest.raises(TypeError, match="pairs"):
        adapter_feeds([served.dirs["a"]], graph)  # type: ignore[list-item]
    with pytest.raises(ValueError, match="finite"):
        adapter_feeds([(served.dirs["a"], float("nan"))], graph)
    with pytest.raises(TypeError, match="saved adapter directory"):
        adapter_feeds(42, graph)  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError):
        adapter_feeds(tmp_path / "nope", graph)


def _export_other(
    tmp: Path, name: str, base: Any, p: int, mode: str = "auto", targets: list[str] | None = None
) -> tuple[Path, Any]:
    model = _adapted(base, targets or ["query", "value"], p, seed=31)
    graph = export_model(
        model, tmp / f"{name}.onnx", _inputs(2, 6, 0), mode=mode, servable=True, progress=False
    )
    return graph, model


@needs_adapter_api
def test_adapter_file_mismatches(served: Served, tmp_path: Path) -> None:
    sess = AdapterSession(served.graph, sess_options=_opts())
    feed = _np(_inputs(2, 5, 900))
    # a file for another model (hidden 32): same parameter names, other shapes
    wide_graph, wide = _export_other(tmp_path, "wide", _base(served.dtype, hidden=32), 8)
    wide_file = write_ort_adapter(wide, wide_graph, tmp_path / "wide.onnx_adapter")
    with pytest.raises(ValueError, match="expects") as e:
        sess.load_adapter("wide", wide_file)
    msg = str(e.value)
    assert "encoder.layer.0.attention.self.query" in msg and "(5, 8, 8)" in msg
    assert "(5, 6, 6)" in msg
    with pytest.raises(ValueError, match="expects"):
        read_ort_adapter(wide_file, served.graph)
    # raw onnxruntime with that file: an error at run time, never an answer
    raw = _plain_session(served.graph)
    lora = ort.LoraAdapter()
    lora.Load(str(wide_file))
    ro = ort.RunOptions()
    ro.add_active_adapter(lora)
    with pytest.raises(Exception, match="(?i)dimension"):
        raw.run(None, feed, ro)
    # another block size: p = 4 gives spectra (3, 12, 12)
    p4_graph, p4 = _export_other(tmp_path, "p4", served.base, 4)
    p4_file = write_ort_adapter(p4, p4_graph, tmp_path / "p4.onnx_adapter")
    with pytest.raises(ValueError, match=r"\(3, 12, 12\)"):
        sess.load_adapter("p4", p4_file)
    # a graph with only the query layers: the file lacks the value layers
    q_graph, q = _export_other(tmp_path, "q", served.base, 8, targets=["query"])
    q_file = write_ort_adapter(q, q_graph, tmp_path / "q.onnx_adapter")
    with pytest.raises(ValueError, match=r"lacks the spectra of module\(s\)"):
        sess.load_adapter("q", q_file)
    # ... and the other way round: a file with layers this graph lacks
    q_sess = AdapterSession(q_graph, sess_options=_opts())
    with pytest.raises(ValueError, match="does not have"):
        q_sess.load_adapter("a", served.files["a"])
    # another dtype (spectra written by hand)
    layout = servable_layout(served.graph)
    other = np.float64 if layout.layers[0].dtype == "float32" else np.float32
    arrays = {k: v.astype(other) for k, v in layout.zero_feeds().items()}
    typed = _write_raw(tmp_path / "typed.onnx_adapter", arrays, layout.model_version)
    with pytest.raises(ValueError, match=np.dtype(other).name):
        sess.load_adapter("typed", typed)
    lora = ort.LoraAdapter()
    lora.Load(str(typed))
    ro = ort.RunOptions()
    ro.add_active_adapter(lora)
    with pytest.raises(Exception, match="(?i)type"):
        raw.run(None, feed, ro)
    # not an adapter file at all
    with pytest.raises(ValueError, match="not a readable ONNX Runtime adapter file"):
        sess.load_adapter("junk", served.graph)
    with pytest.raises(FileNotFoundError):
        sess.load_adapter("missing", tmp_path / "missing.onnx_adapter")
    assert sess.adapter_names == []


@needs_adapter_api
def test_same_shapes_other_lowering(served: Served, tmp_path: Path) -> None:
    """The "dft" and "matmul" lowerings have spectra of equal shapes but other scaling:
    raw onnxruntime silently computes a wrong answer with a file written for the other
    graph; the model version in the file lets AdapterSession refuse it."""
    dft_graph, _ = _export_other(tmp_path, "dft", served.base, 8, mode="dft")
    dft_layout = servable_layout(dft_graph)
    layout = servable_layout(served.graph)
    assert [x.shape for x in dft_layout.layers] == [x.shape for x in layout.layers]
    assert dft_layout.model_version != layout.model_version
    for_dft = write_ort_adapter(served.dirs["b"], dft_graph, tmp_path / "b_dft.onnx_adapter")
    sess = AdapterSession(served.graph, sess_options=_opts())
    with pytest.raises(ValueError, match="another servable graph"):
        sess.load_adapter("b", for_dft)
    with pytest.raises(ValueError, match="model version"):
        read_ort_adapter(for_dft, served.graph)
    raw = _plain_session(served.graph)
    lora = ort.LoraAdapter()
    lora.Load(str(for_dft))
    ro = ort.RunOptions()
    ro.add_active_adapter(lora)
    feed = _inputs(2, 5, 950)
    wrong = raw.run(["last_hidden_state"], _np(feed), ro)[0]
    assert rel_err(wrong, _torch_out(served.models["b"], feed)[0]) > 1e-2
    assert read_ort_adapter(for_dft).keys() == set(layout.parameter_names)  # no check: reads


def _write_raw(path: Path, arrays: dict[str, np.ndarray], model_version: int) -> Path:
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(model_version)
    keep = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in keep.items()})
    fmt.export_adapter(str(path))
    return path


def test_not_servable_and_tampered(served: Served, tmp_path: Path) -> None:
    plain = export_model(
        served.models["a"], tmp_path / "plain.onnx", _inputs(2, 6, 0), progress=False
    )
    with pytest.raises(ValueError, match="not a servable bca graph"):
        servable_layout(plain)
    with pytest.raises(ValueError, match="not a servable bca graph"):
        adapter_feeds(served.dirs["a"], plain)
    if HAS_ADAPTER_API:
        with pytest.raises(ValueError, match="not a servable bca graph"):
            AdapterSession(plain)
    model = onnx.load(str(served.graph))
    entry = next(p for p in model.metadata_props if p.key == LAYOUT_METADATA_KEY)
    doc = json.loads(entry.value)
    doc["layers"][0]["block_size"] = 4
    entry.value = json.dumps(doc)
    with pytest.raises(ValueError, match="hash"):
        servable_layout(model)
    # hostile metadata: JSON nested far deeper than Python's recursion limit
    nest = "[" * 100_000 + "]" * 100_000
    for deep in (nest, '{"format": ' + nest + "}"):
        entry.value = deep
        with pytest.raises(ValueError, match="nested too deeply"):
            servable_layout(model)
    # a spectra input removed from the graph inputs (no longer overridable)
    model = onnx.load(str(served.graph))
    keep = [i for i in model.graph.input if not i.name.endswith(".spectra")]
    del model.graph.input[:]
    model.graph.input.extend(keep)
    with pytest.raises(ValueError, match="not an overridable initializer"):
        servable_layout(model)
    # making a servable graph servable again
    with pytest.raises(ValueError, match="servable graph already"):
        patch_model(served.graph, served.dirs["a"], tmp_path / "again.onnx", servable=True)


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------
@needs_adapter_api
def test_cli_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = _base(seed=7)
    folder = tmp_path / "base_model"
    base.save_pretrained(folder)
    models = {
        "ad_one": _adapted(base, ["query", "value"], 8, seed=41),
        "ad_two": _adapted(base, ["query"], 8, seed=42, scale=2.0),
    }
    dirs = {k: save_adapter(m, tmp_path / k) for k, m in models.items()}
    graph = tmp_path / "servable.onnx"
    run: Callable[..., int] = lambda *argv: main([str(a) for a in argv])  # noqa: E731
    assert run("serve", "export", dirs["ad_one"], "--base", folder, "-o", graph) == 0
    assert "servable: 4 layers, default zeros" in capsys.readouterr().out
    out_dir = tmp_path / "adapters"
    assert run("serve", "adapter", *dirs.values(), "--graph", graph, "--out-dir", out_dir) == 0
    assert run(
        "serve", "adapter", *dirs.values(), "--graph", graph, "--out-dir", out_dir,
        "--combine", "mix", "--weights", "0.5,-1",
    ) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert printed.count("wrote ") == 3
    assert run("serve", "info", graph) == 0
    info = capsys.readouterr().out
    assert "encoder.layer.1.attention.self.value" in info and "matmul" in info
    assert run("serve", "info", graph, "--json") == 0
    assert json.loads(capsys.readouterr().out)["default"] == "zeros"

    sess = AdapterSession(graph, sess_options=_opts())
    for name in ("ad_one", "ad_two", "mix"):
        sess.load_adapter(name, out_dir / f"{name}.onnx_adapter")
    mix = _merged(base, [(models["ad_one"], 0.5), (models["ad_two"], -1.0)])
    refs = {**models, "mix": mix, None: base}
    for k, name in enumerate(["ad_one", "mix", None, "ad_two"]):
        feed = _inputs(2, 4, 1000 + k)
        got = sess.run(list(OUTPUTS), _np(feed), adapter=name)
        _assert_close(got, _torch_out(refs[name], feed), 1e-5)

    # the patch form: a servable graph from a base ONNX file and adapter folders
    base_onnx = _export_base_onnx(base, tmp_path / "base.onnx")
    patched = tmp_path / "patched.onnx"
    assert (
        run("serve", "export", "--patch", base_onnx, *dirs.values(), "-o", patched, "--mode", "dft")
        == 0
    )
    capsys.readouterr()
    layout = servable_layout(patched)
    assert {x.lowering for x in layout.layers} == {"dft"} and len(layout.layers) == 4
    # files written for the exported graph do not fit the patched one (other lowering)
    code = run("serve", "adapter", dirs["ad_one"], "--graph", patched, "--out-dir", out_dir)
    assert code == 0  # written anew for this graph: fine
    capsys.readouterr()
    psess = AdapterSession(patched, sess_options=_opts())
    psess.load_adapter("one", out_dir / "ad_one.onnx_adapter")
    feed = _inputs(2, 4, 1100)
    _assert_close(
        psess.run(list(OUTPUTS), _np(feed), adapter="one"),
        _torch_out(models["ad_one"], feed),
        1e-5,
    )
    with pytest.raises(ValueError, match="another servable graph"):
        sess.load_adapter("stale", out_dir / "ad_one.onnx_adapter")


def _one_line_error(code: int, capsys: pytest.CaptureFixture[str], *needles: str) -> None:
    assert code == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert err.startswith("bca serve: error:") and "Traceback" not in err
    for n in needles:
        assert n in err, err


def test_cli_errors(served: Served, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve"]) == 2
    assert "name a command" in capsys.readouterr().err
    for argv in (
        ["serve", "--help"],
        ["serve", "export", "--help"],
        ["serve", "adapter", "--help"],
    ):
        assert main(argv) == 0
        assert "usage: bca serve" in capsys.readouterr().out
    assert main(["serve", "adapter", str(served.dirs["a"])]) == 2  # --graph, --out-dir missing
    capsys.readouterr()
    p4 = save_adapter(_adapted(served.base, ["query"], 4, seed=51), tmp_path / "p4")
    out = tmp_path / "out"
    argv = ["serve", "adapter", str(served.dirs["a"]), str(p4), "--graph", str(served.graph)]
    _one_line_error(main([*argv, "--out-dir", str(out)]), capsys, "block_size=4", "block_size=8")
    assert not out.exists() or not list(out.iterdir())  # checked all before writing any
    _one_line_error(
        main(["serve", "adapter", str(p4), "--graph", str(tmp_path / "no.onnx"), "--out-dir", "x"]),
        capsys,
        "no such file",
    )
    plain = tmp_path / "plain.onnx"
    plain.write_bytes(served.graph.read_bytes())
    model = onnx.load(str(plain))
    del model.metadata_props[:]
    onnx.save(model, str(plain))
    _one_line_error(main(["serve", "info", str(plain)]), capsys, "not a servable bca graph")
    _one_line_error(
        main([*argv[:3], "--graph", str(served.graph), "--out-dir", str(out), "--weights", "1"]),
        capsys,
        "--combine",
    )
    _one_line_error(
        main(["serve", "export", str(served.dirs["a"]), "-o", str(tmp_path / "x.bin")]),
        capsys,
        ".onnx",
    )


# --------------------------------------------------------------------------------------
# torch models with several named adapters (bca.model.add_adapter / set_adapter)
# --------------------------------------------------------------------------------------
def test_named_torch_adapters_export_and_serve(tmp_path: Path) -> None:
    from bca.model import add_adapter, set_adapter

    base = _base()
    model = transformers.BertModel(base.config).eval()
    model.load_state_dict(base.state_dict())
    torch.manual_seed(5)
    inject_adapters(
        model,
        BCAConfig(block_size=8, target_modules=["query", "value"], init="xavier_uniform"),
        adapter_name="a",
    )
    add_adapter(
        model,
        "b",
        BCAConfig(block_size=8, target_modules=["query"], scale=1.3, init="xavier_uniform"),
    )
    add_adapter(
        model, "c", BCAConfig(block_size=4, target_modules=["value"], init="xavier_uniform")
    )
    feed = _inputs(2, 6, 3)
    tol = _tol(torch.float32)

    # several active adapters of one block size export as their weighted sum
    set_adapter(model, ["a", "b"], [1.0, -0.5])
    want = _torch_out(model, feed)
    path = export_model(model, tmp_path / "ab.onnx", _inputs(2, 6, 0), progress=False)
    _assert_close(_plain_session(path).run(list(OUTPUTS), _np(feed)), want, tol)

    # a servable graph of the same layers takes them as one set of feeds or one file
    graph = export_model(
        model, tmp_path / "servable.onnx", _inputs(2, 6, 0), servable=True, progress=False
    )
    sess = _plain_session(graph)
    got = sess.run(list(OUTPUTS), {**_np(feed), **adapter_feeds(model, graph)})
    _assert_close(got, want, tol)
    served = AdapterSession(graph, sess_options=_opts())
    for names in (["a"], ["b"], ["a", "b"]):
        set_adapter(model, names)
        out = tmp_path / f"{'+'.join(names)}.onnx_adapter"
        served.load_adapter("+".join(names), write_ort_adapter(model, graph, out))
    for names in (["b"], ["a", "b"], ["a"]):
        set_adapter(model, names)
        got = served.run(list(OUTPUTS), _np(feed), adapter="+".join(names))
        _assert_close(got, _torch_out(model, feed), tol)

    # active adapters of different block sizes: no single kernel, a clear error
    set_adapter(model, ["a", "c"])
    with pytest.raises(ValueError, match="different block sizes"):
        export_model(model, tmp_path / "ac.onnx", _inputs(2, 6, 0), progress=False)
    with pytest.raises(ValueError, match="different block sizes"):
        adapter_feeds(model, graph)
    # ... but they fold into the base weights
    folded = export_model(
        model, tmp_path / "ac_folded.onnx", _inputs(2, 6, 0), mode="folded", progress=False
    )
    got = _plain_session(folded).run(list(OUTPUTS), _np(feed))
    _assert_close(got, _torch_out(model, feed), tol)


@needs_adapter_api
def test_rewriting_a_loaded_adapter_file_keeps_the_session_right(
    served: Served, tmp_path: Path
) -> None:
    """onnxruntime memory-maps adapter files: write_ort_adapter replaces them atomically."""
    path = write_ort_adapter(served.dirs["a"], served.graph, tmp_path / "live.onnx_adapter")
    sess = AdapterSession(served.graph, sess_options=_opts())
    sess.load_adapter("live", path)
    feed = _inputs(2, 6, 4)
    want_a = _torch_out(served.models["a"], feed)
    _assert_close(sess.run(list(OUTPUTS), _np(feed), adapter="live"), want_a, served.tol)
    write_ort_adapter(served.dirs["b"], served.graph, path)  # same path, another adapter
    _assert_close(sess.run(list(OUTPUTS), _np(feed), adapter="live"), want_a, served.tol)
    sess.load_adapter("new", path)
    want_b = _torch_out(served.models["b"], feed)
    _assert_close(sess.run(list(OUTPUTS), _np(feed), adapter="new"), want_b, served.tol)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["live.onnx_adapter"]  # no temp left


# --------------------------------------------------------------------------------------
# adapters with fully trained modules (modules_to_save): one classification head each
# --------------------------------------------------------------------------------------
LABELS = 3
HEAD = ("classifier.weight", "classifier.bias")


def _cls_base(
    dtype: torch.dtype = torch.float32, seed: int = 0, labels: int = LABELS, kind: str = "seq"
) -> Any:
    """A tiny BERT classifier (sequence or token classification) with a non-zero base head
    (exporters merge equal tensors, such as all-zero biases, into one initializer)."""
    cls = (
        transformers.BertForSequenceClassification
        if kind == "seq"
        else transformers.BertForTokenClassification
    )
    cfg = _config()
    cfg.num_labels = labels
    torch.manual_seed(seed)
    model = cls(cfg).to(dtype).eval()
    with torch.no_grad():
        model.classifier.bias.normal_(0.0, 0.5)
    return model


def _cls_adapted(
    base: Any,
    targets: list[str],
    p: int,
    seed: int,
    *,
    head: bool = True,
    scale: float = 0.7,
    save: Sequence[str] = ("classifier",),
) -> Any:
    """A copy of ``base`` with random adapters on ``targets`` and, with ``head``, a
    ("trained") random classifier head in ``modules_to_save``."""
    model = type(base)(base.config).to(base.dtype).eval()
    model.load_state_dict(base.state_dict())
    torch.manual_seed(seed)
    inject_adapters(
        model,
        BCAConfig(
            block_size=p,
            target_modules=targets,
            scale=scale,
            init="xavier_uniform",
            modules_to_save=list(save) if head else [],
        ),
    )
    if head:
        with torch.no_grad():
            for name in save:
                for param in model.get_submodule(name).parameters():
                    param.normal_(0.0, 0.5)
    return model.eval()


def _logits(model: Any, feed: dict[str, Any]) -> list[np.ndarray]:
    with torch.no_grad():
        return [model(**feed).logits.double().numpy()]


@dataclass
class Headed:
    dtype: Any
    base: Any
    models: dict[str, Any]  # "h1", "h2": with heads; "n": without
    dirs: dict[str, Path]
    files: dict[str, Path]
    graph: Path
    tol: float


@pytest.fixture(scope="module", params=[torch.float32, torch.float64], ids=["f32", "f64"])
def headed(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Headed:
    dtype = request.param
    tmp = tmp_path_factory.mktemp(f"headed_{str(dtype).split('.')[-1]}")
    base = _cls_base(dtype)
    models = {
        "h1": _cls_adapted(base, ["query", "value"], 8, seed=61),
        "h2": _cls_adapted(base, ["query", "value"], 8, seed=62, scale=1.3),
        "n": _cls_adapted(base, ["query"], 8, seed=63, head=False),
    }
    dirs = {k: save_adapter(m, tmp / f"dir_{k}") for k, m in models.items()}
    graph = export_model(
        models["h1"],
        tmp / "servable.onnx",
        _inputs(2, 6, 0),
        servable=True,
        servable_base=base,
        progress=False,
    )
    files: dict[str, Path] = {}
    if HAS_ADAPTER_API:
        for k in models:  # from the torch model and from saved folders
            src = models[k] if k == "h1" else dirs[k]
            files[k] = write_ort_adapter(src, graph, tmp / f"{k}.onnx_adapter")
    return Headed(dtype, base, models, dirs, files, graph, _tol(dtype))


def _stored(layout: ServableLayout, name: str, value: Any) -> np.ndarray:
    """``value`` (a torch parameter) as the graph stores parameter ``name``."""
    x = next(s for s in layout.saved if s.name == name)
    a = value.detach().double().numpy()
    return a.T if x.transposed else a


def test_heads_layout_and_switch(headed: Headed) -> None:
    layout = servable_layout(headed.graph)
    assert sorted(x.name for x in layout.saved) == sorted(HEAD)
    assert layout.format_version == 2 and layout.default == "zeros"
    assert ServableLayout.from_json(layout.to_json()) == layout
    want_dtype = "float32" if headed.dtype == torch.float32 else "float64"
    for x in layout.saved:
        assert x.initializer == saved_parameter_name(x.name) == f"bca.modules_to_save.{x.name}"
        assert x.parameter_shape == tuple(headed.base.get_parameter(x.name).shape)
        assert x.dtype == want_dtype
        # the default is the base model's head
        base_value = _stored(layout, x.name, headed.base.get_parameter(x.name))
        np.testing.assert_array_equal(layout.base_values[x.initializer], base_value)
    model = onnx.load(str(headed.graph))
    assert not [t.name for t in model.graph.initializer if t.name.startswith("classifier.")]
    sess = _plain_session(headed.graph)
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask"]
    assert sorted(i.name for i in sess.get_overridable_initializers()) == sorted(
        layout.parameter_names
    )
    # the headless adapter's file and feeds carry the base head, the others their own
    if HAS_ADAPTER_API:
        n_file = read_ort_adapter(headed.files["n"], headed.graph)
        h2_file = read_ort_adapter(headed.files["h2"], headed.graph)
        for name in HEAD:
            init = saved_parameter_name(name)
            np.testing.assert_array_equal(
                n_file[init], _stored(layout, name, headed.base.get_parameter(name))
            )
            np.testing.assert_array_equal(
                h2_file[init], _stored(layout, name, headed.models["h2"].get_parameter(name))
            )
    refs = {**headed.models, None: headed.base}
    feeds = {k: adapter_feeds(d, headed.graph) for k, d in headed.dirs.items()}
    ases = AdapterSession(headed.graph, sess_options=_opts()) if HAS_ADAPTER_API else None
    if ases is not None:
        for name, path in headed.files.items():
            ases.load_adapter(name, path)
        assert ases.input_names == ["input_ids", "attention_mask"]
    order: list[str | None] = ["h1", "h2", None, "n", "h1", "n", "h2", None]
    for k, name in enumerate(order):
        feed = _inputs(1 + k % 3, 3 + k % 4, 1200 + k)
        want = _logits(refs[name], feed)
        extra = layout.zero_feeds() if name is None else feeds[name]
        _assert_close(sess.run(["logits"], {**_np(feed), **extra}), want, headed.tol)
        if ases is not None:
            _assert_close(ases.run(["logits"], _np(feed), adapter=name), want, headed.tol)
    # the heads really differ: a run with the wrong head would be caught above
    feed = _inputs(2, 5, 1300)
    outs = {n: _logits(m, feed)[0] for n, m in refs.items()}
    for x in outs:
        for y in outs:
            if x != y:
                assert rel_err(outs[x], outs[y]) > 100 * headed.tol


@needs_adapter_api
def test_heads_threads(headed: Headed) -> None:
    sess = AdapterSession(headed.graph, sess_options=_opts())
    for name, path in headed.files.items():
        sess.load_adapter(name, path)
    refs = {**headed.models, None: headed.base}
    feeds = [_inputs(2, 5, 1400 + k) for k in range(2)]
    want = {(n, k): _logits(m, f)[0] for n, m in refs.items() for k, f in enumerate(feeds)}
    names: list[str | None] = ["h1", "h2", "n", None]
    errors: list[str] = []
    start = threading.Barrier(len(names))

    def worker(t: int) -> None:
        start.wait()
        for i in range(15):
            name = names[(t + i) % len(names)]
            k = (t + i) % len(feeds)
            got = sess.run(["logits"], _np(feeds[k]), adapter=name)[0]
            err = rel_err(got, want[(name, k)])
            if err > headed.tol:
                errors.append(f"thread {t} iter {i} adapter {name}: error {err:.3g}")

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(len(names))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors[:5]


def test_heads_mismatches(headed: Headed, tmp_path: Path) -> None:
    graph = headed.graph
    layout = servable_layout(graph)
    # another number of labels: the head has another shape
    five = _cls_base(headed.dtype, labels=5)
    other = save_adapter(_cls_adapted(five, ["query"], 8, seed=64), tmp_path / "five")
    with pytest.raises(ValueError, match=r"classifier\.weight") as e:
        adapter_feeds(other, graph)
    assert "(5, 24)" in str(e.value) and "(3, 24)" in str(e.value)
    if HAS_ADAPTER_API:
        with pytest.raises(ValueError, match=r"\(5, 24\)"):
            write_ort_adapter(other, graph, tmp_path / "never.onnx_adapter")
        assert not (tmp_path / "never.onnx_adapter").exists()
    # fully trained parameters the graph has no slot for
    pooled = _cls_adapted(headed.base, ["query"], 8, seed=65, save=("bert.pooler",))
    with pytest.raises(ValueError, match=r"bert\.pooler\.dense\.bias.*no slot"):
        adapter_feeds(save_adapter(pooled, tmp_path / "pooled"), graph)
    with pytest.raises(ValueError, match="no slot"):
        adapter_feeds(pooled, graph)  # the torch model: the same
    # weighted combinations with heads are refused; without heads they get the base head
    with pytest.raises(ValueError, match="weighted sum of heads"):
        adapter_feeds([(headed.dirs["h1"], 0.5), (headed.dirs["n"], 0.5)], graph)
    with pytest.raises(ValueError, match="weighted sum of heads"):
        adapter_feeds([(headed.models["h2"], 1.0)], graph)
    mix = adapter_feeds([(headed.dirs["n"], 0.5), (headed.models["n"], 0.5)], graph)
    one = adapter_feeds(headed.dirs["n"], graph)
    for name in layout.parameter_names:
        np.testing.assert_allclose(mix[name], one[name], rtol=1e-6, atol=1e-7)
    # a bare layout (no graph) knows no base head: fine for adapters with heads only
    bare = ServableLayout.from_json(layout.to_json())
    assert bare.base_values is None
    assert sorted(adapter_feeds(headed.dirs["h2"], bare)) == sorted(layout.parameter_names)
    with pytest.raises(ValueError, match="not read from its graph"):
        adapter_feeds(headed.dirs["n"], bare)
    # an adapter file without the head parameters
    if HAS_ADAPTER_API:
        spectra_only = adapter_feeds(headed.dirs["h1"], graph)
        for name in HEAD:
            del spectra_only[saved_parameter_name(name)]
        raw = _write_raw(tmp_path / "no_head.onnx_adapter", spectra_only, layout.model_version)
        sess = AdapterSession(graph, sess_options=_opts())
        with pytest.raises(ValueError, match=r"lacks fully trained parameter\(s\)"):
            sess.load_adapter("no_head", raw)
    # the head parameters are part of the layout: a graph of the same layers without them
    # has another model version (its adapter files do not fit)
    assert layout.model_version != ServableLayout(layout.layers, layout.default).model_version
    # a servable export of a model with heads needs the base head
    with pytest.raises(ValueError, match="servable_base"):
        export_model(
            headed.models["h1"], tmp_path / "g.onnx", _inputs(2, 6, 0), servable=True,
            progress=False,
        )  # fmt: skip


def test_heads_adapter_default(headed: Headed, tmp_path: Path) -> None:
    """servable_default="adapter": the graph alone is the adapted model with its head; the
    base head is kept for adapters without one and for adapter=None."""
    graph = export_model(
        headed.models["h2"],
        tmp_path / "g.onnx",
        _inputs(2, 6, 0),
        servable=True,
        servable_default="adapter",
        servable_base=headed.base.state_dict(),
        progress=False,
    )
    layout = servable_layout(graph)
    assert layout.default == "adapter" and len(layout.saved) == 2
    assert layout.base_initializer(layout.saved[0]).endswith(".base")
    feed = _inputs(2, 5, 1500)
    sess = _plain_session(graph)
    _assert_close(sess.run(["logits"], _np(feed)), _logits(headed.models["h2"], feed), headed.tol)
    fed = {**_np(feed), **layout.base_feeds()}
    _assert_close(sess.run(["logits"], fed), _logits(headed.base, feed), headed.tol)
    fed = {**_np(feed), **adapter_feeds(headed.dirs["n"], graph)}
    _assert_close(sess.run(["logits"], fed), _logits(headed.models["n"], feed), headed.tol)
    if HAS_ADAPTER_API:
        ases = AdapterSession(graph, sess_options=_opts())
        ases.load_adapter("n", write_ort_adapter(headed.dirs["n"], graph, tmp_path / "n.oa"))
        _assert_close(ases.run(["logits"], _np(feed)), _logits(headed.base, feed), headed.tol)
        got = ases.run(["logits"], _np(feed), adapter="n")
        _assert_close(got, _logits(headed.models["n"], feed), headed.tol)


def _export_token_base_onnx(base: Any, path: Path) -> Path:
    class Wrap(torch.nn.Module):
        def __init__(self, m: Any) -> None:
            super().__init__()
            self.m = m

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            return self.m(input_ids=input_ids, attention_mask=attention_mask).logits

    ex = _inputs(2, 6, 0)
    axes = {"input_ids": {0: "b", 1: "s"}, "attention_mask": {0: "b", 1: "s"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Wrap(base).eval(),
            (ex["input_ids"], ex["attention_mask"]),
            str(path),
            dynamo=False,
            input_names=["input_ids", "attention_mask"],
            output_names=["logits"],
            dynamic_axes=axes,
            opset_version=17,
        )
    return path


def test_heads_transposed_patch_and_export(tmp_path: Path) -> None:
    """Token classification: the head is a MatMul whose weight the exporter stores
    transposed under an anonymous name; patch_model and export_model both find it."""
    base = _cls_base(kind="token", seed=3)
    models = {
        "t1": _cls_adapted(base, ["query", "value"], 8, seed=71),
        "t2": _cls_adapted(base, ["query", "value"], 8, seed=72, scale=1.3),
        "n": _cls_adapted(base, ["value"], 8, seed=73, head=False),
    }
    dirs = {k: save_adapter(m, tmp_path / k) for k, m in models.items()}
    base_onnx = _export_token_base_onnx(base, tmp_path / "base.onnx")
    anonymous = [t.name for t in onnx.load(str(base_onnx)).graph.initializer if "MatMul" in t.name]
    assert anonymous  # the transposed head weight has no parameter name
    patched = patch_model(
        base_onnx, [dirs["t1"], dirs["n"]], tmp_path / "patched.onnx", servable=True,
        progress=False,
    )  # fmt: skip
    exported = export_model(
        models["t1"], tmp_path / "exported.onnx", _inputs(2, 6, 0), servable=True,
        servable_base=base, progress=False,
    )  # fmt: skip
    refs = {**models, None: base}
    tol = _tol(torch.float32)
    for graph in (patched, exported):
        layout = servable_layout(graph)
        weight = next(x for x in layout.saved if x.name == "classifier.weight")
        assert weight.transposed and weight.shape == (HIDDEN, LABELS)
        sess = _plain_session(graph)
        for k, name in enumerate(["t1", None, "t2", "n"]):
            feed = _inputs(2, 4 + k, 1600 + k)
            extra = layout.zero_feeds() if name is None else adapter_feeds(dirs[name], graph)
            _assert_close(
                sess.run(["logits"], {**_np(feed), **extra}), _logits(refs[name], feed), tol
            )
    # a head initializer that other nodes read too cannot be overridden per run
    model = onnx.load(str(base_onnx))
    model.graph.node.append(onnx.helper.make_node("Identity", ["m.classifier.bias"], ["echo"]))
    model.graph.output.append(
        onnx.helper.make_tensor_value_info("echo", onnx.TensorProto.FLOAT, [LABELS])
    )
    shared = tmp_path / "shared.onnx"
    onnx.save(model, str(shared))
    with pytest.raises(ValueError, match=r"classifier\.bias.*2 node inputs"):
        patch_model(shared, dirs["t1"], tmp_path / "x.onnx", servable=True, progress=False)
    # servable_default="adapter" from several folders: their heads must agree
    with pytest.raises(ValueError, match="different values"):
        patch_model(
            base_onnx, [dirs["t1"], dirs["t2"]], tmp_path / "y.onnx", servable=True,
            servable_default="adapter", progress=False,
        )  # fmt: skip


@needs_adapter_api
def test_cli_round_trip_heads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = _cls_base(seed=9)
    folder = tmp_path / "base_model"
    base.save_pretrained(folder)
    models = {
        "hd_one": _cls_adapted(base, ["query", "value"], 8, seed=81),
        "hd_two": _cls_adapted(base, ["query", "value"], 8, seed=82, scale=2.0),
        "plain": _cls_adapted(base, ["query"], 8, seed=83, head=False),
    }
    dirs = {k: save_adapter(m, tmp_path / k) for k, m in models.items()}
    graph = tmp_path / "servable.onnx"
    run: Callable[..., int] = lambda *argv: main([str(a) for a in argv])  # noqa: E731
    assert run("serve", "export", dirs["hd_one"], "--base", folder, "-o", graph) == 0
    assert "4 layers, 2 fully trained parameters, default zeros" in capsys.readouterr().out
    out_dir = tmp_path / "adapters"
    assert run("serve", "adapter", *dirs.values(), "--graph", graph, "--out-dir", out_dir) == 0
    assert capsys.readouterr().out.count("wrote ") == 3
    assert run("serve", "info", graph) == 0
    info = capsys.readouterr().out
    assert "classifier.weight" in info and "bca.modules_to_save" in info
    code = run(
        "serve", "adapter", dirs["hd_one"], dirs["plain"], "--graph", graph, "--out-dir",
        out_dir, "--combine", "mix",
    )  # fmt: skip
    _one_line_error(code, capsys, "weighted sum of heads")
    sess = AdapterSession(graph, sess_options=_opts())
    for name in models:
        sess.load_adapter(name, out_dir / f"{name}.onnx_adapter")
    refs = {**models, None: base}
    for k, name in enumerate(["hd_one", "plain", None, "hd_two", "hd_one"]):
        feed = _inputs(2, 4, 1700 + k)
        _assert_close(
            sess.run(["logits"], _np(feed), adapter=name), _logits(refs[name], feed), 1e-5
        )


@needs_adapter_api
def test_adapter_file_mode_follows_umask(served: Served, tmp_path: Path) -> None:
    """The atomic write goes through mkstemp (0600); the file gets open()'s usual mode."""
    import os

    old = os.umask(0o022)
    try:
        path = write_ort_adapter(served.dirs["a"], served.graph, tmp_path / "m.onnx_adapter")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


# --------------------------------------------------------------------------------------
# float16 graphs: one half-precision base model, adapters served per run
# --------------------------------------------------------------------------------------
F16_U = 2.0**-11
"""float16 unit roundoff (half the machine epsilon 2**-10)."""

F16_TOL = 4 * F16_U
"""Norm-relative tolerance of a float16 graph against a float64 reference computed from the
same half weights and inputs (≈ 1.95e-3; test_onnx_adapter's float16 graph uses 2e-3).

Why: even an exact graph rounds its float16 output, an error of up to ``u`` per element
(about ``u/2`` norm-relative in practice: the measured output-rounding level). The graph
holds every layer's result in float16 (the base MatMul, its bias Add, the adapter's output
after its float32 → float16 Cast, the Add of both, the residual Add): eleven such roundings
on the longest path of the MLP below. Independent roundings add up in norm like
``sqrt(11) · u/2 ≈ 1.7 u``; ``4 u`` leaves room for the layers amplifying them. Measured:
2.1e-4 to 2.7e-4 (≈ 0.5 u) for the base model and every adapter. The adapters change the
output by ≥ 0.16 norm-relative (checked below to be > 50 × F16_TOL), so a run with the wrong
adapter, or with none, cannot pass. (A float32 copy of the model agrees with the float64
reference to ~1e-7: the error here is float16 rounding.)"""

F16_WIDTH = 24


class _HalfMLP(torch.nn.Module):  # type: ignore[name-defined,misc]
    """Three ``nn.Linear`` layers with a residual; exported from float16 on the CPU (a tiny
    BERT converted with ``.half()`` exports a graph onnxruntime refuses: LayerNormalization
    with float and float16 inputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.up = torch.nn.Linear(F16_WIDTH, 40)
        self.down = torch.nn.Linear(40, F16_WIDTH)
        self.out = torch.nn.Linear(F16_WIDTH, 16)

    def forward(self, x: Any) -> Any:
        return self.out(torch.relu(self.down(torch.relu(self.up(x)))) + x)


def _half_adapted(base: Any, targets: list[str], seed: int, scale: float) -> Any:
    """A copy of the float16 ``base`` with random adapters (float32 kernels: bca keeps the
    kernels of half-precision layers in float32)."""
    model = _HalfMLP().half().eval()
    model.load_state_dict(base.state_dict())
    torch.manual_seed(seed)
    inject_adapters(
        model, BCAConfig(block_size=8, target_modules=targets, scale=scale, init="xavier_uniform")
    )
    return model.eval()


def _half_x(b: int, s: int, seed: int) -> Any:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, s, F16_WIDTH, generator=g).half()


def _export_mlp(model: Any, x: Any, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (x,),
            str(path),
            dynamo=False,
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "b", 1: "s"}},
            opset_version=17,
        )
    return path


@dataclass
class HalfServed:
    base: Any  # the float16 base model
    models: dict[str, Any]  # adapter name -> float16 torch model
    refs: dict[str | None, Any]  # float64 copies (same weights, kernels), None: the base
    dirs: dict[str, Path]
    files: dict[str, Path]
    base_onnx: Path
    graph: Path  # patch_model(base_onnx, dirs["a"], servable=True)
    tmp: Path


@pytest.fixture(scope="module")
def half_served(tmp_path_factory: pytest.TempPathFactory) -> HalfServed:
    tmp = tmp_path_factory.mktemp("served_f16")
    torch.manual_seed(0)
    base = _HalfMLP().half().eval()
    models = {
        "a": _half_adapted(base, ["up", "down"], seed=1, scale=0.7),
        "b": _half_adapted(base, ["up", "down"], seed=2, scale=1.3),
        "c": _half_adapted(base, ["up"], seed=3, scale=0.7),  # a subset of the layers
    }
    dirs = {k: save_adapter(m, tmp / f"dir_{k}") for k, m in models.items()}
    base_onnx = _export_mlp(base, _half_x(2, 5, 0), tmp / "base.onnx")
    graph = patch_model(base_onnx, dirs["a"], tmp / "servable.onnx", servable=True, progress=False)
    files: dict[str, Path] = {}
    if HAS_ADAPTER_API:
        for k in models:  # from the torch model and from saved folders
            src = models[k] if k == "a" else dirs[k]
            files[k] = write_ort_adapter(src, graph, tmp / f"{k}.onnx_adapter")
    refs: dict[str | None, Any] = {k: copy.deepcopy(m).double() for k, m in models.items()}
    refs[None] = copy.deepcopy(base).double()
    return HalfServed(base, models, refs, dirs, files, base_onnx, graph, tmp)


def _ref64(model64: Any, x: Any) -> np.ndarray:
    with torch.no_grad():
        return model64(x.double()).numpy()  # type: ignore[no-any-return]


def test_float16_layout(half_served: HalfServed) -> None:
    """The graph computes in float16 (its input and output); its spectra are float32 (the
    compute dtype of float16 graphs), and the layout says so."""
    model = onnx.load(str(half_served.graph))
    onnx.checker.check_model(model, full_check=True)
    f16, f32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
    io = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]}
    assert io["x"] == f16 and io["y"] == f16
    layout = servable_layout(half_served.graph)
    assert layout.default == "zeros" and sorted(layout.modules) == ["down", "up"]
    inits = {t.name: t for t in model.graph.initializer}
    shapes = {"up": (5, 6, 10), "down": (5, 10, 6)}  # (p/2 + 1, 2 q_in, 2 q_out), p = 8
    for layer in layout.layers:
        assert layer.dtype == "float32" and layer.shape == shapes[layer.module]
        assert io[layer.parameter] == f32 and inits[layer.parameter].data_type == f32
        assert not onnx.numpy_helper.to_array(inits[layer.parameter]).any()  # zeros
    base_weights = [
        inits[n.input[1]]
        for n in model.graph.node
        if n.op_type == "MatMul" and n.input[1] in inits and not n.input[1].startswith("bca")
    ]
    assert len(base_weights) == 3 and {t.data_type for t in base_weights} == {f16}
    feeds = adapter_feeds(half_served.dirs["b"], half_served.graph)
    assert {v.dtype for v in feeds.values()} == {np.dtype(np.float32)}
    if HAS_ADAPTER_API:
        arrays = read_ort_adapter(half_served.files["c"], half_served.graph)
        assert {v.dtype for v in arrays.values()} == {np.dtype(np.float32)}
        assert not arrays[spectra_parameter_name("down")].any()  # c adapts no "down"
        # from the torch model and from its saved folder: the same spectra
        again = write_ort_adapter(half_served.dirs["a"], half_served.graph, half_served.tmp / "x")
        assert again.read_bytes() == half_served.files["a"].read_bytes()
        sess = AdapterSession(half_served.graph, sess_options=_opts())
        assert sess.input_names == ["x"] and sess.output_names == ["y"]


@needs_adapter_api
def test_float16_switch_adapters_and_feeds(half_served: HalfServed) -> None:
    """One session serves the adapters' files, their plain feeds and the base model, in
    any order, each equal to its float64 reference within float16 rounding."""
    sess = AdapterSession(half_served.graph, sess_options=_opts())
    for key, path in half_served.files.items():
        sess.load_adapter(key, path)
    assert sess.adapter_names == ["a", "b", "c"]
    layout = servable_layout(half_served.graph)
    feeds = {k: adapter_feeds(d, half_served.graph) for k, d in half_served.dirs.items()}
    refs = half_served.refs
    order: list[tuple[str | None, str]] = [
        ("a", "file"), ("b", "feeds"), (None, "file"), ("c", "file"), ("a", "feeds"),
        ("b", "file"), (None, "feeds"), ("c", "feeds"), ("a", "file"), (None, "file"),
    ]  # fmt: skip
    for k, (name, how) in enumerate(order):
        x = _half_x(1 + k % 3, 2 + k % 5, 2000 + k)
        if how == "file":
            got = sess.run(["y"], {"x": x.numpy()}, adapter=name)[0]
        else:
            extra = layout.zero_feeds() if name is None else feeds[name]
            got = sess.run(["y"], {"x": x.numpy(), **extra})[0]
        assert got.dtype == np.float16
        err = rel_err(got, _ref64(refs[name], x))
        assert err <= F16_TOL, f"{name} ({how}): norm-relative error {err:.3g} > {F16_TOL:.3g}"
    # the adapters really differ, by far more than the tolerance
    x = _half_x(3, 7, 2100)
    outs = {n: _ref64(m, x) for n, m in refs.items()}
    for p in outs:
        for q in outs:
            if p != q:
                assert rel_err(outs[p], outs[q]) > 50 * F16_TOL


@needs_adapter_api
def test_float16_graph_takes_float32_graph_files(half_served: HalfServed) -> None:
    """The float32 graph of the same model has the same layout (float32 spectra, equal
    shapes, lowering and layers) and model version: its adapter files are the same bytes
    and serve the float16 graph correctly. A float64 graph's spectra are float64: its files
    and float64 adapters are refused by the float16 graph, and so are float16 kernels."""
    tmp = half_served.tmp
    base32 = _export_mlp(
        copy.deepcopy(half_served.base).float(), _half_x(2, 5, 0).float(), tmp / "base32.onnx"
    )
    base64 = _export_mlp(
        copy.deepcopy(half_served.base).double(), _half_x(2, 5, 0).double(), tmp / "base64.onnx"
    )
    dirs = half_served.dirs
    g32 = patch_model(base32, dirs["a"], tmp / "s32.onnx", servable=True, progress=False)
    g64 = patch_model(base64, dirs["a"], tmp / "s64.onnx", servable=True, progress=False)
    layout16 = servable_layout(half_served.graph)
    assert servable_layout(g32) == layout16
    assert servable_layout(g32).model_version == layout16.model_version
    file32 = write_ort_adapter(dirs["b"], g32, tmp / "b32.onnx_adapter")
    assert file32.read_bytes() == half_served.files["b"].read_bytes()
    sess = AdapterSession(half_served.graph, sess_options=_opts())
    sess.load_adapter("b32", file32)
    x = _half_x(2, 6, 2200)
    got = sess.run(["y"], {"x": x.numpy()}, adapter="b32")[0]
    assert rel_err(got, _ref64(half_served.refs["b"], x)) <= F16_TOL

    layout64 = servable_layout(g64)
    assert {x.dtype for x in layout64.layers} == {"float64"}
    assert layout64.model_version != layout16.model_version
    file64 = write_ort_adapter(half_served.refs["b"], g64, tmp / "b64.onnx_adapter")
    with pytest.raises(ValueError, match=r"\(5, 6, 10\) float64.*expects \(5, 6, 10\) float32"):
        sess.load_adapter("b64", file64)
    with pytest.raises(ValueError, match="expects"):
        read_ort_adapter(file64, half_served.graph)
    with pytest.raises(ValueError, match="kernel dtype float64"):
        adapter_feeds(half_served.refs["b"], half_served.graph)
    # kernels cast to float16 (model.half() after inject_adapters) are refused too
    halved = copy.deepcopy(half_served.models["b"]).half()
    with pytest.raises(ValueError, match="kernel dtype float16.*expects float32"):
        adapter_feeds(halved, half_served.graph)
    with pytest.raises(ValueError, match="kernel dtype float16"):
        write_ort_adapter(halved, half_served.graph, tmp / "never.onnx_adapter")
    assert not (tmp / "never.onnx_adapter").exists()
    assert sess.adapter_names == ["b32"]


def test_float16_export_model_servable(half_served: HalfServed) -> None:
    """export_model of a float16 model: its default verify_tolerance (1e-4, for float32)
    is below float16 rounding, and the error says so; with a float16 tolerance the servable
    export has the patched graph's layout, so the same adapter files serve it."""
    tmp = half_served.tmp
    model = half_served.models["a"]
    example = {"x": _half_x(2, 5, 0)}
    with pytest.raises(RuntimeError, match="output is float16.*verify_tolerance"):
        export_model(model, tmp / "e_default.onnx", example, servable=True, progress=False)
    graph = export_model(
        model,
        tmp / "exported.onnx",
        example,
        servable=True,
        verify_tolerance=F16_TOL,  # against torch's float16 output: two float16 roundings
        progress=False,
    )
    layout = servable_layout(graph)
    assert layout == servable_layout(half_served.graph)
    assert {x.dtype for x in layout.layers} == {"float32"}
    io = onnx.load(str(graph)).graph
    assert io.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert io.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    feeds = adapter_feeds(half_served.dirs["c"], graph)
    sess = (
        AdapterSession(graph, sess_options=_opts())
        if HAS_ADAPTER_API
        else _plain_session(graph)  # plain feeds only
    )
    for k, name in enumerate([None, "c", "b"] if HAS_ADAPTER_API else [None, "c"]):
        x = _half_x(2, 3 + k, 2300 + k)
        want = _ref64(half_served.refs[name], x)
        if name is None:
            got = sess.run(None, {"x": x.numpy()})[0]
        elif name == "c":
            got = sess.run(None, {"x": x.numpy(), **feeds})[0]
        else:
            sess.load_adapter(name, half_served.files[name])  # written for the patched graph
            got = sess.run(None, {"x": x.numpy()}, adapter=name)[0]
        assert rel_err(got, want) <= F16_TOL
