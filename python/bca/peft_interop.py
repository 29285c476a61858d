"""Conversion between PEFT's C3A adapters and bca's block circulant adapters.

PEFT's C3A (``peft.tuners.c3a``, checked on peft 0.21.2) stores a kernel ``w`` of shape
``(out/b, in/b, b)`` and computes ``ΔW x / in_features`` with ``fft(ifft(x) ⊙ fft(w)).real``
per block: a circular *cross-correlation* whose block ``(i, j)`` has ``w[i, j]`` as its
first **row**. bca stores ``c`` with block ``(i, j)`` = ``scipy.linalg.circulant(c[i, j])``
(first **column**) and computes ``scale · ΔW x``. The two agree exactly when::

    c[i, j, n] = w[i, j, (-n) mod b] / in_features            (C3A -> bca, scale 1)
    w[i, j, n] = scale · in_features · c[i, j, (-n) mod b]      (bca -> C3A)

(``n -> -n mod b`` is its own inverse). Checked against PEFT's own forward and a float64
dense oracle in ``tests/test_peft_*.py``.

What C3A cannot hold, and is refused with a ``ValueError`` when converting to PEFT:
padded bca adapters (``block_size`` not dividing ``in_features`` and ``out_features``)
and adapters on transformers' ``Conv1D`` layers (PEFT's C3A supports ``nn.Linear`` only).
C3A adapters trained with ``bias != "none"`` carry bias tensors bca does not model and
are refused when converting to bca.

Entry points:

- :func:`c3a_kernel_to_bca`, :func:`bca_kernel_to_c3a` -- one kernel (numpy or torch;
  torch stays differentiable).
- :func:`c3a_adapter_dir_to_bca`, :func:`bca_adapter_dir_to_c3a` -- saved adapter
  directories (``adapter_config.json`` + ``adapter_model.safetensors``); nothing is
  unpickled.
- :func:`c3a_model_to_bca`, :func:`bca_model_to_c3a` -- in-memory models.
- :func:`patch_peft_c3a`, :func:`unpatch_peft_c3a` -- keep a PEFT C3A workflow
  (``get_peft_model``, ``save_pretrained``, ``merge_and_unload``) but run each C3A layer's
  forward and backward through bca, which fixes PEFT 0.21's wrong input gradient.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from . import _adapter_format as _fmt
from ._adapter_format import BcaFormatError, ModuleInfo
from ._errors import BcaError, ShapeError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

__all__ = [
    "bca_adapter_dir_to_c3a",
    "bca_kernel_to_c3a",
    "bca_model_to_c3a",
    "c3a_adapter_dir_to_bca",
    "c3a_kernel_to_bca",
    "c3a_model_to_bca",
    "patch_peft_c3a",
    "unpatch_peft_c3a",
]

CONFIG_NAME = _fmt.CONFIG_NAME
WEIGHTS_NAME = _fmt.WEIGHTS_NAME
PEFT_PREFIX = "base_model.model."
C3A_SUFFIX = ".c3a_kernel"
BCA_SUFFIX = _fmt.KERNEL_SUFFIX
MTS_PREFIX = _fmt.MODULES_TO_SAVE_PREFIX

ArrayT = TypeVar("ArrayT")

# PEFT's init_weights -> bca's init name (metadata only: converted kernels carry values)
_PEFT_INIT_TO_BCA = {
    "True": "zeros",
    "False": "xavier_uniform",
    "xavier_uniform": "xavier_uniform",
    "gaussian": "gaussian",
    "kaiming_uniform": "kaiming",
}


# --------------------------------------------------------------------------- kernels


def _is_torch(x: object) -> bool:
    mod = type(x).__module__
    return mod.startswith("torch") and hasattr(x, "dim")


def _check_kernel(kernel: Any, name: str) -> tuple[int, int, int]:
    if _is_torch(kernel):
        shape = tuple(kernel.shape)
        floating = kernel.is_floating_point()
    elif isinstance(kernel, np.ndarray):
        shape = kernel.shape
        floating = np.issubdtype(kernel.dtype, np.floating)
    else:
        raise TypeError(
            f"{name} must be a numpy array or torch tensor, got {type(kernel).__name__}"
        )
    if len(shape) != 3 or min(shape) < 1:
        raise ShapeError(f"{name} must have shape (q_out, q_in, block_size), got {shape}")
    if not floating:
        raise TypeError(f"{name} must be floating point, got dtype {kernel.dtype}")
    return shape  # type: ignore[return-value]


def _check_in_features(in_features: int | None, q_in: int, p: int, padded_ok: bool) -> int:
    if in_features is None:
        return q_in * p
    if isinstance(in_features, bool) or not isinstance(in_features, int):
        raise TypeError(f"in_features must be an int, got {type(in_features).__name__}")
    if padded_ok:
        if not (q_in - 1) * p < in_features <= q_in * p:
            raise ShapeError(
                f"in_features={in_features} does not fit a kernel with q_in={q_in} blocks of {p}"
            )
    elif in_features != q_in * p:
        raise ShapeError(
            f"in_features={in_features} must equal q_in * block_size = {q_in * p} for C3A"
        )
    return in_features


def _flip_index(p: int) -> np.ndarray:
    return (-np.arange(p)) % p


def _flip_torch(kernel: torch.Tensor) -> torch.Tensor:
    """``kernel[..., (-n) mod p]`` (differentiable, traceable by torch.compile)."""
    import torch

    return torch.roll(torch.flip(kernel, (-1,)), 1, -1)


def _c3a_to_bca_torch(w: torch.Tensor, in_features: int) -> torch.Tensor:
    return _flip_torch(w) / in_features


def c3a_kernel_to_bca(kernel: ArrayT, in_features: int | None = None) -> ArrayT:
    """Map a PEFT C3A kernel ``w`` (q_out, q_in, b) to a bca kernel with the same ΔW at scale 1:
    ``c[..., n] = w[..., (-n) mod b] / in_features``.

    ``in_features`` defaults to ``q_in * b`` (C3A has no padding). numpy in, numpy out;
    torch in, torch out (differentiable, same device and dtype).
    """
    _, q_in, p = _check_kernel(kernel, "kernel")
    d_in = _check_in_features(in_features, q_in, p, padded_ok=False)
    if _is_torch(kernel):
        return _c3a_to_bca_torch(kernel, d_in)  # type: ignore[arg-type,return-value]
    return kernel[..., _flip_index(p)] / kernel.dtype.type(d_in)  # type: ignore[attr-defined,index,no-any-return]


def bca_kernel_to_c3a(kernel: ArrayT, in_features: int | None = None, scale: float = 1.0) -> ArrayT:
    """Map a bca kernel ``c`` (q_out, q_in, p) used with ``scale`` to the PEFT C3A kernel with
    the same ``scale · ΔW``: ``w[..., n] = scale · in_features · c[..., (-n) mod p]``.

    Raises ``ValueError`` when ``in_features`` is not ``q_in * p`` (a padded adapter:
    PEFT's C3A needs ``block_size`` to divide the layer's sizes).
    """
    _, q_in, p = _check_kernel(kernel, "kernel")
    d_in = _check_in_features(in_features, q_in, p, padded_ok=False)
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
        raise BcaError(f"scale must be a finite number, got {scale!r}")
    factor = float(scale) * d_in
    if _is_torch(kernel):
        return _flip_torch(kernel) * factor  # type: ignore[arg-type,return-value]
    return kernel[..., _flip_index(p)] * kernel.dtype.type(factor)  # type: ignore[attr-defined,index,no-any-return]


# --------------------------------------------------------------------------- directories


def _require_torch(what: str) -> None:
    """Import torch, or say which extra to add (the kernel converters need only numpy)."""
    try:
        import torch  # noqa: F401
    except ModuleNotFoundError as e:
        hint = f'{what} needs torch: pip install "bca[torch]"'
        raise ModuleNotFoundError(hint, name="torch") from e


def _torch_tensors(header: _fmt.SafetensorsHeader, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """numpy arrays read from ``header``'s file as torch tensors of the file's dtypes
    (bfloat16 is read as float32, exactly, and cast back)."""
    import torch

    out = {}
    for name, a in arrays.items():
        t = torch.from_numpy(a)
        out[name] = t.to(torch.bfloat16) if header.tensors[name].dtype == "BF16" else t
    return out


def _load_tensors(path: Path) -> tuple[_fmt.SafetensorsHeader, dict[str, torch.Tensor]]:
    """Every tensor of a PEFT safetensors file (floating point only, checked), as torch."""
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found (only safetensors adapters are read; pickled .bin files are "
            "never loaded)"
        )
    header = _fmt.read_safetensors_header(path)
    for name, entry in header.tensors.items():
        if entry.dtype not in _fmt.PARAMETER_DTYPES:
            raise BcaFormatError(
                path, name, f"dtype {entry.dtype_name}, expected a floating point dtype"
            )
    return header, _torch_tensors(header, _fmt.read_tensors(header, list(header.tensors)))


def _prepare_dst(dst: str | Path, overwrite: bool) -> Path:
    """Check that ``dst`` may be written (it is created atomically by the caller)."""
    out = Path(dst)
    if out.exists() and any(out.iterdir()) and not overwrite:
        if (out / CONFIG_NAME).exists() or (out / WEIGHTS_NAME).exists():
            raise FileExistsError(f"{out} already holds an adapter; pass overwrite=True")
    return out


def _strip_peft(key: str) -> str:
    return key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key


def _under_module(name: str, module: str) -> bool:
    """True when the parameter ``name`` lives under a module matched by PEFT's
    ``modules_to_save`` entry ``module`` (a name suffix at a dot boundary)."""
    return name.startswith(module + ".") or ("." + module + ".") in name


def c3a_adapter_dir_to_bca(
    src: str | Path,
    dst: str | Path,
    *,
    base_model: nn.Module | None = None,
    overwrite: bool = False,
) -> Path:
    """Convert a PEFT C3A adapter directory (``save_pretrained`` output) to a bca adapter
    directory that ``bca.model.load_adapter`` reads.

    Only ``adapter_config.json`` and ``adapter_model.safetensors`` are read. The bca module
    names are PEFT's tensor names without ``base_model.model.`` and ``.c3a_kernel``, i.e.
    names inside the model PEFT wrapped. Trained ``modules_to_save`` copies are carried
    over. When ``base_model`` is given, every adapted module must exist in it as an
    ``nn.Linear`` of the kernel's size, and its class is recorded in the fingerprint.
    """
    _require_torch("bca.peft_interop.c3a_adapter_dir_to_bca")
    src_p = Path(src)
    cfg_path, w_path = src_p / CONFIG_NAME, src_p / WEIGHTS_NAME
    cfg = _fmt.read_json_object(cfg_path, "PEFT adapter config")
    peft_type = cfg.get("peft_type")
    if not isinstance(peft_type, str) or peft_type.upper() != "C3A":
        raise BcaFormatError(
            cfg_path, "peft_type", f"{src_p} holds a {_fmt.kind_of(peft_type)} adapter, not C3A"
        )
    if cfg.get("bias", "none") not in ("none", None):
        raise BcaFormatError(
            cfg_path,
            "bias",
            f"C3A adapter with bias={_fmt.kind_of(cfg['bias'])}: trained biases are not part of "
            "a bca adapter; retrain with bias='none'",
        )
    check = _fmt.FieldChecker(cfg_path)
    mts_value = cfg.get("modules_to_save")
    mts_entries = [] if mts_value is None else check.names(mts_value, "modules_to_save")
    peft_block_size = cfg.get("block_size")
    if peft_block_size is not None:
        check.integer(peft_block_size, "block_size")
    target = cfg.get("target_modules")
    if isinstance(target, list):
        check.names(target, "target_modules")
    name_or_path = check.text(
        cfg.get("base_model_name_or_path"), "base_model_name_or_path", optional=True
    )
    peft_version = cfg.get("peft_version")
    _, tensors = _load_tensors(w_path)

    kernels: dict[str, torch.Tensor] = {}
    extra: dict[str, torch.Tensor] = {}
    used_mts: set[str] = set()
    for key, t in tensors.items():
        name = _strip_peft(key)
        if key.endswith(C3A_SUFFIX):
            kernels[name[: -len(C3A_SUFFIX)]] = t
            continue
        owner = next((m for m in mts_entries if _under_module(name, m)), None)
        if owner is None:
            raise BcaFormatError(
                w_path,
                key,
                f"tensor {key!r} is neither a C3A kernel nor part of modules_to_save={mts_entries}",
            )
        used_mts.add(owner)
        extra[MTS_PREFIX + name] = t
    if not kernels:
        raise BcaFormatError(w_path, "", "holds no C3A kernel")

    named_modules = dict(base_model.named_modules()) if base_model is not None else {}
    out_tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, dict[str, Any]] = {}
    for name, w in sorted(kernels.items()):
        key = PEFT_PREFIX + name + C3A_SUFFIX
        try:
            q_out, q_in, p = _check_kernel(w, f"tensor {key!r}")
        except ValueError as e:
            raise BcaFormatError(w_path, key, str(e)) from None
        if not bool(w.isfinite().all()):
            raise BcaFormatError(w_path, key, "contains NaN or Inf")
        d_in, d_out = q_in * p, q_out * p
        if base_model is not None:
            _check_base_linear(named_modules, name, d_in, d_out)
        out_dtype = w.dtype if w.dtype == _float64() else _float32()
        c = c3a_kernel_to_bca(w.double(), d_in).to(out_dtype).contiguous()
        out_tensors[name + BCA_SUFFIX] = c
        modules[name] = {
            "in_features": d_in,
            "out_features": d_out,
            "block_size": p,
            "is_conv1d": False,
        }
    out_tensors.update({k: v.contiguous() for k, v in extra.items()})

    sizes = Counter(m["block_size"] for m in modules.values())
    block_size = peft_block_size or sizes.most_common(1)[0][0]
    targets = sorted(target) if isinstance(target, list) else sorted(modules)
    init = _PEFT_INIT_TO_BCA.get(str(cfg.get("init_weights", "xavier_uniform")), "zeros")
    bca_cfg = {
        "format": "bca",
        "format_version": 1,
        "block_size": block_size,
        "scale": 1.0,
        "target_modules": targets,
        "init": init,
        "pad": False,
        "modules_to_save": sorted(used_mts),
        "base_model": {
            "name_or_path": name_or_path,
            "class": type(base_model).__name__ if base_model is not None else None,
            "fingerprint": {
                n: {k: m[k] for k in ("in_features", "out_features", "is_conv1d")}
                for n, m in modules.items()
            },
        },
        "modules": modules,
        "converted_from": {
            "peft_type": "C3A",
            "peft_version": peft_version if isinstance(peft_version, str) else None,
        },
    }
    out = _prepare_dst(dst, overwrite)
    from safetensors.torch import save_file

    return _fmt.write_adapter(
        out, bca_cfg, lambda path: save_file(out_tensors, str(path), metadata={"format": "pt"})
    )


def _check_base_linear(named: Mapping[str, Any], name: str, d_in: int, d_out: int) -> None:
    import torch.nn as nn

    mod = named.get(name)
    base = getattr(mod, "base_layer", None)
    if isinstance(base, nn.Module):
        mod = base
    if not isinstance(mod, nn.Linear):
        raise BcaError(f"base_model has no nn.Linear named {name!r} (found {type(mod).__name__})")
    if (mod.in_features, mod.out_features) != (d_in, d_out):
        raise ShapeError(
            f"module {name!r} is {mod.in_features}->{mod.out_features} in base_model but the "
            f"adapter kernel is for {d_in}->{d_out}"
        )


def _c3a_refusal(name: str, info: ModuleInfo) -> str | None:
    p, d_in, d_out = info.block_size, info.in_features, info.out_features
    if info.is_conv1d:
        return f"module {name!r} wraps a transformers Conv1D; PEFT's C3A supports nn.Linear only"
    if d_in % p or d_out % p:
        return (
            f"module {name!r} is {d_in}->{d_out} with block_size={p}: a zero-padded bca "
            "adapter; PEFT's C3A needs block_size to divide in_features and out_features"
        )
    return None


def _c3a_config_dict(
    modules: Mapping[str, ModuleInfo],
    block_size: int | None,
    modules_to_save: list[str],
    base_model_name_or_path: str | None,
    task_type: str | None,
) -> Any:
    from peft import C3AConfig

    sizes = Counter(m.block_size for m in modules.values())
    default = block_size if block_size is not None and block_size in sizes else None
    if default is None:
        default = sizes.most_common(1)[0][0]
    pattern = {n: m.block_size for n, m in modules.items() if m.block_size != default}
    return C3AConfig(
        block_size=int(default),
        target_modules=sorted(modules),
        block_size_pattern=pattern,
        modules_to_save=modules_to_save or None,
        base_model_name_or_path=base_model_name_or_path,
        task_type=task_type,
        init_weights=True,
        bias="none",
    )


def bca_adapter_dir_to_c3a(
    src: str | Path,
    dst: str | Path,
    *,
    task_type: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Convert a bca adapter directory to a PEFT C3A adapter directory that
    ``peft.PeftModel.from_pretrained(base_model, dst)`` loads.

    The bca ``scale`` is folded into the C3A kernels (C3A has none). Modules with a block
    size other than the most common one go to ``block_size_pattern`` under their full
    names. Raises ``ValueError`` for padded adapters and Conv1D targets, which C3A cannot
    hold. ``task_type`` (e.g. ``"SEQ_CLS"``) is written to the PEFT config; PEFT uses it to
    pick the ``PeftModel`` subclass.
    """
    _require_torch("bca.peft_interop.bca_adapter_dir_to_c3a")
    files = _fmt.read_adapter_files(src)  # every check of the format, nothing unpickled
    doc = files.doc
    problems = [msg for n, m in doc.modules.items() if (msg := _c3a_refusal(n, m)) is not None]
    if problems:
        raise BcaError(f"cannot convert {doc.path} to PEFT C3A: " + "; ".join(problems))
    import torch

    out_tensors: dict[str, torch.Tensor] = {}
    for name, info in doc.modules.items():
        c = torch.from_numpy(files.kernels[name])
        w = bca_kernel_to_c3a(c.double(), info.in_features, doc.scale).to(_float32())
        out_tensors[PEFT_PREFIX + name + C3A_SUFFIX] = w.contiguous()
    saved = _torch_tensors(
        files.header, {MTS_PREFIX + k: v for k, v in files.modules_to_save.items()}
    )
    for key, t in saved.items():
        out_tensors[PEFT_PREFIX + key[len(MTS_PREFIX) :]] = t.contiguous()
    peft_cfg = _c3a_config_dict(
        doc.modules, doc.block_size, doc.modules_to_save, doc.base_name_or_path, task_type
    )
    out = _prepare_dst(dst, overwrite)
    from safetensors.torch import save_file

    with _fmt.atomic_directory(out) as stage:
        save_file(out_tensors, str(stage / WEIGHTS_NAME), metadata={"format": "pt"})
        peft_cfg.save_pretrained(str(stage))
    return out


