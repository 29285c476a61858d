"""bca: block circulant adapters with a Rust FFT core.

The numpy-level API (this module) needs only numpy. The torch modules and model-level
functions live in :mod:`bca.nn` and :mod:`bca.model`, the ONNX exporter in
:mod:`bca.onnx`; they are imported on first use and need the matching extras.
"""

from __future__ import annotations

import importlib
from typing import Any

from ._adapter_format import BcaFormatError
from ._errors import BcaError, NonFiniteError, ShapeError

_CORE_NAMES = (
    "BlockCirculant",
    "block_circulant_matmul",
    "block_circulant_matmul_backward",
    "block_circulant_to_dense",
    "get_num_threads",
    "mixed_matmul",
    "mixed_matmul_backward",
    "NO_ADAPTER",
    "num_blocks",
    "release_memory",
    "set_num_threads",
)

try:
    from ._bca import __version__
    from .core import (
        NO_ADAPTER,
        BlockCirculant,
        block_circulant_matmul,
        block_circulant_matmul_backward,
        block_circulant_to_dense,
        get_num_threads,
        mixed_matmul,
        mixed_matmul_backward,
        num_blocks,
        release_memory,
        set_num_threads,
    )

    _CORE_IMPORT_ERROR: ImportError | None = None
except ImportError as _err:  # the Rust extension is not built: the torch backend still works
    _CORE_IMPORT_ERROR = _err
    __version__ = "0+unknown"

__all__ = [
    "__version__",
    "BcaError",
    "BcaFormatError",
    "BlockCirculant",
    "block_circulant_matmul",
    "block_circulant_matmul_backward",
    "block_circulant_to_dense",
    "get_num_threads",
    "mixed_matmul",
    "mixed_matmul_backward",
    "NO_ADAPTER",
    "NonFiniteError",
    "num_blocks",
    "release_memory",
    "set_num_threads",
    "ShapeError",
]

_LAZY_SUBMODULES = {"nn", "model", "onnx", "cost", "peft_interop", "cli", "demo"}


def __getattr__(name: str) -> Any:
    if name in _CORE_NAMES and _CORE_IMPORT_ERROR is not None:
        raise ImportError(
            f"bca.{name} needs bca's Rust extension (bca._bca), which failed to import: "
            f"{_CORE_IMPORT_ERROR}. Reinstall bca (pip install bca) to build it; the torch "
            'backend (backend="torch") works without it.'
        ) from _CORE_IMPORT_ERROR
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    """The public API and the lazily imported submodules (not this module's own imports
    such as ``importlib`` or ``Any``)."""
    return sorted({*__all__, *_LAZY_SUBMODULES})
