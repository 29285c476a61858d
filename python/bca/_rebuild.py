"""Rebuild an adapted torch model from a saved adapter folder, make example inputs for
tracing it, and compare an exported ONNX file with it (used by ``bca export``,
``bca merge`` and ``bca serve export``; needs torch, and transformers for non-demo
adapters).

A folder written by ``bca demo`` (it holds ``demo_model.json``) is rebuilt on the shipped
all-MiniLM-L6-v2 with the demo's classifier head; any other adapter needs its base model,
a local transformers model folder, whose class is the one the adapter records.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from . import _adapter_format

__all__ = [
    "AdaptedModel",
    "example_inputs",
    "is_demo_folder",
    "load_adapted",
    "onnx_error",
    "saved_parameter_names",
]


def is_demo_folder(adapter: str | os.PathLike[str]) -> bool:
    """Whether ``adapter`` was saved by ``bca demo`` (rebuilt without a base folder)."""
    from .demo.run import DEMO_MODEL_FILE  # numpy only at import

    return (Path(adapter) / DEMO_MODEL_FILE).is_file()


def saved_parameter_names(adapter: str | os.PathLike[str]) -> list[str]:
    """The fully trained parameters (``modules_to_save``) a saved adapter holds (from its
    checked safetensors header; no tensor data is read)."""
    if not (Path(adapter) / _adapter_format.WEIGHTS_NAME).is_file():
        return []
    _, header = _adapter_format.read_weights_header(adapter)
    prefix = _adapter_format.MODULES_TO_SAVE_PREFIX
    return [k[len(prefix) :] for k in header.tensors if k.startswith(prefix)]


def _keep_base_values(adapter: Path, into: dict[str, Any] | None) -> Callable[[Any], None] | None:
    """A hook copying the base model's values of the adapter's fully trained parameters
    into ``into`` (None: no hook)."""
    if into is None:
        return None
    names = saved_parameter_names(adapter)

    def hook(model: Any) -> None:
        params = dict(model.named_parameters())
        for n in names:
            if n in params:
                into[n] = params[n].detach().clone()

    return hook


class AdaptedModel:
    """A rebuilt model: ``tokenizer`` (or None), ``model`` (eval mode, adapters loaded,
    unmerged) and ``demo_info`` (the folder's ``demo_model.json``, or None)."""

    def __init__(self, tokenizer: Any, model: Any, demo_info: dict[str, Any] | None) -> None:
        self.tokenizer = tokenizer
        self.model = model
        self.demo_info = demo_info

    def __iter__(self) -> Any:  # tok, model, info = load_adapted(...)
        return iter((self.tokenizer, self.model, self.demo_info))


def load_adapted(
    adapter: str | os.PathLike[str],
    base: str | os.PathLike[str] | None = None,
    *,
    base_values: dict[str, Any] | None = None,
) -> AdaptedModel:
    """Rebuild the adapted model of a saved adapter folder.

    ``base``: the local transformers model folder of a non-demo adapter (a demo folder
    uses the shipped MiniLM when it is None). ``base_values`` (optional) receives the base
    model's values of the adapter's fully trained parameters (``modules_to_save``), taken
    before the adapter is loaded. Raises ``ValueError`` for a non-demo adapter without
    ``base`` and for a ``base`` that is not a folder.
    """
    adapter = Path(adapter)
    hook = _keep_base_values(adapter, base_values)
    if base is None:
        if not is_demo_folder(adapter):
            raise ValueError(
                f"{adapter} was not saved by `bca demo`: its base model must be given "
                "(a local transformers model folder)"
            )
        from .demo.run import load_demo_model

        tok, model, info = load_demo_model(adapter, before_adapter=hook)
        return AdaptedModel(tok, model, info)
    if not Path(base).is_dir():
        raise ValueError(f"base model {str(base)!r} is not a folder")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    from .model import load_adapter

    cls_name = _adapter_format.read_config(adapter).base_class or "AutoModel"
    cls = getattr(transformers, cls_name, None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        cls = transformers.AutoModel
    model = cls.from_pretrained(str(base))
    if hook is not None:
        hook(model)
    load_adapter(model, adapter)
    model.eval()
    tok = None
    try:
        tok = transformers.AutoTokenizer.from_pretrained(str(base))
    except Exception:  # noqa: BLE001 - a model folder without tokenizer is fine
        tok = None
    return AdaptedModel(tok, model, None)


def example_inputs(tokenizer: Any, model: Any, seq_len: int) -> dict[str, Any]:
    """Example inputs for tracing: two tokenized sentences (the second padded), or random
    token ids when there is no tokenizer."""
    import torch

    if tokenizer is not None:
        sample = ["an example sentence to trace the model with", "another, shorter one"]
        enc = tokenizer(
            sample,
            padding="max_length",
            max_length=seq_len,
            truncation=True,
            return_tensors="pt",
        )
        example: dict[str, Any] = {
            "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"],
        }
        example["attention_mask"][1, -2:] = 0
        return example
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 1000))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, seq_len), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _tensors(out: Any) -> list[Any]:
    import torch

    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in _tensors(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _tensors(v)]
    return []


def onnx_error(path: str | os.PathLike[str], model: Any, inputs: Mapping[str, Any]) -> float:
    """The largest norm-relative difference between the outputs of the ONNX file at
    ``path`` run in onnxruntime (CPU) and those of ``model`` on ``inputs`` (keyword
    tensors; inputs the graph does not take are left out)."""
    import numpy as np
    import onnxruntime as ort  # type: ignore[import-untyped]
    import torch

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    present = {i.name for i in sess.get_inputs()}
    feed = {k: v.detach().cpu().numpy() for k, v in inputs.items() if k in present}
    got = sess.run(None, feed)
    with torch.no_grad():
        want = _tensors(model(**inputs))
    if len(want) != len(got):
        raise ValueError(f"the ONNX file has {len(got)} outputs, the model {len(want)}")
    worst = 0.0
    for g, w in zip(got, want, strict=True):
        ref = w.detach().cpu().double().numpy()
        den = max(float(np.linalg.norm(ref)), 1e-30)
        err = float(np.linalg.norm(np.asarray(g, np.float64) - ref)) / den
        worst = max(worst, err if np.isfinite(err) else float("inf"))
    return worst