def _float32() -> Any:
    import torch

    return torch.float32


def _float64() -> Any:
    import torch

    return torch.float64


# --------------------------------------------------------------------------- in memory


def _c3a_layers(model: nn.Module) -> list[tuple[str, Any]]:
    from peft.tuners.c3a import C3ALinear

    return [(n, m) for n, m in model.named_modules() if isinstance(m, C3ALinear)]


def _inner_model(peft_model: nn.Module) -> nn.Module:
    """The user's model inside a PeftModel (``peft_model.base_model.model``)."""
    tuner = getattr(peft_model, "base_model", None)
    inner = getattr(tuner, "model", None)
    if inner is None:
        raise TypeError(
            "peft_model must be a peft.PeftModel with C3A adapters, got "
            f"{type(peft_model).__name__}"
        )
    return inner  # type: ignore[no-any-return]


def _unwrap_peft(inner: nn.Module, adapter_name: str) -> tuple[nn.Module, list[str]]:
    """Put the base layers back in place of C3A layers and the trained copies of
    ``modules_to_save`` in place of their wrappers (PEFT 0.21's ``unload()`` fails on
    ``modules_to_save`` modules without a ``weight``, e.g. RoBERTa's classification head)."""
    from peft.tuners.c3a import C3ALinear
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    replace: list[tuple[str, nn.Module]] = []
    mts: list[str] = []
    skip: list[str] = []
    for n, m in inner.named_modules():
        if any(n.startswith(s + ".") for s in skip):
            continue
        if isinstance(m, C3ALinear):
            replace.append((n, m.get_base_layer()))
            skip.append(n)
        elif isinstance(m, ModulesToSaveWrapper):
            trained = m.modules_to_save[adapter_name] if adapter_name in m.modules_to_save else None
            replace.append((n, trained if trained is not None else m.original_module))
            if trained is not None:
                mts.append(n)
            skip.append(n)
        elif isinstance(m, BaseTunerLayer) or type(m).__name__.endswith("Wrapper"):
            raise BcaError(
                f"module {n!r} is a {type(m).__name__}; only C3A layers and modules_to_save "
                "can be converted to bca"
            )
    for n, new in replace:
        parent_name, _, child = n.rpartition(".")
        parent = inner.get_submodule(parent_name) if parent_name else inner
        setattr(parent, child, new)
    if hasattr(inner, "peft_config"):
        del inner.peft_config
    return inner, mts


