"""The adapted layer :class:`BlockCirculantLinear`: a frozen base layer plus named
block circulant adapters (parameters, adapter bookkeeping, merge)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .._errors import BcaError, ShapeError
from .functional import (
    BACKENDS,
    KernelCache,
    _mixed_rows,
    _rust_mixed_fast,
    _rust_single_fast,
    block_circulant,
    block_circulant_dense,
    resolve_backend,
)

INITS: tuple[str, ...] = ("zeros", "xavier_uniform", "gaussian", "kaiming")


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
        w = base_weight(module)
        return int(w.shape[0]), int(w.shape[1]), True
    raise TypeError(
        f"bca adapts nn.Linear and transformers' Conv1D layers only, got {type(module).__name__}"
    )


def _param(module: nn.Module, name: str) -> torch.Tensor | None:
    """A layer's parameter by name, typed (``nn.Module.__getattr__`` is untyped)."""
    value = getattr(module, name, None)
    return value if isinstance(value, torch.Tensor) else None


def base_weight(module: nn.Module) -> torch.Tensor:
    """The weight tensor of a supported layer (TypeError if it has none)."""
    w = _param(module, "weight")
    if w is None:
        raise TypeError(f"{type(module).__name__} has no weight tensor")
    return w


# --------------------------------------------------------------------------------------
# the module
# --------------------------------------------------------------------------------------
DEFAULT_ADAPTER = "default"
#: In a mixed batch (``adapter_names=``), the name of "no adapter": the base layer alone.
BASE_ADAPTER = "__base__"


_RESERVED = nn.ParameterDict()


