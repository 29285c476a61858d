"""ONNX export of block circulant adapters, checked in onnxruntime.

Public API (see docs/onnx.md):

* :func:`export_model` — an adapted torch model to ONNX, adapters as DFT or MatMul
  subgraphs beside the frozen base MatMul/Gemm (``y = base(x) + adapter(x)``), or folded
  into the base weights.
* :func:`patch_model` — add saved adapters to an existing ONNX file of the base model.
* :func:`add_adapters` — the same on an in-memory ``onnx.ModelProto``.
* :func:`make_adapter_model` / :func:`build_adapter_subgraph` — the adapter alone.
* :func:`choose_lowering` — the ``"auto"`` rule.

Inside this package ``import onnx`` is the ``onnx`` distribution (absolute imports), not
this package.
"""

from __future__ import annotations

from ._builder import (
    LOWERINGS,
    MIN_OPSET,
    AdapterSubgraph,
    adapter_spectra,
    build_adapter_subgraph,
    make_adapter_model,
)
from ._export import DEFAULT_OPSET, MODES, export_model  # torch imported on use
from ._io import SavedAdapter, read_adapter
from ._lowering import MATMUL_MAX_BLOCK, choose_lowering
from ._patch import add_adapters, patch_model
from ._splice import (
    AdapterSpec,
    AmbiguousTargetError,
    LinearSite,
    TargetMatchError,
    TargetNotFoundError,
    find_linear_sites,
)

__all__ = [
    "DEFAULT_OPSET",
    "LOWERINGS",
    "MIN_OPSET",
    "MATMUL_MAX_BLOCK",
    "MODES",
    "AdapterSpec",
    "AdapterSubgraph",
    "AmbiguousTargetError",
    "LinearSite",
    "SavedAdapter",
    "TargetMatchError",
    "TargetNotFoundError",
    "adapter_spectra",
    "add_adapters",
    "build_adapter_subgraph",
    "choose_lowering",
    "export_model",
    "find_linear_sites",
    "make_adapter_model",
    "patch_model",
    "read_adapter",
]