def c3a_model_to_bca(
    peft_model: nn.Module, *, adapter_name: str | None = None, backend: str = "auto"
) -> nn.Module:
    """Turn a ``PeftModel`` with C3A adapters into the base model with bca adapters.

    Like PEFT's ``unload()``, this works **in place**: the PeftModel is taken apart and its
    base model (the one given to ``get_peft_model``, with the trained ``modules_to_save``
    copies put back) is returned with a :class:`bca.nn.BlockCirculantLinear` on every
    C3A layer, holding the same ΔW at ``scale=1``. ``copy.deepcopy`` the PeftModel first
    to keep it. Only ``adapter_name`` (default: the active adapter) is converted.
    The result is frozen except kernels and ``modules_to_save``, and
    ``bca.model.save_adapter`` can save it.
    """
    from bca.model import BCAConfig, inject_adapters
    from bca.nn import BACKENDS, BlockCirculantLinear

    if backend not in BACKENDS:
        raise BcaError(f"backend must be one of {BACKENDS}, got {backend!r}")
    inner = _inner_model(peft_model)
    configs = getattr(peft_model, "peft_config", {})
    name = adapter_name if adapter_name is not None else peft_model.active_adapter
    if not isinstance(name, str) or name not in configs:
        raise BcaError(f"adapter_name {name!r} not in the model's adapters {sorted(configs)}")
    cfg = configs[name]
    if str(getattr(cfg, "peft_type", "")).upper().rsplit(".", 1)[-1] != "C3A":
        raise BcaError(f"adapter {name!r} is a {cfg.peft_type} adapter, not C3A")
    if getattr(cfg, "bias", "none") != "none":
        raise BcaError(
            f"C3A adapter with bias={cfg.bias!r}: trained biases are not part of a bca adapter"
        )
    kernels: dict[str, torch.Tensor] = {}
    for mod_name, layer in _c3a_layers(inner):
        if name not in layer.c3a_kernel:
            continue
        if layer.merged:
            raise BcaError(f"C3A layer {mod_name!r} is merged; call unmerge_adapter() first")
        kernels[mod_name] = layer.c3a_kernel[name].detach().clone()
    if not kernels:
        raise BcaError(f"the model has no C3A layer for adapter {name!r}")
    base, mts = _unwrap_peft(inner, name)

    sizes = Counter(int(k.shape[-1]) for k in kernels.values())
    default = sizes.most_common(1)[0][0]
    config = BCAConfig(
        block_size=default,
        target_modules=sorted(kernels),
        scale=1.0,
        init="zeros",
        pad=False,
        backend=backend,
        modules_to_save=mts,
        block_size_pattern={
            n: int(k.shape[-1]) for n, k in kernels.items() if k.shape[-1] != default
        },
    )
    inject_adapters(base, config)
    import torch

    with torch.no_grad():
        for mod_name, w in kernels.items():
            layer = base.get_submodule(mod_name)
            assert isinstance(layer, BlockCirculantLinear)
            if layer.kernel_shape != tuple(w.shape):  # pragma: no cover - defensive
                raise RuntimeError(
                    f"{mod_name}: kernel shape {layer.kernel_shape} != {tuple(w.shape)}"
                )
            c = c3a_kernel_to_bca(w.double(), layer.in_features)
            layer.bca_kernel.copy_(c.to(layer.bca_kernel.dtype))
    return base


