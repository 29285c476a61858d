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

Second and higher derivatives (``create_graph=True``) are exact on every backend: such a
backward computes its gradients with plain differentiable ``torch.fft`` operations (the
kernel spectra recomputed with grad history; :func:`_differentiable_backward`), which
autograd differentiates again; an ordinary backward keeps each backend's fast path.
"""

from __future__ import annotations

import itertools
import math
import warnings
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "BACKENDS",
    "INITS",
    "BASE_ADAPTER",
    "DEFAULT_ADAPTER",
    "BlockCirculantLinear",
    "block_circulant_dense",
    "is_supported_layer",
    "layer_features",
    "rust_available",
]

BACKENDS: tuple[str, ...] = ("auto", "rust", "torch")
INITS: tuple[str, ...] = ("zeros", "xavier_uniform", "gaussian", "kaiming")

_RUST_DTYPES = (torch.float32, torch.float64)


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------
_CORE: Any = None
_CORE_ERROR: str | None = None


def _rust_core() -> Any:
    """The :mod:`bca.core` module, or ``None`` when the Rust extension does not import."""
    global _CORE, _CORE_ERROR
    if _CORE is None and _CORE_ERROR is None:
        try:
            from . import core

            _CORE = core
        except ImportError as exc:  # extension not built / not installed
            _CORE_ERROR = f"{type(exc).__name__}: {exc}"
    return _CORE


def rust_available() -> bool:
    """Whether the Rust extension (``bca._bca``) imports, i.e. backend ``"rust"`` works."""
    return _rust_core() is not None


def _is_conv1d(module: nn.Module) -> bool:
    if type(module).__name__ != "Conv1D":
        return False
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers missing
        return False
    return isinstance(module, Conv1D)


def is_supported_layer(module: nn.Module) -> bool:
    """True for ``nn.Linear`` and transformers' ``Conv1D`` (the layers bca can adapt)."""
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def layer_features(module: nn.Module) -> tuple[int, int, bool]:
    """``(in_features, out_features, is_conv1d)`` of a supported layer.

    Raises:
        TypeError: for any other layer type.
    """
    if isinstance(module, nn.Linear):
        return int(module.in_features), int(module.out_features), False
    if _is_conv1d(module):
        w = _weight(module)
        return int(w.shape[0]), int(w.shape[1]), True
    raise TypeError(
        f"bca adapts nn.Linear and transformers' Conv1D layers only, got {type(module).__name__}"
    )


def _param(module: nn.Module, name: str) -> torch.Tensor | None:
    """A layer's parameter by name, typed (``nn.Module.__getattr__`` is untyped)."""
    value = getattr(module, name, None)
    return value if isinstance(value, torch.Tensor) else None


def _weight(module: nn.Module) -> torch.Tensor:
    w = _param(module, "weight")
    if w is None:
        raise TypeError(f"{type(module).__name__} has no weight tensor")
    return w


def _circulant_index(p: int, device: torch.device) -> torch.Tensor:
    r = torch.arange(p, device=device)
    return (r[:, None] - r[None, :]) % p


def block_circulant_dense(
    kernel: torch.Tensor, in_features: int | None = None, out_features: int | None = None
) -> torch.Tensor:
    """Dense ΔW ``(out_features, in_features)`` of a kernel ``(q_out, q_in, p)``, exactly.

    Block ``(i, j)`` is ``circulant(kernel[i, j])``; built by indexing (no FFT, so no
    rounding) and differentiable with respect to ``kernel``.
    """
    if kernel.dim() != 3:
        raise ValueError(f"kernel must have shape (q_out, q_in, p), got {tuple(kernel.shape)}")
    q_out, q_in, p = kernel.shape
    n_in = q_in * p if in_features is None else in_features
    n_out = q_out * p if out_features is None else out_features
    _check_padding("in_features", n_in, q_in, p)
    _check_padding("out_features", n_out, q_out, p)
    blocks = kernel[:, :, _circulant_index(p, kernel.device)]  # (q_out, q_in, p, p)
    dense = blocks.permute(0, 2, 1, 3).reshape(q_out * p, q_in * p)
    return dense[:n_out, :n_in]


def _check_padding(name: str, features: int, q: int, p: int) -> None:
    if not (q - 1) * p < features <= q * p:
        raise ValueError(
            f"{name}={features} does not fit {q} blocks of size {p}: need "
            f"{(q - 1) * p} < {name} <= {q * p}"
        )


class _KernelSnapshot:
    """Detects a change of a kernel tensor since the last :meth:`take`.

    The version counter and storage pointer catch ordinary in-place updates (optimizer
    steps, ``load_state_dict``) without looking at the values. For CPU tensors a value
    comparison with a parameter-sized copy also catches edits through ``.data`` (which
    have their own version counter); on other devices that comparison would force a
    device synchronisation per call, so it is skipped there (call
    :meth:`BlockCirculantLinear.clear_cache` after editing ``.data`` on a GPU).
    """

    __slots__ = ("key", "values")

    def __init__(self) -> None:
        self.key: tuple[Any, ...] | None = None
        self.values: torch.Tensor | None = None

    @staticmethod
    def _key(kernel: torch.Tensor) -> tuple[Any, ...]:
        return (kernel._version, kernel.data_ptr(), kernel.device, kernel.dtype, kernel.shape)

    def matches(self, kernel: torch.Tensor) -> bool:
        if self.key is None or self.key != self._key(kernel):
            return False
        if self.values is None:  # non-CPU: version and storage only
            return True
        return bool(torch.equal(self.values, kernel.detach()))

    def take(self, kernel: torch.Tensor) -> None:
        self.key = self._key(kernel)
        self.values = kernel.detach().clone() if kernel.device.type == "cpu" else None

    def clear(self) -> None:
        self.key = None
        self.values = None


def _compute_dtype(x_dtype: torch.dtype, k_dtype: torch.dtype) -> torch.dtype:
    """float64 if either is float64, else float32 (torch.fft has no general half path)."""
    if x_dtype == torch.float64 or k_dtype == torch.float64:
        return torch.float64
    return torch.float32


