"""Patch an existing ONNX model of the base model with saved bca adapters (no torch)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx

from .. import _sketch
from ._builder import LOWERINGS, check_opset
from ._io import SavedAdapter, load_onnx, read_adapter, save_checked
from ._layout import check_servable_default
from ._lowering import choose_lowering
from ._overridable import (
    SavedSlot,
    check_saved_slots,
    combine_specs,
    make_overridable,
    reserve_spectra_names,
    tensor_uses,
)
from ._splice import (
    AdapterSpec,
    TargetNotFoundError,
    find_linear_sites,
    graph_opset,
    replace_initializer,
    resolve_targets,
    splice_adapters,
    unique_prefixes,
    weight_array,
)

__all__ = ["patch_model", "add_adapters"]


def add_adapters(
    model: onnx.ModelProto,
    specs: Sequence[AdapterSpec],
    *,
    lowering: str = "auto",
    targets: Mapping[str, str] | None = None,
    base_weights: Mapping[str, np.ndarray] | None = None,
    progress: bool = False,
    tag: str = "",
    servable: bool = False,
    servable_default: str = "zeros",
    servable_saved: Sequence[SavedSlot] = (),
) -> dict[str, str]:
    """Splice adapters into ``model`` in place; return ``{module: matched node name}``.

    ``lowering`` is ``"dft"``, ``"matmul"``, ``"matmul2"`` or ``"auto"`` (chosen per
    adapter by :func:`bca.onnx.choose_lowering`). Targets are located by ``targets``
    (module -> node or initializer name), else by ``base_weights`` (module -> ``(out, in)``
    base weight, compared exactly), else by name (see :func:`bca.onnx.match_by_name`).

    With ``servable=True`` each layer's kernel spectra become an overridable initializer
    ``bca.<module>.spectra`` (initializer and graph input) holding ``servable_default``:
    ``"zeros"`` (the graph computes the base model) or ``"adapter"`` (these specs); specs
    on the same module are added up into one; the layout goes into ``metadata_props``
    (see :func:`bca.onnx.servable_layout`). ``servable_saved`` lists fully trained
    parameters (``modules_to_save``) whose initializers become overridable too, renamed
    ``bca.modules_to_save.<name>``.
    """
    if lowering != "auto" and lowering not in LOWERINGS:
        raise ValueError(f"lowering must be 'auto' or one of {LOWERINGS}, got {lowering!r}")
    opset = graph_opset(model)
    specs = list(specs)
    spectra_names: list[str] | None = None
    if servable:
        check_servable_default(servable_default)
        specs = combine_specs(specs)
        spectra_names = reserve_spectra_names(model, specs)
        check_saved_slots(model, servable_saved, servable_default)
    elif servable_saved:
        raise ValueError("servable_saved needs servable=True")
    sites = resolve_targets(model, specs, targets=targets, base_weights=base_weights)
    by_lowering: dict[str, list[tuple[int, str]]] = {}
    for i, (spec, site) in enumerate(zip(specs, sites, strict=True)):
        low = lowering
        if low == "auto":
            low = choose_lowering(
                spec.kernel.shape[-1],
                spec.in_features,
                spec.out_features,
                opset=opset,
                dtype=np.dtype(onnx.helper.tensor_dtype_to_np_dtype(site.elem_type)),
            )
        check_opset(opset, low)
        by_lowering.setdefault(low, []).append((i, low))
    emitted: dict[int, str] = {}
    for low, items in by_lowering.items():
        pairs = [(sites[i], specs[i]) for i, _ in items]
        prefixes = unique_prefixes(model, [f"{tag}{specs[i].name}" for i, _ in items])
        subs = splice_adapters(
            model,
            pairs,
            lowering=low,
            prefixes=prefixes,
            progress=progress,
            spectra_names=None if spectra_names is None else [spectra_names[i] for i, _ in items],
        )
        for (i, _), sub in zip(items, subs, strict=True):
            emitted[i] = sub.lowering
    if servable:
        make_overridable(
            model,
            specs,
            [emitted[i] for i in range(len(specs))],
            servable_default,
            servable_saved,
        )
    return {
        spec.name: site.node.name or site.output_name
        for spec, site in zip(specs, sites, strict=True)
    }


def _locate_saved(
    model: onnx.ModelProto,
    pname: str,
    shape: tuple[int, ...],
    base_weights: Mapping[str, np.ndarray] | None,
) -> tuple[str, bool]:
    """(initializer or Constant name, stored transposed) of fully trained parameter
    ``pname`` of ``shape``: an initializer named ``pname`` (up to a prefix), else, for a
    linear weight, the MatMul/Gemm weight located like a target."""
    inits = {t.name: t for t in model.graph.initializer}
    hits = [n for n in inits if n == pname or n.endswith("." + pname)]
    if len(hits) == 1:
        got = tuple(int(d) for d in inits[hits[0]].dims)
        if got == shape:
            return hits[0], False
        if len(shape) == 2 and got == shape[::-1]:
            return hits[0], True
        raise ValueError(
            f"modules_to_save parameter {pname!r} has shape {shape}, initializer "
            f"{hits[0]!r} has {got}"
        )
    if len(hits) > 1:
        raise ValueError(
            f"modules_to_save parameter {pname!r} matches several initializers: {hits}"
        )
    # an anonymous (transposed) weight of a linear layer: locate it like a target
    segs = pname.split(".")
    module = ".".join(segs[:-1])
    if segs[-1] == "weight" and len(shape) == 2:
        sites = find_linear_sites(model)
        if base_weights is not None and module in base_weights:
            from ._splice import match_by_values

            cand = match_by_values(model, sites, base_weights[module])
        else:
            from ._splice import match_by_name

            cand = match_by_name(module, sites, shape[1], shape[0])
        if len(cand) == 1:
            return cand[0].weight_name, cand[0].weight_in_out
    raise TargetNotFoundError(
        f"the adapter's fully trained parameter {pname!r} (modules_to_save) has no "
        "matching initializer in the ONNX graph; export the base model with parameter "
        "names kept, or pass base_weights"
    )


def _union_saved(adapters: Sequence[SavedAdapter], one_value: str | None) -> dict[str, np.ndarray]:
    """The fully trained parameters (``modules_to_save``) of ``adapters``, by name.

    Adapters that carry the same parameter must agree on its shape and, where
    ``one_value`` is given (why the target holds one value only), on its values."""
    values: dict[str, tuple[np.ndarray, str]] = {}
    for a in adapters:
        for pname, value in a.modules_to_save.items():
            prev = values.get(pname)
            if prev is None:
                values[pname] = (np.asarray(value), str(a.path))
                continue
            if prev[0].shape != value.shape:
                raise ValueError(
                    f"adapters {prev[1]!r} and {str(a.path)!r} have fully trained parameter "
                    f"{pname!r} of different shapes {prev[0].shape} and {value.shape}"
                )
            if one_value is not None and not np.array_equal(prev[0], value):
                raise ValueError(
                    f"adapters {prev[1]!r} and {str(a.path)!r} have different values of fully "
                    f"trained parameter {pname!r}; {one_value}"
                )
    return {pname: v for pname, (v, _) in values.items()}


def _shared_initializer(pname: str, name: str, uses: int, action: str, remedy: str) -> ValueError:
    """The error for a fully trained parameter whose initializer other nodes read too."""
    return ValueError(
        f"fully trained parameter {pname!r} is stored in initializer {name!r}, which {uses} "
        "node inputs read (an exporter may have merged equal tensors, such as zero biases or "
        f"tied weights, into one); {action} would change them all: {remedy}"
    )


def _saved_writes(
    model: onnx.ModelProto,
    adapters: Sequence[SavedAdapter],
    base_weights: Mapping[str, np.ndarray] | None,
) -> list[tuple[str, np.ndarray]]:
    """``(initializer name, new value)`` for the fully trained parameters
    (``modules_to_save``) of ``adapters``, checked before the graph is touched.

    Refused: two adapters with different values of one parameter (one graph holds one
    head; the later would silently win), and a new value for an initializer that other
    nodes read too (an exporter may merge equal tensors, e.g. zero biases or tied
    weights, into one: overwriting it would change them all)."""
    values = _union_saved(
        adapters,
        "one graph holds one value (a sum of heads is not the combined model): patch one "
        "adapter with modules_to_save, or serve both with servable=True",
    )
    inits = {t.name: t for t in model.graph.initializer}
    writes: list[tuple[str, np.ndarray]] = []
    for pname, value in values.items():
        name, transposed = _locate_saved(model, pname, tuple(value.shape), base_weights)
        new = value.T if transposed else value
        uses = tensor_uses(model.graph, name)
        if uses > 1:
            current = onnx.numpy_helper.to_array(inits[name])
            if not np.array_equal(current, new.astype(current.dtype)):
                raise _shared_initializer(
                    pname, name, uses, "writing the trained value",
                    "export the adapted model with bca.onnx.export_model, or patch a base ONNX "
                    "file where the parameter has its own initializer",
                )  # fmt: skip
        writes.append((name, new))
    return writes


def _servable_slots(
    model: onnx.ModelProto,
    adapters: Sequence[SavedAdapter],
    base_weights: Mapping[str, np.ndarray] | None,
    default: str,
) -> list[SavedSlot]:
    """The fully trained parameters of ``adapters`` (their union) as overridable slots; the
    base value is the graph's. For the ``"adapter"`` default the adapters must agree."""
    values = _union_saved(
        adapters,
        "servable_default='adapter' stores one value (a sum of heads is not the combined "
        "model): use servable_default='zeros' or one adapter with modules_to_save"
        if default == "adapter"
        else None,
    )
    slots: list[SavedSlot] = []
    for pname, value in values.items():
        name, transposed = _locate_saved(model, pname, tuple(value.shape), base_weights)
        uses = tensor_uses(model.graph, name)
        if uses != 1:
            raise _shared_initializer(
                pname, name, uses, "overriding it per run",
                "make the servable graph with export_model, or from a base ONNX file where the "
                "parameter has its own initializer",
            )  # fmt: skip
        slots.append(SavedSlot(pname, name, transposed, value.T if transposed else value))
    return slots


