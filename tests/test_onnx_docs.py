"""The ```python examples in docs/onnx.md run, in order, in one namespace."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
pytest.importorskip("transformers")

DOC = Path(__file__).resolve().parents[1] / "docs" / "onnx.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)


def test_docs_have_examples() -> None:
    assert len(_blocks()) >= 3


def test_docs_examples_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "docs_onnx"}
    for k, block in enumerate(_blocks()):
        code = block.replace("/tmp/", f"{tmp_path}/")
        exec(compile(code, f"docs/onnx.md[python block {k}]", "exec"), namespace)
    out = capsys.readouterr().out
    assert "(2, 8, 64)" in out
    assert "(2, 5, 24) matmul matmul matmul2" in out
