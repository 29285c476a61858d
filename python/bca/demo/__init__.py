"""The ``bca demo`` and ``bca experiment`` implementations.

* :mod:`bca.demo.data` — labelled corpora shipped inside installed packages.
* :mod:`bca.demo.train` — the MiniLM classifier, method setup, training, evaluation.
* :mod:`bca.demo.run` — :func:`run_demo`, the report.
* :mod:`bca.demo.stability` — :func:`run_stability` (lr ÷ p with and without).
* :mod:`bca.demo.bench` — the built-in layer comparison of ``bca bench``.

Importing this package imports nothing heavy; torch and transformers load on use.
"""

from __future__ import annotations

import os
import sys
from typing import Any

__all__ = ["run_demo", "run_stability", "DemoOptions", "StabilityOptions"]


def passive_openmp() -> None:
    """Let torch's OpenMP threads sleep, not spin, while they wait (before torch loads).

    With the default (active) wait policy, a torch thread whose partner has been
    descheduled spins for its whole time slice: on 2 cores shared with other jobs the
    demo's training ran 5-7 times slower with 2 threads than with 1 (12 BCA steps: 54 s
    against 8.5 s at load 8); with ``OMP_WAIT_POLICY=PASSIVE`` 2 threads took 7.5-10 s.
    A value the user set is kept; once torch is loaded (a library caller) nothing is
    changed, as OpenMP has read its settings.
    """
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def __getattr__(name: str) -> Any:
    if name in ("run_demo", "DemoOptions"):
        from . import run

        return getattr(run, name)
    if name in ("run_stability", "StabilityOptions"):
        from . import stability

        return getattr(stability, name)
    raise AttributeError(name)
