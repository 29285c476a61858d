"""Torch modules for block circulant adapters.

:class:`BlockCirculantLinear` wraps an existing ``nn.Linear`` (or transformers' GPT-2
``Conv1D``, whose weight is stored ``(in, out)``) without copying it, freezes it, and adds
a trainable block circulant update::

    y = base_layer(x) + scale * ΔW x

ΔW is a grid of ``q_out × q_in`` circulant ``p × p`` blocks; block ``(i, j)`` is
``scipy.linalg.circulant(bca_kernel[i, j])`` (first column ``bca_kernel[i, j]``). When ``p``
does not divide the layer's widths (and ``pad=True``), x is zero-padded to ``q_in * p``
and the output cut to ``out_features``: ΔW is then the top-left ``out × in`` corner of
the padded block circulant matrix.

Backends for ΔW x:

* ``"torch"``: ``torch.fft`` real FFTs on any device; the sums over blocks are one
  complex batched matmul per frequency, laid out ``(F, rows, blocks)``. The backward
  saves only ``x`` and the kernel (plus the kernel's spectra, parameter-sized) and
  recomputes the input spectra. In eval mode or under ``no_grad`` the kernel spectra are
  cached and reused while the kernel is unchanged. Half-precision inputs are computed in
  float32 and cast back.
* ``"rust"``: the Rust core through :class:`bca.core.BlockCirculant` (CPU, float32 and
  float64 only), one operator per module, re-synchronised only when the kernel changes;
  under ``torch.compile`` it runs as the custom operator
  ``torch.ops.bca.rust_block_circulant`` (no graph break).
* ``"auto"``: ``"rust"`` for CPU float32/float64 inputs matching the kernel's dtype when
  the extension imports, ``"torch"`` otherwise.

The product itself is :func:`bca.nn.functional.block_circulant` (and
:func:`~bca.nn.functional.mixed_block_circulant` for mixed-adapter batches), one
function for every caller: the layer, its mixed batches and :mod:`bca.peft_interop`'s
PEFT patch; a module that owns a kernel passes a :class:`~bca.nn.functional.KernelCache`.

Second and higher derivatives (``create_graph=True``) are exact on every backend: such a
backward computes its gradients with plain differentiable ``torch.fft`` operations (the
kernel spectra recomputed with grad history), which
autograd differentiates again; an ordinary backward keeps each backend's fast path.
"""

from __future__ import annotations

try:  # first, so that a numpy-only install learns which extra to add
    import torch  # noqa: F401
except ModuleNotFoundError as _exc:
    _hint = 'bca.nn needs torch: pip install "bca[torch]"'
    raise ModuleNotFoundError(_hint, name="torch") from _exc

from .functional import BACKENDS, KernelCache, block_circulant_dense, rust_available
from .layer import (
    BASE_ADAPTER,
    DEFAULT_ADAPTER,
    INITS,
    BlockCirculantLinear,
    _AdapterState,  # noqa: F401  (pickles of models saved before the split name bca.nn._AdapterState)
    is_supported_layer,
    layer_features,
)

__all__ = [
    "BACKENDS",
    "INITS",
    "BASE_ADAPTER",
    "DEFAULT_ADAPTER",
    "BlockCirculantLinear",
    "KernelCache",
    "block_circulant_dense",
    "is_supported_layer",
    "layer_features",
    "rust_available",
]
