"""Serving many adapters with one base graph: kernel spectra as overridable initializers.

A *servable* graph (``export_model(..., servable=True)``, ``patch_model(...,
servable=True)``) is an adapted graph whose per-layer kernel-spectra constant ``G`` (see
:func:`bca.onnx.lowered_spectra`; ``scale``, ``1/p`` and the one-sided weights folded in)
is an *overridable initializer*: an initializer that is also a graph input, named
``bca.<module name>.spectra``. Its stored value is the default (zeros: the base model; or
the exported adapter's own spectra). Per run, a runtime supplies other spectra either

* through ONNX Runtime's adapter API: each trained adapter written once as an
  ``.onnx_adapter`` file (:func:`write_ort_adapter`), loaded as ``onnxruntime.LoraAdapter``
  and activated per call with ``RunOptions.add_active_adapter`` (:class:`AdapterSession`
  wraps this), or
* as ordinary inputs (:func:`adapter_feeds`), for runtimes without that API.

The graph records its *layout* (per layer: module, parameter name, spectra shape and dtype,
block size, widths, lowering) as JSON in ``metadata_props["bca.servable_layout"]`` with a
hash of it; adapter files carry a model version derived from the hash, so an adapter
written for another graph is refused with a clear error instead of computing a wrong
answer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import threading
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np
import onnx
from onnx import helper

from ._builder import lowered_spectra
from ._io import SavedAdapter, read_adapter
from ._splice import AdapterSpec

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "ADAPTER_FILE_SUFFIX",
    "LAYOUT_METADATA_KEY",
    "SERVABLE_DEFAULTS",
    "AdapterSession",
    "ServableLayer",
    "ServableLayout",
    "adapter_feeds",
    "read_ort_adapter",
    "servable_layout",
    "spectra_parameter_name",
    "write_ort_adapter",
]

LAYOUT_METADATA_KEY = "bca.servable_layout"
"""``metadata_props`` key holding a servable graph's layout (JSON)."""

LAYOUT_FORMAT = "bca.servable"
LAYOUT_FORMAT_VERSION = 1

SERVABLE_DEFAULTS = ("zeros", "adapter")
"""Default values of the spectra in a servable graph: ``"zeros"`` (the base model) or
``"adapter"`` (the exported adapter's own spectra)."""

ADAPTER_FILE_SUFFIX = ".onnx_adapter"

_DTYPES = ("float32", "float64")


def spectra_parameter_name(module: str) -> str:
    """The overridable initializer of ``module``'s kernel spectra: ``bca.<module>.spectra``."""
    return f"bca.{module}.spectra"


