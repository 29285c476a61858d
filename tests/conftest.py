"""Shared test fixtures and the dense oracle used by every test file."""

from __future__ import annotations

import os

# Before anything imports torch (OpenMP reads its settings once, when torch loads): on a
# shared 2-core machine torch's OpenMP threads spin while they wait for a descheduled
# partner, which made torch-heavy tests and the demo 5-7x slower. Passive waiting sleeps
# instead. bca.demo sets the same itself (bca.demo.passive_openmp); a value set by the
# user is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import re
import threading
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from scipy.linalg import circulant

settings.register_profile(
    "ci",
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
settings.register_profile(
    "dev", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "thorough", max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

# -- CI: a skip is a failure unless the test needs CUDA ----------------------------------
# CI installs every extra and builds the extension, so a missing module, a missing
# extension or missing data means the run did not test what it claims to. Under CI=true
# (or CI=1) a skip whose reason does not mention CUDA (write such reasons as "needs
# CUDA") fails the run: a skipped test is reported as FAILED with the reason; a skipped
# module (pytest.importorskip or pytest.skip at module level) stays listed as skipped so
# the other modules still run, and is listed again at the end, where it sets the exit
# status to 1. Expected failures (xfail) are not skips and are left alone.

CUDA_SKIP = re.compile(r"\bcuda\b", re.IGNORECASE)
_unexpected_skips: list[str] = []


def _strict_skips() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"true", "1"}


def _unexpected_skip(report: pytest.CollectReport | pytest.TestReport) -> str | None:
    """The skip reason when ``report`` is a skip that CI must not accept, else None."""
    if not report.skipped or hasattr(report, "wasxfail") or not _strict_skips():
        return None
    longrepr = report.longrepr
    reason = str(longrepr[2]) if isinstance(longrepr, tuple) else str(longrepr)
    return None if CUDA_SKIP.search(reason) else reason


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    reason = _unexpected_skip(report)
    if reason is not None:
        _unexpected_skips.append(f"{report.nodeid}: {reason}")
        report.outcome = "failed"
        report.longrepr = (
            f"unexpected skip under CI=true: {reason}\nIn CI only tests that need CUDA may "
            "skip: install what is missing, or give the skip a reason that says it needs CUDA."
        )


def pytest_collectreport(report: pytest.CollectReport) -> None:
    reason = _unexpected_skip(report)
    if reason is not None:
        _unexpected_skips.append(f"{report.nodeid}: {reason}")


def pytest_terminal_summary(terminalreporter) -> None:  # type: ignore[no-untyped-def]
    if _unexpected_skips:
        terminalreporter.section("unexpected skips under CI=true (each fails the run)")
        for line in _unexpected_skips:
            terminalreporter.line(line)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _unexpected_skips and exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


# -- `make wheel-test`: the tests must run against the installed wheel -----------------
# BCA_EXPECT_INSTALLED_UNDER=DIR (set by `make wheel-test` to its venv) makes the session
# fail at its start unless bca and its extension are imported from under DIR, so a
# checkout's python/ on sys.path cannot stand in for the wheel unnoticed.


def pytest_sessionstart(session: pytest.Session) -> None:
    prefix = os.environ.get("BCA_EXPECT_INSTALLED_UNDER")
    if not prefix:
        return
    import bca
    import bca._bca

    root = os.path.realpath(prefix) + os.sep
    for module in (bca, bca._bca):
        where = os.path.realpath(str(module.__file__))
        if not where.startswith(root):
            raise pytest.UsageError(
                f"BCA_EXPECT_INSTALLED_UNDER={prefix}: {module.__name__} is imported from "
                f"{where}, not from the installed wheel"
            )


def dense_oracle(
    kernel: np.ndarray, in_features: int | None = None, out_features: int | None = None
) -> np.ndarray:
    """ΔW in float64 from scipy.linalg.circulant blocks, cut to (out_features, in_features)."""
    q_out, q_in, p = kernel.shape
    k = np.asarray(kernel, dtype=np.float64)
    full = np.block([[circulant(k[i, j]) for j in range(q_in)] for i in range(q_out)])
    d_in = q_in * p if in_features is None else in_features
    d_out = q_out * p if out_features is None else out_features
    return full[:d_out, :d_in]


def kernel_grad_oracle(
    x: np.ndarray, grad_output: np.ndarray, kernel_shape: tuple[int, int, int]
) -> np.ndarray:
    """Gradient of sum(g * (ΔW x)) wrt the kernel, from the dense gradient gᵀx (float64)."""
    q_out, q_in, p = kernel_shape
    x2 = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    g2 = np.asarray(grad_output, np.float64).reshape(-1, grad_output.shape[-1])
    dw = np.zeros((q_out * p, q_in * p))
    dw[: g2.shape[1], : x2.shape[1]] = g2.T @ x2
    gk = np.zeros(kernel_shape)
    a = np.arange(p)
    for i in range(q_out):
        for j in range(q_in):
            block = dw[i * p : (i + 1) * p, j * p : (j + 1) * p]
            for t in range(p):  # entries with (row - col) mod p == t hold kernel[i, j, t]
                gk[i, j, t] = block[a, (a - t) % p].sum()
    return gk


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    """Norm-relative error ||got - want|| / max(||want||, tiny)."""
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    den = max(float(np.linalg.norm(want)), 1e-30)
    return float(np.linalg.norm(got - want)) / den


TOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}


