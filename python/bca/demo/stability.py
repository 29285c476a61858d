"""``bca experiment stability``: the BCA paper's lr ÷ p heuristic, with and without.

For each block size p, BCA (q and v of all-MiniLM-L6-v2, zero-initialised kernels,
classifier head trained) is fine-tuned twice on the demo task from the same start, with
the same data order: once with kernel learning rate lr / p (``parameter_groups``'s
default, the paper's heuristic) and once with lr. Every step records the loss and the L2
norm of the kernels' gradient; the report gives final loss, held-out accuracy, the
largest gradient norm, the kernels' final norm and whether the loss became non-finite.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["StabilityOptions", "StabilityOutcome", "run_stability"]

DEFAULT_LR = {"adadelta": 1.0, "adamw": 0.05, "sgd": 0.5}


@dataclass
class StabilityOptions:
    out: str = "bca-report/stability"
    block_sizes: tuple[int, ...] = (16, 64, 384)
    steps: int | None = None
    batch_size: int | None = None
    optimizer: str = "adadelta"
    lr: float | None = None
    eval_examples: int | None = None
    quick: bool = False
    seed: int = 0
    threads: int = 2
    progress: bool = True
    dataset: str = "tweets"


@dataclass
class StabilityOutcome:
    out: Path
    runs: list[dict[str, Any]] = field(default_factory=list)
    table: str = ""


def run_stability(opts: StabilityOptions) -> StabilityOutcome:
    from . import passive_openmp

    passive_openmp()
    import torch
    from tqdm.auto import tqdm

    from .. import core
    from ..model import BCAConfig, inject_adapters, parameter_groups
    from .data import load_dataset
    from .report import markdown_table, plot_curves, write_json
    from .train import TrainSettings, evaluate, load_minilm, seed_everything, train_method

    steps = opts.steps or (8 if opts.quick else 60)
    batch = opts.batch_size or (8 if opts.quick else 16)
    n_eval = opts.eval_examples or (64 if opts.quick else 500)
    if opts.optimizer not in DEFAULT_LR:
        raise ValueError(f"optimizer must be one of {sorted(DEFAULT_LR)}, got {opts.optimizer!r}")
    lr = opts.lr if opts.lr is not None else DEFAULT_LR[opts.optimizer]
    for p in opts.block_sizes:
        if 384 % p:
            raise ValueError(f"block sizes must divide MiniLM's hidden size 384, got {p}")
    torch.set_num_threads(opts.threads)
    core.set_num_threads(opts.threads)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    ds = load_dataset(opts.dataset).subset(steps * batch, n_eval, opts.seed)
    seed_everything(opts.seed)
    tokenizer, pristine = load_minilm(ds.num_labels, opts.seed)
    s = TrainSettings(steps=steps, batch_size=batch, seed=opts.seed, max_length=ds.max_length)
    runs: list[dict[str, Any]] = []
    t_all = time.perf_counter()
    for p in opts.block_sizes:
        for divide in (True, False):
            seed_everything(opts.seed)
            model = copy.deepcopy(pristine)
            inject_adapters(
                model,
                BCAConfig(
                    block_size=p, target_modules=["query", "value"], modules_to_save=["head"]
                ),
            )
            groups = parameter_groups(model, lr=lr, divide_by_block_size=divide)
            for g in groups:
                g.pop("name", None)
            opt: torch.optim.Optimizer
            if opts.optimizer == "adadelta":
                opt = torch.optim.Adadelta(groups, lr=lr)
            elif opts.optimizer == "adamw":
                opt = torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)
            else:
                opt = torch.optim.SGD(groups, lr=lr)
            kernels = [m for n, m in model.named_parameters() if ".bca_kernels." in n]
            tag = f"p={p} {'lr/p' if divide else 'lr'}"
            losses, norms, secs = train_method(
                model,
                opt,
                tokenizer,
                ds.train_texts,
                ds.train_labels,
                s,
                desc=f"stability {tag}",
                progress=opts.progress,
                norm_params=kernels,
            )
            finite = all(math.isfinite(x) for x in losses) and len(losses) == steps
            acc = float("nan")
            if finite:
                acc, _ = evaluate(
                    model, tokenizer, ds.test_texts, ds.test_labels, ds.max_length, ds.num_labels
                )
            knorm = math.sqrt(sum(float(k.detach().double().pow(2).sum()) for k in kernels))
            k = max(1, len(losses) // 10)
            run = {
                "block_size": p,
                "lr_divided_by_p": divide,
                "kernel_lr": lr / p if divide else lr,
                "losses": losses,
                "grad_norms": norms,
                "final_loss": sum(losses[-k:]) / k if losses else float("nan"),
                "accuracy": acc,
                "max_grad_norm": max(norms) if norms else float("nan"),
                "median_grad_norm": statistics.median(norms) if norms else float("nan"),
                "kernel_norm": knorm,
                "finite": finite,
                "seconds": secs,
            }
            runs.append(run)
            tqdm.write(
                f"{tag}: final loss {run['final_loss']:.3f}, accuracy {100 * acc:.1f}%, "
                f"grad norm median {run['median_grad_norm']:.3g} max {run['max_grad_norm']:.3g}"
                f"{'' if finite else ' (diverged)'}"
            )
            del model, opt
    header = [
        "block size p",
        "kernel lr",
        "final loss",
        "held-out accuracy",
        "median ‖∇C‖",
        "max ‖∇C‖",
        "final ‖C‖",
        "finite",
    ]
    rows = [
        [
            r["block_size"],
            f"{r['kernel_lr']:.3g}" + (" (lr/p)" if r["lr_divided_by_p"] else " (lr)"),
            f"{r['final_loss']:.3f}",
            f"{100 * r['accuracy']:.1f}%" if math.isfinite(r["accuracy"]) else "—",
            f"{r['median_grad_norm']:.3g}",
            f"{r['max_grad_norm']:.3g}",
            f"{r['kernel_norm']:.3g}",
            "yes" if r["finite"] else "NO",
        ]
        for r in runs
    ]
    table = markdown_table(header, rows)
    plot_curves(
        out / "stability_loss.png",
        {
            f"p={r['block_size']} {'lr/p' if r['lr_divided_by_p'] else 'lr'}": r["losses"]
            for r in runs
        },
        title=f"BCA training loss, {opts.optimizer} base lr {lr:g}",
        ylabel="cross-entropy",
        smooth=max(1, steps // 15),
    )
    plot_curves(
        out / "stability_grad_norm.png",
        {
            f"p={r['block_size']} {'lr/p' if r['lr_divided_by_p'] else 'lr'}": r["grad_norms"]
            for r in runs
        },
        title="L2 norm of the kernels' gradient",
        ylabel="‖∇C‖ (log)",
        logy=True,
    )
    _combined_plot(out / "stability.png", runs, opts.optimizer, lr)
    wall = time.perf_counter() - t_all
    md = [
        "# BCA stable-training experiment",
        "",
        f"all-MiniLM-L6-v2, BCA on query and value, {ds.name} ({len(ds.train_texts)} training "
        f"examples, {steps} steps of batch {batch}, seed {opts.seed}; accuracy on "
        f"{len(ds.test_texts)} held-out examples). Optimizer {opts.optimizer}, base lr {lr:g}; "
        "classifier head at the base lr in every run.",
        "",
        table,
        "",
        "![stability](stability.png)",
        "",
        f"Wall time {wall:.0f}s with {opts.threads} threads.",
    ]
    (out / "stability.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    write_json(
        out / "stability.json",
        {"options": asdict(opts), "lr": lr, "steps": steps, "batch_size": batch, "runs": runs},
    )
    return StabilityOutcome(out, runs, table)


def _combined_plot(path: Path, runs: list[dict[str, Any]], optimizer: str, lr: float) -> None:
    from .report import pyplot, smoothed

    plt = pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=110)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    sizes = sorted({r["block_size"] for r in runs})
    for r in runs:
        c = colors[sizes.index(r["block_size"]) % len(colors)]
        style = "-" if r["lr_divided_by_p"] else "--"
        label = f"p={r['block_size']} {'lr/p' if r['lr_divided_by_p'] else 'lr'}"
        xs = list(range(1, len(r["losses"]) + 1))
        w = max(1, len(xs) // 15)
        a1.plot(
            xs,
            smoothed([v if math.isfinite(v) else float("nan") for v in r["losses"]], w),
            style,
            color=c,
            label=label,
        )
        a2.plot(
            list(range(1, len(r["grad_norms"]) + 1)),
            r["grad_norms"],
            style,
            color=c,
            label=label,
            linewidth=1,
        )
    a1.set_title("training loss (smoothed)")
    a1.set_xlabel("step")
    a1.set_ylabel("cross-entropy")
    a2.set_title("kernel gradient L2 norm")
    a2.set_xlabel("step")
    a2.set_yscale("log")
    for a in (a1, a2):
        a.grid(True, alpha=0.3)
        a.legend(fontsize=7)
    fig.suptitle(
        f"BCA with and without lr ÷ p ({optimizer}, base lr {lr:g}); solid: lr/p, dashed: lr"
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
