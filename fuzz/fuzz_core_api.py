#!/usr/bin/env python3
"""Fuzz the numpy-level API of bca (``bca.BlockCirculant``, ``bca._bca``, the one-shot
functions) with random, mostly small and often adversarial inputs.

Every call must either return a result equal to a float64 dense oracle (norm-relative
error ≤ 1e-5 for float32, 1e-12 for float64; to_dense exactly) or raise TypeError,
ValueError or MemoryError. Anything else is a failure:

- wrong: a result that differs from the oracle, has the wrong shape/dtype, shares
  memory with an input, or changed an input;
- accepted: a result for input the documented contract rejects (wrong dtype,
  non-contiguous, NaN/Inf, mismatched shapes, non-arrays, bad counts);
- rejected: TypeError/ValueError for input the contract accepts;
- exception: any other exception (OverflowError, RuntimeError, PanicException, ...);
- crash: the process died from a signal; hang: a call ran past the watchdog.

Layout: this process supervises. The bulk runs in ``--workers`` worker processes (each
with ``--threads`` fuzzing threads, so calls also run concurrently), which stream
progress, counts and failures back; a crash or hang of a worker is recorded with its
last scenarios, each is replayed alone to find the exact call, and the worker restarts
after them.
Every ``--subprocess-every`` calls one allocation case (sizes that cannot be allocated)
runs in a separate child process limited by RLIMIT_AS (``--rlimit-gib``), so that an
abort on allocation failure is seen as a signal exit instead of killing the harness.

    python fuzz/fuzz_core_api.py --iterations 10000000 --seed 1 --workers 2 --threads 2
    python fuzz/fuzz_core_api.py --replay 1:0:42      # one scenario, printing each call
    python fuzz/fuzz_core_api.py --openmp ...         # the core on torch's OpenMP team

Ends with ``calls: N, failures: F, crashes: C, hangs: H, wrong: W`` and exits 1 when
F > 0. Scenario seeds are ``SEED:THREAD:INDEX`` (numpy SeedSequence entropy).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import resource
import select
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

OK, EITHER, BAD = 0, 1, 2  # what the contract says about an input: accept, either, reject
ALLOWED_ERRORS = (TypeError, ValueError, MemoryError)
FAILURE_KINDS = ("wrong", "accepted", "rejected", "exception", "crash", "hang")
TOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}
HERE = os.path.abspath(__file__)


# -- oracles (float64, dense; the same definitions as tests/conftest.py, vectorised) -----


def dense_oracle(kernel: np.ndarray, d_in: int, d_out: int) -> np.ndarray:
    """ΔW: block (i, j) is scipy.linalg.circulant(kernel[i, j]), cut to (d_out, d_in)."""
    q_out, q_in, p = kernel.shape
    a = np.arange(p)
    idx = (a[:, None] - a[None, :]) % p  # circulant(c)[r, s] = c[(r - s) mod p]
    blocks = np.asarray(kernel, np.float64)[:, :, idx]  # (q_out, q_in, p, p)
    full = blocks.transpose(0, 2, 1, 3).reshape(q_out * p, q_in * p)
    return full[:d_out, :d_in]


def kernel_grad_oracle(x: np.ndarray, g: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Gradient of sum(g * (ΔW x)) wrt the kernel, from the dense gradient gᵀx."""
    q_out, q_in, p = shape
    x2 = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    g2 = np.asarray(g, np.float64).reshape(-1, g.shape[-1])
    dw = np.zeros((q_out * p, q_in * p))
    dw[: g2.shape[1], : x2.shape[1]] = g2.T @ x2
    b = dw.reshape(q_out, p, q_in, p).transpose(0, 2, 1, 3)  # (q_out, q_in, r, s)
    a = np.arange(p)
    # entries with (r - s) mod p == t hold kernel[i, j, t]: s = (r - t) mod p
    return b[:, :, a[:, None], (a[:, None] - a[None, :]) % p].sum(axis=2)


def round_off(dtype: np.dtype, p: int, *norms: float) -> float:
    """An absolute error any FFT product of these inputs may make: 8·log2(2p)·eps times
    the product of the input norms (the norm-relative check uses it as a floor, for
    results that cancel far below the size of their inputs)."""
    scale = float(np.prod([float(n) for n in norms])) if norms else 0.0
    return 8.0 * np.log2(2 * p) * float(np.finfo(dtype).eps) * scale / TOL[np.dtype(dtype)]


def norm(a: np.ndarray) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64)))


def rel_close(got: np.ndarray, want: np.ndarray, tol: float, floor: float) -> tuple[bool, float]:
    """Norm-relative closeness; ``floor`` keeps the denominator away from zero when the
    exact result cancels (FFT round-off scales with the inputs, not with the result)."""
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    # An exact result beyond the float64 range (a scale of 1e300 times a large row) is
    # ±inf in the oracle: the result must hold the same infinity there (inf - inf would
    # make a NaN "error"); the finite entries are compared as below.
    overflow = np.isinf(want)
    if overflow.any():
        if not np.array_equal(got[overflow], want[overflow]):
            return False, float("inf")
        got, want = got[~overflow], want[~overflow]
    diff = got - want
    # Results near the float64 range (scales like 1e300 are valid) would overflow the
    # sums of squares to inf (inf / inf: a NaN "error", and an inf result compared as
    # close): compare them scaled down by the oracle's largest value.
    scale = float(np.abs(want).max(initial=0.0))
    if np.isfinite(scale) and scale > 1e150:
        diff, want, floor = diff / scale, want / scale, floor / scale
    err = float(np.sqrt(np.vdot(diff, diff).real))
    den = max(float(np.sqrt(np.vdot(want, want).real)), floor, 1e-300)
    return err <= tol * den, err / den


# -- description of inputs (for reproducers) -----------------------------------------


def describe(v: Any) -> str:
    if isinstance(v, np.ndarray):
        f = v.flags
        tags = [
            "C" if f.c_contiguous else "nonC",
            *([] if f.writeable else ["ro"]),
            *([] if f.aligned else ["unaligned"]),
            *([] if type(v) is np.ndarray else [type(v).__name__]),
        ]
        if v.dtype.kind == "f" and v.size and not np.isfinite(v).all():
            tags.append("nonfinite")
        s = f"ndarray(shape={v.shape}, dtype={v.dtype.str}, strides={v.strides}, {' '.join(tags)})"
        if v.size <= 8 and v.dtype != object:
            s += f"={v.tolist()!r}"
        return s
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 2**32:
        return f"{v} (~2**{v.bit_length() - 1 if v > 0 else -(-v).bit_length()})"
    r = repr(v)
    return r if len(r) <= 80 else r[:77] + "..."


def normalise(msg: str) -> str:
    """An exception message reduced to a class: numbers become N, then a prefix."""
    msg = re.sub(r"\d+", "N", msg.splitlines()[0] if msg else "")
    return msg[:70]


# -- recording -----------------------------------------------------------------------


@dataclass
class Recorder:
    max_examples: int = 1
    lock: threading.Lock = field(default_factory=threading.Lock)
    calls: int = 0
    counts: collections.Counter = field(default_factory=collections.Counter)
    failures: list[dict] = field(default_factory=list)
    seen: collections.Counter = field(default_factory=collections.Counter)
    sink: Callable[[dict], None] | None = None

    def ok(self, key: str) -> None:
        with self.lock:
            self.calls += 1
            self.counts[key] += 1

    def fail(self, kind: str, api: str, detail: str, call: str, scenario: str) -> None:
        cls = f"{api} | {kind} | {normalise(detail)}"
        with self.lock:
            self.calls += 1
            self.counts[f"FAIL {cls}"] += 1
            self.seen[cls] += 1
            if self.seen[cls] > self.max_examples:
                return
            rec = {
                "kind": kind,
                "api": api,
                "detail": detail,
                "call": call,
                "scenario": scenario,
                "class": cls,
            }
            self.failures.append(rec)
        if self.sink is not None:
            self.sink({"t": "failure", **rec})


# -- inputs -------------------------------------------------------------------------

SMALL_BLOCK_SIZES = [1, 1, 2, 3, 4, 5, 6, 7, 8, 11, 13, 16, 17]
BLOCK_SIZES = [31, 32, 64, 23, 29]
RARE_BLOCK_SIZES = [97, 128, 127, 257, 256]
# (64,), (131,) and (2, 67): enough rows for backward's fused path (from 4 groups of 16
# or 32 rows on for the small kernels drawn here), with a partial last group and chunk.
LEADING = [(), (0,), (1,), (1,), (2,), (3,), (5,), (2, 3), (1, 1, 2), (0, 3), (3, 0), (2, 1, 1, 2)]
LEADING += [(64,), (131,), (2, 67)]
BAD_DTYPES = [
    "float16",
    "int32",
    "int64",
    "uint8",
    "bool",
    "complex64",
    "complex128",
    "longdouble",
    "object",
]


class Sub(np.ndarray):
    """A plain ndarray subclass (must behave like an ndarray)."""


class WithArray:
    """Not an ndarray, but convertible by numpy."""

    def __init__(self, a: np.ndarray) -> None:
        self.a = a

    def __array__(self, dtype=None, copy=None):
        return self.a

    def __repr__(self) -> str:
        return f"WithArray({describe(self.a)})"


