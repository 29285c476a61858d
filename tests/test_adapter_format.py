"""The saved-adapter format: every reader refuses malformed files with a ValueError or
TypeError naming the file and the field (issue 12, items 6 and 7), and every writer is
atomic (item 9): a failure mid-save leaves the previous files intact and no half-written
folder behind.

The files here are made by ``save_adapter`` and then damaged the way a disk, a transfer or
a hand edit damages them: a safetensors header whose dtype or shape is relabelled, a
truncated file, a config with zeros, huge numbers, wrong types or deep nesting.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from bca.cli import main as cli_main
from bca.model import BCAConfig, inject_adapters, load_adapter, save_adapter
from bca.onnx import read_adapter

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
KERNEL = "fc.bca_kernel"
HEAD_WEIGHT = "modules_to_save.head.weight"


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(16, 12)
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc(x))


def _adapted(seed: int = 1) -> Tiny:
    model = Tiny()
    inject_adapters(
        model,
        BCAConfig(block_size=4, target_modules=["fc"], init="gaussian", modules_to_save=["head"]),
    )
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    return save_adapter(_adapted(), tmp_path / "adapter")


def _variant(saved: Path, name: str) -> Path:
    d = saved.parent / name
    shutil.copytree(saved, d)
    return d


def _header(path: Path) -> tuple[dict[str, Any], bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _write_header(path: Path, meta: dict[str, Any], data: bytes) -> None:
    head = json.dumps(meta).encode()
    head += b" " * (-len(head) % 8)
    path.write_bytes(struct.pack("<Q", len(head)) + head + data)


def _relabel(d: Path, tensor: str, **changes: Any) -> Path:
    meta, data = _header(d / WEIGHTS)
    meta[tensor].update(changes)
    _write_header(d / WEIGHTS, meta, data)
    return d


def _edit_config(d: Path, edit: Callable[[dict[str, Any]], Any]) -> Path:
    doc = json.loads((d / CONFIG).read_text())
    edit(doc)
    (d / CONFIG).write_text(json.dumps(doc))
    return d


def _cli_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    code = cli_main(argv)
    err = capsys.readouterr().err
    assert code == 1, err
    assert "Traceback" not in err, err
    line = err.strip().splitlines()[-1]  # after any progress bars transformers prints
    assert line.startswith(f"bca {argv[0]}: error: "), err
    return line


BAD_TYPES = ("ZeroDivisionError", "AttributeError", "KeyError", "OverflowError", "Recursion")


def _all_readers_refuse(
    d: Path, capsys: pytest.CaptureFixture[str], file: str, *words: str
) -> None:
    """load_adapter, read_adapter and `bca info` refuse ``d`` with an error that names
    ``file`` (a path inside ``d``) and every word in ``words``."""
    path = str(d / file)
    for reader in (lambda: load_adapter(Tiny(), d), lambda: read_adapter(d)):
        with pytest.raises((ValueError, TypeError)) as info:
            reader()
        msg = str(info.value)
        assert path in msg and all(w in msg for w in words), msg
        assert not isinstance(info.value, (ZeroDivisionError, OverflowError, RecursionError))
    err = _cli_error(["info", str(d)], capsys)
    assert path in err and all(w in err for w in words), err
    assert not any(t in err for t in BAD_TYPES), err


# --------------------------------------------------------------------------------------
# item 6: dtypes and shapes are checked by every reader
# --------------------------------------------------------------------------------------
def test_round_trip_is_exact_and_never_unpickles(
    saved: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_unpickling(*args: object, **kw: object) -> None:
        raise AssertionError("loading must not unpickle")

    monkeypatch.setattr(torch, "load", no_unpickling)
    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    model = _adapted()
    fresh = load_adapter(Tiny(), saved)
    x = torch.randn(5, 16)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    adapter = read_adapter(saved)
    (spec,) = adapter.specs
    assert np.array_equal(spec.kernel, model.fc.bca_kernels["default"].detach().numpy())
    assert np.array_equal(
        adapter.modules_to_save["head.weight"], model.head.weight.detach().numpy()
    )


@pytest.mark.parametrize("dtype", ["I32", "U32"])
def test_kernel_dtype_relabelled(
    saved: Path, capsys: pytest.CaptureFixture[str], dtype: str
) -> None:
    d = _relabel(_variant(saved, "relabelled"), KERNEL, dtype=dtype)
    _all_readers_refuse(d, capsys, WEIGHTS, KERNEL, "dtype")


def test_modules_to_save_dtype_relabelled(saved: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = _relabel(_variant(saved, "relabelled"), HEAD_WEIGHT, dtype="I32")
    _all_readers_refuse(d, capsys, WEIGHTS, HEAD_WEIGHT, "dtype")


def test_kernel_shape_relabelled(saved: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = _relabel(_variant(saved, "reshaped"), KERNEL, shape=[3, 16, 1])
    _all_readers_refuse(d, capsys, WEIGHTS, KERNEL, "shape")


def test_header_size_mismatch(saved: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = _relabel(_variant(saved, "f16"), KERNEL, dtype="F16")  # half the bytes it spans
    _all_readers_refuse(d, capsys, WEIGHTS, KERNEL)


def test_half_precision_kernels_are_saved_as_float32(tmp_path: Path) -> None:
    model = _adapted()
    model.fc.bca_kernels["default"].data = model.fc.bca_kernels["default"].data.half()
    d = save_adapter(model, tmp_path / "half")
    meta, _ = _header(d / WEIGHTS)
    assert meta[KERNEL]["dtype"] == "F32"
    (spec,) = read_adapter(d).specs
    assert spec.kernel.dtype == np.float32


# --------------------------------------------------------------------------------------
# item 7: only ValueError / TypeError, naming the file and the field
# --------------------------------------------------------------------------------------
def _set_module(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(doc: dict[str, Any]) -> None:
        doc["modules"]["fc"][key] = value

    return edit


CONFIG_DAMAGE: list[tuple[str, Callable[[dict[str, Any]], Any], str]] = [
    ("block_size_zero", _set_module("block_size", 0), "block_size"),
    ("block_size_negative", _set_module("block_size", -4), "block_size"),
    ("block_size_float", _set_module("block_size", 4.5), "block_size"),
    ("block_size_string", _set_module("block_size", "4"), "block_size"),
    ("in_features_2_63", _set_module("in_features", 2**63), "in_features"),
    ("out_features_2_64", _set_module("out_features", 2**64), "out_features"),
    ("in_features_bool", _set_module("in_features", True), "in_features"),
    ("in_features_missing", lambda doc: doc["modules"]["fc"].pop("in_features"), "in_features"),
    ("is_conv1d_string", _set_module("is_conv1d", "no"), "is_conv1d"),
    ("top_block_size_zero", lambda doc: doc.update(block_size=0), "block_size"),
    ("modules_list", lambda doc: doc.update(modules=["fc"]), "modules"),
    ("modules_entry_int", lambda doc: doc["modules"].update(fc=5), "modules"),
    ("modules_empty", lambda doc: doc.update(modules={}), "modules"),
    ("base_model_string", lambda doc: doc.update(base_model="bert"), "base_model"),
    (
        "fingerprint_entry_int",
        lambda doc: doc["base_model"]["fingerprint"].update(fc=3),
        "fingerprint",
    ),
    (
        "sketch_rms_string",
        lambda doc: doc["base_model"]["weight_sketch"]["fc"].update(rms="big"),
        "weight_sketch",
    ),
    (
        "sketch_short",
        lambda doc: doc["base_model"]["weight_sketch"]["fc"].update(projections=[1.0]),
        "weight_sketch",
    ),
    ("scale_string", lambda doc: doc.update(scale="x"), "scale"),
    ("scale_huge", lambda doc: doc.update(scale=1e400), "scale"),
    ("target_modules_string", lambda doc: doc.update(target_modules="fc"), "target_modules"),
    ("modules_to_save_int", lambda doc: doc.update(modules_to_save=[1]), "modules_to_save"),
    ("init_unknown", lambda doc: doc.update(init="ones"), "init"),
    ("pad_string", lambda doc: doc.update(pad="yes"), "pad"),
    ("format_version_true", lambda doc: doc.update(format_version=True), "format_version"),
]


@pytest.mark.parametrize(
    ("edit", "field"), [c[1:] for c in CONFIG_DAMAGE], ids=[c[0] for c in CONFIG_DAMAGE]
)
def test_config_damage(
    saved: Path,
    capsys: pytest.CaptureFixture[str],
    edit: Callable[[dict[str, Any]], Any],
    field: str,
) -> None:
    d = _edit_config(_variant(saved, "damaged"), edit)
    _all_readers_refuse(d, capsys, CONFIG, field)


def test_config_deeply_nested(saved: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = _variant(saved, "nested")
    text = (d / CONFIG).read_text().rstrip()
    (d / CONFIG).write_text(text[:-1] + ', "extra": ' + "[" * 200_000 + "]" * 200_000 + "}")
    _all_readers_refuse(d, capsys, CONFIG, "nest")


def test_config_not_utf8(saved: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = _variant(saved, "latin1")
    (d / CONFIG).write_bytes((d / CONFIG).read_bytes().replace(b'"fc"', b'"f\xe9"'))
    _all_readers_refuse(d, capsys, CONFIG)


def test_config_duplicate_keys(saved: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = _variant(saved, "dup")
    text = (d / CONFIG).read_text().rstrip()
    (d / CONFIG).write_text(text[:-1] + ', "scale": 2.0}')
    _all_readers_refuse(d, capsys, CONFIG, "scale")


@pytest.mark.parametrize("keep", [0, 7, 8, 40, -1])
def test_truncated_weights(saved: Path, capsys: pytest.CaptureFixture[str], keep: int) -> None:
    d = _variant(saved, "truncated")
    raw = (d / WEIGHTS).read_bytes()
    (d / WEIGHTS).write_bytes(raw[:keep])
    _all_readers_refuse(d, capsys, WEIGHTS)


def test_corrupted_header(saved: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = _variant(saved, "corrupted")
    raw = bytearray((d / WEIGHTS).read_bytes())
    raw[12:20] = b"\xff" * 8
    (d / WEIGHTS).write_bytes(bytes(raw))
    _all_readers_refuse(d, capsys, WEIGHTS)


def test_huge_header_length(saved: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = _variant(saved, "huge")
    raw = (d / WEIGHTS).read_bytes()
    (d / WEIGHTS).write_bytes(struct.pack("<Q", 2**63 + 5) + raw[8:])
    _all_readers_refuse(d, capsys, WEIGHTS)


def test_format_error_is_a_value_error_with_path_and_field(saved: Path) -> None:
    import bca

    d = _edit_config(_variant(saved, "zero"), _set_module("block_size", 0))
    with pytest.raises(bca.BcaFormatError) as info:
        read_adapter(d)
    assert isinstance(info.value, ValueError)
    assert info.value.path == d / CONFIG
    assert info.value.field == "modules.fc.block_size"


@pytest.mark.parametrize("value", [2**63, 2**64, 2**200])
def test_core_counts_beyond_int64(value: int) -> None:
    import bca

    kernel = np.zeros((1, 1, 4), np.float32)
    for name in ("in_features", "out_features", "num_threads"):
        with pytest.raises(ValueError, match=name):
            bca.BlockCirculant(kernel, **{name: value})
    with pytest.raises(ValueError, match="num_threads"):
        bca.set_num_threads(value)


# --------------------------------------------------------------------------------------
# item 9: atomic writes
# --------------------------------------------------------------------------------------
def _snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _siblings(d: Path) -> list[str]:
    return sorted(p.name for p in d.parent.iterdir())


def _fail_config_write(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make writing any JSON document fail (after the safetensors file is written)."""

    def boom(*args: object, **kw: object) -> None:
        raise OSError(28, "No space left on device (injected)")

    monkeypatch.setattr(json, "dump", boom)
    monkeypatch.setattr(json, "dumps", boom)


