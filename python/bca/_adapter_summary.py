"""What a saved adapter holds and costs, from its checked config and safetensors header
alone (no tensor data read; numpy only): per-module shapes, parameters and FLOPs
(bca.cost's two conventions), fully trained parameters, base weight sketches. Used by
``bca info``."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from . import _adapter_format

__all__ = ["adapter_summary"]


def adapter_summary(adapter: str | os.PathLike[str], tokens: int = 128) -> dict[str, Any]:
    """A JSON-ready summary of the saved adapter folder ``adapter``; FLOP totals for
    ``tokens`` tokens. Malformed files raise :class:`bca.BcaFormatError`."""
    from .cost import LayerShape, Method, adapter_flops, adapter_parameters

    # the config and the safetensors header, checked against each other (dtypes, shapes,
    # offsets); no tensor data is read
    doc, header = _adapter_format.read_weights_header(adapter)
    rows = []
    total_params = total_real = total_paper = 0.0
    for name, m in doc.modules.items():
        layer = LayerShape(name, m.in_features, m.out_features, m.is_conv1d)
        method = Method("bca", block_size=m.block_size)
        params = adapter_parameters(method, layer)
        real = adapter_flops(method, layer, "real")
        paper = adapter_flops(method, layer, "paper")
        rows.append(
            {
                "module": name,
                "in_features": layer.in_features,
                "out_features": layer.out_features,
                "block_size": method.block_size,
                "kernel_shape": list(header.tensors[m.kernel_key].shape),
                "params": params,
                "flops_per_token_real": real.per_token,
                "flops_per_token_paper": paper.per_token + paper.per_call,
            }
        )
        total_params += params
        total_real += real.per_token
        total_paper += paper.per_token + paper.per_call
    prefix = _adapter_format.MODULES_TO_SAVE_PREFIX
    saved = {
        k[len(prefix) :]: list(e.shape) for k, e in header.tensors.items() if k.startswith(prefix)
    }
    saved_params = sum(math.prod(v) for v in saved.values())
    return {
        "adapter": str(Path(adapter)),
        "base_model": doc.base_name_or_path,
        "base_class": doc.base_class,
        "base_weight_sketch": sorted(doc.weight_sketch),
        "scale": doc.scale,
        "modules": rows,
        "adapter_params": int(total_params),
        "modules_to_save": saved,
        "modules_to_save_params": int(saved_params),
        "flops_per_token_real": total_real,
        "flops_per_token_paper": total_paper,
        "tokens": tokens,
        "flops_total_real": total_real * tokens,
    }
