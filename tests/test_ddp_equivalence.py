"""Training under DistributedDataParallel (2 processes, gloo, CPU) gives the same kernels
as one process on the same global batch, for every bca backend.

Each rank sees half of every global batch and the loss is the mean over its rows; DDP
averages gradients over ranks, so with equal halves the averaged gradient is the
gradient of the global mean loss. Rank 1 starts from different kernels and runs a
forward pass before DDP is built: DDP's initial broadcast must reach the kernels the
backends actually use (a stale cached spectrum/operator would show up as a mismatch).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")

from bca.nn import BlockCirculantLinear, rust_available  # noqa: E402

if not dist.is_available() or not dist.is_gloo_available():  # pragma: no cover
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

BACKENDS = ["torch"] + (["rust"] if rust_available() else [])
GLOBAL_BATCH = 8
STEPS = 4
D_IN, D_HID, D_OUT = 24, 20, 6  # 20 = padded at p = 8 and p = 6


def build(backend: str, dtype: torch.dtype, kernel_seed: int) -> torch.nn.Module:
    torch.manual_seed(0)  # the frozen base weights: identical everywhere
    model = torch.nn.Sequential(
        torch.nn.Linear(D_IN, D_HID, dtype=dtype),
        torch.nn.Tanh(),
        torch.nn.Linear(D_HID, D_OUT, dtype=dtype),
    )
    model[0] = BlockCirculantLinear(model[0], block_size=8, backend=backend, scale=0.5)
    model[2] = BlockCirculantLinear(model[2], block_size=6, backend=backend)
    g = torch.Generator().manual_seed(kernel_seed)
    with torch.no_grad():
        for m in (model[0], model[2]):
            m.bca_kernel.copy_(0.1 * torch.randn(m.bca_kernel.shape, generator=g, dtype=dtype))
    return model


def data(dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(42)
    return [
        (
            torch.randn(GLOBAL_BATCH, D_IN, generator=g, dtype=dtype),
            torch.randn(GLOBAL_BATCH, D_OUT, generator=g, dtype=dtype),
        )
        for _ in range(STEPS)
    ]


def train(model: torch.nn.Module, batches, rank: int = 0, world: int = 1) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.3, momentum=0.9)
    rows = GLOBAL_BATCH // world
    for x, y in batches:
        xs, ys = x[rank * rows : (rank + 1) * rows], y[rank * rows : (rank + 1) * rows]
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(xs), ys)
        loss.backward()
        opt.step()


def kernels(model: torch.nn.Module) -> list[np.ndarray]:
    mods = [m for m in model.modules() if isinstance(m, BlockCirculantLinear)]
    return [m.bca_kernel.detach().numpy().copy() for m in mods]


def _worker(rank: int, world: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    # A file store, not rank 0's TCP store: a TCP store went away with rank 0 while rank 1
    # was still leaving the group, and rank 1 then aborted inside torch now and then
    # ("terminate called without an active exception").
    store = f"file://{Path(out_dir) / 'store'}"
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=world)
    try:
        for backend in BACKENDS:
            for dtype in (torch.float64, torch.float32):
                model = build(backend, dtype, kernel_seed=1 + rank)  # rank 1 differs
                with torch.no_grad():  # fills any kernel cache before DDP's broadcast
                    model.eval()(torch.zeros(2, D_IN, dtype=dtype))
                model.train()
                ddp = torch.nn.parallel.DistributedDataParallel(model)
                train(ddp, data(dtype), rank, world)
                if rank == 0:
                    name = f"{backend}_{str(dtype).removeprefix('torch.')}.npz"
                    np.savez(Path(out_dir) / name, *kernels(model))
                del ddp
        dist.barrier()  # both ranks leave the group together
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_equal_one_process(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    torch.set_num_threads(1)
    for backend in BACKENDS:
        for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 2e-6)):
            model = build(backend, dtype, kernel_seed=1)
            before = kernels(model)
            train(model, data(dtype))
            want = kernels(model)
            name = f"{backend}_{str(dtype).removeprefix('torch.')}.npz"
            with np.load(tmp_path / name) as f:
                got = [f[k] for k in sorted(f.files, key=lambda s: int(s.split("_")[1]))]
            assert len(got) == len(want) == 2
            for g, w, b in zip(got, want, before, strict=True):
                assert np.linalg.norm(w - b) > 1e-3  # training moved the kernels
                err = np.linalg.norm(g - w) / np.linalg.norm(w)
                assert err < tol, f"{backend} {dtype}: DDP kernels differ by {err:.3g}"