@dataclass
class Arg:
    """A fuzzed argument: the object passed, the contract's verdict on it, and the
    float64 values the oracle should use when the call may succeed."""

    value: Any
    status: int
    values: np.ndarray | None = None
    check_values: bool = True  # False when extreme magnitudes make the oracle moot
    why: str = ""


def values(
    rng: np.random.Generator, shape: tuple[int, ...], dtype: np.dtype
) -> tuple[np.ndarray, bool]:
    """Finite values of many kinds; the flag says whether the oracle comparison holds."""
    kind = rng.integers(0, 16)
    size = int(np.prod(shape)) if shape else 1
    if kind < 8:
        return np.asarray(rng.standard_normal(shape, dtype=dtype)), True
    if kind == 8:
        return np.zeros(shape, dtype), True
    if kind == 9:  # one-hot
        a = np.zeros(shape, dtype)
        if size:
            a.flat[rng.integers(0, size)] = rng.choice([1.0, -2.5])
        return a, True
    if kind == 10:  # scaled
        return np.asarray(rng.standard_normal(shape) * 10.0 ** rng.integers(-6, 7)).astype(
            dtype
        ), True
    if kind == 11:  # small integers, exactly representable
        return np.asarray(rng.integers(-4, 5, shape)).astype(dtype), True
    if kind == 12:  # alternating signs / constant: cancellation
        a = np.ones(shape, dtype)
        if size:
            a.flat[::2] = -1
        return a, True
    if kind == 13:  # mixed magnitudes
        a = np.asarray(rng.standard_normal(shape)).astype(dtype)
        if size:
            a.flat[rng.integers(0, size)] = 1e4
        return a, True
    if kind == 14:  # huge finite: may overflow to inf; only shapes are checked
        return np.full(shape, np.finfo(dtype).max / rng.choice([1, 2, 1e3]), dtype), False
    # subnormal / tiny: round-off is not norm-relative there; only shapes are checked
    return np.asarray(rng.standard_normal(shape) * np.finfo(dtype).tiny).astype(dtype), False


def layout(rng: np.random.Generator, a: np.ndarray, p_bad: float) -> tuple[Any, int, str]:
    """Pass ``a`` as is, or as a view/copy with another layout, dtype or type."""
    if rng.random() >= p_bad:
        return a, OK, ""
    kind = int(rng.integers(0, 14))
    if kind == 0:
        b = a.copy()
        b.setflags(write=False)
        return b, OK, "read-only"
    if kind == 1 and a.ndim:  # strided view along the last axis
        big = np.repeat(a, 2, axis=-1)
        b = big[..., ::2]
        b[...] = a
        return b, OK if b.flags.c_contiguous else BAD, "strided"
    if kind == 2 and a.ndim:  # negative stride along some axis
        ax = int(rng.integers(0, a.ndim))
        b = np.flip(a.copy(), axis=ax)
        v = np.flip(b, axis=ax)  # the same values as a, negative stride
        return v, OK if v.flags.c_contiguous else BAD, f"negative stride on axis {ax}"
    if kind == 3 and a.ndim >= 2:
        b = np.asfortranarray(a)
        return b, OK if b.flags.c_contiguous else BAD, "fortran order"
    if kind == 4:  # unaligned (numpy says so): contiguous but misaligned
        buf = np.zeros(a.nbytes + 1, np.uint8)
        b = np.frombuffer(buf.data, dtype=a.dtype, count=a.size, offset=1).reshape(a.shape)
        b[...] = a
        return b, EITHER if not b.flags.aligned else OK, "unaligned"
    if kind == 5:  # non-native byte order
        b = a.astype(a.dtype.newbyteorder(">" if a.dtype.isnative else "<"))
        return b, EITHER, "byte-swapped dtype"
    if kind == 6:
        return a.view(Sub), OK, "ndarray subclass"
    if kind == 7:
        return np.ma.masked_array(a), EITHER, "masked array"
    if kind == 8:
        dt = BAD_DTYPES[int(rng.integers(0, len(BAD_DTYPES)))]
        return a.astype(dt), BAD, f"dtype {dt}"
    if kind == 9:  # the other float dtype
        other = np.float64 if a.dtype == np.float32 else np.float32
        return a.astype(other), BAD, "mismatched float dtype"
    if kind == 10:  # non-array objects
        choice = int(rng.integers(0, 6))
        obj = [a.tolist(), tuple(a.ravel().tolist()), 1.0, None, "x", WithArray(a)][choice]
        return obj, BAD, "not an ndarray"
    if kind == 11 and a.size:  # NaN or Inf somewhere
        b = a.copy()
        b.flat[rng.integers(0, b.size)] = rng.choice([np.nan, np.inf, -np.inf])
        return b, BAD, "NaN/Inf"
    if kind == 12 and a.ndim:  # zero-stride broadcast view
        b = np.broadcast_to(a[..., :1], a.shape) if a.shape[-1] else a
        return b, OK if b.flags.c_contiguous else BAD, "broadcast view"
    if kind == 13 and a.ndim:
        b = np.lib.stride_tricks.as_strided(a, a.shape, a.strides, writeable=False)
        return b, OK, "as_strided read-only view"
    return a, OK, ""


def make_arg(
    rng: np.random.Generator, shape: tuple[int, ...], dtype: np.dtype, p_bad: float
) -> Arg:
    vals, check = values(rng, shape, dtype)
    obj, status, why = layout(rng, vals, p_bad)
    if isinstance(obj, np.ndarray) and obj.dtype.kind == "f" and status != BAD:
        check = check and bool(np.isfinite(obj).all())
    return Arg(obj, status, vals.astype(np.float64), check, why)


def count_arg(rng: np.random.Generator, good: int | None, lo: int, hi: int) -> Arg:
    """A count (in_features, out_features, num_threads): ``good`` (None means the
    default), or something adversarial. ``lo..hi`` is the valid range."""
    r = rng.random()
    if r < 0.8:
        return Arg(good, OK)
    bad: list[Any] = [
        0,
        -1,
        -(2**63),
        2**63,
        2**64,
        2**64 + 1,
        2**100,
        -(2**100),
        1.0,
        1.5,
        "3",
        True,
        False,
        np.float64(2.0),
        [1],
        np.int64(-5),
    ]
    if good is not None:
        bad += [np.int64(good), np.uint64(good), np.int32(good)]
    v = bad[int(rng.integers(0, len(bad)))]
    if isinstance(v, (np.integer,)) and lo <= int(v) <= hi:
        return Arg(v, OK, why="numpy integer")
    if isinstance(v, (np.integer, int)) and not isinstance(v, bool) and lo <= int(v) <= hi:
        return Arg(v, OK)
    return Arg(v, BAD, why="bad count")


# -- the model of one operator ---------------------------------------------------------


@dataclass
class Layer:
    kernel: np.ndarray  # the current kernel (its dtype is the operator's)
    d_in: int
    d_out: int
    _cache: tuple[Any, ...] = ()

    @property
    def dtype(self) -> np.dtype:
        return self.kernel.dtype

    @property
    def p(self) -> int:
        return int(self.kernel.shape[2])

    @property
    def checkable(self) -> bool:
        """False when the kernel's magnitudes (near overflow, subnormal) make a
        norm-relative comparison meaningless; shapes and dtypes are still checked."""
        a = np.abs(self.kernel[np.isfinite(self.kernel)].astype(np.float64))
        nz = a[a > 0]
        return bool(
            a.max(initial=0) < 1e30 and nz.min(initial=1.0) > 1e6 * np.finfo(self.dtype).tiny
        )

    def dense(self) -> np.ndarray:
        key = (id(self.kernel), self.d_in, self.d_out)
        if not self._cache or self._cache[0] != key or self._cache[1] is not self.kernel:
            self._cache = (key, self.kernel, dense_oracle(self.kernel, self.d_in, self.d_out))
        return self._cache[2]


def random_layer(rng: np.random.Generator) -> Layer:
    r = rng.random()
    if r < 0.02:
        p = int(rng.choice(RARE_BLOCK_SIZES))
        q_in, q_out = 1, int(rng.integers(1, 3))
    else:
        if r < 0.8:
            p = int(rng.choice(SMALL_BLOCK_SIZES))
        else:
            p = int(rng.choice(BLOCK_SIZES)) if r < 0.9 else int(rng.integers(1, 49))
        q_in, q_out = int(rng.choice([1, 1, 2, 2, 3, 4])), int(rng.choice([1, 1, 2, 2, 3, 4]))
    dtype = np.dtype(np.float32 if rng.random() < 0.5 else np.float64)
    kernel, _ = values(rng, (q_out, q_in, p), dtype)
    if not np.isfinite(kernel).all() or np.abs(kernel).max(initial=0) > 1e30:
        kernel = rng.standard_normal((q_out, q_in, p), dtype=dtype)
    pad_in = int(rng.integers(0, p)) if rng.random() < 0.4 else 0
    pad_out = int(rng.integers(0, p)) if rng.random() < 0.4 else 0
    return Layer(kernel, q_in * p - pad_in, q_out * p - pad_out)


