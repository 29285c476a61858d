"""Model-level API: configure, inject, freeze, optimise, merge, save and load adapters.

Typical use::

    from bca.model import BCAConfig, inject_adapters, parameter_groups, save_adapter

    config = BCAConfig(block_size=64, target_modules=["query", "value"],
                       modules_to_save=["classifier"])
    model = inject_adapters(model, config)        # in place; base weights frozen
    opt = torch.optim.AdamW(parameter_groups(model, lr=1e-2))   # lr / p for each kernel
    ...
    save_adapter(model, "my-adapter")             # safetensors + adapter_config.json

Matching rules for ``target_modules`` / ``modules_to_save`` / ``block_size_pattern``: a
string is a regular expression that must match a module's full dotted name
(``re.fullmatch``); a list entry matches a module whose full name equals it, ends with
``"." + entry``, or fully matches it as a regular expression.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from . import _adapter_format, _sketch
from ._adapter_format import CONFIG_NAME as ADAPTER_CONFIG_NAME
from ._adapter_format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MODULES_TO_SAVE_PREFIX,
    AdapterDocument,
    BcaFormatError,
)
from ._adapter_format import WEIGHTS_NAME as ADAPTER_WEIGHTS_NAME
from .nn import (
    BACKENDS,
    BASE_ADAPTER,
    DEFAULT_ADAPTER,
    INITS,
    BlockCirculantLinear,
    _check_adapter_name,
    _weight,
    is_supported_layer,
    layer_features,
)

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "BCAConfig",
    "ParameterCount",
    "active_adapters",
    "adapter_modules",
    "adapter_names",
    "adapters_disabled",
    "add_adapter",
    "delete_adapter",
    "set_adapter",
    "set_adapters_enabled",
    "count_parameters",
    "freeze_base",
    "get_bca_model",
    "inject_adapters",
    "load_adapter",
    "merge_adapters",
    "merge_and_unload",
    "mixed_adapter_batch",
    "parameter_groups",
    "save_adapter",
    "unmerge_adapters",
]


# --------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------
@dataclass
class BCAConfig:
    """What to adapt and how.

    Attributes:
        block_size: circulant block size ``p`` (default for every target).
        target_modules: module names or patterns to adapt (see the module docstring for
            the matching rules); every list entry must match at least one module.
        scale: factor on the update, ``y = W x + b + scale * ΔW x``.
        init: kernel initialisation, one of ``"zeros"`` (default), ``"xavier_uniform"``,
            ``"gaussian"``, ``"kaiming"``.
        pad: allow widths the block size does not divide (zero padding).
        backend: ``"auto"``, ``"rust"`` or ``"torch"``.
        modules_to_save: modules trained fully (e.g. a classifier head), saved with the
            adapter.
        block_size_pattern: per-module block sizes, ``{pattern: p}``, first match wins.
    """

    block_size: int = 256
    target_modules: list[str] | str = field(default_factory=list)
    scale: float = 1.0
    init: str = "zeros"
    pad: bool = True
    backend: str = "auto"
    modules_to_save: list[str] = field(default_factory=list)
    block_size_pattern: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int):
            raise TypeError(f"block_size must be an int, got {type(self.block_size).__name__}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        if isinstance(self.target_modules, (tuple, set)):
            self.target_modules = (
                sorted(self.target_modules)
                if isinstance(self.target_modules, set)
                else list(self.target_modules)
            )
        if isinstance(self.target_modules, str):
            _compile("target_modules", self.target_modules)
        elif isinstance(self.target_modules, list):
            if not self.target_modules:
                raise ValueError("target_modules must name at least one module")
            for t in self.target_modules:
                if not isinstance(t, str) or not t:
                    raise TypeError(f"target_modules entries must be non-empty str, got {t!r}")
        else:
            raise TypeError(
                "target_modules must be a list of names or a regex string, got "
                f"{type(self.target_modules).__name__}"
            )
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)):
            raise TypeError(f"scale must be a float, got {type(self.scale).__name__}")
        if not math.isfinite(float(self.scale)):
            raise ValueError(f"scale must be finite, got {self.scale}")
        self.scale = float(self.scale)
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if not isinstance(self.pad, bool):
            raise TypeError(f"pad must be a bool, got {type(self.pad).__name__}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
        self.modules_to_save = list(self.modules_to_save or [])
        for m in self.modules_to_save:
            if not isinstance(m, str) or not m:
                raise TypeError(f"modules_to_save entries must be non-empty str, got {m!r}")
        if not isinstance(self.block_size_pattern, dict):
            raise TypeError("block_size_pattern must be a dict {pattern: block_size}")
        for k, v in self.block_size_pattern.items():
            if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(
                    f"block_size_pattern entries must be str -> positive int, got {k!r}: {v!r}"
                )

    def block_size_for(self, module_name: str) -> int:
        """The block size used for ``module_name`` (pattern first, then the default)."""
        for pattern, p in self.block_size_pattern.items():
            if _name_matches(module_name, [pattern]):
                return p
        return self.block_size

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _compile(arg: str, pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"{arg}: invalid regular expression {pattern!r}: {exc}") from exc


def _entry_matches(name: str, entry: str) -> bool:
    if name == entry or name.endswith("." + entry):
        return True
    try:
        return re.fullmatch(entry, name) is not None
    except re.error:
        return False


def _name_matches(name: str, targets: list[str] | str) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(_entry_matches(name, t) for t in targets)


# --------------------------------------------------------------------------------------
# injection
# --------------------------------------------------------------------------------------
def adapter_modules(model: nn.Module) -> Iterator[tuple[str, BlockCirculantLinear]]:
    """``(name, module)`` for every :class:`BlockCirculantLinear` in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, BlockCirculantLinear):
            yield name, module


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
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


