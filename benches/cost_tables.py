"""Parameter and FLOP tables in the style of the BCA paper (Ding et al., IJCAI 2025).

Builds RoBERTa-base, RoBERTa-large (targets query, value) and LLaMA2-7B (q_proj, v_proj)
from their published configurations on the ``meta`` device (no weights are downloaded
or allocated) and counts, per method, trainable parameters and forward FLOPs per token
of the adapter paths, in the paper's convention and as the implementations really run
(see ``bca.cost``). Writes benches/results/cost_tables.{md,json,png}.

    python benches/cost_tables.py [--out benches/results]

The hyper-parameters are the ones commonly used for these models in the LoRA, VeRA,
FourierFT, C3A and BCA papers; they are listed in every row.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
import transformers

from bca.cost import CostReport, Method, cost_report


def roberta(hidden: int, layers: int, heads: int, inter: int) -> torch.nn.Module:
    cfg = transformers.RobertaConfig(
        vocab_size=50265,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=inter,
        max_position_embeddings=514,
        type_vocab_size=1,
    )
    with torch.device("meta"):
        return transformers.RobertaModel(cfg)


def llama2_7b() -> torch.nn.Module:
    cfg = transformers.LlamaConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        return transformers.LlamaForCausalLM(cfg)


SETUPS: list[dict[str, Any]] = [
    {
        "model": "RoBERTa-base",
        "build": lambda: roberta(768, 12, 12, 3072),
        "targets": ["query", "value"],
        "methods": [
            Method("full"),
            Method("lora", r=8),
            Method("vera", r=1024),
            Method("fourierft", n_frequency=1000),
            Method("c3a", block_size=768),
            Method("bca", block_size=64),
            Method("bca", block_size=256),
            Method("bca", block_size=768),
        ],
    },
    {
        "model": "RoBERTa-large",
        "build": lambda: roberta(1024, 24, 16, 4096),
        "targets": ["query", "value"],
        "methods": [
            Method("full"),
            Method("lora", r=8),
            Method("vera", r=256),
            Method("fourierft", n_frequency=1000),
            Method("c3a", block_size=1024),
            Method("bca", block_size=256),
            Method("bca", block_size=512),
            Method("bca", block_size=1024),
        ],
    },
    {
        "model": "LLaMA2-7B",
        "build": llama2_7b,
        "targets": ["q_proj", "v_proj"],
        "methods": [
            Method("full"),
            Method("lora", r=16),
            Method("lora", r=64),
            Method("vera", r=1024),
            Method("fourierft", n_frequency=1000),
            Method("c3a", block_size=1024),
            Method("bca", block_size=256),
            Method("bca", block_size=1024),
            Method("bca", block_size=4096),
        ],
    },
]


def ratios(rep: CostReport) -> dict[str, Any]:
    """Ratios of each method to the BCA row with the largest block size."""
    bca = max((m for m in rep.methods if m.method == "bca"), key=lambda m: m.hyper["block_size"])
    out: dict[str, Any] = {"reference": bca.label}
    for m in rep.methods:
        if m is bca or m.method == "full":
            continue
        out[m.label] = {
            "params_ratio": m.params / bca.params,
            "paper_flops_ratio": m.paper_flops_per_token / bca.paper_flops_per_token,
            "real_flops_ratio": m.real_flops_per_token / bca.real_flops_per_token,
        }
    return out


def plot(reports: list[CostReport], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(reports), figsize=(5.2 * len(reports), 4.4))
    colors = {"lora": "C0", "vera": "C1", "fourierft": "C2", "c3a": "C4", "bca": "C3"}
    for ax, rep in zip(axes, reports, strict=True):
        for m in rep.methods:
            if m.method == "full":
                continue
            c = colors[m.method]
            ax.scatter(m.params, m.paper_flops_per_token, color=c, marker="o")
            ax.scatter(m.params, m.real_flops_per_token, color=c, marker="x")
            # C3A's paper count equals BCA's at the same p: label C3A at its real point
            y = m.real_flops_per_token if m.method == "c3a" else m.paper_flops_per_token
            ax.annotate(
                m.label, (m.params, y), fontsize=7, xytext=(3, 3), textcoords="offset points"
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("trainable parameters")
        ax.set_ylabel("adapter FLOPs per token")
        ax.set_title(f"{rep.model} ({', '.join(rep.target_modules)})")
        ax.grid(True, which="major", alpha=0.3)
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes[0].scatter([], [], color="gray", marker="o", label="paper count (spectra per token)")
    axes[0].scatter(
        [], [], color="gray", marker="x", label="real flops per token (per-call work excluded)"
    )
    fig.legend(loc="lower center", ncol=2, fontsize=8)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    reports: list[CostReport] = []
    for setup in SETUPS:
        model = setup["build"]()
        reports.append(
            cost_report(model, setup["targets"], setup["methods"], model_name=setup["model"])
        )
        del model

    md = [
        "# Adapter cost tables",
        "",
        "Generated by `python benches/cost_tables.py` from configurations on the meta device",
        "(no weights). Trainable parameters exclude any classifier head. FLOPs are per token",
        "for the adapter paths of all targeted layers (the frozen `W x` excluded).",
        "",
        "- *paper FLOPs/token*: the BCA paper's counting (multiply-accumulate = 1, kernel",
        "  spectra / FourierFT's ΔW recomputed per token). C3A's structure is the same as",
        "  BCA's, so its paper count equals BCA's at the same block size.",
        "- *real FLOPs/token*: flops as the implementations run (multiply-add = 2; bca with",
        "  real FFTs and cached spectra; C3A as PEFT runs it with complex FFTs).",
        "- *real FLOPs/call*: token-independent work per forward call (kernel spectra; for",
        "  FourierFT the dense ΔW via ifft2); cached at inference by bca, paid per training step.",
        "",
    ]
    data: dict[str, Any] = {"reports": []}
    for rep in reports:
        md.append(rep.to_markdown())
        md.append("")
        r = ratios(rep)
        ref = r.pop("reference")
        md.append(f"Ratios to **{ref}** (method / bca):")
        md.append("")
        md.append("| method | params × | paper FLOPs × | real FLOPs/token × |")
        md.append("|---|---:|---:|---:|")
        for label, v in r.items():
            md.append(
                f"| {label} | {v['params_ratio']:.3g} | {v['paper_flops_ratio']:.3g} "
                f"| {v['real_flops_ratio']:.3g} |"
            )
        md.append("")
        d = rep.to_dict()
        d["ratios_to"] = ref
        d["ratios"] = r
        data["reports"].append(d)

    (args.out / "cost_tables.md").write_text("\n".join(md))
    (args.out / "cost_tables.json").write_text(json.dumps(data, indent=2))
    if not args.no_plot:
        plot(reports, args.out / "cost_tables.png")
    print("\n".join(md))


if __name__ == "__main__":
    main()
