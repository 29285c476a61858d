"""Locate linear layers in an ONNX graph and splice adapter subgraphs in beside them.

A *target* is a ``MatMul`` or ``Gemm`` node whose weight operand is an initializer,
directly or through one ``Transpose`` (or an ``Identity``/``Cast``). The adapter reads
the node's data input and its output is added to the node's output, so
``y = base(x) + adapter(x)`` holds whatever follows the node (a bias ``Add`` included).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ._builder import (
    AdapterSubgraph,
    build_adapter_subgraph,
    build_mixed_adapter_subgraph,
    check_opset,
    sanitize_name,
)

__all__ = [
    "TargetMatchError",
    "TargetNotFoundError",
    "AmbiguousTargetError",
    "LinearSite",
    "AdapterSpec",
    "find_linear_sites",
    "graph_opset",
    "match_by_name",
    "match_by_values",
    "splice_adapters",
    "resolve_targets",
    "replace_initializer",
    "unique_prefixes",
]


class TargetMatchError(ValueError):
    """A target layer of an adapter could not be located in the ONNX graph."""


class TargetNotFoundError(TargetMatchError):
    """No MatMul/Gemm node of the graph matches the target."""


class AmbiguousTargetError(TargetMatchError):
    """Several MatMul/Gemm nodes match the target equally well."""


@dataclass
class LinearSite:
    """A MatMul/Gemm node with a constant weight.

    ``weight_in_out`` is True when the initializer is laid out ``(in, out)`` as the node
    uses it (``MatMul(x, W)``, ``Gemm`` with ``transB=0``); False when the node computes
    with its transpose (``MatMul(x, Transpose(W))``, ``Gemm`` with ``transB=1``).
    """

    node: onnx.NodeProto
    node_index: int
    data_input: str
    weight_name: str
    weight_shape: tuple[int, ...]
    weight_in_out: bool
    elem_type: int
    output_name: str = ""

    @property
    def in_features(self) -> int:
        return self.weight_shape[0] if self.weight_in_out else self.weight_shape[1]

    @property
    def out_features(self) -> int:
        return self.weight_shape[1] if self.weight_in_out else self.weight_shape[0]

    def describe(self) -> str:
        return (
            f"{self.node.op_type} node {self.node.name!r} (weight {self.weight_name!r}, "
            f"in={self.in_features}, out={self.out_features})"
        )


@dataclass
class AdapterSpec:
    """One adapter to splice: its module name, kernel, widths and scale."""

    name: str
    kernel: np.ndarray
    in_features: int
    out_features: int
    scale: float = 1.0


def graph_opset(model: onnx.ModelProto) -> int:
    """The model's default-domain opset version."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    raise ValueError("model imports no default-domain ('ai.onnx') opset")


