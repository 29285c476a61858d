"""Reading saved bca adapters without torch, and saving/checking ONNX files."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ._splice import AdapterSpec

__all__ = ["SavedAdapter", "read_adapter", "save_checked", "load_onnx"]

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
MODULES_TO_SAVE_PREFIX = "modules_to_save."
_TWO_GB = 2**31 - 1


class SavedAdapter:
    """An adapter directory written by :func:`bca.model.save_adapter`, read with numpy."""

    def __init__(
        self,
        path: Path,
        config: dict[str, Any],
        specs: list[AdapterSpec],
        modules_to_save: dict[str, np.ndarray],
    ) -> None:
        self.path = path
        self.config = config
        self.specs = specs
        self.modules_to_save = modules_to_save

    def __repr__(self) -> str:
        return f"SavedAdapter({str(self.path)!r}, modules={[s.name for s in self.specs]})"


def read_adapter(directory: str | os.PathLike[str]) -> SavedAdapter:
    """Read ``adapter_config.json`` and ``adapter_model.safetensors`` (JSON + safetensors
    only, nothing unpickled) and check that every kernel's shape fits its module.

    Raises ``FileNotFoundError`` for a missing directory/file and ``ValueError`` naming
    the file and the problem for anything malformed.
    """
    path = Path(directory)
    if not path.is_dir():
        raise FileNotFoundError(f"adapter directory {str(path)!r} does not exist")
    cfg_path = path / ADAPTER_CONFIG_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"no {ADAPTER_CONFIG_NAME} in {str(path)!r}")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            doc = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_path} is not valid JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != "bca":
        raise ValueError(f'{cfg_path} is not a bca adapter config ("format" must be "bca")')
    if doc.get("format_version") != 1:
        raise ValueError(
            f"{cfg_path}: unsupported format_version {doc.get('format_version')!r} (reads 1)"
        )
    modules = doc.get("modules")
    if not isinstance(modules, dict) or not modules:
        raise ValueError(f'{cfg_path}: "modules" must be a non-empty object')
    try:
        scale = float(doc.get("scale", 1.0))
    except (TypeError, ValueError):
        raise ValueError(f'{cfg_path}: "scale" must be a number') from None
    if not np.isfinite(scale):
        raise ValueError(f'{cfg_path}: "scale" must be finite, got {scale}')
    w_path = path / ADAPTER_WEIGHTS_NAME
    if not w_path.is_file():
        raise FileNotFoundError(f"no {ADAPTER_WEIGHTS_NAME} in {str(path)!r}")
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(w_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{w_path} is not a readable safetensors file: {e}") from None
    specs: list[AdapterSpec] = []
    for name, info in modules.items():
        try:
            d_in, d_out, p = (int(info[k]) for k in ("in_features", "out_features", "block_size"))
        except (KeyError, TypeError, ValueError):
            raise ValueError(
                f"{cfg_path}: module {name!r} needs integer in_features, out_features and "
                "block_size"
            ) from None
        key = f"{name}.bca_kernel"
        if key not in tensors:
            raise ValueError(f"{w_path} lacks tensor {key!r}")
        k = tensors[key]
        want = (-(-d_out // p), -(-d_in // p), p)
        if tuple(k.shape) != want:
            raise ValueError(
                f"{w_path}: tensor {key!r} has shape {tuple(k.shape)}, expected {want} for "
                f"in_features={d_in}, out_features={d_out}, block_size={p}"
            )
        if k.dtype not in (np.float32, np.float64):
            raise ValueError(
                f"{w_path}: tensor {key!r} has dtype {k.dtype}, expected float32 or float64 "
                "(kernels are kept in float32 even for half-precision models; one cast to "
                "half after inject_adapters should be cast back before save_adapter)"
            )
        if not np.all(np.isfinite(k)):
            raise ValueError(f"{w_path}: tensor {key!r} contains NaN or Inf")
        specs.append(AdapterSpec(name, k, d_in, d_out, scale))
    mts = {
        k[len(MODULES_TO_SAVE_PREFIX) :]: v
        for k, v in tensors.items()
        if k.startswith(MODULES_TO_SAVE_PREFIX)
    }
    return SavedAdapter(path, doc, specs, mts)


def load_onnx(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Load an ONNX file (with its external data), with a clear error when unreadable."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"ONNX file {str(p)!r} does not exist")
    try:
        return onnx.load(str(p))
    except Exception as e:  # onnx raises DecodeError, RuntimeError, ...
        raise ValueError(f"{str(p)!r} is not a readable ONNX model: {e}") from None


def save_checked(
    model: onnx.ModelProto, path: str | os.PathLike[str], *, external_data: bool | None = None
) -> Path:
    """Save ``model`` and run ``onnx.checker.check_model`` (full check) on the file.

    Models of 2 GB or more (or ``external_data=True``) are saved with their tensors in
    ``<name>.data`` next to the file.
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    size = model.ByteSize()
    use_external = size >= _TWO_GB if external_data is None else bool(external_data)
    if use_external:
        data_name = out.name + ".data"
        if (out.parent / data_name).exists():
            (out.parent / data_name).unlink()
        onnx.save_model(
            model,
            str(out),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data_name,
            size_threshold=1024,
        )
    else:
        onnx.save_model(model, str(out))
    onnx.checker.check_model(str(out), full_check=True)
    return out
