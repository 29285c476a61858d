"""Keep exported graphs within their opset and their IR version as low as it can be.

Two things torch's exporters leave that older runtimes refuse:

* torch's dynamo exporter works at opset 18: asked for less, it converts the graph down
  and *then* runs onnxscript's optimizer, whose constant folding rewrites
  ``SplitToSequence`` + ``SequenceAt`` (e.g. GPT-2's q/k/v split) into
  ``Split(num_outputs=n)``, an opset-18 form, in the opset-17 graph (onnxscript 0.7,
  torch 2.15). :func:`split_to_opset` writes those ``Split`` nodes in the opset-13 form.
* it stamps the newest IR version its onnx knows (IR 10 for any opset), which
  onnxruntime 1.17 (IR <= 9) refuses to load. :func:`lower_ir_version` sets the lowest IR
  version that the opsets imported and the features used allow.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import onnx
from onnx import helper

__all__ = ["split_to_opset", "lower_ir_version", "min_ir_version"]

# data types newer than IR 8 (onnx.proto: IR 9 float8, 10 int4, 11 float4, 12 e8m0,
# 13 int2, 14 float6); names missing from an older onnx are skipped
_TYPE_IR = {
    "FLOAT8E4M3FN": 9,
    "FLOAT8E4M3FNUZ": 9,
    "FLOAT8E5M2": 9,
    "FLOAT8E5M2FNUZ": 9,
    "UINT4": 10,
    "INT4": 10,
    "FLOAT4E2M1": 11,
    "FLOAT8E8M0": 12,
    "UINT2": 13,
    "INT2": 13,
    "FLOAT6E2M3": 14,
    "FLOAT6E3M2": 14,
}
_DTYPE_IR = {
    int(getattr(onnx.TensorProto, name)): ir
    for name, ir in _TYPE_IR.items()
    if hasattr(onnx.TensorProto, name)
}
_DEFAULT_DOMAINS = ("", "ai.onnx")


def _subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            yield a.g
        elif a.type == onnx.AttributeProto.GRAPHS:
            yield from a.graphs


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every subgraph in it (If/Loop/Scan bodies), depth first."""
    yield graph
    for node in graph.node:
        for sub in _subgraphs(node):
            yield from _graphs(sub)


def _all_nodes(model: onnx.ModelProto) -> Iterator[onnx.NodeProto]:
    for g in _graphs(model.graph):
        yield from g.node
    for f in model.functions:
        for node in f.node:
            yield node
            for sub in _subgraphs(node):
                for g in _graphs(sub):
                    yield from g.node


def _field(msg: object, name: str) -> Any:
    """``msg.name``, or ``()`` where this onnx's protobuf has no such field (older onnx
    releases lack the fields of newer IR versions)."""
    return getattr(msg, name, ())


def _clear(msg: object, name: str) -> None:
    field = getattr(msg, name, None)
    if field is not None:
        del field[:]


def _default_opset(model: onnx.ModelProto) -> int | None:
    for imp in model.opset_import:
        if imp.domain in _DEFAULT_DOMAINS:
            return int(imp.version)
    return None


