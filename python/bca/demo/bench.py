"""``bca bench`` without a name: one adapted layer, contenders side by side.

Times the adapter's extra work ``ΔW x`` for a ``d × d`` layer: a dense ΔW matmul, bca's
``BlockCirculantLinear.adapter_forward`` with the rust and torch backends (spectra
cached), and PEFT's C3A layer's delta (when peft is installed). Same threads for all;
ratios against the dense ΔW product.

Timings go through :func:`bca._timing.measure`: process CPU time by default (the work
done, which a busy machine does not inflate), calls batched so that one sample is well
above the clock's resolution, repeated until the samples agree. :func:`measure_ms` is the
same for the demo's latency table, and :func:`timing_note` the line a report prints
under its timings (clock, and a warning naming the load when the machine is busy).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from .._timing import Load, load_warning, machine_load, measure

__all__ = ["builtin_bench", "measure_ms", "timing_note"]

CLOCK_NAMES = {"cpu": "process CPU time (all threads)", "wall": "wall-clock time"}


def measure_ms(
    fn: Callable[[], Any], *, clock: str = "cpu", min_samples: int = 5, budget_s: float = 2.0
) -> float:
    """Milliseconds per call of ``fn()`` (median, torch's autograd off): the demo's
    latencies. Process CPU time by default; see :func:`bca._timing.measure`."""
    import torch

    with torch.no_grad():
        return measure(fn, clock=clock, min_samples=min_samples, budget_s=budget_s).median


def _worst(loads: Sequence[Load]) -> Load:
    known = [x for x in loads if x.load1 == x.load1]
    return max(known, key=lambda x: x.load1) if known else loads[-1]


def timing_note(clock: str = "cpu", loads: Sequence[Load] = (), threads: int = 1) -> str:
    """What the timings are, and a warning with the load average when the machine was
    busy (the worst of ``loads``, read before and after timing; now when empty) for timings
    on ``threads`` threads."""
    load = _worst(list(loads) or [machine_load()])
    note = f"Timings: median {CLOCK_NAMES[clock]} per call, load average {load.load1:.1f} "
    note += f"on {load.cores} cores."
    warning = load_warning(load, clock, threads)
    return note + ("\n" + warning if warning else "")


def builtin_bench(
    sizes: Sequence[int],
    block_size: int,
    rows: Sequence[int],
    repeats: int,
    threads: int,
    clock: str = "cpu",
) -> str:
    import torch
    from torch import nn

    from .. import core
    from ..nn import BlockCirculantLinear, rust_available
    from .report import markdown_table

    loads = [machine_load()]

    def _median_ms(fn: Callable[[], Any], repeats: int) -> float:
        return measure(fn, clock=clock, min_samples=repeats, budget_s=1.0).median

    torch.set_num_threads(threads)
    core.set_num_threads(threads)
    torch.manual_seed(0)
    unit = "CPU ms" if clock == "cpu" else "ms"
    header = [
        "d",
        "p",
        "rows",
        f"dense ΔW ({unit})",
        f"bca rust ({unit})",
        f"bca torch ({unit})",
        f"PEFT C3A ({unit})",
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
    loads.append(machine_load())
    note = (
        f"\n{threads} threads, float32, at least {repeats} samples per cell. PEFT C3A's time "
        "includes its base layer subtracted back out (an upper bound).\n"
        + timing_note(clock, loads, threads)
    )
    return markdown_table(header, out_rows) + note
