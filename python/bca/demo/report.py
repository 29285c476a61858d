"""Markdown summary, JSON results and PNG plots of a demo or experiment run."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["fmt_int", "markdown_table", "plot_accuracy_vs_params", "plot_curves", "write_json"]


def fmt_int(n: int) -> str:
    return f"{n:,}"


def _fmt(x: Any, digits: int = 1) -> str:
    if isinstance(x, float):
        if math.isnan(x):
            return "—"
        return f"{x:.{digits}f}"
    return str(x)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines)


def write_json(path: Path, doc: Any) -> None:
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n", encoding="utf-8")


def smoothed(values: Sequence[float], window: int) -> list[float]:
    out: list[float] = []
    acc = 0.0
    buf: list[float] = []
    for v in values:
        buf.append(v)
        acc += v
        if len(buf) > window:
            acc -= buf.pop(0)
        out.append(acc / len(buf))
    return out


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(
    path: Path,
    curves: dict[str, Sequence[float]],
    *,
    title: str,
    ylabel: str,
    logy: bool = False,
    smooth: int = 1,
    raw_alpha: float = 0.25,
) -> None:
    """One line per entry of ``curves`` against the training step (optionally smoothed)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=110)
    for label, ys in curves.items():
        ys = [y if math.isfinite(y) else float("nan") for y in ys]
        steps = list(range(1, len(ys) + 1))
        if smooth > 1 and len(ys) > smooth:
            (line,) = ax.plot(steps, smoothed(ys, smooth), label=label, linewidth=1.6)
            ax.plot(steps, ys, color=line.get_color(), alpha=raw_alpha, linewidth=0.8)
        else:
            ax.plot(steps, ys, label=label, linewidth=1.4)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_accuracy_vs_params(
    path: Path,
    points: Sequence[tuple[str, int, float]],
    *,
    title: str,
    reference: dict[str, float] | None = None,
) -> None:
    """Scatter of test accuracy against trainable parameters (log x)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=110)
    for label, params, acc in points:
        if params <= 0 or not math.isfinite(acc):
            continue
        # A legend rather than annotations: methods with equal parameter counts (BCA and
        # C3A at the same block size) would put their labels on top of each other.
        ax.scatter([params], [100 * acc], s=60, zorder=3, label=label)
    ax.set_xscale("log")
    for name, acc in (reference or {}).items():
        ax.axhline(100 * acc, linestyle="--", linewidth=1, color="gray")
        ax.text(
            0.01,
            100 * acc,
            f" {name}",
            va="bottom",
            fontsize=8,
            color="gray",
            transform=ax.get_yaxis_transform(),
        )
    ax.set_xlabel("trainable parameters (log scale, classifier head included)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
