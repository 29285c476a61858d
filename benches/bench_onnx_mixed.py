"""Mixed-adapter batches in ONNX Runtime: one run whose rows use different adapters, against
one run per row with ONNX Runtime's adapter API, and against one run of the same batch on
one adapter.

A BERT-shaped model with random weights (hidden 384 x 6 layers = all-MiniLM-L6-v2's shape,
or ``--hidden 768``: BERT-base's, 12 layers) carries ``--adapters`` named adapters on query
and value (p = 64, different random kernels). Contenders, each computing one batch of
``--batch`` rows of ``--seq`` tokens, in one process, timed round-robin with the order
rotating every round (median of ``--repeats`` rounds; process CPU time, the metric on a
shared machine, and wall time), one intra-op thread, no spinning, onnxruntime on CPU:

* ``mixed``: the mixed graph (``export_model(mixed=[...])``), one run, row ``b`` on adapter
  ``b`` (``bca.adapter_index = [0, 1, ..., B - 1]``);
* ``per_row``: the servable graph (``export_model(servable=True)``) in an
  ``AdapterSession`` with the adapters' ``.onnx_adapter`` files loaded, one run per row
  (batch 1), row ``b`` with adapter ``b`` (what serving a mixed batch costs without the
  mixed graph);
* ``one_adapter``: the same ``AdapterSession``, the whole batch in one run on adapter 0
  (the cost of the batch when it needs one adapter only);
* ``plain``: the ordinary export (constant spectra) of adapter 0, the whole batch in one
  run (no serving machinery at all).

Before timing, the mixed run's rows are checked against the per-row runs. The load average
(``os.getloadavg``, as ``uptime`` prints it) is recorded before and after.

    python benches/bench_onnx_mixed.py                 # hidden 384, batch 8, 8 adapters
    python benches/bench_onnx_mixed.py --hidden 384 768

A second part times the adapter subgraph alone (``make_mixed_adapter_model`` against
``make_adapter_model``, d x d, no base layer) at a few shapes, where the adapter is the
whole cost (``--no-subgraph`` skips it).

Writes benches/results/onnx_mixed.{json,md}.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
if importlib.util.find_spec("bca") is None:  # run from a checkout without an install
    sys.path.insert(0, str(HERE.parent / "python"))
from _timing import machine_info, markdown_table, time_rounds, write_results  # noqa: E402

LAYERS = {384: 6, 768: 12}
BLOCK = 64


def _uptime() -> str:
    try:
        return subprocess.run(
            ["uptime"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        return "load average: " + ", ".join(f"{v:.2f}" for v in os.getloadavg())


def _model(hidden: int, n_adapters: int) -> Any:
    import torch
    import transformers

    from bca.model import BCAConfig, add_adapter, inject_adapters, set_adapter

    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=1000,
        hidden_size=hidden,
        num_hidden_layers=LAYERS[hidden],
        num_attention_heads=hidden // 64,
        intermediate_size=4 * hidden,
        max_position_embeddings=128,
    )
    model = transformers.BertModel(cfg).eval()
    for a in range(n_adapters):
        torch.manual_seed(100 + a)
        c = BCAConfig(block_size=BLOCK, target_modules=["query", "value"], init="xavier_uniform")
        if a == 0:
            inject_adapters(model, c, adapter_name="a0")
        else:
            add_adapter(model, f"a{a}", c)
    set_adapter(model, "a0", trainable=False)
    return model.eval()


def _session_options() -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


def bench_one(hidden: int, batch: int, seq: int, n_adapters: int, repeats: int) -> dict[str, Any]:
    import onnxruntime as ort
    import torch

    from bca.model import set_adapter
    from bca.onnx import AdapterSession, export_model, write_ort_adapter

    if n_adapters < batch:
        raise SystemExit(f"--adapters ({n_adapters}) must be >= --batch ({batch})")
    model = _model(hidden, n_adapters)
    names = [f"a{a}" for a in range(n_adapters)]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 1000, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[-1, seq // 2 :] = 0  # the tracer keeps the mask path
    example = {"input_ids": ids[:2], "attention_mask": mask[:2]}
    with tempfile.TemporaryDirectory() as tmp_, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tmp = Path(tmp_)
        mixed = export_model(
            model, tmp / "mixed.onnx", example, mixed=names, progress=False, verify=False
        )
        servable = export_model(
            model, tmp / "servable.onnx", example, servable=True, progress=False, verify=False
        )
        plain = export_model(model, tmp / "plain.onnx", example, progress=False, verify=False)
        for name in names:
            set_adapter(model, name, trainable=False)
            write_ort_adapter(model, servable, tmp / f"{name}.onnx_adapter")
        set_adapter(model, "a0", trainable=False)
        sizes = {p.stem: p.stat().st_size for p in (mixed, servable, plain)}

        mixed_sess = ort.InferenceSession(
            str(mixed), _session_options(), providers=["CPUExecutionProvider"]
        )
        plain_sess = ort.InferenceSession(
            str(plain), _session_options(), providers=["CPUExecutionProvider"]
        )
        served = AdapterSession(servable, sess_options=_session_options())
        for name in names:
            served.load_adapter(name, tmp / f"{name}.onnx_adapter")
        feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
        rows = [{k: v[b : b + 1] for k, v in feeds.items()} for b in range(batch)]
        index = np.arange(batch, dtype=np.int64)
        out = ["last_hidden_state"]

        def run_mixed() -> Any:
            return mixed_sess.run(out, {**feeds, "bca.adapter_index": index})[0]

        def run_per_row() -> Any:
            return [served.run(out, rows[b], adapter=names[b])[0] for b in range(batch)]

        def run_one_adapter() -> Any:
            return served.run(out, feeds, adapter="a0")[0]

        def run_plain() -> Any:
            return plain_sess.run(out, feeds)[0]

        # correctness first: mixed rows == per-row runs; plain == one adapter
        got, want = run_mixed(), np.concatenate(run_per_row())
        per_row_err = max(
            float(np.linalg.norm(got[b] - want[b]) / np.linalg.norm(want[b])) for b in range(batch)
        )
        # rows on different adapters differ (so equal rows mean the right adapter)
        other = np.roll(index, 1)
        shifted = mixed_sess.run(out, {**feeds, "bca.adapter_index": other})[0]
        differ = min(
            float(np.linalg.norm(got[b] - shifted[b]) / np.linalg.norm(got[b]))
            for b in range(batch)
        )
        one_err = float(
            np.linalg.norm(run_one_adapter() - run_plain()) / np.linalg.norm(run_plain())
        )
        load_before, uptime_before = os.getloadavg(), _uptime()
        samples = time_rounds(
            {
                "mixed": run_mixed,
                "per_row": run_per_row,
                "one_adapter": run_one_adapter,
                "plain": run_plain,
            },
            repeats,
        )
        load_after, uptime_after = os.getloadavg(), _uptime()
    med = {
        n: {m: statistics.median(v[m]) * 1e3 for m in ("cpu", "wall")} for n, v in samples.items()
    }
    return {
        "hidden": hidden,
        "layers": LAYERS[hidden],
        "block_size": BLOCK,
        "targets": ["query", "value"],
        "batch": batch,
        "seq": seq,
        "adapters": n_adapters,
        "repeats": repeats,
        "median_ms": med,
        "ratios_cpu": {
            "per_row / mixed": med["per_row"]["cpu"] / med["mixed"]["cpu"],
            "mixed / one_adapter": med["mixed"]["cpu"] / med["one_adapter"]["cpu"],
            "mixed / plain": med["mixed"]["cpu"] / med["plain"]["cpu"],
        },
        "ratios_wall": {
            "per_row / mixed": med["per_row"]["wall"] / med["mixed"]["wall"],
            "mixed / one_adapter": med["mixed"]["wall"] / med["one_adapter"]["wall"],
            "mixed / plain": med["mixed"]["wall"] / med["plain"]["wall"],
        },
        "check": {
            "mixed_vs_per_row_max_rel_err": per_row_err,
            "one_adapter_vs_plain": one_err,
            "other_adapter_min_rel_diff": differ,
        },
        "file_bytes": sizes,
        "load_before": list(load_before),
        "load_after": list(load_after),
        "uptime_before": uptime_before,
        "uptime_after": uptime_after,
        "samples_ms": {
            n: {m: [x * 1e3 for x in v[m]] for m in ("cpu", "wall")} for n, v in samples.items()
        },
    }


SUBGRAPH_SHAPES = ((768, 64, 32), (768, 256, 32), (4096, 256, 1), (4096, 256, 32))
"""(d, p, tokens per row) of the adapter-alone part: a d x d layer, a batch of rows."""


def bench_subgraph(
    d: int, p: int, tokens: int, batch: int, n_adapters: int, repeats: int
) -> dict[str, Any]:
    """The adapter subgraph alone (no base layer), "matmul" lowering, float32: one mixed run
    of the batch (row b on adapter b), the same mixed graph with every row on adapter 0, one
    single-adapter run of the whole batch, and one single-adapter run per row (each row's
    adapter in its own session, batch 1)."""
    import onnxruntime as ort

    from bca.onnx import make_adapter_model, make_mixed_adapter_model

    rng = np.random.default_rng(0)
    q = -(-d // p)
    kernels = [rng.standard_normal((q, q, p)) / np.sqrt(d) for _ in range(n_adapters)]

    def session(m: Any) -> Any:
        return ort.InferenceSession(
            m.SerializeToString(), _session_options(), providers=["CPUExecutionProvider"]
        )

    mixed = session(
        make_mixed_adapter_model([(k, 1.0) for k in kernels], lowering="matmul", dtype=np.float32)
    )
    singles = [
        session(make_adapter_model(k, lowering="matmul", dtype=np.float32)) for k in kernels[:batch]
    ]
    x = rng.standard_normal((batch, tokens, d)).astype(np.float32)
    index = np.arange(batch, dtype=np.int64)
    zeros = np.zeros(batch, dtype=np.int64)
    rows = [x[b : b + 1] for b in range(batch)]
    got = mixed.run(None, {"x": x, "adapter_index": index})[0]
    want = np.concatenate([singles[b].run(None, {"x": rows[b]})[0] for b in range(batch)])
    err = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    contenders = {
        "mixed": lambda: mixed.run(None, {"x": x, "adapter_index": index}),
        "mixed_one_adapter": lambda: mixed.run(None, {"x": x, "adapter_index": zeros}),
        "single": lambda: singles[0].run(None, {"x": x}),
        "per_row": lambda: [singles[b].run(None, {"x": rows[b]}) for b in range(batch)],
    }
    load_before = os.getloadavg()
    samples = time_rounds(contenders, repeats)
    load_after = os.getloadavg()
    med = {
        n: {m: statistics.median(v[m]) * 1e3 for m in ("cpu", "wall")} for n, v in samples.items()
    }
    return {
        "d": d,
        "block_size": p,
        "tokens": tokens,
        "batch": batch,
        "adapters": n_adapters,
        "median_ms": med,
        "mixed_vs_per_row_rel_err": err,
        "load_before": list(load_before),
        "load_after": list(load_after),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, nargs="+", default=[384], choices=sorted(LAYERS))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=25)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--stem", default="onnx_mixed")
    ap.add_argument("--no-subgraph", action="store_true", help="skip the adapter-alone part")
    args = ap.parse_args(argv)
    import onnxruntime as ort
    import torch

    torch.set_num_threads(1)
    runs = []
    for hidden in args.hidden:
        print(f"hidden {hidden}: exporting and timing ...", flush=True)
        runs.append(bench_one(hidden, args.batch, args.seq, args.adapters, args.repeats))
        r = runs[-1]
        cpu = {k: v["cpu"] for k, v in r["median_ms"].items()}
        print(
            "  cpu ms: "
            + ", ".join(f"{k} {v:.2f}" for k, v in cpu.items())
            + f"; load {r['load_before'][0]:.2f} -> {r['load_after'][0]:.2f}",
            flush=True,
        )
    subgraphs = []
    if not args.no_subgraph:
        for d, p, tokens in SUBGRAPH_SHAPES:
            print(f"adapter alone, d {d}, p {p}, {tokens} tokens per row ...", flush=True)
            subgraphs.append(bench_subgraph(d, p, tokens, args.batch, args.adapters, args.repeats))
    payload = {
        "bench": "onnx_mixed",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "onnxruntime": ort.__version__,
        "torch": torch.__version__,
        "machine": machine_info(),
        "metric": "median over rounds of process CPU time (and wall time) per batch, in ms",
        "runs": runs,
        "subgraphs": subgraphs,
    }
    header = [
        "hidden",
        "layers",
        "batch x seq",
        "mixed ms",
        "per_row ms (8 runs)",
        "one_adapter ms",
        "plain ms",
        "per_row / mixed",
        "mixed / one_adapter",
        "mixed / plain",
        "load before → after",
    ]
    table = []
    for r in runs:
        m = r["median_ms"]
        for metric in ("cpu", "wall"):
            rat = r[f"ratios_{metric}"]
            table.append(
                [
                    f"{r['hidden']} ({metric})",
                    r["layers"],
                    f"{r['batch']} x {r['seq']}",
                    f"{m['mixed'][metric]:.2f}",
                    f"{m['per_row'][metric]:.2f}",
                    f"{m['one_adapter'][metric]:.2f}",
                    f"{m['plain'][metric]:.2f}",
                    f"{rat['per_row / mixed']:.2f}",
                    f"{rat['mixed / one_adapter']:.2f}",
                    f"{rat['mixed / plain']:.2f}",
                    " → ".join(
                        "/".join(f"{v:.2f}" for v in r[k]) for k in ("load_before", "load_after")
                    ),
                ]
            )
    md = (
        "# Mixed-adapter batches in ONNX Runtime\n\n"
        f"`python benches/bench_onnx_mixed.py` ({payload['date']}, onnxruntime "
        f"{payload['onnxruntime']}, CPU, float32, 1 intra-op thread, no spinning; median of "
        f"{args.repeats} rounds, order rotating; adapters on query and value, p = {BLOCK}, "
        f"{args.adapters} adapters). Per batch of {args.batch} rows: `mixed` = one run of the "
        "mixed graph, row b on adapter b; `per_row` = one AdapterSession run per row (batch 1), "
        "row b's adapter active; `one_adapter` = one AdapterSession run of the whole batch on "
        "adapter 0; `plain` = one run of the whole batch in the ordinary export of adapter 0. "
        "Rows marked cpu: process CPU time per batch; wall: wall time.\n\n"
        + markdown_table(header, table)
        + "\nLoad average (1/5/15 min) before and after timing; `uptime` said:\n\n"
        + "".join(
            f"- {r['hidden']}: `{r['uptime_before']}` → `{r['uptime_after']}`\n" for r in runs
        )
        + "\nCheck: mixed rows against the per-row runs, max norm-relative error "
        + ", ".join(f"{r['check']['mixed_vs_per_row_max_rel_err']:.1e}" for r in runs)
        + " (rows on another adapter differ by at least "
        + ", ".join(f"{r['check']['other_adapter_min_rel_diff']:.1e}" for r in runs)
        + ").\n"
    )
    if subgraphs:
        sub_rows = []
        for r in subgraphs:
            m = r["median_ms"]
            sub_rows.append(
                [
                    r["d"],
                    r["block_size"],
                    f"{r['batch']} x {r['tokens']}",
                    f"{m['mixed']['cpu']:.3f}",
                    f"{m['mixed_one_adapter']['cpu']:.3f}",
                    f"{m['single']['cpu']:.3f}",
                    f"{m['per_row']['cpu']:.3f}",
                    f"{m['mixed']['cpu'] / m['single']['cpu']:.2f}",
                    f"{m['per_row']['cpu'] / m['mixed']['cpu']:.2f}",
                    "/".join(f"{v:.1f}" for v in r["load_before"][:1] + r["load_after"][:1]),
                ]
            )
        md += (
            "\n## The adapter subgraph alone\n\n"
            'One d x d adapter, no base layer, lowering "matmul", float32, process CPU ms per '
            f"batch (median of {args.repeats} rounds). `mixed`: the mixed subgraph of "
            f"{args.adapters} adapters, row b on adapter b; `mixed_one_adapter`: the same graph, "
            "every row on adapter 0; `single`: the single-adapter subgraph, whole batch; "
            "`per_row`: one single-adapter run per row (batch 1, each row's adapter in its own "
            "session).\n\n"
            + markdown_table(
                [
                    "d",
                    "p",
                    "batch x tokens",
                    "mixed ms",
                    "mixed_one_adapter ms",
                    "single ms",
                    "per_row ms",
                    "mixed / single",
                    "per_row / mixed",
                    "load before/after",
                ],
                sub_rows,
            )
        )
    write_results(args.stem, payload, md, args.out)
    print(md)


if __name__ == "__main__":
    main()
