"""Timings that mean something on a shared machine.

Wall-clock timings of a process that competes for the CPU measure the competition: on
a busy machine a call is preempted for whole scheduler ticks (4 ms at 250 Hz), so a
one-text forward can "take" longer than a 32-text one and values land on multiples of
the tick. :func:`measure` times with the **process CPU time** (every thread of this
process; ``time.process_time``) by default, which counts only the work done, batches
calls so that one sample is far above the clock's resolution, and repeats until the
samples agree (or a time budget is spent). :func:`machine_load` reads the load average
and the cores this process may use, and :func:`load_warning` says, in one line, when the
machine is too busy for wall-clock numbers (and so for latency) to be trusted.

Process CPU time sums the threads: a call that keeps 2 threads busy for 1 ms counts
2 ms, and a thread pool spinning while it waits for a preempted worker counts too. It is
the honest clock for one thread; compare contenders on the same thread count and read
CPU ms as work, not latency.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["CLOCKS", "Load", "Timing", "load_warning", "machine_load", "measure"]

#: ``"cpu"``: process CPU time (all threads); ``"wall"``: ``time.perf_counter``
CLOCKS: dict[str, Callable[[], float]] = {"cpu": time.process_time, "wall": time.perf_counter}

#: a load average above this fraction of the usable cores makes wall-clock timings suspect
BUSY_FRACTION = 0.75


@dataclass(frozen=True)
class Load:
    """The 1-minute load average (runnable threads, this process's included) and the
    cores this process may run on."""

    load1: float
    cores: int

    @property
    def busy(self) -> bool:
        """More runnable work than the cores take without queueing (``load1 >
        BUSY_FRACTION × cores``); unknown load (nan) is not busy."""
        return self.load1 > BUSY_FRACTION * self.cores


def machine_load() -> Load:
    """The machine's load now (``os.getloadavg``; nan where the platform has none)."""
    try:
        load1 = os.getloadavg()[0]
    except (AttributeError, OSError):
        load1 = math.nan
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return Load(float(load1), max(1, cores))


def load_warning(load: Load | None = None, clock: str = "cpu", threads: int = 1) -> str | None:
    """One line of warning when the machine is busy, else None: the load average, the
    cores, and what the load does to timings on ``clock`` with ``threads`` threads."""
    load = machine_load() if load is None else load
    if not load.busy:
        return None
    if clock == "cpu" and threads <= 1:
        what = "timings are this process's CPU time, which leaves out waiting for a core"
    elif clock == "cpu":
        what = (
            "CPU time leaves out waiting for a core but counts threads spinning while they "
            f"wait for one another, so {threads}-thread timings can be far too high "
            "(compare at 1 thread)"
        )
    else:
        what = "wall-clock timings include waiting for a core and do not hold"
    s = "s" if load.cores != 1 else ""
    return (
        f"warning: the machine is busy (load average {load.load1:.1f} on {load.cores} "
        f"core{s}): {what}; for latencies, rerun on an idle machine"
    )


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call: ``median`` (the figure to report) and ``best`` of
    ``samples`` samples of ``number`` calls each, on ``clock``; ``spread`` is the
    samples' interquartile range over the median, ``stable`` whether it is at most the
    tolerance asked for."""

    median: float
    best: float
    spread: float
    samples: int
    number: int
    clock: str
    stable: bool

    def __float__(self) -> float:
        return self.median


def _sample(fn: Callable[[], Any], number: int, clock: Callable[[], float]) -> float:
    t0 = clock()
    for _ in range(number):
        fn()
    return (clock() - t0) / number


def _spread(values: list[float]) -> float:
    if len(values) < 4:
        return math.inf
    q1, _, q3 = statistics.quantiles(values, n=4)
    med = statistics.median(values)
    return (q3 - q1) / med if med > 0 else math.inf


def measure(
    fn: Callable[[], Any],
    *,
    clock: str = "cpu",
    min_samples: int = 5,
    max_samples: int = 200,
    warmup: int = 2,
    min_sample_s: float = 0.005,
    tolerance: float = 0.05,
    budget_s: float = 5.0,
) -> Timing:
    """Time ``fn()``: ``warmup`` untimed calls, then samples of ``number`` calls each
    (``number`` chosen so that one sample takes at least ``min_sample_s``), at least
    ``min_samples`` of them and more, up to ``max_samples``, until the spread of the
    samples (interquartile range over median) is within ``tolerance`` or ``budget_s``
    seconds of the clock (and of the wall clock, ×4) are spent.

    Returns a :class:`Timing` in milliseconds per call.
    """
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {sorted(CLOCKS)}, got {clock!r}")
    if min_samples < 1 or max_samples < min_samples:
        raise ValueError(f"need 1 <= min_samples <= max_samples, got {min_samples}, {max_samples}")
    tick = CLOCKS[clock]
    for _ in range(warmup):
        fn()
    # calls per sample: grow until one sample is long enough to time well
    number = 1
    first = _sample(fn, number, tick)
    while first * number < min_sample_s and number < 1_000_000:
        number = max(number * 2, math.ceil(min_sample_s / max(first, 1e-9)))
        first = _sample(fn, number, tick)
    samples = [first]
    spent = first * number
    wall0 = time.perf_counter()
    while len(samples) < max_samples:
        if len(samples) >= min_samples and (
            _spread(samples) <= tolerance
            or spent >= budget_s
            or time.perf_counter() - wall0 >= 4 * budget_s
        ):
            break
        s = _sample(fn, number, tick)
        samples.append(s)
        spent += s * number
    spread = _spread(samples)
    return Timing(
        median=statistics.median(samples) * 1e3,
        best=min(samples) * 1e3,
        spread=spread,
        samples=len(samples),
        number=number,
        clock=clock,
        stable=spread <= tolerance,
    )
