"""Weight sketches: a few numbers that tell two base checkpoints of one architecture apart.

For a base weight W (out, in) the sketch is its RMS and ``u_kᵀ W v_k / sqrt(out · in)``
for K fixed ±1 vectors u_k, v_k. For another checkpoint the projections are unrelated
numbers of the size of the RMS; a cast of the same weights to half precision moves them
by a fraction of a percent of it. Sketches are saved with every adapter
(``adapter_config.json``, ``base_model.weight_sketch``) and compared when the adapter is
loaded into a torch model or patched into an ONNX graph. numpy only: the torch side
computes the same numbers with its own matmuls.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

PROJECTIONS = 4
TOLERANCE = 0.05  # of the RMS
CHECK_BASE = ("warn", "error", "ignore")
_CHUNK = 2048


def signs(n: int, k: int) -> np.ndarray:
    """The fixed ±1 vector number ``k`` of length ``n`` (float64), from an integer hash:
    the same on every machine and library version."""
    h = (np.arange(n, dtype=np.int64) * 0x9E3779B1 + (k + 1) * 0x85EBCA77) & 0xFFFFFFFF
    h ^= h >> 15
    h = (h * 0x2C1B3C6D) & 0xFFFFFFFF
    h ^= h >> 12
    return ((h >> 7) & 1).astype(np.float64) * 2.0 - 1.0


def vectors(d_out: int, d_in: int) -> tuple[np.ndarray, np.ndarray]:
    """``(U (out, K), V (in, K))``: the sketch's fixed vectors as columns."""
    u = np.stack([signs(d_out, 2 * i) for i in range(PROJECTIONS)], 1)
    v = np.stack([signs(d_in, 2 * i + 1) for i in range(PROJECTIONS)], 1)
    return u, v


def finish(sum_sq: float, projections: list[float], d_out: int, d_in: int) -> dict[str, Any]:
    norm = math.sqrt(d_out * d_in)
    return {"rms": math.sqrt(sum_sq) / norm, "projections": [p / norm for p in projections]}


def sketch(weight: np.ndarray) -> dict[str, Any]:
    """The sketch of a weight laid out ``(out, in)`` (any float dtype; float32 products in
    row chunks, whose rounding is far below :data:`TOLERANCE`)."""
    w = np.asarray(weight)
    d_out, d_in = w.shape
    u, v = vectors(d_out, d_in)
    v32 = v.astype(np.float32)
    sum_sq = 0.0
    proj = np.zeros(PROJECTIONS)
    for r0 in range(0, d_out, _CHUNK):
        chunk = w[r0 : r0 + _CHUNK].astype(np.float32)
        sum_sq += float(np.linalg.norm(chunk)) ** 2
        proj += ((chunk @ v32).astype(np.float64) * u[r0 : r0 + _CHUNK]).sum(0)
    return finish(sum_sq, proj.tolist(), d_out, d_in)


def differ(saved: dict[str, Any], got: dict[str, Any]) -> bool:
    """Whether two sketches belong to different weights (beyond :data:`TOLERANCE`)."""
    scale = max(float(saved["rms"]), float(got["rms"]), 1e-30)
    if abs(float(saved["rms"]) - float(got["rms"])) > TOLERANCE * scale:
        return True
    return any(
        abs(float(a) - float(b)) > TOLERANCE * scale
        for a, b in zip(saved["projections"], got["projections"], strict=True)
    )


def check_mode(check_base: str) -> str:
    if check_base not in CHECK_BASE:
        raise ValueError(f"check_base must be one of {CHECK_BASE}, got {check_base!r}")
    return check_base


def report_mismatch(
    source: str,
    differing: list[str],
    total: int,
    saved_from: str,
    check: str,
    stacklevel: int,
) -> None:
    """Raise (``check="error"``) or warn that adapter ``source`` was trained on other base
    weights in the layers ``differing`` (of ``total``); nothing when none differ.
    ``stacklevel`` counts from the caller, as for :func:`warnings.warn`."""
    if not differing or check == "ignore":
        return
    shown = ", ".join(repr(n) for n in differing[:4]) + (" ..." if len(differing) > 4 else "")
    msg = (
        f"adapter {source!r} was trained on other base weights than this model has in "
        f"{len(differing)} of its {total} layers ({shown}; saved from "
        f"{saved_from or 'an unnamed model'!r}): another checkpoint of the same "
        "architecture, or a base changed since (fine-tuned, quantized, other adapters "
        "merged). Its outputs will not be the trained ones. Pass check_base='ignore' if "
        "this is intended"
    )
    if check == "error":
        raise ValueError(msg)
    warnings.warn(msg, stacklevel=stacklevel + 1)