def bca_model_to_c3a(
    model: nn.Module, *, adapter_name: str = "default", task_type: str | None = None
) -> Any:
    """Turn a model with bca adapters into a ``peft.PeftModel`` with C3A adapters.

    In place: each :class:`bca.nn.BlockCirculantLinear` is replaced by its base layer and
    PEFT's ``get_peft_model`` wraps the model with C3A layers holding the same
    ``scale · ΔW``; ``modules_to_save`` carry over (with their trained values). Raises
    ``ValueError`` for padded adapters, Conv1D targets and merged adapters, which PEFT's
    C3A cannot hold. ``task_type`` (e.g. ``"SEQ_CLS"``) selects the PeftModel subclass.
    """
    import peft
    import torch

    from bca.model import adapter_modules

    modules = dict(adapter_modules(model))
    if not modules:
        raise BcaError("model has no bca adapters")
    problems = []
    for n, m in modules.items():
        if m.merged:
            problems.append(f"module {n!r} is merged; unmerge it first")
            continue
        if len(m.adapter_names) != 1:
            problems.append(
                f"module {n!r} has adapters {m.adapter_names}; convert one adapter "
                "(bca.model.delete_adapter the others)"
            )
            continue
        msg = _c3a_refusal(
            n, ModuleInfo(n, m.in_features, m.out_features, m.block_size, m.is_conv1d)
        )
        if msg is not None:
            problems.append(msg)
    if problems:
        raise BcaError("cannot convert to PEFT C3A: " + "; ".join(problems))
    bca_cfg = getattr(model, "bca_config", None)
    mts = list(getattr(bca_cfg, "modules_to_save", []) or [])
    kernels = {
        n: bca_kernel_to_c3a(m.bca_kernel.detach().double(), m.in_features, m.scale).float()
        for n, m in modules.items()
    }
    info = {
        n: ModuleInfo(n, m.in_features, m.out_features, m.block_size, m.is_conv1d)
        for n, m in modules.items()
    }
    for n, m in modules.items():
        parent_name, _, child = n.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, m.base_layer)
    for attr in ("bca_config", "bca_configs"):
        if hasattr(model, attr):
            delattr(model, attr)
    name_or_path = getattr(getattr(model, "config", None), "name_or_path", None) or None
    config = _c3a_config_dict(
        info, getattr(bca_cfg, "block_size", None), mts, name_or_path, task_type
    )
    pm = peft.get_peft_model(model, config, adapter_name=adapter_name)
    inner = _inner_model(pm)
    with torch.no_grad():
        for n, w in kernels.items():
            layer: Any = inner.get_submodule(n)
            k = layer.c3a_kernel[adapter_name]
            if tuple(k.shape) != tuple(w.shape):
                raise RuntimeError(
                    f"PEFT built a {tuple(k.shape)} kernel for {n!r}, expected {tuple(w.shape)}"
                )
            k.copy_(w.to(device=k.device, dtype=k.dtype))
    return pm