def test_save_adapter_failure_leaves_no_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _adapted()
    with monkeypatch.context() as m:
        _fail_config_write(m)
        with pytest.raises(OSError, match="injected"):
            save_adapter(model, tmp_path / "new")
    assert os.listdir(tmp_path) == []


def test_save_adapter_failure_keeps_previous_adapter(
    saved: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = _snapshot(saved)
    siblings = _siblings(saved)
    with monkeypatch.context() as m:
        _fail_config_write(m)
        with pytest.raises(OSError, match="injected"):
            save_adapter(_adapted(seed=2), saved)
    assert _snapshot(saved) == before
    assert _siblings(saved) == siblings
    assert sorted(os.listdir(saved)) == [CONFIG, WEIGHTS]  # no staging folder left inside
    load_adapter(Tiny(), saved)
    # the same save without the failure replaces both files and keeps other files
    (saved / "notes.txt").write_text("mine")
    save_adapter(_adapted(seed=2), saved)
    after = _snapshot(saved)
    assert after["notes.txt"] == b"mine"
    assert after[WEIGHTS] != before[WEIGHTS]
    assert _siblings(saved) == siblings


def test_saved_files_have_the_usual_mode(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        d = save_adapter(_adapted(), tmp_path / "a")
    finally:
        os.umask(old)
    assert (d.stat().st_mode & 0o777) == 0o750
    for f in (CONFIG, WEIGHTS):
        assert ((d / f).stat().st_mode & 0o777) == 0o640, f
    # saving again over a file made private keeps it private
    (d / WEIGHTS).chmod(0o600)
    save_adapter(_adapted(seed=3), d)
    assert ((d / WEIGHTS).stat().st_mode & 0o777) == 0o600
    assert ((d / CONFIG).stat().st_mode & 0o777) == 0o640


def test_onnx_save_failure_leaves_previous_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import onnx
    from onnx import TensorProto, helper

    from bca.onnx import _io

    def model(value: float) -> onnx.ModelProto:
        const = onnx.numpy_helper.from_array(np.full(512, value, np.float32), "c")
        node = helper.make_node("Add", ["x", "c"], ["y"])
        graph = helper.make_graph(
            [node],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [512])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [512])],
            [const],
        )
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

    out = tmp_path / "m.onnx"
    _io.save_checked(model(1.0), out)
    before = out.read_bytes()

    def failing_check(*args: object, **kw: object) -> None:
        raise onnx.checker.ValidationError("injected")

    for external in (False, True):
        with monkeypatch.context() as m:
            m.setattr(onnx.checker, "check_model", failing_check)
            with pytest.raises(onnx.checker.ValidationError, match="injected"):
                _io.save_checked(model(2.0), out, external_data=external)
        assert out.read_bytes() == before
        assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    _io.save_checked(model(3.0), out, external_data=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    (init,) = onnx.load(str(out)).graph.initializer
    assert onnx.numpy_helper.to_array(init).tolist() == [3.0] * 512
    assert (out.stat().st_mode & 0o777) == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --------------------------------------------------------------------------------------
# PEFT conversion: the same checks, and atomic writes
# --------------------------------------------------------------------------------------
def test_peft_conversion_refuses_damage(saved: Path, tmp_path: Path) -> None:
    from bca.peft_interop import bca_adapter_dir_to_c3a, c3a_adapter_dir_to_bca

    out = tmp_path / "out"
    damaged = [
        (_relabel(_variant(saved, "k_i32"), KERNEL, dtype="I32"), WEIGHTS, KERNEL),
        (_relabel(_variant(saved, "h_i32"), HEAD_WEIGHT, dtype="I32"), WEIGHTS, HEAD_WEIGHT),
        (_edit_config(_variant(saved, "p0"), _set_module("block_size", 0)), CONFIG, "block_size"),
        (_edit_config(_variant(saved, "fp"), lambda d: d.update(base_model=[])), CONFIG, "base"),
    ]
    for d, file, word in damaged:
        with pytest.raises(ValueError) as info:
            bca_adapter_dir_to_c3a(d, out)
        assert str(d / file) in str(info.value) and word in str(info.value), info.value
    assert not out.exists()

    peft_dir = bca_adapter_dir_to_c3a(saved, tmp_path / "peft")
    c3a_key = "base_model.model.fc.c3a_kernel"
    peft_damage: list[tuple[Path, str, str]] = [
        (_relabel(_variant(peft_dir, "c_i32"), c3a_key, dtype="I32"), WEIGHTS, c3a_key),
        (_relabel(_variant(peft_dir, "c_shape"), c3a_key, shape=[48, 1]), WEIGHTS, c3a_key),
        (_edit_config(_variant(peft_dir, "c_bs"), lambda d: d.update(block_size=0)), CONFIG, "b"),
        (
            _edit_config(_variant(peft_dir, "c_mts"), lambda d: d.update(modules_to_save="head")),
            CONFIG,
            "modules_to_save",
        ),
        (
            _edit_config(_variant(peft_dir, "c_type"), lambda d: d.update(peft_type=3)),
            CONFIG,
            "C3A",
        ),
    ]
    for d, file, word in peft_damage:
        with pytest.raises(ValueError) as info:
            c3a_adapter_dir_to_bca(d, out)
        assert str(d / file) in str(info.value) and word in str(info.value), info.value
    assert not out.exists()
    back = c3a_adapter_dir_to_bca(peft_dir, tmp_path / "back")
    model = load_adapter(Tiny(), back)
    x = torch.randn(3, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), _adapted()(x), rtol=1e-5, atol=1e-6)


