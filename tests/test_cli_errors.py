"""`bca` errors: output folders are never made up, input files are checked before any
model loads, messages name the problem without exception class names, and a missing
optional package names the extra that installs it."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

from bca.cli import main


def _one_line_error(code: int, capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert code == 1, err
    assert err.count("\n") == 0, err
    assert err.startswith("bca ") and "error:" in err, err
    for n in needles:
        assert n in err, err
    return err


def _adapter(d: Path, *, demo: bool = False) -> Path:
    """A small valid saved adapter (one 128x128 module, p = 64), written with numpy."""
    d.mkdir(parents=True, exist_ok=True)
    doc = {
        "format": "bca",
        "format_version": 1,
        "block_size": 64,
        "scale": 1.0,
        "base_model": {},
        "modules": {"q": {"in_features": 128, "out_features": 128, "block_size": 64}},
    }
    (d / "adapter_config.json").write_text(json.dumps(doc))
    data = np.zeros((2, 2, 64), np.float32).tobytes()
    meta = {"q.bca_kernel": {"dtype": "F32", "shape": [2, 2, 64], "data_offsets": [0, len(data)]}}
    head = json.dumps(meta).encode()
    head += b" " * (-len(head) % 8)
    (d / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(head)) + head + data)
    if demo:
        (d / "demo_model.json").write_text(
            json.dumps({"kind": "minilm-meanpool-classifier", "num_labels": 3})
        )
    return d


@pytest.fixture
def no_model_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading a model fails the test: errors in the files must come first."""
    import bca.demo.run

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was loaded before the adapter files were checked")

    monkeypatch.setattr(bca.demo.run, "load_demo_model", refuse)


# --------------------------------------------------------------------------------------
# output paths (issue 14 item 3)
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv",
    [
        ["export", "{a}", "-o", "{missing}/x.onnx"],
        ["export", "--patch", "{a}/base.onnx", "{a}", "-o", "{missing}/x.onnx"],
        ["serve", "export", "{a}", "-o", "{missing}/x.onnx"],
        ["serve", "adapter", "{a}", "--graph", "{a}/g.onnx", "--out-dir", "{missing}/out"],
        ["merge", "{a}", "-o", "{missing}/merged"],
        ["demo", "--out", "{missing}/report"],
        ["experiment", "stability", "--out", "{missing}/stability"],
    ],
)
def test_missing_parent_folder_is_refused(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = _adapter(tmp_path / "adapter")
    missing = tmp_path / "no" / "such"
    args = [x.format(a=a, missing=missing) for x in argv]
    _one_line_error(main(args), capsys, str(tmp_path / "no" / "such"), "does not exist")
    assert not (tmp_path / "no").exists()


def test_parent_that_is_a_file_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = _adapter(tmp_path / "adapter")
    (tmp_path / "file").write_text("x")
    code = main(["export", str(a), "-o", str(tmp_path / "file" / "x.onnx")])
    _one_line_error(code, capsys, "is not a folder")


def test_output_that_is_a_folder_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = _adapter(tmp_path / "adapter")
    (tmp_path / "m.onnx").mkdir()
    code = main(["export", str(a), "-o", str(tmp_path / "m.onnx")])
    _one_line_error(code, capsys, "is a folder")


def test_stability_default_folder_may_be_made() -> None:
    from bca.cli._common import output_dir

    output_dir("no-such-report/stability", "--out", create_parents=True)  # no error


# --------------------------------------------------------------------------------------
# input files checked first, errors named (issue 14 item 5)
# --------------------------------------------------------------------------------------
def test_export_invalid_config_names_the_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_model_loads: None
) -> None:
    a = _adapter(tmp_path / "adapter", demo=True)
    doc = json.loads((a / "adapter_config.json").read_text())
    doc["modules"]["q"]["block_size"] = "large"
    (a / "adapter_config.json").write_text(json.dumps(doc))
    err = _one_line_error(
        main(["export", str(a), "-o", str(tmp_path / "m.onnx")]),
        capsys,
        "adapter_config.json",
        "modules.q.block_size",
    )
    assert "bca demo" not in err
    (a / "demo_model.json").unlink()  # not a demo folder: still the config's fault first
    err = _one_line_error(main(["export", str(a), "-o", str(tmp_path / "m.onnx")]), capsys)
    assert "modules.q.block_size" in err and "bca demo" not in err


