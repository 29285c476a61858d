"""Shared test fixtures and the dense oracle used by every test file."""

from __future__ import annotations

import os

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


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)
