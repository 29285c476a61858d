"""Export an adapted torch model to ONNX: base graph from torch's exporter, adapters
spliced in as DFT/MatMul subgraphs (or folded into the base weights)."""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ._builder import MIN_OPSET
from ._io import save_checked
from ._layout import ServableLayout, check_servable_default, servable_layout
from ._overridable import SavedSlot
from ._patch import add_adapters
from ._splice import (
    AdapterSpec,
    TargetNotFoundError,
    find_linear_sites,
    graph_opset,
    match_by_values,
    replace_initializer,
)
from ._versions import lower_ir_version, split_to_opset

__all__ = ["export_model", "MODES", "DEFAULT_OPSET"]

MODES = ("auto", "dft", "matmul", "matmul2", "folded")
"""``mode`` values of :func:`export_model`."""

DEFAULT_OPSET = 17


def _torch() -> Any:
    try:
        import torch
    except ImportError as e:  # pragma: no cover - torch is a dependency of bca[torch]
        raise ImportError("export_model needs torch: pip install 'bca[torch,onnx]'") from e
    return torch


def _adapter_modules(model: Any) -> list[tuple[str, Any]]:
    from ..nn import BlockCirculantLinear

    return [(n, m) for n, m in model.named_modules() if isinstance(m, BlockCirculantLinear)]


def _flatten_outputs(out: Any) -> tuple[list[str], tuple[Any, ...]]:
    torch = _torch()
    if isinstance(out, torch.Tensor):
        return ["output"], (out,)
    if isinstance(out, Mapping):  # dict, transformers ModelOutput
        items = [(k, v) for k, v in out.items() if isinstance(v, torch.Tensor)]
        return [k for k, _ in items], tuple(v for _, v in items)
    if isinstance(out, (tuple, list)):
        vals = [v for v in out if isinstance(v, torch.Tensor)]
        return [f"output_{i}" for i in range(len(vals))], tuple(vals)
    raise TypeError(f"model output of type {type(out).__name__} cannot be exported")