def fits(d: Any, q: int, p: int) -> bool:
    return (
        isinstance(d, int | np.integer)
        and not isinstance(d, bool)
        and (q - 1) * p < int(d) <= q * p
    )


def worst(*statuses: int) -> int:
    return max(statuses, default=OK)


# -- calls ----------------------------------------------------------------------------


@dataclass
class Call:
    api: str
    fn: Callable[[], Any]
    status: int  # OK: must succeed; BAD: must raise; EITHER: may do either
    check: Callable[[Any], str | None] | None  # returns a problem, or None
    args: dict[str, Any]
    inputs: tuple[np.ndarray, ...] = ()  # arrays that must not be modified or aliased
    on_success: Callable[[Any], None] | None = None

    def describe(self) -> str:
        parts = ", ".join(f"{k}={describe(v)}" for k, v in self.args.items())
        return f"{self.api}({parts})"


def check_array(
    got: Any,
    shape: tuple[int, ...],
    dtype: np.dtype,
    want: np.ndarray | None,
    floor: float,
    check_values: bool,
    exact: bool = False,
) -> str | None:
    if not isinstance(got, np.ndarray):
        return f"returned {type(got).__name__}, not an ndarray"
    if got.shape != shape:
        return f"shape {got.shape}, want {shape}"
    if got.dtype != dtype:
        return f"dtype {got.dtype}, want {dtype}"
    if want is None or not check_values or got.size == 0:
        return None
    if exact:
        if not np.array_equal(got, want.astype(dtype)):
            return "values differ from the oracle (exact comparison)"
        return None
    ok, err = rel_close(got, want, TOL[dtype], floor)
    if not ok:
        return f"relative error {err:.3g} > {TOL[dtype]:g}"
    return None


def forward_call(
    api: str, fn: Callable[[Any], Any], layer: Layer, x: Arg, extra_status: int = OK
) -> Call:
    xs = x.value
    status = worst(x.status, extra_status)
    shape_ok = isinstance(xs, np.ndarray) and xs.ndim >= 1 and xs.shape[-1] == layer.d_in
    if not shape_ok and isinstance(xs, np.ndarray):
        status = BAD

    def check(got: Any) -> str | None:
        assert isinstance(xs, np.ndarray) and x.values is not None
        want = x.values.reshape(-1, layer.d_in) @ layer.dense().T
        floor = round_off(layer.dtype, layer.p, norm(layer.kernel), norm(x.values))
        return check_array(
            got,
            (*xs.shape[:-1], layer.d_out),
            layer.dtype,
            want.reshape(*xs.shape[:-1], layer.d_out),
            floor,
            x.check_values and layer.checkable,
        )

    inputs = (xs,) if isinstance(xs, np.ndarray) else ()
    return Call(api, lambda: fn(xs), status, check, {"x": xs}, inputs)


def backward_call(
    api: str,
    fn: Callable[..., Any],
    layer: Layer,
    x: Arg | None,
    g: Arg,
    input_grad: bool,
    kernel_grad: bool,
    one_shot: bool = False,
) -> Call:
    xs = None if x is None else x.value
    gs = g.value
    status = g.status
    if not input_grad and not kernel_grad and g.why == "NaN/Inf":
        status = EITHER  # nothing is computed, so the values need not be read
    g_ok = isinstance(gs, np.ndarray) and gs.ndim >= 1 and gs.shape[-1] == layer.d_out
    if isinstance(gs, np.ndarray) and not g_ok:
        status = BAD
    if kernel_grad:
        if x is None:
            status = BAD
        else:
            status = worst(status, x.status)
            if isinstance(xs, np.ndarray):
                if xs.ndim < 1 or xs.shape[-1] != layer.d_in:
                    status = BAD
                elif g_ok and xs.shape[:-1] != gs.shape[:-1]:
                    status = BAD
    elif x is not None and (
        x.status != OK
        or not isinstance(xs, np.ndarray)
        or xs.ndim < 1
        or xs.shape[-1] != layer.d_in
    ):
        # x is not needed without the kernel gradient: checking it anyway is fine
        status = worst(status, EITHER)

    def check(got: Any) -> str | None:
        if not (isinstance(got, tuple) and len(got) == 2):
            return f"returned {type(got).__name__}, not a pair"
        gx, gk = got
        assert isinstance(gs, np.ndarray) and g.values is not None
        lead = gs.shape[:-1]
        g2 = g.values.reshape(-1, layer.d_out)
        if input_grad:
            want = (g2 @ layer.dense()).reshape(*lead, layer.d_in)
            floor = round_off(layer.dtype, layer.p, norm(layer.kernel), norm(g2))
            problem = check_array(
                gx,
                (*lead, layer.d_in),
                layer.dtype,
                want,
                floor,
                g.check_values and layer.checkable,
            )
            if problem:
                return f"grad_x: {problem}"
        elif gx is not None:
            return "grad_x returned though input_grad=False"
        if kernel_grad:
            assert x is not None and x.values is not None and isinstance(xs, np.ndarray)
            want = kernel_grad_oracle(x.values.reshape(-1, layer.d_in), g2, layer.kernel.shape)
            floor = round_off(layer.dtype, layer.p, norm(x.values), norm(g2))
            problem = check_array(
                gk,
                layer.kernel.shape,
                layer.dtype,
                want,
                floor,
                g.check_values and x.check_values and layer.checkable,
            )
            if problem:
                return f"grad_kernel: {problem}"
        elif gk is not None:
            return "grad_kernel returned though kernel_grad=False"
        return None

    inputs = tuple(a for a in (xs, gs) if isinstance(a, np.ndarray))
    args = {"x": xs, "grad_output": gs, "input_grad": input_grad, "kernel_grad": kernel_grad}
    return Call(
        api,
        lambda: fn(xs, gs, input_grad=input_grad, kernel_grad=kernel_grad),
        status,
        check,
        args,
        inputs,
    )


def x_shape(rng: np.random.Generator, d: int) -> tuple[int, ...]:
    r = rng.random()
    if r < 0.005:
        lead: tuple[int, ...] = (int(rng.integers(200, 700)),)  # the parallel path
    else:
        lead = LEADING[int(rng.integers(0, len(LEADING)))]
    if rng.random() < 0.08:  # a wrong last dimension
        d = int(rng.choice([0, max(d - 1, 0), d + 1, 2 * d]))
    if rng.random() < 0.01:
        return ()
    return (*lead, d)