# --------------------------------------------------------------------------------------
# layout
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ServableLayer:
    """One adapted layer of a servable graph.

    ``parameter`` is the graph input/initializer holding the layer's kernel spectra, of
    ``shape`` ``(frequencies, 2 q_in, 2 q_out)`` and ``dtype`` (the graph's compute dtype:
    float32 for float32 and float16 graphs, float64 for float64 ones; a kernel fed to
    :func:`adapter_feeds` must have this dtype). ``lowering`` is the one emitted
    (``"dft"``, ``"matmul"`` or ``"matmul2"``): it decides how spectra are laid out.
    """

    module: str
    parameter: str
    shape: tuple[int, ...]
    dtype: str
    block_size: int
    in_features: int
    out_features: int
    lowering: str

    @property
    def kernel_shape(self) -> tuple[int, int, int]:
        p = self.block_size
        return (-(-self.out_features // p), -(-self.in_features // p), p)

    def describe(self) -> str:
        return (
            f"block_size={self.block_size}, in_features={self.in_features}, "
            f"out_features={self.out_features}, kernel {self.kernel_shape} {self.dtype}"
        )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["shape"] = list(self.shape)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ServableLayer:
        return cls(
            module=str(d["module"]),
            parameter=str(d["parameter"]),
            shape=tuple(int(v) for v in d["shape"]),
            dtype=str(d["dtype"]),
            block_size=int(d["block_size"]),
            in_features=int(d["in_features"]),
            out_features=int(d["out_features"]),
            lowering=str(d["lowering"]),
        )


@dataclass(frozen=True)
class ServableLayout:
    """The adapted layers of a servable graph and the default of their spectra.

    ``layout_hash`` (sha256 of the layers, the default excluded) identifies which adapters
    fit the graph; ``model_version`` is a 31-bit integer derived from it, written into
    every ``.onnx_adapter`` file for the graph.
    """

    layers: tuple[ServableLayer, ...]
    default: str = "zeros"

    @property
    def layout_hash(self) -> str:
        doc = {
            "format_version": LAYOUT_FORMAT_VERSION,
            "layers": [layer.to_dict() for layer in sorted(self.layers, key=lambda x: x.module)],
        }
        text = json.dumps(doc, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    @property
    def model_version(self) -> int:
        return int(self.layout_hash[:8], 16) & 0x7FFFFFFF or 1

    @property
    def modules(self) -> tuple[str, ...]:
        return tuple(layer.module for layer in self.layers)

    @property
    def parameter_names(self) -> tuple[str, ...]:
        return tuple(layer.parameter for layer in self.layers)

    def layer(self, module: str) -> ServableLayer:
        for layer in self.layers:
            if layer.module == module:
                return layer
        raise KeyError(module)

    def zero_feeds(self) -> dict[str, np.ndarray]:
        """Zero spectra for every layer: the base model."""
        return {x.parameter: np.zeros(x.shape, dtype=x.dtype) for x in self.layers}

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": LAYOUT_FORMAT,
                "format_version": LAYOUT_FORMAT_VERSION,
                "default": self.default,
                "layout_hash": self.layout_hash,
                "model_version": self.model_version,
                "layers": [layer.to_dict() for layer in self.layers],
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str, *, source: str = "servable layout") -> ServableLayout:
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{source}: servable layout is not valid JSON: {e}") from None
        if not isinstance(doc, dict) or doc.get("format") != LAYOUT_FORMAT:
            raise ValueError(f"{source}: not a bca servable layout")
        if doc.get("format_version") != LAYOUT_FORMAT_VERSION:
            raise ValueError(
                f"{source}: unsupported servable layout format_version "
                f"{doc.get('format_version')!r} (reads {LAYOUT_FORMAT_VERSION})"
            )
        try:
            layers = tuple(ServableLayer.from_dict(d) for d in doc["layers"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{source}: malformed servable layout ({e!r})") from None
        default = doc.get("default")
        if default not in SERVABLE_DEFAULTS:
            raise ValueError(
                f"{source}: servable layout default must be one of "
                f"{SERVABLE_DEFAULTS}, got {default!r}"
            )
        layout = cls(layers, str(default))
        if doc.get("layout_hash") != layout.layout_hash:
            raise ValueError(
                f"{source}: servable layout hash {doc.get('layout_hash')!r} does not match its "
                f"layers ({layout.layout_hash!r}); the metadata was edited or corrupted"
            )
        return layout


def _layout_from_model(model: onnx.ModelProto, source: str) -> ServableLayout:
    entries = [p.value for p in model.metadata_props if p.key == LAYOUT_METADATA_KEY]
    if not entries:
        raise ValueError(
            f"{source} is not a servable bca graph (no {LAYOUT_METADATA_KEY!r} metadata); "
            "export it with export_model(..., servable=True) or patch_model(..., servable=True)"
        )
    layout = ServableLayout.from_json(entries[-1], source=source)
    inputs = {i.name: i for i in model.graph.input}
    inits = {t.name: t for t in model.graph.initializer}
    for layer in layout.layers:
        t = inits.get(layer.parameter)
        if t is None or layer.parameter not in inputs:
            raise ValueError(
                f"{source}: spectra {layer.parameter!r} of module {layer.module!r} is not an "
                "overridable initializer (initializer and graph input) of the graph"
            )
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).name
        if tuple(t.dims) != layer.shape or dtype != layer.dtype:
            raise ValueError(
                f"{source}: initializer {layer.parameter!r} is {tuple(t.dims)} {dtype}, its "
                f"layout says {layer.shape} {layer.dtype}"
            )
    return layout


@lru_cache(maxsize=16)
def _layout_from_file(path: str, mtime_ns: int, size: int) -> ServableLayout:
    del mtime_ns, size  # cache keys: a rewritten file is read again
    from ._io import load_onnx

    try:
        model = onnx.load(path, load_external_data=False)
    except Exception:  # noqa: BLE001 - load_onnx gives the one-line error
        model = load_onnx(path)
    return _layout_from_model(model, repr(path))


ServableSource: TypeAlias = (
    "str | os.PathLike[str] | onnx.ModelProto | ServableLayout | AdapterSession"
)
"""A servable graph: its path, its ``ModelProto``, its layout or an :class:`AdapterSession`."""


def servable_layout(servable: ServableSource) -> ServableLayout:
    """The layout of a servable graph (a path, a ``ModelProto``, a layout or a session).

    Raises ``ValueError`` when the graph is not servable, its layout metadata is malformed
    or does not match the graph, ``FileNotFoundError`` for a missing file.
    """
    if isinstance(servable, ServableLayout):
        return servable
    if isinstance(servable, AdapterSession):
        return servable.layout
    if isinstance(servable, onnx.ModelProto):
        return _layout_from_model(servable, "the model")
    if isinstance(servable, (str, os.PathLike)):
        p = Path(servable)
        if not p.is_file():
            raise FileNotFoundError(f"ONNX file {str(p)!r} does not exist")
        st = p.stat()
        return _layout_from_file(str(p.resolve()), st.st_mtime_ns, st.st_size)
    raise TypeError(
        "servable must be a path, an onnx.ModelProto, a ServableLayout or an AdapterSession, "
        f"got {type(servable).__name__}"
    )


# --------------------------------------------------------------------------------------
# making a graph servable (called by add_adapters)
# --------------------------------------------------------------------------------------
def combine_specs(specs: Sequence[AdapterSpec]) -> list[AdapterSpec]:
    """One spec per module: adapters on the same module add up (``Σ scale_i K_i``, scale 1);
    they must agree on block size and widths (one spectra tensor per layer)."""
    out: dict[str, AdapterSpec] = {}
    for s in specs:
        k = np.asarray(s.kernel)
        prev = out.get(s.name)
        if prev is None:
            out[s.name] = AdapterSpec(s.name, k, s.in_features, s.out_features, s.scale)
            continue
        if (prev.kernel.shape, prev.in_features, prev.out_features) != (
            k.shape,
            s.in_features,
            s.out_features,
        ):
            raise ValueError(
                f"module {s.name!r} is adapted twice with different shapes (kernel "
                f"{prev.kernel.shape} and {k.shape}); a servable graph holds one spectra "
                "tensor per layer, so adapters on one layer must share the block size"
            )
        merged = prev.scale * np.asarray(prev.kernel, np.float64) + s.scale * np.asarray(
            k, np.float64
        )
        out[s.name] = AdapterSpec(s.name, merged, s.in_features, s.out_features, 1.0)
    return list(out.values())


def check_servable_default(default: str) -> None:
    if default not in SERVABLE_DEFAULTS:
        raise ValueError(f"servable_default must be one of {SERVABLE_DEFAULTS}, got {default!r}")


def reserve_spectra_names(model: onnx.ModelProto, specs: Sequence[AdapterSpec]) -> list[str]:
    """``bca.<module>.spectra`` per spec; ValueError when the model is servable already or
    a name is taken."""
    if any(p.key == LAYOUT_METADATA_KEY for p in model.metadata_props):
        raise ValueError(
            "the model is a servable graph already; make the servable graph from the base "
            "model (adapters baked into it may be patched in without servable=True)"
        )
    if model.ir_version < 4:
        raise ValueError(
            f"IR version {model.ir_version} has no overridable initializers (needs IR >= 4)"
        )
    taken = {t.name for t in model.graph.initializer}
    taken.update(i.name for i in model.graph.input)
    for n in model.graph.node:
        taken.update(n.output)
    names = [spectra_parameter_name(s.name) for s in specs]
    clash = [n for n in names if n in taken]
    if clash:
        raise ValueError(f"tensor name(s) {clash} exist in the graph already")
    if len(set(names)) != len(names):
        raise ValueError("several adapters on one module: combine them first")
    return names


def make_overridable(
    model: onnx.ModelProto,
    specs: Sequence[AdapterSpec],
    lowerings: Sequence[str],
    default: str,
) -> ServableLayout:
    """List each spec's spectra initializer as a graph input, set its default (zeros or
    kept), record the layout in ``metadata_props``; returns the layout."""
    check_servable_default(default)
    inits = {t.name: t for t in model.graph.initializer}
    layers: list[ServableLayer] = []
    for spec, low in zip(specs, lowerings, strict=True):
        name = spectra_parameter_name(spec.name)
        t = inits[name]
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type))
        if default == "zeros":
            zero = onnx.numpy_helper.from_array(np.zeros(tuple(t.dims), dtype), name)
            t.CopyFrom(zero)
        model.graph.input.append(helper.make_tensor_value_info(name, t.data_type, list(t.dims)))
        layers.append(
            ServableLayer(
                module=spec.name,
                parameter=name,
                shape=tuple(int(d) for d in t.dims),
                dtype=dtype.name,
                block_size=int(np.shape(spec.kernel)[-1]),
                in_features=int(spec.in_features),
                out_features=int(spec.out_features),
                lowering=low,
            )
        )
    layout = ServableLayout(tuple(layers), default)
    entry = model.metadata_props.add()
    entry.key = LAYOUT_METADATA_KEY
    entry.value = layout.to_json()
    return layout


# --------------------------------------------------------------------------------------
# adapters -> spectra
# --------------------------------------------------------------------------------------
AdapterSource: TypeAlias = "str | os.PathLike[str] | SavedAdapter | torch.nn.Module"
"""One adapter: a :func:`bca.model.save_adapter` directory, a :class:`SavedAdapter`, or a
torch model with bca adapters."""

AdapterInput: TypeAlias = "AdapterSource | Sequence[tuple[AdapterSource, float]]"
"""One adapter, or a weighted list ``[(adapter, weight), ...]`` (their weighted sum)."""


@dataclass
class _Kernel:
    module: str
    kernel: np.ndarray
    scale: float
    in_features: int
    out_features: int


def _describe_source(adapter: object) -> str:
    if isinstance(adapter, (str, os.PathLike)):
        return f"adapter {str(adapter)!r}"
    if isinstance(adapter, SavedAdapter):
        return f"adapter {str(adapter.path)!r}"
    return f"adapter {type(adapter).__name__}"


def _kernels_of(adapter: object) -> tuple[str, list[_Kernel]]:
    """(description, kernels) of one adapter source."""
    if isinstance(adapter, (str, os.PathLike)):
        adapter = read_adapter(adapter)
    if isinstance(adapter, SavedAdapter):
        label = _describe_source(adapter)
        if adapter.modules_to_save:
            raise ValueError(
                f"{label} has fully trained modules (modules_to_save: "
                f"{sorted(adapter.modules_to_save)}); a servable graph swaps only the circulant "
                "adapters, so serving it would compute a wrong answer: patch it into its own "
                "graph (patch_model) instead"
            )
        return label, [
            _Kernel(s.name, np.asarray(s.kernel), float(s.scale), s.in_features, s.out_features)
            for s in adapter.specs
        ]
    if hasattr(adapter, "named_modules"):
        return _describe_source(adapter), _torch_kernels(adapter)
    raise TypeError(
        "adapter must be a saved adapter directory, a SavedAdapter, a torch model with bca "
        f"adapters, or a list of (adapter, weight) pairs; got {type(adapter).__name__}"
    )


def _torch_kernels(model: Any) -> list[_Kernel]:
    from ..model import adapter_modules

    label = _describe_source(model)
    mts = getattr(getattr(model, "bca_config", None), "modules_to_save", None)
    if mts:
        raise ValueError(
            f"{label} has fully trained modules (modules_to_save: {mts}); a servable graph "
            "swaps only the circulant adapters"
        )
    out: list[_Kernel] = []
    for name, m in adapter_modules(model):
        if not getattr(m, "adapter_enabled", True):
            continue  # switched off: the layer computes the base layer
        if not m.active_adapters:
            continue
        if m.merged:
            raise ValueError(
                f"module {name!r}: the adapter is merged into the base weight; unmerge it first"
            )
        try:  # the active adapters with their weights, as one kernel
            live = m.combined_kernel()
        except ValueError as exc:
            raise ValueError(
                f"module {name!r}: {exc}; serve them as a weighted list of saved adapters"
            ) from None
        if live is None:
            continue
        kernel, scale = live
        out.append(
            _Kernel(
                name,
                kernel.detach().to("cpu").numpy().copy(),
                float(scale),
                int(m.in_features),
                int(m.out_features),
            )
        )
    if not out:
        raise ValueError(f"{label} has no enabled bca adapters")
    return out


def _terms(adapter: AdapterInput) -> list[tuple[str, list[_Kernel], float]]:
    if isinstance(adapter, (list, tuple)):
        if not adapter:
            raise ValueError("the weighted list of adapters is empty")
        terms = []
        for item in adapter:
            if not (isinstance(item, (list, tuple)) and len(item) == 2):
                raise TypeError(
                    "a list of adapters must hold (adapter, weight) pairs, got "
                    f"{type(item).__name__}"
                )
            src, weight = item
            if isinstance(weight, bool) or not isinstance(weight, (int, float, np.floating)):
                raise TypeError(f"adapter weight must be a number, got {type(weight).__name__}")
            if not np.isfinite(float(weight)):
                raise ValueError(f"adapter weight must be finite, got {weight}")
            label, kernels = _kernels_of(src)
            terms.append((label, kernels, float(weight)))
        return terms
    label, kernels = _kernels_of(adapter)
    return [(label, kernels, 1.0)]


def _check_kernel_fits(label: str, k: _Kernel, layer: ServableLayer) -> None:
    kernel = k.kernel
    got_p = int(kernel.shape[-1]) if kernel.ndim == 3 else -1
    got = (
        f"block_size={got_p}, in_features={k.in_features}, out_features={k.out_features}, "
        f"kernel {tuple(kernel.shape)} {kernel.dtype}"
    )
    if (
        kernel.ndim != 3
        or got_p != layer.block_size
        or (k.in_features, k.out_features) != (layer.in_features, layer.out_features)
        or tuple(kernel.shape) != layer.kernel_shape
    ):
        raise ValueError(
            f"{label}, module {k.module!r}: {got}; the servable graph expects {layer.describe()}"
        )
    if kernel.dtype.name != layer.dtype:
        raise ValueError(
            f"{label}, module {k.module!r}: kernel dtype {kernel.dtype} ({got}); the servable "
            f"graph expects {layer.dtype} ({layer.describe()})"
        )
    if not np.all(np.isfinite(kernel)):
        raise ValueError(f"{label}, module {k.module!r}: kernel contains NaN or Inf")


def adapter_feeds(adapter: AdapterInput, servable: ServableSource) -> dict[str, np.ndarray]:
    """The spectra of ``adapter`` for every layer of a servable graph, as run feeds.

    ``sess.run(None, {**inputs, **adapter_feeds(adapter, layout)})`` computes the base model
    plus ``adapter``, with any ONNX runtime (no adapter API needed). ``adapter`` is a saved
    adapter directory, a :class:`SavedAdapter`, a torch model with bca adapters, or a
    weighted list ``[(adapter, weight), ...]`` giving ``Σ weight · adapter`` (the spectra
    are linear in the kernels: this is how combined adapters are served).

    Every layer of the graph gets a feed (zeros where the adapter has no module), so a
    non-zero default never leaks in. Raises ``ValueError`` naming the module and both
    shapes when block size, widths or dtype differ from the graph's layout, and when the
    adapter has modules the graph lacks.
    """
    layout = servable_layout(servable)
    by_module = {x.module: x for x in layout.layers}
    acc = {x.parameter: np.zeros(x.shape, np.float64) for x in layout.layers}
    for label, kernels, weight in _terms(adapter):
        unknown = [k.module for k in kernels if k.module not in by_module]
        if unknown:
            raise ValueError(
                f"{label} adapts module(s) {unknown} that the servable graph has no adapter "
                f"slot for (another model?); the graph's modules: {list(layout.modules)}"
            )
        for k in kernels:
            layer = by_module[k.module]
            _check_kernel_fits(label, k, layer)
            g, low = lowered_spectra(k.kernel, k.scale * weight, lowering=layer.lowering)
            if low != layer.lowering or g.shape != layer.shape:  # pragma: no cover - defensive
                raise ValueError(
                    f"{label}, module {k.module!r}: spectra {g.shape} ({low}) do not fit the "
                    f"graph's {layer.shape} ({layer.lowering})"
                )
            acc[layer.parameter] += g
    return {x.parameter: acc[x.parameter].astype(x.dtype) for x in layout.layers}


# --------------------------------------------------------------------------------------
# ONNX Runtime adapter files
# --------------------------------------------------------------------------------------
def _ort_adapter_api() -> Any:
    try:
        import onnxruntime as ort  # type: ignore[import-untyped]
    except ImportError as e:  # pragma: no cover - onnxruntime is in bca[onnx]
        raise ImportError("serving needs onnxruntime: pip install 'bca[onnx]'") from e
    if not all(hasattr(ort, n) for n in ("AdapterFormat", "LoraAdapter")) or not hasattr(
        ort.RunOptions, "add_active_adapter"
    ):
        raise RuntimeError(
            f"onnxruntime {ort.__version__} has no adapter API (AdapterFormat, LoraAdapter, "
            "RunOptions.add_active_adapter: onnxruntime >= 1.20); feed the spectra as "
            "inputs instead (bca.onnx.adapter_feeds)"
        )
    return ort


def write_ort_adapter(
    adapter: AdapterInput,
    servable: ServableSource,
    out_path: str | os.PathLike[str],
    *,
    adapter_version: int = 1,
) -> Path:
    """Write ``adapter``'s spectra for a servable graph as an ONNX Runtime adapter file.

    The file (``onnxruntime.AdapterFormat``, conventionally ``*.onnx_adapter``) holds one
    tensor per layer of the graph (see :func:`adapter_feeds`, which validates the adapter),
    ``adapter_version`` and, as model version, the graph layout's ``model_version``: load
    it with ``onnxruntime.LoraAdapter`` (or :class:`AdapterSession`, which checks it) and
    activate it per run with ``RunOptions.add_active_adapter``. Returns the path.
    """
    ort = _ort_adapter_api()
    if isinstance(adapter_version, bool) or not isinstance(adapter_version, int):
        raise TypeError(f"adapter_version must be an int, got {type(adapter_version).__name__}")
    if not 0 <= adapter_version < 2**31:
        raise ValueError(f"adapter_version must be in [0, 2**31), got {adapter_version}")
    layout = servable_layout(servable)
    feeds = adapter_feeds(adapter, layout)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    # OrtValue.ortvalue_from_numpy does not copy on CPU: keep the arrays alive until written
    arrays = {k: np.ascontiguousarray(v) for k, v in feeds.items()}
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(adapter_version)
    fmt.set_model_version(layout.model_version)
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in arrays.items()})
    # onnxruntime.LoraAdapter memory-maps its file: rewriting a loaded file in place would
    # change what a running session serves. Write a temporary file and rename it over
    # ``out`` (atomic), so sessions that loaded the old file keep the old contents.
    fd, tmp_name = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        fmt.export_adapter(str(tmp))
        read_ort_adapter(tmp, layout)  # what was written reads back and fits
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def read_ort_adapter(
    path: str | os.PathLike[str], servable: ServableSource | None = None
) -> dict[str, np.ndarray]:
    """The parameters of an ONNX Runtime adapter file, as numpy arrays (copies).

    With ``servable`` (a servable graph or its layout) the file is checked against the
    graph's layout: the same parameter names, shapes and dtypes, finite values, and the
    layout's model version (an adapter written for a graph with equal shapes but another
    lowering or layer set is refused). Raises ``ValueError`` naming the file, the module
    and both shapes on a mismatch; ``FileNotFoundError`` for a missing file.
    """
    ort = _ort_adapter_api()
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"adapter file {str(p)!r} does not exist")
    try:
        fmt = ort.AdapterFormat.read_adapter(str(p))
    except Exception as e:  # noqa: BLE001 - ORT raises RuntimeError with a C++ trace
        raise ValueError(
            f"{str(p)!r} is not a readable ONNX Runtime adapter file ({_first_line(e)[:200]})"
        ) from None
    # copy while the AdapterFormat (which owns the buffers) is alive
    arrays = {k: np.array(v.numpy(), copy=True) for k, v in fmt.get_parameters().items()}
    model_version = int(fmt.get_model_version())
    del fmt
    if servable is not None:
        _check_adapter_file(arrays, model_version, servable_layout(servable), str(p))
    return arrays