def _kernel_spectra(kernel: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``scale *`` rfft of each kernel block, laid out ``(F, q_in, q_out)`` (contiguous)."""
    spectra = torch.fft.rfft(kernel, dim=-1).permute(2, 1, 0).contiguous()
    return spectra.mul_(scale) if scale != 1.0 else spectra


def _block_spectra(v: torch.Tensor, q: int, p: int) -> torch.Tensor:
    """rfft of the length-p blocks of rows ``v`` (N, d) -> ``(F, N, q)`` (zero-padded)."""
    n, d = v.shape
    if d != q * p:
        v = torch.nn.functional.pad(v, (0, q * p - d))
    return torch.fft.rfft(v.reshape(n, q, p), dim=-1).permute(2, 0, 1)


def _inverse_blocks(spec: torch.Tensor, p: int, features: int) -> torch.Tensor:
    """Inverse of :func:`_block_spectra`: ``(F, N, q)`` -> rows ``(N, features)``."""
    _, n, q = spec.shape
    out = torch.fft.irfft(spec.permute(1, 2, 0), n=p, dim=-1).reshape(n, q * p)
    if features != q * p:
        out = out[:, :features]
    return out.contiguous()


def _create_graph(*tensors: torch.Tensor) -> bool:
    """Whether a backward must itself be differentiable (``create_graph=True``).

    Inside ``autograd.Function.backward`` grad mode is on exactly when the caller asked
    for ``create_graph``; the graph is needed only if one of the tensors has a history.
    """
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _differentiable_backward(
    x: torch.Tensor,
    kernel: torch.Tensor,
    grad_output: torch.Tensor,
    scale: float,
    in_features: int,
    out_features: int,
    need_x: bool,
    need_k: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(scale·ΔWᵀ g, scale·Σ_n kgrad(x_n, g_n))`` by plain, differentiable torch ops.

    The backward for ``create_graph=True``: a pure function of ``(x, kernel, g)`` (rfft of
    the zero-padded blocks, one complex matmul per frequency, irfft, cut the padding) with
    the kernel spectra recomputed *with* grad history, so autograd differentiates it to any
    order. x (N, in), kernel and g (N, out) share one real dtype. ``None`` where not needed.
    """
    q_out, q_in, p = kernel.shape
    if grad_output.dtype != x.dtype:
        grad_output = grad_output.to(x.dtype)
    grad_x = grad_kernel = None
    if x.shape[0] == 0:  # no FFT of an empty batch (MKL rejects it); keep the graph connected
        if need_x:
            grad_x = x.new_zeros(x.shape) + (grad_output.sum() + kernel.sum()) * 0.0
        if need_k:
            grad_kernel = torch.zeros_like(kernel) + (grad_output.sum() + x.sum()) * 0.0
        return grad_x, grad_kernel
    gs = _block_spectra(grad_output, q_out, p)  # (F, N, q_out)
    if need_x:
        spectra = torch.fft.rfft(kernel, dim=-1).permute(2, 0, 1)  # (F, q_out, q_in)
        if scale != 1.0:
            spectra = spectra * scale
        grad_x = _inverse_blocks(torch.matmul(gs, spectra.conj()), p, in_features)
    if need_k:
        xs = _block_spectra(x, q_in, p)  # (F, N, q_in)
        gks = torch.matmul(xs.mH, gs)  # (F, q_in, q_out) = conj(X)^T G per frequency
        grad_kernel = torch.fft.irfft(gks.permute(2, 1, 0), n=p, dim=-1)
        if scale != 1.0:
            grad_kernel = grad_kernel * scale
    return grad_x, grad_kernel


# --------------------------------------------------------------------------------------
# autograd functions
# --------------------------------------------------------------------------------------
class _TorchBlockCirculant(torch.autograd.Function):
    """``scale * ΔW x`` with torch.fft; x (N, in) and kernel in the same real dtype.

    ``spectra`` (already scaled) may be passed in from the eval-mode cache; otherwise it is
    computed here. The scale is folded into the parameter-sized spectra and kernel
    gradient, so no output-sized multiply (and no extra autograd node) is needed.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        kernel: torch.Tensor,
        spectra: torch.Tensor | None,
        scale: float,
        in_features: int,
        out_features: int,
    ) -> torch.Tensor:
        q_out, q_in, p = kernel.shape
        if spectra is None:
            spectra = _kernel_spectra(kernel, scale)
        ctx.save_for_backward(x, kernel, spectra)
        ctx.features = (in_features, out_features, scale)
        if x.shape[0] == 0:  # some FFT libraries (MKL) reject empty batches
            return x.new_zeros(0, out_features)
        xs = _block_spectra(x, q_in, p)  # (F, N, q_in)
        ys = torch.matmul(xs, spectra)  # (F, N, q_out)
        # saved: x, the kernel and its (parameter-sized) spectra; the input spectra are
        # recomputed in backward
        return _inverse_blocks(ys, p, out_features)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x, kernel, spectra = ctx.saved_tensors
        in_features, out_features, scale = ctx.features
        q_out, q_in, p = kernel.shape
        if _create_graph(grad_output, x, kernel):  # double backward: differentiable ops
            gx, gk = _differentiable_backward(
                x, kernel, grad_output, scale, in_features, out_features,
                bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1]),
            )  # fmt: skip
            return gx, gk, None, None, None, None
        if x.shape[0] == 0:
            gx0 = x.new_zeros(x.shape) if ctx.needs_input_grad[0] else None
            gk0 = torch.zeros_like(kernel) if ctx.needs_input_grad[1] else None
            return gx0, gk0, None, None, None, None
        if grad_output.dtype != x.dtype:
            grad_output = grad_output.to(x.dtype)
        gs = _block_spectra(grad_output, q_out, p).contiguous()  # (F, N, q_out), used twice
        grad_x = grad_kernel = None
        if ctx.needs_input_grad[0]:
            gxs = torch.matmul(gs, spectra.mH)  # (F, N, q_in); mH: conjugate transpose
            grad_x = _inverse_blocks(gxs, p, in_features)
        if ctx.needs_input_grad[1]:
            xs = _block_spectra(x, q_in, p)  # (F, N, q_in), recomputed
            gks = torch.matmul(xs.mH, gs)  # (F, q_in, q_out) = conj(X)^T G per frequency
            grad_kernel = torch.fft.irfft(gks.permute(2, 1, 0), n=p, dim=-1)
            if scale != 1.0:
                grad_kernel.mul_(scale)
        return grad_x, grad_kernel, None, None, None, None


def _rust_forward(
    state: _AdapterState, x: torch.Tensor, kernel: torch.Tensor, features: tuple[int, int],
    scale: float,
) -> torch.Tensor:  # fmt: skip
    """``scale * ΔW x`` by the Rust core (shared by the eager and the compiled path)."""
    op = state.rust_operator(kernel, *features)
    y = op.matmul(x.detach().contiguous().numpy())
    if scale != 1.0:
        y *= scale
    return torch.from_numpy(y)


def _rust_backward(
    state: _AdapterState,
    x: torch.Tensor,
    kernel: torch.Tensor,
    grad_output: torch.Tensor,
    features: tuple[int, int],
    scale: float,
    need_x: bool,
    need_k: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(input gradient, kernel gradient) by the Rust core; ``None`` where not needed."""
    op = state.rust_operator(kernel, *features)  # re-sync if another forward moved it
    g = grad_output.detach().to(x.dtype).contiguous().numpy()
    gx, gk = op.backward(
        x.detach().contiguous().numpy() if need_k else None,
        g,
        input_grad=need_x,
        kernel_grad=need_k,
    )
    if scale != 1.0:
        if gx is not None:
            gx *= scale
        if gk is not None:
            gk *= scale
    return (
        torch.from_numpy(gx) if gx is not None else None,
        torch.from_numpy(gk) if gk is not None else None,
    )


class _RustBlockCirculant(torch.autograd.Function):
    """``scale * ΔW x`` through the Rust core; x (N, in) CPU float32/float64 like the kernel.

    The eager path (lowest per-call overhead). Under ``torch.compile`` the same
    computation runs as the custom operator ``torch.ops.bca.rust_block_circulant``
    (below), which the compiler treats as an opaque node instead of a graph break.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        kernel: torch.Tensor,
        state: _AdapterState,
        features: tuple[int, int],
        scale: float,
    ) -> torch.Tensor:
        ctx.save_for_backward(x, kernel)
        ctx.state = state
        ctx.features = features
        ctx.scale = scale
        return _rust_forward(state, x, kernel, features, scale)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x, kernel = ctx.saved_tensors
        need_x, need_k = bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1])
        if not (need_x or need_k):
            return None, None, None, None, None
        if _create_graph(grad_output, x, kernel):  # double backward: differentiable ops
            gx, gk = _differentiable_backward(
                x, kernel, grad_output, ctx.scale, *ctx.features, need_x, need_k
            )
        else:
            gx, gk = _rust_backward(
                ctx.state, x, kernel, grad_output, ctx.features, ctx.scale, need_x, need_k
            )
        return gx, gk, None, None, None


# The compiled path: torch.compile cannot trace into the Rust call (numpy views, an
# operator object), so it is registered as a custom operator with a fake (shape-only)
# implementation and an autograd formula. Operators take tensors and scalars only: the
# adapter's state (its Rust operator) is found through an integer handle.
@torch.library.custom_op("bca::rust_block_circulant", mutates_args=(), device_types="cpu")
def _rust_op(
    x: torch.Tensor,
    kernel: torch.Tensor,
    handle: int,
    in_features: int,
    out_features: int,
    scale: float,
) -> torch.Tensor:
    return _rust_forward(_state_of(handle), x, kernel, (in_features, out_features), scale)


@_rust_op.register_fake
def _rust_op_fake(
    x: torch.Tensor,
    kernel: torch.Tensor,
    handle: int,
    in_features: int,
    out_features: int,
    scale: float,
) -> torch.Tensor:
    return x.new_empty((x.shape[0], out_features))


@torch.library.custom_op("bca::rust_block_circulant_backward", mutates_args=(), device_types="cpu")
def _rust_op_backward(
    x: torch.Tensor,
    kernel: torch.Tensor,
    grad_output: torch.Tensor,
    handle: int,
    in_features: int,
    out_features: int,
    scale: float,
    input_grad: bool,
    kernel_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    gx, gk = _rust_backward(
        _state_of(handle), x, kernel, grad_output, (in_features, out_features), scale,
        input_grad, kernel_grad,
    )  # fmt: skip
    # operators cannot return None: an empty tensor stands for "not asked for"
    return (
        gx if gx is not None else x.new_empty(0),
        gk if gk is not None else kernel.new_empty(0),
    )


@_rust_op_backward.register_fake
def _rust_op_backward_fake(
    x: torch.Tensor,
    kernel: torch.Tensor,
    grad_output: torch.Tensor,
    handle: int,
    in_features: int,
    out_features: int,
    scale: float,
    input_grad: bool,
    kernel_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return (
        x.new_empty(x.shape) if input_grad else x.new_empty(0),
        kernel.new_empty(kernel.shape) if kernel_grad else kernel.new_empty(0),
    )


def _rust_op_setup(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    x, kernel, handle, in_features, out_features, scale = inputs
    ctx.save_for_backward(x, kernel)
    ctx.args = (handle, in_features, out_features, scale)


def _rust_op_grad(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    x, kernel = ctx.saved_tensors
    need_x, need_k = bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1])
    if not (need_x or need_k):
        return None, None, None, None, None, None
    if _create_graph(grad_output, x, kernel):  # eager double backward: differentiable ops
        _, in_features, out_features, scale = ctx.args
        gx_d, gk_d = _differentiable_backward(
            x, kernel, grad_output, scale, in_features, out_features, need_x, need_k
        )
        return gx_d, gk_d, None, None, None, None
    gx, gk = _rust_op_backward(x, kernel, grad_output, *ctx.args, need_x, need_k)
    return (gx if need_x else None), (gk if need_k else None), None, None, None, None


_rust_op.register_autograd(_rust_op_grad, setup_context=_rust_op_setup)


# --------------------------------------------------------------------------------------
# mixed-adapter batches: each row its own adapter
# --------------------------------------------------------------------------------------
def _torch_mixed(
    x: torch.Tensor,
    kernels: Sequence[torch.Tensor],
    spectra: Sequence[torch.Tensor | None],
    scales: Sequence[float],
    counts: Sequence[int],
    features: tuple[int, int],
) -> torch.Tensor:
    """Rows of ``x`` grouped by adapter (``counts[a]`` consecutive rows each, all of one
    block size) through their adapter: ``scale_a · ΔW_a x`` by plain, differentiable torch
    ops. One rfft of all rows, one complex matmul per adapter on its rows against that
    adapter's spectra (``spectra[a]``, or computed from the kernel with grad history), one
    irfft of all rows. x and the kernels share one real dtype; x has ``sum(counts)`` rows.
    """
    in_features, out_features = features
    q_out, q_in, p = kernels[0].shape
    xs = _block_spectra(x, q_in, p)  # (F, M, q_in)
    parts = []
    lo = 0
    for kernel, cached, scale, count in zip(kernels, spectra, scales, counts, strict=True):
        s = cached if cached is not None else _kernel_spectra(kernel, scale)
        parts.append(torch.matmul(xs[:, lo : lo + count], s))  # (F, count, q_out)
        lo += count
    ys = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
    return _inverse_blocks(ys, p, out_features)


class _RustMixedBlockCirculant(torch.autograd.Function):
    """A mixed batch through the Rust core: row ``r`` of x (N, in) gets
    ``scales[a] · ΔW_a x[r]`` with ``a = index[r]`` (an int64 numpy array; ``-1``: a zero
    row), ``ΔW_a`` being the operator of ``states[a]`` for ``kernels[a]`` (one geometry);
    CPU, x of the kernels' dtype.

    The scale multiplies each row of the output, and in backward each row of
    ``grad_output`` (that gives ``scale_a · ΔW_aᵀ g`` and ``scale_a · Σ kgrad`` alike). A
    backward with ``create_graph=True`` recomputes the forward with differentiable torch
    ops (:func:`_torch_mixed`) and differentiates that.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        index: Any,
        scales: list[float],
        states: list[_AdapterState],
        features: tuple[int, int],
        *kernels: torch.Tensor,
    ) -> torch.Tensor:
        ctx.save_for_backward(x, *kernels)
        ctx.index, ctx.scales, ctx.states, ctx.features = index, scales, states, features
        ctx.row_scale = np.where(index >= 0, np.asarray(scales)[np.maximum(index, 0)], 0.0)
        core = _rust_core()
        ops = [st.rust_operator(k, *features) for st, k in zip(states, kernels, strict=True)]
        y = core.mixed_matmul(ops, index, x.detach().contiguous().numpy())
        if any(sc != 1.0 for sc in scales):
            y *= ctx.row_scale[:, None].astype(y.dtype)
        return torch.from_numpy(y)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x, *kernels = ctx.saved_tensors
        n_k = len(kernels)
        need_x = bool(ctx.needs_input_grad[0])
        need_k = [bool(n) for n in ctx.needs_input_grad[5:]]
        none = (None, None, None, None)
        if not (need_x or any(need_k)):
            return (None, *none, *([None] * n_k))
        if _create_graph(grad_output, x, *kernels):  # double backward: differentiable ops
            gx, gks = _mixed_differentiable_backward(ctx, x, kernels, grad_output, need_x, need_k)
            return (gx, *none, *gks)
        core = _rust_core()
        ops = [
            st.rust_operator(k, *ctx.features) for st, k in zip(ctx.states, kernels, strict=True)
        ]
        g = grad_output.detach().to(x.dtype).contiguous().numpy()
        if any(sc != 1.0 for sc in ctx.scales):
            g = g * ctx.row_scale[:, None].astype(g.dtype)
        gx_np, gk_np = core.mixed_matmul_backward(
            ops,
            ctx.index,
            x.detach().contiguous().numpy() if any(need_k) else None,
            g,
            input_grad=need_x,
            kernel_grad=any(need_k),
        )
        gx_t = torch.from_numpy(gx_np) if gx_np is not None else None
        gks_t = [
            torch.from_numpy(gk) if (gk is not None and need) else None
            for gk, need in zip(gk_np, need_k, strict=True)
        ]
        return (gx_t, *none, *gks_t)