def scenario_calls(rng: np.random.Generator, bca: Any, core: Any) -> Iterator[Call]:
    """The calls of one scenario: build an operator (or fail to), then use it."""
    layer = random_layer(rng)
    q_out, q_in, p = layer.kernel.shape
    p_bad = 0.25 if rng.random() < 0.5 else 0.05
    k_layout, k_status, why = layout(rng, layer.kernel, p_bad / 2)
    kernel_ok = k_status
    if why == "mismatched float dtype":  # the kernel sets the dtype: the other float is fine
        kernel_ok = OK
        layer.kernel = k_layout
    if isinstance(k_layout, np.ndarray) and (k_layout.ndim != 3 or 0 in k_layout.shape):
        kernel_ok = BAD
    in_arg = count_arg(rng, layer.d_in if rng.random() < 0.7 else None, 1, 2**63 - 1)
    out_arg = count_arg(rng, layer.d_out if rng.random() < 0.7 else None, 1, 2**63 - 1)
    threads = count_arg(rng, int(rng.choice([1, 1, 2, 3])) if rng.random() < 0.5 else None, 1, 4096)

    def count_status(a: Arg, q: int) -> int:
        if a.status == BAD:
            return BAD
        return OK if a.value is None or fits(a.value, q, p) else BAD

    st_in, st_out = count_status(in_arg, q_in), count_status(out_arg, q_out)
    if in_arg.value is None:
        layer.d_in = q_in * p
    if out_arg.value is None:
        layer.d_out = q_out * p
    status = worst(kernel_ok, st_in, st_out, threads.status)
    use_core = rng.random() < 0.3
    ctor = core.BlockCirculantOperator if use_core else bca.BlockCirculant
    api = "_bca.BlockCirculantOperator" if use_core else "BlockCirculant"
    holder: dict[str, Any] = {}
    build = Call(
        api,
        lambda: ctor(k_layout, in_arg.value, out_arg.value, num_threads=threads.value),
        status,
        lambda op: None if op is not None else "returned None",
        {
            "kernel": k_layout,
            "in_features": in_arg.value,
            "out_features": out_arg.value,
            "num_threads": threads.value,
        },
        (k_layout,) if isinstance(k_layout, np.ndarray) else (),
        on_success=lambda op: holder.__setitem__("op", op),
    )
    yield build
    op = holder.get("op")
    if op is None:  # build failed (as it should, or recorded as a failure): one-shot calls
        yield from one_shot_calls(rng, bca, layer, p_bad)
        return
    if status == BAD:  # an accepted bad build: its geometry is unknown, stop here
        return
    if not np.isfinite(layer.kernel).all():
        return
    # the values the operator holds (as numpy reads them) in the operator's dtype
    layer.kernel = np.array(k_layout, dtype=k_layout.dtype.newbyteorder("="))
    fwd = op.forward if use_core else op.matmul
    bwd = op.backward
    for _ in range(int(rng.integers(4, 24))):
        r = rng.random()
        if r < 0.40:
            x = make_arg(rng, x_shape(rng, layer.d_in), layer.dtype, p_bad)
            yield forward_call(f"{api}.forward", fwd, layer, x)
        elif r < 0.75:
            shape = x_shape(rng, layer.d_in)
            lead = shape[:-1] if shape else ()
            x = make_arg(rng, shape, layer.dtype, p_bad)
            g_shape = (*lead, layer.d_out) if rng.random() < 0.93 else x_shape(rng, layer.d_out)
            g = make_arg(rng, g_shape, layer.dtype, p_bad)
            ig, kg = bool(rng.integers(0, 2)), bool(rng.integers(0, 2))
            xa = None if (not kg and rng.random() < 0.5) or rng.random() < 0.03 else x
            yield backward_call(f"{api}.backward", bwd, layer, xa, g, ig, kg)
        elif r < 0.82:
            lay = Layer(layer.kernel, layer.d_in, layer.d_out)

            def check_dense(got: Any, lay: Layer = lay) -> str | None:
                return check_array(
                    got, (lay.d_out, lay.d_in), lay.dtype, lay.dense(), 0.0, True, exact=True
                )

            yield Call(f"{api}.to_dense", op.to_dense, OK, check_dense, {})
        elif r < 0.90:
            shape = layer.kernel.shape
            if rng.random() < 0.1:
                shape = (q_out, q_in, p + 1)
            k = make_arg(rng, shape, layer.dtype, p_bad)
            st = k.status if shape == layer.kernel.shape else BAD

            def adopt(_: Any, k: Arg = k) -> None:
                assert k.values is not None
                layer.kernel = k.values.astype(layer.dtype)

            def check_kernel(_: Any, k: Arg = k) -> str | None:
                got = op.kernel
                want = np.asarray(k.values).astype(layer.dtype)
                return None if np.array_equal(got, want) else "op.kernel differs after set_kernel"

            yield Call(
                f"{api}.set_kernel",
                lambda k=k: op.set_kernel(k.value),
                st,
                check_kernel,
                {"kernel": k.value},
                (k.value,) if isinstance(k.value, np.ndarray) else (),
                on_success=adopt,
            )

            def check_unchanged(got: Any) -> str | None:
                return None if np.array_equal(got, layer.kernel) else "kernel changed"

            yield Call(f"{api}.kernel", lambda: op.kernel, OK, check_unchanged, {})
        elif r < 0.93:
            raw = op if use_core else op._op
            yield from mixed_calls(rng, core, raw, layer, p_bad)
        elif r < 0.95:
            n = count_arg(rng, int(rng.choice([1, 2, 3])) if rng.random() < 0.7 else None, 1, 4096)
            if use_core:
                yield Call(
                    f"{api}.set_num_threads",
                    lambda n=n: op.set_num_threads(n.value),
                    n.status,
                    None,
                    {"num_threads": n.value},
                )
            else:
                yield Call(
                    f"{api}.num_threads=",
                    lambda n=n: setattr(op, "num_threads", n.value),
                    n.status,
                    None,
                    {"num_threads": n.value},
                )
        else:
            yield from one_shot_calls(rng, bca, layer, p_bad)


def bad_rows_read(a: Any, index: np.ndarray) -> bool:
    """Whether ``a`` holds NaN/Inf in a row that a mixed call reads (index >= 0)."""
    rows = np.asarray(a, np.float64).reshape(-1, a.shape[-1]) if a.ndim else None
    if rows is None or rows.shape[0] != index.size:
        return True
    return not np.isfinite(rows[index.reshape(-1) >= 0]).all()


def mixed_calls(
    rng: np.random.Generator, core: Any, raw: Any, layer: Layer, p_bad: float
) -> Iterator[Call]:
    """``sync_kernel``, then one mixed-batch call (``_bca.mixed_forward``) over this
    operator and up to three more of its geometry, with fuzzed index, x, ``scales=``,
    ``add=`` and ``kernels=``; the oracle is ``add + scale_a · ΔW_a x`` per row."""
    dt = layer.dtype
    # sync_kernel: the same bits (False), another kernel (True), or a bad one
    k = make_arg(rng, layer.kernel.shape, dt, p_bad)
    same = rng.random() < 0.4 and k.status == OK
    kv = layer.kernel.copy() if same else k.value
    st = OK if same else (k.status if isinstance(kv, np.ndarray) else BAD)
    if not same and k.why == "NaN/Inf":
        st = BAD

    def check_sync(got: Any, kv: Any = kv, same: bool = same) -> str | None:
        want = np.asarray(kv).astype(dt)
        if not isinstance(got, bool):
            return f"sync_kernel returned {type(got).__name__}, not a bool"
        if got != (not np.array_equal(want.view(np.uint8), layer.kernel.view(np.uint8))):
            return f"sync_kernel returned {got} for {'the same' if same else 'another'} kernel"
        return None if np.array_equal(raw.kernel, want) else "op.kernel differs after sync"

    def adopt(_: Any, kv: Any = kv) -> None:
        layer.kernel = np.asarray(kv).astype(dt)

    yield Call(
        "_bca.BlockCirculantOperator.sync_kernel",
        lambda: raw.sync_kernel(kv),
        st,
        check_sync,
        {"kernel": kv},
        (kv,) if isinstance(kv, np.ndarray) else (),
        on_success=adopt,
    )
    # the mixed call
    others = [
        Layer(rng.standard_normal(layer.kernel.shape).astype(dt), layer.d_in, layer.d_out)
        for _ in range(int(rng.integers(0, 4)))
    ]
    layers = [layer, *others]
    ops = [raw, *(core.BlockCirculantOperator(o.kernel, o.d_in, o.d_out) for o in others)]
    n_ops = len(ops)
    shape = x_shape(rng, layer.d_in)
    x = make_arg(rng, shape, dt, p_bad)
    xs = x.value
    lead = shape[:-1] if shape else ()
    status = x.status
    index = rng.integers(-1, n_ops, size=lead).astype(np.int64)
    idx_arg: Any = index
    if rng.random() < 0.05:
        bad_index = index.copy()
        if bad_index.size:
            bad_index.flat[int(rng.integers(0, bad_index.size))] = rng.choice([-2, n_ops, 2**62])
            idx_arg, status = bad_index, BAD
    elif rng.random() < 0.03:
        idx_arg, status = index.astype(np.float64), BAD
    elif rng.random() < 0.03:
        idx_arg, status = np.append(index.reshape(-1), 0), BAD
    if x.why == "NaN/Inf" and isinstance(xs, np.ndarray) and idx_arg is index:
        status = BAD if bad_rows_read(xs, index) else OK
    if not (isinstance(xs, np.ndarray) and xs.ndim >= 1 and xs.shape[-1] == layer.d_in):
        status = BAD
    # scales
    scales: Any = None
    if rng.random() < 0.5:
        scales = [float(rng.choice([1.0, 0.5, -2.0, 0.0, 1e-3, 3.75])) for _ in range(n_ops)]
        r = rng.random()
        if r < 0.05:
            scales, status = scales[:-1], BAD
        elif r < 0.1:
            scales[int(rng.integers(0, n_ops))] = float(rng.choice([np.nan, np.inf, -np.inf]))
            status = BAD
        elif r < 0.13:
            scales[0] = 1e300
            status = worst(status, BAD if dt == np.float32 else OK)
        elif r < 0.15:
            scales, status = ["a"] * n_ops, BAD
        elif r < 0.2:
            scales = tuple(scales)
    # add
    add: Arg | None = None
    if rng.random() < 0.5:
        add_shape = (*lead, layer.d_out) if rng.random() < 0.93 else x_shape(rng, layer.d_out)
        add = make_arg(rng, add_shape, dt, p_bad)
        a_st = OK if add.why == "NaN/Inf" else add.status  # add's values are not checked
        if add.why == "NaN/Inf":
            add.check_values = False
        if isinstance(add.value, np.ndarray) and add.value.shape != (*lead, layer.d_out):
            a_st = BAD
        if add.value is None:  # add=None: nothing to add (the default)
            add = Arg(None, OK)
        else:
            status = worst(status, a_st)
    # kernels
    kernels: list[Any] | None = None
    new_kernels: list[np.ndarray] = [lay.kernel for lay in layers]
    if rng.random() < 0.4:
        kernels = []
        for a, lay in enumerate(layers):
            if rng.random() < 0.5:
                kernels.append(lay.kernel.copy())
                continue
            ka = make_arg(rng, lay.kernel.shape, dt, p_bad)
            kernels.append(ka.value)
            status = worst(status, BAD if ka.why == "NaN/Inf" else ka.status)
            if isinstance(ka.value, np.ndarray) and ka.status != BAD:
                new_kernels[a] = np.asarray(ka.value).astype(dt)
        if rng.random() < 0.03:
            kernels, status = kernels[:-1], BAD
    # the operators as the call sees them; they keep these kernels only if it succeeds
    seen = [Layer(kn, layer.d_in, layer.d_out) for kn in new_kernels]

    def install(_: Any) -> None:
        for lay, kn in zip(layers, new_kernels, strict=True):
            lay.kernel = kn

    def check(got: Any) -> str | None:
        assert isinstance(xs, np.ndarray) and x.values is not None
        x2 = x.values.reshape(-1, layer.d_in)
        idx = index.reshape(-1)
        want = np.zeros((x2.shape[0], layer.d_out))
        for a, lay in enumerate(seen):
            rows = idx == a
            if rows.any():
                sa = 1.0 if scales is None else float(np.asarray(scales[a], dt))
                want[rows] = sa * (x2[rows] @ lay.dense().T)
        check_values = x.check_values and all(lay.checkable for lay in seen)
        if add is not None and add.value is not None:
            assert add.values is not None
            want = want + add.values.reshape(want.shape)
            check_values = check_values and add.check_values
        norms = [norm(lay.kernel) for lay in seen]
        floor = round_off(dt, layer.p, max(norms), norm(x.values)) * 4
        if add is not None and add.values is not None:
            floor += float(np.finfo(dt).eps) * norm(add.values)
        return check_array(
            got, (*lead, layer.d_out), dt, want.reshape(*lead, layer.d_out), floor, check_values
        )

    kwargs: dict[str, Any] = {}
    if scales is not None:
        kwargs["scales"] = scales
    if add is not None:
        kwargs["add"] = add.value
    if kernels is not None:
        kwargs["kernels"] = kernels
    inputs = tuple(
        v for v in (xs, idx_arg, *(kernels or []), add and add.value) if isinstance(v, np.ndarray)
    )
    yield Call(
        "_bca.mixed_forward",
        lambda: core.mixed_forward(ops, idx_arg, xs, **kwargs),
        status,
        check,
        {"adapter_index": idx_arg, "x": xs, **kwargs},
        inputs,
        on_success=install,
    )


