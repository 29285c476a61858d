"""``bca serve``: one servable ONNX graph, many adapters (export the graph, convert saved
adapters into onnxruntime adapter files, print a graph's layout)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ._common import (
    EXIT_USAGE,
    CLIError,
    adapter_dir,
    export_paths,
    float_list,
    need,
    onnx_file,
    output_dir,
)
from .export import MODES, TOLERANCE, add_export_options, load_adapted


def add_parser(sub: Any, fmt: type[argparse.HelpFormatter]) -> None:
    sv = sub.add_parser(
        "serve",
        help="one servable ONNX graph, many adapters: export it, convert adapters to "
        ".onnx_adapter files",
        description="Serve many adapters with one base graph in onnxruntime (docs/onnx.md, "
        '"Serving many adapters"): `bca serve export` writes the servable graph once (kernel '
        "spectra as overridable initializers), `bca serve adapter` converts any number of "
        "saved adapters into onnxruntime adapter files for it, `bca serve info` prints a "
        "servable graph's layout.",
    )
    svsub = sv.add_subparsers(dest="serve_command", metavar="SERVE_COMMAND")
    se = svsub.add_parser(
        "export",
        formatter_class=fmt,
        help="write the servable base graph (from a saved adapter's model, or by patching "
        "a base .onnx)",
        description="Two forms, as `bca export`. (1) `bca serve export ADAPTER_DIR -o "
        "servable.onnx [--base FOLDER]`: rebuild the adapted model and export it with its "
        "layers' kernel spectra as overridable initializers. (2) `bca serve export --patch "
        "BASE.onnx ADAPTER_DIR [ADAPTER_DIR ...] -o servable.onnx`: splice the adapters' layers "
        "into an existing base-model ONNX file the same way (the union of their modules). "
        "With --default zeros (the default) the graph computes the base model unless an "
        "adapter is supplied per run.",
    )
    se.add_argument("adapter", nargs="+", help="saved adapter folder(s) defining the layout")
    se.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="FILE.onnx",
        help="output file (its folder must exist)",
    )
    add_export_options(se)
    se.add_argument(
        "--mode",
        default="auto",
        choices=[m for m in MODES if m != "folded"],
        help="how adapters are written, as in `bca export` (the adapter files written for the "
        "graph are tied to it)",
    )
    se.add_argument(
        "--default",
        dest="servable_default",
        default="zeros",
        choices=["zeros", "adapter"],
        help="spectra stored in the graph: zeros (base model) or the given adapter(s)",
    )
    sa = svsub.add_parser(
        "adapter",
        formatter_class=fmt,
        help="convert saved adapters into .onnx_adapter files for a servable graph",
        description="Check each saved adapter against the servable graph's layout (modules, "
        "block sizes, widths, dtype) and write DIR/<folder name>.onnx_adapter (--out-dir DIR), an "
        "onnxruntime adapter file to load with onnxruntime.LoraAdapter or "
        "bca.onnx.AdapterSession. With --combine NAME, write one file NAME.onnx_adapter "
        "holding the weighted sum of the adapters instead (--weights, default all 1).",
    )
    sa.add_argument("adapter", nargs="+", help="saved adapter folder(s)")
    sa.add_argument(
        "--graph", required=True, metavar="FILE.onnx", help="the servable graph (bca serve export)"
    )
    sa.add_argument(
        "--out-dir",
        required=True,
        metavar="DIR",
        help="folder for the .onnx_adapter files (made if missing; its parent must exist)",
    )
    sa.add_argument(
        "--combine",
        metavar="NAME",
        default=None,
        help="write one combined adapter NAME.onnx_adapter (weighted sum) instead",
    )
    sa.add_argument(
        "--weights",
        type=float_list,
        default=None,
        metavar="W,W,...",
        help="weights for --combine, one per adapter folder (default: all 1)",
    )
    sa.add_argument(
        "--adapter-version", type=int, default=1, help="adapter version written into the files"
    )
    si = svsub.add_parser(
        "info",
        formatter_class=fmt,
        help="print a servable graph's layout",
        description="Print the layers of a servable graph (module, spectra parameter, shape, "
        "block size, lowering), its default and layout hash.",
    )
    si.add_argument("graph", metavar="FILE.onnx", help="a servable graph (bca serve export)")
    si.add_argument("--json", action="store_true", help="print the layout as JSON")


def _export(args: argparse.Namespace) -> int:
    out, base, dirs = export_paths(args)
    if base is not None:
        from ..onnx import patch_model

        path = patch_model(
            base,
            [str(d) for d in dirs],
            out,
            lowering=args.mode,
            servable=True,
            servable_default=args.servable_default,
            progress=False,
        )
    else:
        if len(dirs) != 1:
            raise CLIError("serve export takes one adapter folder (several only with --patch)")
        base_values: dict[str, Any] = {}
        tok, model, _ = load_adapted(dirs[0], args.base, base_values=base_values)
        from .._rebuild import example_inputs
        from ..onnx import export_model

        kwargs: dict[str, Any] = {
            "mode": args.mode,
            "verify": not args.no_verify,
            "servable": True,
            "servable_default": args.servable_default,
            "servable_base": base_values,
            "progress": False,
        }
        if args.opset is not None:
            kwargs["opset"] = args.opset
        path = export_model(model, out, example_inputs(tok, model, args.seq_len), **kwargs)
    from ..onnx import servable_layout

    layout = servable_layout(path)
    saved = f", {len(layout.saved)} fully trained parameters" if layout.saved else ""
    print(
        f"wrote {path} ({path.stat().st_size / 2**20:.1f} MB, servable: "
        f"{len(layout.layers)} layers{saved}, default {layout.default}, layout "
        f"{layout.layout_hash[:12]})"
    )
    if base is not None:
        print("checked: onnx.checker passed (no torch model to compare with when patching)")
    elif args.no_verify:
        print("onnxruntime check: skipped (--no-verify)")
    else:
        print(
            "onnxruntime check: passed (the graph fed this adapter's spectra, and its "
            f"default, equal torch's outputs within {TOLERANCE:g}, norm-relative)"
        )
    return 0


def _adapter(args: argparse.Namespace) -> int:
    if args.weights is not None and args.combine is None:
        raise CLIError("--weights needs --combine NAME")
    out_dir = output_dir(args.out_dir, "--out-dir")
    need("writing adapter files", ["onnx", "onnxruntime"])
    graph = onnx_file(args.graph, "--graph")
    dirs = [adapter_dir(a) for a in args.adapter]
    from ..onnx import (
        ADAPTER_FILE_SUFFIX,
        adapter_feeds,
        read_adapter,
        servable_layout,
        write_ort_adapter,
    )

    layout = servable_layout(graph)
    saved = [read_adapter(d) for d in dirs]
    jobs: list[tuple[Any, Path]] = []
    if args.combine is not None:
        name = args.combine.removesuffix(ADAPTER_FILE_SUFFIX)
        if not name or Path(name).name != name:
            raise CLIError(f"--combine {args.combine!r} must be a plain file name")
        weights = args.weights if args.weights is not None else [1.0] * len(saved)
        if len(weights) != len(saved):
            raise CLIError(f"--weights has {len(weights)} values for {len(saved)} adapter folders")
        jobs.append(
            (list(zip(saved, weights, strict=True)), out_dir / (name + ADAPTER_FILE_SUFFIX))
        )
    else:
        names = [d.resolve().name for d in dirs]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise CLIError(f"adapter folders with the same name {dup}: use separate --out-dir runs")
        jobs = [(a, out_dir / (n + ADAPTER_FILE_SUFFIX)) for a, n in zip(saved, names, strict=True)]
    for adapter, _ in jobs:  # check every adapter before writing any file
        adapter_feeds(adapter, layout)
    for adapter, target in jobs:
        path = write_ort_adapter(adapter, layout, target, adapter_version=args.adapter_version)
        print(f"wrote {path} ({path.stat().st_size / 2**10:.1f} KB)")
    return 0


def _info(args: argparse.Namespace) -> int:
    need("reading a servable graph", ["onnx"])
    graph = onnx_file(args.graph)
    from ..onnx import servable_layout

    layout = servable_layout(graph)
    if args.json:
        print(layout.to_json())
        return 0
    print(f"servable graph: {graph}")
    print(
        f"default: {layout.default}, layout hash {layout.layout_hash[:16]}, "
        f"model version {layout.model_version}"
    )
    print(f"{'module':<48} {'in':>6} {'out':>6} {'p':>5} {'lowering':>8} {'spectra shape':>16}")
    for x in layout.layers:
        shape = "x".join(str(d) for d in x.shape)
        print(
            f"{x.module:<48} {x.in_features:>6} {x.out_features:>6} {x.block_size:>5} "
            f"{x.lowering:>8} {shape:>16}"
        )
    print(f"{len(layout.layers)} layers; spectra parameters are named bca.<module>.spectra")
    if layout.saved:
        print(f"\n{'fully trained parameter (modules_to_save)':<48} {'shape':>16} transposed")
        for y in layout.saved:
            shape = "x".join(str(d) for d in y.parameter_shape)
            print(f"{y.name:<48} {shape:>16} {'yes' if y.transposed else 'no'}")
        print(
            f"{len(layout.saved)} fully trained parameters, named "
            "bca.modules_to_save.<parameter>; adapters without them get the base model's"
        )
    return 0


def run(args: argparse.Namespace) -> int:
    handlers = {"export": _export, "adapter": _adapter, "info": _info}
    if args.serve_command not in handlers:
        print(
            "bca serve: error: name a command: export, adapter or info (see bca serve --help)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    return handlers[args.serve_command](args)
