"""The default choice between the ``"dft"`` and ``"matmul"`` lowerings.

The rule comes from measurements in onnxruntime (benches/bench_onnx.py, results in
benches/results/onnx_*.md and docs/onnx.md):

* ORT's DFT kernel is accurate only for power-of-two lengths: for other ``p`` its float32
  error reaches 1e-5..1e-4 (float64: ~1e-8), while the MatMul lowering stays at ~4e-7
  (float64: ~1e-14). Non-power-of-two ``p`` therefore always gets ``"matmul"``.
* Opsets below 17 have no DFT op: ``"matmul"``.
* For power-of-two ``p``, the constant DFT matrices cost ``2 p (p + 2)`` multiply-adds
  per block and transform against ~``5 p log2 p`` for an FFT, but ORT's DFT kernel is
  single-threaded and slow (onnxruntime 1.32, 2 threads: at d = 4096 and 128 rows the
  DFT lowering took 0.5-0.6 of the dense layer's time for every p, the MatMul lowering
  0.14-0.39 for p <= 512). The MatMul lowering measured faster for p <= 512 at every
  size tried (d = 384, 768, 4096; 1 and 128 rows); at p = 1024 the DFT lowering won
  for one row (0.85 vs 1.18 ms at d = 4096) and tied at 128 rows. Hence
  ``"matmul"`` up to ``MATMUL_MAX_BLOCK = 512``, ``"dft"`` beyond.
"""

from __future__ import annotations

import numpy as np

__all__ = ["choose_lowering", "MATMUL_MAX_BLOCK"]

MATMUL_MAX_BLOCK = 512
"""Largest power-of-two block size for which ``"auto"`` picks the MatMul lowering."""


def _is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def choose_lowering(
    block_size: int,
    in_features: int | None = None,
    out_features: int | None = None,
    *,
    opset: int = 17,
    dtype: np.dtype | type | str = np.float32,
) -> str:
    """The lowering ``lowering="auto"`` uses for one adapter: ``"dft"`` or ``"matmul"``."""
    del in_features, out_features, dtype  # the measured rule depends on p and opset only
    p = int(block_size)
    if opset < 17 or not _is_pow2(p):
        return "matmul"
    return "matmul" if p <= MATMUL_MAX_BLOCK else "dft"
