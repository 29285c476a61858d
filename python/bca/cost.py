"""Parameter and FLOP accounting for BCA and the adapters it is compared with.

Everything here is plain arithmetic over layer shapes; only :func:`find_target_layers`,
:func:`cost_report` and :func:`count_model_parameters` look at a torch model, and they
import torch lazily (a model on the ``meta`` device is enough: no weights are read).

Methods (``Method.name``) and their hyper-parameters:

=============  ====================  ===============================================
name           hyper-parameter       trainable parameters of one d_in -> d_out layer
=============  ====================  ===============================================
``bca``        ``block_size`` = p    ceil(d_out/p) * ceil(d_in/p) * p  (zero padding)
``c3a``        ``block_size`` = b    d_out * d_in / b  (b must divide both)
``lora``       ``r``                 r * (d_in + d_out)  (PEFT's default, no bias)
``vera``       ``r``                 r + d_out  (lambda_d, lambda_b; A, B are frozen)
``fourierft``  ``n_frequency`` = n   n
``full``       --                    every parameter of the model
=============  ====================  ===============================================

The parameter counts equal what PEFT's ``get_nb_trainable_parameters`` reports for the
same model and targets (checked in ``tests/test_cost_*.py``).

FLOPs, two conventions (see ``docs/interop.md`` for the derivations):

``"paper"``
    The counting of the BCA paper (Ding et al., IJCAI 2025): one multiply-accumulate or
    one complex product counts as one operation, an FFT of length p costs 5 p log2 p,
    and the kernel spectra are recomputed on every forward, *per token*. For a
    d_in -> d_out layer with K = q_out * q_in kernels, q = ceil(d/p):
    ``bca``/``c3a``: 5 K p log2 p + K p + 5 (q_in + q_out) p log2 p + d_out
    (square n x n: 5 (n^2/p) log2 p + n^2/p + 10 n log2 p + n);
    ``fourierft``: 5 N log2 N + 4 N with N = d_in d_out; ``lora``: r (d_in + d_out);
    ``vera``: r (d_in + d_out) + r + d_out; ``full``: 0 (the update is merged).

``"real"``
    Floating point operations as the implementations actually run them: a real
    multiply-add is 2 flops, a complex multiply-add 8, a complex FFT of length p
    5 p log2 p, a real FFT half that; scaling and adding the adapter output to the base
    output is 2 d_out. Work that does not depend on the token (kernel spectra, FourierFT's
    dense ΔW) is reported separately as ``per_call`` flops: it is paid once per forward
    call and amortised over the tokens of the batch, or cached at inference.
    ``bca`` (rfft, cached spectra, F = p//2 + 1):
    per token 2.5 (q_in + q_out) p log2 p + 8 K F + 2 d_out; per call 2.5 K p log2 p.
    ``c3a`` (PEFT's full complex FFTs): per token 5 (q_in + q_out) p log2 p + 8 K p + 2 d_out;
    per call 5 K p log2 p. ``lora``: 2 r (d_in + d_out) + 2 d_out.
    ``vera``: 2 r (d_in + d_out) + r + 2 d_out. ``fourierft``: per token 2 N + d_out; per
    call 5 N log2 N + N (``ifft2`` and the scaling). ``full``: 0.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "METHODS",
    "CostReport",
    "FlopCount",
    "LayerShape",
    "Method",
    "MethodCost",
    "adapter_flops",
    "adapter_parameters",
    "cost_report",
    "count_model_parameters",
    "find_target_layers",
    "module_matches",
]

METHODS = ("bca", "c3a", "lora", "vera", "fourierft", "full")
Convention = Literal["paper", "real"]


@dataclass(frozen=True)
class LayerShape:
    """A targeted linear layer: ``y = W x`` with W of shape (out_features, in_features)."""

    name: str
    in_features: int
    out_features: int
    is_conv1d: bool = False

    def __post_init__(self) -> None:
        for arg in ("in_features", "out_features"):
            v = getattr(self, arg)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{arg} must be a positive int, got {v!r}")


@dataclass(frozen=True)
class Method:
    """An adaptation method with its hyper-parameters.

    ``Method("bca", block_size=768)``, ``Method("lora", r=8)``, ``Method("vera", r=1024)``,
    ``Method("fourierft", n_frequency=1000)``, ``Method("c3a", block_size=768)``,
    ``Method("full")``. ``label`` names the row in reports (defaults to e.g. ``"bca p=768"``).
    """

    name: str
    r: int | None = None
    block_size: int | None = None
    n_frequency: int | None = None
    label: str | None = None

    def __post_init__(self) -> None:
        if self.name not in METHODS:
            raise ValueError(f"name must be one of {METHODS}, got {self.name!r}")
        needs = {
            "bca": "block_size",
            "c3a": "block_size",
            "lora": "r",
            "vera": "r",
            "fourierft": "n_frequency",
        }.get(self.name)
        for arg in ("r", "block_size", "n_frequency"):
            v = getattr(self, arg)
            if arg == needs:
                if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                    raise ValueError(f"{self.name} needs a positive int {arg}, got {v!r}")
            elif v is not None:
                raise ValueError(f"{arg} does not apply to method {self.name!r}")

    @property
    def display(self) -> str:
        if self.label is not None:
            return self.label
        if self.name in ("bca", "c3a"):
            return f"{self.name} p={self.block_size}"
        if self.name in ("lora", "vera"):
            return f"{self.name} r={self.r}"
        if self.name == "fourierft":
            return f"fourierft n={self.n_frequency}"
        return "full"


@dataclass(frozen=True)
class FlopCount:
    """FLOPs of one adapted layer: ``per_token`` scales with the rows of the input,
    ``per_call`` is paid once per forward call (0 when cached)."""

    per_token: float
    per_call: float = 0.0

    def total(self, tokens: int) -> float:
        """FLOPs of one forward call over ``tokens`` rows."""
        return self.per_token * tokens + self.per_call

    def __add__(self, other: FlopCount) -> FlopCount:
        return FlopCount(self.per_token + other.per_token, self.per_call + other.per_call)


def _blocks(n: int, p: int) -> int:
    return -(-n // p)


def _log2(n: int) -> float:
    return math.log2(n) if n > 1 else 0.0


def _hyper(value: int | None, name: str, method: Method) -> int:
    """The hyper-parameter ``name`` of ``method``; :class:`Method` validation sets it."""
    if value is None:
        raise ValueError(f"method {method.name!r} needs {name}")
    return value


def adapter_parameters(method: Method, layer: LayerShape) -> int:
    """Trainable parameters the method adds to one layer (``full``: the layer's weight)."""
    d_in, d_out = layer.in_features, layer.out_features
    if method.name == "bca":
        p = _hyper(method.block_size, "block_size", method)
        return _blocks(d_out, p) * _blocks(d_in, p) * p
    if method.name == "c3a":
        b = _hyper(method.block_size, "block_size", method)
        _check_c3a(layer, b)
        return d_out * d_in // b
    if method.name == "lora":
        return _hyper(method.r, "r", method) * (d_in + d_out)
    if method.name == "vera":
        return _hyper(method.r, "r", method) + d_out
    if method.name == "fourierft":
        n = _hyper(method.n_frequency, "n_frequency", method)
        if n > d_in * d_out:
            raise ValueError(
                f"n_frequency={method.n_frequency} exceeds the {d_out}x{d_in} weight of "
                f"{layer.name!r}"
            )
        return n
    return d_in * d_out  # full: the targeted weight itself


def _check_c3a(layer: LayerShape, b: int) -> None:
    if layer.in_features % b or layer.out_features % b:
        raise ValueError(
            f"C3A needs block_size={b} to divide in_features={layer.in_features} and "
            f"out_features={layer.out_features} of {layer.name!r}"
        )


def adapter_flops(method: Method, layer: LayerShape, convention: Convention = "real") -> FlopCount:
    """Forward FLOPs of the adapter path of one layer (the frozen ``W x`` excluded).

    See the module docstring for the formulas of each convention.
    """
    if convention not in ("paper", "real"):
        raise ValueError(f"convention must be 'paper' or 'real', got {convention!r}")
    d_in, d_out = layer.in_features, layer.out_features
    name = method.name
    if name == "full":
        return FlopCount(0.0)
    if name in ("bca", "c3a"):
        p = _hyper(method.block_size, "block_size", method)
        if name == "c3a":
            _check_c3a(layer, p)
        q_in, q_out = _blocks(d_in, p), _blocks(d_out, p)
        k = q_in * q_out
        lg = _log2(p)
        if convention == "paper":
            return FlopCount(5 * k * p * lg + k * p + 5 * (q_in + q_out) * p * lg + d_out)
        if name == "bca":
            f = p // 2 + 1
            return FlopCount(
                2.5 * (q_in + q_out) * p * lg + 8 * k * f + 2 * d_out, 2.5 * k * p * lg
            )
        return FlopCount(5 * (q_in + q_out) * p * lg + 8 * k * p + 2 * d_out, 5 * k * p * lg)
    if name == "lora":
        r = _hyper(method.r, "r", method)
        if convention == "paper":
            return FlopCount(float(r * (d_in + d_out)))
        return FlopCount(float(2 * r * (d_in + d_out) + 2 * d_out))
    if name == "vera":
        r = _hyper(method.r, "r", method)
        if convention == "paper":
            return FlopCount(float(r * (d_in + d_out) + r + d_out))
        return FlopCount(float(2 * r * (d_in + d_out) + r + 2 * d_out))
    # fourierft
    n = d_in * d_out
    if convention == "paper":
        return FlopCount(5 * n * _log2(n) + 4 * n)
    return FlopCount(float(2 * n + d_out), 5 * n * _log2(n) + n)


# --------------------------------------------------------------------------- models


def module_matches(name: str, target_modules: str | Iterable[str]) -> bool:
    """PEFT's rule: a string is a regular expression that must match the whole module
    name; a list matches a module whose name equals an entry or ends with ``"." + entry``."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def _linear_shape(module: Any) -> tuple[int, int, bool] | None:
    import torch.nn as nn

    base = getattr(module, "base_layer", None)
    if isinstance(base, nn.Module):  # already wrapped (bca or PEFT): account the base layer
        return _linear_shape(base)
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, False
    if type(module).__name__ == "Conv1D" and hasattr(module, "weight") and module.weight.dim() == 2:
        d_in, d_out = module.weight.shape  # transformers' GPT-2 Conv1D stores W as (in, out)
        return int(d_in), int(d_out), True
    return None


def find_target_layers(
    model: torch.nn.Module, target_modules: str | Sequence[str]
) -> list[LayerShape]:
    """The linear layers of ``model`` (nn.Linear or transformers Conv1D) that the targets
    name, in module order. Raises ``ValueError`` when nothing matches or a matching module
    is not a linear layer."""
    if not isinstance(target_modules, str):
        target_modules = list(target_modules)
        if not target_modules or not all(isinstance(t, str) for t in target_modules):
            raise ValueError(
                f"target_modules must be a regex string or a non-empty list of names, "
                f"got {target_modules!r}"
            )
    layers: list[LayerShape] = []
    for name, module in model.named_modules():
        if not name or not module_matches(name, target_modules):
            continue
        if name.endswith(".base_layer"):
            continue
        shape = _linear_shape(module)
        if shape is None:
            raise ValueError(
                f"target_modules matched {name!r}, a {type(module).__name__}, which is not "
                "a linear layer (nn.Linear or transformers Conv1D)"
            )
        layers.append(LayerShape(name, *shape))
    if not layers:
        raise ValueError(f"target_modules={target_modules!r} matched no module of the model")
    return layers


def count_model_parameters(model: torch.nn.Module) -> int:
    """All parameters of the model (works on the meta device); shared tensors count once."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
    return total


@dataclass
class MethodCost:
    """Cost of one method over all targeted layers."""

    method: str
    label: str
    params: int
    paper_flops_per_token: float
    real_flops_per_token: float
    real_flops_per_call: float
    hyper: dict[str, int] = field(default_factory=dict)

    def real_flops(self, tokens: int) -> float:
        """Real FLOPs of one forward call over ``tokens`` rows (per-call work included)."""
        return self.real_flops_per_token * tokens + self.real_flops_per_call


@dataclass
class CostReport:
    """Costs of several methods on the same model and targets."""

    model: str
    target_modules: list[str] | str
    layers: list[LayerShape]
    model_parameters: int
    methods: list[MethodCost]

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "target_modules": self.target_modules,
            "num_layers": len(self.layers),
            "layer_shapes": sorted({(lay.in_features, lay.out_features) for lay in self.layers}),
            "model_parameters": self.model_parameters,
            "methods": [asdict(m) for m in self.methods],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_markdown(self) -> str:
        """A table: parameters and FLOPs per token in both conventions."""
        lines = [
            f"**{self.model}**, targets {self.target_modules}: {len(self.layers)} layers, "
            f"{self.model_parameters:,} model parameters",
            "",
            "| method | trainable params | paper FLOPs/token | real FLOPs/token "
            "| real FLOPs/call (cacheable) |",
            "|---|---:|---:|---:|---:|",
        ]
        for m in self.methods:
            lines.append(
                f"| {m.label} | {m.params:,} | {_fmt(m.paper_flops_per_token)} "
                f"| {_fmt(m.real_flops_per_token)} | {_fmt(m.real_flops_per_call)} |"
            )
        return "\n".join(lines)


def _fmt(x: float) -> str:
    if x == 0:
        return "0"
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.3g}"


