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

Modules: :mod:`.config` (BCAConfig, name matching), :mod:`.inject` (inject, freeze,
parameter groups, counts), :mod:`.adapters` (named adapters, mixed batches, trusted
adapters for serving), :mod:`.merge` (merge, unmerge, unload) and :mod:`.io` (save,
load); import from ``bca.model``.
"""

from __future__ import annotations

try:  # first, so that a numpy-only install learns which extra to add
    import torch  # noqa: F401
except ModuleNotFoundError as _exc:
    _hint = 'bca.model needs torch: pip install "bca[torch]"'
    raise ModuleNotFoundError(_hint, name="torch") from _exc

from .._adapter_format import CONFIG_NAME as ADAPTER_CONFIG_NAME
from .._adapter_format import WEIGHTS_NAME as ADAPTER_WEIGHTS_NAME
from .adapters import (
    adapters_disabled,
    add_adapter,
    delete_adapter,
    mixed_adapter_batch,
    set_adapter,
    set_adapters_enabled,
    trusted_adapters,
)
from .config import BCAConfig
from .inject import (
    ParameterCount,
    active_adapters,
    adapter_modules,
    adapter_names,
    count_parameters,
    freeze_base,
    get_bca_model,
    inject_adapters,
    modules_to_save_parameters,
    parameter_groups,
)
from .io import load_adapter, read_adapter_config, save_adapter
from .merge import merge_adapters, merge_and_unload, unmerge_adapters

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
    "read_adapter_config",
    "mixed_adapter_batch",
    "modules_to_save_parameters",
    "parameter_groups",
    "save_adapter",
    "trusted_adapters",
    "unmerge_adapters",
]