def _check_adapter_file(
    arrays: Mapping[str, np.ndarray], model_version: int, layout: ServableLayout, source: str
) -> None:
    want = {x.parameter: x for x in layout.layers}
    extra = sorted(set(arrays) - set(want))
    if extra:
        raise ValueError(
            f"adapter file {source!r} has parameters {extra[:8]} that the servable graph does "
            f"not have (written for another model?); the graph's: {sorted(want)[:8]}"
        )
    missing = sorted(set(want) - set(arrays))
    if missing:
        raise ValueError(
            f"adapter file {source!r} lacks the spectra of module(s) "
            f"{[want[n].module for n in missing]} of the servable graph (written for another "
            "model?)"
        )
    for name, layer in want.items():
        a = arrays[name]
        if tuple(a.shape) != layer.shape or a.dtype.name != layer.dtype:
            raise ValueError(
                f"adapter file {source!r}, module {layer.module!r}: spectra {name!r} is "
                f"{tuple(a.shape)} {a.dtype}; the servable graph expects {layer.shape} "
                f"{layer.dtype} ({layer.describe()}, lowering {layer.lowering!r})"
            )
        if not np.all(np.isfinite(a)):
            raise ValueError(f"adapter file {source!r}: spectra {name!r} contain NaN or Inf")
    if model_version != layout.model_version:
        raise ValueError(
            f"adapter file {source!r} was written for another servable graph (model version "
            f"{model_version}, this graph's layout has {layout.model_version}): the shapes "
            "agree but the layout (lowering, block sizes or layers) differs; write it again "
            "for this graph with write_ort_adapter / `bca serve adapter`"
        )