def _inject(
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
                raise ValueError(f"module {name!r} already has an adapter {adapter_name!r}")
            if not module.pad and (module.in_features % p or module.out_features % p):
                raise ValueError(
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
        _replace(model, name, layer)
    return created


def _match_modules_to_save(model: nn.Module, config: BCAConfig) -> list[str]:
    names: list[str] = []
    for entry in config.modules_to_save:
        hits = [n for n, _ in _candidate_modules(model) if _entry_matches(n, entry)]
        hits = [n for n in hits if not any(n.startswith(h + ".") for h in hits)]
        if not hits:
            raise ValueError(
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
    _check_adapter_name(adapter_name)
    if any(True for _ in adapter_modules(model)):
        raise ValueError(
            "model already has bca adapters; inject_adapters runs once per model (use "
            "add_adapter for another named adapter)"
        )
    matched = _match_targets(model, config)
    save_names = _match_modules_to_save(model, config)
    overlap = [n for n in matched if any(n == s or n.startswith(s + ".") for s in save_names)]
    if overlap:
        raise ValueError(f"modules {overlap} are both adapted and in modules_to_save")
    _inject(model, {n: config.block_size_for(n) for n in matched}, config, adapter_name)
    model.bca_config = config  # type: ignore[assignment]
    model.bca_configs = {adapter_name: config}  # type: ignore[assignment]
    if freeze:
        freeze_base(model)
    return model


def _match_targets(model: nn.Module, config: BCAConfig) -> list[str]:
    """Names of the layers ``config.target_modules`` selects (adapted layers included)."""
    targets = config.target_modules
    matched: list[str] = []
    entry_hits: dict[str, int] = {t: 0 for t in targets} if isinstance(targets, list) else {}
    for name, module in _candidate_modules(model):
        if not _name_matches(name, targets):
            continue
        if not is_supported_layer(module) and not isinstance(module, BlockCirculantLinear):
            raise TypeError(
                f"target module {name!r} is a {type(module).__name__}; bca adapts nn.Linear "
                "and transformers Conv1D layers only (name the linear layers inside it)"
            )
        matched.append(name)
        for t in entry_hits:
            if _entry_matches(name, t):
                entry_hits[t] += 1
    missing = [t for t, n in entry_hits.items() if n == 0]
    if missing or not matched:
        what = missing if missing else [targets]
        raise ValueError(
            f"target_modules {what} match no module of {type(model).__name__}; "
            f"linear layers it has: {_linear_names(model)}"
        )
    return matched


def get_bca_model(model: nn.Module, config: BCAConfig) -> nn.Module:
    """Alias of :func:`inject_adapters` (for users coming from ``peft.get_peft_model``)."""
    return inject_adapters(model, config)


def _config_of(model: nn.Module) -> BCAConfig:
    config = getattr(model, "bca_config", None)
    if not isinstance(config, BCAConfig):
        raise ValueError("model has no bca adapters (no model.bca_config); call inject_adapters")
    return config


def _modules_to_save_params(model: nn.Module) -> dict[str, nn.Parameter]:
    config = getattr(model, "bca_config", None)
    if not isinstance(config, BCAConfig) or not config.modules_to_save:
        return {}
    names = _match_modules_to_save(model, config)
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
    keep = set(_modules_to_save_params(model))
    trainable: set[int] = set()
    for _, module in adapter_modules(model):
        for adapter in module.active_adapters:
            trainable.add(id(module.bca_kernels[adapter]))
    for name, param in model.named_parameters():
        param.requires_grad_(id(param) in trainable or name in keep)
    return model


# --------------------------------------------------------------------------------------
# optimisation helpers
# --------------------------------------------------------------------------------------
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
        raise ValueError(f"lr must be a positive float, got {lr!r}")
    kwd = weight_decay if kernel_weight_decay is None else kernel_weight_decay
    by_p: dict[int, list[nn.Parameter]] = {}
    kernel_ids: set[int] = set()
    for _, module in adapter_modules(model):
        for adapter, kernel in module.bca_kernels.items():
            if kernel.requires_grad:
                by_p.setdefault(module.adapter_block_size(adapter), []).append(kernel)
                kernel_ids.add(id(kernel))
    save_ids = {id(p) for p in _modules_to_save_params(model).values()}
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
        raise ValueError("model has no trainable parameters")
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


# --------------------------------------------------------------------------------------
# merge
# --------------------------------------------------------------------------------------
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
    names = _check_names(model, adapter_names)
    ws = _weights(names, weights) if names is not None else []
    for _, module in adapter_modules(model):
        if names is None:
            if module.active_adapters and not all(
                a in module.merged_adapters for a in module.active_adapters
            ):
                module.merge(exact_unmerge=exact_unmerge)
            continue
        here, here_ws = _on_layer(module, names, ws, skip_merged=True)
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
    names = _check_names(model, adapter_names)
    ws = _weights(names, weights) if names is not None else []
    for name, module in list(adapter_modules(model)):
        if module.merged:
            module.unmerge()
        if names is None:
            if module.active_adapters:
                module.merge(exact_unmerge=False)
        else:
            here, here_ws = _on_layer(module, names, ws)
            if here:
                module.merge(exact_unmerge=False, adapter_names=here, weights=here_ws)
        _replace(model, name, module.base_layer)
    for attr in ("bca_config", "bca_configs"):
        if hasattr(model, attr):
            delattr(model, attr)
    return model


# --------------------------------------------------------------------------------------
# named adapters
# --------------------------------------------------------------------------------------
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


def _check_names(model: nn.Module, adapter_names: str | Sequence[str] | None) -> list[str] | None:
    if adapter_names is None:
        return None
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    known = _all_adapter_names(model)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown adapters {unknown}; the model has {known}")
    if len(set(names)) != len(names):
        raise ValueError(f"adapter_names has duplicates: {names}")
    return names


_all_adapter_names = adapter_names  # for functions whose argument shadows the name


def _on_layer(
    module: BlockCirculantLinear, names: list[str], ws: list[float], *, skip_merged: bool = False
) -> tuple[list[str], list[float]]:
    """The named adapters (and their weights) that ``module`` carries, in order."""
    pairs = [
        (n, w)
        for n, w in zip(names, ws, strict=True)
        if n in module.adapter_names and not (skip_merged and n in module.merged_adapters)
    ]
    return [n for n, _ in pairs], [w for _, w in pairs]


def _weights(names: list[str], weights: Sequence[float] | None) -> list[float]:
    if weights is None:
        return [1.0] * len(names)
    ws = [float(w) for w in weights]
    if len(ws) != len(names):
        raise ValueError(f"weights has {len(ws)} entries for {len(names)} adapters")
    if not all(math.isfinite(w) for w in ws):
        raise ValueError(f"weights must be finite, got {ws}")
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
    _check_adapter_name(adapter_name)
    existing = adapter_names(model)
    if not existing:
        return inject_adapters(model, config, adapter_name=adapter_name)
    if adapter_name in existing:
        raise ValueError(f"model already has an adapter {adapter_name!r}")
    configs = _configs_of(model)
    if config.modules_to_save or any(c.modules_to_save for c in configs.values()):
        raise ValueError(
            "modules_to_save cannot be combined with several named adapters (the fully "
            "trained modules would be shared between them)"
        )
    matched = _match_targets(model, config)
    _inject(
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


def _configs_of(model: nn.Module) -> dict[str, BCAConfig]:
    configs = getattr(model, "bca_configs", None)
    if not isinstance(configs, dict):
        configs = {}
        first = getattr(model, "bca_config", None)
        names = adapter_names(model)
        if isinstance(first, BCAConfig) and names:
            configs[names[0]] = first
        model.bca_configs = configs  # type: ignore[assignment]
    return configs


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
    names = _check_names(model, adapter_names) or []
    ws = _weights(names, weights)
    for _, module in adapter_modules(model):
        module.set_adapter(*_on_layer(module, names, ws))
    if trainable:
        freeze_base(model)
    return model


def delete_adapter(model: nn.Module, adapter_name: str) -> nn.Module:
    """Remove a named adapter everywhere; layers left without adapters become plain again."""
    _check_names(model, adapter_name)
    modules = [(n, m) for n, m in adapter_modules(model) if adapter_name in m.adapter_names]
    merged = [n for n, m in modules if adapter_name in m.merged_adapters]
    if merged:
        raise ValueError(f"adapter {adapter_name!r} is merged in {merged}; unmerge first")
    for name, module in modules:
        module.delete_adapter(adapter_name)
        if not module.adapter_names:
            _replace(model, name, module.base_layer)
    configs = _configs_of(model)
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
        raise ValueError("adapters are merged into the base weights; unmerge before disabling")
    before = [m.adapter_enabled for m in modules]
    try:
        for m in modules:
            m.adapter_enabled = False
        yield model
    finally:
        for m, b in zip(modules, before, strict=True):
            m.adapter_enabled = b


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
        raise ValueError(
            f"unknown adapters {unknown} in adapter_names; the model has {known} "
            f"({BASE_ADAPTER!r}: no adapter)"
        )
    modules = [m for _, m in adapter_modules(model)]
    merged = sorted({n for m in modules for n in m.merged_adapters})
    if merged:
        raise ValueError(
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


# --------------------------------------------------------------------------------------
# save / load
# --------------------------------------------------------------------------------------
def _fingerprint(model: nn.Module, names: Sequence[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        module = model.get_submodule(name)
        base = module.base_layer if isinstance(module, BlockCirculantLinear) else module
        d_in, d_out, conv = layer_features(base)
        out[name] = {"in_features": d_in, "out_features": d_out, "is_conv1d": conv}
    return out


@torch.no_grad()
def _weight_sketch(module: nn.Module) -> dict[str, Any] | None:
    """The :mod:`bca._sketch` sketch of a layer's base weight without merged adapters,
    computed where the weight lives; ``None`` for weights without data (meta device)."""
    base = module.base_layer if isinstance(module, BlockCirculantLinear) else module
    w = _weight(base).detach()
    if w.device.type == "meta":
        return None
    conv = layer_features(base)[2]  # GPT-2 Conv1D stores its weight (in, out)
    if isinstance(module, BlockCirculantLinear) and module.merged:
        if module._original_weight is not None:
            w = module._original_weight
        else:
            names = list(module.merged_adapters)
            dw = module.delta_weight(names, [module.merged_adapters[n] for n in names])
            w = w - (dw.T if conv else dw).to(w.dtype)
    if conv:
        w = w.T
    d_out, d_in = w.shape
    u_np, v_np = _sketch.vectors(d_out, d_in)
    u = torch.from_numpy(u_np).to(w.device)
    v32 = torch.from_numpy(v_np).to(device=w.device, dtype=torch.float32)
    sum_sq = 0.0
    proj = torch.zeros(_sketch.PROJECTIONS, dtype=torch.float64, device=w.device)
    for r0 in range(0, d_out, 2048):  # float32 GEMMs in row chunks, as _sketch.sketch
        chunk = w[r0 : r0 + 2048].to(torch.float32)
        sum_sq += float(torch.linalg.vector_norm(chunk)) ** 2
        proj += ((chunk @ v32).to(torch.float64) * u[r0 : r0 + 2048]).sum(0)
    return _sketch.finish(sum_sq, proj.tolist(), d_out, d_in)


def _check_base_weights(
    model: nn.Module, doc: AdapterDocument, directory: str | os.PathLike[str], check: str
) -> None:
    """Compare the base weights of the adapter's layers with the sketches saved with it."""
    if check == "ignore":
        return
    differ = []
    for name in doc.modules:
        want = doc.weight_sketch.get(name)
        if want is None:
            continue  # saved by an older bca, or from a model without weights
        got = _weight_sketch(model.get_submodule(name))
        if got is not None and _sketch.differ(want, got):
            differ.append(name)
    _sketch.report_mismatch(
        str(directory),
        differ,
        len(doc.modules),
        doc.base_name_or_path or "",
        check,
        stacklevel=3,
    )


def _name_or_path(model: nn.Module) -> str:
    cfg = getattr(model, "config", None)
    value = getattr(cfg, "name_or_path", None) or getattr(cfg, "_name_or_path", None) or ""
    return str(value)


def _resolve_adapter(model: nn.Module, adapter_name: str | None, what: str) -> str:
    names = adapter_names(model)
    if not names:
        raise ValueError("model has no bca adapters")
    if adapter_name is not None:
        if adapter_name not in names:
            raise ValueError(f"unknown adapter {adapter_name!r}; the model has {names}")
        return adapter_name
    if len(names) == 1:
        return names[0]
    active = active_adapters(model)
    if len(active) == 1:
        return active[0]
    raise ValueError(
        f"model has adapters {names} ({len(active)} active); pass adapter_name to {what}"
    )


def save_adapter(
    model: nn.Module, directory: str | os.PathLike[str], adapter_name: str | None = None
) -> Path:
    """Write one adapter as ``adapter_model.safetensors`` + ``adapter_config.json``.

    ``adapter_name`` picks the adapter (default: the only one, else the only active one).
    Tensors: ``<module name>.bca_kernel`` for every layer with that adapter (float32, or
    float64 for float64 kernels; kernels cast to half precision are saved as float32,
    exactly) and ``modules_to_save.<parameter name>`` for fully trained modules. The JSON
    records the config, the adapter's name, each module's shape and block size, and the base
    model's fingerprint.

    The write is atomic: the files are written into a hidden sibling folder and moved into
    ``directory`` only when both are complete (see :mod:`bca._adapter_format`), so a
    failure leaves a previous adapter in ``directory`` as it was and no half-written folder;
    other files in ``directory`` are kept.
    """
    from safetensors.torch import save_file

    _config_of(model)
    adapter = _resolve_adapter(model, adapter_name, "save_adapter")
    config = _configs_of(model).get(adapter) or _config_of(model)
    modules = {n: m for n, m in adapter_modules(model) if adapter in m.adapter_names}
    scales = {m.adapter_scale(adapter) for m in modules.values()}
    if len(scales) != 1:
        raise ValueError(
            f"adapter {adapter!r} has different scales on different layers {sorted(scales)}; "
            "the adapter format stores one scale"
        )
    tensors: dict[str, torch.Tensor] = {}
    info: dict[str, dict[str, Any]] = {}
    for name, m in modules.items():
        kernel = m.bca_kernels[adapter].detach().to("cpu")
        if kernel.dtype not in (torch.float32, torch.float64):
            kernel = kernel.to(torch.float32)  # the format's kernels are float32/float64
        tensors[f"{name}.bca_kernel"] = kernel.clone().contiguous()
        info[name] = {
            "in_features": m.in_features,
            "out_features": m.out_features,
            "block_size": m.adapter_block_size(adapter),
            "is_conv1d": m.is_conv1d,
        }
    for pname, param in _modules_to_save_params(model).items():
        tensors[MODULES_TO_SAVE_PREFIX + pname] = param.detach().to("cpu").clone().contiguous()
    targets = config.target_modules
    doc = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "adapter_name": adapter,
        "block_size": config.block_size,
        "scale": scales.pop(),
        "target_modules": [targets] if isinstance(targets, str) else list(targets),
        "init": config.init,
        "pad": config.pad,
        "modules_to_save": list(config.modules_to_save),
        "base_model": {
            "name_or_path": _name_or_path(model),
            "class": type(model).__name__,
            "fingerprint": _fingerprint(model, list(modules)),
            "weight_sketch": {
                name: sk for name, m in modules.items() if (sk := _weight_sketch(m)) is not None
            },
        },
        "modules": info,
    }
    return _adapter_format.write_adapter(
        directory,
        doc,
        lambda path: save_file(tensors, str(path), metadata={"format": "pt"}),
    )


def read_adapter_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate ``adapter_config.json`` (plain JSON, nothing executed).

    Every field the format defines is checked for its type and range; anything malformed
    raises :class:`bca.BcaFormatError` (a ``ValueError``) naming the file and the field.
    """
    return _adapter_format.read_config(directory).raw


def _check_fingerprint(model: nn.Module, doc: AdapterDocument) -> None:
    for name in doc.modules:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(
                f"{doc.path}: adapter module {name!r} not found in {type(model).__name__}: the "
                f"adapter was saved from a different model ({doc.base_class!r}, "
                f"{doc.base_name_or_path!r})"
            ) from None
        base = module.base_layer if isinstance(module, BlockCirculantLinear) else module
        if not is_supported_layer(base):
            raise TypeError(
                f"{doc.path}: adapter module {name!r} is a {type(base).__name__} in this model, "
                "expected nn.Linear or Conv1D"
            )
        got = dict(
            zip(("in_features", "out_features", "is_conv1d"), layer_features(base), strict=True)
        )
        want = doc.fingerprint.get(name, doc.raw["modules"][name])
        expected = {k: want[k] for k in ("in_features", "out_features", "is_conv1d") if k in want}
        if any(got[k] != v for k, v in expected.items()):
            raise ValueError(
                f"{doc.path}: adapter module {name!r} does not match this model: saved for "
                f"(in_features={want.get('in_features')}, out_features={want.get('out_features')}, "
                f"is_conv1d={want.get('is_conv1d')}), model has (in_features="
                f"{got['in_features']}, out_features={got['out_features']}, "
                f"is_conv1d={got['is_conv1d']})"
            )


def load_adapter(
    model: nn.Module,
    directory: str | os.PathLike[str],
    *,
    adapter_name: str | None = None,
    backend: str | None = None,
    activate: bool | None = None,
    check_base: str = "warn",
) -> nn.Module:
    """Load an adapter saved by :func:`save_adapter` into ``model`` (in place).

    * A plain model gets the saved modules injected (with their saved block sizes) as
      adapter ``adapter_name`` (default ``"default"``), active.
    * A model with adapters: when ``adapter_name`` names one of them (default: the
      model's only adapter), its kernels are overwritten, and the saved modules must be
      exactly the layers that carry it; a new ``adapter_name`` is added beside the others
      (not active unless ``activate=True``; switch with :func:`set_adapter`).

    The base model's fingerprint is checked first: a module missing or of another shape
    raises ``ValueError`` naming the module and both shapes. Then the base weights of the
    adapter's layers are compared with a sketch saved with the adapter (a few fixed random
    projections; casts to half precision pass): an adapter trained on another checkpoint
    of the same architecture gives a ``UserWarning`` (``check_base="warn"``, default), a
    ``ValueError`` (``"error"``) or nothing (``"ignore"``, for a base changed on purpose).
    Loading reads JSON and safetensors only (nothing is unpickled). Both files are read
    and checked before the model is touched: a malformed file (a field of the wrong type
    or range, a tensor of the wrong dtype or shape, a truncated or corrupted file) raises
    :class:`bca.BcaFormatError`, a ``ValueError`` naming the file and the field.
    """
    _sketch.check_mode(check_base)
    files = _adapter_format.read_adapter_files(directory)
    doc = files.doc
    saved_class = doc.base_class
    if saved_class and saved_class != type(model).__name__:
        warnings.warn(
            f"adapter was saved from a {saved_class}, loading into a {type(model).__name__}",
            stacklevel=2,
        )
    _check_fingerprint(model, doc)
    _check_base_weights(model, doc, directory, check_base)
    modules_info = doc.modules
    try:
        config = BCAConfig(
            block_size=doc.block_size,
            target_modules=list(doc.target_modules or modules_info),
            scale=doc.scale,
            init=doc.init,
            pad=doc.pad,
            backend=backend if backend is not None else "auto",
            modules_to_save=list(doc.modules_to_save),
        )
    except (TypeError, ValueError) as e:  # e.g. a target_modules entry BCAConfig refuses
        raise BcaFormatError(doc.path, "", str(e)) from None
    names_now = adapter_names(model)
    if adapter_name is None:
        target = names_now[0] if len(names_now) == 1 else DEFAULT_ADAPTER
    else:
        target = _check_adapter_name(adapter_name)
    mode = "new" if not names_now else ("overwrite" if target in names_now else "add")
    existing = {n: m for n, m in adapter_modules(model) if target in m.adapter_names}
    if mode == "overwrite":
        if set(existing) != set(modules_info):
            raise ValueError(
                f"model's adapter {target!r} differs from the saved one in its layers: missing "
                f"{sorted(set(modules_info) - set(existing))}, unexpected "
                f"{sorted(set(existing) - set(modules_info))}"
            )
        for name, m in existing.items():
            if target in m.merged_adapters:
                raise ValueError(f"adapter {name!r} is merged; unmerge before load_adapter")
            if m.adapter_block_size(target) != modules_info[name].block_size:
                raise ValueError(
                    f"adapter {name!r} has block_size {m.adapter_block_size(target)}, saved "
                    f"block_size {modules_info[name].block_size}"
                )
        prior = _configs_of(model).get(target)
        if isinstance(prior, BCAConfig):
            config.init = prior.init
    elif mode == "add":
        if config.modules_to_save or any(c.modules_to_save for c in _configs_of(model).values()):
            raise ValueError(
                f"cannot load {directory} as another named adapter {target!r}: "
                "modules_to_save cannot be combined with several named adapters (the fully "
                "trained modules would be shared between them)"
            )
        for name, info in modules_info.items():
            module = model.get_submodule(name)
            p = info.block_size
            if (
                isinstance(module, BlockCirculantLinear)
                and not module.pad
                and (module.in_features % p or module.out_features % p)
            ):
                raise ValueError(f"module {name!r} has pad=False and block_size {p} needs padding")
    kernels = {n: torch.from_numpy(k) for n, k in files.kernels.items()}
    params = dict(model.named_parameters())
    saved_params = {n: torch.from_numpy(v) for n, v in files.modules_to_save.items()}
    for pname, t in saved_params.items():
        if pname not in params:
            raise ValueError(
                f"saved module parameter {pname!r} ({files.weights_path}) not found in the model"
            )
        if tuple(params[pname].shape) != tuple(t.shape):
            raise ValueError(
                f"saved module parameter {pname!r} has shape {tuple(t.shape)} in "
                f"{files.weights_path}, the model's has {tuple(params[pname].shape)}"
            )

    sizes = {n: i.block_size for n, i in modules_info.items()}
    if mode == "new":
        for name, info in modules_info.items():  # checked before the model changes
            if not config.pad and (
                info.in_features % info.block_size or info.out_features % info.block_size
            ):
                raise BcaFormatError(
                    doc.path,
                    f"modules.{name}.block_size",
                    f"{info.block_size} does not divide in_features={info.in_features} and "
                    f"out_features={info.out_features}, and pad is false",
                )
        if config.modules_to_save:
            try:
                _match_modules_to_save(model, config)
            except ValueError as e:
                raise ValueError(f"{doc.path}: {e}") from None
        _inject(model, sizes, config, target)
        model.bca_config = config  # type: ignore[assignment]
        model.bca_configs = {target: config}  # type: ignore[assignment]
        freeze_base(model)
    elif mode == "add":
        _inject(model, sizes, config, target, activate=bool(activate))
        _configs_of(model)[target] = config
    else:
        for m in existing.values():
            m.set_adapter_scale(target, doc.scale)
            if backend is not None:
                m.backend = backend
        configs = _configs_of(model)
        configs[target] = config
        if next(iter(configs)) == target:
            model.bca_config = config  # type: ignore[assignment]
    with torch.no_grad():
        for name in modules_info:
            module = model.get_submodule(name)
            assert isinstance(module, BlockCirculantLinear)
            k = module.bca_kernels[target]
            k.copy_(kernels[name].to(device=k.device, dtype=k.dtype))
        params = dict(model.named_parameters())
        for pname, t in saved_params.items():
            dst = params[pname]
            dst.copy_(t.to(device=dst.device, dtype=dst.dtype))
    if mode == "add":
        if activate:
            set_adapter(model, [*active_adapters(model), target])
        else:
            for name in modules_info:
                module = model.get_submodule(name)
                assert isinstance(module, BlockCirculantLinear)
                module.bca_kernels[target].requires_grad_(False)
    elif activate is False:
        set_adapter(model, [a for a in active_adapters(model) if a != target])
    return model