def one_shot_calls(
    rng: np.random.Generator, bca: Any, layer: Layer, p_bad: float
) -> Iterator[Call]:
    q_out, q_in, p = layer.kernel.shape
    if not np.isfinite(layer.kernel).all():
        return
    k = make_arg(rng, layer.kernel.shape, layer.dtype, p_bad / 2)
    if k.values is None or k.why == "mismatched float dtype":  # x would have to follow
        k = Arg(layer.kernel, OK, layer.kernel.astype(np.float64))
    lay = Layer(k.values.astype(layer.dtype), layer.d_in, layer.d_out)
    r = rng.random()
    if r < 0.4:
        d_in = layer.d_in if rng.random() < 0.9 else int(rng.integers(0, q_in * p + 2))
        x = make_arg(rng, x_shape(rng, d_in), layer.dtype, p_bad)
        out = count_arg(rng, layer.d_out if rng.random() < 0.6 else None, 1, 2**63)
        xs = x.value
        # the one-shot functions take in_features from x (a zero width means the default)
        d = xs.shape[-1] if isinstance(xs, np.ndarray) and xs.ndim and xs.shape[-1] else None
        st = worst(k.status, x.status, out.status)
        if d is not None and not fits(d, q_in, p):
            st = BAD
        if out.value is None:
            lay.d_out = q_out * p
        elif not fits(out.value, q_out, p):
            st = BAD
        lay.d_in = int(d) if d is not None and fits(d, q_in, p) else q_in * p
        c = forward_call(
            "block_circulant_matmul",
            lambda xs: bca.block_circulant_matmul(xs, k.value, out.value),
            lay,
            x,
            st,
        )
        c.args = {"x": xs, "kernel": k.value, "out_features": out.value}
        c.inputs = (*c.inputs, *((k.value,) if isinstance(k.value, np.ndarray) else ()))
        yield c
    elif r < 0.8:
        shape = x_shape(rng, layer.d_in)
        x = make_arg(rng, shape, layer.dtype, p_bad)
        g = make_arg(rng, (*(shape[:-1] if shape else ()), layer.d_out), layer.dtype, p_bad)
        ig, kg = bool(rng.integers(0, 2)), bool(rng.integers(0, 2))
        xa = None if not kg and rng.random() < 0.3 else x
        xs, gs = (None if xa is None else xa.value), g.value
        d_in = xs.shape[-1] if isinstance(xs, np.ndarray) and xs.ndim and xs.shape[-1] else None
        d_out = gs.shape[-1] if isinstance(gs, np.ndarray) and gs.ndim and gs.shape[-1] else None
        extra = k.status
        if d_in is not None and not fits(d_in, q_in, p):
            extra = BAD
        if d_out is not None and not fits(d_out, q_out, p):
            extra = BAD
        lay.d_in = int(d_in) if d_in and fits(d_in, q_in, p) else q_in * p
        lay.d_out = int(d_out) if d_out and fits(d_out, q_out, p) else q_out * p

        def fn(xs: Any, gs: Any, input_grad: bool, kernel_grad: bool) -> Any:
            return bca.block_circulant_matmul_backward(
                xs, k.value, gs, input_grad=input_grad, kernel_grad=kernel_grad
            )

        c = backward_call("block_circulant_matmul_backward", fn, lay, xa, g, ig, kg, True)
        c.status = worst(c.status, extra)
        if xa is not None and not kg and xa.status != OK:
            c.status = worst(c.status, EITHER)
        c.args = {"x": xs, "kernel": k.value, **{kk: v for kk, v in c.args.items() if kk != "x"}}
        yield c
    else:
        in_arg = count_arg(rng, layer.d_in if rng.random() < 0.6 else None, 1, 2**63)
        out_arg = count_arg(rng, layer.d_out if rng.random() < 0.6 else None, 1, 2**63)
        st = k.status
        for a, q, attr in ((in_arg, q_in, "d_in"), (out_arg, q_out, "d_out")):
            if a.status == BAD:
                st = BAD
            elif a.value is None:
                setattr(lay, attr, q * p)
            elif not fits(a.value, q, p):
                st = BAD
            else:
                setattr(lay, attr, int(a.value))

        def check_dense(got: Any) -> str | None:
            return check_array(
                got, (lay.d_out, lay.d_in), lay.dtype, lay.dense(), 0.0, True, exact=True
            )

        yield Call(
            "block_circulant_to_dense",
            lambda: bca.block_circulant_to_dense(k.value, in_arg.value, out_arg.value),
            st,
            check_dense,
            {"kernel": k.value, "in_features": in_arg.value, "out_features": out_arg.value},
            (k.value,) if isinstance(k.value, np.ndarray) else (),
        )


def global_thread_calls(rng: np.random.Generator, bca: Any, core: Any) -> Iterator[Call]:
    n = count_arg(rng, int(rng.choice([1, 2, 3])) if rng.random() < 0.6 else None, 1, 4096)
    mod, api = (core, "_bca.set_num_threads") if rng.random() < 0.3 else (bca, "set_num_threads")
    yield Call(api, lambda: mod.set_num_threads(n.value), n.status, None, {"num_threads": n.value})
    yield Call(
        "get_num_threads",
        bca.get_num_threads,
        OK,
        lambda v: None if isinstance(v, int) and v >= 1 else f"got {v!r}",
        {},
    )


def shared_operator_calls(rng: np.random.Generator, bca: Any, rec: Recorder, scenario: str) -> None:
    """Several threads use one operator while another swaps its kernel between two
    values: every result must equal the oracle of one of the two kernels."""
    layer = random_layer(rng)
    k1 = rng.standard_normal(layer.kernel.shape, dtype=layer.dtype)
    k2 = rng.standard_normal(layer.kernel.shape, dtype=layer.dtype)
    op = bca.BlockCirculant(k1, layer.d_in, layer.d_out, num_threads=int(rng.integers(1, 4)))
    d1, d2 = dense_oracle(k1, layer.d_in, layer.d_out), dense_oracle(k2, layer.d_in, layer.d_out)
    rows = int(rng.choice([1, 3, 64, 300]))
    x = rng.standard_normal((rows, layer.d_in), dtype=layer.dtype)
    g = rng.standard_normal((rows, layer.d_out), dtype=layer.dtype)
    want_y = [x.astype(np.float64) @ d.T for d in (d1, d2)]
    want_gx = [g.astype(np.float64) @ d for d in (d1, d2)]
    tol = TOL[layer.dtype]
    # The round-off floor used by every other check (an output that cancels far below
    # its inputs, e.g. one output element), for the larger of the two kernels.
    k_norm = max(norm(k1), norm(k2))
    floor_y = round_off(layer.dtype, layer.p, k_norm, norm(x))
    floor_gx = round_off(layer.dtype, layer.p, k_norm, norm(g))
    stop = threading.Event()

    def user(i: int) -> None:
        for _ in range(30):
            try:
                if i % 2 == 0:
                    y = op(x)
                    oks = [rel_close(y, w, tol, floor_y)[0] for w in want_y]
                    api = "BlockCirculant.forward (shared)"
                else:
                    y, _ = op.backward(None, g, kernel_grad=False)
                    oks = [rel_close(y, w, tol, floor_gx)[0] for w in want_gx]
                    api = "BlockCirculant.backward (shared)"
            except BaseException as exc:
                if isinstance(exc, KeyboardInterrupt):
                    raise
                rec.fail(
                    "exception",
                    "BlockCirculant (shared)",
                    f"{type(exc).__name__}: {exc}",
                    f"shared operator, kernel {layer.kernel.shape}",
                    scenario,
                )
                return
            if any(oks):
                rec.ok(f"{api} | ok")
            else:
                rec.fail(
                    "wrong",
                    api,
                    "result matches neither kernel",
                    f"shared operator {layer.kernel.shape} {layer.dtype}, x {x.shape}",
                    scenario,
                )

    def swapper() -> None:
        i = 0
        while not stop.is_set() and i < 200:
            time.sleep(0.0002)
            op.set_kernel(k2 if i % 2 == 0 else k1)
            if i % 3 == 0:
                op.num_threads = int(rng.integers(1, 4))
            i += 1
            rec.ok("BlockCirculant.set_kernel (shared) | ok")

    users = [threading.Thread(target=user, args=(i,)) for i in range(3)]
    sw = threading.Thread(target=swapper)
    sw.start()
    for t in users:
        t.start()
    for t in users:
        t.join()
    stop.set()
    sw.join()


