"""numpy-level API over the Rust core (no torch needed).

Convention: a kernel ``C`` of shape ``(q_out, q_in, p)`` stands for the block circulant
matrix ΔW whose block ``(i, j)`` is ``scipy.linalg.circulant(C[i, j])`` (first column
``C[i, j]``). When ``p`` does not divide the layer's widths, inputs are zero-padded and
outputs cut, so ΔW is the top-left ``out_features × in_features`` corner of the padded
block circulant matrix.

All functions take float32 or float64 C-contiguous numpy arrays; ``x`` and ``kernel``
must share a dtype. Bad input raises ``TypeError`` (wrong type/dtype) or a
:class:`BcaError` (a ``ValueError``): :class:`ShapeError` for shapes, sizes and
contiguity, :class:`NonFiniteError` for NaN/Inf, naming the argument. The work runs in
Rust without the GIL.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Literal, overload

import numpy as np
from numpy.typing import NDArray

from . import _bca
from ._errors import BcaError, NonFiniteError, ShapeError

__all__ = [
    "BcaError",
    "BlockCirculant",
    "block_circulant_matmul",
    "block_circulant_matmul_backward",
    "block_circulant_to_dense",
    "mixed_matmul",
    "mixed_matmul_backward",
    "NO_ADAPTER",
    "NonFiniteError",
    "num_blocks",
    "release_memory",
    "set_num_threads",
    "get_num_threads",
    "ShapeError",
]

FloatArray = NDArray[np.float32] | NDArray[np.float64]


@overload
def _check_count(name: str, value: object, *, allow_none: Literal[False]) -> int: ...
@overload
def _check_count(name: str, value: object, *, allow_none: bool = True) -> int | None: ...
def _check_count(name: str, value: object, *, allow_none: bool = True) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"{name} must be a positive int{' or None' if allow_none else ''}, "
            f"got {type(value).__name__}"
        )
    if int(value) < 1:
        raise BcaError(f"{name} must be a positive int, got {value}")
    return int(value)


def num_blocks(features: int, block_size: int) -> int:
    """Number of blocks of size ``block_size`` covering ``features`` (with zero padding)."""
    f = _check_count("features", features, allow_none=False)
    p = _check_count("block_size", block_size, allow_none=False)
    return -(-f // p)


class BlockCirculant:
    """A block circulant operator ΔW with cached kernel spectra and FFT plans.

    Build it once per kernel and apply it many times: the kernel's FFTs are computed at
    construction (and by :meth:`set_kernel`), not per call.

    Args:
        kernel: ``(q_out, q_in, p)`` float32/float64 array; block ``(i, j)`` of ΔW is
            ``circulant(kernel[i, j])``.
        in_features: input width ``d_in`` (default ``q_in * p``); a smaller value means
            zero padding, with ``(q_in - 1) * p < d_in <= q_in * p``.
        out_features: output width ``d_out`` (default ``q_out * p``), likewise.
        num_threads: thread bound for this operator (default: the process default, see
            :func:`set_num_threads`).
    """

    def __init__(
        self,
        kernel: FloatArray,
        in_features: int | None = None,
        out_features: int | None = None,
        *,
        num_threads: int | None = None,
    ) -> None:
        self._op = _bca.BlockCirculantOperator(
            kernel,
            _check_count("in_features", in_features),
            _check_count("out_features", out_features),
            num_threads=_check_count("num_threads", num_threads),
        )

    # -- properties -------------------------------------------------------------------
    @property
    def in_features(self) -> int:
        return int(self._op.in_features)

    @property
    def out_features(self) -> int:
        return int(self._op.out_features)

    @property
    def block_size(self) -> int:
        return int(self._op.block_size)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self._op.dtype)

    @property
    def kernel(self) -> FloatArray:
        """A copy of the kernel, shape ``(q_out, q_in, p)``."""
        return self._op.kernel

    @property
    def retained_bytes(self) -> int:
        """Bytes the operator keeps between calls: the kernel, its cached spectra and a
        few idle row-chunk workspaces. Bounded by the layer's shape: nothing grows with the
        batch (backward's batch buffers are freed when it returns)."""
        return int(self._op.retained_bytes)

    @property
    def num_threads(self) -> int | None:
        return self._op.num_threads

    @num_threads.setter
    def num_threads(self, value: int | None) -> None:
        self._op.set_num_threads(_check_count("num_threads", value))

    # -- operations -------------------------------------------------------------------
    def matmul(self, x: FloatArray) -> FloatArray:
        """ΔW x over the last axis: ``(..., in_features) -> (..., out_features)``."""
        return self._op.forward(x)

    __call__ = matmul

    def backward(
        self,
        x: FloatArray | None,
        grad_output: FloatArray,
        *,
        input_grad: bool = True,
        kernel_grad: bool = True,
    ) -> tuple[FloatArray | None, FloatArray | None]:
        """Gradients of ``sum(grad_output * self.matmul(x))``.

        Returns ``(grad_x, grad_kernel)``: ``grad_x = ΔWᵀ grad_output`` shaped like ``x``
        and ``grad_kernel`` shaped like the kernel (summed over all rows); either is
        ``None`` when not asked for. ``x`` may be ``None`` when ``kernel_grad=False``.
        """
        return self._op.backward(x, grad_output, input_grad=input_grad, kernel_grad=kernel_grad)

    def to_dense(self) -> FloatArray:
        """ΔW as a dense ``(out_features, in_features)`` array."""
        return self._op.to_dense()

    def set_kernel(self, kernel: FloatArray) -> None:
        """Replace the kernel values (same shape and dtype) and recompute the spectra."""
        self._op.set_kernel(kernel)

    def sync_kernel(self, kernel: FloatArray) -> bool:
        """:meth:`set_kernel` unless ``kernel`` holds exactly (bitwise) the current values.

        Returns whether the kernel was replaced. The comparison reads the kernel once and
        the operator's copy once (no allocation): a cheap way to keep an operator in step
        with a kernel that may have been edited in place.
        """
        return bool(self._op.sync_kernel(kernel))

    def __repr__(self) -> str:
        q_out, q_in, p = self._op.q_out, self._op.q_in, self._op.block_size
        return (
            f"BlockCirculant(in_features={self.in_features}, out_features={self.out_features}, "
            f"block_size={p}, blocks=({q_out}, {q_in}), dtype={self._op.dtype})"
        )


def _in_features_of(x: object) -> int | None:
    shape = getattr(x, "shape", None)
    if shape is None or len(shape) == 0:
        return None  # the core reports the bad argument
    return int(shape[-1])


def block_circulant_matmul(
    x: FloatArray, kernel: FloatArray, out_features: int | None = None
) -> FloatArray:
    """One-shot ΔW x over the last axis of ``x`` (``in_features = x.shape[-1]``).

    For repeated products with one kernel, build a :class:`BlockCirculant` once instead.
    """
    d_in = _in_features_of(x)
    op = BlockCirculant(kernel, d_in if d_in else None, out_features)
    return op.matmul(x)


def block_circulant_matmul_backward(
    x: FloatArray,
    kernel: FloatArray,
    grad_output: FloatArray,
    *,
    input_grad: bool = True,
    kernel_grad: bool = True,
) -> tuple[FloatArray | None, FloatArray | None]:
    """One-shot gradients of :func:`block_circulant_matmul`.

    See :meth:`BlockCirculant.backward`.
    """
    d_in = _in_features_of(x)
    d_out = _in_features_of(grad_output)
    op = BlockCirculant(kernel, d_in if d_in else None, d_out if d_out else None)
    return op.backward(x, grad_output, input_grad=input_grad, kernel_grad=kernel_grad)


def block_circulant_to_dense(
    kernel: FloatArray, in_features: int | None = None, out_features: int | None = None
) -> FloatArray:
    """Dense ΔW ``(out_features, in_features)`` of a kernel ``(q_out, q_in, p)``."""
    return BlockCirculant(kernel, in_features, out_features).to_dense()


#: The ``adapter_index`` value that means "no adapter" for a row (its output is zero).
NO_ADAPTER = -1


def _core_operators(operators: object) -> list[_bca.BlockCirculantOperator]:
    if isinstance(operators, (str, bytes, BlockCirculant)) or not isinstance(operators, Sequence):
        raise TypeError(
            f"operators must be a sequence of bca.BlockCirculant, got {type(operators).__name__}"
        )
    ops = []
    for a, op in enumerate(operators):
        if not isinstance(op, BlockCirculant):
            raise TypeError(f"operators[{a}] must be a bca.BlockCirculant, got {type(op).__name__}")
        ops.append(op._op)
    return ops


def _adapter_index(adapter_index: object) -> NDArray[np.int64]:
    arr = np.asarray(adapter_index)
    if arr.size == 0 and not isinstance(adapter_index, np.ndarray):
        arr = arr.astype(np.int64)  # np.asarray([]) is float64
    if arr.dtype == np.bool_ or arr.dtype.kind not in "iu":
        raise TypeError(f"adapter_index must hold integers, got dtype {arr.dtype}")
    if arr.dtype.kind == "u" and arr.size and int(arr.max()) > np.iinfo(np.int64).max:
        raise BcaError(f"adapter_index: {int(arr.max())} is out of range")
    return np.ascontiguousarray(arr, dtype=np.int64)


def mixed_matmul(
    operators: Sequence[BlockCirculant],
    adapter_index: object,
    x: FloatArray,
    *,
    scales: Sequence[float] | None = None,
    add: FloatArray | None = None,
) -> FloatArray:
    """A mixed-adapter batch: row ``r`` of ``x`` through its own operator.

    ``y[..., :] = operators[adapter_index[...]].matmul(x[..., :])`` for every row, in one
    call costing about what one operator costs on the same rows: each row's blocks are
    transformed once, multiplied with that operator's cached spectra and transformed back
    (rows are grouped by operator internally; results are bit for bit those of each
    operator's own :meth:`BlockCirculant.matmul`).

    Args:
        operators: operators of one geometry (``in_features``, ``out_features``,
            ``block_size``) and one dtype.
        adapter_index: integers with the shape of ``x.shape[:-1]``: an index into
            ``operators``, or :data:`NO_ADAPTER` (``-1``) for a row without an adapter
            (a zero output row; the row is not read). Other negative values are errors,
            not Python-style indexing.
        x: ``(..., in_features)`` of the operators' dtype.
        scales: one finite factor per operator: row ``r`` gets
            ``scales[a] · operators[a].matmul(x[r])`` (rounded to the dtype once; the
            product is rounded, then multiplied, as ``y *= s`` would).
        add: ``(..., out_features)`` of the operators' dtype, read only: the result is
            ``add + y`` (a new array; e.g. the base layer's output), the same bits as
            adding afterwards, without a separate pass in Python.

    Raises ``TypeError``/:class:`BcaError` naming ``operators`` (with the index of the
    operator that differs), ``adapter_index`` (with the offending position), ``x``,
    ``scales`` or ``add``.
    """
    return _bca.mixed_forward(
        _core_operators(operators),
        _adapter_index(adapter_index),
        x,
        scales=None if scales is None else list(scales),
        add=add,
    )


def mixed_matmul_backward(
    operators: Sequence[BlockCirculant],
    adapter_index: object,
    x: FloatArray | None,
    grad_output: FloatArray,
    *,
    input_grad: bool = True,
    kernel_grad: bool = True,
) -> tuple[FloatArray | None, list[FloatArray | None]]:
    """Gradients of ``sum(grad_output * mixed_matmul(operators, adapter_index, x))``.

    Returns ``(grad_x, grad_kernels)``: ``grad_x`` shaped like ``x`` (row ``r`` is
    ``ΔW_aᵀ grad_output[r]`` for its operator ``a``, zero for rows without one) and one
    kernel gradient per operator, summed over that operator's rows (zero for an operator
    without rows; accumulated in float64). ``grad_x`` is ``None`` with
    ``input_grad=False``; the list holds ``None`` with ``kernel_grad=False``, when ``x``
    may be ``None``.
    """
    return _bca.mixed_backward(
        _core_operators(operators),
        _adapter_index(adapter_index),
        x,
        grad_output,
        input_grad=input_grad,
        kernel_grad=kernel_grad,
    )


def set_num_threads(num_threads: int | None) -> None:
    """Set the core's process-wide default thread count; ``None`` restores the default
    (``BCA_NUM_THREADS``, else ``RAYON_NUM_THREADS``, else the number of cores)."""
    _bca.set_num_threads(_check_count("num_threads", num_threads))


def get_num_threads() -> int:
    """The core's process-wide default thread count."""
    return int(_bca.get_num_threads())


def release_memory() -> int:
    """Free the memory the core keeps for reuse between calls and return its size in bytes.

    Results of at least 256 KiB (outputs, gradients) are backed by buffers that return
    to a small pool when the last array using them is gone, so that the next call of the
    same size reuses mapped pages instead of faulting in new ones (a quarter of a
    training step at d = 768, N = 512). The pool keeps at most 8 idle buffers and
    128 MiB; this frees them, and the idle shared scratch buffers of ``backward``.
    Arrays still in use are not affected.
    """
    return int(_bca.release_memory())