class AdapterSession:
    """One ``onnxruntime.InferenceSession`` of a servable graph serving many adapters.

    ``load_adapter(name, path)`` checks an ``.onnx_adapter`` file against the graph's
    layout and keeps it as an ``onnxruntime.LoraAdapter`` (memory-mapped, loaded once);
    ``run(..., adapter=name)`` activates it for that call only (a fresh ``RunOptions``
    per call), so runs with different adapters may go on in several threads at once.
    ``adapter=None`` runs the base model. Combined adapters are served as one file or
    feeds made from a weighted list (:func:`write_ort_adapter`, :func:`adapter_feeds`):
    onnxruntime does not add active adapters up.
    """

    def __init__(
        self,
        onnx_path: str | os.PathLike[str],
        *,
        providers: Sequence[Any] | None = None,
        sess_options: Any = None,
    ) -> None:
        ort = _ort_adapter_api()
        self._ort = ort
        self.path = Path(onnx_path)
        self.layout = servable_layout(self.path)
        if sess_options is None:
            sess_options = ort.SessionOptions()
            # one warning per overridable initializer otherwise ("may prevent const folding")
            sess_options.log_severity_level = 3
        self.session = ort.InferenceSession(
            str(self.path),
            sess_options,
            providers=list(providers) if providers is not None else ["CPUExecutionProvider"],
        )
        overridable = {i.name for i in self.session.get_overridable_initializers()}
        lost = [n for n in self.layout.parameter_names if n not in overridable]
        if lost:  # pragma: no cover - defensive: layout checked against the graph
            raise ValueError(f"{str(self.path)!r}: spectra {lost} are not overridable in ORT")
        self._params = frozenset(self.layout.parameter_names)
        self._adapters: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._used: weakref.WeakSet[Any] = weakref.WeakSet()
        self._zeros = None if self.layout.default == "zeros" else self.layout.zero_feeds()

    @property
    def input_names(self) -> list[str]:
        """The model's real inputs (the spectra are not among them)."""
        return [i.name for i in self.session.get_inputs() if i.name not in self._params]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.session.get_outputs()]

    @property
    def adapter_names(self) -> list[str]:
        with self._lock:
            return sorted(self._adapters)

    def load_adapter(self, name: str, path: str | os.PathLike[str]) -> None:
        """Check ``path`` against the graph's layout and load it as adapter ``name``
        (replacing an adapter of that name; runs already going on keep the old one)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"adapter name must be a non-empty string, got {name!r}")
        read_ort_adapter(path, self.layout)
        lora = self._ort.LoraAdapter()
        try:
            lora.Load(str(path))
        except Exception as e:  # noqa: BLE001 - ORT raises RuntimeError with a C++ trace
            raise ValueError(
                f"onnxruntime could not load {str(path)!r}: {_first_line(e)}"
            ) from None
        with self._lock:
            self._adapters[name] = lora

    def unload_adapter(self, name: str) -> None:
        with self._lock:
            if name not in self._adapters:
                raise KeyError(f"no adapter named {name!r} is loaded ({sorted(self._adapters)})")
            del self._adapters[name]

    def run(
        self,
        output_names: Sequence[str] | None,
        feeds: Mapping[str, Any],
        *,
        adapter: str | None = None,
        run_options: Any = None,
    ) -> list[Any]:
        """``session.run`` with adapter ``adapter`` active (None: the base model).

        ``run_options`` (optional) receives the adapter: pass a fresh one per call;
        one that already carries an adapter is refused, because onnxruntime silently keeps
        the first active adapter of a parameter and ignores later ones. Feeds of spectra
        (:func:`adapter_feeds`) are allowed with ``adapter=None`` only: with an active
        adapter onnxruntime would silently ignore them.
        """
        names = list(output_names) if output_names is not None else None
        fed = sorted(k for k in feeds if k in self._params)
        if run_options is not None and self._carries_adapter(run_options):
            raise ValueError(
                "run_options already carries an adapter from an earlier call (onnxruntime "
                "keeps the first active adapter and ignores later ones); pass a fresh "
                "RunOptions per call"
            )
        if adapter is None:
            if self._zeros is not None:  # the graph's default is an adapter: override it
                feeds = {**self._zeros, **feeds}
            return self.session.run(names, dict(feeds), run_options)  # type: ignore[no-any-return]
        if fed:
            raise ValueError(
                f"feeds hold kernel spectra {fed[:4]} and adapter={adapter!r} is active; "
                "onnxruntime would ignore the feeds: use one or the other"
            )
        with self._lock:
            lora = self._adapters.get(adapter)
            known = sorted(self._adapters)
        if lora is None:
            raise KeyError(f"no adapter named {adapter!r} is loaded ({known})")
        ro = run_options if run_options is not None else self._ort.RunOptions()
        ro.add_active_adapter(lora)
        if run_options is not None:  # the caller's: remember it carries an adapter now
            with self._lock:
                self._used.add(ro)
        return self.session.run(names, dict(feeds), ro)  # type: ignore[no-any-return]

    def _carries_adapter(self, run_options: Any) -> bool:
        with self._lock:
            return run_options in self._used

    def __repr__(self) -> str:
        return (
            f"AdapterSession({str(self.path)!r}, layers={len(self.layout.layers)}, "
            f"adapters={self.adapter_names})"
        )