# -- running calls --------------------------------------------------------------------


def attach_openmp(core: Any) -> None:
    """Run the core's parallel loops on torch's OpenMP team, as ``bca.nn`` does in a torch
    program (needs torch, OpenMP backend, Linux); exits 2 when it cannot."""
    from bca.nn import rust_available

    if not (rust_available() and core._openmp_in_use()):
        print("--openmp: torch's OpenMP runtime could not be attached", file=sys.stderr)
        sys.exit(2)


class Worker:
    """The in-process bulk: ``threads`` threads each running scenarios."""

    def __init__(self, args: argparse.Namespace, emit: Callable[[dict], None]) -> None:
        import bca
        from bca import _bca

        if getattr(args, "openmp", False):
            attach_openmp(_bca)

        self.bca, self.core = bca, _bca
        self.args = args
        self.emit = emit
        self.rec = Recorder(sink=emit)
        self.current: dict[int, tuple[float, Call | None, str]] = {}
        self.budget = args.iterations
        self.deadline = time.monotonic() + args.max_seconds if args.max_seconds else None
        self.done = threading.Event()  # no new scenarios
        self.finished = threading.Event()  # every fuzzing thread has returned

    def run_call(self, tid: int, call: Call, scenario: str) -> None:
        snapshot = None
        if (
            call.inputs
            and self.args.check_inputs_every
            and (self.rec.calls % self.args.check_inputs_every == 0)
        ):
            snapshot = [a.copy() for a in call.inputs]
        error: BaseException | None = None
        self.current[tid] = (time.monotonic(), call, scenario)
        try:
            result = call.fn()
        except BaseException as exc:  # PanicException is a BaseException
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise
            error = exc
        finally:
            self.current[tid] = (0.0, None, scenario)
        if isinstance(error, ALLOWED_ERRORS):
            name = type(error).__name__
            if call.status == OK and not isinstance(error, MemoryError):
                self.rec.fail("rejected", call.api, f"{name}: {error}", call.describe(), scenario)
            else:
                self.rec.ok(f"{call.api} | {name}: {normalise(str(error))}")
            return
        if error is not None:
            detail = f"{type(error).__name__}: {error}"
            self.rec.fail("exception", call.api, detail, call.describe(), scenario)
            return
        if call.status == BAD:
            self.rec.fail(
                "accepted",
                call.api,
                "returned a result for input the contract rejects",
                call.describe(),
                scenario,
            )
            return
        problem = call.check(result) if call.check is not None else None
        if problem is None and call.inputs:
            outs = result if isinstance(result, tuple) else (result,)
            for o in outs:
                if isinstance(o, np.ndarray) and any(
                    np.shares_memory(o, a) for a in call.inputs if isinstance(a, np.ndarray)
                ):
                    problem = "the result shares memory with an input"
            if snapshot is not None:
                for before, after in zip(snapshot, call.inputs, strict=True):
                    if not np.array_equal(before, after, equal_nan=before.dtype.kind in "fc"):
                        problem = "an input array was modified"
        if problem is not None:
            self.rec.fail("wrong", call.api, problem, call.describe(), scenario)
            return
        if call.on_success is not None:
            call.on_success(result)
        self.rec.ok(f"{call.api} | ok" if call.status == OK else f"{call.api} | ok (either)")

    def scenarios(self, tid: int) -> None:
        index = self.args.start_index
        while not self.done.is_set():
            scenario = f"{self.args.seed}:{tid + self.args.tid_offset}:{index}"
            self.emit({"t": "scenario", "tid": tid, "scenario": scenario})
            run_scenario(self, tid, scenario)
            index += 1
            if self.rec.calls >= self.budget or (
                self.deadline is not None and time.monotonic() > self.deadline
            ):
                self.done.set()

    def watchdog(self) -> None:
        while not self.finished.wait(0.5):
            now = time.monotonic()
            for _tid, (start, call, scenario) in list(self.current.items()):
                if call is not None and start and now - start > self.args.call_timeout:
                    self.emit(
                        {
                            "t": "hang",
                            "api": call.api,
                            "call": call.describe(),
                            "scenario": scenario,
                            "seconds": now - start,
                        }
                    )
                    os._exit(3)

    def progress(self) -> None:
        while not self.finished.wait(0.25):
            with self.rec.lock:
                fails = {k: n for k, n in self.rec.counts.items() if k.startswith("FAIL ")}
            self.emit({"t": "progress", "calls": self.rec.calls, "fails": fails})

    def run(self) -> None:
        threads = [
            threading.Thread(target=self.scenarios, args=(i,), daemon=True)
            for i in range(self.args.threads)
        ]
        aux = [threading.Thread(target=f, daemon=True) for f in (self.watchdog, self.progress)]
        for t in threads + aux:
            t.start()
        for t in threads:
            t.join()
        self.done.set()
        self.finished.set()
        with self.rec.lock:
            counts = dict(self.rec.counts)
        self.emit({"t": "stats", "calls": self.rec.calls, "counts": counts})


def run_scenario(w: Worker, tid: int, scenario: str, verbose: bool = False) -> None:
    rng = np.random.default_rng([int(s) for s in scenario.split(":")])
    r = rng.random()
    if r < 0.01 and w.args.threads_scenarios:
        if verbose:
            print("shared operator scenario", flush=True)
        shared_operator_calls(rng, w.bca, w.rec, scenario)
        return
    gen = (
        global_thread_calls(rng, w.bca, w.core) if r < 0.03 else scenario_calls(rng, w.bca, w.core)
    )
    try:
        for call in gen:
            if verbose:
                print(f"call: {call.describe()}", flush=True)
            w.run_call(tid, call, scenario)
    finally:
        if r < 0.03:
            w.bca.set_num_threads(None)


# -- allocation cases (child process under RLIMIT_AS) --------------------------------


