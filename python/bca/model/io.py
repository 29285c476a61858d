"""Saving and loading adapters (safetensors + JSON), with base-model checks."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import _adapter_format, _sketch
from .._adapter_format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MODULES_TO_SAVE_PREFIX,
    AdapterDocument,
    BcaFormatError,
)
from .._errors import BcaError, ShapeError
from ..nn import DEFAULT_ADAPTER, BlockCirculantLinear
from ..nn.layer import base_weight, check_adapter_name, is_supported_layer, layer_features
from .adapters import (
    set_adapter,
)
from .config import (
    BCAConfig,
)
from .inject import (
    active_adapters,
    adapter_modules,
    adapter_names,
    add_to_layers,
    config_of,
    configs_of,
    freeze_base,
    match_modules_to_save,
    modules_to_save_parameters,
)


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
    w = base_weight(base).detach()
    if w.device.type == "meta":
        return None
    conv = layer_features(base)[2]  # GPT-2 Conv1D stores its weight (in, out)
    if isinstance(module, BlockCirculantLinear):
        w = module.unmerged_weight()
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
        raise BcaError("model has no bca adapters")
    if adapter_name is not None:
        if adapter_name not in names:
            raise BcaError(f"unknown adapter {adapter_name!r}; the model has {names}")
        return adapter_name
    if len(names) == 1:
        return names[0]
    active = active_adapters(model)
    if len(active) == 1:
        return active[0]
    raise BcaError(
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

    config_of(model)
    adapter = _resolve_adapter(model, adapter_name, "save_adapter")
    config = configs_of(model).get(adapter) or config_of(model)
    modules = {n: m for n, m in adapter_modules(model) if adapter in m.adapter_names}
    scales = {m.adapter_scale(adapter) for m in modules.values()}
    if len(scales) != 1:
        raise BcaError(
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
    for pname, param in modules_to_save_parameters(model).items():
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
            raise BcaError(
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
            raise ShapeError(
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
        target = check_adapter_name(adapter_name)
    mode = "new" if not names_now else ("overwrite" if target in names_now else "add")
    existing = {n: m for n, m in adapter_modules(model) if target in m.adapter_names}
    if mode == "overwrite":
        if set(existing) != set(modules_info):
            raise BcaError(
                f"model's adapter {target!r} differs from the saved one in its layers: missing "
                f"{sorted(set(modules_info) - set(existing))}, unexpected "
                f"{sorted(set(existing) - set(modules_info))}"
            )
        for name, m in existing.items():
            if target in m.merged_adapters:
                raise BcaError(f"adapter {name!r} is merged; unmerge before load_adapter")
            if m.adapter_block_size(target) != modules_info[name].block_size:
                raise BcaError(
                    f"adapter {name!r} has block_size {m.adapter_block_size(target)}, saved "
                    f"block_size {modules_info[name].block_size}"
                )
        prior = configs_of(model).get(target)
        if isinstance(prior, BCAConfig):
            config.init = prior.init
    elif mode == "add":
        if config.modules_to_save or any(c.modules_to_save for c in configs_of(model).values()):
            raise BcaError(
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
                raise BcaError(f"module {name!r} has pad=False and block_size {p} needs padding")
    kernels = {n: torch.from_numpy(k) for n, k in files.kernels.items()}
    params = dict(model.named_parameters())
    saved_params = {n: torch.from_numpy(v) for n, v in files.modules_to_save.items()}
    for pname, t in saved_params.items():
        if pname not in params:
            raise BcaError(
                f"saved module parameter {pname!r} ({files.weights_path}) not found in the model"
            )
        if tuple(params[pname].shape) != tuple(t.shape):
            raise ShapeError(
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
                match_modules_to_save(model, config)
            except ValueError as e:
                raise BcaError(f"{doc.path}: {e}") from None
        add_to_layers(model, sizes, config, target)
        model.bca_config = config  # type: ignore[assignment]
        model.bca_configs = {target: config}  # type: ignore[assignment]
        freeze_base(model)
    elif mode == "add":
        add_to_layers(model, sizes, config, target, activate=bool(activate))
        configs_of(model)[target] = config
    else:
        for m in existing.values():
            m.set_adapter_scale(target, doc.scale)
            if backend is not None:
                m.backend = backend
        configs = configs_of(model)
        configs[target] = config
        if next(iter(configs)) == target:
            model.bca_config = config  # type: ignore[assignment]
    with torch.no_grad():
        for name in modules_info:
            module = model.get_submodule(name)
            assert isinstance(module, BlockCirculantLinear)  # noqa: S101 (narrows the type)
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
                assert isinstance(module, BlockCirculantLinear)  # noqa: S101 (narrows the type)
                module.bca_kernels[target].requires_grad_(False)
    elif activate is False:
        set_adapter(model, [a for a in active_adapters(model) if a != target])
    return model
