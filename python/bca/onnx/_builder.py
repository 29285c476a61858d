"""ONNX subgraphs for one block circulant adapter, built with :mod:`onnx.helper`.

The adapter computes ``y = scale * ΔW x`` for ``x`` of shape ``(..., in_features)``,
``ΔW`` the block circulant matrix of a kernel ``C`` of shape ``(q_out, q_in, p)`` (block
``(i, j)`` is ``scipy.linalg.circulant(C[i, j])``), zero-padding ``x`` and cutting the
output when ``p`` does not divide the widths.

Two lowerings share one pipeline and differ only in how the real DFTs are done:

``"dft"``
    forward: the ONNX ``DFT`` op, one-sided (``onesided=1``, real input);
    inverse: the one-sided output spectrum, pre-weighted by ``[1, 2, ..., 2, (1)]``
    (folded into the constant kernel spectra), zero-padded to length ``p``, a
    *complex* inverse ``DFT`` and its real part. This avoids the one-op one-sided
    inverse DFT, which is wrong in onnxruntime 1.25-1.26 and unsupported before.
``"matmul"``
    both DFTs as ``MatMul`` with constant real DFT matrices (``p × 2F`` and
    ``2F × p``, ``F = p // 2 + 1``); needs only opset 13 ops.

Between the transforms, per frequency ``f``, the sum over input blocks is a complex
matrix product done as one batched real ``MatMul`` against a constant ``G`` of shape
``(F, 2 q_in, 2 q_out)`` that holds each complex kernel spectrum as a real 2×2 block.
``scale``, the ``1/p`` of the inverse and the one-sided weights are folded into ``G``,
computed in float64 from the kernel and stored once as an initializer.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = [
    "LOWERINGS",
    "MIN_OPSET",
    "AdapterSubgraph",
    "adapter_spectra",
    "build_adapter_subgraph",
    "make_adapter_model",
    "sanitize_name",
    "check_opset",
]

LOWERINGS = ("dft", "matmul")
"""Lowerings of the real DFTs that :func:`build_adapter_subgraph` accepts."""

MIN_OPSET = {"dft": 17, "matmul": 13}
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
    if lowering == "matmul":
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
        **attrs: object,
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
    """
    check_opset(opset, lowering)
    k, d_in, d_out = _check_kernel(kernel, in_features, out_features)
    dt = np.dtype(dtype)
    if dt not in _NP_TO_ONNX:
        raise TypeError(f"dtype must be float32, float64 or float16, got {dt}")
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

    if lowering == "dft":
        xb = b.op("Reshape", [x2, b.ints("shape", [-1, q_in, p, 1])], "x_blocks")
        spec = b.dft(xb, axis=2, onesided=1)  # (N, q_in, F, 2)
    else:
        fwd_name = f"bca/shared/rdft_{p}_{cdt.name}"
        inv_name = f"bca/shared/irdft_{p}_{cdt.name}"
        if shared is None or fwd_name not in shared:
            fwd, inv = _dft_matrices(p)
            b.inits.append(numpy_helper.from_array(fwd.astype(cdt), fwd_name))
            b.inits.append(numpy_helper.from_array(inv.astype(cdt), inv_name))
            if shared is not None:
                shared.update((fwd_name, inv_name))
        xb = b.op("Reshape", [x2, b.ints("shape", [-1, q_in, p])], "x_blocks")
        spec = b.op("MatMul", [xb, fwd_name], "x_spec")  # (N,q_in,2F)
        spec = b.op("Reshape", [spec, b.ints("shape", [-1, q_in, n_freq, 2])], "x_spec4")

    # per-frequency complex product: (N, q_in, F, 2) -> (F, N, 2 q_in) @ G -> (F, N, 2 q_out)
    g = adapter_spectra(k, scale, lowering=lowering).astype(cdt)
    st = b.op("Transpose", [spec], "spec_t", perm=[2, 0, 1, 3])
    st = b.op("Reshape", [st, b.ints("shape", [n_freq, -1, 2 * q_in])], "spec_f")
    yf = b.op("MatMul", [st, b.const("kernel_spectra", g)], "y_spec_f")
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
    zero = {"allowzero": 1} if opset >= 14 else {}
    b.op("Reshape", [y2, output_shape], output=output_name, **zero)
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
    dt = np.dtype(dtype)
    if dt not in _NP_TO_ONNX:
        raise TypeError(f"dtype must be float32, float64 or float16, got {dt}")
    elem = _NP_TO_ONNX[dt]
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
    graph = helper.make_graph(
        sub.nodes,
        "bca_adapter",
        [helper.make_tensor_value_info("x", elem, [*lead, d_in])],
        [helper.make_tensor_value_info("y", elem, [*lead, d_out])],
        sub.initializers,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="bca"
    )
    model.ir_version = min(model.ir_version, _max_ir_version(opset))
    onnx.checker.check_model(model, full_check=True)
    return model


def _max_ir_version(opset: int) -> int:
    """Lowest IR version that supports ``opset`` (keeps models loadable by older ORTs)."""
    # onnx's table rows are (release, ir_version, default opset, ...): opset 17 -> IR 8
    candidates = [row[1] for row in helper.VERSION_TABLE if row[2] >= opset]
    return min(candidates) if candidates else onnx.IR_VERSION
