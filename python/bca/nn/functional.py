"""The block circulant product ``scale · ΔW x`` in torch: backends, autograd, caches.

Everything here is a function of tensors (and a per-adapter cache object); the layer in
:mod:`bca.nn.layer` holds parameters and adapter bookkeeping and calls into this module.
"""

from __future__ import annotations

import itertools
import math
import os
import sys
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from .._errors import BcaError, ShapeError

__all__ = [
    "BACKENDS",
    "KernelCache",
    "block_circulant",
    "block_circulant_dense",
    "mixed_block_circulant",
    "resolve_backend",
    "rust_available",
]

BACKENDS: tuple[str, ...] = ("auto", "rust", "torch")

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
            from .. import core

            _CORE = core
        except ImportError as exc:  # extension not built / not installed
            _CORE_ERROR = f"{type(exc).__name__}: {exc}"
        else:
            _share_torch_threads(core)
    return _CORE


def _torch_openmp_library() -> str | None:
    """The OpenMP runtime (libgomp) that torch's CPU kernels run on, if it is loaded
    (Linux; torch built with the OpenMP backend), else None."""
    if not sys.platform.startswith("linux"):
        return None
    if "ATen parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            fields = (line.split(maxsplit=5) for line in maps)
            paths = {f[5].strip() for f in fields if len(f) == 6}
    except OSError:
        return None
    gomp = sorted(p for p in paths if os.path.basename(p).startswith("libgomp"))
    torch_dir = os.path.dirname(torch.__file__) + os.sep
    own = [p for p in gomp if p.startswith(torch_dir)]
    candidates = own or gomp
    return candidates[0] if candidates else None


def _share_torch_threads(core: Any) -> None:
    """Run the core's parallel loops on torch's OpenMP team instead of bca's own threads.

    torch's OpenMP workers spin for milliseconds after each operation; bca's own worker
    threads, started right after a torch operation, then competed with them for the
    cores (a training step at d = 768, N = 512 on 2 threads: 1.8 ms alone, 2.7 ms after
    a LoRA step, 4.2 ms after a PEFT C3A step). On torch's team the spinning threads do
    bca's work. ``BCA_OPENMP=0`` keeps bca's own threads.
    """
    if os.environ.get("BCA_OPENMP", "").strip() == "0":
        return
    path = _torch_openmp_library()
    if path is not None:
        core._bca._attach_openmp(path)


def rust_available() -> bool:
    """Whether the Rust extension (``bca._bca``) imports, i.e. backend ``"rust"`` works."""
    return _rust_core() is not None


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
        raise ShapeError(f"kernel must have shape (q_out, q_in, p), got {tuple(kernel.shape)}")
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
        raise ShapeError(
            f"{name}={features} does not fit {q} blocks of size {p}: need "
            f"{(q - 1) * p} < {name} <= {q * p}"
        )


#: Steps taken by any ``torch.optim`` optimizer in this process (a global post-step hook,
#: registered below). Fused optimizers (``Adam(fused=True)``, the default of transformers'
#: Trainer) write parameters without bumping their version counters, so the version alone
#: would miss their steps: the cache keys below include this count, and every step makes
#: the next call check its kernels again.
_OPTIMIZER_STEPS = 0


def _count_optimizer_step(optimizer: Any, args: Any, kwargs: Any) -> None:
    global _OPTIMIZER_STEPS
    _OPTIMIZER_STEPS += 1


_OPTIMIZER_HOOK = register_optimizer_step_post_hook(_count_optimizer_step)


class _KernelSnapshot:
    """Detects a change of a kernel tensor since the last :meth:`take`.

    The version counter, the count of optimizer steps (fused optimizers bump no version
    counter) and the storage pointer catch ordinary updates (optimizer steps,
    ``load_state_dict``) without looking at the values. For CPU tensors a value
    comparison with a parameter-sized copy also catches edits through ``.data`` (which
    have their own version counter) and accepts another tensor of equal values (a kernel
    derived anew on each call, as the PEFT patch's); on other devices that comparison
    would force a device synchronisation per call, so it is skipped there (call
    :meth:`BlockCirculantLinear.clear_cache` after editing ``.data`` on a GPU). There the
    snapshot keeps the kernel's storage alive, so that no later tensor can take its
    address (``param.data = a`` then ``param.data = b`` under one version counter: with
    the first storage freed, ``b`` could sit at its address and pass for it).
    """

    __slots__ = ("taken", "key", "values", "storage")

    def __init__(self) -> None:
        self.taken = False
        self.key: tuple[Any, ...] | None = None  # _kernel_key: None without a version counter
        self.values: torch.Tensor | None = None
        self.storage: Any = None

    def matches(self, kernel: torch.Tensor) -> bool:
        if not self.taken:
            return False
        key = _kernel_key(kernel)
        if self.values is None:  # non-CPU: version and storage only
            return key is not None and key == self.key
        values = self.values
        if (key is None or key != self.key) and (  # another tensor: equal values count (CPU)
            kernel.device.type != "cpu"
            or kernel.dtype != values.dtype
            or kernel.shape != values.shape
        ):
            return False
        if not torch.equal(values, kernel.detach()):
            return False
        self.key = key
        return True

    def take(self, kernel: torch.Tensor) -> None:
        self.taken = True
        self.key = _kernel_key(kernel)
        cpu = kernel.device.type == "cpu"
        self.values = kernel.detach().clone() if cpu else None
        self.storage = None if cpu else kernel.untyped_storage()

    def clear(self) -> None:
        self.taken = False
        self.key = None
        self.values = None
        self.storage = None


def _kernel_key(kernel: torch.Tensor) -> tuple[Any, ...] | None:
    """What the caches compare to tell that a kernel has not changed without reading its
    values (the snapshot's key, a frozen cache's trust): version counter, the count of
    optimizer steps (see ``_OPTIMIZER_STEPS``), address, device, dtype, shape, strides
    and negation bit. None for a tensor without a version counter, such as an inference
    tensor: it never matches, so its values are compared (CPU) or its spectra recomputed
    on every call, and a frozen cache never trusts it."""
    try:
        version = kernel._version
    except RuntimeError:
        return None
    return (
        version,
        _OPTIMIZER_STEPS,
        kernel.data_ptr(),
        kernel.device,
        kernel.dtype,
        kernel.shape,
        kernel.stride(),
        kernel.is_neg(),
    )


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


