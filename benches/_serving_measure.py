"""bench_serving, part 2 of 3: measure. The memory worker (run in a fresh process
through ``bench_serving.py --memory-worker``), the switch, memory, graph-optimisation and
one-layer benches, and their statistics helpers (quartiles, median CI, switch verdicts).

The entry point is benches/bench_serving.py.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from _serving_prepare import (
    SEQ,
    Artifacts,
    _load_adapter,
    _malloc_trim,
    _mem_available,
    _proc_status,
    _raw_write_adapter,
    _run_options,
    _session,
    _session_options,
    _token_feeds,
    ensure_baked,
)
from _timing import time_rounds

HERE = Path(__file__).resolve().parent
LEVELS = ("BASIC", "EXTENDED", "ALL")


# --------------------------------------------------------------------------------------
# memory worker: a fresh process per scenario
# --------------------------------------------------------------------------------------
def memory_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one memory scenario in this (fresh) process and return its RSS readings.

    kinds: ``import`` (onnxruntime imported, nothing else), ``session`` (one session of
    ``path``), ``servable`` (one session of ``path`` plus ``adapters`` loaded, each used
    once), ``sessions`` (one session per file in ``paths``, each run once).
    """
    import onnxruntime  # noqa: F401  (the baseline includes the library)

    api = spec.get("backend") == "api"
    if api:
        import bca.onnx as bo  # the baseline includes bca.onnx (and onnx) too
    feeds = _token_feeds()
    threads = int(spec.get("threads", 1))
    gc.collect()
    _malloc_trim()
    before = _proc_status()
    out: dict[str, Any] = {"kind": spec["kind"], "before": before}
    keep: list[Any] = []
    t0 = time.perf_counter()
    if spec["kind"] == "session":
        s = _session(spec["path"], threads)
        s.run(None, feeds)
        keep.append(s)
    elif spec["kind"] == "servable" and api:
        sess = bo.AdapterSession(spec["path"], sess_options=_session_options(threads))
        sess.run(None, feeds)
        keep.append(sess)
        gc.collect()
        _malloc_trim()
        out["after_session"] = _proc_status()
        loads: list[float] = []
        for i, p in enumerate(spec["adapters"]):
            t = time.perf_counter()
            sess.load_adapter(f"a{i}", p)
            loads.append(time.perf_counter() - t)
            sess.run(None, feeds, adapter=f"a{i}")
    elif spec["kind"] == "servable":
        s = _session(spec["path"], threads)
        s.run(None, feeds)
        keep.append(s)
        gc.collect()
        _malloc_trim()
        out["after_session"] = _proc_status()
        loads = []
        for p in spec["adapters"]:
            t = time.perf_counter()
            a = _load_adapter(p)
            loads.append(time.perf_counter() - t)
            ro = _run_options(a)
            s.run(None, feeds, ro)
            keep += [a, ro]
        if loads:
            out["adapter_load_median_s"] = statistics.median(loads)
    elif spec["kind"] == "sessions":
        for p in spec["paths"]:
            s = _session(p, threads)
            s.run(None, feeds)
            keep.append(s)
    out["elapsed_s"] = time.perf_counter() - t0
    gc.collect()
    out["after_untrimmed"] = _proc_status()
    _malloc_trim()
    out["after"] = _proc_status()
    out["delta_rss"] = out["after"]["VmRSS"] - before["VmRSS"]
    out["delta_rss_untrimmed"] = out["after_untrimmed"]["VmRSS"] - before["VmRSS"]
    if "after_session" in out:  # what the adapters added, within this process
        out["adapters_rss"] = out["after"]["VmRSS"] - out["after_session"]["VmRSS"]
    return out


def _spawn_memory(spec: dict[str, Any]) -> dict[str, Any]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(HERE / "bench_serving.py"), "--memory-worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"memory worker failed ({spec['kind']}):\n{proc.stderr[-3000:]}")
    res: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return res


