"""Injecting adapters into a model, freezing the base, parameter groups and counts."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, NamedTuple

from torch import nn

from .._errors import BcaError, ShapeError
from ..nn import DEFAULT_ADAPTER, BlockCirculantLinear
from ..nn.layer import check_adapter_name, is_supported_layer
from .config import (
    BCAConfig,
    entry_matches,
    name_matches,
)


def adapter_modules(model: nn.Module) -> Iterator[tuple[str, BlockCirculantLinear]]:
    """``(name, module)`` for every :class:`BlockCirculantLinear` in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, BlockCirculantLinear):
            yield name, module


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _linear_names(model: nn.Module, limit: int = 12) -> str:
    names = sorted(
        {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and is_supported_layer(m)}
    )
    shown = ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")
    return shown or "(none)"


def _candidate_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Named submodules, skipping everything inside an existing adapter."""
    inside: list[str] = []
    for name, module in model.named_modules():
        if not name:
            continue
        if any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(module, BlockCirculantLinear):
            inside.append(name)
        yield name, module


def add_to_layers(
    model: nn.Module,
    sizes: dict[str, int],
    config: BCAConfig,
    adapter_name: str = DEFAULT_ADAPTER,
    *,
    activate: bool = True,
) -> dict[str, BlockCirculantLinear]:
    """Add adapter ``adapter_name`` to the named layers (wrapping plain ones).

    All layers are checked before any is changed. With ``activate=False`` the adapter is
    added but not made active (newly wrapped layers then have no active adapter).
    """
    created: dict[str, BlockCirculantLinear] = {}
    extended: list[tuple[BlockCirculantLinear, int]] = []
    for name, p in sizes.items():
        module = model.get_submodule(name)
        if isinstance(module, BlockCirculantLinear):
            if adapter_name in module.adapter_names:
                raise BcaError(f"module {name!r} already has an adapter {adapter_name!r}")
            if not module.pad and (module.in_features % p or module.out_features % p):
                raise ShapeError(
                    f"module {name!r}: block_size={p} does not divide (in_features="
                    f"{module.in_features}, out_features={module.out_features}) and pad=False"
                )
            extended.append((module, p))
        else:
            created[name] = BlockCirculantLinear(
                module,
                p,
                scale=config.scale,
                init=config.init,
                backend=config.backend,
                pad=config.pad,
                adapter_name=adapter_name,
            )
            if not activate:
                created[name].set_adapter([])
    for module, p in extended:
        module.add_adapter(adapter_name, p, scale=config.scale, init=config.init)
        if activate:
            module.set_adapter([*module.active_adapters, adapter_name])
    for name, layer in created.items():
        replace_module(model, name, layer)
    return created


def match_modules_to_save(model: nn.Module, config: BCAConfig) -> list[str]:
    names: list[str] = []
    for entry in config.modules_to_save:
        hits = [n for n, _ in _candidate_modules(model) if entry_matches(n, entry)]
        hits = [n for n in hits if not any(n.startswith(h + ".") for h in hits)]
        if not hits:
            raise BcaError(
                f"modules_to_save entry {entry!r} matches no module of {type(model).__name__}"
            )
        names.extend(h for h in hits if h not in names)
    return names


def inject_adapters(
    model: nn.Module,
    config: BCAConfig,
    *,
    freeze: bool = True,
    adapter_name: str = DEFAULT_ADAPTER,
) -> nn.Module:
    """Replace the layers named by ``config.target_modules`` with adapted layers, in place.

    Every matched module must be an ``nn.Linear`` or transformers ``Conv1D``; every list
    entry of ``target_modules`` must match something. The config is stored as
    ``model.bca_config`` (and ``model.bca_configs[adapter_name]``); the new adapter is
    active. With ``freeze=True`` (default) only the kernels and ``modules_to_save`` stay
    trainable (see :func:`freeze_base`). Further named adapters: :func:`add_adapter`.

    Returns:
        ``model`` itself.

    Raises:
        ValueError: a target entry matches no module, or the model already has adapters,
            or a shape that the block size does not divide with ``pad=False``.
        TypeError: a matched module is not a supported layer type.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(config, BCAConfig):
        raise TypeError(f"config must be a BCAConfig, got {type(config).__name__}")
    check_adapter_name(adapter_name)
    if any(True for _ in adapter_modules(model)):
        raise BcaError(
            "model already has bca adapters; inject_adapters runs once per model (use "
            "add_adapter for another named adapter)"
        )
    matched = match_targets(model, config)
    save_names = match_modules_to_save(model, config)
    overlap = [n for n in matched if any(n == s or n.startswith(s + ".") for s in save_names)]
    if overlap:
        raise BcaError(f"modules {overlap} are both adapted and in modules_to_save")
    add_to_layers(model, {n: config.block_size_for(n) for n in matched}, config, adapter_name)
    model.bca_config = config  # type: ignore[assignment]
    model.bca_configs = {adapter_name: config}  # type: ignore[assignment]
    if freeze:
        freeze_base(model)
    return model