# --------------------------------------------------------------------------- PEFT patch


def _bca_delta(layer: Any, name: str, x: torch.Tensor, backend: str) -> torch.Tensor:
    """``ΔW x`` of the C3A adapter ``name`` of ``layer``: the kernel mapped to bca's
    convention (differentiably) and applied by :func:`bca.nn.functional.block_circulant`
    with the layer's cache for that adapter (Rust operator, eval-mode spectra)."""
    import torch

    from bca.nn.functional import block_circulant

    cdtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    w = layer.c3a_kernel[name]
    kernel = _c3a_to_bca_torch(w if w.dtype == cdtype else w.to(cdtype), layer.in_features)
    return block_circulant(
        x if x.dtype == cdtype else x.to(cdtype),
        kernel,
        layer.in_features,
        layer.out_features,
        backend=backend,
        cache=layer._bca_caches.get(name),
        training=layer.training,
    )


def _patched_c3a_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    previous_dtype = x.dtype
    if self.disable_adapters:
        if self.merged:
            self.unmerge()
        result = self.base_layer(x, *args, **kwargs)
    elif self.merged:
        result = self.base_layer(x, *args, **kwargs)
    else:
        result = self.base_layer(x, *args, **kwargs)
        for active_adapter in self.active_adapters:
            if active_adapter not in self.c3a_kernel.keys():
                continue
            delta = _bca_delta(self, active_adapter, x, self._bca_backend)
            result = result + delta.to(result.dtype)
    return result.to(previous_dtype)  # type: ignore[no-any-return]


