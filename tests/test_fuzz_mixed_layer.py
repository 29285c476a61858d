"""A short pass of fuzz/fuzz_mixed_layer.py (a few seconds), and a check that the harness
sees planted faults: a kernel view reused after the kernel moved to new storage, and a
trusted cache that ignores the version counter."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from unittest import mock

import pytest

import bca.nn
from bca.nn import functional

HARNESS = Path(__file__).resolve().parents[1] / "fuzz" / "fuzz_mixed_layer.py"
pytestmark = pytest.mark.skipif(not bca.nn.rust_available(), reason="needs the Rust extension")


def _harness():
    spec = importlib.util.spec_from_file_location("fuzz_mixed_layer", HARNESS)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["fuzz_mixed_layer"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_short_pass_has_no_failures(capsys: pytest.CaptureFixture[str]) -> None:
    assert _harness().main(["--iterations", "1500", "--seed", "11"]) == 0
    out = capsys.readouterr().out
    assert "failures: 0" in out and "FAILURE" not in out


def test_the_harness_sees_a_stale_kernel_view(capsys: pytest.CaptureFixture[str]) -> None:
    real = functional.KernelCache.rust_view_of

    def stale(self, kernel, in_features, out_features):  # the address check left out
        fast = self.rust_fast
        if fast is not None and fast[1] == (in_features, out_features, kernel.shape, kernel.dtype):
            return fast[3], fast[2]
        return real(self, kernel, in_features, out_features)

    with mock.patch.object(functional.KernelCache, "rust_view_of", stale):
        assert _harness().main(["--iterations", "1500", "--seed", "1"]) == 1
    assert "against the dense oracle" in capsys.readouterr().out


def test_the_harness_sees_a_trust_that_ignores_the_version(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A planted fault of trusted_adapters: a frozen cache that trusts a kernel whatever
    its version counter says (so in-place edits and optimizer steps go unseen)."""

    def blind(self, record, kernel):  # the version and address check left out
        return self.frozen > 0 and record is not None and record[0] is kernel

    with mock.patch.object(functional.KernelCache, "_trusted", blind):
        assert _harness().main(["--iterations", "6000", "--seed", "1"]) == 1
    assert "against the dense oracle" in capsys.readouterr().out