def _make_wrapper(model: Any, names: list[str], as_kwargs: bool) -> Any:
    torch = _torch()

    class _ExportWrapper(torch.nn.Module):  # type: ignore[name-defined,misc]
        """Positional tensors in, a flat tuple of tensors out."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *args: Any) -> tuple[Any, ...]:
            out = (
                self.model(**dict(zip(names, args, strict=True)))
                if as_kwargs
                else self.model(*args)
            )
            return _flatten_outputs(out)[1]

    # a new module is in training mode; torch.onnx.export restores the wrapper's mode
    # after tracing, recursively, so it must match the model's (else dropout comes back on)
    return _ExportWrapper().train(model.training)


def _default_dynamic_axes(
    names: Sequence[str], tensors: Sequence[Any]
) -> dict[str, dict[int, str]]:
    """Integer inputs (ids, masks): dims 0 and 1 are batch and sequence; float inputs:
    every dim but the last (the features) is dynamic."""
    torch = _torch()
    axes: dict[str, dict[int, str]] = {}
    for name, t in zip(names, tensors, strict=True):
        if t.dim() == 0:
            continue
        if t.dtype in (torch.int64, torch.int32, torch.bool, torch.int8, torch.uint8):
            dims = list(range(min(t.dim(), 2)))
        else:
            dims = list(range(t.dim() - 1))
        labels = ["batch", "sequence"] + [f"dim{i}" for i in range(2, 8)]
        if dims:
            axes[name] = {d: labels[d] for d in dims}
    return axes


@contextlib.contextmanager
def _export_state(
    modules: list[tuple[str, Any]], folded: bool, seed: int = 0x6BCA
) -> Iterator[dict[str, Any]]:
    """Inside: adapters merged (folded) or disabled and each target's base weight
    replaced by a unique random tag (so its initializer can be found exactly after
    export). Everything is restored on exit."""
    torch = _torch()
    tags: dict[str, Any] = {}
    saved: list[tuple[Any, Any, bool]] = []
    merged: list[Any] = []
    try:
        with torch.no_grad():
            for k, (name, m) in enumerate(modules):
                if folded:
                    m.merge(exact_unmerge=True)
                    merged.append(m)
                    continue
                w = m.base_layer.weight
                gen = torch.Generator().manual_seed(seed + k)
                tag = torch.randn(w.shape, generator=gen, dtype=torch.float32).to(w.dtype)
                saved.append((m, w.detach().clone(), bool(m.adapter_enabled)))
                w.copy_(tag.to(w.device))
                m.adapter_enabled = False
                tags[name] = tag
        yield tags
    finally:
        with torch.no_grad():
            for m, w0, enabled in saved:
                m.base_layer.weight.copy_(w0)
                m.adapter_enabled = enabled
            for m in merged:
                m.unmerge()


@contextlib.contextmanager
def _adapters_off(modules: list[Any]) -> Iterator[None]:
    """Adapters switched off (the base model) inside; restored on exit."""
    saved = [bool(m.adapter_enabled) for m in modules]
    try:
        for m in modules:
            m.adapter_enabled = False
        yield
    finally:
        for m, enabled in zip(modules, saved, strict=True):
            m.adapter_enabled = enabled


@contextlib.contextmanager
def _params_set(params: Mapping[str, Any], values: Mapping[str, Any]) -> Iterator[None]:
    """``params[name]`` holds ``values[name]`` inside (copied in); restored on exit."""
    torch = _torch()
    saved = {n: p.detach().clone() for n, p in params.items()}
    try:
        with torch.no_grad():
            for n, p in params.items():
                v = values[n]
                p.copy_(torch.as_tensor(np.asarray(v) if not torch.is_tensor(v) else v))
        yield
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved[n])


def _tags(params: Mapping[str, Any], seed: int = 0x5A7E) -> dict[str, np.ndarray]:
    """A unique random tag per fully trained parameter (its shape and dtype), to find its
    initializer in the exported graph exactly."""
    torch = _torch()
    out: dict[str, np.ndarray] = {}
    for k, (name, p) in enumerate(params.items()):
        gen = torch.Generator().manual_seed(seed + k)
        tag = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype)
        out[name] = tag.numpy()
    return out


def _locate_tags(
    model: onnx.ModelProto, tags: Mapping[str, np.ndarray]
) -> dict[str, tuple[str, bool]]:
    """{parameter: (initializer, stored transposed)}: the one initializer equal to its tag
    (or, for a matrix, to its transpose)."""
    by_shape: dict[tuple[int, ...], list[onnx.TensorProto]] = {}
    for t in model.graph.initializer:
        by_shape.setdefault(tuple(int(d) for d in t.dims), []).append(t)
    found: dict[str, tuple[str, bool]] = {}
    for name, tag in tags.items():
        hits: list[tuple[str, bool]] = []
        for t in by_shape.get(tag.shape, []):
            if np.array_equal(onnx.numpy_helper.to_array(t), tag):
                hits.append((t.name, False))
        if tag.ndim == 2:  # a random tag is not symmetric
            for t in by_shape.get(tag.shape[::-1], []):
                if np.array_equal(onnx.numpy_helper.to_array(t), tag.T):
                    hits.append((t.name, True))
        if len(hits) != 1:
            raise ValueError(
                f"fully trained parameter {name!r} (modules_to_save) is "
                + (
                    "not held as an initializer of the exported graph (unused by the "
                    "exported outputs, or folded with other constants)"
                    if not hits
                    else f"held by several initializers {[h[0] for h in hits]}"
                )
                + "; a servable graph cannot override it per run"
            )
        found[name] = hits[0]
    return found


def _base_saved_values(params: Mapping[str, Any], base: Any) -> dict[str, np.ndarray]:
    """The base model's values of the fully trained parameters, from ``servable_base`` (a
    torch module or a mapping such as its ``state_dict()``)."""
    if base is None:
        raise ValueError(
            f"the model has fully trained parameters (modules_to_save: {sorted(params)[:6]}); "
            "a servable graph also serves adapters without them and the base model, so it "
            "needs the base model's values of those: pass servable_base=<the base model or "
            "its state_dict()>"
        )
    if hasattr(base, "state_dict") and callable(base.state_dict):
        base = base.state_dict()
    if not isinstance(base, Mapping):
        raise TypeError(
            f"servable_base must be a torch module or a mapping, got {type(base).__name__}"
        )
    torch = _torch()
    out: dict[str, np.ndarray] = {}
    for name, p in params.items():
        if name not in base:
            raise ValueError(f"servable_base has no value for fully trained parameter {name!r}")
        v = base[name]
        a = v.detach().to("cpu").numpy() if hasattr(v, "detach") else np.asarray(v)
        if tuple(a.shape) != tuple(p.shape):
            raise ValueError(
                f"servable_base[{name!r}] has shape {tuple(a.shape)}, the model's parameter "
                f"{tuple(p.shape)}"
            )
        out[name] = torch.as_tensor(np.array(a, copy=True)).to(p.dtype).numpy()
    return out


@dataclass
class _MixedEntry:
    """One adapter of a mixed export: its name, specs, fully trained parameters, and how
    torch computes it (``kind``: ``"named"`` adapter of the model, another torch ``"model"``,
    or a ``"saved"`` adapter with no torch reference)."""

    label: str
    specs: list[AdapterSpec]
    heads: dict[str, np.ndarray]
    kind: str
    source: Any


def _modules_to_save_of(model: Any) -> dict[str, Any]:
    from ..model import modules_to_save_parameters

    return dict(modules_to_save_parameters(model))


def _mixed_entries(
    model: Any, mixed: Sequence[Any], names: Sequence[str] | None, bca_modules: set[str]
) -> list[_MixedEntry]:
    """The entries of ``export_model(mixed=...)`` as specs (validated, nothing exported)."""
    from ..model import adapter_modules, adapter_names
    from ._feeds import kernels_of
    from ._io import SavedAdapter

    if isinstance(mixed, (str, os.PathLike)) or not isinstance(mixed, Sequence):
        raise TypeError(
            "mixed must be a list of adapters (adapter names, folders, SavedAdapters or torch "
            f"models), got {type(mixed).__name__}"
        )
    if not mixed:
        raise ValueError("mixed must name at least one adapter")
    known = adapter_names(model)
    entries: list[_MixedEntry] = []
    for i, e in enumerate(mixed):
        if isinstance(e, str) and e in known:
            specs = [
                AdapterSpec(
                    n,
                    m.bca_kernels[e].detach().to("cpu").numpy().copy(),
                    m.in_features,
                    m.out_features,
                    float(m.adapter_scale(e)),
                )
                for n, m in adapter_modules(model)
                if e in m.adapter_names
            ]
            heads = {
                k: v.detach().to("cpu").numpy().copy()
                for k, v in _modules_to_save_of(model).items()
            }
            entries.append(_MixedEntry(e, specs, heads, "named", e))
            continue
        if isinstance(e, str) and not Path(e).exists():
            raise ValueError(
                f"mixed[{i}] = {e!r} is neither an adapter of the model ({known}) nor an "
                "existing adapter directory"
            )
        _, kernels, saved = kernels_of(e)
        specs = [
            AdapterSpec(k.module, k.kernel, k.in_features, k.out_features, k.scale) for k in kernels
        ]
        if isinstance(e, (str, os.PathLike)):
            label, kind = Path(e).name or str(e), "saved"
        elif isinstance(e, SavedAdapter):
            label, kind = Path(e.path).name or str(e.path), "saved"
        else:
            label, kind = f"model_{i}", "model"
        entries.append(_MixedEntry(label, specs, saved, kind, e))
    for e in entries:
        outside = sorted({s.name for s in e.specs} - bca_modules)
        if outside:
            raise ValueError(
                f"mixed adapter {e.label!r} adapts module(s) {outside[:6]} that are not bca "
                f"layers of the model (its bca layers: {sorted(bca_modules)[:6]}); a mixed "
                "export locates layers through the model's own bca layers"
            )
    if names is not None:
        labels = [str(n) for n in names]
        if len(labels) != len(entries):
            raise ValueError(f"mixed_names has {len(labels)} names for {len(entries)} adapters")
        for e, label in zip(entries, labels, strict=True):
            e.label = label
    elif len({e.label for e in entries}) != len(entries):
        for e in entries:
            if e.kind == "saved":
                e.label = str(e.source.path if isinstance(e.source, SavedAdapter) else e.source)
    return entries


@contextlib.contextmanager
def _only_adapter(modules: list[Any], name: str) -> Iterator[None]:
    """Inside: every bca layer computes named adapter ``name`` alone (weight 1), or its base
    layer where it lacks it. Restored on exit."""
    saved = [
        (list(m.active_adapters), dict(m.adapter_weights), bool(m.adapter_enabled)) for m in modules
    ]
    try:
        for m in modules:
            m.set_adapter([name] if name in m.adapter_names else [])
            m.adapter_enabled = True
        yield
    finally:
        for m, (names, weights, enabled) in zip(modules, saved, strict=True):
            m.set_adapter(names, [weights.get(n, 1.0) for n in names])
            m.adapter_enabled = enabled


def _verify_mixed(
    path: Path,
    model: Any,
    entries: Sequence[_MixedEntry],
    modules: list[tuple[str, Any]],
    saved_params: Mapping[str, Any],
    heads: Mapping[str, np.ndarray],
    in_names: list[str],
    arg_names: list[str],
    args: tuple[Any, ...],
    as_kwargs: bool,
    out_names: list[str],
    tol: float,
) -> None:
    """Run the mixed graph with every index that has a torch reference (named adapters,
    torch models, the base model) for the whole batch, then one batch mixing them."""
    from ._mixed import mixed_layout

    torch = _torch()
    layout = mixed_layout(path)

    def run(m: Any) -> tuple[Any, ...]:
        was = m.training
        m.eval()
        try:
            with torch.no_grad():
                o = m(**dict(zip(arg_names, args, strict=True))) if as_kwargs else m(*args)
        finally:
            m.train(was)
        return _flatten_outputs(o)[1]

    bca = [m for _, m in modules]
    refs: dict[int, tuple[Any, ...]] = {}
    with _params_set(saved_params, heads):
        for a, e in enumerate(entries):
            if e.kind == "named":
                with _only_adapter(bca, e.source):
                    refs[a] = run(model)
            elif e.kind == "model":
                refs[a] = run(e.source)
        with _adapters_off(bca):
            refs[layout.base_index] = run(model)
    k = in_names.index(layout.batch_input) if layout.batch_input in in_names else 0
    batch = int(args[k].shape[0]) if args[k].dim() else 1
    for a, ref in refs.items():
        index = np.full(batch, a, dtype=np.int64)
        _verify(path, in_names, args, out_names, ref, tol, {layout.index_input: index}, f"slot {a}")
    slots = sorted(refs)
    rows_first = all(r.dim() and r.shape[0] == batch for ref in refs.values() for r in ref)
    if len(slots) > 1 and batch > 1 and rows_first:
        index = np.asarray([slots[(b + 1) % len(slots)] for b in range(batch)], dtype=np.int64)
        mixed_ref = tuple(
            torch.stack([refs[int(index[b])][j][b] for b in range(batch)])
            for j in range(len(out_names))
        )
        _verify(
            path, in_names, args, out_names, mixed_ref, tol, {layout.index_input: index}, "mixed"
        )


def _spectra_feeds(layout: ServableLayout, specs: Sequence[AdapterSpec]) -> dict[str, np.ndarray]:
    """Feeds of the exported specs' own spectra (every layer of the layout)."""
    from ._builder import lowered_spectra

    feeds = layout.zero_feeds()
    for spec in specs:
        layer = layout.layer(spec.name)
        g, _ = lowered_spectra(spec.kernel, spec.scale, lowering=layer.lowering)
        feeds[layer.parameter] = g.astype(layer.dtype)
    return feeds