def _kernel_grad_from_spectra(
    xs: torch.Tensor, gs: torch.Tensor, p: int, scale: float
) -> torch.Tensor:
    """``scale · Σ_n kgrad(x_n, g_n)`` from the rows' spectra ``xs`` (F, N, q_in) and
    ``gs`` (F, N, q_out): ``conj(X)ᵀ G`` per frequency, inverse-transformed to the kernel's
    ``(q_out, q_in, p)``. Plain torch ops, so differentiable again."""
    gks = torch.matmul(xs.mH, gs)  # (F, q_in, q_out)
    grad_kernel = torch.fft.irfft(gks.permute(2, 1, 0), n=p, dim=-1)
    return grad_kernel * scale if scale != 1.0 else grad_kernel


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
        grad_kernel = _kernel_grad_from_spectra(_block_spectra(x, q_in, p), gs, p, scale)
    return grad_x, grad_kernel


def _torch_forward(
    x: torch.Tensor, spectra: torch.Tensor, p: int, out_features: int
) -> torch.Tensor:
    """``scale·ΔW x`` from the (scaled) kernel spectra ``(F, q_in, q_out)``; x (N, in)."""
    if x.shape[0] == 0:  # some FFT libraries (MKL) reject empty batches
        return x.new_zeros(0, out_features)
    xs = _block_spectra(x, spectra.shape[1], p)  # (F, N, q_in)
    ys = torch.matmul(xs, spectra)  # (F, N, q_out)
    return _inverse_blocks(ys, p, out_features)