def test_peft_conversion_is_atomic(
    saved: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import peft

    from bca.peft_interop import bca_adapter_dir_to_c3a, c3a_adapter_dir_to_bca

    peft_dir = bca_adapter_dir_to_c3a(saved, tmp_path / "peft")
    before = _snapshot(peft_dir)

    def boom(*args: object, **kw: object) -> None:
        raise OSError(28, "No space left on device (injected)")

    with monkeypatch.context() as m:
        m.setattr(peft.PeftConfig, "save_pretrained", boom)
        with pytest.raises(OSError, match="injected"):
            bca_adapter_dir_to_c3a(saved, tmp_path / "peft2")
        with pytest.raises(OSError, match="injected"):
            bca_adapter_dir_to_c3a(_variant(saved, "other"), peft_dir, overwrite=True)
    assert _snapshot(peft_dir) == before
    with monkeypatch.context() as m:
        _fail_config_write(m)
        with pytest.raises(OSError, match="injected"):
            c3a_adapter_dir_to_bca(peft_dir, tmp_path / "bca")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "other", "peft"]


# --------------------------------------------------------------------------------------
# `bca merge` and `bca export` with a (tiny) transformers base model folder
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    model = BertModel(cfg)
    root = tmp_path_factory.mktemp("bert")
    model.save_pretrained(root / "base")
    inject_adapters(model, BCAConfig(block_size=4, target_modules=["query"], init="gaussian"))
    return root / "base", save_adapter(model, root / "adapter")