def check_adapter_name(name: object, arg: str = "adapter_name") -> str:
    """``name`` if it can name an adapter (non-empty, no ``.``, not reserved), else raise."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"{arg} must be a non-empty str, got {name!r}")
    if "." in name:
        raise BcaError(f"{arg} must not contain '.', got {name!r} (it is a parameter name)")
    if name == BASE_ADAPTER:
        raise BcaError(f"{arg} {name!r} is reserved: it means 'no adapter' in a mixed batch")
    if hasattr(_RESERVED, name):
        raise BcaError(
            f"{arg} {name!r} is reserved (an attribute of torch's ParameterDict); pick another"
        )
    return name


def _check_scale(scale: object, arg: str = "scale") -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"{arg} must be a float, got {type(scale).__name__}")
    if not math.isfinite(float(scale)):
        raise BcaError(f"{arg} must be finite, got {scale}")
    return float(scale)


#: Mixed-batch plans a layer keeps (one per list of adapter names, oldest dropped first).
_MIXED_PLANS = 8


class _MixedPlan:
    """A mixed batch's names resolved once: per block size, the adapters used (names and
    states, in order of first use) and each batch row's index among them (``-1``: not in
    this group), as a list and an int64 array. Valid while the layer holds the same
    adapter states."""

    __slots__ = ("groups", "states")

    def __init__(self, names: list[str], adapters: dict[str, _AdapterState]) -> None:
        used = list(dict.fromkeys(n for n in names if n != BASE_ADAPTER))
        self.states = tuple((n, adapters[n]) for n in used)
        by_size: dict[int, list[str]] = {}
        for n in used:
            by_size.setdefault(adapters[n].block_size, []).append(n)
        self.groups: list[tuple[tuple[str, ...], list[_AdapterState], list[int], np.ndarray]] = []
        for group in by_size.values():
            position = {n: a for a, n in enumerate(group)}
            index = [position.get(n, -1) for n in names]
            states = [adapters[n] for n in group]
            self.groups.append((tuple(group), states, index, np.asarray(index, dtype=np.int64)))

    def current(self, adapters: dict[str, _AdapterState]) -> bool:
        """Whether the layer still holds the adapter states this plan was made for."""
        for n, st in self.states:
            if adapters.get(n) is not st:
                return False
        return True


class _AdapterState(KernelCache):
    """One named adapter's settings and its backend cache (the kernel is a parameter).

    Copies (pickle, deepcopy) rebuild the settings only: a fresh cache and handle."""

    def __init__(self, block_size: int, scale: float, init: str) -> None:
        super().__init__()
        self.block_size = block_size
        self.scale = scale
        self.init = init

    def __reduce__(self) -> tuple[Any, ...]:
        return (_AdapterState, (self.block_size, self.scale, self.init))


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
            raise BcaError(f"backend must be one of {BACKENDS}, got {backend!r}")
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
        name = check_adapter_name(adapter_name)
        if name in self._adapters:
            raise BcaError(f"adapter {name!r} already exists; delete_adapter it first")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise BcaError(f"block_size must be a positive int, got {block_size!r}")
        scale = _check_scale(scale)
        if init not in INITS:
            raise BcaError(f"init must be one of {INITS}, got {init!r}")
        p = block_size
        if not self.pad and (self.in_features % p or self.out_features % p):
            raise ShapeError(
                f"block_size={p} does not divide the layer's shape (in_features="
                f"{self.in_features}, out_features={self.out_features}) and pad=False; use "
                "pad=True (zero padding) or a block size that divides both"
            )
        weight = base_weight(self.base_layer)
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
            raise BcaError(f"adapter {name!r} is merged; unmerge before delete_adapter")
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
            raise BcaError(f"adapter_names has duplicates: {names}")
        self.active_adapters = names
        self.adapter_weights = dict(zip(names, ws, strict=True))

    def _known(self, adapter_name: str) -> str:
        if adapter_name not in self._adapters:
            raise BcaError(f"unknown adapter {adapter_name!r}; this layer has {self.adapter_names}")
        return adapter_name

    @property
    def current_adapter(self) -> str:
        """The adapter ``bca_kernel``/``block_size``/``scale`` refer to."""
        if self.active_adapters:
            return self.active_adapters[0]
        if not self._adapters:
            raise BcaError("this layer has no adapters")
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
            raise BcaError(
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
            raise BcaError(f"init must be one of {INITS}, got {init!r}")

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
        return base_weight(self.base_layer)

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
            plan = self._mixed_plan(x, adapter_names)
            result = self.base_layer(x, *args, **kwargs)
            if not self._adapter_enabled:
                return result
            return self._mixed_add(x, plan, result)
        result = self.base_layer(x, *args, **kwargs)
        live = self._live_adapters()
        if len(live) == 1 and self.backend != "torch" and isinstance(x, torch.Tensor):
            # inference on the Rust core: one call that also adds the base output
            name, w = live[0]
            state = self._adapters[name]
            y = _rust_single_fast(
                x,
                self.bca_kernels[name],
                state,
                state.scale * w,
                (self.in_features, self.out_features),
                result,
            )
            if y is not None:
                return y
        for name, w in live:
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
        plan = self._mixed_plan(x, adapter_names)
        delta = self._mixed_delta(x, plan)
        if delta is None:
            return x.new_zeros(*x.shape[:-1], self.out_features)
        return delta

    def _mixed_plan(self, x: torch.Tensor, adapter_names: object) -> _MixedPlan:
        """Check a mixed batch's arguments; return its plan (cached per list of names)."""
        if self.merged_adapters:
            raise BcaError(
                f"adapters {sorted(self.merged_adapters)} are merged into the base weight; "
                "unmerge before running a mixed batch (adapter_names=...)"
            )
        seq: Sequence[object]
        if isinstance(adapter_names, (list, tuple)):  # no ABC check for the usual types
            seq = adapter_names
        elif isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence):
            raise TypeError(
                "adapter_names must be a list of adapter names, one per batch row, got "
                f"{type(adapter_names).__name__}"
            )
        else:
            seq = adapter_names
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 2 or x.shape[-1] != self.in_features:
            raise ShapeError(
                "a mixed batch needs x of shape (batch, ..., in_features="
                f"{self.in_features}), got shape {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating point tensor, got {x.dtype}")
        if len(seq) != x.shape[0]:
            raise ShapeError(
                f"adapter_names has {len(seq)} names for a batch of {x.shape[0]} "
                "rows (x.shape[0]); give one name per row"
            )
        # the plans are cached per module, except while torch.compile traces (the graph
        # keeps what it needs; torch 2.11's dynamo cannot trace __dict__.setdefault)
        plans: dict[Any, _MixedPlan] = (
            {} if torch.compiler.is_compiling() else self.__dict__.setdefault("_mixed_plans", {})
        )
        try:
            key = tuple(seq)
            plan = plans.get(key)
        except TypeError:  # an unhashable name: the checks below name it
            key, plan = None, None
        if plan is not None and plan.current(self._adapters):
            return plan
        names: list[str] = []
        for b, n in enumerate(seq):
            if not isinstance(n, str):
                raise TypeError(f"adapter_names[{b}] must be a str, got {type(n).__name__}")
            if n != BASE_ADAPTER and n not in self._adapters:
                raise BcaError(
                    f"adapter_names[{b}]: unknown adapter {n!r}; this layer has "
                    f"{self.adapter_names} ({BASE_ADAPTER!r}: no adapter)"
                )
            names.append(n)
        plan = _MixedPlan(names, self._adapters)
        if key is not None:
            if len(plans) >= _MIXED_PLANS:
                plans.pop(next(iter(plans)))
            plans[key] = plan
        return plan

    def _mixed_add(self, x: torch.Tensor, plan: _MixedPlan, result: torch.Tensor) -> torch.Tensor:
        """``result + scale_a · ΔW_a x[b]`` per batch row: with one block size, in one
        call (on the Rust backend without gradients, one core call adds ``result``)."""
        if len(plan.groups) != 1 or x.numel() == 0 or result.shape[:-1] != x.shape[:-1]:
            delta = self._mixed_delta(x, plan)
            return result if delta is None else result + delta.to(result.dtype)
        group, states, index, index_array = plan.groups[0]
        kernels = self._kernels(group)
        scales = [st.scale for st in states]
        features = (self.in_features, self.out_features)
        if self.backend != "torch":  # inference on the Rust core: one call, few checks
            y = _rust_mixed_fast(x, kernels, states, index_array, scales, features, result)
            if y is not None:
                return y
        return _mixed_rows(
            x, kernels, index, index_array, scales, states, features, self.backend, add=result
        )

    def _mixed_delta(self, x: torch.Tensor, plan: _MixedPlan) -> torch.Tensor | None:
        """``scale_a · ΔW_a x[b]`` per batch row (zeros for base rows); None if no row has
        an adapter. Adapters of different block sizes are run as one group per size."""
        if not plan.groups or x.numel() == 0:
            return None
        delta: torch.Tensor | None = None
        for group, states, index, index_array in plan.groups:
            y = _mixed_rows(
                x,
                self._kernels(group),
                index,
                index_array,
                [st.scale for st in states],
                states,
                (self.in_features, self.out_features),
                self.backend,
            )
            delta = y if delta is None else delta + y
        return delta

    def _kernels(self, names: Sequence[str]) -> list[torch.Tensor]:
        """``bca_kernels[n]`` for each name, read from the ParameterDict's own dict (its
        ``__getitem__`` costs about 0.5 µs a name, which a mixed batch of many adapters
        pays on every call)."""
        params = self.bca_kernels._parameters
        out = []
        for n in names:
            k = params.get(n)
            out.append(k if k is not None else self.bca_kernels[n])
        return out

    def resolve_backend(self, x: torch.Tensor, adapter_name: str | None = None) -> str:
        """The backend that :meth:`adapter_forward` uses for input ``x``."""
        k = self.bca_kernels[self.current_adapter if adapter_name is None else adapter_name]
        return resolve_backend(x, k, self.backend)

    def adapter_forward(self, x: torch.Tensor, adapter_name: str | None = None) -> torch.Tensor:
        """The update alone, ``(..., in_features) -> (..., out_features)``.

        ``adapter_name=None``: ``Σ_a w_a · scale_a · ΔW_a x`` over the active adapters
        (merged ones included, disabled state ignored); a name: ``scale · ΔW x`` of that
        adapter alone.
        """
        if adapter_name is not None:
            return self._adapter_forward(x, self._known(adapter_name), 1.0)
        if not self.active_adapters:
            raise BcaError("no active adapter; call set_adapter or pass adapter_name")
        out: torch.Tensor | None = None
        for name in self.active_adapters:
            y = self._adapter_forward(x, name, self.adapter_weights.get(name, 1.0))
            out = y if out is None else out + y
        assert out is not None
        return out

    def _adapter_forward(self, x: torch.Tensor, name: str, weight: float) -> torch.Tensor:
        state = self._adapters[name]
        return block_circulant(
            x,
            self.bca_kernels[name],
            self.in_features,
            self.out_features,
            scale=state.scale * weight,
            backend=self.backend,
            cache=state,
            training=self.training,
        )

    # -- backend state ------------------------------------------------------------------
    def clear_cache(self) -> None:
        """Drop the cached kernel spectra and kernel views (recomputed, and the Rust
        operators compared with their kernels anew, on next use)."""
        for state in self._adapters.values():
            state.clear()

    def _selection(
        self, adapter_names: str | Sequence[str] | None, weights: Sequence[float] | None
    ) -> tuple[list[str], list[float]]:
        """``(names, weights)``: the active adapters by default, else the given ones."""
        if adapter_names is None:
            if weights is not None:
                raise BcaError("weights needs adapter_names")
            names = list(self.active_adapters)
            return names, [self.adapter_weights.get(n, 1.0) for n in names]
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for n in names:
            self._known(n)
        if weights is None:
            return names, [1.0] * len(names)
        ws = [_check_scale(w, "weights") for w in weights]
        if len(ws) != len(names):
            raise BcaError(f"weights has {len(ws)} entries for {len(names)} adapters")
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
            raise BcaError("no adapter to build ΔW from (no active adapter)")
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
            raise BcaError(
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
            raise BcaError("adapters are disabled; enable them before merge()")
        todo = [(n, w) for n, w in zip(names, ws, strict=True) if n not in self.merged_adapters]
        if not todo:
            warnings.warn("adapter already merged (or none active); merge() ignored", stacklevel=2)
            return
        w = base_weight(self.base_layer)
        if not self.merged_adapters:
            self._original_weight = w.detach().to("cpu", copy=True) if exact_unmerge else None
        dw = self.delta_weight([n for n, _ in todo], [x for _, x in todo]).to(w.dtype)
        w.add_(dw.T if self.is_conv1d else dw)
        self.merged_adapters.update(todo)

    @torch.no_grad()
    def unmerged_weight(self) -> torch.Tensor:
        """The base weight without the merged adapters, stored as the base layer stores it
        (``(in, out)`` for Conv1D): the kept original when merged with ``exact_unmerge``,
        else the weight minus the merged update; the weight itself when nothing is merged."""
        w = base_weight(self.base_layer).detach()
        if not self.merged_adapters:
            return w
        if self._original_weight is not None:
            return self._original_weight.to(w.device)
        names = list(self.merged_adapters)
        dw = self.delta_weight(names, [self.merged_adapters[n] for n in names])
        return w - (dw.T if self.is_conv1d else dw).to(w.dtype)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge` for every merged adapter (bit-exact with ``exact_unmerge``)."""
        if not self.merged_adapters:
            warnings.warn("adapter is not merged; unmerge() ignored", stacklevel=2)
            return
        w = base_weight(self.base_layer)
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
