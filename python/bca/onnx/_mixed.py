"""Mixed-adapter batches: one ONNX graph, one run, each batch row with its own adapter.

A *mixed* graph (``export_model(..., mixed=[...])``, ``patch_model(..., mixed=True)``,
:func:`add_mixed_adapters`) holds ``A`` adapters at once. It has one more input, the int64
``bca.adapter_index`` of shape ``(batch,)``: row ``b`` of the batch is computed with adapter
``index[b]`` (``0 <= index[b] < A``), or as the base model for ``index[b] == A`` (the *base
slot*). Per adapted layer the kernel spectra of every adapter (the constant ``G`` of
:func:`bca.onnx.lowered_spectra`, ``scale`` folded in) are stacked into one constant
``bca.<module>.spectra_stack`` of shape ``(frequencies, A + 1, 2 q_in, 2 q_out)``, slot ``A``
all zeros (and the slot of an adapter that does not adapt the layer); the layer's subgraph
gathers each row's spectra by the index (``Gather`` on axis 1) and multiplies each row's
spectra by its own in one batched ``MatMul`` (:func:`bca.onnx.build_mixed_adapter_subgraph`).
Everything else is the adapter subgraph of a plain export, every lowering included.

The rows of an adapted layer's input must be batch-major: ``(batch, ..., in_features)``, or
``(batch * rows, in_features)`` flattened in that order (transformers models are). The
index length is checked against the first axis of the graph's first input (``input_ids``)
at run time, so an index of the wrong length is an onnxruntime error rather than a silent
regrouping of rows.

The graph records its layout (adapter names, index input, per layer module, stack, shape,
block size, widths, lowering, which adapters adapt it) as JSON in
``metadata_props["bca.mixed_layout"]``; :func:`mixed_layout` reads it, and
:meth:`MixedLayout.index` turns adapter names into the index array.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ._builder import LOWERINGS, check_opset
from ._layout import LAYOUT_METADATA_KEY
from ._lowering import choose_lowering
from ._overridable import combine_specs
from ._splice import (
    AdapterSpec,
    graph_opset,
    resolve_targets,
    splice_adapters,
    unique_prefixes,
)

__all__ = [
    "ADAPTER_INDEX_NAME",
    "MIXED_METADATA_KEY",
    "MixedLayer",
    "MixedLayout",
    "add_mixed_adapters",
    "mixed_layout",
    "stack_parameter_name",
]

MIXED_METADATA_KEY = "bca.mixed_layout"
"""``metadata_props`` key holding a mixed graph's layout (JSON)."""

ADAPTER_INDEX_NAME = "bca.adapter_index"
"""The default name of a mixed graph's int64 index input, shape ``(batch,)``."""

MIXED_FORMAT = "bca.mixed"
MIXED_FORMAT_VERSION = 1


def stack_parameter_name(module: str) -> str:
    """The stacked spectra of ``module`` in a mixed graph: ``bca.<module>.spectra_stack``."""
    return f"bca.{module}.spectra_stack"


@dataclass(frozen=True)
class MixedLayer:
    """One adapted layer of a mixed graph: ``stack`` is the constant of ``shape``
    ``(frequencies, A + 1, 2 q_in, 2 q_out)`` and ``dtype``; ``adapters`` are the indices
    of the adapters that adapt the layer (the other slots are zeros)."""

    module: str
    stack: str
    shape: tuple[int, ...]
    dtype: str
    block_size: int
    in_features: int
    out_features: int
    lowering: str
    adapters: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["shape"] = list(self.shape)
        d["adapters"] = list(self.adapters)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MixedLayer:
        return cls(
            module=str(d["module"]),
            stack=str(d["stack"]),
            shape=tuple(int(v) for v in d["shape"]),
            dtype=str(d["dtype"]),
            block_size=int(d["block_size"]),
            in_features=int(d["in_features"]),
            out_features=int(d["out_features"]),
            lowering=str(d["lowering"]),
            adapters=tuple(int(v) for v in d["adapters"]),
        )


