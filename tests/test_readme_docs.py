"""README.md's code runs as written.

Every ```python block runs on its own (a fresh namespace, its own empty working
directory, no hub access), and the ONNX files it names exist afterwards. Every ```bash
block names commands that exist: `bca ...` parses with --help, `make X` is a Makefile
target, `pip install` names extras that pyproject.toml defines, `python FILE` is a file of
the checkout. Other fences are `text` (the layout tree), never unlabelled, so a new
example cannot slip past this test by leaving out its language.
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```", flags=re.S | re.M)
KNOWN_LANGUAGES = {"python", "bash", "text"}


def _blocks(language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(README.read_text("utf-8")) if lang == language]


def test_every_fence_has_a_known_language() -> None:
    langs = [lang for lang, _ in FENCE.findall(README.read_text("utf-8"))]
    assert langs, "README.md has no code blocks"
    unknown = [lang or "(none)" for lang in langs if lang not in KNOWN_LANGUAGES]
    assert not unknown, f"README code fences need one of {sorted(KNOWN_LANGUAGES)}: {unknown}"


PYTHON_BLOCKS = _blocks("python")


def test_readme_has_python_examples() -> None:
    assert len(PYTHON_BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_python_block_runs(index: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code = PYTHON_BLOCKS[index]
    for module in re.findall(r"^(?:from|import) (\w+)", code, flags=re.M):
        pytest.importorskip(module)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": f"readme_block_{index}"}
    exec(compile(code, f"README.md[python block {index}]", "exec"), namespace)
    for name in re.findall(r"""["']([\w.-]+\.onnx)["']""", code):
        assert (tmp_path / name).is_file(), f"python block {index} did not write {name}"


def _bash_commands() -> list[str]:
    """The commands of the ```bash blocks: one per line, split at && and ;, no comments."""
    commands = []
    for block in _blocks("bash"):
        for line in block.splitlines():
            line = line.split("#", 1)[0].strip() if not line.lstrip().startswith("#") else ""
            commands += [c.strip() for c in re.split(r"&&|;", line) if c.strip()]
    return commands


def test_readme_has_bash_examples() -> None:
    assert any(c.startswith("bca") for c in _bash_commands())
    assert "make test" in _bash_commands()


def _extras() -> set[str]:
    with (REPO / "pyproject.toml").open("rb") as f:
        return set(tomllib.load(f)["project"]["optional-dependencies"])


def _make_targets() -> set[str]:
    text = (REPO / "Makefile").read_text("utf-8")
    return set(re.findall(r"^([A-Za-z][\w-]*):", text, flags=re.M))


@pytest.mark.parametrize("command", _bash_commands())
def test_bash_command_exists(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv = shlex.split(command)
    while argv and re.fullmatch(r"\w+=\S*", argv[0]):  # VAR=value prefixes
        argv = argv[1:]
    prog, args = argv[0], argv[1:]
    if prog == "bca":
        from bca.cli import main

        # every word up to the first option or placeholder is a subcommand
        words = []
        for arg in args:
            if arg.startswith("-") or not re.fullmatch(r"[a-z][a-z-]*", arg):
                break
            words.append(arg)
        try:  # main returns the exit status; argparse's --help may exit instead
            status = main([*words, "--help"])
        except SystemExit as exc:
            status = exc.code
        assert status in (0, None), f"`bca {' '.join(words)} --help` exited with {status}"
        assert "usage:" in capsys.readouterr().out
    elif prog == "make":
        missing = [t for t in args if not t.startswith("-") and "=" not in t]
        missing = [t for t in missing if t not in _make_targets()]
        assert not missing, f"`{command}`: no Makefile target {missing}"
    elif prog == "pip" or (prog in ("python", "python3") and args[:2] == ["-m", "pip"]):
        rest = args if prog == "pip" else args[2:]
        assert rest[:1] == ["install"], f"`{command}`: only pip install is expected"
        for spec in (a for a in rest[1:] if not a.startswith("-")):
            extras = re.search(r"\[([\w,-]+)\]$", spec)
            if extras:
                unknown = set(extras.group(1).split(",")) - _extras()
                assert not unknown, f"`{command}`: pyproject.toml defines no extra {unknown}"
    elif prog in ("python", "python3"):
        script = next((a for a in args if not a.startswith("-")), None)
        assert script is None or (REPO / script).is_file(), f"`{command}`: no file {script}"
    elif prog in ("cd", "git", "cargo", "ls"):
        pass
    else:
        pytest.fail(f"README bash block runs {prog!r}, which this test does not know")