def _mixed_differentiable_backward(
    ctx: Any,
    x: torch.Tensor,
    kernels: Sequence[torch.Tensor],
    grad_output: torch.Tensor,
    need_x: bool,
    need_k: Sequence[bool],
) -> tuple[torch.Tensor | None, list[torch.Tensor | None]]:
    """Gradients of the Rust mixed product with a graph (``create_graph=True``): the
    forward recomputed by :func:`_torch_mixed` and differentiated by autograd."""
    index = torch.from_numpy(ctx.index)
    rows = torch.nonzero(index >= 0).flatten()
    order = rows[torch.argsort(index[rows], stable=True)]
    counts = torch.bincount(index[order], minlength=len(kernels)).tolist()
    used = [a for a, c in enumerate(counts) if c]
    needs = [need_x, *need_k]
    inputs = [x, *kernels]
    with torch.enable_grad():
        y_sel = _torch_mixed(
            x.index_select(0, order),
            [kernels[a] for a in used],
            [None] * len(used),
            [ctx.scales[a] for a in used],
            [counts[a] for a in used],
            ctx.features,
        )
        y = y_sel.new_zeros(x.shape[0], ctx.features[1]).index_copy(0, order, y_sel)
        wanted = [t for t, need in zip(inputs, needs, strict=True) if need]
        got = torch.autograd.grad(
            y, wanted, grad_output.to(y.dtype), create_graph=True, allow_unused=True
        )
    it = iter(got)
    out: list[torch.Tensor | None] = []
    for t, need in zip(inputs, needs, strict=True):
        g = next(it) if need else None
        out.append(torch.zeros_like(t) if (need and g is None) else g)
    return out[0], out[1:]