def _out_in(w: Any, is_conv1d: bool) -> np.ndarray:
    a = w.detach().to("cpu").numpy()
    return np.ascontiguousarray(a.T if is_conv1d else a)


def _run_torch_export(
    wrapper: Any,
    args: tuple[Any, ...],
    path: Path,
    *,
    input_names: list[str],
    output_names: list[str],
    dynamic_axes: dict[str, dict[int, str]],
    opset: int,
    exporter: str,
) -> str:
    torch = _torch()
    errors: list[str] = []
    order = ["legacy", "dynamo"] if exporter == "auto" else [exporter]
    for kind in order:
        extra: dict[str, Any] = {}
        if kind == "legacy":
            extra = {"do_constant_folding": True, "dynamic_axes": dynamic_axes}
        else:  # dynamo wants dynamic_shapes; *args of the wrapper take a tuple
            dim = torch.export.Dim.AUTO
            extra = {
                "dynamic_shapes": (
                    tuple({d: dim for d in dynamic_axes.get(n, {})} or None for n in input_names),
                )
            }
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with (
                    open(os.devnull, "w") as null,
                    contextlib.redirect_stdout(null),
                    contextlib.redirect_stderr(null),
                ):
                    torch.onnx.export(
                        wrapper,
                        args,
                        str(path),
                        input_names=input_names,
                        output_names=output_names,
                        opset_version=opset,
                        dynamo=(kind == "dynamo"),
                        external_data=True,
                        **extra,
                    )
            return kind
        except Exception as e:  # torch raises many exception types here
            errors.append(f"{kind}: {type(e).__name__}: {str(e)[:600]}")
    raise RuntimeError("torch.onnx.export failed for the base model:\n" + "\n".join(errors))


