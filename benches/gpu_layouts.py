"""Layouts of the torch backend's frequency-domain product, timed on a GPU (or the CPU).

The torch backend (``bca.nn``, any device) takes the rfft of each row's blocks as
``(N, q, F)``, permutes it to ``(F, N, q)`` for one batched complex matmul per frequency,
and permutes back for the irfft; on a GPU each permute is a copy of the spectra. This
script times, side by side in one round robin, the library's own step against layouts
that avoid those copies, all as plain torch ops, forward alone and forward + backward
(input and kernel gradients), and checks each against the library's result first:

* ``library``: ``BlockCirculantLinear.adapter_forward`` and autograd (what users run);
* ``nqf``: the same ops as the library, written out (the reference for the others);
* ``fnq``: the FFT taken along a permuted axis so its output is ``(F, N, q)`` directly
  (cuFFT writes with a stride), the matmul on it without a copy, the inverse FFT along
  axis 0 and the rows returned as a strided view (no copy back);
* ``einsum``: ``torch.einsum('nif,oif->nof')`` on the ``(N, q, F)`` spectra.

    python benches/gpu_layouts.py --device cuda          # H100/H200: the question
    python benches/gpu_layouts.py --device cpu --quick   # checks the script itself

Prints a table of median milliseconds and ratios against ``library``; ``--json PATH``
also writes the rows. Timing: CUDA events around each call on CUDA, perf_counter on CPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

if importlib.util.find_spec("bca") is None:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from bca.nn import BlockCirculantLinear

Step = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]]


def _nqf(x: torch.Tensor, k: torch.Tensor, g: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    q_out, q_in, p = k.shape
    n = x.shape[0]
    ks = torch.fft.rfft(k, dim=-1).permute(2, 1, 0).contiguous()  # (F, q_in, q_out)
    xs = torch.fft.rfft(x.view(n, q_in, p), dim=-1).permute(2, 0, 1)  # (F, N, q_in)
    y = torch.fft.irfft(torch.matmul(xs, ks).permute(1, 2, 0), n=p, dim=-1)
    y = y.reshape(n, q_out * p).contiguous()
    if g is None:
        return (y,)
    gs = torch.fft.rfft(g.view(n, q_out, p), dim=-1).permute(2, 0, 1).contiguous()
    gx = torch.fft.irfft(torch.matmul(gs, ks.mH).permute(1, 2, 0), n=p, dim=-1)
    gx = gx.reshape(n, q_in * p).contiguous()
    gk = torch.fft.irfft(torch.matmul(xs.mH, gs).permute(2, 1, 0), n=p, dim=-1)
    return y, gx, gk


def _fnq(x: torch.Tensor, k: torch.Tensor, g: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    q_out, q_in, p = k.shape
    n = x.shape[0]
    ks = torch.fft.rfft(k.permute(2, 1, 0), dim=0)  # (F, q_in, q_out)
    xs = torch.fft.rfft(x.view(n, q_in, p).permute(2, 0, 1), dim=0)  # (F, N, q_in)
    y = torch.fft.irfft(torch.matmul(xs, ks), n=p, dim=0)  # (p, N, q_out)
    y = y.permute(1, 2, 0).reshape(n, q_out * p)
    if g is None:
        return (y,)
    gs = torch.fft.rfft(g.view(n, q_out, p).permute(2, 0, 1), dim=0)  # (F, N, q_out)
    gx = torch.fft.irfft(torch.matmul(gs, ks.mH), n=p, dim=0)
    gx = gx.permute(1, 2, 0).reshape(n, q_in * p)
    gk = torch.fft.irfft(torch.matmul(xs.mH, gs), n=p, dim=0).permute(2, 1, 0)
    return y, gx, gk


def _einsum(x: torch.Tensor, k: torch.Tensor, g: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    q_out, q_in, p = k.shape
    n = x.shape[0]
    ks = torch.fft.rfft(k, dim=-1)  # (q_out, q_in, F)
    xs = torch.fft.rfft(x.view(n, q_in, p), dim=-1)  # (N, q_in, F)
    y = torch.fft.irfft(torch.einsum("nif,oif->nof", xs, ks), n=p, dim=-1).reshape(n, -1)
    if g is None:
        return (y,)
    gs = torch.fft.rfft(g.view(n, q_out, p), dim=-1)
    gx = torch.fft.irfft(torch.einsum("nof,oif->nif", gs, ks.conj()), n=p, dim=-1)
    gk = torch.fft.irfft(torch.einsum("nif,nof->oif", xs.conj(), gs), n=p, dim=-1)
    return y, gx.reshape(n, -1), gk


VARIANTS: dict[str, Callable[..., tuple[torch.Tensor, ...]]] = {
    "nqf": _nqf,
    "fnq": _fnq,
    "einsum": _einsum,
}


def _library(d: int, p: int, k: torch.Tensor) -> BlockCirculantLinear:
    m = BlockCirculantLinear(nn.Linear(d, d, device=k.device), p, backend="torch").to(k.device)
    with torch.no_grad():
        m.bca_kernel.copy_(k)
    return m


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def bench(d: int, p: int, n: int, device: torch.device, repeats: int) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    q = d // p
    k = (torch.randn(q, q, p, generator=gen) / d**0.5).to(device)
    x = torch.randn(n, d, generator=gen).to(device)
    g = torch.randn(n, d, generator=gen).to(device)
    m = _library(d, p, k)
    xl = x.clone().requires_grad_(True)

    def lib_fwd() -> None:
        with torch.no_grad():
            m.adapter_forward(x)

    def lib_step() -> None:
        m.bca_kernel.grad = None
        xl.grad = None
        m.adapter_forward(xl).backward(g)

    # check every variant against the library first
    y_ref = m.adapter_forward(xl)
    y_ref.backward(g)
    refs = (y_ref.detach(), xl.grad, m.bca_kernel.grad)
    for name, fn in VARIANTS.items():
        got = fn(x, k, g)
        for what, a, b in zip(("y", "grad_x", "grad_kernel"), got, refs, strict=True):
            err = _rel(a, b)
            if err > 1e-5:
                raise AssertionError(f"{name} {what}: relative error {err:.3g} vs the library")
    calls: dict[str, Callable[[], object]] = {"library fwd": lib_fwd, "library step": lib_step}
    for name, fn in VARIANTS.items():
        calls[f"{name} fwd"] = lambda fn=fn: fn(x, k, None)
        calls[f"{name} step"] = lambda fn=fn: fn(x, k, g)
    for c in calls.values():  # warm-up: plans, caches
        c()
        c()
    times: dict[str, list[float]] = {name: [] for name in calls}
    cuda = device.type == "cuda"
    for _ in range(repeats):
        for name, c in calls.items():
            if cuda:
                torch.cuda.synchronize()
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                c()
                end.record()
                torch.cuda.synchronize()
                times[name].append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                c()
                times[name].append(1e3 * (time.perf_counter() - t0))
    rows = []
    for name, ts in times.items():
        variant, what = name.split()
        ref = statistics.median(times[f"library {what}"])
        med = statistics.median(ts)
        rows.append(
            dict(d=d, p=p, n=n, variant=variant, call=what, median_ms=med, vs_library=med / ref)
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--quick", action="store_true", help="small shapes, few repeats")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA not available", file=sys.stderr)
        return 2
    cases = [(768, 256, 8192), (4096, 256, 512), (4096, 256, 8192), (4096, 4096, 512)]
    if args.quick:
        cases, args.repeats = [(64, 16, 32), (96, 32, 5)], min(args.repeats, 3)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# {name}, torch {torch.__version__}, median of {args.repeats} interleaved repeats")
    print("| d | p | N | variant | call | median ms | vs library |")
    print("|---:|---:|---:|---|---|---:|---:|")
    rows = []
    for d, p, n in cases:
        for r in bench(d, p, n, device, args.repeats):
            rows.append(r)
            print(
                f"| {d} | {p} | {n} | {r['variant']} | {r['call']} | "
                f"{r['median_ms']:.3f} | {r['vs_library']:.2f} |",
                flush=True,
            )
    if args.json is not None:
        meta = dict(device=name, torch=torch.__version__, repeats=args.repeats)
        args.json.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
