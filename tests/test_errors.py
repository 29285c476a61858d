"""bca's exception hierarchy: BcaError(ValueError) with ShapeError, NonFiniteError and
BcaFormatError below it, raised alike by the Rust core and the Python layers; TypeError
and MemoryError stay the built-ins."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import bca
from bca import BcaError, BcaFormatError, NonFiniteError, ShapeError

needs_core = pytest.mark.skipif(
    getattr(bca, "_CORE_IMPORT_ERROR", None) is not None, reason="bca._bca not built"
)


def test_hierarchy_and_exports() -> None:
    assert issubclass(BcaError, ValueError)
    for cls in (ShapeError, NonFiniteError, BcaFormatError):
        assert issubclass(cls, BcaError)
    assert not issubclass(ShapeError, NonFiniteError)
    import bca.core

    assert bca.core.BcaError is BcaError and bca.core.ShapeError is ShapeError
    assert {"BcaError", "ShapeError", "NonFiniteError", "BcaFormatError"} <= set(bca.__all__)


@needs_core
def test_core_errors_are_bca_errors() -> None:
    kernel = np.ones((2, 2, 4), np.float32)
    op = bca.BlockCirculant(kernel)
    with pytest.raises(ShapeError, match="in_features = 8"):
        op.matmul(np.ones((1, 7), np.float32))
    with pytest.raises(ShapeError, match="C-contiguous"):
        op.matmul(np.ones((8, 2), np.float32).T)
    with pytest.raises(ShapeError, match="does not fit"):
        bca.BlockCirculant(kernel, in_features=3)
    with pytest.raises(ShapeError, match="3 dimensions"):
        bca.BlockCirculant(kernel[0])
    with pytest.raises(NonFiniteError, match="NaN or Inf"):
        op.matmul(np.full((1, 8), np.nan, np.float32))
    with pytest.raises(BcaError, match="out of range") as info:  # a value, not a shape
        bca.mixed_matmul([op], np.array([5]), np.ones((1, 8), np.float32))
    assert type(info.value) is BcaError
    with pytest.raises(BcaError, match="between 1 and"):
        bca.BlockCirculant(kernel, num_threads=2**40)
    with pytest.raises(BcaError, match="kernel gradient"):
        op.backward(None, np.ones((1, 8), np.float32))
    # wrong types and dtypes stay TypeError
    with pytest.raises(TypeError) as t_info:
        op.matmul(np.ones((1, 8), np.float64))
    assert not isinstance(t_info.value, BcaError)


def test_format_errors_are_bca_errors(tmp_path: Path) -> None:
    from bca import _adapter_format

    (tmp_path / "adapter_config.json").write_text(json.dumps({"format": "bca"}))
    with pytest.raises(BcaError) as info:
        _adapter_format.read_config(tmp_path)
    assert isinstance(info.value, BcaFormatError)


def test_torch_layers_raise_bca_errors() -> None:
    torch = pytest.importorskip("torch")
    from bca.model import BCAConfig, inject_adapters
    from bca.nn import BlockCirculantLinear
    from bca.nn.functional import block_circulant

    layer = BlockCirculantLinear(torch.nn.Linear(10, 7), block_size=4)
    with pytest.raises(ShapeError, match="in_features=10"):
        layer.adapter_forward(torch.randn(2, 9))
    with pytest.raises(ShapeError, match="does not divide"):
        BlockCirculantLinear(torch.nn.Linear(10, 7), block_size=4, pad=False)
    with pytest.raises(ShapeError, match="2 names for a batch of 3"):
        layer(torch.randn(3, 10), adapter_names=["default", "default"])
    with pytest.raises(BcaError, match="unknown adapter") as info:
        layer.set_adapter("nope")
    assert not isinstance(info.value, ShapeError)
    with pytest.raises(ShapeError, match="in_features=13"):
        block_circulant(torch.randn(2, 10), layer.bca_kernel, 13, 7)
    with pytest.raises(BcaError, match="backend"):
        block_circulant(torch.randn(2, 10), layer.bca_kernel, 10, 7, backend="cuda")
    with pytest.raises(BcaError, match="match no module"):
        inject_adapters(
            torch.nn.Sequential(torch.nn.Linear(4, 4)),
            BCAConfig(block_size=2, target_modules=["nothing"]),
        )


def test_peft_interop_raises_bca_errors() -> None:
    from bca.peft_interop import bca_kernel_to_c3a

    with pytest.raises(ShapeError, match="for C3A"):
        bca_kernel_to_c3a(np.ones((2, 3, 4), np.float32), in_features=10)
    with pytest.raises(BcaError, match="finite"):
        bca_kernel_to_c3a(np.ones((2, 3, 4), np.float32), scale=float("nan"))
