"""ONNX subgraphs for one block circulant adapter, built with :mod:`onnx.helper`.

The adapter computes ``y = scale * ΔW x`` for ``x`` of shape ``(..., in_features)``,
``ΔW`` the block circulant matrix of a kernel ``C`` of shape ``(q_out, q_in, p)`` (block
``(i, j)`` is ``scipy.linalg.circulant(C[i, j])``), zero-padding ``x`` and cutting the
output when ``p`` does not divide the widths.

Three lowerings share one pipeline and differ only in how the real DFTs are done:

``"dft"``
    forward: the ONNX ``DFT`` op, one-sided (``onesided=1``, real input);
    inverse: the one-sided output spectrum, pre-weighted by ``[1, 2, ..., 2, (1)]``
    (folded into the constant kernel spectra), zero-padded to length ``p``, a
    *complex* inverse ``DFT`` and its real part. This avoids the one-op one-sided
    inverse DFT, which is wrong in onnxruntime 1.25-1.26 and unsupported before.
``"matmul"``
    both DFTs as ``MatMul`` with constant real DFT matrices (``p × 2F`` and
    ``2F × p``, ``F = p // 2 + 1``); needs only opset 13 ops.
``"matmul2"``
    the same in two stages (four-step Cooley-Tukey, ``p = a b``): ``2 p (a + b)``
    multiply-adds per transform instead of ``2 p (p + 2)``, for three ``Transpose`` ops
    more each way. Falls back to ``"matmul"`` when ``p`` has no factor ``4 <= a <= sqrt(p)``.

Between the transforms, per frequency ``f``, the sum over input blocks is a complex
matrix product done as one batched real ``MatMul`` against a constant ``G`` of shape
``(F, 2 q_in, 2 q_out)`` that holds each complex kernel spectrum as a real 2×2 block.
``scale``, the ``1/p`` of the inverse and the one-sided weights are folded into ``G``,
computed in float64 from the kernel and stored once as an initializer.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ._versions import lower_ir_version

__all__ = [
    "LOWERINGS",
    "MIN_OPSET",
    "AdapterSubgraph",
    "adapter_spectra",
    "build_adapter_subgraph",
    "build_mixed_adapter_subgraph",
    "lowered_spectra",
    "make_adapter_model",
    "make_mixed_adapter_model",
    "sanitize_name",
    "check_opset",
]

LOWERINGS = ("dft", "matmul", "matmul2")
"""Lowerings of the real DFTs that :func:`build_adapter_subgraph` accepts."""

MIN_OPSET = {"dft": 17, "matmul": 13, "matmul2": 13}
"""Smallest default-domain opset each lowering needs (DFT arrived in opset 17)."""

_NP_TO_ONNX = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.float64): TensorProto.DOUBLE,
    np.dtype(np.float16): TensorProto.FLOAT16,
}


def sanitize_name(name: str) -> str:
    """A tensor-name-friendly version of a module name (``a.b.0.c`` -> ``a.b.0.c``)."""
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", name)


def check_opset(opset: int, lowering: str) -> None:
    """Raise ``ValueError`` when ``opset`` is too old for ``lowering``."""
    if lowering not in LOWERINGS:
        raise ValueError(f"lowering must be one of {LOWERINGS}, got {lowering!r}")
    if isinstance(opset, bool) or not isinstance(opset, (int, np.integer)):
        raise TypeError(f"opset must be an int, got {type(opset).__name__}")
    need = MIN_OPSET[lowering]
    if opset < need:
        hint = (
            " Use lowering='matmul' (needs opset 13), or upgrade the model with "
            "onnx.version_converter.convert_version(model, 17)."
            if lowering == "dft"
            else " Upgrade the model with onnx.version_converter.convert_version."
        )
        raise ValueError(
            f"opset {opset} is too old for lowering={lowering!r}: it needs opset >= {need}." + hint
        )


def _check_kernel(
    kernel: np.ndarray, in_features: int | None, out_features: int | None
) -> tuple[np.ndarray, int, int]:
    k = np.asarray(kernel)
    if k.ndim != 3:
        raise ValueError(f"kernel must have shape (q_out, q_in, p), got shape {k.shape}")
    if not np.issubdtype(k.dtype, np.floating):
        raise TypeError(f"kernel must be a float array, got dtype {k.dtype}")
    if not np.all(np.isfinite(k)):
        raise ValueError("kernel contains NaN or Inf")
    q_out, q_in, p = k.shape
    if min(q_out, q_in, p) < 1:
        raise ValueError(f"kernel must have no empty axis, got shape {k.shape}")
    d_in = q_in * p if in_features is None else int(in_features)
    d_out = q_out * p if out_features is None else int(out_features)
    for name, d, q in (("in_features", d_in, q_in), ("out_features", d_out, q_out)):
        if not (q - 1) * p < d <= q * p:
            raise ValueError(
                f"{name}={d} does not fit kernel shape {k.shape}: need "
                f"{(q - 1) * p} < {name} <= {q * p} (block size {p})"
            )
    return k, d_in, d_out


def adapter_spectra(kernel: np.ndarray, scale: float = 1.0, *, lowering: str = "dft") -> np.ndarray:
    """The constant ``G`` of shape ``(F, 2 q_in, 2 q_out)`` in float64.

    ``G[f, 2 j + c, 2 i + d]`` maps component ``c`` (0 real, 1 imaginary) of input
    block ``j``'s spectrum at frequency ``f`` to component ``d`` of output block ``i``'s,
    i.e. the complex product ``rfft(C[i, j])[f] * X_j[f]`` as a real 2×2 block, times
    ``scale`` and the inverse transform's one-sided weight (and ``1/p`` for
    ``lowering="matmul"``, whose inverse matrix is unnormalised).
    """
    q_out, q_in, p = kernel.shape
    spec = np.fft.rfft(np.asarray(kernel, np.float64), axis=-1)  # (q_out, q_in, F)
    n_freq = spec.shape[-1]
    weights = np.full(n_freq, 2.0)
    weights[0] = 1.0
    if p % 2 == 0:
        weights[-1] = 1.0
    weights *= float(scale)
    if lowering in ("matmul", "matmul2"):
        weights /= p
    a = spec.real.transpose(2, 1, 0) * weights[:, None, None]  # (F, q_in, q_out)
    b = spec.imag.transpose(2, 1, 0) * weights[:, None, None]
    g = np.empty((n_freq, q_in, 2, q_out, 2))
    # (a + ib)(xr + i xi) = (a xr - b xi) + i (b xr + a xi)
    g[:, :, 0, :, 0] = a
    g[:, :, 1, :, 0] = -b
    g[:, :, 0, :, 1] = b
    g[:, :, 1, :, 1] = a
    return g.reshape(n_freq, 2 * q_in, 2 * q_out)


def two_stage_factors(p: int) -> tuple[int, int] | None:
    """``(a, b)`` with ``p = a * b``, ``a`` the largest divisor ``<= sqrt(p)``; None when
    ``a < 4`` (a two-stage DFT would not pay): then ``"matmul2"`` emits ``"matmul"``."""
    a = int(np.sqrt(p))
    while a > 1 and p % a:
        a -= 1
    return (a, p // a) if a >= 4 else None


def _two_stage_matrices(p: int) -> tuple[int, int, int, np.ndarray, np.ndarray]:
    """Constants of the two-stage (four-step Cooley-Tukey) real DFT, ``p = a b``.

    With ``t = b t1 + t2`` and ``k = k1 + a k2`` (``k2 < K2 = b // 2 + 1``):
    ``X[k] = sum_t2 e^{-2πi t2 k / p} Z[k1, t2]``, ``Z[k1, t2] = sum_t1 x[t] e^{-2πi t1 k1 / a}``.
    Returns ``(a, b, K2, stage1 (a, 2a), stage2 (a, 2b, 2 K2))``: ``stage1`` maps ``t1`` to
    ``(k1, c)``; ``stage2[k1]`` maps ``(c, t2)`` to ``(k2, d)`` (twiddles included). The
    inverse uses their transposes. Frequencies ``k > p // 2`` come out too and are given
    zero weight in the kernel spectra.
    """
    factors = two_stage_factors(p)
    assert factors is not None
    a, b = factors
    n_k2 = b // 2 + 1
    ang1 = 2.0 * np.pi * np.outer(np.arange(a), np.arange(a)) / a  # (t1, k1)
    stage1 = np.empty((a, a, 2))
    stage1[:, :, 0] = np.cos(ang1)
    stage1[:, :, 1] = -np.sin(ang1)
    stage2 = np.empty((a, 2, b, n_k2, 2))
    t2 = np.arange(b)[:, None]
    for k1 in range(a):
        th = 2.0 * np.pi * t2 * (k1 + a * np.arange(n_k2)[None, :]) / p  # (t2, k2)
        c, s = np.cos(th), np.sin(th)
        stage2[k1, 0, :, :, 0] = c
        stage2[k1, 1, :, :, 0] = s
        stage2[k1, 0, :, :, 1] = -s
        stage2[k1, 1, :, :, 1] = c
    return a, b, n_k2, stage1.reshape(a, 2 * a), stage2.reshape(a, 2 * b, 2 * n_k2)


def _two_stage_spectra(g: np.ndarray, p: int, a: int, n_k2: int) -> np.ndarray:
    """Rearrange ``G`` (F, ., .) to the two-stage frequency order ``(k1, k2)``, zeros for
    ``k1 + a k2 > p // 2``."""
    out = np.zeros((a * n_k2, *g.shape[1:]), dtype=g.dtype)
    for k1 in range(a):
        for k2 in range(n_k2):
            f = k1 + a * k2
            if f <= p // 2:
                out[k1 * n_k2 + k2] = g[f]
    return out


def lowered_spectra(
    kernel: np.ndarray, scale: float = 1.0, *, lowering: str = "dft"
) -> tuple[np.ndarray, str]:
    """``(G, lowering)``: the kernel-spectra constant exactly as the subgraph of
    ``lowering`` multiplies it (float64), and the lowering actually emitted.

    For ``"dft"`` and ``"matmul"`` this is :func:`adapter_spectra`; for ``"matmul2"`` its
    frequencies are rearranged to the two-stage order ``(k1, k2)`` (zeros for
    ``k1 + a k2 > p // 2``), and a block size without a useful factorisation falls back to
    ``"matmul"`` (the returned lowering says which). ``G`` is linear in ``scale * kernel``.
    """
    if lowering not in LOWERINGS:
        raise ValueError(f"lowering must be one of {LOWERINGS}, got {lowering!r}")
    p = int(np.shape(kernel)[-1])
    factors = two_stage_factors(p) if lowering == "matmul2" else None
    if lowering == "matmul2" and factors is None:
        lowering = "matmul"
    g = adapter_spectra(kernel, scale, lowering=lowering)
    if lowering == "matmul2":
        assert factors is not None
        a, bb = factors
        g = _two_stage_spectra(g, p, a, bb // 2 + 1)
    return g, lowering


def _dft_matrices(p: int) -> tuple[np.ndarray, np.ndarray]:
    """Forward ``(p, 2F)`` and inverse ``(2F, p)`` real DFT matrices (float64).

    Columns/rows are ordered ``(f, c)``: ``x @ fwd`` gives ``[Re X_0, Im X_0, Re X_1, ...]``
    (numpy's rfft), and ``Y @ inv`` gives ``sum_f Re(Y_f e^{2πi f t / p})`` (no weights,
    no ``1/p``: those live in ``G``).
    """
    n_freq = p // 2 + 1
    t = np.arange(p)
    f = np.arange(n_freq)
    ang = 2.0 * np.pi * np.outer(t, f) / p  # (p, F)
    # exact zeros where sin vanishes (DC, Nyquist) keep the matrices clean
    cos, sin = np.cos(ang), np.sin(ang)
    fwd = np.empty((p, n_freq, 2))
    fwd[:, :, 0] = cos
    fwd[:, :, 1] = -sin
    inv = np.empty((n_freq, 2, p))
    inv[:, 0, :] = cos.T
    inv[:, 1, :] = -sin.T
    return fwd.reshape(p, 2 * n_freq), inv.reshape(2 * n_freq, p)


@dataclass
class AdapterSubgraph:
    """Nodes and initializers of one adapter, ready to add to a graph.

    ``input`` is read, ``output`` is written (shape ``(..., out_features)``).
    """

    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: list[onnx.TensorProto] = field(default_factory=list)
    input: str = ""
    output: str = ""
    lowering: str = "dft"
    in_features: int = 0
    out_features: int = 0
    block_size: int = 0

    @property
    def num_constant_bytes(self) -> int:
        return sum(len(t.raw_data) for t in self.initializers)


class _Builder:
    def __init__(self, prefix: str, opset: int, dtype: np.dtype) -> None:
        self.prefix = prefix
        self.opset = opset
        self.dtype = dtype
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._count = 0

    def name(self, stem: str) -> str:
        self._count += 1
        return f"{self.prefix}/{stem}_{self._count}"

    def const(self, stem: str, value: np.ndarray) -> str:
        n = self.name(stem)
        self.inits.append(numpy_helper.from_array(np.array(value, order="C"), n))
        return n

    def ints(self, stem: str, values: Sequence[int]) -> str:
        return self.const(stem, np.asarray(values, dtype=np.int64))

    def op(
        self,
        op_type: str,
        inputs: Sequence[str],
        stem: str | None = None,
        output: str | None = None,
        **attrs: Any,
    ) -> str:
        out = output if output is not None else self.name(stem or op_type.lower())
        self.nodes.append(
            helper.make_node(op_type, list(inputs), [out], name=self.name(op_type), **attrs)
        )
        return out

    def dft(self, x: str, *, axis: int, onesided: int = 0, inverse: int = 0) -> str:
        if self.opset >= 20:
            ax = self.const("dft_axis", np.asarray(axis, dtype=np.int64))
            return self.op("DFT", [x, "", ax], "dft", onesided=onesided, inverse=inverse)
        return self.op("DFT", [x], "dft", axis=axis, onesided=onesided, inverse=inverse)


def build_adapter_subgraph(
    kernel: np.ndarray,
    input_name: str,
    output_name: str,
    *,
    in_features: int | None = None,
    out_features: int | None = None,
    scale: float = 1.0,
    lowering: str = "dft",
    opset: int = 17,
    prefix: str = "bca",
    dtype: np.dtype | type | str = np.float32,
    output_shape: str | None = None,
    shared: set[str] | None = None,
    spectra_name: str | None = None,
) -> AdapterSubgraph:
    """Build the nodes and initializers computing ``output = scale * ΔW @ input``.

    Args:
        kernel: ``(q_out, q_in, p)`` float array (block ``(i, j)`` = ``circulant(kernel[i, j])``).
        input_name: graph tensor of shape ``(..., in_features)`` (any rank >= 1, any
            leading dims, dynamic or not).
        output_name: name of the tensor to produce, shape ``(..., out_features)``.
        in_features, out_features: layer widths (default ``q * p``); smaller values mean
            zero padding of ``input`` and a cut output.
        scale: multiplies ΔW (folded into the constant spectra).
        lowering: ``"dft"`` (ONNX DFT op, opset >= 17) or ``"matmul"`` (constant DFT
            matrices, opset >= 13).
        opset: default-domain opset of the graph the nodes go into (DFT's signature
            changed in opset 20).
        prefix: prefix for every node and tensor name (must be unique per adapter).
        dtype: element type of ``input`` and ``output``: float32, float64 or float16
            (float16 is computed in float32 between two Casts).
        output_shape: optional name of a tensor holding the output's shape (e.g.
            ``Shape`` of the base layer's output); saves two ops. Default: computed from
            ``input``'s shape.
        shared: names of shared constants already in the target graph. The MatMul
            lowering's DFT matrices depend only on ``p`` and the dtype, so they are named
            ``bca/shared/rdft_<p>_<dtype>`` and emitted only when not in ``shared``
            (which is then updated): one pair per block size per graph.
        spectra_name: name of the kernel-spectra initializer ``G`` (see
            :func:`lowered_spectra`); default ``<prefix>/kernel_spectra_<n>``. Servable
            graphs (:mod:`bca.onnx._overridable`) give it a stable name and override it per run.
    """
    return _build(
        kernel,
        input_name,
        output_name,
        in_features=in_features,
        out_features=out_features,
        scale=scale,
        lowering=lowering,
        opset=opset,
        prefix=prefix,
        dtype=dtype,
        output_shape=output_shape,
        shared=shared,
        spectra_name=spectra_name,
        mixed=None,
    )


@dataclass
class _Mixed:
    """The per-row adapter choice of :func:`build_mixed_adapter_subgraph`."""

    kernels: list[tuple[np.ndarray, float] | None]
    index: str
    batch_shape: str | None
    stack_name: str | None


def build_mixed_adapter_subgraph(
    kernels: Sequence[tuple[np.ndarray, float] | None],
    input_name: str,
    output_name: str,
    index_name: str,
    *,
    batch_shape: str | None = None,
    in_features: int | None = None,
    out_features: int | None = None,
    lowering: str = "matmul",
    opset: int = 17,
    prefix: str = "bca",
    dtype: np.dtype | type | str = np.float32,
    output_shape: str | None = None,
    shared: set[str] | None = None,
    stack_name: str | None = None,
) -> AdapterSubgraph:
    """The adapter of :func:`build_adapter_subgraph` with one adapter chosen per batch row.

    ``kernels[a]`` is adapter ``a``'s ``(kernel, scale)`` on this layer (``None``: adapter
    ``a`` does not adapt it, a zero slot); all kernels share one shape. The kernel spectra
    of every adapter (as :func:`lowered_spectra`) are stacked into one constant of shape
    ``(frequencies, A + 1, 2 q_in, 2 q_out)`` (named ``stack_name``), slot ``A`` all zeros
    (the base layer). ``index_name`` is an int64 tensor of shape ``(B,)``: batch row ``b``
    of ``input`` (the first axis; ``input`` may also be ``(B * rows, in_features)``, rows
    batch-major) gets adapter ``index[b]``. Per run the stack is gathered along axis 1 by
    the index (ONNX ``Gather``: an index outside ``[-(A + 1), A]`` is an onnxruntime error,
    a negative one counts from the end, ``-1`` being the base slot) and each row's spectra
    are multiplied by their own adapter's in one batched ``MatMul``. ``batch_shape`` names
    a tensor holding ``[B]`` (``Shape`` of the index; default: computed here). Every
    lowering is supported: they differ only in the transforms around that product.
    """
    items = list(kernels)
    live = [kv for kv in items if kv is not None]
    if not live:
        raise ValueError("a mixed adapter layer needs at least one adapter kernel")
    return _build(
        live[0][0],
        input_name,
        output_name,
        in_features=in_features,
        out_features=out_features,
        scale=1.0,
        lowering=lowering,
        opset=opset,
        prefix=prefix,
        dtype=dtype,
        output_shape=output_shape,
        shared=shared,
        spectra_name=None,
        mixed=_Mixed(items, index_name, batch_shape, stack_name),
    )


def _build(
    kernel: np.ndarray,
    input_name: str,
    output_name: str,
    *,
    in_features: int | None,
    out_features: int | None,
    scale: float,
    lowering: str,
    opset: int,
    prefix: str,
    dtype: np.dtype | type | str,
    output_shape: str | None,
    shared: set[str] | None,
    spectra_name: str | None,
    mixed: _Mixed | None,
) -> AdapterSubgraph:
    check_opset(opset, lowering)
    k, d_in, d_out = _check_kernel(kernel, in_features, out_features)
    mixed_slots: list[tuple[np.ndarray, float] | None] = []
    if mixed is not None:
        for a, kv in enumerate(mixed.kernels):
            if kv is None:
                mixed_slots.append(None)
                continue
            ka, _, _ = _check_kernel(kv[0], d_in, d_out)
            if ka.shape != k.shape:
                raise ValueError(
                    f"mixed adapter {a}: kernel shape {ka.shape} differs from {k.shape}; the "
                    "adapters of one layer must share block size and widths"
                )
            if not np.isfinite(kv[1]):
                raise ValueError(f"mixed adapter {a}: scale must be finite, got {kv[1]}")
            mixed_slots.append((ka, float(kv[1])))
    dt, _ = _element_type(dtype)
    if not np.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    q_out, q_in, p = k.shape
    n_freq = p // 2 + 1
    cdt = np.dtype(np.float32) if dt == np.float16 else dt  # compute dtype
    b = _Builder(prefix, opset, cdt)

    x = input_name
    if dt == np.float16:
        x = b.op("Cast", [x], "x_f32", to=TensorProto.FLOAT)
    if output_shape is None:
        if opset >= 15:
            lead = b.op("Shape", [input_name], "lead_shape", end=-1)
        else:
            shp = b.op("Shape", [input_name], "in_shape")
            lead = b.op("Slice", [shp, b.ints("s0", [0]), b.ints("sm1", [-1])], "lead_shape")
        output_shape = b.op("Concat", [lead, b.ints("d_out", [d_out])], "out_shape", axis=0)

    # (..., d_in) -> (N, d_in) -> zero pad -> (N, q_in, p)
    # (fewer ops when nothing is padded: at one token, per-op overhead dominates)
    x2 = x
    if q_in * p != d_in:
        x2 = b.op("Reshape", [x, b.ints("shape", [-1, d_in])], "x2d")
        x2 = b.op("Pad", [x2, b.ints("pads", [0, 0, 0, q_in * p - d_in])], "x_pad")

    # "matmul2" falls back to "matmul" for p too small or without a useful factorisation
    requested = lowering
    g64, lowering = lowered_spectra(k, scale, lowering=lowering)
    g = g64.astype(cdt)
    factors = two_stage_factors(p) if lowering == "matmul2" else None

    def shared_const(stem: str, make: Callable[[], np.ndarray]) -> str:
        name = f"bca/shared/{stem}_{p}_{cdt.name}"
        if shared is None or name not in shared:
            b.inits.append(numpy_helper.from_array(make().astype(cdt), name))
            if shared is not None:
                shared.add(name)
        return name

    # forward transforms -> spectra laid out (n_freq, N, 2 q_in), (j, c) innermost
    if lowering == "matmul2":
        assert factors is not None
        a, bb = factors
        _, _, n_k2, st1, st2 = _two_stage_matrices(p)
        s1 = shared_const("dft2_stage1", lambda: st1)
        s2 = shared_const("dft2_stage2", lambda: st2)
        s2t = shared_const("dft2_stage2_t", lambda: st2.transpose(0, 2, 1))
        s1t = shared_const("dft2_stage1_t", lambda: st1.T)
        n_freq_x = a * n_k2
        xb = b.op("Reshape", [x2, b.ints("shape", [-1, a, bb])], "x_blocks")  # (M, t1, t2)
        xt = b.op("Transpose", [xb], "x_t", perm=[0, 2, 1])  # (M, t2, t1)
        z = b.op("MatMul", [xt, s1], "stage1")  # (M, t2, (k1, c))
        z = b.op("Reshape", [z, b.ints("shape", [-1, bb, a, 2])], "stage1_4")
        z = b.op("Transpose", [z], "stage1_t", perm=[2, 0, 3, 1])  # (k1, M, c, t2)
        z = b.op("Reshape", [z, b.ints("shape", [a, -1, 2 * bb])], "stage1_k1")
        xs = b.op("MatMul", [z, s2], "stage2")  # (k1, M, (k2, d))
        xs = b.op("Reshape", [xs, b.ints("shape", [a, -1, q_in, n_k2, 2])], "stage2_5")
        st = b.op("Transpose", [xs], "spec_t", perm=[0, 3, 1, 2, 4])  # (k1, k2, N, q_in, 2)
    else:
        n_freq_x = n_freq
        if lowering == "dft":
            xb = b.op("Reshape", [x2, b.ints("shape", [-1, q_in, p, 1])], "x_blocks")
            spec = b.dft(xb, axis=2, onesided=1)  # (N, q_in, F, 2)
        else:
            fwd_name = shared_const("rdft", lambda: _dft_matrices(p)[0])
            inv_name = shared_const("irdft", lambda: _dft_matrices(p)[1])
            xb = b.op("Reshape", [x2, b.ints("shape", [-1, q_in, p])], "x_blocks")
            spec = b.op("MatMul", [xb, fwd_name], "x_spec")  # (N,q_in,2F)
            spec = b.op("Reshape", [spec, b.ints("shape", [-1, q_in, n_freq, 2])], "x_spec4")
        st = b.op("Transpose", [spec], "spec_t", perm=[2, 0, 1, 3])  # (F, N, q_in, 2)

    # per-frequency complex product: (n_freq, N, 2 q_in) @ G -> (n_freq, N, 2 q_out)
    if mixed is None:
        st = b.op("Reshape", [st, b.ints("shape", [n_freq_x, -1, 2 * q_in])], "spec_f")
        if spectra_name is None:
            g_name = b.const("kernel_spectra", g)
        else:
            b.inits.append(numpy_helper.from_array(np.ascontiguousarray(g), spectra_name))
            g_name = spectra_name
        yf = b.op("MatMul", [st, g_name], "y_spec_f")
    else:
        # one adapter per batch row: (n_freq, B, rows, 2 q_in) @ G[:, index]
        # (n_freq, B, 2 q_in, 2 q_out) -> (n_freq, B, rows, 2 q_out); the reshapes after
        # this product take either form (their -1 absorbs B and rows)
        slots = [
            np.zeros_like(g64)
            if kv is None
            else lowered_spectra(kv[0], kv[1], lowering=requested)[0]
            for kv in mixed_slots
        ]
        stack = np.stack([*slots, np.zeros_like(g64)], axis=1).astype(cdt)
        if mixed.stack_name is None:
            stack_name = b.const("kernel_spectra_stack", stack)
        else:
            b.inits.append(numpy_helper.from_array(np.ascontiguousarray(stack), mixed.stack_name))
            stack_name = mixed.stack_name
        batch = mixed.batch_shape
        if batch is None:
            batch = b.op("Shape", [mixed.index], "batch_shape")
        shape4 = b.op(
            "Concat",
            [b.ints("f", [n_freq_x]), batch, b.ints("rows_c", [-1, 2 * q_in])],
            "spec_shape",
            axis=0,
        )
        st = b.op("Reshape", [st, shape4], "spec_bf")
        g_rows = b.op("Gather", [stack_name, mixed.index], "spectra_rows", axis=1)
        yf = b.op("MatMul", [st, g_rows], "y_spec_f")

    if lowering == "matmul2":
        ys = b.op("Reshape", [yf, b.ints("shape", [a, n_k2, -1, q_out, 2])], "y_spec_5")
        ys = b.op("Transpose", [ys], "y_spec_t", perm=[0, 2, 3, 1, 4])  # (k1, N, q_out, k2, 2)
        ys = b.op("Reshape", [ys, b.ints("shape", [a, -1, 2 * n_k2])], "y_spec_k1")
        u = b.op("MatMul", [ys, s2t], "istage2")  # (k1, M, (c, t2))
        u = b.op("Reshape", [u, b.ints("shape", [a, -1, 2, bb])], "istage2_4")
        u = b.op("Transpose", [u], "istage2_t", perm=[1, 3, 0, 2])  # (M, t2, k1, c)
        u = b.op("Reshape", [u, b.ints("shape", [-1, bb, 2 * a])], "istage2_m")
        yt = b.op("MatMul", [u, s1t], "istage1")  # (M, t2, t1)
        y2 = b.op("Transpose", [yt], "y_blocks", perm=[0, 2, 1])  # (M, t1, t2) = (M, p)
    else:
        yf = b.op("Reshape", [yf, b.ints("shape", [n_freq, -1, q_out, 2])], "y_spec_f4")
        ys = b.op("Transpose", [yf], "y_spec", perm=[1, 2, 0, 3])  # (N, q_out, F, 2)
        if lowering == "dft":
            # weighted one-sided spectrum, zero-padded to p, complex inverse DFT, real part
            if p > n_freq:
                ys = b.op("Pad", [ys, b.ints("pads", [0, 0, 0, 0, 0, 0, p - n_freq, 0])], "y_full")
            yt = b.dft(ys, axis=2, inverse=1)  # (N, q_out, p, 2)
            y2 = b.op("Slice", [yt, b.ints("s", [0]), b.ints("e", [1]), b.ints("a", [3])], "y_real")
        else:
            ys = b.op("Reshape", [ys, b.ints("shape", [-1, q_out, 2 * n_freq])], "y_spec3")
            y2 = b.op("MatMul", [ys, inv_name], "y_blocks")  # (N,q_out,p)
    if q_out * p != d_out:
        y2 = b.op("Reshape", [y2, b.ints("shape", [-1, q_out * p])], "y2d")
        y2 = b.op("Slice", [y2, b.ints("s", [0]), b.ints("e", [d_out]), b.ints("a", [1])], "y_cut")
    if dt == np.float16:
        y2 = b.op("Cast", [y2], "y_f16", to=TensorProto.FLOAT16)
    # allowzero=1: a 0 in the (runtime) shape is an empty axis, not "copy this dim"
    if opset >= 14:
        b.op("Reshape", [y2, output_shape], output=output_name, allowzero=1)
    else:
        b.op("Reshape", [y2, output_shape], output=output_name)
    return AdapterSubgraph(
        nodes=b.nodes,
        initializers=b.inits,
        input=input_name,
        output=output_name,
        lowering=lowering,
        in_features=d_in,
        out_features=d_out,
        block_size=p,
    )


def make_adapter_model(
    kernel: np.ndarray,
    *,
    in_features: int | None = None,
    out_features: int | None = None,
    scale: float = 1.0,
    lowering: str = "dft",
    opset: int = 17,
    dtype: np.dtype | type | str = np.float32,
    input_shape: Sequence[int | str] = ("batch", "sequence", "in_features"),
) -> onnx.ModelProto:
    """A standalone ONNX model ``y = scale * ΔW x`` (input ``"x"``, output ``"y"``).

    ``input_shape`` names the input's dims (strings are dynamic); its last entry is
    replaced by ``in_features``. The model passes ``onnx.checker.check_model``.
    """
    _, d_in, d_out = _check_kernel(kernel, in_features, out_features)
    dt, elem = _element_type(dtype)
    lead = list(input_shape)[:-1]
    sub = build_adapter_subgraph(
        kernel,
        "x",
        "y",
        in_features=d_in,
        out_features=d_out,
        scale=scale,
        lowering=lowering,
        opset=opset,
        dtype=dt,
    )
    return _standalone_model(
        sub,
        "bca_adapter",
        [helper.make_tensor_value_info("x", elem, [*lead, d_in])],
        [helper.make_tensor_value_info("y", elem, [*lead, d_out])],
        opset,
    )


def make_mixed_adapter_model(
    kernels: Sequence[tuple[np.ndarray, float] | None],
    *,
    in_features: int | None = None,
    out_features: int | None = None,
    lowering: str = "matmul",
    opset: int = 17,
    dtype: np.dtype | type | str = np.float32,
    input_shape: Sequence[int | str] = ("batch", "sequence", "in_features"),
) -> onnx.ModelProto:
    """A standalone ONNX model of :func:`build_mixed_adapter_subgraph`: inputs ``"x"``
    (``input_shape``, batch first) and ``"adapter_index"`` (int64, ``(batch,)``), output
    ``"y"``: row ``b`` is ``scale_a * ΔW_a x[b]`` for ``a = adapter_index[b]`` (zeros for
    ``a = len(kernels)``, the base slot)."""
    live = [kv for kv in kernels if kv is not None]
    if not live:
        raise ValueError("kernels must hold at least one (kernel, scale) pair")
    _, d_in, d_out = _check_kernel(live[0][0], in_features, out_features)
    dt, elem = _element_type(dtype)
    lead = list(input_shape)[:-1]
    sub = build_mixed_adapter_subgraph(
        kernels,
        "x",
        "y",
        "adapter_index",
        in_features=d_in,
        out_features=d_out,
        lowering=lowering,
        opset=opset,
        dtype=dt,
    )
    return _standalone_model(
        sub,
        "bca_mixed_adapter",
        [
            helper.make_tensor_value_info("x", elem, [*lead, d_in]),
            helper.make_tensor_value_info("adapter_index", TensorProto.INT64, lead[:1]),
        ],
        [helper.make_tensor_value_info("y", elem, [*lead, d_out])],
        opset,
    )


def _element_type(dtype: np.dtype | type | str) -> tuple[np.dtype, int]:
    """``dtype`` and its ONNX element type, or a TypeError for an unsupported dtype."""
    dt = np.dtype(dtype)
    if dt not in _NP_TO_ONNX:
        raise TypeError(f"dtype must be float32, float64 or float16, got {dt}")
    return dt, _NP_TO_ONNX[dt]


def _standalone_model(
    sub: Any,
    name: str,
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    opset: int,
) -> onnx.ModelProto:
    """A checked model of one subgraph, at the lowest IR version its opset needs (so that
    older runtimes load it)."""
    graph = helper.make_graph(sub.nodes, name, inputs, outputs, sub.initializers)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="bca"
    )
    lower_ir_version(model)
    onnx.checker.check_model(model, full_check=True)
    return model
