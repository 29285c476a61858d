"""A short pass of fuzz/fuzz_core_api.py, and checks that the harness itself works.

The pass (about 20 s) must end with zero failures: every call returned the dense
oracle's result or raised TypeError/ValueError/MemoryError, no crash, no hang. The
self-tests plant a wrong result, a crash and an abort in the allocation child and check
that the harness reports each one (so a clean pass means something).
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import dense_oracle, kernel_grad_oracle

HARNESS = Path(__file__).resolve().parents[1] / "fuzz" / "fuzz_core_api.py"
SUMMARY = re.compile(r"calls: (\d+), failures: (\d+), crashes: (\d+), hangs: (\d+), wrong: (\d+)")


def _harness():
    spec = importlib.util.spec_from_file_location("fuzz_core_api", HARNESS)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["fuzz_core_api"] = mod  # dataclasses look the module up by name
    spec.loader.exec_module(mod)
    return mod


def _run(*args: str, timeout: float = 240) -> tuple[int, str, dict[str, int]]:
    run = subprocess.run(
        [sys.executable, str(HARNESS), "--no-progress", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    out = run.stdout + run.stderr
    m = SUMMARY.search(run.stdout)
    assert m is not None, out
    names = ("calls", "failures", "crashes", "hangs", "wrong")
    return run.returncode, out, dict(zip(names, map(int, m.groups()), strict=True))


def test_harness_oracles_equal_the_test_oracles() -> None:
    fz = _harness()
    rng = np.random.default_rng(7)
    for p, q_out, q_in in [(1, 3, 2), (2, 1, 1), (5, 2, 3), (8, 3, 1), (13, 1, 2)]:
        kernel = rng.standard_normal((q_out, q_in, p))
        d_in, d_out = q_in * p - (p - 1) // 2, q_out * p - p // 3
        np.testing.assert_array_equal(
            fz.dense_oracle(kernel, d_in, d_out), dense_oracle(kernel, d_in, d_out)
        )
        x = rng.standard_normal((4, d_in))
        g = rng.standard_normal((4, d_out))
        np.testing.assert_allclose(
            fz.kernel_grad_oracle(x, g, kernel.shape),
            kernel_grad_oracle(x, g, kernel.shape),
            rtol=1e-12,
            atol=1e-12,
        )


def test_harness_compares_results_near_the_float64_range() -> None:
    # A scale of 1e300 is valid: the sums of squares of such results overflowed, which
    # made a correct result a NaN "error" (fuzz seed 4343, --openmp) and an inf result
    # "close" to a finite oracle.
    close = _harness().rel_close
    want = np.array([1e300, -3e299, 2e300, 0.0])
    assert close(want.copy(), want, 1e-12, 0.0) == (True, 0.0)
    assert close(want * (1 + 1e-15), want, 1e-12, 0.0)[0]
    assert not close(want * (1 + 1e-6), want, 1e-12, 0.0)[0]
    assert not close(np.array([np.inf, 0.0, 0.0, 0.0]), want, 1e-12, 0.0)[0]
    assert not close(np.array([np.nan, 0.0, 0.0, 0.0]), want, 1e-12, 0.0)[0]
    # rows whose exact result overflows: the same infinities, the rest compared as usual
    # (seed 7171: the core matched its oracle, infinities included, and read as a NaN error)
    want = np.array([5e5, -np.inf, np.inf, -2e5])
    assert close(want.copy(), want, 1e-12, 0.0) == (True, 0.0)
    assert close(want * (1 + 1e-15), want, 1e-12, 0.0)[0]
    assert not close(np.array([5e5, np.inf, np.inf, -2e5]), want, 1e-12, 0.0)[0]
    assert not close(np.array([5e5, -1e308, np.inf, -2e5]), want, 1e-12, 0.0)[0]
    assert not close(np.array([5e5, -np.inf, np.nan, -2e5]), want, 1e-12, 0.0)[0]
    assert not close(np.array([5e5 * (1 + 1e-6), -np.inf, np.inf, -2e5]), want, 1e-12, 0.0)[0]
    assert not close(np.array([np.inf, -np.inf, np.inf, -2e5]), want, 1e-12, 0.0)[0]


def test_short_fuzz_pass_has_no_failures() -> None:
    rc, out, counts = _run(
        "--iterations", "2000000", "--max-seconds", "20", "--seed", "20261203",
        "--workers", "2", "--threads", "2", "--subprocess-every", "2000",
    )  # fmt: skip
    assert counts["calls"] >= 5000, out  # it really ran
    assert counts["failures"] == 0 and rc == 0, out


def test_short_fuzz_pass_on_torchs_openmp_team_has_no_failures() -> None:
    pytest.importorskip("torch")
    if not sys.platform.startswith("linux"):
        pytest.skip("the OpenMP team is attached on Linux only")
    rc, out, counts = _run(
        "--iterations", "2000000", "--max-seconds", "15", "--seed", "20261204",
        "--workers", "1", "--threads", "3", "--subprocess-every", "0", "--openmp",
    )  # fmt: skip
    assert counts["calls"] >= 2000, out  # it really ran
    assert counts["failures"] == 0 and rc == 0, out


@pytest.mark.parametrize(
    ("fault", "field"), [("wrong", "wrong"), ("crash", "crashes"), ("alloc-crash", "crashes")]
)
def test_harness_reports_planted_faults(fault: str, field: str) -> None:
    # The planted crash fires on a rare input: thread 0 of seed 5 draws one between its
    # 600th and 1000th call. Two threads share the call budget at their own speeds, so
    # with 2000 calls in all thread 0 sometimes stopped short of it (1 run in 3, or in
    # CI): the budget leaves each thread room for 2000 calls.
    rc, out, counts = _run(
        "--iterations", "4000", "--max-seconds", "15", "--seed", "5", "--threads", "2",
        "--subprocess-every", "300", "--inject", fault,
    )  # fmt: skip
    assert rc == 1 and counts["failures"] > 0 and counts[field] > 0, out
