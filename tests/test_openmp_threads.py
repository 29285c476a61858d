"""The core's parallel loops on torch's OpenMP team (rust/src/openmp.rs).

With torch imported (OpenMP backend, Linux), ``bca.nn`` runs the core's tasks on torch's
libgomp team instead of bca's rayon threads, so that bca's work does not compete with
torch's spinning OpenMP workers. These tests check that it is used, that results are the
same bits as on rayon, and that fork, threads and ``BCA_OPENMP=0`` behave.
"""

from __future__ import annotations

import sys
import threading

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import bca  # noqa: E402
from bca.nn import BlockCirculantLinear  # noqa: E402
from bca.nn.functional import _rust_core, _torch_openmp_library  # noqa: E402
from test_core_resources import run_child  # noqa: E402

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only"),
    pytest.mark.skipif(_rust_core() is None, reason="needs the Rust extension"),
    pytest.mark.skipif(
        _torch_openmp_library() is None, reason="torch without a loaded OpenMP runtime"
    ),
]

_core = bca._bca


def _results(threads: int = 2) -> list[np.ndarray]:
    """Forward, both gradients and a mixed batch on several shapes, `threads` threads."""
    rng = np.random.default_rng(3)
    out = []
    for d_in, d_out, p, n in [(768, 768, 256, 200), (512, 384, 64, 97), (1024, 1024, 1024, 64)]:
        kernel = rng.standard_normal((-(-d_out // p), -(-d_in // p), p)).astype(np.float32)
        op = bca.BlockCirculant(kernel, d_in, d_out, num_threads=threads)
        x = rng.standard_normal((n, d_in)).astype(np.float32)
        g = rng.standard_normal((n, d_out)).astype(np.float32)
        gx, gk = op.backward(x, g)
        ops = [op, bca.BlockCirculant(kernel * 0.5, d_in, d_out, num_threads=threads)]
        index = rng.integers(-1, 2, size=n)
        out += [op.matmul(x), gx, gk, bca.mixed_matmul(ops, index, x)]
        out += [a for a in bca.mixed_matmul_backward(ops, index, x, g)[1]]
    return out


def test_torch_team_is_used_and_gives_rayons_bits() -> None:
    assert _core._openmp_in_use(), "bca.nn did not attach torch's OpenMP runtime"
    on_team = _results()
    _core._detach_openmp()
    try:
        assert not _core._openmp_in_use()
        on_rayon = _results()
    finally:
        assert _core._attach_openmp(_torch_openmp_library())
    assert len(on_team) == len(on_rayon)
    for a, b in zip(on_team, on_rayon, strict=True):
        np.testing.assert_array_equal(a, b)


def test_no_rayon_workers_start_while_the_team_is_used() -> None:
    out = run_child(
        """
        import numpy as np, torch, bca
        from pathlib import Path
        import bca.nn.functional as F
        F._rust_core()
        assert bca._bca._openmp_in_use()
        rng = np.random.default_rng(0)
        op = bca.BlockCirculant(rng.standard_normal((4, 4, 256)).astype(np.float32), num_threads=2)
        x = rng.standard_normal((512, 1024)).astype(np.float32)
        op.matmul(x); op.backward(x, x)
        names = [c.read_text().strip() for c in Path("/proc/self/task").glob("*/comm")]
        print(sum(n.startswith("bca-worker") for n in names))
        """
    )
    assert out.strip() == "0", f"{out.strip()} rayon workers were started"


def test_bca_openmp_0_keeps_bcas_own_threads() -> None:
    out = run_child(
        """
        import os
        os.environ["BCA_OPENMP"] = "0"
        import torch, bca
        import bca.nn.functional as F
        F._rust_core()
        print(bca._bca._openmp_in_use())
        """
    )
    assert out.strip() == "False"


def test_a_forked_child_runs_on_rayon_and_does_not_hang() -> None:
    # libgomp's team does not survive fork; the child must not use it (pid check).
    out = run_child(
        """
        import os, numpy as np, torch, bca
        import bca.nn.functional as F
        F._rust_core()
        rng = np.random.default_rng(0)
        op = bca.BlockCirculant(rng.standard_normal((4, 4, 256)).astype(np.float32), num_threads=2)
        x = rng.standard_normal((512, 1024)).astype(np.float32)
        want = op.matmul(x)  # the parent's team is now up
        pid = os.fork()
        if pid == 0:
            ok = bool(np.array_equal(op.matmul(x), want)) and not bca._bca._openmp_in_use()
            os._exit(0 if ok else 3)
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status), bca._bca._openmp_in_use())
        """,
        timeout=60,
    )
    assert out.split() == ["0", "True"], out


def test_python_threads_calling_at_once_get_their_own_results() -> None:
    torch.manual_seed(0)
    layer = BlockCirculantLinear(torch.nn.Linear(768, 768), 256, backend="rust")
    with torch.no_grad():
        layer.bca_kernel.normal_()
    xs = [torch.randn(256, 768) for _ in range(4)]
    with torch.no_grad():
        wants = [layer.adapter_forward(x) for x in xs]
    errors: list[str] = []

    def worker(i: int) -> None:
        for _ in range(20):
            with torch.no_grad():
                y = layer.adapter_forward(xs[i])
            if not torch.equal(y, wants[i]):
                errors.append(f"thread {i}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not errors, errors[:3]


def test_errors_and_nonfinite_rows_are_reported_from_the_team() -> None:
    rng = np.random.default_rng(1)
    op = bca.BlockCirculant(rng.standard_normal((4, 4, 64)).astype(np.float32), num_threads=2)
    x = rng.standard_normal((512, 256)).astype(np.float32)
    x[300, 7] = np.nan
    assert _core._openmp_in_use()
    with pytest.raises(bca.NonFiniteError, match="x"):
        op.matmul(x)
    with pytest.raises(bca.NonFiniteError):
        op.backward(x, x)
    assert np.isfinite(op.matmul(np.nan_to_num(x))).all()  # the team still works


def test_idle_workspaces_stay_bounded_on_the_team() -> None:
    # Tasks of one call start together on the team; each one that found the workspace
    # cache's lock taken used to make a fresh workspace, which the cache then kept: after
    # 30 training steps at d = 4096 an operator held 26 MiB of idle workspaces (it grew
    # with every step, up to 64 workspaces). Spinning OpenMP threads (the default wait
    # policy, not the tests' PASSIVE) start the tasks at the same moment.
    out = run_child(
        """
        import os
        os.environ.pop("OMP_WAIT_POLICY", None)
        import torch, bca
        from bca.nn import BlockCirculantLinear
        torch.set_num_threads(2)
        bca.set_num_threads(2)
        torch.manual_seed(0)
        layer = BlockCirculantLinear(torch.nn.Linear(4096, 4096), 256, backend="rust")
        x = torch.randn(512, 4096, requires_grad=True)
        g = torch.randn(512, 4096)
        for _ in range(30):
            x.grad = None
            layer.adapter_forward(x).backward(g)
        assert bca._bca._openmp_in_use()
        print(layer._adapters[layer.current_adapter].rust_op.retained_bytes / 2**20)
        """
    )
    held_mib = float(out.strip())
    assert held_mib < 8.0, f"the operator keeps {held_mib:.1f} MiB"
