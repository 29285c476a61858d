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

This module holds the layout (what a servable graph records and how it is read back);
:mod:`._overridable` makes a graph servable, :mod:`._feeds` turns adapters into
spectra, :mod:`._session` writes and serves ONNX Runtime adapter files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np
import onnx
from onnx import helper

if TYPE_CHECKING:  # pragma: no cover
    from ._session import AdapterSession


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
        except RecursionError:  # hostile metadata: JSON nested thousands of levels deep
            raise ValueError(f"{source}: servable layout is nested too deeply") from None
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
    from ._session import AdapterSession  # the session module imports this one

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


def check_servable_default(default: str) -> None:
    if default not in SERVABLE_DEFAULTS:
        raise ValueError(f"servable_default must be one of {SERVABLE_DEFAULTS}, got {default!r}")
