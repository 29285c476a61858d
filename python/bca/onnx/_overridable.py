"""Graph surgery for servable graphs: kernel spectra and ``modules_to_save`` parameters
as overridable initializers (initializers that are also graph inputs), with the layout
recorded in the graph's metadata (called by ``add_adapters``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import helper

from ._splice import AdapterSpec

if TYPE_CHECKING:  # pragma: no cover
    pass
from ._layout import (
    BASE_SUFFIX,
    LAYOUT_METADATA_KEY,
    ServableLayer,
    ServableLayout,
    ServableSaved,
    check_servable_default,
    saved_parameter_name,
    spectra_parameter_name,
)


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
