"""ONNX export of block circulant adapters, checked in onnxruntime.

Public API (see docs/onnx.md):

* :func:`export_model` — an adapted torch model to ONNX, adapters as DFT or MatMul
  subgraphs beside the frozen base MatMul/Gemm (``y = base(x) + adapter(x)``), or folded
  into the base weights.
* :func:`patch_model` — add saved adapters to an existing ONNX file of the base model.
* :func:`add_adapters` — the same on an in-memory ``onnx.ModelProto``.
* :func:`make_adapter_model` / :func:`build_adapter_subgraph` — the adapter alone.
* :func:`choose_lowering` — the ``"auto"`` rule.
* Serving many adapters with one graph (``servable=True``): :func:`servable_layout`,
  :func:`adapter_feeds`, :func:`write_ort_adapter`, :func:`read_ort_adapter`,
  :class:`AdapterSession`.
* Mixed-adapter batches, one adapter per batch row in one run (``mixed=``):
  :func:`add_mixed_adapters`, :func:`mixed_layout`, :func:`build_mixed_adapter_subgraph`,
  :func:`make_mixed_adapter_model`.

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
    build_mixed_adapter_subgraph,
    lowered_spectra,
    make_adapter_model,
    make_mixed_adapter_model,
)
from ._export import DEFAULT_OPSET, MODES, export_model  # torch imported on use
from ._feeds import adapter_feeds
from ._io import SavedAdapter, read_adapter
from ._layout import (
    LAYOUT_METADATA_KEY,
    SERVABLE_DEFAULTS,
    ServableLayer,
    ServableLayout,
    ServableSaved,
    saved_parameter_name,
    servable_layout,
    spectra_parameter_name,
)
from ._lowering import MATMUL_MAX_BLOCK, choose_lowering
from ._mixed import (
    ADAPTER_INDEX_NAME,
    MIXED_METADATA_KEY,
    MixedLayer,
    MixedLayout,
    add_mixed_adapters,
    mixed_layout,
    stack_parameter_name,
)
from ._patch import add_adapters, patch_model
from ._session import ADAPTER_FILE_SUFFIX, AdapterSession, read_ort_adapter, write_ort_adapter
from ._splice import (
    AdapterSpec,
    AmbiguousTargetError,
    LinearSite,
    TargetMatchError,
    TargetNotFoundError,
    find_linear_sites,
)

__all__ = [
    "ADAPTER_FILE_SUFFIX",
    "ADAPTER_INDEX_NAME",
    "DEFAULT_OPSET",
    "LAYOUT_METADATA_KEY",
    "LOWERINGS",
    "MIN_OPSET",
    "MATMUL_MAX_BLOCK",
    "MIXED_METADATA_KEY",
    "MODES",
    "SERVABLE_DEFAULTS",
    "AdapterSession",
    "AdapterSpec",
    "AdapterSubgraph",
    "AmbiguousTargetError",
    "LinearSite",
    "MixedLayer",
    "MixedLayout",
    "SavedAdapter",
    "ServableLayer",
    "ServableLayout",
    "ServableSaved",
    "TargetMatchError",
    "TargetNotFoundError",
    "adapter_feeds",
    "adapter_spectra",
    "add_adapters",
    "add_mixed_adapters",
    "build_adapter_subgraph",
    "build_mixed_adapter_subgraph",
    "choose_lowering",
    "export_model",
    "find_linear_sites",
    "lowered_spectra",
    "make_adapter_model",
    "make_mixed_adapter_model",
    "mixed_layout",
    "patch_model",
    "read_adapter",
    "read_ort_adapter",
    "saved_parameter_name",
    "servable_layout",
    "spectra_parameter_name",
    "stack_parameter_name",
    "write_ort_adapter",
]