def patch_peft_c3a(peft_model: nn.Module, *, backend: str = "auto") -> int:
    """Run every C3A layer of a PEFT model through bca, keeping PEFT's parameters.

    The PEFT workflow stays as it is (``get_peft_model``, training, ``save_pretrained``,
    ``merge_and_unload``; the ``c3a_kernel`` parameters are unchanged); only each
    ``C3ALinear``'s forward is replaced by one that maps the kernel to bca's convention
    (differentiably) and applies it with :func:`bca.nn.functional.block_circulant`, the
    product :class:`bca.nn.BlockCirculantLinear` uses: bca's Rust core (``backend="rust"``,
    CPU) or real FFTs in torch (``"torch"``, any device); ``"auto"`` picks Rust on CPU.
    Each layer keeps a :class:`bca.nn.KernelCache` per adapter (the Rust operator, and in
    eval mode the spectra, are not rebuilt while the kernel is unchanged); patched models
    compile with ``torch.compile(fullgraph=True)``. Gradients then match the dense oracle,
    unlike PEFT 0.21's own C3A backward (wrong input gradient).
    Several active adapters each see the layer input (PEFT 0.21 feeds the second adapter
    the first one's output). Returns the number of layers patched; undo with
    :func:`unpatch_peft_c3a`.
    """
    from bca.nn import BACKENDS, rust_available

    if backend not in BACKENDS:
        raise BcaError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "rust" and not rust_available():
        raise RuntimeError("backend='rust' needs the compiled extension bca._bca")
    import types

    layers = _c3a_layers(peft_model)
    if not layers:
        raise BcaError(f"{type(peft_model).__name__} has no PEFT C3A layers to patch")
    from bca.nn import KernelCache

    for _, layer in layers:
        layer._bca_backend = backend
        layer._bca_caches = {name: KernelCache() for name in layer.c3a_kernel}
        layer.forward = types.MethodType(_patched_c3a_forward, layer)
    return len(layers)


def unpatch_peft_c3a(peft_model: nn.Module) -> int:
    """Restore PEFT's own C3A forward on layers patched by :func:`patch_peft_c3a`."""
    n = 0
    for _, layer in _c3a_layers(peft_model):
        if "forward" in layer.__dict__:
            del layer.forward
            n += 1
        layer.__dict__.pop("_bca_backend", None)
        layer.__dict__.pop("_bca_caches", None)
    return n
