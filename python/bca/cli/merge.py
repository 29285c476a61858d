"""``bca merge``: fold a saved adapter into its base model and save the plain model."""

from __future__ import annotations

import argparse
import json
from typing import Any

from .. import _adapter_format
from ._common import adapter_dir, output_dir
from .export import load_adapted


def add_parser(sub: Any, fmt: type[argparse.HelpFormatter]) -> None:
    m = sub.add_parser(
        "merge",
        formatter_class=fmt,
        help="merge a saved adapter into its base model and save the merged model",
        description="Load the base model and the adapter, fold scale·ΔW into the base weights "
        "(merge_and_unload) and save the plain model (transformers save_pretrained folder; "
        "the demo's classifier head goes to head.safetensors).",
    )
    m.add_argument("adapter", help="saved adapter folder")
    m.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="DIR",
        help="output folder (made if missing; its parent must exist)",
    )
    m.add_argument(
        "--base",
        default=None,
        metavar="FOLDER",
        help="the base model (a local transformers model folder) of an adapter not saved by "
        "`bca demo`",
    )


def run(args: argparse.Namespace) -> int:
    out = output_dir(args.output, "--output")
    adapter = adapter_dir(args.adapter)
    tok, model, info = load_adapted(adapter, args.base)
    from ..model import merge_and_unload

    merge_and_unload(model)
    # written into a hidden staging folder and moved into place when complete: a failure
    # leaves a previous output as it was and no half-written folder
    with _adapter_format.atomic_directory(out) as stage:
        if info is not None:
            from safetensors.torch import save_file

            model.encoder.save_pretrained(stage / "encoder")
            if tok is not None:
                tok.save_pretrained(stage / "encoder")
            save_file(
                {k: v.contiguous() for k, v in model.head.state_dict().items()},
                str(stage / "head.safetensors"),
            )
            (stage / "demo_model.json").write_text(
                json.dumps({**info, "merged": True}, indent=2) + "\n", encoding="utf-8"
            )
        else:
            model.save_pretrained(stage)
            if tok is not None:
                tok.save_pretrained(stage)
    print(f"merged model written to {out}")
    return 0
