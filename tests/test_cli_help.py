"""`bca --help` and every `bca COMMAND --help` read well: every option explained, no
'(default: None)' or Python list reprs, no default stated twice; `dir(bca)` is the API."""

from __future__ import annotations

import argparse
import re

import pytest

from bca.cli import build_parser, main


def _parsers() -> list[tuple[str, argparse.ArgumentParser]]:
    out = []

    def walk(prefix: str, parser: argparse.ArgumentParser) -> None:
        out.append((prefix, parser))
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    walk(f"{prefix} {name}".strip(), child)

    walk("", build_parser())
    return out


PARSERS = _parsers()


def test_every_command_is_walked() -> None:
    names = {name for name, _ in PARSERS}
    for want in ("demo", "export", "merge", "info", "bench", "experiment stability"):
        assert want in names
    assert {"serve export", "serve adapter", "serve info"} <= names


@pytest.mark.parametrize("name,parser", PARSERS, ids=[n or "bca" for n, _ in PARSERS])
def test_help_reads_well(name: str, parser: argparse.ArgumentParser) -> None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            continue
        assert action.help, f"bca {name}: {action.option_strings or action.dest} has no help"
    text = parser.format_help()
    flat = " ".join(text.split())
    for bad in ("(default: None)", "(default: False)", "(default: [", "(default: ("):
        assert bad not in flat, f"bca {name} --help shows {bad!r}"
    # one default per option: no "(default 100, --quick 24) (default: ...)"
    for entry in re.split(r"\n  (?=-)", text):
        assert len(re.findall(r"\bdefault\b", entry)) <= 1 or "--default" in entry, entry


def test_list_defaults_are_written_as_typed(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: 384,768)" in out and "(default: 1,128)" in out
    assert main(["demo", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: probe,lora,c3a,bca)" in out
    assert "(default 100, --quick 24)" in out and "--steps N" in out


def test_export_offers_every_lowering(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["export", "--help"], ["serve", "export", "--help"]):
        assert main(argv) == 0
        assert "matmul2" in capsys.readouterr().out


def test_dir_bca_is_the_api() -> None:
    import bca

    names = dir(bca)
    for junk in ("Any", "annotations", "importlib", "_CORE_NAMES", "_LAZY_SUBMODULES"):
        assert junk not in names
    for want in ("BlockCirculant", "BcaFormatError", "set_num_threads", "nn", "onnx", "cli"):
        assert want in names
