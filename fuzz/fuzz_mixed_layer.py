#!/usr/bin/env python3
"""Fuzz the torch layer's mixed-adapter batches through random sequences of edits.

``BlockCirculantLinear(x, adapter_names=...)`` caches a plan per list of names and, on
the Rust backend without gradients, reads each kernel through a numpy view kept from
the last call; the core compares it with the operator's copy. A plain ``layer(x)`` with
one live adapter takes the same one-call path. This harness drives one
layer through random sequences of what a program does between calls, and checks every
mixed forward against a float64 dense oracle built from the kernels as they are now:

- kernel edits: in place under ``no_grad``, through ``.data``, through a numpy view,
  new storage under the parameter (``param.data = ...``), a new parameter, an
  optimizer step;
- adapters: added (other block sizes too), deleted, re-added under the same name,
  scales changed, ``clear_cache``, the backend switched, merge/unmerge (a mixed batch
  of a merged layer must raise);
- calls: no_grad (the one-call path), grad enabled (the autograd path, checked against
  the no_grad result bit for bit), 2-D and 3-D inputs, empty batches, ``"__base__"``
  rows, unknown and non-str names (must raise TypeError/ValueError naming them);
- trusted kernels: ``bca.model.trusted_adapters`` blocks entered and left (nested).
  Inside, an adapter edited through ``.data`` or a numpy view is *blind* (its rows are
  not checked: the documented price) until an edit its version counter sees, a new
  tensor, ``clear_cache`` or the end of the last block; every other row is checked.

    python fuzz/fuzz_mixed_layer.py --iterations 20000 --seed 1

Ends with ``steps: N, calls: C, failures: F`` and exits 1 when F > 0; a failure prints
its seed and step so that ``--seed S --replay-step K`` repeats the sequence up to it.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback

import numpy as np
import torch

from bca.model import trusted_adapters
from bca.nn import BASE_ADAPTER, BlockCirculantLinear, rust_available

TOL = {torch.float32: 2e-5, torch.float64: 1e-11}


def dense(kernel: np.ndarray, d_in: int, d_out: int) -> np.ndarray:
    """ΔW (d_out × d_in) in float64 from the definition (padded blocks cut)."""
    q_out, q_in, p = kernel.shape
    k = kernel.astype(np.float64)
    r = np.arange(p)
    idx = (r[:, None] - r[None, :]) % p
    full = k[:, :, idx].transpose(0, 2, 1, 3).reshape(q_out * p, q_in * p)
    return full[:d_out, :d_in]


class Failure(Exception):
    pass


class Run:
    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.calls = 0
        dtype = torch.float32 if self.rng.random() < 0.7 else torch.float64
        d_in, d_out = int(self.rng.integers(1, 40)), int(self.rng.integers(1, 40))
        torch.manual_seed(seed)
        base = torch.nn.Linear(d_in, d_out).to(dtype)
        self.dtype = dtype
        self.layer = BlockCirculantLinear(
            base,
            self.block_size(),
            init="xavier_uniform",
            backend="rust" if self.rng.random() < 0.8 else "auto",
            adapter_name="a0",
        )
        self.counter = 1
        self.opt = torch.optim.SGD(self.layer.parameters(), lr=0.01)
        self.trust_blocks: list = []  # open trusted_adapters blocks, innermost last
        self.blind: set[str] = set()  # adapters whose edits a trusted cache may miss

    def close(self) -> None:
        while self.trust_blocks:
            self.trust_blocks.pop().__exit__(None, None, None)

    def seen(self, name: str | None = None) -> None:
        """An edit that every cache sees (of ``name``, or of every adapter)."""
        if name is None:
            self.blind.clear()
        else:
            self.blind.discard(name)

    def unseen(self, name: str) -> None:
        """An edit through ``.data`` or numpy: a trusted cache may miss it."""
        if self.trust_blocks:
            self.blind.add(name)

    def block_size(self) -> int:
        return int(self.rng.choice([1, 2, 3, 4, 5, 7, 8, 13, 16]))

    def names(self) -> list[str]:
        return self.layer.adapter_names

    # -- the edits ----------------------------------------------------------------------
    def edit(self) -> str:
        lay, rng = self.layer, self.rng
        names = self.names()
        n = str(rng.choice(names)) if names else None
        r = rng.random()
        if r < 0.06:
            if self.trust_blocks and rng.random() < 0.5:
                self.trust_blocks.pop().__exit__(None, None, None)
                if not self.trust_blocks:
                    self.seen()
                return "trusted block left"
            block = trusted_adapters(lay)
            block.__enter__()
            self.trust_blocks.append(block)
            return "trusted block entered"
        if r < 0.12 and n is not None:
            with torch.no_grad():
                lay.bca_kernels[n].mul_(float(rng.choice([0.5, -1.0, 2.0])))
            self.seen(n)
            return f"in-place mul {n}"
        if r < 0.24 and n is not None:
            lay.bca_kernels[n].data.add_(float(rng.standard_normal()))
            self.unseen(n)
            return f".data add {n}"
        if r < 0.32 and n is not None:
            view = lay.bca_kernels[n].detach().numpy()
            view.flat[int(rng.integers(0, view.size))] += 1.0
            self.unseen(n)
            return f"numpy view edit {n}"
        if r < 0.42 and n is not None:
            k = lay.bca_kernels[n]
            lay.bca_kernels[n].data = torch.randn(k.shape, dtype=k.dtype)
            self.seen(n)
            return f"new storage {n}"
        if r < 0.48 and n is not None:
            self.seen(n)
            k = lay.bca_kernels[n]
            new = torch.randn(k.shape, dtype=k.dtype)
            if rng.random() < 0.3:  # a non-contiguous kernel of the same shape
                new = torch.randn(tuple(reversed(k.shape)), dtype=k.dtype).permute(2, 1, 0)
            lay.bca_kernels[n] = torch.nn.Parameter(new)
            self.opt = torch.optim.SGD(lay.parameters(), lr=0.01)
            return f"new parameter {n}"
        if r < 0.56 and len(names) < 6:
            name = f"a{self.counter}"
            self.counter += 1
            lay.add_adapter(name, self.block_size(), scale=float(rng.choice([1.0, 0.5, -2.0])),
                            init="xavier_uniform")  # fmt: skip
            self.opt = torch.optim.SGD(lay.parameters(), lr=0.01)
            return f"add {name}"
        if r < 0.62 and n is not None and len(names) > 1:
            self.seen(n)
            lay.delete_adapter(n)
            if rng.random() < 0.5:  # re-added under the same name: a new state
                lay.add_adapter(n, self.block_size(), init="xavier_uniform")
            self.opt = torch.optim.SGD(lay.parameters(), lr=0.01)
            return f"delete {n}"
        if r < 0.68 and n is not None:
            lay.set_adapter_scale(n, float(rng.choice([1.0, 0.25, -3.0, 0.0])))
            return f"scale {n}"
        if r < 0.73:
            lay.clear_cache()
            self.seen()
            return "clear_cache"
        if r < 0.77:
            lay.backend = str(rng.choice(["rust", "auto", "torch"]))
            return f"backend {lay.backend}"
        if r < 0.82 and names:
            x = torch.randn(3, lay.in_features, dtype=self.dtype)
            lay.set_adapter(names[0])
            self.opt.zero_grad()
            lay(x).sum().backward()
            self.opt.step()
            self.seen(names[0])  # the one adapter with a gradient: stepped in place
            return "optimizer step"
        if r < 0.85 and names:
            lay.set_adapter(names[0])
            lay.merge()
            self.expect_error(lambda: self.mixed(no_grad=True), "merged")
            lay.unmerge()
            return "merge/unmerge"
        return "nothing"

    def expect_error(self, fn, what: str) -> None:
        self.calls += 1
        try:
            fn()
        except (TypeError, ValueError):
            return
        raise Failure(f"no error for {what}")

    # -- the calls ----------------------------------------------------------------------
    def draw_call(self) -> tuple[torch.Tensor, list]:
        lay, rng = self.layer, self.rng
        batch = int(rng.choice([0, 1, 2, 5, 9]))
        middle = [(), (), (3,), (1, 2)][int(rng.integers(0, 4))]
        x = torch.randn(batch, *middle, lay.in_features, dtype=self.dtype)
        pool = [*self.names(), BASE_ADAPTER]
        names: list = [str(rng.choice(pool)) for _ in range(batch)]
        return x, names

    def mixed(self, no_grad: bool, x=None, names=None) -> torch.Tensor:
        if x is None:
            x, names = self.draw_call()
        if no_grad:
            with torch.no_grad():
                return self.layer(x, adapter_names=names)
        return self.layer(x, adapter_names=names)

    def oracle(self, x: torch.Tensor, names: list[str]) -> np.ndarray:
        lay = self.layer
        w = lay.base_layer.weight.detach().double().numpy()
        b = lay.base_layer.bias.detach().double().numpy()
        x64 = x.detach().double().numpy()
        out = np.zeros((*x.shape[:-1], lay.out_features))
        for i, n in enumerate(names):
            m = w.copy()
            if n != BASE_ADAPTER:
                k = lay.bca_kernels[n].detach().numpy()
                m = m + lay.adapter_scale(n) * dense(k, lay.in_features, lay.out_features)
            out[i] = x64[i] @ m.T + b
        return out

    def plain_call(self) -> None:
        """``layer(x)`` with a random active set (one adapter: the one-call path)."""
        lay, rng = self.layer, self.rng
        pool = self.names()
        k = int(rng.choice([0, 1, 1, 1, 2])) if pool else 0
        active = [str(n) for n in rng.choice(pool, size=min(k, len(pool)), replace=False)]
        weights = [float(rng.choice([1.0, 0.5, -2.0])) for _ in active]
        lay.set_adapter(active, weights=weights)
        x, _ = self.draw_call()
        self.calls += 1
        with torch.no_grad():
            got = lay(x)
        if self.blind.intersection(active):
            return  # a trusted cache may hold the kernel as it was: not checked
        w = lay.base_layer.weight.detach().double().numpy()
        for n, wt in zip(active, weights, strict=True):
            k_n = lay.bca_kernels[n].detach().numpy()
            w = w + wt * lay.adapter_scale(n) * dense(k_n, lay.in_features, lay.out_features)
        want = x.detach().double().numpy() @ w.T + lay.base_layer.bias.detach().double().numpy()
        if got.shape != want.shape:
            raise Failure(f"plain call: shape {tuple(got.shape)}, want {want.shape}")
        if want.size:
            err = np.linalg.norm(got.double().numpy() - want) / max(np.linalg.norm(want), 1e-30)
            if not err <= TOL[self.dtype] * 10:
                raise Failure(f"plain call ({len(active)} active): relative error {err:.3g}")
        if rng.random() < 0.3 and lay.backend != "torch":
            self.calls += 1
            ref = lay(x.clone().requires_grad_(True)).detach()
            if not torch.equal(ref, got):
                raise Failure("plain call: no_grad result differs from the autograd path's")

    def call(self) -> None:
        if self.rng.random() < 0.3:
            self.plain_call()
            return
        x, names = self.draw_call()
        rng = self.rng
        if names and rng.random() < 0.05:
            bad = list(names)
            choices: list[object] = ["nope", 3, ["a0"], None]
            bad[int(rng.integers(0, len(bad)))] = choices[int(rng.integers(0, len(choices)))]
            self.expect_error(lambda: self.mixed(True, x, bad), "a bad name")
            return
        self.calls += 1
        got = self.mixed(True, x, names)
        want = self.oracle(x, names)
        if got.shape != want.shape or got.dtype != self.dtype:
            raise Failure(f"shape/dtype {tuple(got.shape)} {got.dtype}, want {want.shape}")
        keep = [i for i, n in enumerate(names) if n not in self.blind]  # see unseen
        want, got_rows = want[keep], got.double().numpy()[keep]
        if want.size:
            err = np.linalg.norm(got_rows - want) / max(np.linalg.norm(want), 1e-30)
            if not err <= TOL[self.dtype] * 10:
                raise Failure(f"relative error {err:.3g} against the dense oracle")
        if rng.random() < 0.3:  # the autograd path gives the same bits
            self.calls += 1
            ref = self.mixed(False, x.clone().requires_grad_(True), names).detach()
            if self.layer.backend != "torch" and not torch.equal(ref, got):
                raise Failure("no_grad result differs from the autograd path's")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iterations", type=int, default=5000, help="steps (an edit or a call)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps-per-run", type=int, default=60, help="steps on one layer")
    ap.add_argument("--max-seconds", type=float, default=None)
    args = ap.parse_args(argv)
    if not rust_available():
        print("the Rust extension does not import: nothing to fuzz", file=sys.stderr)
        return 2
    torch.set_num_threads(2)
    started = time.monotonic()
    steps = calls = failures = 0
    run_index = 0
    while steps < args.iterations:
        if args.max_seconds is not None and time.monotonic() - started > args.max_seconds:
            break
        seed = args.seed * 1_000_003 + run_index
        run_index += 1
        run = Run(seed)
        log: list[str] = []
        for k in range(args.steps_per_run):
            steps += 1
            try:
                if run.rng.random() < 0.5:
                    log.append(run.edit())
                else:
                    run.call()
                    log.append("call")
            except Failure as exc:
                failures += 1
                print(f"FAILURE (run seed {seed}, step {k}): {exc}")
                print("  steps: " + ", ".join(log[-12:]))
                break
            except BaseException as exc:  # anything else is a failure too (panics included)
                if isinstance(exc, KeyboardInterrupt | SystemExit):
                    raise
                failures += 1
                print(f"FAILURE (run seed {seed}, step {k}): unexpected exception")
                print("  steps: " + ", ".join(log[-12:]))
                traceback.print_exc(limit=4)
                break
        run.close()
        calls += run.calls
    print(f"steps: {steps}, calls: {calls}, failures: {failures}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