def alloc_case(rng: np.random.Generator) -> dict:
    """A call whose result (or dense matrix) cannot be allocated within the child's
    address-space limit, or that asks for more threads than fit: cheap to attempt,
    since nothing is computed before the allocation."""
    kind = int(rng.integers(0, 7))
    dtype = "float32" if rng.random() < 0.5 else "float64"
    rows = int(rng.choice([2**15, 2**16, 2**17]))
    wide = int(rng.choice([2**15, 2**16, 2**18]))
    if kind == 0:  # forward: output rows x wide
        p = int(rng.choice([1, 2, 8]))
        return {
            "op": "forward",
            "kernel": [wide // p, 1, p],
            "in": 1,
            "x": [rows, 1],
            "dtype": dtype,
        }
    if kind == 1:  # backward: input gradient rows x wide (x not needed)
        p = int(rng.choice([1, 2, 8]))
        return {
            "op": "backward",
            "kernel": [1, wide // p, p],
            "out": 1,
            "x": [rows, 1],
            "dtype": dtype,
        }
    if kind == 2:  # dense matrix of a small kernel
        shape = [[1, 1, 2**17], [1, 1, 2**16 + 1], [2**4, 2**4, 2**12], [1, 2**10, 2**12]]
        return {"op": "to_dense", "kernel": shape[int(rng.integers(0, 4))], "dtype": dtype}
    if kind == 3:  # one-shot forward with a wide output
        return {"op": "one_shot", "kernel": [wide, 1, 1], "x": [rows, 1], "dtype": dtype}
    if kind == 4:  # one-shot backward with a wide input gradient
        return {"op": "one_shot_backward", "kernel": [1, wide, 1], "x": [rows, 1], "dtype": dtype}
    if kind == 5:  # many threads: their stacks do not fit the limit
        return {
            "op": "forward",
            "kernel": [4, 4, 16],
            "in": 64,
            "x": [4096, 64],
            "dtype": dtype,
            "threads": int(rng.choice([512, 2048, 4096])),
        }
    # leading dimensions whose product is zero, around a large shape
    return {
        "op": "forward",
        "kernel": [2, 2, 4],
        "in": 8,
        "x": [2**31, 0, 2**31, 8][: int(rng.integers(2, 4))] + [8],
        "dtype": dtype,
    }


def run_alloc_case(case: dict, bca: Any) -> str:
    """Run one allocation case; return 'ok' or 'MemoryError: ...'/'ValueError: ...'.
    Anything else propagates (and is a failure); AssertionError means a wrong result."""
    dt = np.dtype(case["dtype"])
    q_out, q_in, p = case["kernel"]
    try:
        kernel = np.zeros(case["kernel"], dt)
        kernel.flat[0] = 1.0  # block (0, 0) is the identity; every other block is zero
        if case["op"] == "to_dense":
            d = bca.block_circulant_to_dense(kernel)
            assert d.shape == (q_out * p, q_in * p), "wrong dense shape"
            return "ok"
        x = np.ones(case["x"], dt)
        d_in = case.get("in", q_in * p)
        if case["op"] == "one_shot":
            y = bca.block_circulant_matmul(x, kernel)
        elif case["op"] == "one_shot_backward":
            g = np.ones((*x.shape[:-1], q_out * p), dt)
            y, _ = bca.block_circulant_matmul_backward(None, kernel, g, kernel_grad=False)
        elif case["op"] == "forward":
            op = bca.BlockCirculant(kernel, case.get("in"), num_threads=case.get("threads"))
            y = op(x)
        else:
            op = bca.BlockCirculant(kernel, None, case.get("out"))
            g = np.ones((*x.shape[:-1], op.out_features), dt)
            y, _ = op.backward(None, g, kernel_grad=False)
            d_in = q_in * p
        # y = ΔW x (or ΔWᵀ g): its first min(p, widths) columns are the input's
        k = min(p, d_in, y.shape[-1])
        assert y.shape[:-1] == x.shape[:-1], f"wrong shape {y.shape}"
        y2 = y.reshape(-1, y.shape[-1])
        assert np.all(y2[:, :k] == 1) and not y2[:, k:].any(), "wrong values"
        return "ok"
    except (MemoryError, ValueError) as exc:
        return f"{type(exc).__name__}: {normalise(str(exc))}"


def alloc_server(rlimit_gib: float, inject_faults: str | None = None) -> None:
    """Child process: read JSON cases from stdin, answer one JSON line each."""
    limit = int(rlimit_gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import bca

    if inject_faults == "alloc-crash":
        bca.block_circulant_to_dense = lambda *a, **k: os.abort()

    for line in sys.stdin:
        case = json.loads(line)
        try:
            out = {"outcome": run_alloc_case(case, bca)}
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt):
                raise
            out = {"failure": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()


class AllocRunner:
    """Keeps an alloc-server child; a signal exit is a crash, a timeout a hang."""

    def __init__(self, rlimit_gib: float, timeout: float, inject: str | None = None) -> None:
        self.rlimit_gib, self.timeout, self.inject = rlimit_gib, timeout, inject
        self.proc: subprocess.Popen | None = None

    def _start(self) -> subprocess.Popen:
        cmd = [sys.executable, HERE, "--alloc-server", "--rlimit-gib", str(self.rlimit_gib)]
        cmd += ["--inject", self.inject] if self.inject else []
        return subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
        )

    def run(self, case: dict) -> tuple[str, str]:
        """(kind, detail): kind is 'ok', 'failure', 'crash' or 'hang'."""
        if self.proc is None or self.proc.poll() is not None:
            self.proc = self._start()
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(json.dumps(case) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout)
        if not ready:
            self.proc.kill()
            self.proc.wait()
            self.proc = None
            return "hang", f"no answer within {self.timeout:g} s"
        line = self.proc.stdout.readline()
        if not line:
            rc = self.proc.wait()
            err = self.proc.stderr.read() if self.proc.stderr else ""
            self.proc = None
            sig = -rc if rc < 0 else None
            name = signal.Signals(sig).name if sig else f"exit status {rc}"
            lines = err.strip().splitlines()
            key = [ln for ln in lines if "memory allocation" in ln or "Fatal" in ln]
            tail = " | ".join(key[-1:] or lines[-3:])  # the child's stderr spans many cases
            return "crash", f"child died: {name}; stderr: {tail[:300]}"
        out = json.loads(line)
        if "failure" in out:
            return "failure", out["failure"]
        return "ok", out["outcome"]

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# -- supervisor ------------------------------------------------------------------------


@dataclass
class WorkerState:
    """One worker process as the supervisor sees it."""

    index: int
    budget: int
    start_index: int
    calls: int = 0  # calls of its finished runs
    run_calls: int = 0  # calls of the current run, from its progress lines
    run_fails: dict = field(default_factory=dict)
    stats: dict | None = None
    hang: dict | None = None
    last_scenario: dict = field(default_factory=dict)
    last_seen: float = 0.0
    proc: subprocess.Popen | None = None


class Supervisor:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.counts: collections.Counter = collections.Counter()
        self.failures: list[dict] = []
        self.calls = 0
        self.alloc = AllocRunner(args.rlimit_gib, args.call_timeout, args.inject)
        self.alloc_rng = np.random.default_rng([args.seed, 10**6])
        self.alloc_calls = 0
        self.workers: list[WorkerState] = []

    def add_failure(self, rec: dict) -> None:
        cls = rec["class"]
        self.counts[f"FAIL {cls}"] += rec.pop("count", 0)
        if not any(f["class"] == cls for f in self.failures):
            self.failures.append(rec)

    def replay(self, scenario: str) -> tuple[str, str]:
        """Replay a scenario alone, printing calls; return (outcome, last call)."""
        cmd = [
            sys.executable,
            HERE,
            "--replay",
            scenario,
            "--call-timeout",
            str(self.args.call_timeout),
            *(["--openmp"] if self.args.openmp else []),
            *(["--inject", self.args.inject] if self.args.inject else []),
        ]
        try:
            run = subprocess.run(
                cmd, capture_output=True, text=True, timeout=self.args.call_timeout * 4 + 30
            )
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            calls = [ln for ln in out.splitlines() if ln.startswith("call: ")]
            return "hang in replay", calls[-1][6:] if calls else "?"
        calls = [ln for ln in run.stdout.splitlines() if ln.startswith("call: ")]
        last = calls[-1][6:] if calls else "?"
        if run.returncode < 0:
            return f"crash in replay ({signal.Signals(-run.returncode).name})", last
        return f"replay exited {run.returncode}", last

    def worker_cmd(self, w: WorkerState, seconds: float | None) -> list[str]:
        a = self.args
        extra = ["--inject", a.inject] if a.inject else []
        extra += ["--max-seconds", f"{max(seconds, 0.1):.3f}"] if seconds is not None else []
        return [
            sys.executable,
            HERE,
            "--worker",
            "--iterations",
            str(w.budget - w.calls),
            "--seed",
            str(a.seed),
            "--threads",
            str(a.threads),
            "--tid-offset",
            str(w.index * a.threads),
            "--start-index",
            str(w.start_index),
            "--call-timeout",
            str(a.call_timeout),
            "--check-inputs-every",
            str(a.check_inputs_every),
            *(["--openmp"] if a.openmp else []),
            *extra,
        ]

    def start(self, w: WorkerState, deadline: float | None) -> None:
        left = None if deadline is None else deadline - time.monotonic()
        w.proc = subprocess.Popen(
            self.worker_cmd(w, left),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        w.run_calls, w.run_fails, w.stats, w.hang = 0, {}, None, None
        w.last_scenario = {}
        w.last_seen = time.monotonic()

    def handle(self, w: WorkerState, msg: dict) -> None:
        t = msg["t"]
        if t == "scenario":
            w.last_scenario[msg["tid"]] = msg["scenario"]
        elif t == "progress":
            w.run_calls, w.run_fails = msg["calls"], msg["fails"]
        elif t == "failure":
            msg.pop("t")
            self.add_failure(msg)
        elif t == "hang":
            w.hang = msg
        elif t == "stats":
            w.stats = msg

    def finish(self, w: WorkerState) -> bool:
        """The worker's process ended: account for it; True if it is done for good."""
        assert w.proc is not None
        rc = w.proc.wait()
        err = w.proc.stderr.read() if w.proc.stderr else ""
        w.proc = None
        if w.stats is not None:
            self.counts.update(w.stats["counts"])
            w.calls += w.stats["calls"]
        else:  # died: keep what its last progress line said
            self.counts.update(w.run_fails)
            rest = w.run_calls - sum(w.run_fails.values())
            self.counts["(calls of a worker that died, outcomes not kept) | ok"] += rest
            w.calls += w.run_calls
        w.run_calls = 0
        if w.stats is not None and rc == 0:
            return True
        # a crash or a hang: find the call by replaying the last scenarios alone
        scenarios = sorted(set(w.last_scenario.values()))
        kind = "hang" if w.hang is not None or rc in (3, -signal.SIGKILL) else "crash"
        why = f"signal {signal.Signals(-rc).name}" if rc < 0 else f"exit status {rc}"
        tail = " | ".join(err.strip().splitlines()[-4:])[:400]
        culprits = []
        for sc in scenarios:
            if w.hang is not None and w.hang.get("scenario") == sc:
                culprits.append((sc, "hang (watchdog)", w.hang["call"]))
                continue
            outcome, last = self.replay(sc)
            if "in replay" in outcome:  # the replay crashed or hung too: this is the call
                culprits.append((sc, outcome, last))
        w.calls += 1
        if not culprits:  # not reproduced alone: a race between threads, or flaky
            culprits = [(",".join(scenarios), f"not reproduced alone; {tail}", "?")]
        for sc, outcome, call in culprits:
            api = call.split("(")[0] if call != "?" else "worker"
            self.add_failure(
                {
                    "kind": kind,
                    "api": api,
                    "call": call,
                    "detail": f"worker {why}; replay: {outcome}",
                    "scenario": sc,
                    "class": f"{api} | {kind} | worker {why}",
                    "count": 1,
                }
            )
        if scenarios:
            w.start_index = max(int(s.split(":")[2]) for s in scenarios) + 1
        else:
            w.start_index += 1
        return w.calls >= w.budget

    def total_calls(self) -> int:
        return sum(w.calls + w.run_calls for w in self.workers) + self.alloc_calls

    def run(self) -> int:
        try:
            from tqdm import tqdm
        except ImportError:  # pragma: no cover
            tqdm = None
        a = self.args
        bar = (
            tqdm(total=a.iterations, unit="call", smoothing=0.1, mininterval=0.5)
            if tqdm is not None and not a.no_progress
            else None
        )
        t0 = time.monotonic()
        deadline = t0 + a.max_seconds if a.max_seconds else None
        n = max(1, a.workers)
        self.workers = [
            WorkerState(i, a.iterations // n + (1 if i < a.iterations % n else 0), a.start_index)
            for i in range(n)
        ]
        live = []
        for w in self.workers:
            if w.budget > 0:
                self.start(w, deadline)
                live.append(w)
        next_alloc = a.subprocess_every
        while live:
            by_fd = {w.proc.stdout: w for w in live if w.proc is not None}
            ready, _, _ = select.select(list(by_fd), [], [], 1.0)
            now = time.monotonic()
            ended = []
            for f in ready:
                w = by_fd[f]
                line = f.readline()
                if not line:
                    ended.append(w)
                    continue
                w.last_seen = now
                self.handle(w, json.loads(line))
            for w in live:
                if w not in ended and now - w.last_seen > a.call_timeout + 20:
                    assert w.proc is not None
                    w.proc.kill()  # stopped reporting: a hang with the GIL held, say
                    w.hang = {"call": "?", "scenario": None}
                    ended.append(w)
            for w in ended:
                live.remove(w)
                done = self.finish(w)
                out_of_time = deadline is not None and time.monotonic() >= deadline
                if not done and not out_of_time:
                    self.start(w, deadline)
                    live.append(w)
            while a.subprocess_every and self.total_calls() - self.alloc_calls >= next_alloc:
                self.run_alloc_case()
                next_alloc += a.subprocess_every
                for w in live:
                    w.last_seen = time.monotonic()
            if bar is not None:
                bar.update(self.total_calls() - bar.n)
        self.calls = self.total_calls()
        self.alloc.close()
        elapsed = time.monotonic() - t0
        if bar is not None:
            bar.close()
        return self.summary(elapsed)

    def run_alloc_case(self) -> None:
        case = alloc_case(self.alloc_rng)
        kind, detail = self.alloc.run(case)
        self.alloc_calls += 1
        api = f"alloc:{case['op']}"
        if kind == "ok":
            self.counts[f"{api} | {detail}"] += 1
            return
        fkind = {"failure": "exception"}.get(kind, kind)
        if kind == "failure" and detail.startswith("AssertionError"):
            fkind = "wrong"
        rec = {
            "kind": fkind,
            "api": api,
            "detail": detail,
            "call": json.dumps(case),
            "scenario": "alloc",
            "class": f"{api} | {fkind} | {normalise(detail)}",
            "count": 1,
        }
        self.add_failure(rec)

    def summary(self, elapsed: float) -> int:
        ok = collections.Counter()
        fails = collections.Counter()
        for key, n in self.counts.items():
            (fails if key.startswith("FAIL ") else ok)[key] += n
        out = sys.stdout
        print("\noutcomes (api | outcome: count):", file=out)
        for key, n in sorted(ok.items()):
            print(f"  {n:>10}  {key}", file=out)
        kinds = collections.Counter()
        for key, n in fails.items():
            kinds[key.split(" | ")[1]] += n
        if fails:
            print("\nfailure classes:", file=out)
            for key, n in sorted(fails.items(), key=lambda kv: -kv[1]):
                print(f"  {n:>10}  {key[5:]}", file=out)
            print("\nexamples (first of each class):", file=out)
            for f in self.failures:
                print(f"  [{f['kind']}] {f['api']}: {f['detail'][:300]}", file=out)
                print(f"      call: {f['call'][:600]}", file=out)
                print(
                    f"      replay: python {os.path.relpath(HERE)} --replay {f['scenario']}"
                    if f["scenario"] != "alloc"
                    else "      (allocation case, in a child)",
                    file=out,
                )
        n_fail = sum(fails.values())
        rate = self.calls / elapsed if elapsed > 0 else 0.0
        print(
            f"\nelapsed {elapsed:.1f} s, {rate:.0f} calls/s, seed {self.args.seed}, "
            f"threads {self.args.threads}",
            file=out,
        )
        print(
            f"calls: {self.calls}, failures: {n_fail}, crashes: {kinds['crash']}, "
            f"hangs: {kinds['hang']}, wrong: {kinds['wrong']}",
            file=out,
        )
        return 1 if n_fail else 0


# -- entry points ------------------------------------------------------------------------


def inject(fault: str | None) -> None:
    """Plant a fault in BlockCirculant.matmul: a wrong result or an OverflowError for
    inputs with 3 dimensions, a crash or a hang for 5 dimensions and a width divisible
    by 7 (rare, so that the harness gets on between them)."""
    if fault not in ("wrong", "exception", "crash", "hang"):
        return
    import bca

    matmul = bca.BlockCirculant.matmul

    def faulty(self: Any, x: Any) -> Any:
        rare = isinstance(x, np.ndarray) and x.ndim == 5 and x.shape[-1] % 7 == 0
        if rare and fault == "crash":
            os.abort()
        if rare and fault == "hang":
            time.sleep(3600)
        if isinstance(x, np.ndarray) and x.ndim == 3 and x.size and fault in ("wrong", "exception"):
            if fault == "exception":
                raise OverflowError("planted")
            return matmul(self, x) * 1.001
        return matmul(self, x)

    bca.BlockCirculant.matmul = bca.BlockCirculant.__call__ = faulty


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--iterations", type=int, default=100_000, help="number of calls")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="fuzzing threads per worker")
    ap.add_argument(
        "--workers", type=int, default=1, help="worker processes (use the cores: 2 here)"
    )
    ap.add_argument(
        "--subprocess-every",
        type=int,
        default=5000,
        help="run one allocation case in a child every K calls (0: never)",
    )
    ap.add_argument("--rlimit-gib", type=float, default=4.0, help="RLIMIT_AS of that child")
    ap.add_argument("--call-timeout", type=float, default=20.0, help="watchdog, seconds")
    ap.add_argument(
        "--check-inputs-every",
        type=int,
        default=7,
        help="verify every K-th call left its inputs unchanged",
    )
    ap.add_argument(
        "--no-threads-scenarios",
        dest="threads_scenarios",
        action="store_false",
        help="skip the shared-operator scenarios",
    )
    ap.add_argument(
        "--openmp",
        action="store_true",
        help="run the core's parallel loops on torch's OpenMP team, as bca.nn does in a "
        "torch program (imports torch)",
    )
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument(
        "--max-seconds", type=float, default=0.0, help="stop after this long (0: no limit)"
    )
    ap.add_argument(
        "--inject",
        choices=["wrong", "exception", "crash", "hang", "alloc-crash"],
        help="self-test: plant a fault in BlockCirculant.matmul (or the allocation child) "
        "and check that the harness reports it",
    )
    ap.add_argument("--replay", metavar="SEED:THREAD:INDEX", help="run one scenario verbosely")
    ap.add_argument("--start-index", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--tid-offset", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--alloc-server", action="store_true", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.alloc_server:
        alloc_server(args.rlimit_gib, args.inject)
        return 0
    if args.worker:
        out_lock = threading.Lock()

        def emit(msg: dict) -> None:
            line = json.dumps(msg, default=str) + "\n"
            with out_lock:
                sys.stdout.write(line)
                sys.stdout.flush()

        import faulthandler
        import warnings

        faulthandler.enable(all_threads=True)
        np.seterr(all="ignore")  # the oracle may overflow on extreme (unchecked) values
        warnings.simplefilter("ignore", RuntimeWarning)
        inject(args.inject)
        Worker(args, emit).run()
        return 0
    if args.replay:
        np.seterr(all="ignore")
        inject(args.inject)
        w = Worker(args, lambda m: print(json.dumps(m, default=str), flush=True))
        threading.Thread(target=w.watchdog, daemon=True).start()  # exits 3 on a hang
        try:
            run_scenario(w, 0, args.replay, verbose=True)
        except Exception:  # noqa: BLE001 - a replay prints whatever the scenario raised
            traceback.print_exc()
        w.done.set()
        w.finished.set()
        print(f"replay done: {w.rec.calls} calls, {sum(w.rec.seen.values())} failures")
        return 1 if w.rec.seen else 0
    return Supervisor(args).run()


if __name__ == "__main__":
    sys.exit(main())