def _fit_base_to_opset(
    model: onnx.ModelProto, opset: int, kind: str, fell_back: bool = False
) -> None:
    """Make the base graph torch exported a valid graph of the opset asked for, or raise a
    ``RuntimeError`` that says what to pass.

    torch's dynamo exporter works at opset 18 and converts the graph to the opset asked
    for; below 18 its optimizer then writes ``Split(num_outputs=n)`` (an opset-18 form,
    e.g. for GPT-2's q/k/v split) into the converted graph, which :func:`split_to_opset`
    rewrites into the opset-13 form. A conversion that failed leaves the graph at 18.
    """
    if kind != "dynamo":
        hint = "try another opset, or exporter='dynamo'"
    elif fell_back:
        hint = (
            "torch's legacy exporter failed on this model, so exporter='auto' used the dynamo "
            "exporter, which builds opset 18 graphs and converts them to the opset asked for: "
            "pass opset=18 or later"
        )
    else:
        hint = (
            "torch's dynamo exporter builds opset 18 graphs and converts them to the opset "
            "asked for: pass opset=18 or later, or exporter='legacy'"
        )
    got = graph_opset(model)
    if got != opset:
        raise RuntimeError(
            f"torch's {kind} exporter wrote a graph of opset {got}, not the opset {opset} "
            f"asked for. {hint}"
        )
    split_to_opset(model)
    if model.ByteSize() >= 2**31 - 1:
        return  # too large to check in memory; save_checked checks the file
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RuntimeError(
            f"torch's {kind} exporter wrote a base graph that is not valid at opset {opset} "
            f"({first}). {hint}"
        ) from e


