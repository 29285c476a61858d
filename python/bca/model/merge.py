"""Merging adapters into the base weights, unmerging, and unloading."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from .adapters import (
    adapter_weights,
    check_names,
    on_layer,
)
from .inject import (
    adapter_modules,
    replace_module,
)


def merge_adapters(
    model: nn.Module,
    adapter_names: str | Sequence[str] | None = None,
    weights: Sequence[float] | None = None,
    *,
    exact_unmerge: bool = True,
) -> nn.Module:
    """Fold adapters into the base weights: ``W += Σ_a w_a · scale_a · ΔW_a``.

    ``adapter_names=None`` merges each layer's active adapters with their weights;
    otherwise the named adapters (on the layers that have them) with ``weights``
    (default 1.0 each). See :meth:`BlockCirculantLinear.merge`.
    """
    names = check_names(model, adapter_names)
    ws = adapter_weights(names, weights) if names is not None else []
    for _, module in adapter_modules(model):
        if names is None:
            if module.active_adapters and not all(
                a in module.merged_adapters for a in module.active_adapters
            ):
                module.merge(exact_unmerge=exact_unmerge)
            continue
        here, here_ws = on_layer(module, names, ws, skip_merged=True)
        if here:
            module.merge(exact_unmerge=exact_unmerge, adapter_names=here, weights=here_ws)
    return model


def unmerge_adapters(model: nn.Module) -> nn.Module:
    """Undo :func:`merge_adapters` (bit-exact by default)."""
    for _, module in adapter_modules(model):
        if module.merged:
            module.unmerge()
    return model


def merge_and_unload(
    model: nn.Module,
    adapter_names: str | Sequence[str] | None = None,
    weights: Sequence[float] | None = None,
) -> nn.Module:
    """Merge adapters (the active ones by default) and put the plain base layers back."""
    names = check_names(model, adapter_names)
    ws = adapter_weights(names, weights) if names is not None else []
    for name, module in list(adapter_modules(model)):
        if module.merged:
            module.unmerge()
        if names is None:
            if module.active_adapters:
                module.merge(exact_unmerge=False)
        else:
            here, here_ws = on_layer(module, names, ws)
            if here:
                module.merge(exact_unmerge=False, adapter_names=here, weights=here_ws)
        replace_module(model, name, module.base_layer)
    for attr in ("bca_config", "bca_configs"):
        if hasattr(model, attr):
            delattr(model, attr)
    return model
