"""Type stub for the Rust extension ``bca._bca`` (see rust/src/python.rs)."""

from typing import final

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "BlockCirculantOperator",
    "set_num_threads",
    "get_num_threads",
    "release_memory",
    "_attach_openmp",
    "_detach_openmp",
    "_openmp_in_use",
    "mixed_forward",
    "mixed_backward",
    "__version__",
]
__version__: str

_Array = NDArray[np.float32] | NDArray[np.float64]

@final
class BlockCirculantOperator:
    def __new__(
        cls,
        kernel: _Array,
        in_features: int | None = None,
        out_features: int | None = None,
        *,
        num_threads: int | None = None,
    ) -> BlockCirculantOperator: ...
    def forward(self, x: _Array) -> _Array: ...
    def backward(
        self,
        x: _Array | None,
        grad_output: _Array,
        *,
        input_grad: bool = True,
        kernel_grad: bool = True,
    ) -> tuple[_Array | None, _Array | None]: ...
    def to_dense(self) -> _Array: ...
    def set_kernel(self, kernel: _Array) -> None: ...
    def sync_kernel(self, kernel: _Array) -> bool: ...
    def set_num_threads(self, num_threads: int | None) -> None: ...
    @property
    def num_threads(self) -> int | None: ...
    @property
    def retained_bytes(self) -> int: ...
    @property
    def kernel(self) -> _Array: ...
    @property
    def in_features(self) -> int: ...
    @property
    def out_features(self) -> int: ...
    @property
    def block_size(self) -> int: ...
    @property
    def q_in(self) -> int: ...
    @property
    def q_out(self) -> int: ...
    @property
    def dtype(self) -> str: ...

def set_num_threads(num_threads: int | None) -> None: ...
def get_num_threads() -> int: ...
def release_memory() -> int: ...

# The core's parallel loops on an already loaded OpenMP runtime (bca.nn attaches torch's).
def _attach_openmp(path: str) -> bool: ...
def _detach_openmp() -> None: ...
def _openmp_in_use() -> bool: ...

# Mixed-adapter batches: row r uses operators[adapter_index[r]] (-1: no adapter, a zero
# row); adapter_index has the shape of the rows' leading axes.
def mixed_forward(
    operators: list[BlockCirculantOperator] | tuple[BlockCirculantOperator, ...],
    adapter_index: NDArray[np.int64],
    x: _Array,
    *,
    scales: list[float] | tuple[float, ...] | None = None,
    add: _Array | None = None,
    kernels: list[_Array] | tuple[_Array, ...] | None = None,
) -> _Array: ...
def mixed_backward(
    operators: list[BlockCirculantOperator] | tuple[BlockCirculantOperator, ...],
    adapter_index: NDArray[np.int64],
    x: _Array | None,
    grad_output: _Array,
    *,
    input_grad: bool = True,
    kernel_grad: bool = True,
) -> tuple[_Array | None, list[_Array | None]]: ...