def cost_report(
    model: torch.nn.Module | Sequence[LayerShape],
    target_modules: str | Sequence[str] | None,
    methods: Sequence[Method],
    *,
    model_name: str | None = None,
    model_parameters: int | None = None,
) -> CostReport:
    """Parameters and FLOPs of each method on ``model``'s targeted layers.

    ``model`` is a torch module (meta device fine) or a list of :class:`LayerShape`
    (then ``target_modules`` may be ``None`` and ``model_parameters`` is needed for the
    ``full`` row). For ``full`` the parameters are all the model's parameters and the
    extra FLOPs are 0.
    """
    if isinstance(model, Sequence):
        layers = list(model)
        if not layers or not all(isinstance(lay, LayerShape) for lay in layers):
            raise ValueError("model must be a torch module or a non-empty list of LayerShape")
        name = model_name or "layers"
        targets: list[str] | str = (
            target_modules
            if isinstance(target_modules, str)
            else list(target_modules or [lay.name for lay in layers])
        )
    else:
        if target_modules is None:
            raise ValueError("target_modules is required for a torch model")
        layers = find_target_layers(model, target_modules)
        name = model_name or type(model).__name__
        targets = target_modules if isinstance(target_modules, str) else list(target_modules)
        if model_parameters is None:
            model_parameters = count_model_parameters(model)
    if not methods:
        raise ValueError("methods must not be empty")
    rows = []
    for m in methods:
        if not isinstance(m, Method):
            raise TypeError(f"methods must hold Method objects, got {type(m).__name__}")
        if m.name == "full":
            if model_parameters is None:
                raise ValueError("model_parameters is required for method 'full' on LayerShapes")
            params = model_parameters
        else:
            params = sum(adapter_parameters(m, lay) for lay in layers)
        paper = sum((adapter_flops(m, lay, "paper") for lay in layers), FlopCount(0.0))
        real = sum((adapter_flops(m, lay, "real") for lay in layers), FlopCount(0.0))
        hyper = {
            k: v
            for k, v in (("r", m.r), ("block_size", m.block_size), ("n_frequency", m.n_frequency))
            if v is not None
        }
        rows.append(
            MethodCost(
                method=m.name,
                label=m.display,
                params=params,
                paper_flops_per_token=paper.per_token + paper.per_call,
                real_flops_per_token=real.per_token,
                real_flops_per_call=real.per_call,
                hyper=hyper,
            )
        )
    return CostReport(
        model=name,
        target_modules=targets,
        layers=layers,
        model_parameters=model_parameters or 0,
        methods=rows,
    )