# --------------------------------------------------------------------------------------
# the module
# --------------------------------------------------------------------------------------
DEFAULT_ADAPTER = "default"
#: In a mixed batch (``adapter_names=``), the name of "no adapter": the base layer alone.
BASE_ADAPTER = "__base__"


_RESERVED = nn.ParameterDict()


def _check_adapter_name(name: object, arg: str = "adapter_name") -> str:
    if not isinstance(name, str) or not name:
        raise TypeError(f"{arg} must be a non-empty str, got {name!r}")
    if "." in name:
        raise ValueError(f"{arg} must not contain '.', got {name!r} (it is a parameter name)")
    if name == BASE_ADAPTER:
        raise ValueError(f"{arg} {name!r} is reserved: it means 'no adapter' in a mixed batch")
    if hasattr(_RESERVED, name):
        raise ValueError(
            f"{arg} {name!r} is reserved (an attribute of torch's ParameterDict); pick another"
        )
    return name


def _check_scale(scale: object, arg: str = "scale") -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"{arg} must be a float, got {type(scale).__name__}")
    if not math.isfinite(float(scale)):
        raise ValueError(f"{arg} must be finite, got {scale}")
    return float(scale)


_STATES: weakref.WeakValueDictionary[int, _AdapterState] = weakref.WeakValueDictionary()
_HANDLES = itertools.count(1)


def _state_of(handle: int) -> _AdapterState:
    state = _STATES.get(handle)
    if state is None:  # only reachable through a stale compiled graph of a deleted adapter
        raise RuntimeError(f"bca adapter state {handle} no longer exists (adapter deleted?)")
    return state


class _AdapterState:
    """One named adapter's settings and backend caches (the kernel is a parameter).

    ``handle`` names the state for the custom operator of the compiled Rust path; copies
    (pickle, deepcopy) get a fresh state and handle, never the caches."""

    def __init__(self, block_size: int, scale: float, init: str) -> None:
        self.block_size = block_size
        self.scale = scale
        self.init = init
        self.handle = next(_HANDLES)
        _STATES[self.handle] = self
        self.spectra: torch.Tensor | None = None
        self.spectra_meta: tuple[torch.dtype, float] | None = None
        self.spectra_snapshot = _KernelSnapshot()
        self.rust_op: Any = None
        self.rust_snapshot = _KernelSnapshot()

    def clear(self) -> None:
        self.spectra = None
        self.spectra_meta = None
        self.spectra_snapshot.clear()
        self.rust_snapshot.clear()

    def __reduce__(self) -> tuple[Any, ...]:
        # pickle and deepcopy (of the state or of its module) rebuild the settings only:
        # a fresh handle, no caches, no Rust operator
        return (_AdapterState, (self.block_size, self.scale, self.init))

    def cached_spectra(
        self, kernel: torch.Tensor, cdtype: torch.dtype, scale: float
    ) -> torch.Tensor:
        snap = self.spectra_snapshot
        meta = (cdtype, scale)
        if self.spectra is None or self.spectra_meta != meta or not snap.matches(kernel):
            with torch.no_grad():
                self.spectra = _kernel_spectra(kernel.detach().to(cdtype), scale)
            self.spectra_meta = meta
            snap.take(kernel)
        return self.spectra

    def rust_operator(self, kernel: torch.Tensor, in_features: int, out_features: int) -> Any:
        """The Rust operator for ``kernel``; ``set_kernel`` is called only on a change."""
        core = _rust_core()
        snap = self.rust_snapshot
        if self.rust_op is None or self.rust_op.dtype != kernel.detach().numpy().dtype:
            self.rust_op = core.BlockCirculant(
                kernel.detach().contiguous().numpy(), in_features, out_features
            )
            snap.take(kernel)
        elif not snap.matches(kernel):
            self.rust_op.set_kernel(kernel.detach().contiguous().numpy())
            snap.take(kernel)
        return self.rust_op


