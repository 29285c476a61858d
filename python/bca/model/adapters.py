"""Named adapters on a model: add, activate (weighted), delete, disable, mixed batches,
serving with trusted kernels."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from torch import nn

from .._errors import BcaError
from ..nn import BASE_ADAPTER, BlockCirculantLinear
from ..nn.layer import check_adapter_name
from .config import (
    BCAConfig,
)
from .inject import (
    adapter_modules,
    adapter_names,
    add_to_layers,
    configs_of,
    freeze_base,
    inject_adapters,
    match_targets,
    replace_module,
)


def check_names(model: nn.Module, adapter_names: str | Sequence[str] | None) -> list[str] | None:
    if adapter_names is None:
        return None
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    known = _all_adapter_names(model)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise BcaError(f"unknown adapters {unknown}; the model has {known}")
    if len(set(names)) != len(names):
        raise BcaError(f"adapter_names has duplicates: {names}")
    return names


_all_adapter_names = adapter_names  # for functions whose argument shadows the name


def on_layer(
    module: BlockCirculantLinear, names: list[str], ws: list[float], *, skip_merged: bool = False
) -> tuple[list[str], list[float]]:
    """The named adapters (and their weights) that ``module`` carries, in order."""
    pairs = [
        (n, w)
        for n, w in zip(names, ws, strict=True)
        if n in module.adapter_names and not (skip_merged and n in module.merged_adapters)
    ]
    return [n for n, _ in pairs], [w for _, w in pairs]


def adapter_weights(names: list[str], weights: Sequence[float] | None) -> list[float]:
    if weights is None:
        return [1.0] * len(names)
    ws = [float(w) for w in weights]
    if len(ws) != len(names):
        raise BcaError(f"weights has {len(ws)} entries for {len(names)} adapters")
    if not all(math.isfinite(w) for w in ws):
        raise BcaError(f"weights must be finite, got {ws}")
    return ws


def add_adapter(
    model: nn.Module, adapter_name: str, config: BCAConfig, *, activate: bool = False
) -> nn.Module:
    """Add another named adapter to the layers ``config.target_modules`` selects.

    Layers already adapted get a second kernel; plain layers are wrapped. The new adapter
    is not active unless ``activate=True`` (then it is added to the active set). Its
    kernels are trainable only once active (see :func:`set_adapter`). ``modules_to_save``
    cannot be combined with named adapters (the modules would be shared between
    adapters): use it with a single adapter.
    """
    if not isinstance(config, BCAConfig):
        raise TypeError(f"config must be a BCAConfig, got {type(config).__name__}")
    check_adapter_name(adapter_name)
    existing = adapter_names(model)
    if not existing:
        return inject_adapters(model, config, adapter_name=adapter_name)
    if adapter_name in existing:
        raise BcaError(f"model already has an adapter {adapter_name!r}")
    configs = configs_of(model)
    if config.modules_to_save or any(c.modules_to_save for c in configs.values()):
        raise BcaError(
            "modules_to_save cannot be combined with several named adapters (the fully "
            "trained modules would be shared between them)"
        )
    matched = match_targets(model, config)
    add_to_layers(
        model,
        {n: config.block_size_for(n) for n in matched},
        config,
        adapter_name,
        activate=activate,
    )
    configs[adapter_name] = config
    if activate:
        freeze_base(model)
    else:
        for _, module in adapter_modules(model):
            if adapter_name in module.adapter_names:
                module.bca_kernels[adapter_name].requires_grad_(False)
    return model


def set_adapter(
    model: nn.Module,
    adapter_names: str | Sequence[str],
    weights: Sequence[float] | None = None,
    *,
    trainable: bool = True,
) -> nn.Module:
    """Make ``adapter_names`` the active adapters of every layer, optionally weighted.

    A layer's output becomes ``base(x) + Σ_a w_a · scale_a · ΔW_a x`` over the named
    adapters it has (layers without any of them compute their base layer). With
    ``trainable=True`` the active kernels become trainable and the others frozen (as
    :func:`freeze_base`). ``[]`` deactivates all (the base model).
    """
    names = check_names(model, adapter_names) or []
    ws = adapter_weights(names, weights)
    for _, module in adapter_modules(model):
        module.set_adapter(*on_layer(module, names, ws))
    if trainable:
        freeze_base(model)
    return model


def delete_adapter(model: nn.Module, adapter_name: str) -> nn.Module:
    """Remove a named adapter everywhere; layers left without adapters become plain again."""
    check_names(model, adapter_name)
    modules = [(n, m) for n, m in adapter_modules(model) if adapter_name in m.adapter_names]
    merged = [n for n, m in modules if adapter_name in m.merged_adapters]
    if merged:
        raise BcaError(f"adapter {adapter_name!r} is merged in {merged}; unmerge first")
    for name, module in modules:
        module.delete_adapter(adapter_name)
        if not module.adapter_names:
            replace_module(model, name, module.base_layer)
    configs = configs_of(model)
    configs.pop(adapter_name, None)
    if configs:
        model.bca_config = next(iter(configs.values()))  # type: ignore[assignment]
    else:
        for attr in ("bca_config", "bca_configs"):
            if hasattr(model, attr):
                delattr(model, attr)
    return model


def set_adapters_enabled(model: nn.Module, enabled: bool) -> nn.Module:
    """Switch every adapter off (``False``: the base model) or back on."""
    for _, module in adapter_modules(model):
        module.adapter_enabled = enabled
    return model


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """``with adapters_disabled(model):`` runs the base model, then restores the state."""
    modules = [m for _, m in adapter_modules(model)]
    merged = [m for m in modules if m.merged]
    if merged:
        raise BcaError("adapters are merged into the base weights; unmerge before disabling")
    before = [m.adapter_enabled for m in modules]
    try:
        for m in modules:
            m.adapter_enabled = False
        yield model
    finally:
        for m, b in zip(modules, before, strict=True):
            m.adapter_enabled = b


@contextmanager
def trusted_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """``with trusted_adapters(model): serve(model)`` skips the per-call kernel check.

    By default every call compares each adapter's kernel with the copy its cached
    spectra were made from, bit for bit, so that any edit is seen, even one through
    ``.data`` or a numpy view. That reads each kernel twice per call: at d = 4096 and
    p = 64, 8 adapters are 16 MB per call, more than the product itself costs. Inside the
    block each adapter's cache is frozen (:meth:`bca.nn.KernelCache.freeze`): once a call
    has taken a kernel, later calls trust it while it is the same parameter object with
    the same address, strides, dtype, shape and version counter. Optimizer steps,
    ``load_state_dict``, :func:`load_adapter`, ``copy_`` and other in-place edits of the
    parameter bump that counter, a new tensor or Parameter changes the rest, and every
    ``torch.optim`` step (fused ones too, which bump no version counter) is counted by a
    global post-step hook: all still seen. Edits through ``.data``, numpy or other shared
    memory are **not** seen until the block ends (the next call then compares again) or
    ``clear_cache()``. Results are bit for bit
    those of the checked path. Adapters added inside the block are not trusted; blocks
    nest. See docs/torch.md, "Serving: trusted kernels".
    """
    states = [st for _, m in adapter_modules(model) for st in m._adapters.values()]
    frozen = []
    try:
        for st in states:
            st.freeze()
            frozen.append(st)
        yield model
    finally:
        for st in frozen:
            st.unfreeze()


@contextmanager
def mixed_adapter_batch(model: nn.Module, adapter_names: Sequence[str]) -> Iterator[nn.Module]:
    """``with mixed_adapter_batch(model, names): model(batch)`` runs a mixed batch.

    Row ``b`` of every batch the model sees inside the block (the first axis of each
    adapted layer's input) uses adapter ``adapter_names[b]`` alone (``"__base__"``: the
    base model), whatever the active set; as PEFT's ``adapter_names=`` argument, through
    forward pre-hooks that pass ``adapter_names`` to every adapted layer, removed on exit.
    A layer that does not carry a named adapter computes its base layer for that row.
    Unknown names, and models with merged adapters, raise ``ValueError``.
    """
    if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence):
        raise TypeError(
            "adapter_names must be a list of adapter names, one per batch row, got "
            f"{type(adapter_names).__name__}"
        )
    names = list(adapter_names)
    known = _all_adapter_names(model)
    unknown = sorted({str(n) for n in names if n != BASE_ADAPTER and n not in known})
    if unknown:
        raise BcaError(
            f"unknown adapters {unknown} in adapter_names; the model has {known} "
            f"({BASE_ADAPTER!r}: no adapter)"
        )
    modules = [m for _, m in adapter_modules(model)]
    merged = sorted({n for m in modules for n in m.merged_adapters})
    if merged:
        raise BcaError(
            f"adapters {merged} are merged into the base weights; unmerge before running a "
            "mixed batch"
        )
    handles = []

    def hook_for(layer_names: list[str]) -> Any:
        def hook(
            module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
        ) -> tuple[tuple[Any, ...], dict[str, Any]]:
            return args, {**kwargs, "adapter_names": layer_names}

        return hook

    try:
        for m in modules:
            layer_names = [n if n in m.adapter_names else BASE_ADAPTER for n in names]
            handles.append(m.register_forward_pre_hook(hook_for(layer_names), with_kwargs=True))
        yield model
    finally:
        for h in handles:
            h.remove()
