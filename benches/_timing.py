"""Shared timing helpers for the benches: interleaved repeats, medians, tables."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def pin_threads(n: int) -> None:
    """Give every contender the same thread count (torch, the bca core, BLAS)."""
    for var in (
        "OMP_NUM_THREADS",
        "MKL_NUM_THREADS",
        "OPENBLAS_NUM_THREADS",
        "RAYON_NUM_THREADS",
        "BCA_NUM_THREADS",
    ):
        os.environ[var] = str(n)
    try:
        import torch

        torch.set_num_threads(n)
    except ImportError:
        pass
    import bca

    bca.set_num_threads(n)


def time_interleaved(
    contenders: dict[str, Callable[[], Any]],
    repeats: int,
    min_sample_s: float = 2e-3,
    sync: Callable[[], None] | None = None,
) -> dict[str, dict[str, float]]:
    """Median seconds per call of each contender, timed round-robin so that load on a
    noisy machine hits every contender alike. Each sample runs enough calls to last at
    least ``min_sample_s``."""
    inner: dict[str, int] = {}
    for name, fn in contenders.items():  # warm up and calibrate
        fn()
        if sync:
            sync()
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        once = max(time.perf_counter() - t0, 1e-7)
        inner[name] = max(1, int(min_sample_s / once))
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            k = inner[name]
            t0 = time.perf_counter()
            for _ in range(k):
                fn()
            if sync:
                sync()
            samples[name].append((time.perf_counter() - t0) / k)
    return {
        name: {
            "median_s": statistics.median(s),
            "min_s": min(s),
            "iqr_s": (statistics.quantiles(s, n=4)[2] - statistics.quantiles(s, n=4)[0])
            if len(s) >= 4
            else 0.0,
            "calls_per_sample": inner[name],
            "samples": len(s),
        }
        for name, s in samples.items()
    }


def time_rounds(
    contenders: dict[str, Callable[[], Any]], repeats: int, min_sample_s: float = 0.02
) -> dict[str, dict[str, list[float]]]:
    """Per contender, ``repeats`` samples of (process CPU, wall) seconds per call, one
    sample per contender per round, the order rotating every round (no contender always
    runs first, after the others have evicted its data from the caches). Each sample runs
    enough calls to last ``min_sample_s`` of CPU time.

    On a shared, oversubscribed machine wall-clock latency mostly measures waiting for a
    core; CPU time measures the work (with one intra-op thread and no spinning, the
    latency the call has on an idle core)."""
    inner: dict[str, int] = {}
    for name, fn in contenders.items():
        fn()
        t0 = time.process_time()
        fn()
        once = max(time.process_time() - t0, 1e-6)
        inner[name] = max(1, int(min_sample_s / once))
    out: dict[str, dict[str, list[float]]] = {n: {"cpu": [], "wall": []} for n in contenders}
    names = list(contenders)
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            fn, k = contenders[name], inner[name]
            w0, c0 = time.perf_counter(), time.process_time()
            for _ in range(k):
                fn()
            out[name]["cpu"].append((time.process_time() - c0) / k)
            out[name]["wall"].append((time.perf_counter() - w0) / k)
    return out


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and "cpu" not in info:
                    info["cpu"] = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and "simd" not in info:
                    flags = set(line.split(":", 1)[1].split())
                    simd = "AVX2+FMA" if "fma" in flags else "baseline"
                    info["simd"] = "AVX-512" if "avx512f" in flags else simd
                if "cpu" in info and "simd" in info:
                    break
    except OSError:
        pass
    return info


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out) + "\n"


def write_results(stem: str, payload: dict[str, Any], table_md: str, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(payload, indent=2))
    (out_dir / f"{stem}.md").write_text(table_md)