def match_targets(model: nn.Module, config: BCAConfig) -> list[str]:
    """Names of the layers ``config.target_modules`` selects (adapted layers included)."""
    targets = config.target_modules
    matched: list[str] = []
    entry_hits: dict[str, int] = {t: 0 for t in targets} if isinstance(targets, list) else {}
    for name, module in _candidate_modules(model):
        if not name_matches(name, targets):
            continue
        if not is_supported_layer(module) and not isinstance(module, BlockCirculantLinear):
            raise TypeError(
                f"target module {name!r} is a {type(module).__name__}; bca adapts nn.Linear "
                "and transformers Conv1D layers only (name the linear layers inside it)"
            )
        matched.append(name)
        for t in entry_hits:
            if entry_matches(name, t):
                entry_hits[t] += 1
    missing = [t for t, n in entry_hits.items() if n == 0]
    if missing or not matched:
        what = missing if missing else [targets]
        raise BcaError(
            f"target_modules {what} match no module of {type(model).__name__}; "
            f"linear layers it has: {_linear_names(model)}"
        )
    return matched


def get_bca_model(model: nn.Module, config: BCAConfig) -> nn.Module:
    """Alias of :func:`inject_adapters` (for users coming from ``peft.get_peft_model``)."""
    return inject_adapters(model, config)


def config_of(model: nn.Module) -> BCAConfig:
    config = getattr(model, "bca_config", None)
    if not isinstance(config, BCAConfig):
        raise BcaError("model has no bca adapters (no model.bca_config); call inject_adapters")
    return config


def modules_to_save_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    config = getattr(model, "bca_config", None)
    if not isinstance(config, BCAConfig) or not config.modules_to_save:
        return {}
    names = match_modules_to_save(model, config)
    return {
        pname: param
        for pname, param in model.named_parameters()
        if any(pname.startswith(n + ".") for n in names)
    }


def freeze_base(model: nn.Module) -> nn.Module:
    """Make only the active adapters' kernels and ``modules_to_save`` trainable.

    Kernels of inactive named adapters are frozen too (as in PEFT), so an optimizer built
    afterwards trains the active adapter(s) only.
    """
    keep = set(modules_to_save_parameters(model))
    trainable: set[int] = set()
    for _, module in adapter_modules(model):
        for adapter in module.active_adapters:
            trainable.add(id(module.bca_kernels[adapter]))
    for name, param in model.named_parameters():
        param.requires_grad_(id(param) in trainable or name in keep)
    return model


def parameter_groups(
    model: nn.Module,
    lr: float,
    *,
    weight_decay: float = 0.0,
    kernel_weight_decay: float | None = None,
    divide_by_block_size: bool = True,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups implementing the BCA paper's learning-rate heuristic.

    Each kernel of block size ``p`` gets ``lr / p`` (one group per distinct ``p``); fully
    trained modules (``modules_to_save``) and any other trainable parameter get ``lr``.
    Only parameters with ``requires_grad`` are included.
    """
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise BcaError(f"lr must be a positive float, got {lr!r}")
    kwd = weight_decay if kernel_weight_decay is None else kernel_weight_decay
    by_p: dict[int, list[nn.Parameter]] = {}
    kernel_ids: set[int] = set()
    for _, module in adapter_modules(model):
        for adapter, kernel in module.bca_kernels.items():
            if kernel.requires_grad:
                by_p.setdefault(module.adapter_block_size(adapter), []).append(kernel)
                kernel_ids.add(id(kernel))
    save_ids = {id(p) for p in modules_to_save_parameters(model).values()}
    saved: list[nn.Parameter] = []
    other: list[nn.Parameter] = []
    for param in model.parameters():
        if not param.requires_grad or id(param) in kernel_ids:
            continue
        (saved if id(param) in save_ids else other).append(param)
    groups: list[dict[str, Any]] = []
    for p in sorted(by_p):
        groups.append(
            {
                "params": by_p[p],
                "lr": lr / p if divide_by_block_size else lr,
                "weight_decay": kwd,
                "name": f"bca_kernels_p{p}",
            }
        )
    if saved:
        groups.append(
            {"params": saved, "lr": lr, "weight_decay": weight_decay, "name": "modules_to_save"}
        )
    if other:
        groups.append({"params": other, "lr": lr, "weight_decay": weight_decay, "name": "other"})
    if not groups:
        raise BcaError("model has no trainable parameters")
    return groups


class ParameterCount(NamedTuple):
    """Trainable and total parameter counts (shared parameters counted once)."""

    trainable: int
    total: int

    @property
    def fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return (
            f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
            f"trainable%: {100 * self.fraction:.4f}"
        )


def count_parameters(model: nn.Module) -> ParameterCount:
    """``ParameterCount(trainable, total)`` of ``model`` (kernels included in total)."""
    trainable = total = 0
    for param in model.parameters():
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    return ParameterCount(trainable, total)


def adapter_names(model: nn.Module) -> list[str]:
    """Every adapter name in ``model`` (in the order first seen)."""
    names: dict[str, None] = {}
    for _, module in adapter_modules(model):
        names.update(dict.fromkeys(module.adapter_names))
    return list(names)


def active_adapters(model: nn.Module) -> list[str]:
    """The active adapter names (union over layers, in order)."""
    names: dict[str, None] = {}
    for _, module in adapter_modules(model):
        names.update(dict.fromkeys(module.active_adapters))
    return list(names)


def configs_of(model: nn.Module) -> dict[str, BCAConfig]:
    configs = getattr(model, "bca_configs", None)
    if not isinstance(configs, dict):
        configs = {}
        first = getattr(model, "bca_config", None)
        names = adapter_names(model)
        if isinstance(first, BCAConfig) and names:
            configs[names[0]] = first
        model.bca_configs = configs  # type: ignore[assignment]
    return configs
