"""bca's exception hierarchy (no imports: usable without numpy, torch or the extension).

Every error bca raises for bad input that is a ``ValueError`` is a :class:`BcaError`, so
``except bca.BcaError`` catches them all and ``except ValueError`` keeps working::

    ValueError
    └── BcaError            bad input to bca (a value, a name, a setting)
        ├── ShapeError      an array's shape, size, width or memory layout does not fit
        ├── NonFiniteError  an input array holds NaN or ±Inf
        └── BcaFormatError  a saved adapter file that does not follow the format
                            (defined in bca._adapter_format; has .path and .field)

Wrong types and dtypes stay ``TypeError``, failed allocations ``MemoryError``, missing
files ``FileNotFoundError``. The Rust core (``bca._bca``) raises these same classes: it
imports them from this module.
"""

from __future__ import annotations

__all__ = ["BcaError", "NonFiniteError", "ShapeError"]


class BcaError(ValueError):
    """Bad input to bca: the base of bca's ``ValueError`` subclasses."""


class ShapeError(BcaError):
    """An array's shape, size, width or memory layout does not fit (e.g. ``x``'s last
    dimension is not ``in_features``, a width does not fit the kernel's blocks, an array is
    not C-contiguous, a size overflows)."""


class NonFiniteError(BcaError):
    """An input array holds NaN or ±Inf."""
