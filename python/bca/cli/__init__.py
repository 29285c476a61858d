"""The ``bca`` command-line program.

Subcommands: ``demo``, ``export``, ``merge``, ``info``, ``bench``,
``experiment stability`` and ``serve export|adapter|info``, one module each in this
package (``add_parser`` declares its options, ``run`` runs it); what they share is in
``_common``, and what is not command-line work (rebuilding a model from an adapter,
summarising an adapter's costs) lives in the library (``bca._rebuild``,
``bca._adapter_summary``). Run ``bca <command> --help`` for each. Errors (bad arguments,
missing or malformed files, a missing optional dependency) end with a one-line message on
stderr and a non-zero exit status, never a traceback (set ``BCA_DEBUG=1`` to see it).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence

from .._adapter_format import BcaFormatError
from . import bench, demo, experiment, export, info, merge, serve
from ._common import EXIT_ERROR, EXIT_USAGE, CLIError, HelpFormatter, install_hint
from ._common import options as _options  # noqa: F401 - bca.cli._options (tests)

__all__ = ["CLIError", "build_parser", "main"]

EPILOG = """\
examples:
  bca demo --quick                 a smoke test of the demo (about a minute)
  bca demo                         the demo (about 3 minutes on 2 cores), ./bca-report
  bca info bca-report/adapter      what the demo's saved adapter holds and costs
  bca export bca-report/adapter -o minilm-bca.onnx
                                   the adapted model as ONNX, checked in onnxruntime
  bca info --model minilm          BCA's cost beside LoRA, C3A and full fine-tuning

`bca COMMAND --help` explains each command. Errors are one line; BCA_DEBUG=1 shows the
traceback."""

_COMMANDS = {
    "demo": demo,
    "export": export,
    "merge": merge,
    "info": info,
    "bench": bench,
    "experiment": experiment,
    "serve": serve,
}


def build_parser() -> argparse.ArgumentParser:
    """The ``bca`` argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="bca",
        formatter_class=argparse.RawDescriptionHelpFormatter,  # the examples keep their lines
        description="Block circulant adapters: fine-tune, inspect, merge, export and benchmark.",
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in _COMMANDS.values():
        module.add_parser(sub, HelpFormatter)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``bca`` program; returns the exit status (0 ok, 1 error, 2 usage)."""
    parser = build_parser()
    try:
        args = parser.parse_args(list(argv) if argv is not None else None)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return int(exc.code or 0)
    if args.version:
        from importlib.metadata import PackageNotFoundError, version

        try:
            print(f"bca {version('bca')}")
        except PackageNotFoundError:
            print("bca (not installed)")
        return 0
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        return _COMMANDS[args.command].run(args)
    except KeyboardInterrupt:
        print("bca: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `bca ... | head`: the reader has gone, nothing to report
        with contextlib.suppress(OSError, ValueError, AttributeError):  # nor at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_ERROR
    except Exception as exc:  # noqa: BLE001 - one line for the user, traceback on request
        if os.environ.get("BCA_DEBUG"):
            raise
        print(f"bca {args.command}: error: {error_message(exc)}", file=sys.stderr)
        return EXIT_ERROR


#: errors whose message is the whole story: printed without the exception's class name
_PLAIN_ERRORS = (CLIError, BcaFormatError, ValueError, TypeError, RuntimeError, MemoryError)


def error_message(exc: BaseException) -> str:
    """One line for the user: the message alone for the errors a user's input causes
    (bad files, values, missing packages), with the class name and a hint for anything
    else (a bug, to report with ``BCA_DEBUG=1``'s traceback)."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        name = exc.name.split(".")[0]
        return f"needs {name}, not installed here; {install_hint([name])}"
    if isinstance(exc, OSError):
        if exc.filename is not None and exc.strerror:
            return f"{exc.filename}: {exc.strerror}"
        return first or type(exc).__name__
    if isinstance(exc, (*_PLAIN_ERRORS, ImportError)) and first:
        return first
    return f"{type(exc).__name__}: {first} (a bug? BCA_DEBUG=1 shows the traceback)".replace(
        ":  (", " ("
    )
