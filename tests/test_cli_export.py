"""`bca export` and `bca info --model` on a tiny transformers model: every lowering the
library offers (matmul2 included), the onnxruntime check's result printed, and the cost
table's full fine-tuning row."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from bca.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from transformers import BertConfig, BertModel

    from bca.model import BCAConfig, inject_adapters, save_adapter

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
    inject_adapters(model, BCAConfig(block_size=8, target_modules=["query"], init="gaussian"))
    return root / "base", save_adapter(model, root / "adapter")


@pytest.mark.parametrize("mode", ["matmul2", "auto"])
def test_export_prints_the_onnxruntime_check(
    mode: str, bert: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base, adapter = bert
    out = tmp_path / "m.onnx"
    argv = ["export", str(adapter), "--base", str(base), "-o", str(out), "--mode", mode]
    assert main([*argv, "--seq-len", "8"]) == 0
    text = capsys.readouterr().out
    assert out.is_file() and f"mode {mode}" in text
    assert "onnxruntime check: passed" in text and "2 example inputs of 8 tokens" in text
    assert main([*argv, "--no-verify"]) == 0
    assert "onnxruntime check: skipped (--no-verify)" in capsys.readouterr().out


def test_export_check_failure_is_an_error(
    bert: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import bca._rebuild

    monkeypatch.setattr(bca._rebuild, "onnx_error", lambda *a, **k: 0.5)
    base, adapter = bert
    out = tmp_path / "m.onnx"
    assert main(["export", str(adapter), "--base", str(base), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "differ from torch's" in err and "0.5 > 0.0001" in err and str(out) in err


def test_export_modes_are_the_library_modes() -> None:
    from bca.cli.export import MODES
    from bca.onnx import MODES as LIBRARY_MODES

    assert tuple(MODES) == tuple(LIBRARY_MODES)


def test_info_model_full_row_says_why_it_adds_nothing(
    bert: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    base, _ = bert
    assert main(["info", "--model", str(base), "--targets", "query", "--block-size", "8"]) == 0
    out = capsys.readouterr().out
    full = next(line for line in out.splitlines() if line.startswith("| full |"))
    assert full.endswith("| — | — | — |"), full
    assert "Full fine-tuning trains W itself" in out
    # one 16x16 query layer: W x costs 2 * 16 * 16 = 512 FLOPs per token
    assert "W x costs 512 FLOPs per token" in out