def _torch_backward(
    x: torch.Tensor,
    kernel: torch.Tensor,
    spectra: torch.Tensor,
    grad_output: torch.Tensor,
    scale: float,
    in_features: int,
    need_x: bool,
    need_k: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Input and kernel gradients of :func:`_torch_forward` (not differentiable again);
    ``None`` where not needed."""
    q_out, q_in, p = kernel.shape
    if x.shape[0] == 0:
        return (
            x.new_zeros(x.shape) if need_x else None,
            torch.zeros_like(kernel) if need_k else None,
        )
    if grad_output.dtype != x.dtype:
        grad_output = grad_output.to(x.dtype)
    gs = _block_spectra(grad_output, q_out, p).contiguous()  # (F, N, q_out), used twice
    grad_x = grad_kernel = None
    if need_x:
        gxs = torch.matmul(gs, spectra.mH)  # (F, N, q_in); mH: conjugate transpose
        grad_x = _inverse_blocks(gxs, p, in_features)
    if need_k:  # x's spectra recomputed
        grad_kernel = _kernel_grad_from_spectra(_block_spectra(x, q_in, p), gs, p, scale)
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
        if spectra is None:
            spectra = _kernel_spectra(kernel, scale)
        # saved: x, the kernel and its (parameter-sized) spectra; the input spectra are
        # recomputed in backward
        ctx.save_for_backward(x, kernel, spectra)
        ctx.features = (in_features, out_features, scale)
        return _torch_forward(x, spectra, kernel.shape[-1], out_features)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x, kernel, spectra = ctx.saved_tensors
        in_features, out_features, scale = ctx.features
        if _create_graph(grad_output, x, kernel):  # double backward: differentiable ops
            gx, gk = _differentiable_backward(
                x, kernel, grad_output, scale, in_features, out_features,
                bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1]),
            )  # fmt: skip
            return gx, gk, None, None, None, None
        grad_x, grad_kernel = _torch_backward(
            x, kernel, spectra, grad_output, scale, in_features,
            bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1]),
        )  # fmt: skip
        return grad_x, grad_kernel, None, None, None, None


def _rust_forward(
    state: KernelCache, x: torch.Tensor, kernel: torch.Tensor, features: tuple[int, int],
    scale: float,
) -> torch.Tensor:  # fmt: skip
    """``scale * ΔW x`` by the Rust core (shared by the eager and the compiled path)."""
    op = state.rust_operator(kernel, *features)
    y = op.matmul(x.detach().contiguous().numpy())
    if scale != 1.0:
        y *= scale
    return torch.from_numpy(y)


def _rust_backward(
    state: KernelCache,
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
        state: KernelCache,
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


def _grads_as_tensors(
    gx: torch.Tensor | None, gk: torch.Tensor | None, x: torch.Tensor, kernel: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """A backward operator's results: operators cannot return None, so an empty tensor
    stands for "not asked for"; results are contiguous, as the fake implementations say."""
    return (
        gx.contiguous() if gx is not None else x.new_empty(0),
        gk.contiguous() if gk is not None else kernel.new_empty(0),
    )


def _fake_grads(
    x: torch.Tensor, kernel: torch.Tensor, input_grad: bool, kernel_grad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shapes of :func:`_grads_as_tensors`'s results, for the fake implementations."""
    return (
        x.new_empty(x.shape) if input_grad else x.new_empty(0),
        kernel.new_empty(kernel.shape) if kernel_grad else kernel.new_empty(0),
    )


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
    return _grads_as_tensors(gx, gk, x, kernel)


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
    return _fake_grads(x, kernel, input_grad, kernel_grad)


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


# The compiled "torch" path. Inductor generates no code for complex tensors and has
# miscompiled graphs holding them (on CUDA with torch 2.11, compiled steps returned the
# base layer's output without the adapter's), so under torch.compile the FFTs and
# complex products run inside custom operators: the graph holds only real tensors, and
# each operator runs the eager torch ops above on any device.
@torch.library.custom_op("bca::torch_block_circulant", mutates_args=())
def _torch_op(
    x: torch.Tensor, kernel: torch.Tensor, scale: float, in_features: int, out_features: int
) -> torch.Tensor:
    return _torch_forward(x, _kernel_spectra(kernel, scale), kernel.shape[-1], out_features)


@_torch_op.register_fake
def _torch_op_fake(
    x: torch.Tensor, kernel: torch.Tensor, scale: float, in_features: int, out_features: int
) -> torch.Tensor:
    return x.new_empty((x.shape[0], out_features))


@torch.library.custom_op("bca::torch_block_circulant_backward", mutates_args=())
def _torch_op_backward(
    x: torch.Tensor,
    kernel: torch.Tensor,
    grad_output: torch.Tensor,
    scale: float,
    in_features: int,
    input_grad: bool,
    kernel_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    gx, gk = _torch_backward(
        x, kernel, _kernel_spectra(kernel, scale), grad_output, scale, in_features,
        input_grad, kernel_grad,
    )  # fmt: skip
    return _grads_as_tensors(gx, gk, x, kernel)  # (the irfft's kernel gradient is strided)


@_torch_op_backward.register_fake
def _torch_op_backward_fake(
    x: torch.Tensor,
    kernel: torch.Tensor,
    grad_output: torch.Tensor,
    scale: float,
    in_features: int,
    input_grad: bool,
    kernel_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _fake_grads(x, kernel, input_grad, kernel_grad)


def _torch_op_setup(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    x, kernel, scale, in_features, out_features = inputs
    ctx.save_for_backward(x, kernel)
    ctx.args = (scale, in_features, out_features)


def _torch_op_grad(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    x, kernel = ctx.saved_tensors
    scale, in_features, out_features = ctx.args
    need_x, need_k = bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1])
    if not (need_x or need_k):
        return None, None, None, None, None
    if _create_graph(grad_output, x, kernel):  # double backward: differentiable ops
        gx_d, gk_d = _differentiable_backward(
            x, kernel, grad_output, scale, in_features, out_features, need_x, need_k
        )
        return gx_d, gk_d, None, None, None
    gx, gk = _torch_op_backward(x, kernel, grad_output, scale, in_features, need_x, need_k)
    return (gx if need_x else None), (gk if need_k else None), None, None, None


_torch_op.register_autograd(_torch_op_grad, setup_context=_torch_op_setup)


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


@torch.library.custom_op("bca::torch_mixed_block_circulant", mutates_args=())
def _torch_mixed_op(
    x: torch.Tensor,
    kernels: list[torch.Tensor],
    scales: list[float],
    counts: list[int],
    in_features: int,
    out_features: int,
) -> torch.Tensor:
    """:func:`_torch_mixed` as an operator (the compiled path; see :func:`_torch_op`)."""
    spectra: list[torch.Tensor | None] = [None] * len(kernels)
    return _torch_mixed(x, kernels, spectra, scales, counts, (in_features, out_features))


@_torch_mixed_op.register_fake
def _torch_mixed_op_fake(
    x: torch.Tensor,
    kernels: list[torch.Tensor],
    scales: list[float],
    counts: list[int],
    in_features: int,
    out_features: int,
) -> torch.Tensor:
    return x.new_empty((x.shape[0], out_features))


@torch.library.custom_op("bca::torch_mixed_block_circulant_backward", mutates_args=())
def _torch_mixed_op_backward(
    x: torch.Tensor,
    kernels: list[torch.Tensor],
    grad_output: torch.Tensor,
    scales: list[float],
    counts: list[int],
    in_features: int,
    input_grad: bool,
    kernel_grads: list[bool],
) -> list[torch.Tensor]:
    """``[grad_x, grad_kernel_0, ...]`` of :func:`_torch_mixed_op` (empty where not
    asked for): per adapter, its rows' spectra against its own kernel spectra."""
    q_out, q_in, p = kernels[0].shape
    if grad_output.dtype != x.dtype:
        grad_output = grad_output.to(x.dtype)
    gs = _block_spectra(grad_output, q_out, p).contiguous()  # (F, M, q_out)
    xs = _block_spectra(x, q_in, p) if any(kernel_grads) else None  # (F, M, q_in)
    parts = []
    grads = []
    lo = 0
    for kernel, scale, count, need_k in zip(kernels, scales, counts, kernel_grads, strict=True):
        g_a = gs[:, lo : lo + count]
        if input_grad:
            parts.append(torch.matmul(g_a, _kernel_spectra(kernel, scale).mH))
        if need_k and xs is not None:
            gk = _kernel_grad_from_spectra(xs[:, lo : lo + count], g_a, p, scale)
            grads.append(gk.contiguous())
        else:
            grads.append(kernel.new_empty(0))
        lo += count
    if input_grad:
        gxs = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        gx = _inverse_blocks(gxs, p, in_features)
    else:
        gx = x.new_empty(0)
    return [gx, *grads]


@_torch_mixed_op_backward.register_fake
def _torch_mixed_op_backward_fake(
    x: torch.Tensor,
    kernels: list[torch.Tensor],
    grad_output: torch.Tensor,
    scales: list[float],
    counts: list[int],
    in_features: int,
    input_grad: bool,
    kernel_grads: list[bool],
) -> list[torch.Tensor]:
    return [
        x.new_empty(x.shape) if input_grad else x.new_empty(0),
        *(
            k.new_empty(k.shape) if need else k.new_empty(0)
            for k, need in zip(kernels, kernel_grads, strict=True)
        ),
    ]


def _torch_mixed_op_setup(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    x, kernels, scales, counts, in_features, out_features = inputs
    ctx.save_for_backward(x, *kernels)
    ctx.args = (list(scales), list(counts), in_features, out_features)


def _torch_mixed_op_grad(ctx: Any, grad_output: torch.Tensor) -> tuple[Any, ...]:
    x, *kernels = ctx.saved_tensors
    scales, counts, in_features, out_features = ctx.args
    need_x = bool(ctx.needs_input_grad[0])
    need_k = [bool(n) for n in ctx.needs_input_grad[1]]
    none = (None, None, None, None)
    if not (need_x or any(need_k)):
        return (None, [None] * len(kernels), *none)
    if _create_graph(grad_output, x, *kernels):  # double backward: differentiable ops
        out = _grads_with_graph(
            lambda: _torch_mixed(
                x, kernels, [None] * len(kernels), scales, counts, (in_features, out_features)
            ),
            [x, *kernels],
            [need_x, *need_k],
            grad_output,
        )
        return (out[0], out[1:], *none)
    gx, *gks = _torch_mixed_op_backward(
        x, kernels, grad_output, scales, counts, in_features, need_x, need_k
    )
    return (
        gx if need_x else None,
        [g if need else None for g, need in zip(gks, need_k, strict=True)],
        *none,
    )


_torch_mixed_op.register_autograd(_torch_mixed_op_grad, setup_context=_torch_mixed_op_setup)


def _row_scale(index: Any, scales: list[float]) -> Any:
    """Each row's scale (0 for a row without an adapter), float64."""
    return np.where(index >= 0, np.asarray(scales)[np.maximum(index, 0)], 0.0)


def _core_scales(scales: list[float]) -> list[float] | None:
    """The core's ``scales=``: None when every scale is 1 (no multiply, the same bits)."""
    return None if scales.count(1.0) == len(scales) else scales


def _rust_mixed_forward(
    x: torch.Tensor,
    index: Any,
    scales: list[float],
    states: Sequence[KernelCache],
    features: tuple[int, int],
    kernels: Sequence[torch.Tensor],
    add: torch.Tensor | None = None,
) -> torch.Tensor:
    """The Rust mixed forward (``index``: checked int64 row indices, one per row of x),
    plus ``add`` (rows of ``x``'s dtype, read only) when given: one core call."""
    ops = [st.rust_operator(k, *features)._op for st, k in zip(states, kernels, strict=True)]
    y = _rust_core()._bca.mixed_forward(
        ops,
        index,
        x.detach().contiguous().numpy(),
        scales=_core_scales(scales),
        add=None if add is None else add.detach().contiguous().numpy(),
    )
    return torch.from_numpy(y)


def _rust_mixed_fast(
    x: torch.Tensor,
    kernels: Sequence[torch.Tensor],
    states: Sequence[KernelCache],
    index_array: Any,
    scales: list[float],
    features: tuple[int, int],
    add: torch.Tensor,
) -> torch.Tensor | None:
    """``add + scales_a · ΔW_a x[b]`` for a checked mixed batch (``x`` ``(B, ..., in)``,
    not empty; ``index_array`` one int64 per batch row; ``add`` ``(B, ..., out)``) in one
    core call with the fewest Python steps, or None where its conditions do not hold and
    the caller takes the general path (which also refreshes the operators): gradients
    disabled, not compiling, ``x`` and ``add`` CPU tensors of the kernels' dtype, every
    kernel still read by its cache's view (:meth:`KernelCache.rust_view_of`). The core
    compares each kernel with its operator's copy (``kernels=``), as ``rust_operator``
    does, unless every cache is frozen and trusts its kernel (:meth:`KernelCache.freeze`);
    the result is bit for bit the general path's."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return None
    dtype = x.dtype
    if not (x.is_cpu and add.is_cpu and add.dtype == dtype and add.shape[:-1] == x.shape[:-1]):
        return None
    n_in, n_out = features
    ops = []
    views = []
    compare = False  # whether any kernel must be compared (one not trusted, see freeze)
    for k, st in zip(kernels, states, strict=True):
        got = st.rust_view_of(k, n_in, n_out)
        if got is None:  # first use, or another tensor: (re)build the operator and view
            if not (k.is_cpu and k.dtype == dtype and dtype in _RUST_DTYPES and rust_available()):
                return None
            op = st.rust_operator(k, n_in, n_out)
            got = st.rust_view_of(k, n_in, n_out)  # None for a non-contiguous kernel
            view = got[1] if got is not None and got[0] is op else k.detach().contiguous().numpy()
        elif k.dtype != dtype:
            return None
        else:
            op, view = got
        compare = compare or not st.rust_trusts(k, op)
        ops.append(op)
        views.append(view)
    # made before the core compares (see KernelCache._trust)
    records = (
        [st.rust_trust_record(k, op) for k, st, op in zip(kernels, states, ops, strict=True)]
        if compare
        else []
    )
    index = index_array
    if x.dim() > 2:  # the core takes an index per row, shaped like x's leading axes
        index = np.repeat(index_array, math.prod(x.shape[1:-1])).reshape(x.shape[:-1])
    y = _rust_core()._bca.mixed_forward(
        [op._op for op in ops],
        index,
        x.detach().contiguous().numpy(),
        scales=_core_scales(scales),
        add=add.detach().contiguous().numpy(),
        kernels=views if compare else None,
    )
    if compare:  # each operator has taken its kernel
        for st, record in zip(states, records, strict=True):
            st.rust_trusted = record
    return torch.from_numpy(y)


#: int64 zeros: the adapter index of every row of a one-adapter call (grown on demand).
_ZERO_INDEX = np.zeros(0, dtype=np.int64)


def _rust_single_fast(
    x: torch.Tensor,
    kernel: torch.Tensor,
    state: KernelCache,
    scale: float,
    features: tuple[int, int],
    add: torch.Tensor,
) -> torch.Tensor | None:
    """``add + scale · ΔW x`` for one adapter in one core call (the mixed call with every
    row on operator 0, whose rows are bit for bit the operator's own ``matmul``), or None
    where :func:`_rust_mixed_fast`'s conditions do not hold; the result is bit for bit
    ``add + block_circulant(x, kernel, scale=scale)``."""
    global _ZERO_INDEX
    n_in, n_out = features
    if x.dim() == 0 or x.shape[-1] != n_in or add.shape != (*x.shape[:-1], n_out):
        return None
    n_rows = x.numel() // n_in
    if n_rows == 0:
        return None
    index = _ZERO_INDEX
    if index.size < n_rows:
        index = _ZERO_INDEX = np.zeros(max(n_rows, 2 * index.size), dtype=np.int64)
    y = _rust_mixed_fast(
        x.reshape(n_rows, n_in),
        (kernel,),
        (state,),
        index[:n_rows],
        [scale],
        features,
        add.reshape(n_rows, n_out),
    )
    return None if y is None else y.reshape(add.shape)


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
        states: list[KernelCache],
        features: tuple[int, int],
        *kernels: torch.Tensor,
    ) -> torch.Tensor:
        ctx.save_for_backward(x, *kernels)
        ctx.index, ctx.scales, ctx.states, ctx.features = index, scales, states, features
        ctx.row_scale = _row_scale(index, scales)
        return _rust_mixed_forward(x, index, scales, states, features, kernels)

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


def _grads_with_graph(
    forward: Callable[[], torch.Tensor],
    inputs: Sequence[torch.Tensor],
    needs: Sequence[bool],
    grad_output: torch.Tensor,
) -> list[torch.Tensor | None]:
    """Gradients of ``forward()`` (recomputed with grad history) with respect to the
    ``inputs`` that ``needs`` names, with a graph (``create_graph=True``); zeros for an
    input the result does not depend on, ``None`` for one not asked for."""
    with torch.enable_grad():
        y = forward()
        wanted = [t for t, need in zip(inputs, needs, strict=True) if need]
        got = torch.autograd.grad(
            y, wanted, grad_output.to(y.dtype), create_graph=True, allow_unused=True
        )
    it = iter(got)
    out: list[torch.Tensor | None] = []
    for t, need in zip(inputs, needs, strict=True):
        g = next(it) if need else None
        out.append(torch.zeros_like(t) if (need and g is None) else g)
    return out


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

    def forward() -> torch.Tensor:
        y_sel = _torch_mixed(
            x.index_select(0, order),
            [kernels[a] for a in used],
            [None] * len(used),
            [ctx.scales[a] for a in used],
            [counts[a] for a in used],
            ctx.features,
        )
        return y_sel.new_zeros(x.shape[0], ctx.features[1]).index_copy(0, order, y_sel)

    out = _grads_with_graph(forward, [x, *kernels], [need_x, *need_k], grad_output)
    return out[0], out[1:]


_STATES: weakref.WeakValueDictionary[int, KernelCache] = weakref.WeakValueDictionary()
_HANDLES = itertools.count(1)
#: serialises KernelCache.freeze/unfreeze (a count and an epoch updated together)
_FREEZE_LOCK = threading.Lock()


def _state_of(handle: int) -> KernelCache:
    if handle == 0:  # no cache: a one-off operator for this call
        return KernelCache()
    state = _STATES.get(handle)
    if state is None:  # only reachable through a stale compiled graph of a deleted adapter
        raise RuntimeError(f"bca adapter state {handle} no longer exists (adapter deleted?)")
    return state


class KernelCache:
    """Backend state for one kernel that a module owns, passed as ``cache=``.

    Holds the kernel's torch spectra (reused while the kernel is unchanged, see
    :func:`block_circulant`) and the Rust operator (``bca.core.BlockCirculant``, whose
    spectra are recomputed only when the kernel changed). For the torch spectra, "changed"
    is detected from the kernel's version counter and storage and, for CPU kernels, a
    comparison with a parameter-sized copy (which also catches edits through ``.data``);
    on other devices that comparison would synchronise the device, so call :meth:`clear`
    after editing a GPU kernel's ``.data``. The Rust operator compares the kernel with
    its own copy, bit for bit, in the core (``sync_kernel``: no Python-side copy).

    **Frozen kernels** (:meth:`freeze`, or :func:`bca.model.trusted_adapters` for a whole
    model): for serving adapters that no longer change, the bitwise comparison can be
    skipped. While the cache is frozen, a kernel already taken is trusted as long as it
    is the same tensor object with the same address, strides, dtype, shape and version
    counter, so optimizer steps, ``load_state_dict``, ``copy_`` and other in-place edits
    of the parameter or its views are still seen (the next call compares and takes the
    kernel), and so are ``torch.optim`` steps, fused ones included (counted by a global
    post-step hook: they bump no version counter); edits that bypass the version counter
    (through ``.data``, ``.numpy()`` or other memory sharing) are **not** seen until the
    last :meth:`unfreeze` (or :meth:`clear`).

    ``handle`` names the cache for the custom operator of the compiled Rust path; copies
    (pickle, deepcopy) get a fresh cache and handle, never the cached values.
    """

    def __init__(self) -> None:
        self.handle = next(_HANDLES)
        _STATES[self.handle] = self
        # (snapshot of the kernel they were made from, (cdtype, scale), spectra, trust
        # record or None): see cached_spectra
        self.spectra_state: tuple[_KernelSnapshot, Any, torch.Tensor, Any] | None = None
        self.rust_op: Any = None
        self.rust_geometry: tuple[Any, ...] | None = None
        # (kernel address, geometry, numpy view of the kernel, operator): see rust_view_of
        self.rust_fast: tuple[int, tuple[Any, ...], Any, Any] | None = None
        # frozen: depth of freeze() calls. rust_trusted: (kernel, _kernel_key,
        # storage, epoch, operator) of the kernel that operator last took while frozen (see
        # _trust). Each state is one tuple, read once, so that a thread never pairs one
        # call's snapshot or record with another call's spectra or operator.
        self.frozen = 0
        self.frozen_epoch = 0  # one more at each freeze from unfrozen and each clear()
        self.rust_trusted: tuple[Any, ...] | None = None

    @property
    def spectra(self) -> torch.Tensor | None:
        """The cached torch spectra (None before the first use or after :meth:`clear`)."""
        state = self.spectra_state
        return None if state is None else state[2]

    @spectra.setter
    def spectra(self, value: None) -> None:
        """``cache.spectra = None`` drops the cached torch spectra (as before they were
        kept in one tuple); any other value is refused."""
        if value is not None:
            raise BcaError("KernelCache.spectra can only be set to None (drop the spectra)")
        self.spectra_state = None

    def clear(self) -> None:
        """Drop the cached spectra and the kernel view; the Rust operator is compared with
        the kernel anew (bit for bit) on next use."""
        with _FREEZE_LOCK:  # a call that overlaps this one cannot leave a trusted record
            self.frozen_epoch += 1
        self.spectra_state = None
        self.rust_fast = None
        self.rust_trusted = None

    def freeze(self) -> None:
        """Trust kernels already taken while their tensor, address and version counter
        are unchanged (see the class docstring); calls nest, each needs an
        :meth:`unfreeze`."""
        with _FREEZE_LOCK:
            if self.frozen == 0:
                self.frozen_epoch += 1
            self.frozen += 1

    def unfreeze(self) -> None:
        """Undo one :meth:`freeze`; after the last, every call compares kernels bit for
        bit again (so edits made through ``.data`` while frozen are seen then)."""
        with _FREEZE_LOCK:
            if self.frozen <= 0:
                raise BcaError("unfreeze() without a matching freeze()")
            self.frozen -= 1
            if self.frozen > 0:
                return
        # the records are dead (epoch): free the storage they hold
        self.rust_trusted = None
        state = self.spectra_state
        if state is not None and state[3] is not None:
            self.spectra_state = (*state[:3], None)

    def _trust(self, kernel: torch.Tensor) -> tuple[Any, ...] | None:
        """``(kernel, _kernel_key(kernel), its storage, frozen_epoch)`` while frozen, else
        (or for a kernel without a version counter) None. Made *before* the
        kernel is read, so that an edit made meanwhile (by another thread) leaves the
        record stale, not the cache. The storage is kept alive so that its address cannot
        be reused: after ``param.data = a`` then ``param.data = b``, ``b`` could otherwise
        sit where the trusted kernel sat, under the same version counter. The epoch limits
        the record to this freeze and to this cache's contents: edits made while unfrozen
        are never trusted away, nor a record made by a call that overlapped
        :meth:`clear`. The kernel is held by a strong reference, not a weak one: torch's
        ``swap_tensors`` (``load_state_dict`` and ``module.to`` with
        ``torch.__future__.set_swap_module_params_on_conversion(True)``) refuses tensors
        with weak references."""
        if self.frozen <= 0:
            return None
        key = _kernel_key(kernel)
        if key is None:
            return None
        return (kernel, key, kernel.untyped_storage(), self.frozen_epoch)

    def _trusted(self, record: tuple[Any, ...] | None, kernel: torch.Tensor) -> bool:
        """Whether ``record`` (made by :meth:`_trust`) is of ``kernel``, the same tensor
        object, unchanged by any edit its version counter sees, and the cache is frozen."""
        return (
            self.frozen > 0
            and record is not None
            and record[3] == self.frozen_epoch
            and record[0] is kernel
            and record[1] == _kernel_key(kernel)
        )

    def rust_trusts(self, kernel: torch.Tensor, op: Any) -> bool:
        """Whether operator ``op`` may skip comparing ``kernel``: frozen, and ``op`` took
        this kernel, unchanged since (see :meth:`freeze`)."""
        t = self.rust_trusted
        return t is not None and t[4] is op and self._trusted(t, kernel)

    def rust_trust_record(self, kernel: torch.Tensor, op: Any) -> tuple[Any, ...] | None:
        """The ``rust_trusted`` to keep once ``op`` has taken ``kernel`` (made before)."""
        record = self._trust(kernel)
        return None if record is None else (*record, op)

    def __reduce__(self) -> tuple[Any, ...]:
        # pickle and deepcopy rebuild an empty cache: a fresh handle, no Rust operator
        return (type(self), ())

    def cached_spectra(
        self, kernel: torch.Tensor, cdtype: torch.dtype, scale: float
    ) -> torch.Tensor:
        """``scale *`` the kernel's spectra in ``cdtype`` (recomputed only on a change)."""
        meta = (cdtype, scale)
        state = self.spectra_state
        if state is not None and state[1] == meta and self._trusted(state[3], kernel):
            return state[2]
        record = self._trust(kernel)  # before the kernel is read
        if state is not None and state[1] == meta and state[0].matches(kernel):
            if record is not None:
                self.spectra_state = (state[0], meta, state[2], record)
            return state[2]
        # a new snapshot, then the spectra of its copy (CPU), installed with it as one
        # tuple: an edit made meanwhile (another thread) is seen by the next call
        snap = _KernelSnapshot()
        snap.take(kernel)
        source = kernel.detach() if snap.values is None else snap.values
        with torch.no_grad():
            spectra = _kernel_spectra(source.to(cdtype), scale)
        self.spectra_state = (snap, meta, spectra, record)
        return spectra

    def rust_view_of(
        self, kernel: torch.Tensor, in_features: int, out_features: int
    ) -> tuple[Any, Any] | None:
        """``(operator, view)``: the Rust operator of this geometry and the numpy view of
        ``kernel``'s memory kept by :meth:`rust_operator`, if that view still reads exactly
        ``kernel`` (same address, shape, dtype, contiguous); else None. The operator is not
        synchronised. The four are kept as one tuple, read once, so that a thread never
        pairs one call's view with another's address."""
        fast = self.rust_fast
        if (
            fast is not None
            and kernel.is_cpu
            and kernel.is_contiguous()
            and kernel.data_ptr() == fast[0]
            and fast[1] == (in_features, out_features, kernel.shape, kernel.dtype)
        ):
            return fast[3], fast[2]
        return None

    def rust_operator(self, kernel: torch.Tensor, in_features: int, out_features: int) -> Any:
        """The Rust operator for ``kernel`` (a CPU tensor), its spectra recomputed only on
        a change: the operator compares the kernel with its own copy, bit for bit, in the
        core (``sync_kernel``), which also catches edits through ``.data``.

        A contiguous kernel is read through a numpy view of its memory kept from the last
        call (the view keeps that memory alive, so no other tensor can take its address):
        the view is reused while the kernel has the same address, shape and dtype.
        """
        got = self.rust_view_of(kernel, in_features, out_features)
        if got is not None:
            op, view = got
            if not self.rust_trusts(kernel, op):
                record = self.rust_trust_record(kernel, op)
                op._op.sync_kernel(view)
                self.rust_trusted = record
            return op
        self.rust_fast = None
        self.rust_trusted = None
        op = self.rust_op
        record = self._trust(kernel)
        k = kernel.detach()
        view = k.contiguous().numpy()
        geometry = (in_features, out_features, k.shape, k.dtype)
        if op is None or self.rust_geometry != geometry:
            op = _rust_core().BlockCirculant(view, in_features, out_features)
            self.rust_op = op
            self.rust_geometry = geometry
        else:
            op._op.sync_kernel(view)
        if k.is_contiguous():  # else the view is of a copy: not kept
            self.rust_fast = (k.data_ptr(), geometry, view, op)
            self.rust_trusted = None if record is None else (*record, op)
        return op


# --------------------------------------------------------------------------------------
# the entry points
# --------------------------------------------------------------------------------------
def _check_rust_input(x: torch.Tensor, k: torch.Tensor) -> None:
    if _rust_core() is None:
        raise RuntimeError(
            "backend='rust' needs the compiled extension bca._bca, which did not import "
            f"({_CORE_ERROR}); use backend='torch' or 'auto'"
        )
    if x.device.type != "cpu" or k.device.type != "cpu":
        raise BcaError(
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


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise BcaError(f"backend must be one of {BACKENDS}, got {backend!r}")


def resolve_backend(
    x: torch.Tensor, kernels: torch.Tensor | Sequence[torch.Tensor], backend: str = "auto"
) -> str:
    """The backend :func:`block_circulant` (one kernel) or :func:`mixed_block_circulant`
    (a sequence) uses: ``backend`` unless ``"auto"``, which is ``"rust"`` for CPU
    float32/float64 ``x`` of the kernels' dtype when the extension imports, else
    ``"torch"``."""
    if backend != "auto":
        _check_backend(backend)
        return backend
    ks = (kernels,) if isinstance(kernels, torch.Tensor) else kernels
    if (
        x.device.type == "cpu"
        and x.dtype in _RUST_DTYPES
        and all(k.device.type == "cpu" and k.dtype == x.dtype for k in ks)
        and rust_available()
    ):
        return "rust"
    return "torch"


def _features(
    kernel: torch.Tensor, in_features: int | None, out_features: int | None
) -> tuple[int, int]:
    if kernel.dim() != 3:
        raise ShapeError(f"kernel must have shape (q_out, q_in, p), got {tuple(kernel.shape)}")
    q_out, q_in, p = kernel.shape
    n_in = q_in * p if in_features is None else int(in_features)
    n_out = q_out * p if out_features is None else int(out_features)
    if not ((q_in - 1) * p < n_in <= q_in * p and (q_out - 1) * p < n_out <= q_out * p):
        _check_padding("in_features", n_in, q_in, p)
        _check_padding("out_features", n_out, q_out, p)
    return n_in, n_out


def _check_x(x: object, in_features: int, *, batch: bool = False) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if batch:
        if x.dim() < 2 or x.shape[-1] != in_features:
            raise ShapeError(
                "a mixed batch needs x of shape (batch, ..., in_features="
                f"{in_features}), got shape {tuple(x.shape)}"
            )
    elif x.dim() == 0 or x.shape[-1] != in_features:
        raise ShapeError(
            f"x must have last dimension in_features={in_features}, got shape {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating point tensor, got {x.dtype}")
    return x


def block_circulant(
    x: torch.Tensor,
    kernel: torch.Tensor,
    in_features: int | None = None,
    out_features: int | None = None,
    *,
    scale: float = 1.0,
    backend: str = "auto",
    cache: KernelCache | None = None,
    training: bool = True,
) -> torch.Tensor:
    """``scale · ΔW x`` over the last axis: ``(..., in_features) -> (..., out_features)``.

    ``kernel`` ``(q_out, q_in, p)``: block ``(i, j)`` of ΔW is ``circulant(kernel[i, j])``;
    ``in_features``/``out_features`` default to ``q_in·p``/``q_out·p``, smaller values mean
    zero padding (x padded, output cut). Differentiable in ``x`` and ``kernel`` to any
    order (``create_graph=True`` backwards run on differentiable ``torch.fft`` ops), and
    traceable by ``torch.compile(fullgraph=True)``. The result has x's dtype.

    ``backend``: ``"torch"`` (``torch.fft``, any device and dtype; half precision computed
    in float32), ``"rust"`` (the Rust core, CPU float32/float64 with ``x`` of the kernel's
    dtype; under ``torch.compile`` the custom operator ``torch.ops.bca.rust_block_circulant``)
    or ``"auto"`` (see :func:`resolve_backend`).

    ``cache``: a :class:`KernelCache` owned by whoever owns the kernel (a module): the Rust
    operator is then built once and resynchronised only when the kernel changes, and with
    ``training=False`` or grad disabled the kernel spectra of the ``"torch"`` backend are
    reused too (not inside a compiled graph, which computes them itself). Without a cache
    each call transforms the kernel.
    """
    n_in, n_out = _features(kernel, in_features, out_features)
    _check_x(x, n_in)
    x2 = x if x.dim() == 2 else x.reshape(-1, n_in)
    backend = resolve_backend(x, kernel, backend)
    compiling = torch.compiler.is_compiling()
    y: torch.Tensor
    if backend == "rust":
        _check_rust_input(x2, kernel)
        if compiling:
            handle = 0 if cache is None else cache.handle
            y = _rust_op(x2, kernel, handle, n_in, n_out, scale)
        else:
            y = _RustBlockCirculant.apply(
                x2, kernel, KernelCache() if cache is None else cache, (n_in, n_out), scale
            )
    else:
        cdtype = _compute_dtype(x.dtype, kernel.dtype)
        spectra = None
        if cache is not None and (not training or not torch.is_grad_enabled()) and not compiling:
            spectra = cache.cached_spectra(kernel, cdtype, scale)
        xc = x2 if x2.dtype == cdtype else x2.to(cdtype)
        kc = kernel if kernel.dtype == cdtype else kernel.to(cdtype)
        if compiling:  # complex tensors stay inside the operator (see _torch_op)
            y = _torch_op(xc, kc, scale, n_in, n_out)
        else:
            y = _TorchBlockCirculant.apply(xc, kc, spectra, scale, n_in, n_out)
    if x.dim() != 2:
        y = y.reshape(*x.shape[:-1], n_out)
    return y if y.dtype == x.dtype else y.to(x.dtype)


def mixed_block_circulant(
    x: torch.Tensor,
    kernels: Sequence[torch.Tensor],
    adapter_index: Sequence[int],
    in_features: int | None = None,
    out_features: int | None = None,
    *,
    scales: Sequence[float] | None = None,
    backend: str = "auto",
    caches: Sequence[KernelCache] | None = None,
) -> torch.Tensor:
    """A mixed batch: row ``b`` of ``x`` ``(B, ..., in)`` (every position of ``x[b]``) gets
    ``scales[a] · ΔW_a x[b]`` with ``a = adapter_index[b]``; ``-1`` gives a zero row.

    ``kernels`` share one shape ``(q_out, q_in, p)`` and dtype. Each row is transformed
    once and multiplied with its own kernel's spectra (about the cost of one
    :func:`block_circulant` on all rows): on the ``"rust"`` backend one core call
    (``bca.mixed_matmul``), on ``"torch"`` one rfft of the rows sorted by kernel, one
    complex matmul per kernel and one irfft. Under ``torch.compile`` the ``"torch"`` path
    runs (the Rust mixed path is an eager autograd function). Gradients reach exactly
    the kernels with rows; double backward is exact. ``caches`` (one per kernel) keep
    the Rust operators and, for kernels that need no gradient, the spectra.
    """
    if not kernels:
        raise BcaError("kernels: at least one kernel is needed")
    n_in, n_out = _features(kernels[0], in_features, out_features)
    _check_x(x, n_in, batch=True)
    batch = x.shape[0]
    index = [int(a) for a in adapter_index]
    if len(index) != batch:
        raise ShapeError(f"adapter_index has {len(index)} entries for a batch of {batch} rows")
    if any(not -1 <= a < len(kernels) for a in index):
        raise BcaError(f"adapter_index entries must be in [-1, {len(kernels)}), got {index}")
    scale_list = [1.0] * len(kernels) if scales is None else [float(s) for s in scales]
    cache_list = [KernelCache() for _ in kernels] if caches is None else list(caches)
    if len(scale_list) != len(kernels) or len(cache_list) != len(kernels):
        raise BcaError("scales and caches need one entry per kernel")
    index_array = np.asarray(index, dtype=np.int64)
    return _mixed_rows(
        x, kernels, index, index_array, scale_list, cache_list, (n_in, n_out), backend
    )


def _mixed_rows(
    x: torch.Tensor,
    kernels: Sequence[torch.Tensor],
    index: list[int],
    index_array: Any,
    scales: list[float],
    caches: Sequence[KernelCache],
    features: tuple[int, int],
    backend: str,
    add: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`mixed_block_circulant` once its arguments are checked: ``x`` a floating
    ``(B, ..., in)`` tensor, ``index`` B entries in ``[-1, len(kernels))`` (also as the
    int64 array ``index_array``, read only), one scale and cache per kernel. The kernels'
    shapes and dtypes are checked here (they are parameters a caller may replace).

    ``add`` (``(B, ..., out)``, e.g. the base layer's output): returns ``add + result``
    in ``add``'s dtype, the same bits as adding afterwards; where nothing needs a
    gradient, the Rust core adds it in the same call (no separate torch add)."""
    first = kernels[0]
    n_in, n_out = _features(first, *features)
    shape, dtype, on_cpu = first.shape, first.dtype, first.is_cpu
    for k in kernels[1:]:
        if k.shape != shape or k.dtype != dtype:
            raise ShapeError(
                f"kernels must share one shape and dtype, got {tuple(shape)} "
                f"{dtype} and {tuple(k.shape)} {k.dtype}"
            )
        on_cpu = on_cpu and k.is_cpu
    batch = x.shape[0]
    n_rows = x.numel() // n_in
    if n_rows == 0 or max(index) < 0:
        zeros = x.new_zeros(*x.shape[:-1], n_out)
        return zeros if add is None else add + zeros.to(add.dtype)
    per_row = n_rows // batch
    x2 = x.reshape(n_rows, n_in)
    backend = "torch" if torch.compiler.is_compiling() else resolve_backend(x, kernels, backend)
    if backend == "rust":
        _check_rust_input(x2, first)  # the kernels share its dtype (checked above)
        if not on_cpu:
            for k in kernels[1:]:
                _check_rust_input(x2, k)  # raises for the first kernel off the CPU
        rows_index = index_array if per_row == 1 else np.repeat(index_array, per_row)
        y: torch.Tensor
        if torch.is_grad_enabled() and (x.requires_grad or any(k.requires_grad for k in kernels)):
            y = _RustMixedBlockCirculant.apply(
                x2, rows_index, scales, list(caches), features, *kernels
            )
        elif add is not None and add.dtype == x.dtype and add.is_cpu and not add.requires_grad:
            # nothing to differentiate: one core call, base output added in it
            y = _rust_mixed_forward(
                x2, rows_index, scales, caches, features, kernels, add.reshape(n_rows, n_out)
            )
            return y.reshape(add.shape)
        else:  # nothing to differentiate: the core call without autograd's bookkeeping
            y = _rust_mixed_forward(x2, rows_index, scales, caches, features, kernels)
    else:
        y = _torch_mixed_rows(x2, kernels, index, per_row, scales, list(caches), features)
    y = y.reshape(*x.shape[:-1], n_out)
    y = y if y.dtype == x.dtype else y.to(x.dtype)
    return y if add is None else add + y.to(add.dtype)


def _torch_mixed_rows(
    x2: torch.Tensor,
    kernels: Sequence[torch.Tensor],
    index: list[int],
    per_row: int,
    scales: list[float],
    caches: list[KernelCache],
    features: tuple[int, int],
) -> torch.Tensor:
    """The ``"torch"`` mixed path on rows ``x2`` ``(B·per_row, in)``: rows sorted by
    kernel, one rfft, a matmul per kernel on its rows, one irfft, rows put back."""
    batch = len(index)
    used = sorted({a for a in index if a >= 0})
    elems = {a: [b for b in range(batch) if index[b] == a] for a in used}
    cdtype = _compute_dtype(x2.dtype, kernels[0].dtype)
    order = [b for a in used for b in elems[a]]
    counts = [len(elems[a]) * per_row for a in used]
    rows: torch.Tensor | None = None
    xs = x2
    if order != list(range(batch)):
        elem_t = torch.tensor(order, dtype=torch.long)
        rows = (elem_t[:, None] * per_row + torch.arange(per_row)).reshape(-1)
        rows = rows.to(x2.device)
        xs = x2.index_select(0, rows)
    compiling = torch.compiler.is_compiling()
    spectra = [
        caches[a].cached_spectra(kernels[a], cdtype, scales[a])
        if not compiling and not (torch.is_grad_enabled() and kernels[a].requires_grad)
        else None
        for a in used
    ]
    xc = xs if xs.dtype == cdtype else xs.to(cdtype)
    kc = [kernels[a] if kernels[a].dtype == cdtype else kernels[a].to(cdtype) for a in used]
    sc = [scales[a] for a in used]
    if compiling:  # complex tensors stay inside the operator (see _torch_op)
        y = _torch_mixed_op(xc, kc, sc, counts, *features)
    else:
        y = _torch_mixed(xc, kc, spectra, sc, counts, features)
    if rows is None:
        return y
    if len(order) == batch:  # every row, permuted: undo the permutation
        inverse = torch.empty_like(rows)
        inverse[rows] = torch.arange(rows.numel(), device=rows.device)
        return y.index_select(0, inverse)
    return y.new_zeros(x2.shape[0], features[1]).index_copy(0, rows, y)