def export_model(
    model: Any,
    path: str | os.PathLike[str],
    example_inputs: Any,
    *,
    mode: str = "auto",
    opset: int = DEFAULT_OPSET,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
    exporter: str = "auto",
    verify: bool = True,
    verify_tolerance: float = 1e-4,
    external_data: bool | None = None,
    progress: bool = False,
    servable: bool = False,
    servable_default: str = "zeros",
    servable_base: Any = None,
    mixed: Sequence[Any] | None = None,
    mixed_names: Sequence[str] | None = None,
) -> Path:
    """Export a torch model with bca adapters to ONNX.

    Args:
        model: a module containing :class:`bca.nn.BlockCirculantLinear` layers (from
            :func:`bca.model.inject_adapters` / ``load_adapter``), unmerged.
        path: output ``.onnx`` file.
        example_inputs: a tensor, a tuple of positional tensors, or a dict of keyword
            tensors (``{"input_ids": ..., "attention_mask": ...}``, the usual form for
            transformers models; keys become the ONNX input names). Give realistic
            inputs: torch's tracer may specialise on them (e.g. an all-ones attention
            mask lets transformers drop the mask from the traced graph).
        mode: ``"dft"`` (ONNX DFT op), ``"matmul"`` (constant DFT matrices),
            ``"matmul2"`` (the same in two stages, p = a b), ``"auto"`` (per layer, see
            :func:`choose_lowering`): ``y = base(x) + adapter(x)`` with
            the base weights untouched and the kernel spectra stored as initializers;
            ``"folded"``: ``W + scale ΔW`` merged into the base weights (no runtime
            overhead, no separate adapter).
        opset: default-domain opset (>= 17 for ``"dft"``; 17 and 20+ tested).
        input_names / output_names: ONNX names (defaults: dict keys or ``input_<i>``;
            output dict keys or ``output_<i>``).
        dynamic_axes: as in ``torch.onnx.export``; default: dims 0, 1 (batch,
            sequence) of integer inputs and all but the last dim of float inputs.
        exporter: ``"legacy"`` (TorchScript-based ``torch.onnx.export(dynamo=False)``),
            ``"dynamo"``, or ``"auto"`` (legacy, then dynamo if it fails).
        verify: run the exported model in onnxruntime on ``example_inputs`` and compare
            each output with torch's (norm-relative error <= ``verify_tolerance``);
            raises ``RuntimeError`` on a mismatch.
        external_data: as in :func:`patch_model`.
        progress: one tqdm bar on stderr (terminals only, cleared when done); a library
            call prints nothing by default.
        servable: export a servable graph (docs/onnx.md, "Serving many adapters"): each
            adapted layer's kernel spectra become an overridable initializer
            ``bca.<module name>.spectra`` (an initializer that is also a graph input), so
            one session serves many adapters; the layout is recorded in the model's
            ``metadata_props`` (:func:`servable_layout`). Not with ``mode="folded"``. Fully
            trained parameters (``modules_to_save``, e.g. a classifier head) become
            overridable initializers ``bca.modules_to_save.<parameter name>`` too (as the
            exporter stores them, possibly transposed); they need ``servable_base``.
        servable_default: the stored values: ``"zeros"`` (zero spectra and the base
            values of the fully trained parameters: the graph computes the base model
            unless an adapter is supplied) or ``"adapter"`` (this model's spectra and fully
            trained parameters). ``verify`` then checks both the default (against the base
            model for ``"zeros"``) and the graph fed with this model's spectra and
            parameters (against the model).
        servable_base: for a model with ``modules_to_save`` and ``servable=True``: the base
            model (a torch module) or a mapping holding at least the base values of those
            parameters by name (e.g. the base model's ``state_dict()``): served to adapters
            without them and for the base model.

        mixed: make a mixed-adapter graph (docs/onnx.md, "Mixed-adapter batches") of these
            adapters: each entry is the name of a named adapter of ``model``
            (:func:`bca.model.add_adapter`), a :func:`bca.model.save_adapter` directory (a
            ``pathlib.Path``, or a string that is not an adapter name of the model), a
            :class:`SavedAdapter` or a torch model with bca adapters on the same base
            (its active adapters). The graph gets an int64 input ``bca.adapter_index`` of
            shape ``(batch,)``: batch row ``b`` is computed with ``mixed[index[b]]``, or as
            the base model for ``index[b] == len(mixed)``. Every module an entry adapts must
            be a bca layer of ``model`` (that is how it is located); bca layers no entry
            adapts compute their base layer. Entries of one module must share block size,
            widths and kernel dtype; their fully trained parameters (``modules_to_save``; a
            named adapter carries the model's) must be equal or absent (one graph holds one
            head). ``verify`` checks every slot it has a torch reference for (named adapters,
            torch models, the base model) and one batch mixing them. Not with
            ``servable=True`` or ``mode="folded"``.
        mixed_names: the entries' names in the mixed layout (default: an adapter's name,
            a directory's name, ``"model_<i>"`` for a torch model).

    Returns the path written. The model is left as it was (weights, merge state).
    """
    torch = _torch()
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if exporter not in ("auto", "legacy", "dynamo"):
        raise ValueError(f"exporter must be 'auto', 'legacy' or 'dynamo', got {exporter!r}")
    if isinstance(opset, bool) or not isinstance(opset, int):
        raise TypeError(f"opset must be an int, got {type(opset).__name__}")
    need = MIN_OPSET["dft"] if mode == "dft" else 13
    if opset < need:
        raise ValueError(f"opset {opset} is too old for mode={mode!r}: it needs opset >= {need}")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if mixed is not None:
        if servable:
            raise ValueError("mixed=[...] and servable=True cannot be combined")
        if mode == "folded":
            raise ValueError("mixed=[...] needs the adapters as subgraphs, not mode='folded'")
    elif mixed_names is not None:
        raise ValueError("mixed_names needs mixed=[...]")
    if servable:
        check_servable_default(servable_default)
        if mode == "folded":
            raise ValueError("servable=True needs the adapters as subgraphs, not mode='folded'")
    saved_params: dict[str, Any] = {}
    saved_base: dict[str, np.ndarray] = {}
    if servable:
        from ..model import modules_to_save_parameters

        saved_params = dict(modules_to_save_parameters(model))
        if saved_params:
            saved_base = _base_saved_values(saved_params, servable_base)
    modules = _adapter_modules(model)
    if not modules:
        raise ValueError(
            "model has no bca adapters (BlockCirculantLinear layers); use torch.onnx.export "
            "for a plain model"
        )
    for name, m in modules:
        if m.merged:
            raise ValueError(
                f"adapter {name!r} is merged into its base weight; unmerge it first "
                "(mode='folded' exports merged weights by itself)"
            )
    entries: list[_MixedEntry] = []
    if mixed is not None:
        # every bca layer is exported as its base layer, tagged and located; the entries'
        # adapters are spliced in as mixed subgraphs
        entries = _mixed_entries(model, mixed, mixed_names, {n for n, _ in modules})
        from ._patch import mixed_heads

        heads = mixed_heads([e.label for e in entries], [e.heads for e in entries])
        model_params = _modules_to_save_of(model)
        missing = sorted(set(heads) - set(model_params))
        if missing:
            raise ValueError(
                f"the mixed adapters have fully trained parameters {missing[:6]} "
                "(modules_to_save) that the model does not train; export from a model with "
                "those modules_to_save"
            )
        saved_params = {n: model_params[n] for n in heads}
        saved_base = heads
    else:
        # adapters switched off (adapter_enabled=False) are not part of the model's
        # function: they are exported as plain base layers
        modules = [(n, m) for n, m in modules if getattr(m, "adapter_enabled", True)]
        # so are layers with no active adapter (named adapters, bca.model.set_adapter)
        modules = [(n, m) for n, m in modules if m.active_adapters]
        if not modules:
            raise ValueError("no adapter of the model is enabled and active; nothing to export")

    as_kwargs = isinstance(example_inputs, Mapping)
    if as_kwargs:
        arg_names = list(example_inputs.keys())
        args = tuple(example_inputs.values())
    elif isinstance(example_inputs, torch.Tensor):
        arg_names, args = ["input"], (example_inputs,)
    elif isinstance(example_inputs, (tuple, list)):
        args = tuple(example_inputs)
        arg_names = [f"input_{i}" for i in range(len(args))]
    else:
        raise TypeError(
            "example_inputs must be a tensor, a tuple of tensors or a dict of tensors, got "
            f"{type(example_inputs).__name__}"
        )
    if not all(isinstance(a, torch.Tensor) for a in args):
        raise TypeError("example_inputs must hold tensors only")
    in_names = list(input_names) if input_names is not None else arg_names
    if len(in_names) != len(args):
        raise ValueError(f"input_names has {len(in_names)} names for {len(args)} inputs")
    axes = (
        {k: dict(v) for k, v in dynamic_axes.items()}
        if dynamic_axes is not None
        else _default_dynamic_axes(in_names, args)
    )

    was_training = model.training
    model.eval()
    steps = ["export base", "locate layers", "splice adapters", "save + check", "verify"]
    bar = None
    if progress:
        from tqdm.auto import tqdm  # type: ignore[import-untyped]

        bar = tqdm(total=len(steps), desc="bca export", unit="step", disable=None, leave=False)

    def step(label: str) -> None:
        if bar is not None:
            bar.set_postfix_str(label)
            bar.update(1)

    try:
        with torch.no_grad():
            reference = (
                model(**dict(zip(arg_names, args, strict=True))) if as_kwargs else model(*args)
            )
        ref_names, ref_out = _flatten_outputs(reference)
        out_names = list(output_names) if output_names is not None else ref_names
        if len(out_names) != len(ref_out):
            raise ValueError(f"output_names has {len(out_names)} names for {len(ref_out)} outputs")
        wrapper = _make_wrapper(model, arg_names, as_kwargs)
        folded = mode == "folded"
        saved_tags = _tags(saved_params)
        with tempfile.TemporaryDirectory() as tmp:
            tmp_path = Path(tmp) / "base.onnx"
            with (
                _export_state(modules, folded) as tags,
                _params_set(saved_params, saved_tags),
            ):
                kind = _run_torch_export(
                    wrapper,
                    args,
                    tmp_path,
                    input_names=in_names,
                    output_names=out_names,
                    dynamic_axes=axes,
                    opset=opset,
                    exporter=exporter,
                )
            onnx_model = onnx.load(str(tmp_path))
        _fit_base_to_opset(onnx_model, opset, kind, fell_back=kind != exporter)
        step("locate")
        if not folded:
            sites = find_linear_sites(onnx_model)
            specs: list[AdapterSpec] = []
            targets: dict[str, str] = {}
            for name, m in modules:
                found = match_by_values(onnx_model, sites, _out_in(tags[name], m.is_conv1d))
                if len(found) != 1:
                    raise TargetNotFoundError(
                        f"could not locate the MatMul/Gemm of adapted layer {name!r} in the "
                        f"exported graph ({len(found)} candidates); try exporter='legacy' or "
                        "'dynamo', or mode='folded'"
                    )
                site = found[0]
                w = _out_in(m.base_layer.weight, m.is_conv1d)
                replace_initializer(onnx_model, site.weight_name, w.T if site.weight_in_out else w)
                targets[name] = site.weight_name
                if entries:
                    continue
                # the active adapters (weighted) as one kernel; several active adapters of
                # different block sizes raise here (mode='folded' handles them)
                live = m.combined_kernel()
                assert live is not None  # filtered above: enabled, active, not merged
                kernel, scale = live
                specs.append(
                    AdapterSpec(
                        name,
                        kernel.detach().to("cpu").numpy(),
                        m.in_features,
                        m.out_features,
                        float(scale),
                    )
                )
        if not folded and entries:
            step("splice")
            # one head for every slot: the adapters' common fully trained parameters
            for pname, (init, transposed) in _locate_tags(onnx_model, saved_tags).items():
                v = np.asarray(saved_base[pname])
                replace_initializer(onnx_model, init, v.T if transposed else v)
            from ._mixed import add_mixed_adapters

            used = {spec.name for e in entries for spec in e.specs}
            add_mixed_adapters(
                onnx_model,
                [e.specs for e in entries],
                names=[e.label for e in entries],
                lowering=mode,
                targets={k: v for k, v in targets.items() if k in used},
                progress=False,  # the one bar is export_model's
            )
        elif not folded:
            slots: list[SavedSlot] = []
            saved_own: dict[str, np.ndarray] = {}
            for pname, (init, transposed) in _locate_tags(onnx_model, saved_tags).items():
                own = saved_params[pname].detach().to("cpu").numpy().copy()
                saved_own[pname] = own
                base_v = saved_base[pname]
                slots.append(
                    SavedSlot(
                        pname,
                        init,
                        transposed,
                        own.T if transposed else own,
                        base_v.T if transposed else base_v,
                    )
                )
            step("splice")
            add_adapters(
                onnx_model,
                specs,
                lowering=mode,
                targets=targets,
                progress=False,  # the one bar is export_model's
                servable=servable,
                servable_default=servable_default,
                servable_saved=slots,
            )
        else:
            step("splice")
        onnx_model.producer_name = "bca"
        # torch's dynamo exporter stamps IR 10 whatever the opset; onnxruntime 1.17 reads
        # up to IR 9: declare the lowest IR version the opset (and the graph) needs
        lower_ir_version(onnx_model)
        out = save_checked(onnx_model, path, external_data=external_data)
        step("save")
        if verify and entries:
            _verify_mixed(
                out, model, entries, modules, saved_params, saved_base, in_names, arg_names,
                args, as_kwargs, out_names, verify_tolerance,
            )  # fmt: skip
        elif verify and not servable:
            _verify(out, in_names, args, out_names, ref_out, verify_tolerance)
        elif verify:
            layout = servable_layout(out)
            own = _spectra_feeds(layout, specs)
            for x in layout.saved:
                v = saved_own[x.name]
                own[x.initializer] = np.ascontiguousarray(
                    (v.T if x.transposed else v).astype(x.dtype)
                )
            # the graph fed with this model's spectra (and parameters) is the model
            _verify(out, in_names, args, out_names, ref_out, verify_tolerance, own, "fed")
            base_out: tuple[Any, ...] = ()
            if servable_default == "zeros" or layout.saved:
                model.eval()
                with (
                    torch.no_grad(),
                    _adapters_off([m for _, m in modules]),
                    _params_set(saved_params, saved_base),
                ):
                    base_out = _flatten_outputs(
                        model(**dict(zip(arg_names, args, strict=True)))
                        if as_kwargs
                        else model(*args)
                    )[1]
            if servable_default == "zeros":  # its default is the base model
                _verify(out, in_names, args, out_names, base_out, verify_tolerance, {}, "default")
            else:
                _verify(out, in_names, args, out_names, ref_out, verify_tolerance, {}, "default")
                if layout.saved:  # and its base feeds are the base model
                    _verify(
                        out,
                        in_names,
                        args,
                        out_names,
                        base_out,
                        verify_tolerance,
                        layout.base_feeds(),
                        "base",
                    )
        step("verify")
        return out
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)


