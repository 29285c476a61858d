"""The default choice among the ``"dft"``, ``"matmul"`` and ``"matmul2"`` lowerings.

The rule comes from measurements in onnxruntime 1.32 (``python benches/bench_onnx.py
--part lowering``; table in benches/results/onnx_lowering.md and docs/onnx.md): the
adapter subgraph alone, float32, one intra-op thread, CPU time per call, at
d = 384, 768, 4096, 1 and 128 rows, p = 16 ... 1024.

* ORT's DFT kernel is single-threaded and slow: the ``"dft"`` lowering was never the
  fastest (e.g. d = 4096, 128 rows, p = 256: 0.55 of the dense layer's time, against
  0.22 for ``"matmul"``), and for block sizes that are not powers of two its float32
  error reaches 1e-5..1e-4 (float64 ~3e-8) where the MatMul lowerings stay at ~1e-7
  (float64 ~1e-15). It is never picked automatically.
* ``"matmul"`` (one-stage constant DFT matrices) was fastest for every p <= 256, and at
  p = 512 it tied or won (d = 4096, 128 rows: 0.33 of dense against 0.42 for
  ``"matmul2"``; one row: 0.040 against 0.035).
* ``"matmul2"`` (two stages, ``p = a b``) was fastest at p = 1024 (d = 4096, 128 rows:
  0.47 of dense against 0.59 for ``"matmul"`` and 0.82 for ``"dft"``; one row: 0.05
  against 0.14 and 0.07); below that its extra Transposes cost more than the
  multiply-adds it saves.
"""

from __future__ import annotations

import numpy as np

__all__ = ["choose_lowering", "MATMUL_MAX_BLOCK"]

MATMUL_MAX_BLOCK = 512
"""Largest block size for which ``"auto"`` picks the one-stage ``"matmul"`` lowering;
larger blocks get ``"matmul2"`` (which itself falls back to ``"matmul"`` for block sizes
without a factor ``4 <= a <= sqrt(p)``)."""


def choose_lowering(
    block_size: int,
    in_features: int | None = None,
    out_features: int | None = None,
    *,
    opset: int = 17,
    dtype: np.dtype | type | str = np.float32,
) -> str:
    """The lowering ``lowering="auto"`` uses for one adapter (see the module docstring)."""
    del in_features, out_features, opset, dtype  # the measured rule depends on p only
    p = int(block_size)
    if p < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    return "matmul" if p <= MATMUL_MAX_BLOCK else "matmul2"
