"""Training-step benchmark of one adapted layer: bca (rust, torch) vs PEFT C3A and LoRA.

For each width d (square layer d x d), block size p and row count N, every contender
runs a training step, forward then backward with respect to the adapter's parameters
and the layer input, in two scopes:

* ``adapter``: the adapter path alone (bca ``adapter_forward``; PEFT C3A's
  ``BlockCircularConvolution.apply(x, w) / d`` exactly as its layer runs it; LoRA
  ``B(A(x)) * scaling``),
* ``layer``: the whole adapted layer (frozen dense base + adapter), as a model sees it.

Contenders run round-robin inside each repeat (same threads, same inputs), and the
median over repeats is reported with ratios against PEFT C3A. Memory: on CUDA the peak
``torch.cuda.max_memory_allocated`` of a step above the memory held before it; on CPU
the bytes of the tensors saved for backward (``torch.autograd.graph.saved_tensors_hooks``,
unique storages, parameters excluded) — a proxy: it sees what autograd keeps alive
between forward and backward, not transient buffers — plus, for bca-rust, what the Rust
core keeps between steps (``BlockCirculant.retained_bytes``: kernel copy, cached spectra,
idle workspaces; its batch buffers are freed when each call returns).

    python benches/bench_train.py                   # CPU, 2 threads
    python benches/bench_train.py --device cuda     # GPU (backend rust skipped)
    python benches/bench_train.py --device cuda --compile reduce-overhead

``--compile MODE`` adds a ``torch.compile(fn, mode=MODE)`` twin of every contender
(named ``<contender>+compile``) to the same round robin, and a ratio against the
compiled PEFT C3A. ``reduce-overhead`` replays CUDA graphs, which removes most of the
per-kernel launch cost that dominates small steps on a GPU. On CPU the memory proxy is
not measured for compiled twins (their saved tensors live inside the compiled graph).

Writes ``benches/results/train_<device>.json``, ``.md`` and ``.png``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

if importlib.util.find_spec("bca") is None:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from bca.nn import BlockCirculantLinear, rust_available

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Contender:
    name: str
    step: Callable[[], None]  # one forward + backward
    params: list[torch.Tensor]  # trainable parameters (grads reset between steps)
    compiled: bool = False
    # bytes held outside torch between steps (the Rust core's kernel, spectra, workspaces)
    held_bytes: Callable[[], int] | None = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def build_contenders(
    d: int,
    p: int,
    n: int,
    device: torch.device,
    scope: str,
    backends: list[str],
    compile_mode: str | None = None,
) -> tuple[list[Contender], list[torch.Tensor]]:
    """Contenders for one (d, p, N, scope); all share the same input and output grad."""
    from peft import C3AConfig, LoraConfig, get_peft_model
    from peft.tuners.c3a.utils import BlockCircularConvolution

    gen = torch.Generator().manual_seed(0)
    base = nn.Linear(d, d).to(device)
    for prm in base.parameters():
        prm.requires_grad_(False)
    x = torch.randn(n, d, generator=gen).to(device).requires_grad_(True)
    g = torch.randn(n, d, generator=gen).to(device)
    out: list[Contender] = []

    def make_step(fn: Callable[[torch.Tensor], torch.Tensor], params: list[torch.Tensor]):
        def step() -> None:
            x.grad = None
            for prm in params:
                prm.grad = None
            fn(x).backward(g)

        return step

    bca_fns: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
    for backend in backends:
        m = BlockCirculantLinear(base, p, backend=backend, init="xavier_uniform").to(device)
        fn = m.adapter_forward if scope == "adapter" else m
        bca_fns[f"bca-{backend}"] = fn
        held = None
        if backend == "rust":

            def held(m: BlockCirculantLinear = m) -> int:
                op = m._adapters[m.active_adapters[0]].rust_op
                return 0 if op is None else int(op.retained_bytes)

        out.append(
            Contender(f"bca-{backend}", make_step(fn, [m.bca_kernel]), [m.bca_kernel], False, held)
        )

    c3a = get_peft_model(
        nn.Sequential(OrderedDict(lin=base)),
        C3AConfig(block_size=p, target_modules=["lin"], init_weights="xavier_uniform"),
    )
    c3a_layer = c3a.base_model.model.lin
    kernel = c3a_layer.c3a_kernel["default"]
    if scope == "adapter":

        def c3a_fn(v: torch.Tensor) -> torch.Tensor:  # PEFT's C3ALinear.forward, adapter part
            v = v.to(torch.float32)
            y: torch.Tensor = BlockCircularConvolution.apply(v, kernel.to(torch.float32))
            return y / v.size(-1)

    else:
        c3a_fn = c3a_layer
    out.append(Contender("peft-c3a", make_step(c3a_fn, [kernel]), [kernel]))

    lora = get_peft_model(
        nn.Sequential(OrderedDict(lin=base)),
        LoraConfig(r=8, lora_alpha=16, target_modules=["lin"], init_lora_weights="gaussian"),
    )
    lora_layer = lora.base_model.model.lin
    lora_a, lora_b = lora_layer.lora_A["default"], lora_layer.lora_B["default"]
    scaling = lora_layer.scaling["default"]
    lora_params = [lora_a.weight, lora_b.weight]
    if scope == "adapter":

        def lora_fn(v: torch.Tensor) -> torch.Tensor:
            y: torch.Tensor = lora_b(lora_a(v)) * scaling
            return y

    else:
        lora_fn = lora_layer
    out.append(Contender("peft-lora-r8", make_step(lora_fn, lora_params), lora_params))
    if compile_mode is not None:
        fns = {**bca_fns, "peft-c3a": c3a_fn, "peft-lora-r8": lora_fn}
        out += [
            Contender(
                f"{c.name}+compile",
                make_step(torch.compile(fns[c.name], mode=compile_mode), c.params),
                c.params,
                compiled=True,
            )
            for c in list(out)
        ]
    return out, list(base.parameters())


def saved_bytes(step: Callable[[], None], params: set[int]) -> int:
    """Bytes of unique non-parameter storages autograd saves for backward in one step."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in params and t.device.type != "meta":
            seen[ptr] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values())


