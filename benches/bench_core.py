"""Forward cost of the block circulant product: bca's Rust operator (spectra cached) vs a
torch.fft reference (spectra cached), PEFT's C3A adapter and the dense layer, side by
side in one run with the same thread count.

    python benches/bench_core.py            # full grid (a few minutes)
    python benches/bench_core.py --quick    # small grid (seconds)

Writes benches/results/core_forward.{json,md,png}.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import machine_info, markdown_table, pin_threads, time_interleaved, write_results


def torch_rfft_forward(torch, x, spectra, q_in: int, q_out: int, p: int):
    """ΔW x with torch.fft; `spectra` (F, q_in, q_out) complex, cached."""
    n = x.shape[0]
    xs = torch.fft.rfft(x.view(n, q_in, p), dim=-1)  # (n, q_in, F)
    ys = torch.bmm(xs.permute(2, 0, 1), spectra)  # (F, n, q_out)
    return torch.fft.irfft(ys.permute(1, 2, 0), n=p, dim=-1).reshape(n, q_out * p)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--quick", action="store_true", help="small grid, few repeats")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args(argv)

    pin_threads(args.threads)
    load_before = _load()
    import torch
    from peft.tuners.c3a.utils import BlockCircularConvolution

    import bca
    from bca.nn import rust_available

    # As in a torch program: bca.nn runs the core's parallel loops on torch's OpenMP
    # threads (README, Threads) instead of bca's own, which would compete with them.
    rust_available()

    dims = [768] if args.quick else [768, 4096]
    rows_list = [1, 32] if args.quick else [1, 32, 512]
    repeats = 5 if args.quick else args.repeats
    rng = np.random.default_rng(0)
    records = []
    table = []
    grid = [(d, n, p) for d in dims for n in rows_list for p in (64, 256, d)]
    try:
        from tqdm import tqdm

        grid_iter = tqdm(grid, desc="bench_core", unit="shape")
    except ImportError:
        grid_iter = grid
    for d, n, p in grid_iter:
        q = d // p
        kernel = (rng.standard_normal((q, q, p)) / d).astype(np.float32)
        x = rng.standard_normal((n, d)).astype(np.float32)
        op = bca.BlockCirculant(kernel)
        xt = torch.from_numpy(x)
        kt = torch.from_numpy(kernel)
        spectra = torch.fft.rfft(kt, dim=-1).permute(2, 1, 0).contiguous()  # (F, q_in, q_out)
        # PEFT's kernel w holds c reversed and scaled: c[n] = w[-n mod p] / d
        w_peft = (torch.roll(torch.flip(kt, dims=[-1]), 1, dims=-1) * d).contiguous()
        dense_w = torch.randn(d, d) / d**0.5
        with torch.no_grad():
            y_rust = op(x)
            y_torch = torch_rfft_forward(torch, xt, spectra, q, q, p).numpy()
            y_peft = (BlockCircularConvolution.apply(xt, w_peft) / d).numpy()
        scale = np.linalg.norm(y_rust)
        for name, y in (("torch_rfft", y_torch), ("peft_c3a", y_peft)):
            err = np.linalg.norm(y - y_rust) / scale
            assert err < 1e-4, f"{name} disagrees with bca at d={d} n={n} p={p}: {err}"

        def peft_fwd(xt=xt, w=w_peft, d=d):
            with torch.no_grad():
                return BlockCircularConvolution.apply(xt, w) / d

        def torch_fwd(xt=xt, s=spectra, q=q, p=p):
            with torch.no_grad():
                return torch_rfft_forward(torch, xt, s, q, q, p)

        def dense_fwd(xt=xt, w=dense_w):
            with torch.no_grad():
                return torch.nn.functional.linear(xt, w)

        res = time_interleaved(
            {
                "bca_rust": lambda op=op, x=x: op.matmul(x),
                "torch_rfft": torch_fwd,
                "peft_c3a": peft_fwd,
                "dense": dense_fwd,
            },
            repeats=repeats,
        )
        med = {k: v["median_s"] * 1e3 for k, v in res.items()}
        records.append({"d": d, "rows": n, "block_size": p, "timings": res})
        table.append(
            [
                d,
                n,
                p,
                f"{med['bca_rust']:.4f}",
                f"{med['torch_rfft']:.4f}",
                f"{med['peft_c3a']:.4f}",
                f"{med['dense']:.4f}",
                f"{med['peft_c3a'] / med['bca_rust']:.1f}×",
                f"{med['torch_rfft'] / med['bca_rust']:.1f}×",
                f"{100 * med['bca_rust'] / med['dense']:.1f}%",
            ]
        )
    header = [
        "d",
        "rows",
        "p",
        "bca rust ms",
        "torch rfft ms",
        "PEFT C3A ms",
        "dense ms",
        "PEFT / bca",
        "torch rfft / bca",
        "bca / dense",
    ]
    md = (
        f"# Forward of one block circulant adapter (float32, {args.threads} threads, "
        f"median of {repeats} interleaved samples)\n\n"
        "bca rust: `bca.BlockCirculant.matmul` (spectra cached). torch rfft: torch.fft with "
        "cached spectra and a per-frequency bmm. PEFT C3A: `BlockCircularConvolution.apply(x, w) "
        "/ d`, the adapter term of PEFT's C3ALinear. dense: `F.linear` with a d×d weight (the "
        "base layer). Ratios > 1× mean bca is faster.\n\n"
        + markdown_table(header, table)
        + f"\nLoad average (1, 5, 15 min) before: {load_before}; after: {_load()}.\n"
    )
    payload = {
        "bench": "core_forward",
        "threads": args.threads,
        "repeats": repeats,
        "torch": torch.__version__,
        "machine": machine_info(),
        "records": records,
    }
    stem = "core_forward_quick" if args.quick else "core_forward"
    if args.threads != 2:
        stem += f"_{args.threads}thread"
    write_results(stem, payload, md, args.out)
    _plot(records, args.out / f"{stem}.png")
    print(md)
    return 0


def _load() -> str:
    try:
        return ", ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "unknown"


def _plot(records: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    labels = [f"d={r['d']}\nN={r['rows']}\np={r['block_size']}" for r in records]
    t = {
        k: [r["timings"][k]["median_s"] * 1e3 for r in records]
        for k in ("bca_rust", "torch_rfft", "peft_c3a", "dense")
    }
    xs = np.arange(len(records))
    fig, ax = plt.subplots(figsize=(max(8, len(records) * 0.7), 4.5))
    width = 0.2
    for i, (k, label) in enumerate(
        [
            ("bca_rust", "bca (Rust)"),
            ("torch_rfft", "torch rfft"),
            ("peft_c3a", "PEFT C3A"),
            ("dense", "dense layer"),
        ]
    ):
        ax.bar(xs + (i - 1.5) * width, t[k], width, label=label)
    ax.set_yscale("log")
    ax.set_ylabel("forward time per call (ms, log)")
    ax.set_xticks(xs, labels, fontsize=7)
    ax.legend()
    ax.set_title("Block circulant adapter forward, float32")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
