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

Fully trained parameters (``modules_to_save``, e.g. a classification head) of the adapter
the graph is made from are overridable initializers too, named
``bca.modules_to_save.<parameter name>`` and stored as the graph stores the parameter
(possibly transposed); every adapter supplies them (its own, or the base model's).
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
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np
import onnx
from onnx import helper

from .._adapter_format import new_file_mode
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
    "ServableSaved",
    "adapter_feeds",
    "read_ort_adapter",
    "saved_parameter_name",
    "servable_layout",
    "spectra_parameter_name",
    "write_ort_adapter",
]

LAYOUT_METADATA_KEY = "bca.servable_layout"
"""``metadata_props`` key holding a servable graph's layout (JSON)."""

LAYOUT_FORMAT = "bca.servable"
LAYOUT_FORMAT_VERSION = 1
LAYOUT_FORMAT_VERSION_SAVED = 2
"""Layouts with fully trained parameters (``modules_to_save``) are written as format
version 2 (older readers refuse them); layouts without stay version 1 with unchanged
hashes, so adapter files written before keep fitting their graphs."""

SERVABLE_DEFAULTS = ("zeros", "adapter")
"""Default values of the spectra in a servable graph: ``"zeros"`` (the base model) or
``"adapter"`` (the exported adapter's own spectra)."""

ADAPTER_FILE_SUFFIX = ".onnx_adapter"

_DTYPES = ("float32", "float64")


def spectra_parameter_name(module: str) -> str:
    """The overridable initializer of ``module``'s kernel spectra: ``bca.<module>.spectra``."""
    return f"bca.{module}.spectra"


SAVED_PREFIX = "bca.modules_to_save."
BASE_SUFFIX = ".base"


def saved_parameter_name(parameter: str) -> str:
    """The overridable initializer of a fully trained parameter (``modules_to_save``):
    ``bca.modules_to_save.<parameter name>``, e.g. ``bca.modules_to_save.classifier.weight``."""
    return f"{SAVED_PREFIX}{parameter}"


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
class ServableSaved:
    """One fully trained parameter (``modules_to_save``) of a servable graph.

    ``name`` is the parameter's name in the torch model (``classifier.weight``);
    ``initializer`` the overridable initializer holding it
    (:func:`saved_parameter_name`); ``shape`` and ``dtype`` are the initializer's, which is
    the parameter's transpose when ``transposed`` (a ``MatMul`` weight stored ``(in, out)``).
    """

    name: str
    initializer: str
    transposed: bool
    shape: tuple[int, ...]
    dtype: str

    @property
    def parameter_shape(self) -> tuple[int, ...]:
        """The shape of the parameter as torch holds it (and adapters save it)."""
        return self.shape[::-1] if self.transposed else self.shape

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["shape"] = list(self.shape)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ServableSaved:
        transposed = d["transposed"]
        if not isinstance(transposed, bool):
            raise TypeError(f"transposed must be a bool, got {transposed!r}")
        return cls(
            name=str(d["name"]),
            initializer=str(d["initializer"]),
            transposed=transposed,
            shape=tuple(int(v) for v in d["shape"]),
            dtype=str(d["dtype"]),
        )