def _verify(
    path: Path,
    in_names: list[str],
    args: tuple[Any, ...],
    out_names: list[str],
    ref_out: tuple[Any, ...],
    tol: float,
    extra_feeds: Mapping[str, np.ndarray] | None = None,
    what: str = "",
) -> None:
    import onnxruntime as ort  # type: ignore[import-untyped]

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    present = {i.name for i in sess.get_inputs()}
    feed = {
        n: a.detach().cpu().numpy() for n, a in zip(in_names, args, strict=True) if n in present
    }
    feed.update(extra_feeds or {})
    got = sess.run(out_names, feed)
    label = {
        "fed": " (fed the model's own spectra)",
        "default": " (default spectra)",
        "base": " (fed the base model's spectra and parameters)",
        "mixed": " (mixed graph, one batch mixing its adapters)",
    }.get(what, f" (mixed graph, every row on {what})" if what else "")
    for name, g, r in zip(out_names, got, ref_out, strict=True):
        want = r.detach().to("cpu").double().numpy()
        den = max(float(np.linalg.norm(want)), 1e-30)
        err = float(np.linalg.norm(np.asarray(g, np.float64) - want)) / den
        if not np.isfinite(err) or err > tol:
            hint = (
                "The base exporter may have specialised the graph on example_inputs; try other "
                "example inputs or exporter='dynamo'"
            )
            torch = _torch()
            if r.dtype in (torch.float16, torch.bfloat16):
                # torch and onnxruntime round half-precision results independently
                eps = float(torch.finfo(r.dtype).eps)
                hint = (
                    f"The output is {str(r.dtype).removeprefix('torch.')}: torch and onnxruntime "
                    f"round it independently (machine epsilon {eps:.3g}), so errors of that "
                    "order are expected; pass a verify_tolerance suited to it (a few times "
                    f"{eps:.3g}) or verify=False. For larger errors: {hint}"
                )
            raise RuntimeError(
                f"exported model's output {name!r}{label} differs from torch's: norm-relative "
                "error "
                f"{err:.3g} > {tol:g} (file kept at {str(path)!r}). {hint}"
            )