def cuda_peak_bytes(step: Callable[[], None], device: torch.device) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated(device) - before)


def bench_case(
    d: int,
    p: int,
    n: int,
    device: torch.device,
    scope: str,
    backends: list[str],
    repeats: int,
    budget_s: float,
    compile_mode: str | None = None,
) -> list[dict[str, Any]]:
    contenders, base_params = build_contenders(d, p, n, device, scope, backends, compile_mode)
    for c in contenders:  # warm-up (plans, caches, lazy init; compilation, CUDA graphs)
        for _ in range(5 if c.compiled else 2):
            c.step()
    _sync(device)
    times: dict[str, list[float]] = {c.name: [] for c in contenders}
    start = time.perf_counter()
    for r in range(repeats):
        for c in contenders:
            _sync(device)
            t0 = time.perf_counter()
            c.step()
            _sync(device)
            times[c.name].append(time.perf_counter() - t0)
        if r >= 4 and time.perf_counter() - start > budget_s:
            break
    rows = []
    frozen = {prm.untyped_storage().data_ptr() for prm in base_params}
    for c in contenders:
        param_ids = frozen | {prm.untyped_storage().data_ptr() for prm in c.params}
        mem: int | None
        if device.type == "cuda":
            mem, mem_kind = cuda_peak_bytes(c.step, device), "cuda_peak_allocated"
        elif c.compiled:  # saved tensors live inside the compiled graph: not seen by hooks
            mem, mem_kind = None, "not_measured"
        else:
            mem, mem_kind = saved_bytes(c.step, param_ids), "saved_for_backward"
            if c.held_bytes is not None:  # what the Rust core keeps between steps
                mem, mem_kind = mem + c.held_bytes(), "saved_for_backward+core_retained"
        ts = times[c.name]
        rows.append(
            {
                "d": d,
                "block_size": p,
                "rows": n,
                "scope": scope,
                "contender": c.name,
                "median_ms": 1e3 * statistics.median(ts),
                "min_ms": 1e3 * min(ts),
                "repeats": len(ts),
                "memory_bytes": mem,
                "memory_kind": mem_kind,
                "trainable_params": sum(prm.numel() for prm in c.params),
            }
        )
    ref = next(r for r in rows if r["contender"] == "peft-c3a")
    ref_c = next((r for r in rows if r["contender"] == "peft-c3a+compile"), None)
    for r in rows:
        r["speedup_vs_c3a"] = ref["median_ms"] / r["median_ms"]
        # against PEFT C3A run the same way (both compiled, or both eager)
        same = ref_c if r["contender"].endswith("+compile") and ref_c is not None else ref
        r["speedup_vs_c3a_same_mode"] = same["median_ms"] / r["median_ms"]
        mref = same["memory_bytes"]
        r["memory_vs_c3a"] = (
            r["memory_bytes"] / mref if mref and r["memory_bytes"] is not None else None
        )
    return rows