def _check_base_sketches(
    model: onnx.ModelProto,
    adapters: Sequence[SavedAdapter],
    target_list: Sequence[Mapping[str, str] | None],
    base_weights: Mapping[str, np.ndarray] | None,
    check: str,
) -> None:
    """Compare the located layers' base weights with the sketches saved with each adapter
    (:mod:`bca._sketch`); adapters saved without sketches are not checked."""
    if check == "ignore":
        return
    for adapter, tg in zip(adapters, target_list, strict=True):
        base = adapter.config.get("base_model") or {}
        saved = base.get("weight_sketch") or {}
        specs = [s for s in adapter.specs if isinstance(saved.get(s.name), dict)]
        if not specs:
            continue
        try:
            sites = resolve_targets(model, specs, targets=tg, base_weights=base_weights)
        except ValueError:
            continue  # patching itself reports what cannot be located, in its own order
        differing = []
        for spec, site in zip(specs, sites, strict=True):
            w = weight_array(model, site.weight_name)
            if _sketch.differ(saved[spec.name], _sketch.sketch(w.T if site.weight_in_out else w)):
                differing.append(spec.name)
        _sketch.report_mismatch(
            str(adapter.path),
            differing,
            len(adapter.specs),
            str(base.get("name_or_path", "")),
            check,
            stacklevel=3,
        )