@dataclass(frozen=True)
class MixedLayout:
    """The adapters and layers of a mixed graph.

    ``adapters`` are the adapters' names in index order; :attr:`base_index` (``A``) selects
    the base model. ``index_input`` is the int64 ``(batch,)`` input; ``batch_input`` the
    graph input whose first axis the index length is checked against (``""``: not checked).
    """

    adapters: tuple[str, ...]
    index_input: str
    batch_input: str
    layers: tuple[MixedLayer, ...]

    @property
    def base_index(self) -> int:
        """The index of the base slot (the base model): the number of adapters."""
        return len(self.adapters)

    @property
    def modules(self) -> tuple[str, ...]:
        return tuple(x.module for x in self.layers)

    def index(self, choices: Sequence[int | str | None]) -> np.ndarray:
        """The ``bca.adapter_index`` feed for one adapter per row: each entry an adapter
        name, an index, or None (the base model)."""
        out: list[int] = []
        for c in choices:
            if c is None:
                out.append(self.base_index)
            elif isinstance(c, str):
                if c not in self.adapters:
                    raise KeyError(f"no adapter named {c!r} in this graph ({list(self.adapters)})")
                out.append(self.adapters.index(c))
            elif isinstance(c, (int, np.integer)) and not isinstance(c, bool):
                if not 0 <= int(c) <= self.base_index:
                    raise IndexError(
                        f"adapter index {int(c)} outside [0, {self.base_index}] "
                        f"({self.base_index} is the base model)"
                    )
                out.append(int(c))
            else:
                raise TypeError(f"an adapter is chosen by name, index or None, got {c!r}")
        return np.asarray(out, dtype=np.int64)

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": MIXED_FORMAT,
                "format_version": MIXED_FORMAT_VERSION,
                "adapters": list(self.adapters),
                "base_index": self.base_index,
                "index_input": self.index_input,
                "batch_input": self.batch_input,
                "layers": [x.to_dict() for x in self.layers],
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str, *, source: str = "mixed layout") -> MixedLayout:
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{source}: mixed layout is not valid JSON: {e}") from None
        except RecursionError:  # hostile metadata: JSON nested thousands of levels deep
            raise ValueError(f"{source}: mixed layout is nested too deeply") from None
        if not isinstance(doc, dict) or doc.get("format") != MIXED_FORMAT:
            raise ValueError(f"{source}: not a bca mixed layout")
        if doc.get("format_version") != MIXED_FORMAT_VERSION:
            raise ValueError(
                f"{source}: unsupported mixed layout format_version "
                f"{doc.get('format_version')!r} (reads {MIXED_FORMAT_VERSION})"
            )
        try:
            return cls(
                adapters=tuple(str(a) for a in doc["adapters"]),
                index_input=str(doc["index_input"]),
                batch_input=str(doc["batch_input"]),
                layers=tuple(MixedLayer.from_dict(d) for d in doc["layers"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{source}: malformed mixed layout ({e!r})") from None


def mixed_layout(graph: str | os.PathLike[str] | onnx.ModelProto) -> MixedLayout:
    """The layout of a mixed graph (its path or ``ModelProto``); ``ValueError`` when the
    graph is not a mixed graph."""
    if isinstance(graph, onnx.ModelProto):
        model, source = graph, "the model"
    elif isinstance(graph, (str, os.PathLike)):
        p = Path(graph)
        if not p.is_file():
            raise FileNotFoundError(f"ONNX file {str(p)!r} does not exist")
        model, source = onnx.load(str(p), load_external_data=False), repr(str(p))
    else:
        raise TypeError(f"graph must be a path or an onnx.ModelProto, got {type(graph).__name__}")
    entries = [e.value for e in model.metadata_props if e.key == MIXED_METADATA_KEY]
    if not entries:
        raise ValueError(
            f"{source} is not a mixed-adapter bca graph (no {MIXED_METADATA_KEY!r} metadata); "
            "make one with export_model(..., mixed=[...]) or patch_model(..., mixed=True)"
        )
    return MixedLayout.from_json(entries[-1], source=source)


def _per_module(
    adapters: Sequence[Sequence[AdapterSpec]], names: Sequence[str]
) -> dict[str, list[AdapterSpec | None]]:
    """{module: one spec or None per adapter}, modules in first-seen order; the adapters of
    one module must agree on block size, widths and kernel dtype."""
    out: dict[str, list[AdapterSpec | None]] = {}
    for a, specs in enumerate(adapters):
        for spec in combine_specs(specs):
            slots = out.setdefault(spec.name, [None] * len(adapters))
            slots[a] = spec
    for module, slots in out.items():
        first = next((a, s) for a, s in enumerate(slots) if s is not None)
        for a, s in enumerate(slots):
            if s is None:
                continue
            ref = first[1]
            assert ref is not None
            k0, k = np.asarray(ref.kernel), np.asarray(s.kernel)
            if (k.shape, s.in_features, s.out_features) != (
                k0.shape,
                ref.in_features,
                ref.out_features,
            ):
                raise ValueError(
                    f"adapters {names[first[0]]!r} and {names[a]!r} differ on module {module!r}: "
                    f"kernel {k0.shape} (in_features={ref.in_features}, out_features="
                    f"{ref.out_features}) and {k.shape} (in_features={s.in_features}, "
                    f"out_features={s.out_features}); a mixed graph needs one layout per layer "
                    "(same block size and widths)"
                )
            if k.dtype != k0.dtype:
                raise ValueError(
                    f"adapters {names[first[0]]!r} and {names[a]!r} differ on module {module!r}: "
                    f"kernel dtype {k0.dtype} and {k.dtype} (trained on bases of different "
                    "precision?); a mixed graph needs one dtype per layer"
                )
    return out


def _find_batch_input(model: onnx.ModelProto, batch_input: str | None) -> str:
    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if batch_input is not None:
        if batch_input and batch_input not in {i.name for i in inputs}:
            raise ValueError(
                f"batch_input {batch_input!r} is not an input of the graph "
                f"({[i.name for i in inputs]})"
            )
        return batch_input
    for i in inputs:
        t = i.type.tensor_type
        if i.type.HasField("tensor_type") and t.HasField("shape") and len(t.shape.dim) >= 1:
            return i.name
    return ""


def _index_nodes(
    model: onnx.ModelProto, index_input: str, batch_input: str, opset: int
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto], str, str]:
    """Nodes checking the index length against ``batch_input``'s first axis (a ``Concat``
    of ``[B, 1]`` and ``[N, 1]`` on axis 1: an onnxruntime error unless ``B == N``), and
    the names of the checked index and of its shape ``[B]``."""
    pre = "bca/mixed"
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []

    def const(name: str, value: Any) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value, dtype=np.int64), f"{pre}/{name}"))
        return f"{pre}/{name}"

    def node(op: str, inputs: list[str], out: str, **attrs: Any) -> str:
        nodes.append(helper.make_node(op, inputs, [f"{pre}/{out}"], name=f"{pre}/{out}", **attrs))
        return f"{pre}/{out}"

    index = index_input
    if batch_input:
        if opset >= 15:
            n = node("Shape", [batch_input], "batch_rows", start=0, end=1)
        else:
            shp = node("Shape", [batch_input], "batch_input_shape")
            n = node("Slice", [shp, const("s0", [0]), const("s1", [1])], "batch_rows")
        shp2 = node("Concat", [n, const("one", [1])], "rows_by_one", axis=0)
        col = node(
            "ConstantOfShape",
            [shp2],
            "rows_column",
            value=helper.make_tensor("zero", TensorProto.INT64, [1], [0]),
        )
        idx2 = node("Unsqueeze", [index_input, const("axis1", [1])], "index_column")
        both = node("Concat", [idx2, col], "index_length_check", axis=1)
        index = node("Gather", [both, const("col0", 0)], "index", axis=1)
    batch_shape = node("Shape", [index], "batch_shape")
    return nodes, inits, index, batch_shape


