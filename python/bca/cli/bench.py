"""``bca bench``: the benches of a source checkout, or a quick built-in layer comparison."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from ._common import CLIError, int_list, need, positive_int


def add_parser(sub: Any, fmt: type[argparse.HelpFormatter]) -> None:
    b = sub.add_parser(
        "bench",
        formatter_class=fmt,
        help="a quick built-in comparison of one adapted layer, or a bench script of a "
        "source checkout",
        description="Without NAME: a quick built-in comparison of one adapted layer's extra "
        "work (dense ΔW, bca's rust and torch backends, PEFT C3A) at a few sizes, timed in "
        "process CPU time, with a warning when the machine is busy. With NAME: run "
        "benches/bench_NAME.py of a source checkout (core, train, onnx, ...; see --list), "
        "e.g. `bca bench core -- --threads 1`.",
    )
    b.add_argument(
        "name", nargs="?", default=None, help="bench script to run (see --list); omit for built-in"
    )
    b.add_argument(
        "bench_args",
        nargs=argparse.REMAINDER,
        metavar="-- ARGS",
        help="arguments passed on to the bench script",
    )
    b.add_argument(
        "--threads", type=positive_int, default=2, help="threads for every contender (both forms)"
    )
    scripts = b.add_argument_group("bench scripts (bca bench NAME)")
    scripts.add_argument("--list", action="store_true", help="list the bench scripts found")
    scripts.add_argument(
        "--benches-dir",
        default=None,
        metavar="DIR",
        help="folder holding bench_*.py (default: benches/ here or in the source checkout)",
    )
    builtin = b.add_argument_group("built-in comparison (bca bench)")
    builtin.add_argument(
        "--sizes", type=int_list, default=[384, 768], metavar="D,D,...", help="hidden sizes d"
    )
    builtin.add_argument(
        "--block-size", type=positive_int, default=64, help="block size p, dividing every d"
    )
    builtin.add_argument(
        "--rows", type=int_list, default=[1, 128], metavar="N,N,...", help="batch rows"
    )
    builtin.add_argument(
        "--repeats",
        type=positive_int,
        default=30,
        help="at least this many timed samples per cell, more until they agree",
    )
    builtin.add_argument(
        "--clock",
        default="cpu",
        choices=["cpu", "wall"],
        help="cpu: this process's CPU time, all threads (not inflated by a busy machine); "
        "wall: elapsed time",
    )


def _benches_dir(given: str | None) -> Path | None:
    if given is not None:
        p = Path(given)
        if not p.is_dir():
            raise CLIError(f"--benches-dir {given!r} is not a folder")
        return p
    for cand in (Path.cwd() / "benches", Path(__file__).resolve().parents[3] / "benches"):
        if cand.is_dir() and any(cand.glob("bench_*.py")):
            return cand
    return None


def run(args: argparse.Namespace) -> int:
    folder = _benches_dir(args.benches_dir)
    found = sorted(folder.glob("*.py")) if folder else []
    names = [p.stem.removeprefix("bench_") for p in found if not p.stem.startswith("_")]
    if args.list:
        if not names:
            print(
                "no benches/ folder found (run from a source checkout); `bca bench` runs the "
                "built-in comparison"
            )
        for n in names:
            print(n)
        return 0
    if args.name is not None:
        if folder is None:
            raise CLIError(
                "no benches/ folder found (run from a source checkout or pass --benches-dir)"
            )
        if args.name not in names:
            raise CLIError(f"no bench named {args.name!r}; available: {', '.join(names) or 'none'}")
        script = folder / (
            f"bench_{args.name}.py"
            if (folder / f"bench_{args.name}.py").exists()
            else f"{args.name}.py"
        )
        extra = [a for a in args.bench_args if a != "--"]
        env = dict(
            os.environ, OMP_NUM_THREADS=str(args.threads), RAYON_NUM_THREADS=str(args.threads)
        )
        return subprocess.call([sys.executable, str(script), *extra], env=env)
    need("the built-in bench", ["torch"])
    from ..demo.bench import builtin_bench

    print(
        builtin_bench(
            args.sizes, args.block_size, args.rows, args.repeats, args.threads, clock=args.clock
        )
    )
    return 0
