"""BCAConfig: what to adapt and how; the name-matching rules."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from .._errors import BcaError
from ..nn import BACKENDS, INITS


@dataclass
class BCAConfig:
    """What to adapt and how.

    Attributes:
        block_size: circulant block size ``p`` (default for every target).
        target_modules: module names or patterns to adapt (see the module docstring for
            the matching rules); every list entry must match at least one module.
        scale: factor on the update, ``y = W x + b + scale * ΔW x``.
        init: kernel initialisation, one of ``"zeros"`` (default), ``"xavier_uniform"``,
            ``"gaussian"``, ``"kaiming"``.
        pad: allow widths the block size does not divide (zero padding).
        backend: ``"auto"``, ``"rust"`` or ``"torch"``.
        modules_to_save: modules trained fully (e.g. a classifier head), saved with the
            adapter.
        block_size_pattern: per-module block sizes, ``{pattern: p}``, first match wins.
    """

    block_size: int = 256
    target_modules: list[str] | str = field(default_factory=list)
    scale: float = 1.0
    init: str = "zeros"
    pad: bool = True
    backend: str = "auto"
    modules_to_save: list[str] = field(default_factory=list)
    block_size_pattern: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int):
            raise TypeError(f"block_size must be an int, got {type(self.block_size).__name__}")
        if self.block_size < 1:
            raise BcaError(f"block_size must be positive, got {self.block_size}")
        if isinstance(self.target_modules, (tuple, set)):
            self.target_modules = (
                sorted(self.target_modules)
                if isinstance(self.target_modules, set)
                else list(self.target_modules)
            )
        if isinstance(self.target_modules, str):
            _compile("target_modules", self.target_modules)
        elif isinstance(self.target_modules, list):
            if not self.target_modules:
                raise BcaError("target_modules must name at least one module")
            for t in self.target_modules:
                if not isinstance(t, str) or not t:
                    raise TypeError(f"target_modules entries must be non-empty str, got {t!r}")
        else:
            raise TypeError(
                "target_modules must be a list of names or a regex string, got "
                f"{type(self.target_modules).__name__}"
            )
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)):
            raise TypeError(f"scale must be a float, got {type(self.scale).__name__}")
        if not math.isfinite(float(self.scale)):
            raise BcaError(f"scale must be finite, got {self.scale}")
        self.scale = float(self.scale)
        if self.init not in INITS:
            raise BcaError(f"init must be one of {INITS}, got {self.init!r}")
        if not isinstance(self.pad, bool):
            raise TypeError(f"pad must be a bool, got {type(self.pad).__name__}")
        if self.backend not in BACKENDS:
            raise BcaError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
        self.modules_to_save = list(self.modules_to_save or [])
        for m in self.modules_to_save:
            if not isinstance(m, str) or not m:
                raise TypeError(f"modules_to_save entries must be non-empty str, got {m!r}")
        if not isinstance(self.block_size_pattern, dict):
            raise TypeError("block_size_pattern must be a dict {pattern: block_size}")
        for k, v in self.block_size_pattern.items():
            if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise BcaError(
                    f"block_size_pattern entries must be str -> positive int, got {k!r}: {v!r}"
                )

    def block_size_for(self, module_name: str) -> int:
        """The block size used for ``module_name`` (pattern first, then the default)."""
        for pattern, p in self.block_size_pattern.items():
            if name_matches(module_name, [pattern]):
                return p
        return self.block_size

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _compile(arg: str, pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise BcaError(f"{arg}: invalid regular expression {pattern!r}: {exc}") from exc


def entry_matches(name: str, entry: str) -> bool:
    if name == entry or name.endswith("." + entry):
        return True
    try:
        return re.fullmatch(entry, name) is not None
    except re.error:
        return False


def name_matches(name: str, targets: list[str] | str) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(entry_matches(name, t) for t in targets)