def patch_model(
    base_onnx_path: str | os.PathLike[str],
    adapter_dir: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    out_path: str | os.PathLike[str],
    *,
    lowering: str = "auto",
    targets: Mapping[str, str] | Sequence[Mapping[str, str] | None] | None = None,
    base_weights: Mapping[str, np.ndarray] | None = None,
    external_data: bool | None = None,
    progress: bool = False,
    servable: bool = False,
    servable_default: str = "zeros",
    check_base: str = "warn",
    mixed: bool = False,
    mixed_names: Sequence[str] | None = None,
) -> Path:
    """Add saved bca adapters to an existing ONNX model of the base model.

    Args:
        base_onnx_path: the base model's ``.onnx`` file (any exporter; opset >= 17 for the
            ``"dft"`` lowering, >= 13 for ``"matmul"``).
        adapter_dir: a directory written by :func:`bca.model.save_adapter`, or a list of
            them: several adapters go into one graph (adapters on the same layer add up).
        out_path: where to write the adapted model (checked with ``onnx.checker``).
        lowering: ``"auto"`` (default, chosen per layer from measurements), ``"dft"`` or
            ``"matmul"``.
        targets: ``{module name: ONNX node name or weight initializer name}`` overriding
            the automatic matching (one mapping, or one per adapter directory).
        base_weights: ``{module name: weight (out, in) as numpy}`` of the base model; with
            it, targets are matched by exact weight values (robust to anonymous
            initializer names such as ``onnx::MatMul_123``).
        external_data: force (True) or forbid (False) external tensor data; default: only
            for models of 2 GB or more.
        progress: one tqdm bar on stderr (terminals only, cleared when done); a library
            call prints nothing by default.
        servable: make a servable graph (see :func:`add_adapters` and docs/onnx.md,
            "Serving many adapters"): the adapters' layers get overridable kernel spectra
            ``bca.<module>.spectra`` and the adapters define the layout (several adapter
            directories: the union of their modules; adapters on one module must share the
            block size). Fully trained parameters (``modules_to_save``, e.g. a classifier
            head) of the adapters become overridable initializers
            ``bca.modules_to_save.<name>`` (each must be its own initializer, read by one
            node); the base file's values are the base model's.
        servable_default: ``"zeros"`` (the servable graph computes the base model: base
            head included) or ``"adapter"`` (the sum of the given adapters, with their
            fully trained parameters, which must then agree between adapters).

        mixed: make a mixed-adapter graph (docs/onnx.md, "Mixed-adapter batches"): the
            adapter directories are not added up but each becomes one choice of a new int64
            input ``bca.adapter_index`` of shape ``(batch,)``: batch row ``b`` is computed
            with ``adapter_dir[index[b]]``, or as the base model for
            ``index[b] == len(adapter_dir)`` (see :func:`bca.onnx.add_mixed_adapters`). The
            adapters of one module must share block size, widths and kernel dtype. Fully
            trained parameters (``modules_to_save``) must be the same in every adapter (or in
            none): one graph holds one head. Not with ``servable=True``.
        mixed_names: the adapters' names in the mixed layout (default: the directories'
            names, or their paths when those repeat).
        check_base: what to do when a located layer's base weight is not the one the
            adapter was trained on (its weight sketch, saved with the adapter, differs:
            another checkpoint of the same architecture): ``"warn"`` (default),
            ``"error"`` (``ValueError``) or ``"ignore"``. See :func:`bca.model.load_adapter`.

    Returns the output path. Raises :class:`TargetNotFoundError` or
    :class:`AmbiguousTargetError` (both ``ValueError``) naming the module and the
    candidate nodes when a target cannot be located unambiguously, ``ValueError`` for a
    malformed adapter or an opset too old, ``FileNotFoundError`` for missing files.
    """
    dirs = [adapter_dir] if isinstance(adapter_dir, (str, os.PathLike)) else list(adapter_dir)
    if not dirs:
        raise ValueError("adapter_dir must name at least one adapter directory")
    if targets is None or isinstance(targets, Mapping):
        target_list: list[Mapping[str, str] | None] = [targets] * len(dirs)
    else:
        target_list = list(targets)
        if len(target_list) != len(dirs):
            raise ValueError(
                f"targets has {len(target_list)} entries for {len(dirs)} adapter directories"
            )
    _sketch.check_mode(check_base)
    adapters = [read_adapter(d) for d in dirs]  # validate all before the (slow) load
    model = load_onnx(base_onnx_path)
    _check_base_sketches(model, adapters, target_list, base_weights, check_base)
    if lowering != "auto":
        check_opset(graph_opset(model), lowering)
    if mixed:
        if servable:
            raise ValueError("mixed=True and servable=True cannot be combined")
        _patch_mixed(
            model, adapters, dirs, target_list, base_weights, lowering, progress, mixed_names
        )
        return save_checked(model, out_path, external_data=external_data)
    if mixed_names is not None:
        raise ValueError("mixed_names needs mixed=True")
    if servable:
        check_servable_default(servable_default)
        slots = _servable_slots(model, adapters, base_weights, servable_default)
        merged_targets: dict[str, str] = {}
        for tg in target_list:
            for module, ref in (tg or {}).items():
                if merged_targets.setdefault(module, ref) != ref:
                    raise ValueError(
                        f"targets disagree for module {module!r}: {merged_targets[module]!r} "
                        f"and {ref!r}"
                    )
        add_adapters(
            model,
            [spec for a in adapters for spec in a.specs],
            lowering=lowering,
            targets=merged_targets or None,
            base_weights=base_weights,
            progress=progress,
            servable=True,
            servable_default=servable_default,
            servable_saved=slots,
        )
        return save_checked(model, out_path, external_data=external_data)
    writes = _saved_writes(model, adapters, base_weights)
    for k, (adapter, tg) in enumerate(zip(adapters, target_list, strict=True)):
        add_adapters(
            model,
            adapter.specs,
            lowering=lowering,
            targets=tg,
            base_weights=base_weights,
            progress=progress,
            tag=f"a{k}/" if len(adapters) > 1 else "",
        )
    for name, value in writes:
        replace_initializer(model, name, value)
    return save_checked(model, out_path, external_data=external_data)


