"""PEFT C3A <-> bca kernel mapping against PEFT's own forward and a float64 dense oracle,
and conversion of saved adapter directories."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.linalg import circulant

from conftest import tiny_model

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft.tuners.c3a.utils import BlockCircularConvolution  # noqa: E402

from bca.peft_interop import (  # noqa: E402
    bca_adapter_dir_to_c3a,
    bca_kernel_to_c3a,
    c3a_adapter_dir_to_bca,
    c3a_kernel_to_bca,
)


def dense_from_bca(c: np.ndarray) -> np.ndarray:
    """ΔW with block (i, j) = circulant(c[i, j]) (first column c[i, j])."""
    q_out, q_in, _ = c.shape
    return np.block([[circulant(c[i, j]) for j in range(q_in)] for i in range(q_out)])


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def peft_c3a_forward(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Exactly what C3ALinear.forward adds to the base output."""
    return BlockCircularConvolution.apply(x, w) / x.size(-1)


shapes = st.tuples(
    st.integers(1, 4),  # q_out
    st.integers(1, 4),  # q_in
    st.sampled_from([1, 2, 3, 5, 7, 8, 12, 16]),  # b: odd, prime, even, 1
    st.integers(1, 5),  # rows (PEFT 0.21's forward cannot reshape an empty batch)
)


@settings(max_examples=40, deadline=None)
@given(shapes, st.integers(0, 2**31 - 1))
def test_c3a_to_bca_equals_peft_forward_float64(shape, seed: int) -> None:
    q_out, q_in, b, rows = shape
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(q_out, q_in, b, dtype=torch.float64, generator=g)
    x = torch.randn(rows, q_in * b, dtype=torch.float64, generator=g)
    c = c3a_kernel_to_bca(w.numpy())
    assert c.shape == w.shape and c.dtype == np.float64
    dense = dense_from_bca(c)
    ours = x.numpy() @ dense.T
    theirs = peft_c3a_forward(x, w).numpy()
    assert theirs.shape == ours.shape
    assert rel(theirs, ours) < 1e-12
    # back again is the identity up to rounding of the division by in_features
    back = bca_kernel_to_c3a(c)
    np.testing.assert_allclose(back, w.numpy(), rtol=1e-14, atol=0)


@settings(max_examples=20, deadline=None)
@given(shapes, st.floats(0.25, 4.0), st.integers(0, 2**31 - 1))
def test_bca_to_c3a_with_scale_float32(shape, scale: float, seed: int) -> None:
    q_out, q_in, b, rows = shape
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((q_out, q_in, b)).astype(np.float32)
    x = rng.standard_normal((rows, q_in * b)).astype(np.float32)
    w = bca_kernel_to_c3a(c, scale=scale)
    assert w.dtype == np.float32
    want = x.astype(np.float64) @ (scale * dense_from_bca(c.astype(np.float64))).T
    got = peft_c3a_forward(torch.from_numpy(x), torch.from_numpy(w)).numpy()
    assert rel(got, want) < 1e-5


def test_torch_kernels_differentiable_and_typed() -> None:
    w = torch.randn(2, 3, 4, dtype=torch.float32, requires_grad=True)
    c = c3a_kernel_to_bca(w)
    assert isinstance(c, torch.Tensor) and c.dtype == torch.float32
    c.sum().backward()
    torch.testing.assert_close(w.grad, torch.full_like(w, 1 / 12))
    back = bca_kernel_to_c3a(c.detach(), scale=2.0)
    torch.testing.assert_close(back, 2 * w.detach())
    # explicit index check: c[n] = w[(-n) mod b] / in
    wn = np.arange(5, dtype=np.float64).reshape(1, 1, 5)
    np.testing.assert_array_equal(c3a_kernel_to_bca(wn, 5)[0, 0] * 5, [0, 4, 3, 2, 1])


