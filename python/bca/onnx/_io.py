"""Reading saved bca adapters without torch, and saving/checking ONNX files."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .._adapter_format import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    finish_modes,
    read_adapter_files,
    replace_file,
    staging_directory,
)
from ._splice import AdapterSpec

__all__ = ["SavedAdapter", "read_adapter", "save_checked", "load_onnx"]

ADAPTER_CONFIG_NAME = CONFIG_NAME
ADAPTER_WEIGHTS_NAME = WEIGHTS_NAME
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

    Raises ``FileNotFoundError`` for a missing directory/file and
    :class:`bca.BcaFormatError` (a ``ValueError``) naming the file and the field for
    anything malformed: the checks of :func:`bca._adapter_format.read_adapter_files`
    (config fields of the wrong type or range, kernels that are not float32/float64, of
    the wrong shape or not finite, fully trained parameters that are not floats, unexpected
    tensors, truncated or corrupted files).
    """
    files = read_adapter_files(directory)
    doc = files.doc
    specs = [
        AdapterSpec(name, files.kernels[name], m.in_features, m.out_features, doc.scale)
        for name, m in doc.modules.items()
    ]
    return SavedAdapter(Path(directory), doc.raw, specs, files.modules_to_save)


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
    ``<name>.data`` next to the file. The write is atomic: the files are written and
    checked in a hidden staging folder next to ``path`` and moved into place with
    ``os.replace`` only when the check passes (the data file first; a replaced file keeps
    its mode), so a failure leaves a previous file at ``path`` as it was.
    """
    out = Path(path)
    size = model.ByteSize()
    use_external = size >= _TWO_GB if external_data is None else bool(external_data)
    stage = staging_directory(out.parent, out.name)
    try:
        tmp = stage / out.name
        data_name = out.name + ".data"
        if use_external:
            onnx.save_model(
                model,
                str(tmp),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=data_name,
                size_threshold=1024,
            )
        else:
            onnx.save_model(model, str(tmp))
        onnx.checker.check_model(str(tmp), full_check=True)
        finish_modes(stage)
        if (stage / data_name).exists():
            replace_file(stage / data_name, out.parent / data_name)
        replace_file(tmp, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return out