def mixed_heads(
    labels: Sequence[str], heads: Sequence[Mapping[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """The one set of fully trained parameters (``modules_to_save``) of a mixed graph's
    adapters: every adapter must carry the same names and values, or none."""
    if not any(heads):
        return {}
    first = next(k for k, h in enumerate(heads) if h)
    want = heads[first]
    for label, h in zip(labels, heads, strict=True):
        same = set(h) == set(want) and all(
            np.shape(h[n]) == np.shape(want[n]) and np.array_equal(h[n], want[n]) for n in want
        )
        if not same:
            differing = sorted(
                n
                for n in set(h) | set(want)
                if n not in h or n not in want or not np.array_equal(h[n], want[n])
            )
            raise ValueError(
                f"adapters {labels[first]!r} and {label!r} have different fully trained "
                f"parameters (modules_to_save; differing: {differing[:6]}): a mixed graph gathers "
                "the circulant adapters per row but holds one head, so their modules_to_save "
                "must be equal (or absent) in every adapter; serve differing heads with a "
                "servable graph (servable=True) and one run per adapter"
            )
    return dict(want)


def _mixed_labels(dirs: Sequence[str | os.PathLike[str]], names: Sequence[str] | None) -> list[str]:
    if names is not None:
        return [str(n) for n in names]
    short = [Path(d).name or str(d) for d in dirs]
    return short if len(set(short)) == len(short) else [str(d) for d in dirs]


def _patch_mixed(
    model: onnx.ModelProto,
    adapters: Sequence[SavedAdapter],
    dirs: Sequence[str | os.PathLike[str]],
    target_list: Sequence[Mapping[str, str] | None],
    base_weights: Mapping[str, np.ndarray] | None,
    lowering: str,
    progress: bool,
    names: Sequence[str] | None,
) -> None:
    from ._mixed import add_mixed_adapters

    labels = _mixed_labels(dirs, names)
    if len(labels) != len(adapters):
        raise ValueError(f"mixed_names has {len(labels)} names for {len(adapters)} adapters")
    heads = mixed_heads(labels, [a.modules_to_save for a in adapters])
    writes = _saved_writes(model, adapters, base_weights) if heads else []
    merged_targets: dict[str, str] = {}
    for tg in target_list:
        for module, ref in (tg or {}).items():
            if merged_targets.setdefault(module, ref) != ref:
                raise ValueError(
                    f"targets disagree for module {module!r}: {merged_targets[module]!r} "
                    f"and {ref!r}"
                )
    add_mixed_adapters(
        model,
        [a.specs for a in adapters],
        names=labels,
        lowering=lowering,
        targets=merged_targets or None,
        base_weights=base_weights,
        progress=progress,
    )
    for name, value in writes:
        replace_initializer(model, name, value)
