"""Two builds of the Rust core side by side in one process: forward, backward (input and
kernel gradients) and the input gradient alone, calls interleaved A, B, A, B, ...

    git worktree add /tmp/bca-old <commit>
    (cd /tmp/bca-old && cargo build --release --features python)
    cargo build --release --features python
    python benches/bench_builds.py --a /tmp/bca-old/target/release/libbca.so \\
        --b target/release/libbca.so --threads 1 --out benches/results

Each build is loaded from its shared library (``libbca.so`` of ``cargo build``, or an
installed ``_bca.abi3.so``) under its own module object, so both run in the same process
on the same inputs. One thread: the median thread CPU time of each call (robust to a
noisy machine); several threads: the median wall time. The table also says whether the
two builds give the same bits (forward, and both gradients).
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from _timing import machine_info, markdown_table, write_results

CASES = ["4096/16", "4096/32", "4096/64", "4096/128", "4096/256", "4096/4096", "768/64", "768/256"]


def load_build(path: str, tag: str, tmp: Path) -> ModuleType:
    """The extension at ``path`` as a fresh module (a copy, so two builds can coexist)."""
    dst = tmp / f"_bca_{tag}.so"
    shutil.copy(path, dst)
    loader = importlib.machinery.ExtensionFileLoader("_bca", str(dst))
    spec = importlib.util.spec_from_file_location("_bca", dst, loader=loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def uptime() -> str:
    try:
        with open("/proc/loadavg") as f:
            return "load average " + ", ".join(f.read().split()[:3])
    except OSError:
        return "load average unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--a", required=True, help="the base build's shared library")
    ap.add_argument("--b", required=True, help="the new build's shared library")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=25, help="calls of each per round")
    ap.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="rounds, each with new operators and arrays (where they land in memory moves "
        "the times by several percent); the medians of the rounds are reported",
    )
    ap.add_argument("--cases", default=",".join(CASES), help="d/p,d/p,...")
    ap.add_argument("--tag", default="", help="suffix of the result files' names")
    ap.add_argument("--out", type=Path, default=None, help="folder for .md and .json")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        builds = {
            "A": load_build(args.a, "a", Path(tmp)),
            "B": load_build(args.b, "b", Path(tmp)),
        }
        for m in builds.values():
            m.set_num_threads(args.threads)
        clock = time.thread_time_ns if args.threads == 1 else time.perf_counter_ns
        load_before = uptime()
        records = []
        for case in args.cases.split(","):
            d, p = map(int, case.split("/"))
            rounds = [
                _case(builds, d, p, args.rows, args.repeats, clock) for _ in range(args.rounds)
            ]
            records.append(_combine(rounds))
            r = records[-1]
            print(
                f"d={d} p={p}: fwd B/A {r['fwd']['ratio']:.3f}, bwd B/A {r['bwd']['ratio']:.3f}, "
                f"bwd_x B/A {r['bwd_x']['ratio']:.3f}, same bits {r['same_bits']}",
                flush=True,
            )
        load_after = uptime()

    meta = {
        "a": args.a,
        "b": args.b,
        "threads": args.threads,
        "rows": args.rows,
        "repeats": args.repeats,
        "rounds": args.rounds,
        "clock": "thread CPU time" if args.threads == 1 else "wall",
        "machine": _machine(machine_info()),
        "load_before": load_before,
        "load_after": load_after,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    md = _markdown(records, meta)
    print(md)
    if args.out is not None:
        stem = f"builds{('_' + args.tag) if args.tag else ''}"
        write_results(stem, {"meta": meta, "records": records}, md, args.out)
    return 0


def _case(
    builds: dict[str, ModuleType], d: int, p: int, rows: int, repeats: int, clock: Any
) -> dict:
    q = d // p
    rng = np.random.default_rng(0)
    k = (rng.standard_normal((q, q, p)) / d).astype(np.float32)
    x = rng.standard_normal((rows, d)).astype(np.float32)
    g = rng.standard_normal((rows, d)).astype(np.float32)
    ops = {name: m.BlockCirculantOperator(k, d, d) for name, m in builds.items()}
    calls = {}
    for name, op in ops.items():
        calls[(name, "fwd")] = lambda op=op: op.forward(x)
        calls[(name, "bwd")] = lambda op=op: op.backward(x, g, input_grad=True, kernel_grad=True)
        calls[(name, "bwd_x")] = lambda op=op: op.backward(
            None, g, input_grad=True, kernel_grad=False
        )
    for fn in calls.values():  # warm up
        fn()
    samples: dict[tuple[str, str], list[int]] = {key: [] for key in calls}
    for _ in range(repeats):
        for key, fn in calls.items():
            t0 = clock()
            fn()
            samples[key].append(clock() - t0)
    out: dict[str, Any] = {"d": d, "p": p}
    for what in ("fwd", "bwd", "bwd_x"):
        a = statistics.median(samples[("A", what)]) / 1e6
        b = statistics.median(samples[("B", what)]) / 1e6
        out[what] = {"a_ms": a, "b_ms": b, "ratio": b / a}
    ya, yb = ops["A"].forward(x), ops["B"].forward(x)
    ga = ops["A"].backward(x, g, input_grad=True, kernel_grad=True)
    gb = ops["B"].backward(x, g, input_grad=True, kernel_grad=True)
    out["same_bits"] = bool(
        np.array_equal(ya, yb) and all(np.array_equal(u, v) for u, v in zip(ga, gb, strict=True))
    )
    return out


def _combine(rounds: list[dict]) -> dict:
    """The medians over rounds of each time and ratio, with the ratios' range."""
    out: dict[str, Any] = {"d": rounds[0]["d"], "p": rounds[0]["p"]}
    for what in ("fwd", "bwd", "bwd_x"):
        ratios = [r[what]["ratio"] for r in rounds]
        out[what] = {
            "a_ms": statistics.median(r[what]["a_ms"] for r in rounds),
            "b_ms": statistics.median(r[what]["b_ms"] for r in rounds),
            "ratio": statistics.median(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
        }
    out["same_bits"] = all(r["same_bits"] for r in rounds)
    out["rounds"] = rounds
    return out


def _markdown(records: list[dict], meta: dict) -> str:
    lines = [
        f"<!-- {meta['date']}; `python benches/bench_builds.py --a A --b B "
        f"--threads {meta['threads']}` -->",
        "# Two builds of the core, side by side (float32, "
        f"{meta['rows']} rows, {meta['threads']} thread(s), median {meta['clock']})",
        "",
        f"A: `{meta['a']}`; B: `{meta['b']}`. Calls interleaved A, B in one process, "
        f"{meta['repeats']} of each per round; {meta['rounds']} rounds, each with new "
        "operators and arrays; times and ratios are the medians over rounds (the ratios' "
        "range in brackets). *bwd*: input and kernel gradients; *bwd_x*: the input "
        "gradient alone. *same bits*: forward and both gradients equal bit for bit. "
        "Ratios < 1 mean B is faster.",
        "",
    ]
    header = ["d", "p"]
    rows = []
    for r in records:
        cells = [str(r["d"]), str(r["p"])]
        for what in ("fwd", "bwd", "bwd_x"):
            v = r[what]
            spread = f" ({v['ratio_min']:.2f}–{v['ratio_max']:.2f})"
            cells += [f"{v['a_ms']:.3f}", f"{v['b_ms']:.3f}", f"{v['ratio']:.3f}{spread}"]
        cells.append("yes" if r["same_bits"] else "no")
        rows.append(cells)
    for what in ("fwd", "bwd", "bwd_x"):
        header += [f"{what} A ms", f"{what} B ms", f"{what} B/A"]
    header.append("same bits")
    lines += [
        markdown_table(header, rows),
        f"Machine: {meta['machine']}; {meta['load_before']} before, {meta['load_after']} after.",
        "",
    ]
    return "\n".join(lines)


def _machine(info: dict[str, Any]) -> str:
    """CPU model, SIMD level and CPU count (see ``_timing.machine_info``)."""
    cpu = info.get("cpu") or info["machine"]
    return f"{cpu} ({info.get('simd', 'unknown SIMD')}), {info['cpu_count']} CPUs"


if __name__ == "__main__":
    sys.exit(main())