@dataclass(frozen=True)
class ServableLayout:
    """The adapted layers of a servable graph, its fully trained parameters and defaults.

    ``layout_hash`` (sha256 of the layers and the fully trained parameters, the default
    excluded) identifies which adapters fit the graph; ``model_version`` is a 31-bit integer
    derived from it, written into every ``.onnx_adapter`` file for the graph.

    ``saved`` lists the fully trained parameters (``modules_to_save``) that are overridable
    initializers; ``base_values`` (``{initializer: array}``, storage layout) holds the base
    model's values of them when the layout was read from a graph (not part of the JSON, nor
    of equality): adapters without those parameters get them.
    """

    layers: tuple[ServableLayer, ...]
    default: str = "zeros"
    saved: tuple[ServableSaved, ...] = ()
    base_values: Mapping[str, np.ndarray] | None = dataclasses.field(
        default=None, compare=False, repr=False
    )

    @property
    def format_version(self) -> int:
        return LAYOUT_FORMAT_VERSION_SAVED if self.saved else LAYOUT_FORMAT_VERSION

    @property
    def layout_hash(self) -> str:
        doc: dict[str, Any] = {
            "format_version": self.format_version,
            "layers": [layer.to_dict() for layer in sorted(self.layers, key=lambda x: x.module)],
        }
        if self.saved:
            doc["modules_to_save"] = [x.to_dict() for x in sorted(self.saved, key=lambda x: x.name)]
        text = json.dumps(doc, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    @property
    def model_version(self) -> int:
        return int(self.layout_hash[:8], 16) & 0x7FFFFFFF or 1

    @property
    def modules(self) -> tuple[str, ...]:
        return tuple(layer.module for layer in self.layers)

    @property
    def spectra_names(self) -> tuple[str, ...]:
        """The spectra initializers, one per layer."""
        return tuple(layer.parameter for layer in self.layers)

    @property
    def saved_names(self) -> tuple[str, ...]:
        """The fully trained parameters' initializers (``bca.modules_to_save.<name>``)."""
        return tuple(x.initializer for x in self.saved)

    @property
    def parameter_names(self) -> tuple[str, ...]:
        """Every overridable initializer: the spectra, then the fully trained parameters."""
        return self.spectra_names + self.saved_names

    def layer(self, module: str) -> ServableLayer:
        for layer in self.layers:
            if layer.module == module:
                return layer
        raise KeyError(module)

    def base_initializer(self, saved: ServableSaved) -> str:
        """The initializer holding the base model's value of ``saved``: the overridable
        initializer itself in a zeros-default graph, ``<initializer>.base`` (a plain
        initializer no node reads) in an adapter-default one."""
        return saved.initializer if self.default == "zeros" else saved.initializer + BASE_SUFFIX

    def zero_feeds(self) -> dict[str, np.ndarray]:
        """Zero spectra for every layer. The base model when the graph has no fully trained
        parameters or its default is zeros; :meth:`base_feeds` always is."""
        return {x.parameter: np.zeros(x.shape, dtype=x.dtype) for x in self.layers}

    def base_feeds(self) -> dict[str, np.ndarray]:
        """Feeds of the base model: zero spectra and the base values of the fully trained
        parameters (needs :attr:`base_values`: a layout read from the graph)."""
        feeds = self.zero_feeds()
        for x in self.saved:
            feeds[x.initializer] = self.saved_base_value(x)
        return feeds

    def saved_base_value(self, saved: ServableSaved) -> np.ndarray:
        values = self.base_values
        if values is None or saved.initializer not in values:
            raise ValueError(
                f"the base value of fully trained parameter {saved.name!r} is not known: this "
                "layout was not read from its graph (pass the graph's path, ModelProto or "
                "AdapterSession instead of a bare ServableLayout)"
            )
        return values[saved.initializer]

    def to_json(self) -> str:
        doc: dict[str, Any] = {
            "format": LAYOUT_FORMAT,
            "format_version": self.format_version,
            "default": self.default,
            "layout_hash": self.layout_hash,
            "model_version": self.model_version,
            "layers": [layer.to_dict() for layer in self.layers],
        }
        if self.saved:
            doc["modules_to_save"] = [x.to_dict() for x in self.saved]
        return json.dumps(doc, indent=1)

    @classmethod
    def from_json(cls, text: str, *, source: str = "servable layout") -> ServableLayout:
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{source}: servable layout is not valid JSON: {e}") from None
        if not isinstance(doc, dict) or doc.get("format") != LAYOUT_FORMAT:
            raise ValueError(f"{source}: not a bca servable layout")
        version = doc.get("format_version")
        if version not in (LAYOUT_FORMAT_VERSION, LAYOUT_FORMAT_VERSION_SAVED):
            raise ValueError(
                f"{source}: unsupported servable layout format_version {version!r} (reads "
                f"{LAYOUT_FORMAT_VERSION} and {LAYOUT_FORMAT_VERSION_SAVED})"
            )
        try:
            layers = tuple(ServableLayer.from_dict(d) for d in doc["layers"])
            saved = tuple(ServableSaved.from_dict(d) for d in doc.get("modules_to_save") or [])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{source}: malformed servable layout ({e!r})") from None
        default = doc.get("default")
        if default not in SERVABLE_DEFAULTS:
            raise ValueError(
                f"{source}: servable layout default must be one of "
                f"{SERVABLE_DEFAULTS}, got {default!r}"
            )
        layout = cls(layers, str(default), saved)
        if version != layout.format_version or doc.get("layout_hash") != layout.layout_hash:
            raise ValueError(
                f"{source}: servable layout hash {doc.get('layout_hash')!r} does not match its "
                f"layers ({layout.layout_hash!r}); the metadata was edited or corrupted"
            )
        return layout


def _tensor_dtype(t: onnx.TensorProto) -> str:
    return np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).name