def test_kernel_errors() -> None:
    with pytest.raises(ValueError, match="kernel must have shape"):
        c3a_kernel_to_bca(np.zeros((2, 3)))
    with pytest.raises(TypeError, match="kernel must be a numpy array"):
        c3a_kernel_to_bca([[[1.0]]])
    with pytest.raises(TypeError, match="floating point"):
        c3a_kernel_to_bca(np.zeros((1, 1, 2), dtype=np.int64))
    with pytest.raises(ValueError, match="in_features=5"):
        bca_kernel_to_c3a(np.zeros((1, 2, 4)), in_features=5)  # a padded adapter
    with pytest.raises(ValueError, match="scale"):
        bca_kernel_to_c3a(np.zeros((1, 1, 4)), scale=float("nan"))


# --------------------------------------------------------------------------- directories


def tiny_classifier() -> torch.nn.Module:
    return tiny_model(
        "roberta",
        "classifier",
        hidden_size=64,
        num_attention_heads=4,
        intermediate_size=96,
        max_position_embeddings=40,
        num_labels=3,
    )


def make_peft_c3a(tmp_path: Path) -> tuple[Path, torch.Tensor, torch.Tensor]:
    """A trained-looking PEFT C3A adapter on q and v (one v with its own block size) plus
    a classifier head, saved with save_pretrained. Returns the dir, input ids, logits."""
    base = tiny_classifier()
    config = peft.C3AConfig(
        block_size=16,
        target_modules=["query", "value"],
        block_size_pattern={"layer.1.attention.self.value": 32},
        init_weights="gaussian",
        task_type="SEQ_CLS",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(base, config).eval()
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "classifier" in name and "modules_to_save" in name:
                p.add_(0.1 * torch.randn_like(p))
    ids = torch.randint(0, 97, (3, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = pm(input_ids=ids).logits
    out = tmp_path / "peft_c3a"
    pm.save_pretrained(str(out))
    return out, ids, logits


def test_c3a_dir_round_trip(tmp_path: Path) -> None:
    peft_dir, ids, logits = make_peft_c3a(tmp_path)
    bca_dir = c3a_adapter_dir_to_bca(peft_dir, tmp_path / "bca", base_model=tiny_classifier())
    cfg = json.loads((bca_dir / "adapter_config.json").read_text())
    assert cfg["format"] == "bca" and cfg["format_version"] == 1
    assert cfg["modules_to_save"] == ["classifier"]
    mods = cfg["modules"]
    assert set(mods) == {
        f"roberta.encoder.layer.{i}.attention.self.{m}" for i in (0, 1) for m in ("query", "value")
    }
    assert mods["roberta.encoder.layer.1.attention.self.value"]["block_size"] == 32
    assert mods["roberta.encoder.layer.0.attention.self.value"]["block_size"] == 16
    assert cfg["base_model"]["class"] == "RobertaForSequenceClassification"

    from safetensors.numpy import load_file

    ours = load_file(str(bca_dir / "adapter_model.safetensors"))
    theirs = load_file(str(peft_dir / "adapter_model.safetensors"))
    assert "modules_to_save.classifier.dense.weight" in ours
    for name in mods:
        w = theirs[f"base_model.model.{name}.c3a_kernel"]
        c = ours[f"{name}.bca_kernel"]
        np.testing.assert_allclose(c, c3a_kernel_to_bca(w.astype(np.float64)), rtol=1e-7)

    # and back to PEFT: PEFT loads it and reproduces the logits
    back = bca_adapter_dir_to_c3a(bca_dir, tmp_path / "peft_back", task_type="SEQ_CLS")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = peft.PeftModel.from_pretrained(tiny_classifier(), str(back)).eval()
    with torch.no_grad():
        again = reloaded(input_ids=ids).logits
    torch.testing.assert_close(again, logits, rtol=1e-5, atol=1e-6)
    back_cfg = json.loads((back / "adapter_config.json").read_text())
    assert back_cfg["peft_type"] == "C3A" and back_cfg["block_size"] == 16
    assert back_cfg["block_size_pattern"] == {"roberta.encoder.layer.1.attention.self.value": 32}


def write_bca_dir(path: Path, modules: dict, kernels: dict, scale: float = 1.0) -> Path:
    from safetensors.numpy import save_file

    path.mkdir(parents=True)
    save_file(
        {f"{n}.bca_kernel": k for n, k in kernels.items()}, str(path / "adapter_model.safetensors")
    )
    cfg = {
        "format": "bca",
        "format_version": 1,
        "block_size": 16,
        "scale": scale,
        "target_modules": sorted(modules),
        "init": "zeros",
        "pad": True,
        "modules_to_save": [],
        "base_model": {"name_or_path": None, "class": None, "fingerprint": {}},
        "modules": modules,
    }
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    return path


def test_bca_dir_scale_folded(tmp_path: Path) -> None:
    base = tiny_classifier()
    name = "roberta.encoder.layer.0.attention.self.query"
    rng = np.random.default_rng(0)
    c = (0.05 * rng.standard_normal((4, 4, 16))).astype(np.float32)
    info = {"in_features": 64, "out_features": 64, "block_size": 16, "is_conv1d": False}
    src = write_bca_dir(tmp_path / "bca", {name: info}, {name: c}, scale=2.5)
    dst = bca_adapter_dir_to_c3a(src, tmp_path / "peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(base, str(dst)).eval()
    layer = pm.get_submodule("base_model.model." + name)
    x = torch.randn(5, 64)
    with torch.no_grad():
        got = (layer(x) - layer.base_layer(x)).double().numpy()
    want = x.double().numpy() @ (2.5 * dense_from_bca(c.astype(np.float64))).T
    assert rel(got, want) < 1e-5


def test_bca_dir_refusals(tmp_path: Path) -> None:
    name = "h.0.attn.c_attn"
    conv = {"in_features": 48, "out_features": 144, "block_size": 16, "is_conv1d": True}
    src = write_bca_dir(tmp_path / "conv", {name: conv}, {name: np.zeros((9, 3, 16), np.float32)})
    with pytest.raises(ValueError, match="Conv1D"):
        bca_adapter_dir_to_c3a(src, tmp_path / "out1")
    padded = {"in_features": 60, "out_features": 64, "block_size": 16, "is_conv1d": False}
    src = write_bca_dir(tmp_path / "pad", {"q": padded}, {"q": np.zeros((4, 4, 16), np.float32)})
    with pytest.raises(ValueError, match="zero-padded bca adapter"):
        bca_adapter_dir_to_c3a(src, tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


def test_c3a_dir_refusals(tmp_path: Path) -> None:
    peft_dir, _, _ = make_peft_c3a(tmp_path)
    cfg = json.loads((peft_dir / "adapter_config.json").read_text())
    with pytest.raises(FileExistsError):
        c3a_adapter_dir_to_bca(peft_dir, peft_dir)
    with pytest.raises(ValueError, match="not C3A"):
        bad = tmp_path / "lora"
        bad.mkdir()
        (bad / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "LORA"}))
        c3a_adapter_dir_to_bca(bad, tmp_path / "x")
    with pytest.raises(ValueError, match="bias"):
        (bad / "adapter_config.json").write_text(json.dumps({**cfg, "bias": "all"}))
        c3a_adapter_dir_to_bca(bad, tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="pickled"):
        (bad / "adapter_config.json").write_text(json.dumps(cfg))
        c3a_adapter_dir_to_bca(bad, tmp_path / "x")
    other = tiny_classifier()
    other.roberta.encoder.layer[0].attention.self.query = torch.nn.Linear(64, 32)
    with pytest.raises(ValueError, match="64->32 in base_model"):
        c3a_adapter_dir_to_bca(peft_dir, tmp_path / "y", base_model=other)