def add_mixed_adapters(
    model: onnx.ModelProto,
    adapters: Sequence[Sequence[AdapterSpec]],
    *,
    names: Sequence[str] | None = None,
    lowering: str = "auto",
    targets: Mapping[str, str] | None = None,
    base_weights: Mapping[str, np.ndarray] | None = None,
    progress: bool = False,
    index_input: str = ADAPTER_INDEX_NAME,
    batch_input: str | None = None,
) -> MixedLayout:
    """Make ``model`` (in place) a mixed-adapter graph of ``adapters`` (one list of specs
    per adapter; adapter ``a`` is index ``a``, index ``len(adapters)`` the base model).

    ``names`` name the adapters (default ``"0"``, ``"1"``, ...). Layers are the union of the
    adapters' modules, located like :func:`bca.onnx.add_adapters` (``targets``,
    ``base_weights``, names); the adapters of one module must agree on block size, widths
    and kernel dtype (``ValueError`` naming both adapters otherwise). ``lowering`` as in
    :func:`bca.onnx.add_adapters`, per layer. ``index_input`` names the new int64 input of
    shape ``(batch,)``; ``batch_input`` the graph input whose first axis it is checked
    against (default: the first input with a known rank; ``""``: no check). Returns the
    layout, also recorded in ``metadata_props``.
    """
    if lowering != "auto" and lowering not in LOWERINGS:
        raise ValueError(f"lowering must be 'auto' or one of {LOWERINGS}, got {lowering!r}")
    adapters = [list(a) for a in adapters]
    if not adapters:
        raise ValueError("a mixed graph needs at least one adapter")
    for a, specs in enumerate(adapters):
        if not specs:
            raise ValueError(f"mixed adapter {a} has no adapted modules")
    labels = [str(a) for a in range(len(adapters))] if names is None else [str(n) for n in names]
    if len(labels) != len(adapters):
        raise ValueError(f"{len(labels)} names for {len(adapters)} adapters")
    if len(set(labels)) != len(labels):
        raise ValueError(f"adapter names must be unique, got {labels}")
    meta = {e.key for e in model.metadata_props}
    if MIXED_METADATA_KEY in meta or LAYOUT_METADATA_KEY in meta:
        raise ValueError(
            "the model is a mixed or servable bca graph already; make the mixed graph from the "
            "base model"
        )
    taken = {t.name for t in model.graph.initializer} | {i.name for i in model.graph.input}
    taken.update(o for n in model.graph.node for o in n.output)
    if index_input in taken:
        raise ValueError(f"tensor name {index_input!r} exists in the graph already")
    opset = graph_opset(model)
    per_module = _per_module(adapters, labels)
    modules = list(per_module)
    stacks = [stack_parameter_name(m) for m in modules]
    clash = [n for n in stacks if n in taken]
    if clash:
        raise ValueError(f"tensor name(s) {clash} exist in the graph already")
    reps: list[AdapterSpec] = []
    for m in modules:
        rep = next(s for s in per_module[m] if s is not None)
        reps.append(rep)
    sites = resolve_targets(model, reps, targets=targets, base_weights=base_weights)
    batch = _find_batch_input(model, batch_input)
    by_lowering: dict[str, list[int]] = {}
    for i, (spec, site) in enumerate(zip(reps, sites, strict=True)):
        low = lowering
        if low == "auto":
            low = choose_lowering(
                spec.kernel.shape[-1],
                spec.in_features,
                spec.out_features,
                opset=opset,
                dtype=np.dtype(helper.tensor_dtype_to_np_dtype(site.elem_type)),
            )
        check_opset(opset, low)
        by_lowering.setdefault(low, []).append(i)

    nodes, inits, index, batch_shape = _index_nodes(model, index_input, batch, opset)
    emitted: dict[int, str] = {}
    for low, items in by_lowering.items():
        mixed = [
            [None if s is None else (np.asarray(s.kernel), float(s.scale)) for s in per_module[m]]
            for m in (modules[i] for i in items)
        ]
        subs = splice_adapters(
            model,
            [(sites[i], reps[i]) for i in items],
            lowering=low,
            prefixes=unique_prefixes(model, [modules[i] for i in items]),
            progress=progress,
            spectra_names=[stacks[i] for i in items],
            mixed=mixed,
            mixed_index=(index, batch_shape),
        )
        for i, sub in zip(items, subs, strict=True):
            emitted[i] = sub.lowering
    # the index nodes read graph inputs only: they go first
    rebuilt = [*nodes, *model.graph.node]
    del model.graph.node[:]
    model.graph.node.extend(rebuilt)
    model.graph.initializer.extend(inits)
    batch_dim = "batch"
    if batch:
        vi = next(i for i in model.graph.input if i.name == batch)
        d0 = vi.type.tensor_type.shape.dim[0]
        batch_dim = d0.dim_param if d0.HasField("dim_param") else batch_dim
        if d0.HasField("dim_value"):
            batch_dim = int(d0.dim_value)  # type: ignore[assignment]
    model.graph.input.append(
        helper.make_tensor_value_info(index_input, TensorProto.INT64, [batch_dim])
    )

    init_by_name = {t.name: t for t in model.graph.initializer}
    layers = []
    for i, m in enumerate(modules):
        t = init_by_name[stacks[i]]
        spec = reps[i]
        layers.append(
            MixedLayer(
                module=m,
                stack=stacks[i],
                shape=tuple(int(d) for d in t.dims),
                dtype=np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).name,
                block_size=int(np.shape(spec.kernel)[-1]),
                in_features=int(spec.in_features),
                out_features=int(spec.out_features),
                lowering=emitted[i],
                adapters=tuple(a for a, s in enumerate(per_module[m]) if s is not None),
            )
        )
    layout = MixedLayout(tuple(labels), index_input, batch, tuple(layers))
    entry = model.metadata_props.add()
    entry.key = MIXED_METADATA_KEY
    entry.value = layout.to_json()
    return layout
