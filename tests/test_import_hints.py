"""Without torch, the torch-only parts of bca say which extra to install.

Each check runs in a fresh interpreter in which ``import torch`` fails as on a numpy-only
install (``sys.modules["torch"] = None`` makes it raise ModuleNotFoundError).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

HIDE_TORCH = "import sys; sys.modules['torch'] = None\n"


def _run(code: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", HIDE_TORCH + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


@pytest.mark.parametrize("module", ["bca.nn", "bca.model"])
def test_torch_packages_name_the_extra(module: str) -> None:
    out = _run(
        f"""
        try:
            import {module}
        except ModuleNotFoundError as e:
            print(e.name, '|', e)
        """
    )
    assert out == f'torch | {module} needs torch: pip install "bca[torch]"'


@pytest.mark.parametrize("fn", ["c3a_adapter_dir_to_bca", "bca_adapter_dir_to_c3a"])
def test_peft_interop_directory_converters_name_the_extra(fn: str) -> None:
    out = _run(
        f"""
        import numpy as np
        import bca.peft_interop as pi
        k = np.arange(8.0).reshape(1, 2, 4)   # the kernel converters need only numpy
        assert np.array_equal(pi.bca_kernel_to_c3a(pi.c3a_kernel_to_bca(k)), k)
        try:
            pi.{fn}("src", "dst")
        except ModuleNotFoundError as e:
            print(e.name, '|', e)
        """
    )
    assert out == f'torch | bca.peft_interop.{fn} needs torch: pip install "bca[torch]"'


def test_onnx_imports_without_torch_and_export_names_the_extras() -> None:
    out = _run(
        """
        import bca.onnx as bo   # the numpy-level parts: patch_model, sessions, builders
        assert 'torch' not in {k for k, v in sys.modules.items() if v is not None}
        try:
            bo.export_model(None, None, "out.onnx")
        except ImportError as e:
            print(e)
        """
    )
    assert out == "export_model needs torch: pip install 'bca[torch,onnx]'"