def _layout_from_model(model: onnx.ModelProto, source: str, base_dir: str = "") -> ServableLayout:
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
        dtype = _tensor_dtype(t)
        if tuple(t.dims) != layer.shape or dtype != layer.dtype:
            raise ValueError(
                f"{source}: initializer {layer.parameter!r} is {tuple(t.dims)} {dtype}, its "
                f"layout says {layer.shape} {layer.dtype}"
            )
    if not layout.saved:
        return layout
    base: dict[str, np.ndarray] = {}
    for x in layout.saved:
        t = inits.get(x.initializer)
        if t is None or x.initializer not in inputs:
            raise ValueError(
                f"{source}: fully trained parameter {x.name!r} ({x.initializer!r}) is not an "
                "overridable initializer (initializer and graph input) of the graph"
            )
        b = inits.get(layout.base_initializer(x))
        if b is None:
            raise ValueError(
                f"{source}: the base value of fully trained parameter {x.name!r} "
                f"({layout.base_initializer(x)!r}) is missing from the graph"
            )
        for u in (t, b):
            if tuple(u.dims) != x.shape or _tensor_dtype(u) != x.dtype:
                raise ValueError(
                    f"{source}: initializer {u.name!r} is {tuple(u.dims)} {_tensor_dtype(u)}, "
                    f"its layout says {x.shape} {x.dtype}"
                )
        value = onnx.numpy_helper.to_array(b, base_dir=base_dir)
        value.flags.writeable = False
        base[x.initializer] = value
    return dataclasses.replace(layout, base_values=MappingProxyType(base))


@lru_cache(maxsize=16)
def _layout_from_file(path: str, mtime_ns: int, size: int) -> ServableLayout:
    del mtime_ns, size  # cache keys: a rewritten file is read again
    from ._io import load_onnx

    try:
        model = onnx.load(path, load_external_data=False)
    except Exception:  # noqa: BLE001 - load_onnx gives the one-line error
        model = load_onnx(path)
    return _layout_from_model(model, repr(path), str(Path(path).parent))


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


@dataclass
class SavedSlot:
    """A fully trained parameter (``modules_to_save``) to make overridable (for
    :func:`add_adapters`): its name, the initializer holding it now, whether that stores it
    transposed, and values in that storage layout: the adapter's (needed for the
    ``"adapter"`` default) and the base model's (None: the initializer's current value)."""

    name: str
    initializer: str
    transposed: bool
    adapter_value: np.ndarray | None = None
    base_value: np.ndarray | None = None


def _defines(graph: onnx.GraphProto, name: str) -> bool:
    return (
        any(t.name == name for t in graph.initializer)
        or any(i.name == name for i in graph.input)
        or any(name in n.output for n in graph.node)
    )


def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    out: list[onnx.GraphProto] = []
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            out.append(a.g)
        elif a.type == onnx.AttributeProto.GRAPHS:
            out.extend(a.graphs)
    return out


def tensor_uses(graph: onnx.GraphProto, name: str) -> int:
    """How many node inputs read tensor ``name`` (subgraphs included, unless they define
    a tensor of that name themselves)."""
    count = 0
    for node in graph.node:
        count += sum(1 for i in node.input if i == name)
        for g in _subgraphs(node):
            if not _defines(g, name):
                count += tensor_uses(g, name)
    return count