def write_markdown(rows: list[dict[str, Any]], meta: dict[str, Any], path: Path) -> None:
    lines = [
        f"# Training step of one adapted d x d layer ({meta['device_name']})",
        "",
        f"torch {meta['torch']}, peft {meta['peft']}, threads {meta['threads']}, "
        f"float32, median of up to {meta['repeats']} interleaved repeats. "
        "`speedup` = PEFT C3A time / contender time (higher is faster). "
        f"Memory: {meta['memory_note']}",
        "",
    ]
    compiled = bool(meta.get("compile"))
    if compiled:
        lines += [
            f"`+compile`: the contender under `torch.compile(mode={meta['compile']!r})`, in "
            "the same round robin. `vs C3A` compares with eager PEFT C3A; `same mode` with "
            "PEFT C3A run the same way (compiled twins against compiled C3A).",
            "",
        ]
    if meta.get("loadavg_before") is not None:
        lines += [
            f"Machine: {meta['cpu_count']} CPUs, 1-minute load average "
            f"{meta['loadavg_before'][0]:.1f} before and {meta['loadavg_after'][0]:.1f} after "
            "the run (other processes share these CPUs; compare ratios, not absolute times).",
            "",
        ]
    for scope in ("adapter", "layer"):
        sub = [r for r in rows if r["scope"] == scope]
        if not sub:
            continue
        same_h, same_a = (" speedup same mode |", "---:|") if compiled else ("", "")
        lines += [
            f"## scope: {scope}",
            "",
            f"| d | p | N | contender | median ms | speedup vs C3A |{same_h} memory MiB "
            "| memory vs C3A |",
            f"|---:|---:|---:|---|---:|---:|{same_a}---:|---:|",
        ]
        for r in sub:
            mvs = "" if r["memory_vs_c3a"] is None else f"{r['memory_vs_c3a']:.2f}"
            mem = "" if r["memory_bytes"] is None else f"{r['memory_bytes'] / 2**20:.3f}"
            same = f" {r['speedup_vs_c3a_same_mode']:.2f} |" if compiled else ""
            lines.append(
                f"| {r['d']} | {r['block_size']} | {r['rows']} | {r['contender']} | "
                f"{r['median_ms']:.3f} | {r['speedup_vs_c3a']:.2f} |{same} {mem} | {mvs} |"
            )
        lines.append("")
    path.write_text("\n".join(lines))


def plot(rows: list[dict[str, Any]], meta: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return
    scopes = [s for s in ("adapter", "layer") if any(r["scope"] == s for r in rows)]
    fig, axes = plt.subplots(1, len(scopes), figsize=(7 * len(scopes), 4.5), squeeze=False)
    names = list(dict.fromkeys(r["contender"] for r in rows))
    for ax, scope in zip(axes[0], scopes, strict=True):
        sub = [r for r in rows if r["scope"] == scope]
        cases = list(dict.fromkeys((r["d"], r["block_size"], r["rows"]) for r in sub))
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            vals = []
            for case in cases:
                hit = [r for r in sub if (r["d"], r["block_size"], r["rows"]) == case]
                hit = [r for r in hit if r["contender"] == name]
                vals.append(hit[0]["speedup_vs_c3a"] if hit else math.nan)
            ax.bar([k + i * width for k in range(len(cases))], vals, width, label=name)
        ax.set_xticks([k + 0.4 - width / 2 for k in range(len(cases))])
        ax.set_xticklabels([f"d={a}\np={b}\nN={c}" for a, b, c in cases], fontsize=8)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_yscale("log")
        ax.set_ylabel("speedup vs PEFT C3A (training step)")
        ax.set_title(f"{meta['device_name']}: {scope}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dims", default="768,4096")
    ap.add_argument("--rows", default="1,32,512")
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--scopes", default="adapter,layer")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--budget", type=float, default=20.0, help="seconds per case (soft)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--tag", default=None, help="file name suffix (default: device)")
    ap.add_argument(
        "--compile",
        default=None,
        metavar="MODE",
        help="also run every contender under torch.compile(mode=MODE), e.g. default or "
        "reduce-overhead (CUDA graphs)",
    )
    args = ap.parse_args(argv)

    import peft
    from tqdm import tqdm

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA not available", file=sys.stderr)
        return 2
    backends = ["torch"]
    if device.type == "cpu" and rust_available():
        import bca

        bca.set_num_threads(args.threads)
        backends = ["rust", "torch"]
    cases = [
        (d, min(args.block_size, d), n, scope)
        for scope in args.scopes.split(",")
        for d in map(int, args.dims.split(","))
        for n in map(int, args.rows.split(","))
    ]
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    rows: list[dict[str, Any]] = []
    for d, p, n, scope in tqdm(cases, desc="cases"):
        case_rows = bench_case(
            d, p, n, device, scope, backends, args.repeats, args.budget, args.compile
        )
        rows += case_rows
        last = case_rows
        tqdm.write(
            f"{scope:7s} d={d:5d} p={p:4d} N={n:4d}  "
            + "  ".join(f"{r['contender']}={r['median_ms']:.3f}ms" for r in last)
        )
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    meta = {
        "device": args.device,
        "device_name": device_name,
        "threads": args.threads,
        "torch": torch.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "repeats": args.repeats,
        "compile": args.compile,
        "cpu_count": os.cpu_count(),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "memory_note": (
            "peak torch.cuda.max_memory_allocated during one step above the memory held before it"
            if device.type == "cuda"
            else "bytes of tensors autograd saves for backward (saved_tensors_hooks, unique "
            "storages, parameters excluded); a proxy that ignores transient buffers"
        ),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"train_{args.tag or args.device}"
    (args.out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    write_markdown(rows, meta, args.out / f"{stem}.md")
    plot(rows, meta, args.out / f"{stem}.png")
    print((args.out / f"{stem}.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
