"""Adapters to per-run spectra: a saved adapter, a torch model or a weighted list of
them, checked against a servable graph's layout, as the arrays its overridable
initializers take (:func:`adapter_feeds`)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np

from ._builder import lowered_spectra
from ._io import SavedAdapter, read_adapter

if TYPE_CHECKING:  # pragma: no cover
    import torch
from ._layout import (
    ServableLayer,
    ServableLayout,
    ServableSource,
    servable_layout,
)

AdapterSource: TypeAlias = "str | os.PathLike[str] | SavedAdapter | torch.nn.Module"


"""One adapter: a :func:`bca.model.save_adapter` directory, a :class:`SavedAdapter`, or a
torch model with bca adapters."""


AdapterInput: TypeAlias = "AdapterSource | Sequence[tuple[AdapterSource, float]]"


"""One adapter, or a weighted list ``[(adapter, weight), ...]`` (their weighted sum)."""


@dataclass
class Kernel:
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


def kernels_of(adapter: object) -> tuple[str, list[Kernel], dict[str, np.ndarray]]:
    """(description, kernels, fully trained parameters) of one adapter source."""
    if isinstance(adapter, (str, os.PathLike)):
        adapter = read_adapter(adapter)
    if isinstance(adapter, SavedAdapter):
        label = _describe_source(adapter)
        kernels = [
            Kernel(s.name, np.asarray(s.kernel), float(s.scale), s.in_features, s.out_features)
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


def _torch_kernels(model: Any) -> list[Kernel]:
    from ..model import adapter_modules

    label = _describe_source(model)
    out: list[Kernel] = []
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
            Kernel(
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


_Term: TypeAlias = "tuple[str, list[Kernel], dict[str, np.ndarray], float]"


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
            label, kernels, saved = kernels_of(src)
            if saved:
                raise ValueError(
                    f"{label} has fully trained parameters (modules_to_save: "
                    f"{sorted(saved)[:4]}); a weighted combination of adapters adds up their "
                    "circulant adapters only, and a weighted sum of heads is not the combined "
                    "model: serve such an adapter on its own"
                )
            terms.append((label, kernels, saved, float(weight)))
        return terms
    label, kernels, saved = kernels_of(adapter)
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


def _check_kernel_fits(label: str, k: Kernel, layer: ServableLayer) -> None:
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