def _rename_tensor(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        for k, i in enumerate(node.input):
            if i == old:
                node.input[k] = new
        for g in _subgraphs(node):
            if not _defines(g, old):
                _rename_tensor(g, old, new)
    for vi in graph.value_info:
        if vi.name == old:
            vi.name = new


def check_saved_slots(model: onnx.ModelProto, slots: Sequence[SavedSlot], default: str) -> None:
    """ValueError unless every slot names a distinct plain initializer of the right shape
    and its new names are free."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    inputs = {i.name for i in graph.input}
    outputs = {o.name for o in graph.output}
    taken = set(inits) | inputs | {o for n in graph.node for o in n.output}
    seen: dict[str, str] = {}
    for slot in slots:
        t = inits.get(slot.initializer)
        if t is None:
            raise ValueError(
                f"fully trained parameter {slot.name!r}: {slot.initializer!r} is not an "
                "initializer of the graph (a Constant node?), so it cannot be overridable"
            )
        if slot.initializer in inputs or slot.initializer in outputs:
            raise ValueError(
                f"fully trained parameter {slot.name!r}: initializer {slot.initializer!r} is "
                "a graph input or output already"
            )
        if slot.initializer in seen:
            raise ValueError(
                f"fully trained parameters {seen[slot.initializer]!r} and {slot.name!r} are "
                f"both stored in initializer {slot.initializer!r}"
            )
        seen[slot.initializer] = slot.name
        new = saved_parameter_name(slot.name)
        for n in (new, new + BASE_SUFFIX):
            if n in taken:
                raise ValueError(f"tensor name {n!r} exists in the graph already")
        shape = tuple(int(d) for d in t.dims)
        for what, v in (("adapter", slot.adapter_value), ("base", slot.base_value)):
            if v is not None and tuple(v.shape) != shape:
                raise ValueError(
                    f"fully trained parameter {slot.name!r}: {what} value {tuple(v.shape)} "
                    f"(storage layout) does not fit initializer {slot.initializer!r} {shape}"
                )
        if default == "adapter" and slot.adapter_value is None:  # pragma: no cover - callers
            raise ValueError(f"fully trained parameter {slot.name!r} has no adapter value")


def _make_saved_overridable(
    model: onnx.ModelProto, slots: Sequence[SavedSlot], default: str
) -> list[ServableSaved]:
    graph = model.graph
    out: list[ServableSaved] = []
    for slot in slots:
        idx = next(k for k, t in enumerate(graph.initializer) if t.name == slot.initializer)
        t = graph.initializer[idx]
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type))
        base = onnx.numpy_helper.to_array(t) if slot.base_value is None else slot.base_value
        base = np.ascontiguousarray(np.asarray(base).astype(dtype))
        value = base if default == "zeros" else np.asarray(slot.adapter_value).astype(dtype)
        new = saved_parameter_name(slot.name)
        _rename_tensor(graph, slot.initializer, new)
        graph.initializer[idx].CopyFrom(
            onnx.numpy_helper.from_array(np.ascontiguousarray(value), new)
        )
        graph.input.append(helper.make_tensor_value_info(new, t.data_type, list(base.shape)))
        if default == "adapter":  # the base value, for adapters without this parameter
            graph.initializer.append(onnx.numpy_helper.from_array(base, new + BASE_SUFFIX))
        out.append(
            ServableSaved(
                name=slot.name,
                initializer=new,
                transposed=bool(slot.transposed),
                shape=tuple(int(d) for d in base.shape),
                dtype=dtype.name,
            )
        )
    return out


def make_overridable(
    model: onnx.ModelProto,
    specs: Sequence[AdapterSpec],
    lowerings: Sequence[str],
    default: str,
    saved: Sequence[SavedSlot] = (),
) -> ServableLayout:
    """List each spec's spectra initializer as a graph input, set its default (zeros or
    kept); rename each fully trained parameter's initializer to
    ``bca.modules_to_save.<name>``, list it as a graph input, set its default (base or
    adapter value; an adapter default keeps the base value in ``<name>.base``); record the
    layout in ``metadata_props``; returns the layout (without base values)."""
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
    layout = ServableLayout(
        tuple(layers), default, tuple(_make_saved_overridable(model, saved, default))
    )
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


def _kernels_of(adapter: object) -> tuple[str, list[_Kernel], dict[str, np.ndarray]]:
    """(description, kernels, fully trained parameters) of one adapter source."""
    if isinstance(adapter, (str, os.PathLike)):
        adapter = read_adapter(adapter)
    if isinstance(adapter, SavedAdapter):
        label = _describe_source(adapter)
        kernels = [
            _Kernel(s.name, np.asarray(s.kernel), float(s.scale), s.in_features, s.out_features)
            for s in adapter.specs
        ]
        return label, kernels, {k: np.asarray(v) for k, v in adapter.modules_to_save.items()}
    if hasattr(adapter, "named_modules"):
        from ..model import modules_to_save_parameters

        saved = {
            k: p.detach().to("cpu").numpy().copy()
            for k, p in modules_to_save_parameters(adapter).items()  # type: ignore[arg-type]
        }
        return _describe_source(adapter), _torch_kernels(adapter), saved
    raise TypeError(
        "adapter must be a saved adapter directory, a SavedAdapter, a torch model with bca "
        f"adapters, or a list of (adapter, weight) pairs; got {type(adapter).__name__}"
    )


def _torch_kernels(model: Any) -> list[_Kernel]:
    from ..model import adapter_modules

    label = _describe_source(model)
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


_Term: TypeAlias = "tuple[str, list[_Kernel], dict[str, np.ndarray], float]"


def _terms(adapter: AdapterInput) -> list[_Term]:
    """(description, kernels, fully trained parameters, weight) per adapter."""
    if isinstance(adapter, (list, tuple)):
        if not adapter:
            raise ValueError("the weighted list of adapters is empty")
        terms: list[_Term] = []
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
            label, kernels, saved = _kernels_of(src)
            if saved:
                raise ValueError(
                    f"{label} has fully trained parameters (modules_to_save: "
                    f"{sorted(saved)[:4]}); a weighted combination of adapters adds up their "
                    "circulant adapters only, and a weighted sum of heads is not the combined "
                    "model: serve such an adapter on its own"
                )
            terms.append((label, kernels, saved, float(weight)))
        return terms
    label, kernels, saved = _kernels_of(adapter)
    return [(label, kernels, saved, 1.0)]


def _saved_feeds(
    label: str, saved: Mapping[str, np.ndarray], layout: ServableLayout
) -> dict[str, np.ndarray]:
    """The fully trained parameters' feeds, storage layout: the adapter's, else the base
    model's."""
    by_name = {x.name: x for x in layout.saved}
    unknown = sorted(n for n in saved if n not in by_name)
    if unknown:
        raise ValueError(
            f"{label} has fully trained parameter(s) {unknown[:8]} (modules_to_save) that the "
            f"servable graph has no slot for (its fully trained parameters: "
            f"{sorted(by_name)[:8]}); make the servable graph from an adapter with these "
            "modules_to_save"
        )
    out: dict[str, np.ndarray] = {}
    for x in layout.saved:
        value = saved.get(x.name)
        if value is None:
            out[x.initializer] = np.asarray(layout.saved_base_value(x), dtype=x.dtype)
            continue
        if tuple(value.shape) != x.parameter_shape:
            raise ValueError(
                f"{label}: fully trained parameter {x.name!r} has shape {tuple(value.shape)}; "
                f"the servable graph's is {x.parameter_shape} (another head, e.g. another "
                "num_labels?)"
            )
        if value.dtype.kind != "f":
            raise ValueError(
                f"{label}: fully trained parameter {x.name!r} has dtype {value.dtype}; the "
                f"servable graph's is {x.dtype}"
            )
        if not np.all(np.isfinite(value)):
            raise ValueError(f"{label}: fully trained parameter {x.name!r} contains NaN or Inf")
        stored = value.T if x.transposed else value
        out[x.initializer] = np.ascontiguousarray(stored.astype(x.dtype))
    return out


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
    """The spectra of ``adapter`` for every layer of a servable graph, as run feeds, and
    its fully trained parameters for every one the graph has.

    ``sess.run(None, {**inputs, **adapter_feeds(adapter, layout)})`` computes the base model
    plus ``adapter``, with any ONNX runtime (no adapter API needed). ``adapter`` is a saved
    adapter directory, a :class:`SavedAdapter`, a torch model with bca adapters, or a
    weighted list ``[(adapter, weight), ...]`` giving ``Σ weight · adapter`` (the spectra
    are linear in the kernels: this is how combined adapters are served).

    Every layer of the graph gets a feed (zeros where the adapter has no module), so a
    non-zero default never leaks in. Likewise every fully trained parameter of the graph
    (``bca.modules_to_save.<name>``, storage layout): the adapter's ``modules_to_save``
    values (a saved adapter's, or a torch model's parameters of those names), else the base
    model's (read from the graph: pass the graph, not a bare layout). Raises ``ValueError``
    naming the module and both shapes when block size, widths or dtype differ from the
    graph's layout, naming the parameter and both shapes for a fully trained parameter of
    another shape, when the adapter has modules or fully trained parameters the graph
    lacks, and for a weighted list with fully trained parameters.
    """
    layout = servable_layout(servable)
    by_module = {x.module: x for x in layout.layers}
    acc = {x.parameter: np.zeros(x.shape, np.float64) for x in layout.layers}
    terms = _terms(adapter)
    for label, kernels, _, weight in terms:
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
    feeds = {x.parameter: acc[x.parameter].astype(x.dtype) for x in layout.layers}
    if layout.saved or any(t[2] for t in terms):
        label, _, saved, _ = terms[0]
        feeds.update(_saved_feeds(label, saved if len(terms) == 1 else {}, layout))
    return feeds


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
            "ONNX Runtime adapter files need onnxruntime >= 1.20 (AdapterFormat, LoraAdapter, "
            f"RunOptions.add_active_adapter); this is onnxruntime {ort.__version__}: upgrade "
            "it (pip install 'onnxruntime>=1.20'), or feed the spectra as inputs instead "
            "(bca.onnx.adapter_feeds, which runs on onnxruntime >= 1.17)"
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
    tensor per layer of the graph and one per fully trained parameter of the graph (the
    adapter's, else the base model's; see :func:`adapter_feeds`, which validates the adapter),
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
        os.chmod(tmp, _new_file_mode())  # mkstemp creates 0600; a plain open() would not
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