# --------------------------------------------------------------------------------------
# Split(num_outputs) -> the opset-13 Split
# --------------------------------------------------------------------------------------
def _known_dims(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    """Tensor name -> dims (None where not a fixed size) from the graphs' inputs, outputs,
    value_info and initializers."""
    dims: dict[str, list[int | None]] = {}
    for g in _graphs(model.graph):
        for vi in [*g.input, *g.value_info, *g.output]:
            t = vi.type.tensor_type
            if vi.type.HasField("tensor_type") and t.HasField("shape"):
                dims[vi.name] = [
                    int(d.dim_value) if d.HasField("dim_value") else None for d in t.shape.dim
                ]
        for init in g.initializer:
            dims[init.name] = [int(d) for d in init.dims]
    return dims


class _Names:
    """Fresh tensor/node names that clash with nothing in the model."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.used: set[str] = set()
        for g in _graphs(model.graph):
            self.used.update(i.name for i in g.input)
            self.used.update(i.name for i in g.initializer)
            for node in g.node:
                self.used.update(node.output)
                self.used.add(node.name)

    def __call__(self, base: str) -> str:
        name, k = base, 0
        while name in self.used:
            k += 1
            name = f"{base}_{k}"
        self.used.add(name)
        return name


def _const(names: _Names, base: str, values: list[int]) -> tuple[onnx.NodeProto, str]:
    out = names(base)
    tensor = helper.make_tensor(out, onnx.TensorProto.INT64, [len(values)], values)
    node = helper.make_node("Constant", [], [out], name=names(base + "/Constant"), value=tensor)
    return node, out


def _split_sizes(
    node: onnx.NodeProto, n: int, dims: dict[str, list[int | None]], names: _Names
) -> tuple[list[onnx.NodeProto], str | None]:
    """Nodes computing the ``split`` input that makes an opset-13 ``Split`` of ``node``'s
    input equal to ``Split(num_outputs=n)`` (chunks of ceil(d / n), the last one smaller);
    ``(nodes, None)`` when no input is needed (the split is even)."""
    axis = next((int(a.i) for a in node.attribute if a.name == "axis"), 0)
    shape = dims.get(node.input[0])
    d: int | None = None
    if shape is not None and -len(shape) <= axis < len(shape):
        d = shape[axis]
    if n == 1 or (d is not None and d % n == 0):
        return [], None  # the opset-13 Split without `split` divides evenly
    base = f"{node.name or 'Split'}/bca_split_sizes"
    if d is not None:
        c = -(-d // n)
        sizes_node, out = _const(names, base, [c] * (n - 1) + [d - (n - 1) * c])
        return [sizes_node], out
    # dynamic length d along the axis: c = ceil(d / n); sizes = [c] * (n - 1) + [d - (n - 1) c]
    nodes: list[onnx.NodeProto] = []

    def op(op_type: str, inputs: list[str], **attrs: Any) -> str:
        out = names(f"{base}/{op_type}")
        nodes.append(helper.make_node(op_type, inputs, [out], name=names(out), **attrs))
        return out

    def ints(values: list[int]) -> str:
        c_node, out = _const(names, f"{base}/const", values)
        nodes.append(c_node)
        return out

    d_t = op("Gather", [op("Shape", [node.input[0]]), ints([axis])], axis=0)
    c_t = op("Div", [op("Add", [d_t, ints([n - 1])]), ints([n])])
    last = op("Sub", [d_t, op("Mul", [c_t, ints([n - 1])])])
    sizes = op("Concat", [op("Expand", [c_t, ints([n - 1])]), last], axis=0)
    return nodes, sizes


def split_to_opset(model: onnx.ModelProto) -> int:
    """Rewrite, in a graph of default-domain opset 13 to 17, every ``Split`` with the
    opset-18 attribute ``num_outputs`` into the opset-13 form (no attribute; a ``split``
    input where the split is uneven or its length unknown), subgraphs included. In place;
    returns how many nodes were rewritten. Graphs of other opsets are left alone (below
    13 ``split`` is an attribute; bca exports need opset 13 or later)."""
    opset = _default_opset(model)
    if opset is None or not 13 <= opset < 18:
        return 0
    dims = _known_dims(model)
    names = _Names(model)
    count = 0
    for g in _graphs(model.graph):
        rebuilt: list[onnx.NodeProto] = []
        changed = False
        for node in g.node:
            attr = next((a for a in node.attribute if a.name == "num_outputs"), None)
            if node.op_type == "Split" and node.domain in _DEFAULT_DOMAINS and attr is not None:
                n = int(attr.i)
                node.attribute.remove(attr)
                has_split = len(node.input) > 1 and node.input[1] != ""
                if not has_split:
                    pre, sizes = _split_sizes(node, n, dims, names)
                    rebuilt.extend(pre)
                    if sizes is not None:
                        if len(node.input) > 1:
                            node.input[1] = sizes
                        else:
                            node.input.append(sizes)
                count += 1
                changed = True
            rebuilt.append(node)
        if changed:
            del g.node[:]
            g.node.extend(rebuilt)
    return count


# --------------------------------------------------------------------------------------
# IR version
# --------------------------------------------------------------------------------------
def _types(t: onnx.TypeProto) -> Iterator[int]:
    kind = t.WhichOneof("value")
    if kind == "tensor_type":
        yield t.tensor_type.elem_type
    elif kind == "sparse_tensor_type":
        yield t.sparse_tensor_type.elem_type
    elif kind == "sequence_type":
        yield from _types(t.sequence_type.elem_type)
    elif kind == "optional_type":
        yield from _types(t.optional_type.elem_type)
    elif kind == "map_type":
        yield t.map_type.key_type
        yield from _types(t.map_type.value_type)


def _data_types(model: onnx.ModelProto) -> set[int]:
    found: set[int] = set()
    for g in _graphs(model.graph):
        found.update(t.data_type for t in g.initializer)
        found.update(t.values.data_type for t in g.sparse_initializer)
        for vi in [*g.input, *g.value_info, *g.output]:
            found.update(_types(vi.type))
    for node in _all_nodes(model):
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                found.add(a.t.data_type)
            elif a.type == onnx.AttributeProto.TENSORS:
                found.update(t.data_type for t in a.tensors)
            elif a.type == onnx.AttributeProto.INT and a.name in ("to", "dtype", "output_dtype"):
                found.add(int(a.i))
    return found


def min_ir_version(model: onnx.ModelProto) -> int:
    """The lowest IR version ``model`` can declare: what its opset imports need
    (``onnx.helper.find_min_ir_version_for``) and what its data types and protobuf fields
    need, not counting IR-10 ``metadata_props`` on nodes, graphs, values and tensors
    (debugging records that :func:`lower_ir_version` drops)."""
    need = helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    if model.functions:
        need = max(need, 8)  # model-local functions
        if any(len(_field(f, "attribute_proto")) for f in model.functions):
            need = max(need, 9)
        if any(_field(f, "overload") for f in model.functions):
            need = max(need, 10)
    nodes = list(_all_nodes(model))
    if any(_field(n, "overload") for n in nodes):
        need = max(need, 10)
    if len(_field(model, "configuration")) or any(
        len(_field(n, "device_configurations")) for n in nodes
    ):
        need = max(need, 11)  # multi-device
    for dt in _data_types(model):
        need = max(need, _DTYPE_IR.get(dt, 0))
    return int(need)


def _drop_ir10_metadata(model: onnx.ModelProto) -> None:
    """Remove the ``metadata_props`` that IR 10 added (nodes, graphs, functions, value
    infos, tensors). The model's own ``metadata_props`` (older) stay."""
    for g in _graphs(model.graph):
        _clear(g, "metadata_props")
        for vi in [*g.input, *g.value_info, *g.output]:
            _clear(vi, "metadata_props")
        for t in g.initializer:
            _clear(t, "metadata_props")
    for f in model.functions:
        _clear(f, "metadata_props")
        _clear(f, "value_info")  # optional shape annotations, a field newer than IR 8
    for node in _all_nodes(model):
        _clear(node, "metadata_props")
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                _clear(a.t, "metadata_props")
            elif a.type == onnx.AttributeProto.TENSORS:
                for t in a.tensors:
                    _clear(t, "metadata_props")


def lower_ir_version(model: onnx.ModelProto) -> int:
    """Set ``model.ir_version`` to :func:`min_ir_version` when that is lower (IR-10 metadata
    of nodes and values, written by torch's dynamo exporter, is dropped when the model goes
    below IR 10). In place; returns the IR version set. Opset 17 -> IR 8, 18 -> 8,
    19 -> 9, 20 -> 9, 21 -> 10."""
    need = min_ir_version(model)
    if need < model.ir_version:
        if need < 10:
            _drop_ir10_metadata(model)
        model.ir_version = need
    return int(model.ir_version)