@pytest.mark.parametrize("command", ["export", "merge", "serve-export"])
def test_truncated_weights_refused_before_loading_a_model(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], no_model_loads: None
) -> None:
    a = _adapter(tmp_path / "adapter", demo=True)
    w = a / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:500])
    argv = {
        "export": ["export", str(a), "-o", str(tmp_path / "m.onnx")],
        "merge": ["merge", str(a), "-o", str(tmp_path / "merged")],
        "serve-export": ["serve", "export", str(a), "-o", str(tmp_path / "m.onnx")],
    }[command]
    err = _one_line_error(main(argv), capsys, "adapter_model.safetensors", "file holds")
    assert "SafetensorError" not in err


def test_missing_weights_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = _adapter(tmp_path / "adapter")
    (a / "adapter_model.safetensors").unlink()
    code = main(["merge", str(a), "-o", str(tmp_path / "out")])
    _one_line_error(code, capsys, "has no adapter_model.safetensors")


def test_merge_missing_folder(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["merge", "/nonexistent-bca-adapter", "-o", "merged-out"])
    _one_line_error(code, capsys, "'/nonexistent-bca-adapter' does not exist")


def test_empty_or_invalid_onnx_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("onnx")
    a = _adapter(tmp_path / "adapter")
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\xff\xfe not protobuf at all \x00\x01" * 10)
    out = str(tmp_path / "o.onnx")
    _one_line_error(main(["serve", "info", str(empty)]), capsys, "empty (0 bytes)")
    _one_line_error(main(["export", "--patch", str(empty), str(a), "-o", out]), capsys, "empty")
    _one_line_error(
        main(["serve", "adapter", str(a), "--graph", str(empty), "--out-dir", str(tmp_path)]),
        capsys,
        "--graph",
        "empty (0 bytes)",
    )
    err = _one_line_error(main(["serve", "info", str(junk)]), capsys, "not an ONNX model")
    assert "servable" not in err


def test_messages_have_no_class_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "plain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    plain = tmp_path / "plain.onnx"
    onnx.save(helper.make_model(graph), str(plain))
    err = _one_line_error(main(["serve", "info", str(plain)]), capsys, "not a servable bca graph")
    assert "ValueError" not in err


def test_error_message_forms() -> None:
    from bca.cli import error_message

    assert error_message(FileNotFoundError(2, "No such file or directory", "/x/y")) == (
        "/x/y: No such file or directory"
    )
    assert error_message(ValueError("bad value\nmore detail")) == "bad value"
    assert error_message(RuntimeError("onnxruntime says no")) == "onnxruntime says no"
    missing = ModuleNotFoundError("No module named 'transformers'", name="transformers")
    assert error_message(missing) == 'needs transformers, not installed here; pip install "bca[hf]"'
    bug = error_message(KeyError("q"))
    assert bug.startswith("KeyError: 'q'") and "BCA_DEBUG=1" in bug
    assert error_message(AttributeError()).startswith("AttributeError (a bug?")


# --------------------------------------------------------------------------------------
# missing optional packages (a numpy-only install)
# --------------------------------------------------------------------------------------
def _without(monkeypatch: pytest.MonkeyPatch, *modules: str) -> None:
    for m in modules:
        monkeypatch.setitem(sys.modules, m, None)  # find_spec and import both fail


def test_demo_without_torch_asks_for_the_demo_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with monkeypatch.context() as m:
        _without(m, "torch", "peft")
        code = main(["demo", "--out", str(tmp_path / "r")])
        err = _one_line_error(code, capsys, "torch", "peft", 'pip install "bca[demo]"')
        assert "bca[torch]" not in err
    # without LoRA and C3A the demo does not need peft
    _without(monkeypatch, "torch")
    code = main(["demo", "--methods", "bca,probe", "--out", str(tmp_path / "r")])
    err = _one_line_error(code, capsys, "needs torch,", 'pip install "bca[demo]"')
    assert "peft" not in err


def test_bench_and_info_without_torch(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _without(monkeypatch, "torch")
    _one_line_error(main(["bench", "--sizes", "64"]), capsys, "torch", 'pip install "bca[torch]"')
    _one_line_error(main(["info", "--model", "minilm"]), capsys, "torch", 'pip install "bca[hf]"')


def test_export_without_onnx(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    a = _adapter(tmp_path / "adapter", demo=True)
    _without(monkeypatch, "onnx", "onnxruntime")
    code = main(["export", str(a), "-o", str(tmp_path / "m.onnx")])
    _one_line_error(code, capsys, "onnx, onnxruntime", 'pip install "bca[onnx]"')


def test_import_bca_nn_without_torch_names_the_extra() -> None:
    import subprocess

    code = "import sys; sys.modules['torch'] = None; import bca.nn"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last == 'ModuleNotFoundError: bca.nn needs torch: pip install "bca[torch]"', last