_new_file_mode = new_file_mode  # 0o666 minus the umask, as open(path, "w") gives


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
    want_saved = {x.initializer: x for x in layout.saved}
    names = set(want) | set(want_saved)
    extra = sorted(set(arrays) - names)
    if extra:
        raise ValueError(
            f"adapter file {source!r} has parameters {extra[:8]} that the servable graph does "
            f"not have (written for another model?); the graph's: {sorted(names)[:8]}"
        )
    missing = sorted(set(want) - set(arrays))
    if missing:
        raise ValueError(
            f"adapter file {source!r} lacks the spectra of module(s) "
            f"{[want[n].module for n in missing]} of the servable graph (written for another "
            "model?)"
        )
    missing = sorted(set(want_saved) - set(arrays))
    if missing:
        raise ValueError(
            f"adapter file {source!r} lacks fully trained parameter(s) "
            f"{[want_saved[n].name for n in missing]} of the servable graph (written for "
            "another graph?)"
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
    for name, x in want_saved.items():
        a = arrays[name]
        if tuple(a.shape) != x.shape or a.dtype.name != x.dtype:
            raise ValueError(
                f"adapter file {source!r}: fully trained parameter {x.name!r} ({name!r}) is "
                f"{tuple(a.shape)} {a.dtype}; the servable graph expects {x.shape} {x.dtype}"
            )
        if not np.all(np.isfinite(a)):
            raise ValueError(f"adapter file {source!r}: {name!r} contains NaN or Inf")
    if model_version != layout.model_version:
        raise ValueError(
            f"adapter file {source!r} was written for another servable graph (model version "
            f"{model_version}, this graph's layout has {layout.model_version}): the shapes "
            "agree but the layout (lowering, block sizes, layers or fully trained parameters) "
            "differs; write it again for this graph with write_ort_adapter / `bca serve adapter`"
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
        # an adapter-default graph: adapter=None feeds the base model (zero spectra, base
        # values of the fully trained parameters)
        self._base = None if self.layout.default == "zeros" else self.layout.base_feeds()

    @property
    def input_names(self) -> list[str]:
        """The model's real inputs (the overridable spectra and fully trained parameters are
        not among them)."""
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
            if self._base is not None:  # the graph's default is an adapter: override it
                feeds = {**self._base, **feeds}
            return self.session.run(names, dict(feeds), run_options)  # type: ignore[no-any-return]
        if fed:
            raise ValueError(
                f"feeds hold overridable parameters {fed[:4]} and adapter={adapter!r} is active; "
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
