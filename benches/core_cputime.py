"""CPU time of the core's forward and backward on one thread (or wall time on several).

    python benches/core_cputime.py 1                      # default cases, 1 thread
    python benches/core_cputime.py 2 4096/256,768/768     # d/p cases, 2 threads (wall)

Minimum of 25 calls each, float32, 512 rows. To compare two builds, run it alternately
with ``PYTHONPATH`` pointing at each build's ``python/`` folder, as for
benches/results/core_old_vs_new.md.
"""

from __future__ import annotations

import sys
import time

import numpy as np

import bca

CASES = [(4096, 256), (4096, 64), (4096, 4096), (768, 64), (768, 256), (768, 768)]


def main(argv: list[str]) -> int:
    threads = int(argv[0]) if argv else 1
    cases = [tuple(map(int, c.split("/"))) for c in argv[1].split(",")] if len(argv) > 1 else CASES
    rows = 512
    rng = np.random.default_rng(0)
    clock = time.thread_time_ns if threads == 1 else time.perf_counter_ns
    for d, p in cases:
        q = d // p
        op = bca.BlockCirculant((rng.standard_normal((q, q, p)) / d).astype(np.float32))
        op.num_threads = threads
        x = rng.standard_normal((rows, d)).astype(np.float32)
        g = rng.standard_normal((rows, d)).astype(np.float32)

        def best(fn) -> float:
            t = min(_timed(fn, clock) for _ in range(25))
            return t / 1e6

        fwd = best(lambda op=op, x=x: op.matmul(x))
        bwd = best(lambda op=op, x=x, g=g: op.backward(x, g))
        print(f"d={d} p={p} thr={threads} fwd {fwd:.3f} ms  bwd {bwd:.3f} ms", flush=True)
    return 0


def _timed(fn, clock) -> int:
    t0 = clock()
    fn()
    return clock() - t0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