class BlockCirculantLinear(nn.Module):
    """A frozen ``nn.Linear``/``Conv1D`` plus trainable block circulant updates.

    Args:
        base_layer: the layer to adapt (``nn.Linear`` or transformers' ``Conv1D``). It is
            kept as ``self.base_layer`` (not copied) and its parameters are frozen.
        block_size: circulant block size ``p`` of the first adapter.
        scale: factor on the update, ``y = base(x) + scale * ΔW x``.
        init: ``"zeros"`` (default: the adapted layer starts equal to the base layer),
            ``"xavier_uniform"`` (U(±sqrt(6 / (in + out)))), ``"gaussian"``
            (N(0, 1 / in²), PEFT C3A's gaussian init in bca's convention) or
            ``"kaiming"`` (U(±1 / sqrt(in)), torch's default for nn.Linear).
        backend: ``"auto"``, ``"rust"`` or ``"torch"`` (see the module docstring).
        pad: allow widths that ``block_size`` does not divide (zero padding); with
            ``False`` such shapes raise ``ValueError``.
        adapter_name: name of the first adapter (default ``"default"``).

    **Named adapters.** A layer holds any number of named adapters, each with its own
    kernel (``bca_kernels[name]``, shape ``(q_out, q_in, p)`` with ``q = ceil(d / p)``),
    block size and scale; :meth:`add_adapter`, :meth:`delete_adapter`,
    :meth:`set_adapter` (one or several active adapters, optionally weighted). The
    output is ``base(x) + Σ_a w_a · scale_a · ΔW_a x`` over the active adapters (weights
    ``w_a`` default to 1), which equals the base layer with every active adapter merged
    (:meth:`merge`). ``adapter_enabled = False`` gives the base layer.

    ``bca_kernel``, ``block_size`` and ``scale`` refer to the *current* adapter: the first
    active one, or the first added one when none is active.

    Kernels have the base weight's dtype (float32 for half-precision bases) and device.
    """

    base_layer: nn.Module
    bca_kernels: nn.ParameterDict

    def __init__(
        self,
        base_layer: nn.Module,
        block_size: int,
        scale: float = 1.0,
        init: str = "zeros",
        backend: str = "auto",
        pad: bool = True,
        adapter_name: str = DEFAULT_ADAPTER,
    ) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Module) or not is_supported_layer(base_layer):
            raise TypeError(
                "base_layer must be an nn.Linear or transformers Conv1D, got "
                f"{type(base_layer).__name__}"
            )
        if isinstance(base_layer, BlockCirculantLinear):  # pragma: no cover - defensive
            raise TypeError("base_layer is already a BlockCirculantLinear")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if not isinstance(pad, bool):
            raise TypeError(f"pad must be a bool, got {type(pad).__name__}")

        in_features, out_features, is_conv1d = layer_features(base_layer)
        self.base_layer = base_layer
        self.in_features = in_features
        self.out_features = out_features
        self.backend = backend
        self.pad = pad
        self.is_conv1d = is_conv1d
        self.bca_kernels = nn.ParameterDict()
        self._adapters: dict[str, _AdapterState] = {}
        self.active_adapters: list[str] = []
        self.adapter_weights: dict[str, float] = {}
        self.merged_adapters: dict[str, float] = {}
        self._adapter_enabled = True
        self._original_weight: torch.Tensor | None = None
        for param in base_layer.parameters():
            param.requires_grad_(False)
        self.add_adapter(adapter_name, block_size, scale=scale, init=init)
        self.set_adapter(adapter_name)

    # -- named adapters -----------------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        """Every adapter of this layer, in the order added."""
        return list(self._adapters)

    def add_adapter(
        self, adapter_name: str, block_size: int, *, scale: float = 1.0, init: str = "zeros"
    ) -> nn.Parameter:
        """Add a named adapter (not made active; see :meth:`set_adapter`); return its kernel.

        Raises:
            ValueError: the name exists, or ``block_size`` does not fit the layer.
        """
        name = _check_adapter_name(adapter_name)
        if name in self._adapters:
            raise ValueError(f"adapter {name!r} already exists; delete_adapter it first")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        scale = _check_scale(scale)
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        p = block_size
        if not self.pad and (self.in_features % p or self.out_features % p):
            raise ValueError(
                f"block_size={p} does not divide the layer's shape (in_features="
                f"{self.in_features}, out_features={self.out_features}) and pad=False; use "
                "pad=True (zero padding) or a block size that divides both"
            )
        weight = _weight(self.base_layer)
        kdtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        q_out, q_in = -(-self.out_features // p), -(-self.in_features // p)
        kernel = nn.Parameter(torch.zeros(q_out, q_in, p, dtype=kdtype, device=weight.device))
        self.bca_kernels[name] = kernel
        self._adapters[name] = _AdapterState(p, scale, init)
        self.reset_adapter_parameters(init, adapter_name=name)
        return kernel

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove a named adapter (it must not be merged); it also leaves the active set."""
        name = self._known(adapter_name)
        if name in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is merged; unmerge before delete_adapter")
        del self.bca_kernels[name]
        del self._adapters[name]
        if name in self.active_adapters:
            self.active_adapters = [a for a in self.active_adapters if a != name]
            self.adapter_weights.pop(name, None)

    def set_adapter(
        self, adapter_names: str | Sequence[str], weights: Sequence[float] | None = None
    ) -> None:
        """Make ``adapter_names`` the active adapters (``[]``: none), optionally weighted.

        The output becomes ``base(x) + Σ_a w_a · scale_a · ΔW_a x``; ``weights`` default
        to 1.0 each. Unknown names raise ``ValueError`` listing the known ones.
        """
        names, ws = self._selection(adapter_names, weights)
        if len(set(names)) != len(names):
            raise ValueError(f"adapter_names has duplicates: {names}")
        self.active_adapters = names
        self.adapter_weights = dict(zip(names, ws, strict=True))

    def _known(self, adapter_name: str) -> str:
        if adapter_name not in self._adapters:
            raise ValueError(
                f"unknown adapter {adapter_name!r}; this layer has {self.adapter_names}"
            )
        return adapter_name

    @property
    def current_adapter(self) -> str:
        """The adapter ``bca_kernel``/``block_size``/``scale`` refer to."""
        if self.active_adapters:
            return self.active_adapters[0]
        if not self._adapters:
            raise ValueError("this layer has no adapters")
        return next(iter(self._adapters))

    @property
    def adapter_enabled(self) -> bool:
        """``False``: the layer computes its base layer only (adapters kept)."""
        return self._adapter_enabled

    @adapter_enabled.setter
    def adapter_enabled(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"adapter_enabled must be a bool, got {type(value).__name__}")
        if not value and self.merged_adapters:
            raise ValueError(
                f"adapters {sorted(self.merged_adapters)} are merged into the base weight; "
                "unmerge before disabling adapters"
            )
        self._adapter_enabled = value

    @property
    def merged(self) -> bool:
        """Whether any adapter is merged into the base weight."""
        return bool(self.merged_adapters)

    # -- parameters ---------------------------------------------------------------------
    @torch.no_grad()
    def reset_adapter_parameters(
        self, init: str = "zeros", adapter_name: str | None = None
    ) -> None:
        """(Re)initialise a kernel (default: the current adapter's); see ``init`` above."""
        name = self.current_adapter if adapter_name is None else self._known(adapter_name)
        k = self.bca_kernels[name]
        if init == "zeros":
            k.zero_()
        elif init == "xavier_uniform":
            a = math.sqrt(6.0 / (self.in_features + self.out_features))
            k.uniform_(-a, a)
        elif init == "gaussian":
            k.normal_(0.0, 1.0 / self.in_features)
        elif init == "kaiming":
            a = 1.0 / math.sqrt(self.in_features)
            k.uniform_(-a, a)
        else:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")

    @property
    def bca_kernel(self) -> nn.Parameter:
        """The current adapter's kernel ``(q_out, q_in, p)``."""
        kernel: nn.Parameter = self.bca_kernels[self.current_adapter]
        return kernel

    @property
    def block_size(self) -> int:
        """The current adapter's block size ``p``."""
        return self._adapters[self.current_adapter].block_size

    @property
    def scale(self) -> float:
        """The current adapter's scale."""
        return self._adapters[self.current_adapter].scale

    @scale.setter
    def scale(self, value: float) -> None:
        state = self._adapters[self.current_adapter]
        state.scale = _check_scale(value)
        state.clear()

    @property
    def init(self) -> str:
        return self._adapters[self.current_adapter].init

    def adapter_block_size(self, adapter_name: str) -> int:
        return self._adapters[self._known(adapter_name)].block_size

    def adapter_scale(self, adapter_name: str) -> float:
        return self._adapters[self._known(adapter_name)].scale

    def set_adapter_scale(self, adapter_name: str, scale: float) -> None:
        state = self._adapters[self._known(adapter_name)]
        state.scale = _check_scale(scale)
        state.clear()

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (for code that reads ``layer.weight``)."""
        return _weight(self.base_layer)

    @property
    def bias(self) -> torch.Tensor | None:
        """The base layer's bias."""
        return _param(self.base_layer, "bias")

    @property
    def kernel_shape(self) -> tuple[int, int, int]:
        q_out, q_in, p = self.bca_kernel.shape
        return int(q_out), int(q_in), int(p)

    # -- forward ------------------------------------------------------------------------
    def _live_adapters(self) -> list[tuple[str, float]]:
        """``(name, weight)`` of the active adapters that are not merged."""
        if not self._adapter_enabled:
            return []
        return [
            (n, self.adapter_weights.get(n, 1.0))
            for n in self.active_adapters
            if n not in self.merged_adapters
        ]

    def forward(
        self,
        x: torch.Tensor,
        *args: Any,
        adapter_names: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """``base(x) + Σ_a w_a · scale_a · ΔW_a x`` over the active adapters.

        ``adapter_names`` (one name per batch row, ``x`` of shape ``(B, ..., in)``): a
        mixed batch, see :meth:`mixed_adapter_forward`; every position of row ``b`` gets
        ``base(x) + scale_a · ΔW_a x`` with ``a = adapter_names[b]`` (the active set and
        its weights are ignored), ``"__base__"`` the base layer alone.
        """
        if adapter_names is not None:
            names = self._mixed_names(x, adapter_names)
            result = self.base_layer(x, *args, **kwargs)
            if not self._adapter_enabled:
                return result
            delta = self._mixed_delta(x, names)
            return result if delta is None else result + delta.to(result.dtype)
        result = self.base_layer(x, *args, **kwargs)
        for name, w in self._live_adapters():
            result = result + self._adapter_forward(x, name, w).to(result.dtype)
        return result

    # -- mixed-adapter batches ------------------------------------------------------------
    def mixed_adapter_forward(self, x: torch.Tensor, adapter_names: Sequence[str]) -> torch.Tensor:
        """The update alone for a mixed batch: ``(B, ..., in) -> (B, ..., out)``.

        Row ``b`` (every position of ``x[b]``) gets ``scale_a · ΔW_a x[b]`` with ``a =
        adapter_names[b]``; ``"__base__"`` rows get zeros. Cost: about one adapter's on
        the same rows (each row is transformed once and multiplied with its own adapter's
        spectra). Gradients reach exactly the kernels of the adapters named.
        """
        names = self._mixed_names(x, adapter_names)
        delta = self._mixed_delta(x, names)
        if delta is None:
            return x.new_zeros(*x.shape[:-1], self.out_features)
        return delta

    def _mixed_names(self, x: torch.Tensor, adapter_names: object) -> list[str]:
        """Check a mixed batch's arguments; return the names as a list."""
        if self.merged_adapters:
            raise ValueError(
                f"adapters {sorted(self.merged_adapters)} are merged into the base weight; "
                "unmerge before running a mixed batch (adapter_names=...)"
            )
        if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence):
            raise TypeError(
                "adapter_names must be a list of adapter names, one per batch row, got "
                f"{type(adapter_names).__name__}"
            )
        names = list(adapter_names)
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 2 or x.shape[-1] != self.in_features:
            raise ValueError(
                "a mixed batch needs x of shape (batch, ..., in_features="
                f"{self.in_features}), got shape {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating point tensor, got {x.dtype}")
        if len(names) != x.shape[0]:
            raise ValueError(
                f"adapter_names has {len(names)} names for a batch of {x.shape[0]} rows "
                f"(x.shape[0]); give one name per row"
            )
        for b, n in enumerate(names):
            if not isinstance(n, str):
                raise TypeError(f"adapter_names[{b}] must be a str, got {type(n).__name__}")
            if n != BASE_ADAPTER and n not in self._adapters:
                raise ValueError(
                    f"adapter_names[{b}]: unknown adapter {n!r}; this layer has "
                    f"{self.adapter_names} ({BASE_ADAPTER!r}: no adapter)"
                )
        return names

    def _mixed_delta(self, x: torch.Tensor, names: list[str]) -> torch.Tensor | None:
        """``scale_a · ΔW_a x[b]`` per batch row (zeros for base rows); None if no row has
        an adapter. Adapters of different block sizes are run as one group per size."""
        elems: dict[str, list[int]] = {}
        for b, n in enumerate(names):
            if n != BASE_ADAPTER:
                elems.setdefault(n, []).append(b)
        n_rows = x.numel() // self.in_features
        if not elems or n_rows == 0:
            return None
        x2 = x.reshape(n_rows, self.in_features)
        groups: dict[int, list[str]] = {}
        for n in elems:
            groups.setdefault(self._adapters[n].block_size, []).append(n)
        delta: torch.Tensor | None = None
        for group in groups.values():
            y = self._mixed_group(x2, n_rows // x.shape[0], x.shape[0], group, elems)
            delta = y if delta is None else delta + y
        assert delta is not None
        delta = delta.reshape(*x.shape[:-1], self.out_features)
        return delta if delta.dtype == x.dtype else delta.to(x.dtype)

    def _mixed_backend(self, x: torch.Tensor, kernels: list[torch.Tensor]) -> str:
        if torch.compiler.is_compiling():
            return "torch"  # the Rust mixed path is an eager autograd.Function
        if self.backend != "auto":
            return self.backend
        if (
            x.device.type == "cpu"
            and x.dtype in _RUST_DTYPES
            and all(k.device.type == "cpu" and k.dtype == x.dtype for k in kernels)
            and rust_available()
        ):
            return "rust"
        return "torch"

    def _mixed_group(
        self,
        x2: torch.Tensor,
        per_row: int,
        batch: int,
        group: list[str],
        elems: dict[str, list[int]],
    ) -> torch.Tensor:
        """The update of the rows whose adapters are ``group`` (one block size), zeros
        elsewhere: (N, in) -> (N, out), N = batch · per_row."""
        kernels = [self.bca_kernels[n] for n in group]
        states = [self._adapters[n] for n in group]
        scales = [st.scale for st in states]
        features = (self.in_features, self.out_features)
        if self._mixed_backend(x2, kernels) == "rust":
            for k in kernels:
                self._check_rust_input(x2, k)
            elem_index = np.full(batch, -1, np.int64)
            for a, n in enumerate(group):
                elem_index[elems[n]] = a
            index = np.repeat(elem_index, per_row)
            y: torch.Tensor = _RustMixedBlockCirculant.apply(
                x2, index, scales, states, features, *kernels
            )
            return y
        # torch: rows sorted by adapter, one rfft, a matmul per adapter, one irfft
        cdtype = _compute_dtype(x2.dtype, kernels[0].dtype)
        order = [b for n in group for b in elems[n]]
        counts = [len(elems[n]) * per_row for n in group]
        rows: torch.Tensor | None = None
        xs = x2
        if order != list(range(batch)):
            elem_t = torch.tensor(order, dtype=torch.long)
            rows = (elem_t[:, None] * per_row + torch.arange(per_row)).reshape(-1)
            rows = rows.to(x2.device)
            xs = x2.index_select(0, rows)
        compiling = torch.compiler.is_compiling()
        spectra = [
            st.cached_spectra(k, cdtype, st.scale)
            if not compiling and not (torch.is_grad_enabled() and k.requires_grad)
            else None
            for st, k in zip(states, kernels, strict=True)
        ]
        y = _torch_mixed(
            xs if xs.dtype == cdtype else xs.to(cdtype),
            [k if k.dtype == cdtype else k.to(cdtype) for k in kernels],
            spectra,
            scales,
            counts,
            features,
        )
        if rows is None:
            return y
        if len(order) == batch:  # every row, permuted: undo the permutation
            inverse = torch.empty_like(rows)
            inverse[rows] = torch.arange(rows.numel(), device=rows.device)
            return y.index_select(0, inverse)
        return y.new_zeros(x2.shape[0], self.out_features).index_copy(0, rows, y)

    def resolve_backend(self, x: torch.Tensor, adapter_name: str | None = None) -> str:
        """The backend that :meth:`adapter_forward` uses for input ``x``."""
        if self.backend != "auto":
            return self.backend
        k = self.bca_kernels[self.current_adapter if adapter_name is None else adapter_name]
        if (
            x.device.type == "cpu"
            and k.device.type == "cpu"
            and x.dtype in _RUST_DTYPES
            and x.dtype == k.dtype
            and rust_available()
        ):
            return "rust"
        return "torch"

    def adapter_forward(self, x: torch.Tensor, adapter_name: str | None = None) -> torch.Tensor:
        """The update alone, ``(..., in_features) -> (..., out_features)``.

        ``adapter_name=None``: ``Σ_a w_a · scale_a · ΔW_a x`` over the active adapters
        (merged ones included, disabled state ignored); a name: ``scale · ΔW x`` of that
        adapter alone.
        """
        if adapter_name is not None:
            return self._adapter_forward(x, self._known(adapter_name), 1.0)
        if not self.active_adapters:
            raise ValueError("no active adapter; call set_adapter or pass adapter_name")
        out: torch.Tensor | None = None
        for name in self.active_adapters:
            y = self._adapter_forward(x, name, self.adapter_weights.get(name, 1.0))
            out = y if out is None else out + y
        assert out is not None
        return out

    def _adapter_forward(self, x: torch.Tensor, name: str, weight: float) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"x must have last dimension in_features={self.in_features}, "
                f"got shape {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating point tensor, got {x.dtype}")
        x2 = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        backend = self.resolve_backend(x, name)
        kernel = self.bca_kernels[name]
        state = self._adapters[name]
        scale = state.scale * weight
        if backend == "rust":
            self._check_rust_input(x2, kernel)
            if torch.compiler.is_compiling():
                y = _rust_op(x2, kernel, state.handle, self.in_features, self.out_features, scale)
            else:
                y = _RustBlockCirculant.apply(
                    x2, kernel, state, (self.in_features, self.out_features), scale
                )
        else:
            cdtype = _compute_dtype(x.dtype, kernel.dtype)
            spectra = None
            if (not self.training or not torch.is_grad_enabled()) and (
                not torch.compiler.is_compiling()
            ):  # a compiled graph computes the (parameter-sized) spectra itself
                spectra = state.cached_spectra(kernel, cdtype, scale)
            y = _TorchBlockCirculant.apply(
                x2 if x2.dtype == cdtype else x2.to(cdtype),
                kernel if kernel.dtype == cdtype else kernel.to(cdtype),
                spectra,
                scale,
                self.in_features,
                self.out_features,
            )
        if x.dim() != 2:
            y = y.reshape(*x.shape[:-1], self.out_features)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    # -- backend state ------------------------------------------------------------------
    def clear_cache(self) -> None:
        """Drop the cached kernel spectra and Rust operator state (recomputed on next use)."""
        for state in self._adapters.values():
            state.clear()

    def _check_rust_input(self, x: torch.Tensor, k: torch.Tensor) -> None:
        core = _rust_core()
        if core is None:
            raise RuntimeError(
                "backend='rust' needs the compiled extension bca._bca, which did not import "
                f"({_CORE_ERROR}); use backend='torch' or 'auto'"
            )
        if x.device.type != "cpu" or k.device.type != "cpu":
            raise ValueError(
                f"backend='rust' runs on CPU only, got x on {x.device} and kernel on "
                f"{k.device}; use backend='torch' (or 'auto') for other devices"
            )
        if k.dtype not in _RUST_DTYPES:
            raise TypeError(
                f"backend='rust' supports float32/float64 kernels, got bca_kernel {k.dtype}; "
                "use backend='torch'"
            )
        if x.dtype != k.dtype:
            raise TypeError(
                f"backend='rust' needs x of the kernel's dtype {k.dtype}, got x {x.dtype}; "
                "cast x or use backend='torch' (which computes half inputs in float32)"
            )

    def _selection(
        self, adapter_names: str | Sequence[str] | None, weights: Sequence[float] | None
    ) -> tuple[list[str], list[float]]:
        """``(names, weights)``: the active adapters by default, else the given ones."""
        if adapter_names is None:
            if weights is not None:
                raise ValueError("weights needs adapter_names")
            names = list(self.active_adapters)
            return names, [self.adapter_weights.get(n, 1.0) for n in names]
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for n in names:
            self._known(n)
        if weights is None:
            return names, [1.0] * len(names)
        ws = [_check_scale(w, "weights") for w in weights]
        if len(ws) != len(names):
            raise ValueError(f"weights has {len(ws)} entries for {len(names)} adapters")
        return names, ws

    # -- dense update, merge ------------------------------------------------------------
    def delta_weight(
        self,
        adapter_names: str | Sequence[str] | None = None,
        weights: Sequence[float] | None = None,
    ) -> torch.Tensor:
        """Dense update ``(out_features, in_features)`` in the kernels' dtype.

        ``adapter_names=None``: ``Σ_a w_a · scale_a · ΔW_a`` over the active adapters with
        their weights; a name or list: those adapters with ``weights`` (default 1.0).
        Built exactly from the kernels (no FFT) and differentiable.
        """
        names, ws = self._selection(adapter_names, weights)
        if not names:
            raise ValueError("no adapter to build ΔW from (no active adapter)")
        total: torch.Tensor | None = None
        for name, w in zip(names, ws, strict=True):
            state = self._adapters[self._known(name)]
            dw = block_circulant_dense(self.bca_kernels[name], self.in_features, self.out_features)
            factor = state.scale * w
            if factor != 1.0:
                dw = dw * factor
            total = dw if total is None else total + dw
        assert total is not None
        return total

    def combined_kernel(self) -> tuple[torch.Tensor, float] | None:
        """One ``(kernel, scale)`` equal to the active, unmerged adapters together.

        ΔW is linear in the kernel, so adapters of one block size combine exactly into
        ``Σ_a w_a · scale_a · kernel_a`` (returned with scale 1; a single adapter is
        returned as is with ``w · scale``). ``None`` when no adapter is live (disabled,
        none active, or all merged). Raises ``ValueError`` for live adapters of different
        block sizes (export them one at a time, or merge them).
        """
        live = self._live_adapters()
        if not live:
            return None
        if len(live) == 1:
            name, w = live[0]
            return self.bca_kernels[name].detach(), self._adapters[name].scale * w
        sizes = {self._adapters[n].block_size for n, _ in live}
        if len(sizes) != 1:
            raise ValueError(
                f"active adapters {[n for n, _ in live]} have different block sizes "
                f"{sorted(sizes)}; they cannot be combined into one kernel"
            )
        total = torch.zeros_like(self.bca_kernels[live[0][0]].detach())
        for name, w in live:
            total.add_(self.bca_kernels[name].detach(), alpha=self._adapters[name].scale * w)
        return total, 1.0

    @torch.no_grad()
    def merge(
        self,
        exact_unmerge: bool = True,
        adapter_names: str | Sequence[str] | None = None,
        weights: Sequence[float] | None = None,
    ) -> None:
        """Add ``Σ w_a · scale_a · ΔW_a`` into the base weight; merged adapters are skipped.

        ``adapter_names=None`` merges the active adapters with their weights. With
        ``exact_unmerge=True`` (default) a CPU copy of the original weight is kept so that
        :meth:`unmerge` restores it bit for bit; with ``False`` no copy is kept and
        :meth:`unmerge` subtracts the merged update again (equal up to float rounding).
        """
        names, ws = self._selection(adapter_names, weights)
        for n in names:
            self._known(n)
        if not self._adapter_enabled:
            raise ValueError("adapters are disabled; enable them before merge()")
        todo = [(n, w) for n, w in zip(names, ws, strict=True) if n not in self.merged_adapters]
        if not todo:
            warnings.warn("adapter already merged (or none active); merge() ignored", stacklevel=2)
            return
        w = _weight(self.base_layer)
        if not self.merged_adapters:
            self._original_weight = w.detach().to("cpu", copy=True) if exact_unmerge else None
        dw = self.delta_weight([n for n, _ in todo], [x for _, x in todo]).to(w.dtype)
        w.add_(dw.T if self.is_conv1d else dw)
        self.merged_adapters.update(todo)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge` for every merged adapter (bit-exact with ``exact_unmerge``)."""
        if not self.merged_adapters:
            warnings.warn("adapter is not merged; unmerge() ignored", stacklevel=2)
            return
        w = _weight(self.base_layer)
        if self._original_weight is not None:
            w.copy_(self._original_weight.to(w.device))
        else:
            names = list(self.merged_adapters)
            dw = self.delta_weight(names, [self.merged_adapters[n] for n in names]).to(w.dtype)
            w.sub_(dw.T if self.is_conv1d else dw)
        self._original_weight = None
        self.merged_adapters = {}

    def extra_repr(self) -> str:
        parts = []
        for name, s in self._adapters.items():
            q_out, q_in, p = self.bca_kernels[name].shape
            flag = "*" if name in self.active_adapters else ""
            parts.append(f"{name}{flag}(p={p}, kernel=({q_out}, {q_in}, {p}), scale={s.scale})")
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"adapters=[{', '.join(parts)}], backend={self.backend!r}, "
            f"is_conv1d={self.is_conv1d}, merged={sorted(self.merged_adapters)}"
        )