def test_merge_and_export_name_the_damaged_file(
    bert: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base, adapter = bert
    d = tmp_path / "truncated"
    shutil.copytree(adapter, d)
    (d / WEIGHTS).write_bytes((d / WEIGHTS).read_bytes()[:-10])
    for argv in (
        ["merge", str(d), "--base", str(base), "-o", str(tmp_path / "merged")],
        ["export", str(d), "--base", str(base), "-o", str(tmp_path / "m.onnx")],
    ):
        err = _cli_error(argv, capsys)
        assert str(d / WEIGHTS) in err and "SafetensorError" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["truncated"]


def test_merge_is_atomic(
    bert: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import transformers

    base, adapter = bert
    out = tmp_path / "merged"
    original = transformers.PreTrainedModel.save_pretrained

    def save_then_fail(self: Any, *args: Any, **kw: Any) -> None:
        original(self, *args, **kw)  # the weights are on disk, then the save fails
        raise OSError(28, "No space left on device (injected)")

    argv = ["merge", str(adapter), "--base", str(base), "-o", str(out)]
    with monkeypatch.context() as m:
        m.setattr(transformers.PreTrainedModel, "save_pretrained", save_then_fail)
        assert "injected" in _cli_error(argv, capsys)
    assert os.listdir(tmp_path) == []
    assert cli_main(argv) == 0
    before = _snapshot(out)
    with monkeypatch.context() as m:
        m.setattr(transformers.PreTrainedModel, "save_pretrained", save_then_fail)
        assert "injected" in _cli_error(argv, capsys)
    assert _snapshot(out) == before and os.listdir(tmp_path) == ["merged"]


def test_unpaired_surrogate_in_names(saved: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A module named with an unpaired "\\udXXX" escape in both files: refused, and `bca
    info` (a real process, stdout in UTF-8) does not crash printing it."""
    import subprocess
    import sys

    d = _variant(saved, "surrogate")
    odd = "fc\udcff"
    meta, data = _header(d / WEIGHTS)
    meta[odd + ".bca_kernel"] = meta.pop(KERNEL)
    _write_header(d / WEIGHTS, meta, data)

    def rename(doc: dict[str, Any]) -> None:
        for table in (doc["modules"], doc["base_model"]["fingerprint"]):
            table[odd] = table.pop("fc")

    _edit_config(d, rename)
    _all_readers_refuse(d, capsys, CONFIG, "surrogate")
    run = subprocess.run(
        [sys.executable, "-m", "bca.cli", "info", str(d)],
        capture_output=True,
        env={**os.environ, "PYTHONIOENCODING": "utf-8"},
        timeout=120,
    )
    assert run.returncode == 1 and b"Traceback" not in run.stderr, run.stderr


@pytest.mark.parametrize("extra", ["1e999999", "[" * 130 + "]" * 130], ids=["inf", "deep"])
def test_header_json_the_safetensors_library_refuses(
    saved: Path, capsys: pytest.CaptureFixture[str], extra: str
) -> None:
    """An unused header field the safetensors library refuses (a number that overflows, 130
    levels of nesting) is refused here too: never more lenient than the reference reader
    (found by fuzz/fuzz_adapter_files.py)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    d = _variant(saved, "odd_header")
    meta, data = _header(d / WEIGHTS)
    meta[KERNEL]["note"] = "@"
    head = json.dumps(meta).replace('"@"', extra).encode()
    head += b" " * (-len(head) % 8)
    (d / WEIGHTS).write_bytes(struct.pack("<Q", len(head)) + head + data)
    with pytest.raises(SafetensorError):
        load_file(str(d / WEIGHTS))
    _all_readers_refuse(d, capsys, WEIGHTS, "header")


def test_config_nested_beyond_the_limit(saved: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = _edit_config(
        _variant(saved, "nested"), lambda doc: doc.update(note=json.loads("[" * 150 + "]" * 150))
    )
    _all_readers_refuse(d, capsys, CONFIG, "nested too deeply")