def run_threads(targets: list[Any], stop: threading.Event, seconds: float) -> None:
    """Run one thread per target for ``seconds``, then set ``stop`` (which the targets
    poll) and join them all."""
    threads = [threading.Thread(target=t) for t in targets]
    for t in threads:
        t.start()
    stop.wait(seconds)
    stop.set()
    for t in threads:
        t.join()


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)


# -- tiny transformers models, shared by the torch/ONNX/PEFT tests --------------------
# Random weights from a config (no hub access), small enough for CPU tests. Each arch's
# defaults below; keyword overrides replace config fields (tests pick widths that a block
# size does not divide on purpose). torch and transformers are imported on call only, so
# numpy-only test runs still import this file.

TINY_VOCAB = 97
TINY_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "bert": (
        "BertConfig",
        dict(vocab_size=TINY_VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
             intermediate_size=40, max_position_embeddings=32),
    ),
    "roberta": (
        "RobertaConfig",
        dict(vocab_size=TINY_VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
             intermediate_size=64, max_position_embeddings=64),
    ),
    "llama": (
        "LlamaConfig",
        dict(vocab_size=TINY_VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, intermediate_size=44, max_position_embeddings=64),
    ),
    "gpt2": (
        "GPT2Config",
        dict(vocab_size=TINY_VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64,
             bos_token_id=0, eos_token_id=1),
    ),
}  # fmt: skip
TINY_HEADS: dict[str, dict[str, str]] = {
    "base": {"bert": "BertModel", "roberta": "RobertaModel", "llama": "LlamaModel",
             "gpt2": "GPT2Model"},
    "classifier": {"bert": "BertForSequenceClassification",
                   "roberta": "RobertaForSequenceClassification",
                   "llama": "LlamaForSequenceClassification",
                   "gpt2": "GPT2ForSequenceClassification"},
    "lm": {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel"},
}  # fmt: skip


def tiny_config(arch: str, **overrides: Any) -> Any:
    """The transformers config of a tiny ``arch`` model: TINY_CONFIGS' defaults, overridden."""
    import transformers

    cls_name, defaults = TINY_CONFIGS[arch]
    return getattr(transformers, cls_name)(**{**defaults, **overrides})


def tiny_model(
    arch: str, head: str = "base", *, seed: int | None = 0, train: bool = False, **overrides: Any
) -> Any:
    """A tiny randomly initialised transformers model.

    ``arch``: ``"bert"``, ``"roberta"``, ``"llama"`` or ``"gpt2"``; ``head``: ``"base"``
    (e.g. BertModel), ``"classifier"`` (…ForSequenceClassification) or ``"lm"`` (LLaMA,
    GPT-2); ``seed``: ``torch.manual_seed`` before the weights are drawn (``None``: the
    caller's generator state); eval mode unless ``train``; ``overrides``: config fields.
    """
    import torch
    import transformers

    if seed is not None:
        torch.manual_seed(seed)
    model = getattr(transformers, TINY_HEADS[head][arch])(tiny_config(arch, **overrides))
    return model.train(train)
