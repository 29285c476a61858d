"""Progress output of the demo's building blocks and of the library's ONNX export.

A library call prints nothing unless asked; the demo's one bar per phase is drawn only
when stderr is a terminal. (The end-to-end check of the demo's bars is in
test_demo_quick.py.)
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("tqdm")

from bca.demo.train import collate, phase_bar, scores  # noqa: E402


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_phase_bar_silent_off_a_terminal() -> None:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        bar = phase_bar(10, "phase")
        for _ in range(10):
            bar.update(1)
        bar.close()
    assert err.getvalue() == ""


def test_phase_bar_on_a_terminal_is_cleared() -> None:
    err = _Terminal()
    with contextlib.redirect_stderr(err):
        bar = phase_bar(10, "phase")
        for _ in range(10):
            bar.update(1)
        bar.close()
        hidden = phase_bar(10, "hidden", enabled=False)
        hidden.update(10)
        hidden.close()
    text = err.getvalue()
    assert "phase:" in text and "hidden" not in text
    assert "\n" not in text  # leave=False: the line is wiped when the phase ends


def test_collate_pads_like_the_tokenizer() -> None:
    class Tok:
        pad_token_id = 0
        padding_side = "right"

    enc = collate(Tok(), [[101, 7, 102], [101, 102]])
    assert enc["input_ids"].tolist() == [[101, 7, 102], [101, 102, 0]]
    assert enc["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


def test_scores() -> None:
    acc, f1 = scores([[2.0, 1.0], [0.0, 1.0], [3.0, 0.0]], [0, 1, 1], 2)
    assert acc == pytest.approx(2 / 3)
    assert f1 == pytest.approx((2 / 3 + 2 / 3) / 2)


def test_export_model_prints_nothing_by_default(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """``bca.onnx.export_model`` called from a library writes no progress bar."""
    pytest.importorskip("onnx")
    from bca.model import BCAConfig, inject_adapters
    from bca.onnx import export_model

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 12), torch.nn.GELU(), torch.nn.Linear(12, 4))
    inject_adapters(model, BCAConfig(block_size=4, target_modules=["0", "2"], init="gaussian"))
    model.eval()
    capfd.readouterr()
    err = _Terminal()  # even on a terminal
    with contextlib.redirect_stderr(err):
        export_model(model, tmp_path / "m.onnx", torch.randn(2, 12), verify=False)
    captured = capfd.readouterr()
    assert err.getvalue() == "" and captured.err == "", err.getvalue() + captured.err
