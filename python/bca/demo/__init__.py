"""The ``bca demo`` and ``bca experiment`` implementations.

* :mod:`bca.demo.data` — labelled corpora shipped inside installed packages.
* :mod:`bca.demo.train` — the MiniLM classifier, method setup, training, evaluation.
* :mod:`bca.demo.run` — :func:`run_demo`, the report.
* :mod:`bca.demo.stability` — :func:`run_stability` (lr ÷ p with and without).
* :mod:`bca.demo.bench` — the built-in layer comparison of ``bca bench``.

Importing this package imports nothing heavy; torch and transformers load on use.
"""

from __future__ import annotations

from typing import Any

__all__ = ["run_demo", "run_stability", "DemoOptions", "StabilityOptions"]


def __getattr__(name: str) -> Any:
    if name in ("run_demo", "DemoOptions"):
        from . import run

        return getattr(run, name)
    if name in ("run_stability", "StabilityOptions"):
        from . import stability

        return getattr(stability, name)
    raise AttributeError(name)