# --------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------
def _quartiles(xs: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(xs, n=4) if len(xs) >= 2 else [xs[0]] * 3
    return q[0], statistics.median(xs), q[2]


class _Cycle:
    """Calls ``fns[i % len(fns)]`` on the i-th call: a different one every request."""

    def __init__(self, fns: list[Callable[[], Any]]) -> None:
        self.fns = fns
        self.i = 0

    def __call__(self) -> Any:
        fn = self.fns[self.i % len(self.fns)]
        self.i += 1
        return fn()


SAME = "same adapter every call"
RR = "round robin over K"


def bench_switch(
    art: Artifacts,
    threads: int,
    k_switch: int,
    repeats: int,
    n_new: int,
    switch_budget_s: float,
) -> dict[str, Any]:
    """Per-request latency of every way of serving K adapters, timed round-robin; then
    the switch alone (same adapter vs all loaded adapters in turn) with many rounds."""
    feeds = _token_feeds(vocab=art.vocab)
    k = min(k_switch, len(art.adapters), len(art.baked))
    paths = art.adapters[:k]
    all_paths = art.adapters
    base = _session(art.base, threads)
    constant = _session(art.constant, threads)
    if art.backend == "api":
        import bca.onnx as bo

        asess = bo.AdapterSession(art.servable, sess_options=_session_options(threads))
        for i, p in enumerate(all_paths):
            asess.load_adapter(f"a{i}", p)
        serv = asess.session
        main = "AdapterSession.run(adapter=name)"

        def run_main(i: int, f: dict[str, np.ndarray] = feeds) -> Any:
            return asess.run(None, f, adapter=f"a{i}")

        def run_cold(i: int) -> Any:
            asess.load_adapter("cold", paths[i])
            return asess.run(None, feeds, adapter="cold")

        cold = "AdapterSession.load_adapter (file checked and loaded) + run, per call"
    else:
        serv = _session(art.servable, threads)
        main = "LoraAdapter, new RunOptions per call"
        loaded = [_load_adapter(p) for p in all_paths]

        def run_main(i: int, f: dict[str, np.ndarray] = feeds) -> Any:
            return serv.run(None, f, _run_options(loaded[i]))

        def run_cold(i: int) -> Any:
            return serv.run(None, feeds, _run_options(_load_adapter(paths[i])))

        cold = "LoraAdapter.Load + run, per call"
    adapters = [_load_adapter(p) for p in paths]
    ros = [_run_options(a) for a in adapters]
    plain = [{**feeds, **f} for f in art.feeds[:k]]
    baked = [_session(p, threads) for p in art.baked[:k]]
    raw = "raw ORT, one cached RunOptions per adapter"
    contenders: dict[str, Callable[[], Any]] = {
        "base graph": lambda: base.run(None, feeds),
        "constant graph (adapter baked in)": lambda: constant.run(None, feeds),
        "servable graph, no adapter": lambda: serv.run(None, feeds),
        f"{main}, {SAME}": lambda: run_main(0),
        f"{main}, {RR}": _Cycle([partial(run_main, i) for i in range(k)]),
        f"{raw}, {SAME}": lambda: serv.run(None, feeds, ros[0]),
        f"{raw}, {RR}": _Cycle([partial(serv.run, None, feeds, ro) for ro in ros]),
        f"{cold}, {RR}": _Cycle([partial(run_cold, i) for i in range(k)]),
        f"spectra as plain feeds, {SAME}": lambda: serv.run(None, plain[0]),
        f"spectra as plain feeds, {RR}": _Cycle([partial(serv.run, None, f) for f in plain]),
        f"K sessions (adapter baked in each), {RR}": _Cycle(
            [partial(s.run, None, feeds) for s in baked]
        ),
    }
    res = time_rounds(contenders, repeats)
    # a new session per adapter: creation + first run (timed apart: far slower)
    new_cpu: list[float] = []
    new_wall: list[float] = []
    for i in range(n_new):
        w0, c0 = time.perf_counter(), time.process_time()
        s = _session(art.baked[i % k], threads)
        s.run(None, feeds)
        new_cpu.append(time.process_time() - c0)
        new_wall.append(time.perf_counter() - w0)
        del s
    rows: dict[str, Any] = {}
    for name, v in res.items():
        rows[name] = {
            "cpu_q": _quartiles(v["cpu"]),
            "wall_q": _quartiles(v["wall"]),
            "samples": len(v["cpu"]),
        }
    rows["new session per adapter: creation + first run"] = {
        "cpu_q": _quartiles(new_cpu),
        "wall_q": _quartiles(new_wall),
        "samples": n_new,
    }

    def paired(a: str, b: str) -> dict[str, tuple[float, float, float]]:
        return {
            m: _quartiles([x - y for x, y in zip(res[a][m], res[b][m], strict=True)])
            for m in ("cpu", "wall")
        }

    derived = {
        "switch_cost": paired(f"{main}, {RR}", f"{main}, {SAME}"),
        "switch_cost_raw": paired(f"{raw}, {RR}", f"{raw}, {SAME}"),
        "main_vs_raw": paired(f"{main}, {SAME}", f"{raw}, {SAME}"),
        "cold_switch_cost": paired(f"{cold}, {RR}", f"{main}, {SAME}"),
        "plain_feeds_switch_cost": paired(
            f"spectra as plain feeds, {RR}", f"spectra as plain feeds, {SAME}"
        ),
        "servable_vs_constant": paired(f"{raw}, {SAME}", "constant graph (adapter baked in)"),
        "servable_default_vs_base": paired("servable graph, no adapter", "base graph"),
        "k_sessions_vs_one_session": paired(
            f"K sessions (adapter baked in each), {RR}", f"{main}, {RR}"
        ),
    }
    labels = {
        "switch_cost": f"**switch cost**: {main}, round robin − same adapter",
        "switch_cost_raw": f"switch cost, {raw}",
        "main_vs_raw": f"{main} − {raw} (same adapter)",
        "cold_switch_cost": f"{cold} − warm, same adapter",
        "plain_feeds_switch_cost": "switch cost with spectra as plain feeds",
        "servable_vs_constant": "servable + adapter (raw) − constant graph",
        "servable_default_vs_base": "servable graph, no adapter − base graph",
        "k_sessions_vs_one_session": "K sessions round robin − one session round robin",
    }
    # the switch alone: same adapter vs all loaded adapters in turn, through the main
    # path and through raw ORT with cached RunOptions, as many rounds as fit the budget;
    # at the bench's sequence length and at 1 token (the switch reads the same spectra and
    # binds the same tensors at any length; a shorter call has less noise around it)
    n_all = len(all_paths)
    all_loras = [_load_adapter(p) for p in all_paths]  # kept alive for their RunOptions
    all_ros = [_run_options(a) for a in all_loras]
    rr_all = f"round robin over {n_all}"
    switch: dict[str, Any] = {"k": n_all, "by_tokens": {}}
    for tokens in (SEQ, 1):
        f = _token_feeds(seq=tokens, vocab=art.vocab)
        pair: dict[str, Callable[[], Any]] = {
            f"main/{SAME}": partial(run_main, 0, f),
            f"main/{rr_all}": _Cycle([partial(run_main, i, f) for i in range(n_all)]),
            f"raw/{SAME}": partial(serv.run, None, f, all_ros[0]),
            f"raw/{rr_all}": _Cycle([partial(serv.run, None, f, ro) for ro in all_ros]),
        }
        t0 = time.perf_counter()
        for fn in pair.values():
            fn()
        once = (time.perf_counter() - t0) / len(pair)
        rounds = int(min(400, max(repeats, switch_budget_s / 2 / max(4 * once, 1e-4))))
        sw = time_rounds(pair, rounds)

        def ci(path: str, m: str, sw: dict[str, dict[str, list[float]]] = sw) -> dict[str, float]:
            a, b = sw[f"{path}/{rr_all}"][m], sw[f"{path}/{SAME}"][m]
            return _median_ci([x - y for x, y in zip(a, b, strict=True)])

        switch["by_tokens"][tokens] = {
            "rounds": rounds,
            **{m: ci("main", m) for m in ("cpu", "wall")},
            "raw": {m: ci("raw", m) for m in ("cpu", "wall")},
            "same_cpu_q": _quartiles(sw[f"main/{SAME}"]["cpu"]),
            "same_wall_q": _quartiles(sw[f"main/{SAME}"]["wall"]),
        }
    # the bench's sequence length is the headline
    switch.update(switch["by_tokens"][SEQ])
    return {
        "threads": threads,
        "k": k,
        "repeats": repeats,
        "main": main,
        "rows": rows,
        "derived": derived,
        "labels": labels,
        "switch": switch,
    }


def _median_ci(xs: list[float], z: float = 1.96) -> dict[str, float]:
    """Median of ``xs`` with a distribution-free ~95 % confidence interval (order
    statistics n/2 ± z·√n/2)."""
    v = sorted(xs)
    n = len(v)
    h = z * np.sqrt(n) / 2
    lo = max(0, int(np.floor(n / 2 - h)))
    hi = min(n - 1, int(np.ceil(n / 2 + h)))
    return {"median": statistics.median(v), "ci_low": v[lo], "ci_high": v[hi], "n": n}


def _switch_overall(t: dict[str, Any]) -> str:
    """Verdict over CPU and wall time: the worse of the two."""
    verdicts = [switch_verdict(t[m]) for m in ("cpu", "wall")]
    for v in ("MISSED", "not resolved (CI spans the target)"):
        if v in verdicts:
            return v
    return "met"


def switch_verdict(ci: dict[str, float], target: float = 1e-3) -> str:
    if ci["ci_high"] <= target:
        return "met"
    if ci["ci_low"] > target:
        return "MISSED"
    return "not resolved (CI spans the target)"


# --------------------------------------------------------------------------------------
# memory
# --------------------------------------------------------------------------------------
def _spawn_median(spec: dict[str, Any], n: int) -> dict[str, Any]:
    """The run with the median Δ RSS of ``n`` fresh processes (all Δ RSS kept)."""
    runs = sorted((_spawn_memory(spec) for _ in range(n)), key=lambda r: r["delta_rss"])
    res = dict(runs[len(runs) // 2])
    res["delta_rss_all"] = [r["delta_rss"] for r in runs]
    return res


def bench_memory(art: Artifacts, ks: list[int], n_mem: int, bar: Any) -> dict[str, Any]:
    b = art.backend
    out: dict[str, Any] = {"ks": ks, "processes_per_row": n_mem}
    out["import"] = _spawn_median({"kind": "import", "backend": b}, n_mem)
    out["base"] = _spawn_median({"kind": "session", "path": str(art.base), "backend": b}, n_mem)
    out["constant"] = _spawn_median(
        {"kind": "session", "path": str(art.constant), "backend": b}, n_mem
    )
    out["servable"] = {}
    for k in [0, *ks]:
        bar.set_postfix_str(f"{art.cfg.key}: memory, servable + {k} adapters")
        out["servable"][k] = _spawn_median(
            {
                "kind": "servable",
                "backend": b,
                "path": str(art.servable),
                "adapters": [str(p) for p in art.adapters[:k]],
            },
            n_mem,
        )
    per_session = out["constant"]["delta_rss"]
    out["sessions"] = {}
    for k in ks:
        need = k * per_session
        avail = _mem_available()
        if need > 0.45 * avail:
            out["sessions"][k] = {
                "skipped": f"would need ~{need / 2**30:.1f} GiB of {avail / 2**30:.1f} GiB "
                "available",
                "estimate_delta_rss": need,
            }
            continue
        ensure_baked(art, k, bar)
        bar.set_postfix_str(f"{art.cfg.key}: memory, {k} sessions")
        out["sessions"][k] = _spawn_median(
            {"kind": "sessions", "backend": b, "paths": [str(p) for p in art.baked[:k]]},
            n_mem if k * per_session < 2**30 else 1,
        )
    return out


# --------------------------------------------------------------------------------------
# graph optimisation
# --------------------------------------------------------------------------------------
def _op_counts(path: Path) -> tuple[Counter[str], int, int]:
    import onnx

    m = onnx.load(str(path))
    ops = Counter(f"{n.domain + '.' if n.domain else ''}{n.op_type}" for n in m.graph.node)
    nbytes = sum(len(t.raw_data) for t in m.graph.initializer)
    return ops, len(m.graph.initializer), nbytes


def bench_optimisation(
    art: Artifacts,
    threads: int,
    repeats: int,
    n_create: int,
    tmp: Path,
    bar: Any,
    levels: tuple[str, ...] = LEVELS,
) -> dict[str, Any]:
    import onnxruntime as ort

    graphs = {"base": art.base, "constant": art.constant, "servable": art.servable}
    feeds = _token_feeds(vocab=art.vocab)
    out: dict[str, Any] = {"threads": threads, "levels": list(levels), "graphs": {}}
    for g, path in graphs.items():
        for level in levels:
            opt_path = tmp / f"{art.cfg.key}_{g}_{level}.opt.onnx"
            ort.InferenceSession(
                str(path),
                _session_options(threads, level, opt_path),
                providers=["CPUExecutionProvider"],
            )
            ops, n_init, init_bytes = _op_counts(opt_path)
            out["graphs"][f"{g}/{level}"] = {
                "nodes": sum(ops.values()),
                "ops": dict(sorted(ops.items())),
                "initializers": n_init,
                "initializer_bytes": init_bytes,
            }
            opt_path.unlink()
    # session creation, interleaved over graph x level
    create: dict[str, dict[str, list[float]]] = {
        f"{g}/{lv}": {"cpu": [], "wall": []} for g in graphs for lv in levels
    }
    for _ in range(n_create):
        for key in create:
            g, lv = key.split("/")
            w0, c0 = time.perf_counter(), time.process_time()
            s = _session(graphs[g], threads, lv)
            create[key]["cpu"].append(time.process_time() - c0)
            create[key]["wall"].append(time.perf_counter() - w0)
            del s
        bar.update(0)
    for key, v in create.items():
        out["graphs"][key]["create_cpu_q"] = _quartiles(v["cpu"])
        out["graphs"][key]["create_wall_q"] = _quartiles(v["wall"])
    # run latency: the servable graph with adapter 0 active = the constant graph's math
    a0 = _load_adapter(art.adapters[0])
    ro0 = _run_options(a0)
    contenders: dict[str, Callable[[], Any]] = {}
    sessions = {}
    for g, path in graphs.items():
        for lv in levels:
            s = _session(path, threads, lv)
            sessions[f"{g}/{lv}"] = s
            if g == "servable":
                contenders[f"{g}/{lv}"] = partial(s.run, None, feeds, ro0)
            else:
                contenders[f"{g}/{lv}"] = partial(s.run, None, feeds)
    res = time_rounds(contenders, repeats)
    for key, v in res.items():
        out["graphs"][key]["run_cpu_q"] = _quartiles(v["cpu"])
        out["graphs"][key]["run_wall_q"] = _quartiles(v["wall"])
    for lv in levels:
        diffs = [
            x - y
            for x, y in zip(res[f"servable/{lv}"]["cpu"], res[f"constant/{lv}"]["cpu"], strict=True)
        ]
        out[f"servable_minus_constant_cpu/{lv}"] = _quartiles(diffs)
        out[f"servable_minus_constant_create_cpu/{lv}"] = _quartiles(
            [
                x - y
                for x, y in zip(
                    create[f"servable/{lv}"]["cpu"], create[f"constant/{lv}"]["cpu"], strict=True
                )
            ]
        )
        c = Counter(out["graphs"][f"constant/{lv}"]["ops"])
        s = Counter(out["graphs"][f"servable/{lv}"]["ops"])
        out[f"op_diff/{lv}"] = {
            op: s[op] - c[op] for op in sorted(set(c) | set(s)) if s[op] != c[op]
        }
    return out


def bench_layer(
    hidden: int, p: int, rows: int, repeats: int, levels: tuple[str, ...] = LEVELS
) -> dict[str, Any]:
    """One adapter subgraph alone (d = ``hidden``, ``rows`` rows, 1 thread): constant
    spectra vs overridable spectra (default, fed, adapter), node counts per level and
    CPU time per call. Isolates what overridability costs, below the models' noise."""
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    from bca.onnx import choose_lowering, make_adapter_model

    rng = np.random.default_rng(0)
    q = hidden // p
    kernel = (rng.standard_normal((q, q, p)) / hidden).astype(np.float32)
    const = make_adapter_model(kernel, lowering=choose_lowering(p), input_shape=("n", hidden))
    over = onnx.ModelProto()
    over.CopyFrom(const)
    spectra = max(over.graph.initializer, key=lambda t: len(t.dims) * 10**9 + len(t.raw_data))
    name = spectra.name
    value = numpy_helper.to_array(spectra).copy()
    over.graph.input.append(helper.make_tensor_value_info(name, spectra.data_type, spectra.dims))
    with tempfile.TemporaryDirectory() as tmp:
        values = [value] + [
            (value * rng.uniform(0.5, 1.5, value.shape)).astype(value.dtype) for _ in range(7)
        ]
        ros, loaded = [], []  # RunOptions does not keep its LoraAdapter alive: keep them
        for i, v in enumerate(values):
            apath = Path(tmp) / f"layer_{i}.onnx_adapter"
            _raw_write_adapter({name: v}, apath)
            loaded.append(_load_adapter(apath))
            ros.append(_run_options(loaded[-1]))
        ro = ros[0]
        x = rng.standard_normal((rows, hidden)).astype(np.float32)
        out: dict[str, Any] = {"hidden": hidden, "block_size": p, "rows": rows, "levels": {}}
        for level in levels:
            contenders: dict[str, Callable[[], Any]] = {}
            nodes: dict[str, int] = {}
            for label, model in (("constant", const), ("overridable", over)):
                opt_path = Path(tmp) / f"{label}_{level}.onnx"
                s = ort.InferenceSession(
                    model.SerializeToString(),
                    _session_options(1, level, opt_path),
                    providers=["CPUExecutionProvider"],
                )
                ops, _, _ = _op_counts(opt_path)
                nodes[label] = sum(ops.values())
                if label == "constant":
                    contenders["constant spectra"] = partial(s.run, None, {"x": x})
                else:
                    contenders["overridable, default value"] = partial(s.run, None, {"x": x})
                    contenders["overridable, fed as input"] = partial(
                        s.run, None, {"x": x, name: value}
                    )
                    contenders["overridable, adapter active"] = partial(s.run, None, {"x": x}, ro)
                    contenders["overridable, adapter round robin over 8"] = _Cycle(
                        [partial(s.run, None, {"x": x}, r) for r in ros]
                    )
                    contenders["overridable, fed round robin over 8"] = _Cycle(
                        [partial(s.run, None, {"x": x, name: v}) for v in values]
                    )
            res = time_rounds(contenders, repeats, min_sample_s=0.01)
            base = res["constant spectra"]["cpu"]
            out["levels"][level] = {
                "nodes": nodes,
                "cpu_q": {n: _quartiles(v["cpu"]) for n, v in res.items()},
                "minus_constant_cpu_q": {
                    n: _quartiles([a - b for a, b in zip(v["cpu"], base, strict=True)])
                    for n, v in res.items()
                    if n != "constant spectra"
                },
                "switch_cpu_q": _quartiles(
                    [
                        a - b
                        for a, b in zip(
                            res["overridable, adapter round robin over 8"]["cpu"],
                            res["overridable, adapter active"]["cpu"],
                            strict=True,
                        )
                    ]
                ),
            }
    return out