def find_linear_sites(model: onnx.ModelProto) -> list[LinearSite]:
    """All MatMul/Gemm nodes of the main graph whose weight is a 2-D initializer."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producers: dict[str, onnx.NodeProto] = {}
    for node in graph.node:
        for out in node.output:
            producers[out] = node
    # Constant nodes holding tensors count as initializers
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            inits.setdefault(node.output[0], node.attribute[0].t)

    def resolve(name: str) -> tuple[str, bool] | None:
        """Follow Identity/Cast/Transpose back to an initializer: (name, transposed)."""
        transposed = False
        for _ in range(4):
            if name in inits:
                return name, transposed
            node = producers.get(name)
            if node is None:
                return None
            if node.op_type in ("Identity", "Cast"):
                name = node.input[0]
            elif node.op_type == "Transpose":
                perm = [list(a.ints) for a in node.attribute if a.name == "perm"]
                if perm and perm[0] != [1, 0]:
                    return None
                transposed = not transposed
                name = node.input[0]
            else:
                return None
        return None

    sites: list[LinearSite] = []
    for idx, node in enumerate(graph.node):
        if node.name.startswith("bca/"):
            continue  # nodes of adapters spliced earlier
        if node.op_type == "MatMul" and len(node.input) == 2:
            got = resolve(node.input[1])
            if got is None:
                continue
            wname, transposed = got
            data_input = node.input[0]
            in_out = not transposed
        elif node.op_type == "Gemm" and len(node.input) >= 2:
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if attrs.get("transA", 0):
                continue
            got = resolve(node.input[1])
            if got is None:
                continue
            wname, transposed = got
            data_input = node.input[0]
            in_out = bool(attrs.get("transB", 0)) == transposed
            if float(attrs.get("alpha", 1.0)) != 1.0:
                continue  # y = alpha * x W: an adapter beside it would need rescaling
        else:
            continue
        t = inits[wname]
        if len(t.dims) != 2:
            continue
        sites.append(
            LinearSite(
                node=node,
                node_index=idx,
                data_input=data_input,
                weight_name=wname,
                weight_shape=(int(t.dims[0]), int(t.dims[1])),
                weight_in_out=in_out,
                elem_type=int(t.data_type),
                output_name=node.output[0],
            )
        )
    return sites


def _segments(name: str) -> list[str]:
    return [s for s in re.split(r"[./:]+", name) if s]


def _ends_with(hay: list[str], needle: list[str]) -> bool:
    return len(needle) <= len(hay) and hay[len(hay) - len(needle) :] == needle


_OP_SUFFIX = re.compile(r"^(MatMul|Gemm|MatMulNBits|FusedMatMul)(_\d+)?$")


def match_by_name(
    module: str, sites: Iterable[LinearSite], in_features: int, out_features: int
) -> list[LinearSite]:
    """Sites whose weight initializer or node name corresponds to ``module``.

    Tried in order, the first rule with any hit wins: (1) the weight initializer is
    named ``<module>.weight`` (up to a prefix such as ``bert.``); (2) the node name is a
    scope path ending in the module path (``/bert/encoder/layer.0/attention/self/query/
    MatMul``, as torch's exporter names nodes). Sites whose shapes differ from
    ``(in_features, out_features)`` are dropped.
    """
    sites = [s for s in sites if (s.in_features, s.out_features) == (in_features, out_features)]
    want = _segments(module)
    by_weight = [s for s in sites if _ends_with(_segments(s.weight_name), [*want, "weight"])]
    if by_weight:
        return by_weight
    by_node: list[LinearSite] = []
    for s in sites:
        segs = _segments(s.node.name)
        if segs and _OP_SUFFIX.match(segs[-1]):
            segs = segs[:-1]
        if segs and _ends_with(segs, want):
            by_node.append(s)
    return by_node


def weight_array(model: onnx.ModelProto, name: str) -> np.ndarray:
    for t in model.graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            return numpy_helper.to_array(node.attribute[0].t)
    raise KeyError(name)


def match_by_values(
    model: onnx.ModelProto, sites: Iterable[LinearSite], weight: np.ndarray
) -> list[LinearSite]:
    """Sites whose weight equals ``weight`` (``(out, in)`` layout), exactly."""
    weight = np.asarray(weight)
    out: list[LinearSite] = []
    for s in sites:
        if (s.in_features, s.out_features) != (weight.shape[1], weight.shape[0]):
            continue
        w = weight_array(model, s.weight_name)
        as_out_in = w.T if s.weight_in_out else w
        if as_out_in.shape == weight.shape and np.array_equal(
            as_out_in.astype(weight.dtype), weight
        ):
            out.append(s)
    return out


def _np_dtype(elem_type: int) -> np.dtype:
    return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))


def splice_adapters(
    model: onnx.ModelProto,
    pairs: list[tuple[LinearSite, AdapterSpec]],
    *,
    lowering: str,
    prefixes: list[str],
    progress: bool = False,
    spectra_names: list[str] | None = None,
    mixed: Sequence[Sequence[tuple[np.ndarray, float] | None]] | None = None,
    mixed_index: tuple[str, str] | None = None,
) -> list[AdapterSubgraph]:
    """Add each spec's adapter beside its site in ``model`` (in place).

    For a node with output ``t``, the output is renamed ``<prefix>/base_output`` and ``t``
    becomes ``Add(base, adapter(x))``; the adapter's nodes go right after the base node
    so the node list stays topologically sorted. Several adapters may share a site (they
    chain). The node list is rebuilt once. ``spectra_names`` (one per pair) names each
    adapter's kernel-spectra initializer. Returns the subgraphs built, in order.

    With ``mixed`` (one entry per pair: per adapter ``(kernel, scale)`` or None) and
    ``mixed_index`` (the index tensor and the tensor holding its shape ``[B]``) each pair
    gets a mixed-adapter subgraph (:func:`build_mixed_adapter_subgraph`) whose stacked
    spectra are named by ``spectra_names``; the spec's kernel then only gives the shapes.
    """
    if (mixed is None) != (mixed_index is None):
        raise ValueError("mixed and mixed_index go together")
    if mixed is not None and len(mixed) != len(pairs):
        raise ValueError(f"{len(mixed)} mixed entries for {len(pairs)} adapters")
    opset = graph_opset(model)
    check_opset(opset, lowering)
    graph = model.graph
    after: dict[str, list[onnx.NodeProto]] = {}
    new_inits: list[onnx.TensorProto] = []
    shared = {t.name for t in graph.initializer if t.name.startswith("bca/shared/")}
    nodes_by_output = {n.output[0]: n for n in graph.node if n.output}
    original_outputs = [n.output[0] if n.output else "" for n in graph.node]
    names: list[str | None] = [None] * len(pairs) if spectra_names is None else list(spectra_names)
    if len(names) != len(pairs):
        raise ValueError(f"{len(names)} spectra names for {len(pairs)} adapters")
    subgraphs: list[AdapterSubgraph] = []
    it: Iterable[tuple[int, tuple[LinearSite, AdapterSpec], str, str | None]] = zip(
        range(len(pairs)), pairs, prefixes, names, strict=True
    )
    if progress:
        try:
            from tqdm.auto import tqdm  # type: ignore[import-untyped]
        except ImportError:  # progress is optional: tqdm comes with bca[torch]
            pass
        else:
            it = tqdm(list(it), desc="splicing adapters", unit="adapter", disable=None, leave=False)
    for k, (site, spec), prefix, g_name in it:
        if (site.in_features, site.out_features) != (spec.in_features, spec.out_features):
            raise TargetMatchError(
                f"adapter {spec.name!r} is for in_features={spec.in_features}, "
                f"out_features={spec.out_features}, but {site.describe()} has other widths"
            )
        dtype = _np_dtype(site.elem_type)
        if dtype not in (np.float32, np.float64, np.float16):
            raise TypeError(
                f"{site.describe()} has weight type {dtype}; bca adapters support float32, "
                "float64 and float16 graphs"
            )
        node = nodes_by_output[site.output_name]
        out_name = node.output[0]
        base_out = f"{prefix}/base_output"
        adapter_out = f"{prefix}/output"
        shape_name = f"{prefix}/output_shape"
        node.output[0] = base_out
        nodes_by_output[base_out] = node
        if mixed is not None and mixed_index is not None:
            sub = build_mixed_adapter_subgraph(
                mixed[k],
                site.data_input,
                adapter_out,
                mixed_index[0],
                batch_shape=mixed_index[1],
                in_features=spec.in_features,
                out_features=spec.out_features,
                lowering=lowering,
                opset=opset,
                prefix=prefix,
                dtype=dtype,
                output_shape=shape_name,
                shared=shared,
                stack_name=g_name,
            )
        else:
            sub = build_adapter_subgraph(
                spec.kernel,
                site.data_input,
                adapter_out,
                in_features=spec.in_features,
                out_features=spec.out_features,
                scale=spec.scale,
                lowering=lowering,
                opset=opset,
                prefix=prefix,
                dtype=dtype,
                output_shape=shape_name,
                shared=shared,
                spectra_name=g_name,
            )
        subgraphs.append(sub)
        anchor = site.output_name
        chain = [
            helper.make_node("Shape", [base_out], [shape_name], name=f"{prefix}/Shape_out"),
            *sub.nodes,
            helper.make_node("Add", [base_out, adapter_out], [out_name], name=f"{prefix}/Add"),
        ]
        # a later adapter on the same node goes first: it feeds the earlier one's Add
        after[anchor] = chain + after.get(anchor, [])
        new_inits.extend(sub.initializers)
    rebuilt: list[onnx.NodeProto] = []
    for node, key in zip(graph.node, original_outputs, strict=True):
        rebuilt.append(node)
        if key in after:
            rebuilt.extend(after.pop(key))
    if after:  # pragma: no cover - defensive
        raise RuntimeError(f"internal error: anchors {sorted(after)} not found")
    del graph.node[:]
    graph.node.extend(rebuilt)
    graph.initializer.extend(new_inits)
    return subgraphs


def replace_initializer(model: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    """Overwrite initializer ``name`` with ``value`` (same shape, cast to its dtype)."""
    for i, t in enumerate(model.graph.initializer):
        if t.name == name:
            dtype = _np_dtype(t.data_type)
            if tuple(t.dims) != tuple(value.shape):
                raise ValueError(
                    f"initializer {name!r} has shape {tuple(t.dims)}, new value {value.shape}"
                )
            new = numpy_helper.from_array(np.ascontiguousarray(value.astype(dtype)), name)
            model.graph.initializer[i].CopyFrom(new)
            return
    raise KeyError(name)


def unique_prefixes(model: onnx.ModelProto, stems: list[str]) -> list[str]:
    """``bca/<stem>`` for each stem, unique among each other and the graph's names."""
    roots = set()
    for n in model.graph.node:
        for name in (n.name, *n.output):
            if name.startswith("bca/"):
                roots.add(name.rsplit("/", 1)[0])
    roots.update(
        t.name.rsplit("/", 1)[0] for t in model.graph.initializer if t.name.startswith("bca/")
    )
    out: list[str] = []
    for stem in stems:
        base = f"bca/{sanitize_name(stem)}"
        prefix, k = base, 1
        while prefix in roots:
            k += 1
            prefix = f"{base}#{k}"
        roots.add(prefix)
        out.append(prefix)
    return out


def elem_type_name(elem_type: int) -> str:
    return TensorProto.DataType.Name(elem_type)


def resolve_targets(
    model: onnx.ModelProto,
    specs: list[AdapterSpec],
    *,
    targets: Mapping[str, str] | None = None,
    base_weights: Mapping[str, np.ndarray] | None = None,
) -> list[LinearSite]:
    """One site per spec: explicit ``targets`` (node or initializer name), else the
    weight values in ``base_weights`` (module name -> ``(out, in)`` weight), else names.

    Raises :class:`TargetNotFoundError` / :class:`AmbiguousTargetError` naming the module
    and the candidates.
    """
    sites = find_linear_sites(model)
    chosen: list[LinearSite] = []
    for spec in specs:
        if targets and spec.name in targets:
            ref = targets[spec.name]
            found = [s for s in sites if ref in (s.node.name, s.weight_name)]
            how = f"targets[{spec.name!r}] = {ref!r}"
        elif base_weights is not None and spec.name in base_weights:
            found = match_by_values(model, sites, base_weights[spec.name])
            how = "its base weight values"
        else:
            found = match_by_name(spec.name, sites, spec.in_features, spec.out_features)
            how = "its name (weight initializer or node scope)"
        if not found:
            same_shape = [
                s.describe()
                for s in sites
                if (s.in_features, s.out_features) == (spec.in_features, spec.out_features)
            ]
            hint = (
                f" {len(same_shape)} MatMul/Gemm node(s) have its shape, e.g. "
                + "; ".join(same_shape[:4])
                + ". Pass targets={module: node or initializer name} or base weights to "
                "choose."
                if same_shape
                else f" No MatMul/Gemm node with a constant weight has in_features="
                f"{spec.in_features}, out_features={spec.out_features}."
            )
            raise TargetNotFoundError(
                f"no MatMul/Gemm node matches adapter module {spec.name!r} by {how}.{hint}"
            )
        if len(found) > 1:
            raise AmbiguousTargetError(
                f"adapter module {spec.name!r} matches {len(found)} nodes by {how}: "
                + "; ".join(s.describe() for s in found[:6])
                + ". Pass targets={module: node name} to choose."
            )
        chosen.append(found[0])
    seen: dict[int, str] = {}
    for spec, site in zip(specs, chosen, strict=True):
        if id(site.node) in seen:
            raise AmbiguousTargetError(
                f"adapter modules {seen[id(site.node)]!r} and {spec.name!r} both resolve to "
                f"{site.describe()}"
            )
        seen[id(site.node)] = spec.name
    return chosen
