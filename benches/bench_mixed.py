"""Mixed-adapter batches: one forward in which every row uses its own adapter.

A batch of 32 rows over 8 adapters (4 rows each, interleaved), float32, inference
(no_grad), side by side in one run with the same thread count:

* bca core: ``bca.mixed_matmul`` over 8 operators vs one operator's ``matmul`` on the
  same 32 rows (target: mixed ≤ 1.2× one adapter);
* bca layer (``BlockCirculantLinear``, backend "rust" and "torch"): ``layer(x,
  adapter_names=names)`` vs the same layer with one active adapter; and a third layer
  (backend "rust") inside ``bca.model.trusted_adapters``, which skips the per-call
  kernel check (the serving mode);
* PEFT LoRA (r = 8, 8 adapters on the same ``nn.Linear`` in a ``Sequential``):
  ``model(x, adapter_names=names)``, PEFT's mixed-batch path (target: bca ≥ 5× faster);
* the base ``nn.Linear`` alone, and the base followed by one ``bca.mixed_matmul(...,
  add=base_output)`` (the layer's path without its kernel check and Python);
* the adapters' own share, measured directly: the same bca layers (checked and trusted)
  and PEFT model over a base whose forward costs next to nothing (zeros of the output's
  shape), so that at d = 4096 a 1–2 ms share is not the difference of two 15 ms times;
  beside them the bare core call ``bca.mixed_matmul``, the floor of the layer's path.

    python benches/bench_mixed.py              # d = 768, 4096; p = 64, 256
    python benches/bench_mixed.py --quick      # d = 768 only, few repeats

Writes benches/results/mixed.{json,md,png}. The load average (``uptime``) is recorded
before and after: these machines are shared, compare the ratios.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import (
    machine_info,
    markdown_table,
    pin_threads,
    time_interleaved,
    time_rounds,
    write_results,
)

N_ROWS = 32
N_ADAPTERS = 8


def _free_linear(d: int):
    """An ``nn.Linear`` (for PEFT's and bca's type checks) whose forward returns zeros of
    the output's shape: a layer over it costs its adapters' share alone."""
    from torch import nn

    class FreeLinear(nn.Linear):
        def forward(self, x):  # type: ignore[override]
            return x.new_zeros((*x.shape[:-1], self.out_features))

    return FreeLinear(d, d)


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "?"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=60)
    ap.add_argument("--quick", action="store_true", help="d = 768 only, few repeats")
    ap.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall: median wall time of interleaved repeats; cpu: median process CPU time "
        "(rotating order), robust to waiting for a core on a loaded machine (use 1 thread)",
    )
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args(argv)

    pin_threads(args.threads)
    import torch
    from peft import LoraConfig, get_peft_model
    from torch import nn

    import bca
    from bca.model import trusted_adapters
    from bca.nn import BlockCirculantLinear, rust_available

    rust_available()  # the core on torch's OpenMP threads, as in any torch program

    load_before = uptime()
    started = time.time()
    dims = [768] if args.quick else [768, 4096]
    repeats = 5 if args.quick else args.repeats
    names = [f"a{b % N_ADAPTERS}" for b in range(N_ROWS)]
    index = np.array([b % N_ADAPTERS for b in range(N_ROWS)], np.int64)
    rng = np.random.default_rng(0)
    records = []
    for d in dims:
        torch.manual_seed(0)
        base = nn.Linear(d, d)
        x = torch.randn(N_ROWS, d)
        x_np = x.numpy()
        free = _free_linear(d)
        # PEFT LoRA, 8 adapters (the same weights) on the base layer and on the free base
        loras = []
        for b in (base, free):
            torch.manual_seed(1)
            lora = get_peft_model(
                nn.Sequential(nn.Linear(d, d)).requires_grad_(False),
                LoraConfig(r=8, target_modules=["0"], init_lora_weights=False),
                adapter_name="a0",
            )
            for a in range(1, N_ADAPTERS):
                lora.add_adapter(
                    f"a{a}", LoraConfig(r=8, target_modules=["0"], init_lora_weights=False)
                )
            lora.base_model.model[0].base_layer = b
            loras.append(lora.eval())
        lora, lora_free = loras
        for p in (64, 256):
            q = d // p
            kernels = [
                (rng.standard_normal((q, q, p)) / d).astype(np.float32) for _ in range(N_ADAPTERS)
            ]
            ops = [bca.BlockCirculant(k) for k in kernels]
            layers = {}
            for key in ("rust", "torch", "rust trusted", "free", "free trusted"):
                layer = BlockCirculantLinear(
                    free if key.startswith("free") else base,
                    p,
                    backend="torch" if key == "torch" else "rust",
                    adapter_name="a0",
                )
                for a in range(1, N_ADAPTERS):
                    layer.add_adapter(f"a{a}", p)
                with torch.no_grad():
                    for a in range(N_ADAPTERS):
                        layer.bca_kernels[f"a{a}"].copy_(torch.from_numpy(kernels[a]))
                layers[key] = layer.eval()
            contenders = _contenders(bca, ops, index, x_np, layers, x, names, lora, lora_free, base)
            with (
                torch.no_grad(),
                trusted_adapters(layers["rust trusted"]),
                trusted_adapters(layers["free trusted"]),
            ):
                # the mixed paths agree with one another
                want = bca.mixed_matmul(ops, index, x_np)
                got = layers["rust"](x, adapter_names=names) - base(x)
                assert np.allclose(got.numpy(), want, rtol=1e-3, atol=1e-4)
                got = layers["torch"](x, adapter_names=names) - base(x)
                assert np.allclose(got.numpy(), want, rtol=1e-3, atol=1e-4)
                for key in ("free", "free trusted"):  # the adapters' share alone
                    got = layers[key](x, adapter_names=names)
                    assert np.allclose(got.numpy(), want, rtol=1e-3, atol=1e-4)
                lora_share = lora(x, adapter_names=names) - base(x)
                got = lora_free(x, adapter_names=names)
                assert np.allclose(got.numpy(), lora_share.numpy(), rtol=1e-3, atol=1e-4)
                trusted = layers["rust trusted"]  # bit for bit the checked layer
                for _ in range(2):  # the first call takes the kernels, the second trusts
                    assert torch.equal(
                        trusted(x, adapter_names=names), layers["rust"](x, adapter_names=names)
                    )
                    assert torch.equal(trusted(x), layers["rust"](x))
                t = _measure(contenders, repeats, args.clock)
            ms = {k: v["median_s"] * 1e3 for k, v in t.items()}
            peft_share = ms["adapters only: PEFT LoRA mixed"]
            records.append(
                dict(
                    d=d,
                    p=p,
                    rows=N_ROWS,
                    adapters=N_ADAPTERS,
                    ms=ms,
                    iqr_ms={k: v["iqr_s"] * 1e3 for k, v in t.items()},
                    ratios={
                        "core: mixed / one adapter": ms["core mixed"] / ms["core one adapter"],
                        "layer rust: mixed / one adapter": ms["layer mixed (rust)"]
                        / ms["layer one adapter (rust)"],
                        "layer torch: mixed / one adapter": ms["layer mixed (torch)"]
                        / ms["layer one adapter (torch)"],
                        "layer rust trusted: mixed / one adapter": ms["layer mixed (rust, trusted)"]
                        / ms["layer one adapter (rust, trusted)"],
                        "layer: PEFT LoRA mixed / bca mixed (rust)": ms["PEFT LoRA mixed"]
                        / ms["layer mixed (rust)"],
                        "layer: PEFT LoRA mixed / bca mixed (rust, trusted)": ms["PEFT LoRA mixed"]
                        / ms["layer mixed (rust, trusted)"],
                        "adapters only: PEFT LoRA mixed / bca mixed (rust)": peft_share
                        / ms["adapters only: bca layer mixed"],
                        "adapters only: PEFT LoRA mixed / bca mixed (rust, trusted)": peft_share
                        / ms["adapters only: bca layer mixed, trusted"],
                        "adapters only: PEFT LoRA mixed / bare core call": peft_share
                        / ms["core mixed"],
                    },
                )
            )
            print(f"d={d} p={p}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in ms.items()))
    load_after = uptime()

    header1 = [
        "d",
        "p",
        "core mixed ms",
        "core one ms",
        "core mixed/one",
        "layer mixed (rust) ms",
        "layer rust mixed/one",
        "layer torch mixed/one",
        "layer mixed (rust, trusted) ms",
        "layer trusted mixed/one",
    ]
    header2 = [
        "d",
        "p",
        "PEFT LoRA mixed ms",
        "base ms",
        "PEFT / bca (layer)",
        "PEFT / bca trusted (layer)",
        "PEFT adapters only ms",
        "bca adapters only ms",
        "bca trusted adapters only ms",
        "PEFT / bca (adapters only)",
        "PEFT / bca trusted (adapters only)",
        "PEFT / bare core call (adapters only)",
    ]
    rows1, rows2 = [], []
    for r in records:
        ms, ra = r["ms"], r["ratios"]
        rows1.append(
            [
                r["d"],
                r["p"],
                f"{ms['core mixed']:.3f}",
                f"{ms['core one adapter']:.3f}",
                f"{ra['core: mixed / one adapter']:.2f}×",
                f"{ms['layer mixed (rust)']:.3f}",
                f"{ra['layer rust: mixed / one adapter']:.2f}×",
                f"{ra['layer torch: mixed / one adapter']:.2f}×",
                f"{ms['layer mixed (rust, trusted)']:.3f}",
                f"{ra['layer rust trusted: mixed / one adapter']:.2f}×",
            ]
        )
        rows2.append(
            [
                r["d"],
                r["p"],
                f"{ms['PEFT LoRA mixed']:.3f}",
                f"{ms['base nn.Linear']:.3f}",
                f"{ra['layer: PEFT LoRA mixed / bca mixed (rust)']:.2f}×",
                f"{ra['layer: PEFT LoRA mixed / bca mixed (rust, trusted)']:.2f}×",
                f"{ms['adapters only: PEFT LoRA mixed']:.3f}",
                f"{ms['adapters only: bca layer mixed']:.3f}",
                f"{ms['adapters only: bca layer mixed, trusted']:.3f}",
                f"{ra['adapters only: PEFT LoRA mixed / bca mixed (rust)']:.2f}×",
                f"{ra['adapters only: PEFT LoRA mixed / bca mixed (rust, trusted)']:.2f}×",
                f"{ra['adapters only: PEFT LoRA mixed / bare core call']:.2f}×",
            ]
        )
    md = (
        f"# Mixed-adapter batches: {N_ROWS} rows over {N_ADAPTERS} adapters (float32, "
        f"forward, no_grad, {args.threads} threads, {args.clock} clock)\n\n"
        "Medians of interleaved repeats (wall clock) or of process CPU time per call (cpu "
        "clock). *mixed/one*: the mixed batch against the same rows on one adapter (target "
        "≤ 1.2×). *trusted*: the rust layer inside `bca.model.trusted_adapters` (no "
        "per-call kernel check; edits through `.data` are not seen there).\n\n"
        + markdown_table(header1, rows1)
        + "\n*PEFT / bca*: PEFT LoRA (r = 8) mixed batch (`adapter_names=`) over bca's "
        "(target ≥ 5×), for the whole layer (the base nn.Linear included) and for the "
        "adapters alone (*adapters only*: the same layers and PEFT model over a base whose "
        "forward returns zeros, measured directly). *bare core call*: `mixed_matmul` "
        "alone, without the layer's kernel check and Python: the floor of the layer's "
        "path.\n\n"
        + markdown_table(header2, rows2)
        + f"\nShared machine; load before: `{load_before}`; after: `{load_after}`.\n"
    )
    payload = {
        "bench": "mixed",
        "threads": args.threads,
        "clock": args.clock,
        "repeats": repeats,
        "rows": N_ROWS,
        "adapters": N_ADAPTERS,
        "machine": machine_info(),
        "load_before": load_before,
        "load_after": load_after,
        "seconds": time.time() - started,
        "torch": torch.__version__,
        "records": records,
    }
    stem = "mixed_quick" if args.quick else "mixed"
    if args.clock == "cpu":
        stem += f"_{args.threads}thread_cpu"
    write_results(stem, payload, md, args.out)
    _plot(records, args.out / f"{stem}.png")
    print(md)
    return 0


def _measure(contenders: dict, repeats: int, clock: str) -> dict[str, dict[str, float]]:
    if clock == "wall":
        return time_interleaved(contenders, repeats)
    import statistics

    out = {}
    for name, r in time_rounds(contenders, repeats, min_sample_s=0.01).items():
        q = statistics.quantiles(r["cpu"], n=4) if len(r["cpu"]) >= 4 else [0.0, 0.0, 0.0]
        out[name] = {"median_s": statistics.median(r["cpu"]), "iqr_s": q[2] - q[0]}
    return out


def _contenders(bca, ops, index, x_np, layers, x, names, lora, lora_free, base) -> dict:
    rust, torch_layer, trusted = layers["rust"], layers["torch"], layers["rust trusted"]
    free, free_trusted = layers["free"], layers["free trusted"]
    return {
        "core mixed": lambda: bca.mixed_matmul(ops, index, x_np),
        "core one adapter": lambda: ops[0].matmul(x_np),
        "layer mixed (rust)": lambda: rust(x, adapter_names=names),
        "layer one adapter (rust)": lambda: rust(x),
        "layer mixed (torch)": lambda: torch_layer(x, adapter_names=names),
        "layer one adapter (torch)": lambda: torch_layer(x),
        "layer mixed (rust, trusted)": lambda: trusted(x, adapter_names=names),
        "layer one adapter (rust, trusted)": lambda: trusted(x),
        "PEFT LoRA mixed": lambda: lora(x, adapter_names=names),
        "base nn.Linear": lambda: base(x),
        # the floor of the layer's path: the base layer, then one core call adding its
        # output, with no kernel check and no Python around it
        "base + core mixed (add=)": lambda: bca.mixed_matmul(
            ops, index, x_np, add=base(x).detach().numpy()
        ),
        # the adapters' share alone: the same layers and PEFT model over a free base
        "adapters only: bca layer mixed": lambda: free(x, adapter_names=names),
        "adapters only: bca layer mixed, trusted": lambda: free_trusted(x, adapter_names=names),
        "adapters only: PEFT LoRA mixed": lambda: lora_free(x, adapter_names=names),
    }


def _plot(records: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    keys = [
        "core: mixed / one adapter",
        "layer rust: mixed / one adapter",
        "layer torch: mixed / one adapter",
        "layer: PEFT LoRA mixed / bca mixed (rust)",
        "adapters only: PEFT LoRA mixed / bca mixed (rust)",
        "adapters only: PEFT LoRA mixed / bca mixed (rust, trusted)",
    ]
    labels = [f"d={r['d']}\np={r['p']}" for r in records]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(keys)
    for i, k in enumerate(keys):
        xs = [j + (i - len(keys) / 2 + 0.5) * width for j in range(len(records))]
        ax.bar(xs, [r["ratios"][k] for r in records], width, label=k)
    ax.axhline(1.2, color="grey", ls="--", lw=0.8)
    ax.axhline(5.0, color="grey", ls=":", lw=0.8)
    ax.set_yscale("log")
    ax.set_xticks(range(len(records)), labels)
    ax.set_ylabel("time ratio (log)")
    ax.set_title(
        f"Mixed batch of {N_ROWS} rows over {N_ADAPTERS} adapters (dashed 1.2×, dotted 5×)"
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
