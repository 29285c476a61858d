"""bench_serving, part 3 of 3: render. The markdown report (tables, targets summary)
and the plot of the results that bench_serving.py's main collects.

The entry point is benches/bench_serving.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from _serving_measure import RR, SAME, _switch_overall
from _serving_prepare import Artifacts
from _timing import markdown_table


# --------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------
def _ms(x: float) -> str:
    return f"{x * 1e3:.3f}" if abs(x) < 0.01 else f"{x * 1e3:.2f}"


def _mib(x: float) -> str:
    return f"{x / 2**20:.1f}"


MEMORY_HEADER = [
    "what",
    "K",
    "Δ RSS MiB",
    "base + K × adapter MiB",
    "excess over it",
    "target MiB (1.1 × it)",
    "adapters' own Δ RSS (same process) / per session",
]


def _memory_rows(art: Artifacts, mem: dict[str, Any]) -> tuple[list[list[Any]], dict[str, Any]]:
    """Rows of the memory table and the target verdicts."""
    base = mem["base"]["delta_rss"]
    size = art.adapter_bytes
    rows: list[list[Any]] = []
    verdict: dict[str, Any] = {}
    serv0 = mem["servable"][0]["delta_rss"]
    dash = ["-"] * 4
    rows.append(["base graph, 1 session", "-", _mib(base), *dash])
    rows.append(
        [
            "constant graph (1 adapter baked in), 1 session",
            1,
            _mib(mem["constant"]["delta_rss"]),
            *dash,
        ]
    )
    rows.append(
        [
            "servable graph, no adapter loaded",
            0,
            _mib(serv0),
            _mib(base),
            f"{serv0 / base - 1:+.1%}",
            _mib(1.1 * base),
            "-",
        ]
    )
    for k in mem["ks"]:
        r = mem["servable"][k]
        ideal = base + k * size
        target = 1.10 * ideal
        ok = r["delta_rss"] <= target
        own = r.get("adapters_rss", 0)
        verdict[str(k)] = {
            "servable_delta_rss": r["delta_rss"],
            "ideal": ideal,
            "target": target,
            "met": ok,
            "excess": r["delta_rss"] / ideal - 1,
            "adapters_rss_per_adapter": own / k,
        }
        rows.append(
            [
                f"servable graph + {k} adapters loaded",
                k,
                _mib(r["delta_rss"]),
                _mib(ideal),
                f"{r['delta_rss'] / ideal - 1:+.1%}",
                f"{_mib(target)} ({'met' if ok else 'MISSED'})",
                f"{own / 2**20:.2f} MiB = {own / (k * size):.2f} × K × file size",
            ]
        )
        s = mem["sessions"][k]
        if "skipped" in s:
            rows.append(
                [
                    f"{k} sessions, adapter baked in each",
                    k,
                    f"not run: {s['skipped']} (~{_mib(s['estimate_delta_rss'])} estimated)",
                    *dash,
                ]
            )
        else:
            rows.append(
                [
                    f"{k} sessions, adapter baked in each",
                    k,
                    _mib(s["delta_rss"]),
                    "-",
                    "-",
                    "-",
                    f"{_mib(s['delta_rss'] / k)} MiB/session",
                ]
            )
    return rows, verdict


def render(results: dict[str, Any], arts: dict[str, Artifacts]) -> str:
    prov = results["provenance"]
    md = [
        "# Serving many bca adapters from one ONNX Runtime session\n",
        f"Command: `{prov['command']}`  \n"
        f"Date: {prov['date']}  \n"
        f"Machine: {prov['machine'].get('cpu', '?')}, {prov['machine']['cpu_count']} cores, "
        f"{prov['mem_total_gib']:.0f} GiB, shared with other jobs; load average at start "
        f"{prov['load_start']}, at end {prov['load_end']}  \n"
        f"Versions: onnxruntime {prov['onnxruntime']}, onnx {prov['onnx']}, torch "
        f"{prov['torch']}, transformers {prov['transformers']}, Python "
        f"{prov['machine']['python']}  \n"
        f"Servable graph and adapter files from: {prov['backend_note']}\n",
        "Batch 1, sequence 32, float32, CPU, inter_op_num_threads = 1, no spinning, default "
        "graph optimisations unless stated. Each adapter is an `.onnx_adapter` file "
        "(`onnxruntime.AdapterFormat`) holding the spectra of every adapted layer; it is "
        "loaded with `onnxruntime.LoraAdapter` and activated per request with "
        "`RunOptions.add_active_adapter`. Adapter k has fresh random kernels (seed k).\n",
        "**Timing**: every contender of one table timed round-robin in one process (order "
        "rotating each round); medians of the rounds with the interquartile range in "
        "brackets. *CPU* = process CPU time per call (the work; robust when the shared "
        "machine makes wall time wait for a core; with 2 threads it adds both threads' time), "
        "*wall* = latency. A switch cost is the median of per-round differences "
        "(round robin minus same adapter, paired by round), so noise common to a round "
        "cancels.\n",
    ]
    for key, r in results["models"].items():
        art = arts[key]
        cfg = art.cfg
        md.append(f"\n## {cfg.description} (hidden {cfg.hidden}, p = {cfg.block_size})\n")
        md.append(
            f"{art.n_adapted} adapted layers, {art.kernel_params:,} kernel parameters; "
            f"adapter file {art.adapter_bytes:,} bytes ({art.spectra_bytes:,} bytes of "
            "float32 spectra: a spectra layout of `(F, 2 q_in, 2 q_out)` with F = p/2 + 1 "
            f"holds {art.spectra_bytes / 4 / max(art.kernel_params, 1):.2f}x the kernel's "
            f"numbers). Checks (max abs difference of outputs): "
            + ", ".join(f"{k} {v:.1e}" for k, v in art.checks.items())
            + "\n"
        )
        for sw in r["switch"]:
            k = sw["k"]
            md.append(
                f"\n### Per-request latency, intra_op_num_threads = {sw['threads']}, "
                f"K = {k} adapters ({sw['repeats']} rounds)\n"
            )
            rows = []
            for name, v in sw["rows"].items():
                c, w = v["cpu_q"], v["wall_q"]
                rows.append(
                    [
                        name,
                        f"{_ms(c[1])} [{_ms(c[0])}–{_ms(c[2])}]",
                        f"{_ms(w[1])} [{_ms(w[0])}–{_ms(w[2])}]",
                    ]
                )
            md.append(markdown_table(["contender", "CPU ms/call", "wall ms/call"], rows))
            labels = sw["labels"]
            drows = []
            for dk, label in labels.items():
                c, w = sw["derived"][dk]["cpu"], sw["derived"][dk]["wall"]
                drows.append(
                    [
                        label,
                        f"{_ms(c[1])} [{_ms(c[0])}–{_ms(c[2])}]",
                        f"{_ms(w[1])} [{_ms(w[0])}–{_ms(w[2])}]",
                    ]
                )
            md.append(
                "\n" + markdown_table(["difference (paired by round)", "CPU ms", "wall ms"], drows)
            )
            for tokens, t in sw["switch"]["by_tokens"].items():
                md.append(
                    f"\n**Switch alone, {tokens} token(s)** ({sw['main']}; the same adapter "
                    f"every call vs all {sw['switch']['k']} loaded adapters in turn, "
                    f"{t['rounds']} interleaved rounds; same-adapter call "
                    f"{_ms(t['same_cpu_q'][1])} ms CPU): switch cost "
                    + "; ".join(
                        f"{m} {_ms(t[m]['median'])} ms (95 % CI {_ms(t[m]['ci_low'])} … "
                        f"{_ms(t[m]['ci_high'])})"
                        for m in ("cpu", "wall")
                    )
                    + f". Target ≤ 1 ms: **{_switch_overall(t)}**. Raw ORT (one cached "
                    "RunOptions per adapter): "
                    + "; ".join(
                        f"{m} {_ms(t['raw'][m]['median'])} ms (95 % CI "
                        f"{_ms(t['raw'][m]['ci_low'])} … {_ms(t['raw'][m]['ci_high'])})"
                        for m in ("cpu", "wall")
                    )
                    + ".\n"
                )
        mem = r["memory"]
        rows, _ = _memory_rows(art, mem)
        md.append(
            "\n### Resident memory (fresh process per row, intra_op_num_threads = 1)\n\n"
            "Δ RSS = VmRSS after creating the session(s), loading the adapters and one run "
            "with each, minus VmRSS after the imports "
            f"({_mib(mem['import']['after']['VmRSS'])} MiB: onnxruntime"
            + (", bca.onnx" if art.backend == "api" else "")
            + "); both readings after `malloc_trim(0)`, so that what glibc kept of the freed "
            "model protobuf does not count (without it the readings varied by ~30 MiB "
            "between identical processes). Median of "
            f"{mem['processes_per_row']} process(es) per row. The servable rows load the "
            "adapters through "
            + ("`AdapterSession.load_adapter`" if art.backend == "api" else "`LoraAdapter`")
            + " (memory-mapped files). Target = 1.10 × (base Δ RSS + K × adapter file size "
            f"{art.adapter_bytes:,} B). Last column: VmRSS after loading and using the K "
            "adapters minus VmRSS before, in the same process.\n\n"
        )
        md.append(markdown_table(MEMORY_HEADER, rows))
        opt = r["optimisation"]
        md.append(
            "\n### What overridable initializers cost in graph optimisation "
            f"(intra_op_num_threads = {opt['threads']})\n\n"
            "Session creation (median of the creations) and run latency (median of the "
            "rounds; the servable graph runs with adapter 0 active, the same math as the "
            "constant graph) per optimisation level; nodes = nodes of the optimised graph "
            "(`optimized_model_filepath`).\n\n"
        )
        orows = []
        for gk, v in opt["graphs"].items():
            orows.append(
                [
                    gk,
                    v["nodes"],
                    f"{v['initializers']} / {_mib(v['initializer_bytes'])}",
                    f"{_ms(v['create_wall_q'][1])} / {_ms(v['create_cpu_q'][1])}",
                    f"{_ms(v['run_cpu_q'][1])} [{_ms(v['run_cpu_q'][0])}–{_ms(v['run_cpu_q'][2])}]",
                    f"{_ms(v['run_wall_q'][1])}",
                ]
            )
        md.append(
            markdown_table(
                [
                    "graph / level",
                    "nodes",
                    "initializers / MiB",
                    "creation ms wall / CPU",
                    "run CPU ms",
                    "run wall ms",
                ],
                orows,
            )
        )
        for lv in opt["levels"]:
            d = opt[f"op_diff/{lv}"]
            q = opt[f"servable_minus_constant_cpu/{lv}"]
            cq = opt[f"servable_minus_constant_create_cpu/{lv}"]
            md.append(
                f"\n{lv}: servable − constant: nodes by op type "
                + (", ".join(f"{op} {n:+d}" for op, n in d.items()) if d else "identical")
                + f"; run CPU time {_ms(q[1])} ms [{_ms(q[0])}–{_ms(q[2])}]; session "
                f"creation CPU time {_ms(cq[1])} ms [{_ms(cq[0])}–{_ms(cq[2])}] "
                "(paired by round, median [IQR]).\n"
            )
    if results.get("layers"):
        md.append(
            "\n## One adapter layer alone: constant vs overridable spectra\n\n"
            "The adapter subgraph of one d × d layer (p = 64, 32 rows, MatMul lowering, "
            "1 thread) with its spectra a constant initializer, or overridable (initializer "
            "+ graph input) and run with the default value, with the spectra fed as an input, "
            "or with an adapter active (the same one every call, or 8 in turn). Median CPU "
            "µs per call over interleaved rounds; differences (Δ, vs constant) paired by "
            "round. This resolves microseconds, far below the whole models' noise.\n\n"
        )
        lrows = []
        for lay in results["layers"]:
            for lv, v in lay["levels"].items():
                c = v["cpu_q"]
                dq = v["minus_constant_cpu_q"]
                lrows.append(
                    [
                        lay["hidden"],
                        lv,
                        f"{v['nodes']['constant']} / {v['nodes']['overridable']}",
                        f"{c['constant spectra'][1] * 1e6:.1f}",
                        *(
                            f"{c[n][1] * 1e6:.1f} ({dq[n][1] * 1e6:+.1f})"
                            for n in (
                                "overridable, default value",
                                "overridable, fed as input",
                                "overridable, adapter active",
                                "overridable, adapter round robin over 8",
                            )
                        ),
                        f"{v['switch_cpu_q'][1] * 1e6:+.2f}",
                    ]
                )
        md.append(
            markdown_table(
                [
                    "d",
                    "level",
                    "nodes const / overridable",
                    "constant µs",
                    "overridable default µs (Δ)",
                    "fed µs (Δ)",
                    "adapter µs (Δ)",
                    "adapter round robin over 8 µs (Δ)",
                    "switch µs (round robin − same, paired)",
                ],
                lrows,
            )
        )
    md.append("\n" + results.get("summary_md", ""))
    return "\n".join(md)


def plot(results: dict[str, Any], arts: dict[str, Artifacts], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return
    keys = list(results["models"])
    fig, axes = plt.subplots(2, len(keys), figsize=(6 * len(keys), 8), squeeze=False)
    for col, key in enumerate(keys):
        art, r = arts[key], results["models"][key]
        mem = r["memory"]
        ks = mem["ks"]
        base = mem["base"]["delta_rss"]
        ax = axes[0][col]
        ax.plot(
            ks,
            [mem["servable"][k]["delta_rss"] / 2**20 for k in ks],
            "o-",
            label="1 servable session + K adapters",
        )
        ax.plot(
            ks,
            [1.1 * (base + k * art.adapter_bytes) / 2**20 for k in ks],
            "k--",
            label="target: 1.1 × (base + K × adapter)",
        )
        sk = [k for k in ks if "skipped" not in mem["sessions"][k]]
        ax.plot(
            sk,
            [mem["sessions"][k]["delta_rss"] / 2**20 for k in sk],
            "s-",
            label="K sessions (adapter baked in each)",
        )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("K adapters")
        ax.set_ylabel("Δ RSS (MiB)")
        ax.set_title(f"{art.cfg.description}\nresident memory", fontsize=10)
        ax.legend(fontsize=8)
        ax = axes[1][col]
        sw = r["switch"][0]
        main = sw["main"]
        picks = [
            ("base graph", "base graph (no adapter)"),
            ("constant graph (adapter baked in)", "adapter baked in"),
            (f"{main}, {SAME}", "servable, same adapter"),
            (f"{main}, {RR}", f"servable, {sw['k']} adapters in turn"),
            (f"spectra as plain feeds, {RR}", "spectra as feeds, in turn"),
            (f"K sessions (adapter baked in each), {RR}", f"{sw['k']} sessions, in turn"),
            ("new session per adapter: creation + first run", "new session per request"),
        ]
        cold = [n for n in sw["rows"] if "load" in n.lower() and RR in n]
        if cold:
            picks.insert(5, (cold[0], "servable, adapter file loaded per request"))
        picks = [(n, lab) for n, lab in picks if n in sw["rows"]]
        vals = [sw["rows"][n]["cpu_q"][1] * 1e3 for n, _ in picks]
        ys = np.arange(len(picks))
        ax.barh(ys, vals, color=["0.6"] + ["C0"] * (len(picks) - 2) + ["C3"])
        for y, v in zip(ys, vals, strict=True):
            ax.text(v, y, f" {v:.1f}", va="center", fontsize=7)
        ax.set_yticks(ys, [lab for _, lab in picks], fontsize=8)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlim(min(vals) / 1.5, max(vals) * 4)
        ax.invert_yaxis()
        ax.set_xlabel(f"CPU ms per request, median ({sw['threads']} thread)")
        ax.set_title("per-request cost")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _summary(results: dict[str, Any], arts: dict[str, Artifacts]) -> str:
    lines = ["## Targets\n"]
    rows = []
    for key, r in results["models"].items():
        art = arts[key]
        for sw in r["switch"]:
            for tokens, t in sw["switch"]["by_tokens"].items():
                rows.append(
                    [
                        art.cfg.description,
                        f"switch ≤ 1 ms ({sw['threads']} thread(s), K = {sw['switch']['k']}, "
                        f"{tokens} token(s))",
                        " / ".join(
                            f"{_ms(t[m]['median'])} [{_ms(t[m]['ci_low'])} … "
                            f"{_ms(t[m]['ci_high'])}] ms {m}"
                            for m in ("cpu", "wall")
                        ),
                        _switch_overall(t),
                    ]
                )
        _, verdict = _memory_rows(art, r["memory"])
        for k, v in verdict.items():
            rows.append(
                [
                    art.cfg.description,
                    f"memory, K = {k}",
                    f"{_mib(v['servable_delta_rss'])} MiB ≤ {_mib(v['target'])} MiB",
                    "met" if v["met"] else "MISSED",
                ]
            )
    lines.append(
        "Switch: median [95 % confidence interval] of the paired per-round difference, "
        "round robin over all loaded adapters minus the same adapter every call; met when "
        "the interval's upper end is ≤ 1 ms. Memory: Δ RSS of one servable session with K "
        "adapters loaded ≤ 1.1 × (base session's Δ RSS + K × adapter file size).\n\n"
    )
    lines.append(markdown_table(["model", "target", "measured", "verdict"], rows))
    return "\n".join(lines)
