"""``bca bench`` without a name: one adapted layer, contenders side by side.

Times the adapter's extra work ``ΔW x`` for a ``d × d`` layer: a dense ΔW matmul, bca's
``BlockCirculantLinear.adapter_forward`` with the rust and torch backends (spectra
cached), and PEFT's C3A layer's delta (when peft is installed). Same threads for all;
median of ``repeats``; ratios against the dense ΔW product.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["builtin_bench"]


def _median_ms(fn: Callable[[], Any], repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def builtin_bench(
    sizes: Sequence[int], block_size: int, rows: Sequence[int], repeats: int, threads: int
) -> str:
    import torch
    from torch import nn

    from .. import core
    from ..nn import BlockCirculantLinear, rust_available
    from .report import markdown_table

    torch.set_num_threads(threads)
    core.set_num_threads(threads)
    torch.manual_seed(0)
    header = [
        "d",
        "p",
        "rows",
        "dense ΔW (ms)",
        "bca rust (ms)",
        "bca torch (ms)",
        "PEFT C3A (ms)",
        "rust / dense",
        "torch / dense",
    ]
    out_rows = []
    for d in sizes:
        if d % block_size:
            raise ValueError(f"block size {block_size} must divide every size, got d={d}")
        base = nn.Linear(d, d)
        layer = BlockCirculantLinear(base, block_size, init="gaussian")
        dense = layer.delta_weight().detach().clone()
        c3a: Any = None
        try:
            from peft import C3AConfig, get_peft_model

            holder = nn.Sequential()
            holder.add_module("lin", nn.Linear(d, d))
            c3a = get_peft_model(holder, C3AConfig(block_size=block_size, target_modules=["lin"]))
            c3a_layer = c3a.base_model.model.lin
        except Exception:  # noqa: BLE001 - peft missing or incompatible: column shows —
            c3a = None
        for n in rows:
            x = torch.randn(n, d)
            with torch.no_grad():
                t_dense = _median_ms(lambda x=x, w=dense: x @ w.T, repeats)  # type: ignore[misc]
                t_rust = float("nan")
                if rust_available():
                    layer.backend = "rust"
                    t_rust = _median_ms(lambda x=x, m=layer: m.adapter_forward(x), repeats)  # type: ignore[misc]
                layer.backend = "torch"
                t_torch = _median_ms(lambda x=x, m=layer: m.adapter_forward(x), repeats)  # type: ignore[misc]
                t_c3a = float("nan")
                if c3a is not None:
                    t_c3a = _median_ms(
                        lambda x=x, m=c3a_layer: m(x) - m.base_layer(x),  # type: ignore[misc]
                        repeats,
                    )
            out_rows.append(
                [
                    d,
                    block_size,
                    n,
                    f"{t_dense:.3f}",
                    f"{t_rust:.3f}" if t_rust == t_rust else "—",
                    f"{t_torch:.3f}",
                    f"{t_c3a:.3f}" if t_c3a == t_c3a else "—",
                    f"{t_rust / t_dense:.2f}" if t_rust == t_rust else "—",
                    f"{t_torch / t_dense:.2f}",
                ]
            )
    note = (
        f"\nMedian of {repeats} repeats, {threads} threads, float32. PEFT C3A's time includes "
        "its base layer subtracted back out (an upper bound)."
    )
    return markdown_table(header, out_rows) + note
