"""load_adapter checks the base weights: an adapter trained on another checkpoint of the
same architecture (same shapes, other values) is reported, a cast of the same base to
half precision is not, and merged adapters do not count as a changed base."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from bca.model import BCAConfig, inject_adapters, load_adapter, merge_adapters, save_adapter
from test_torch_model import tiny_bert, tiny_gpt2

MISMATCH = "trained on other base weights"


def _saved(make: object, targets: list[str], tmp: Path, seed: int = 0) -> Path:
    model = make(seed)  # type: ignore[operator]
    torch.manual_seed(11)
    inject_adapters(model, BCAConfig(block_size=8, target_modules=targets, init="gaussian"))
    return save_adapter(model, tmp / f"adapter_{seed}")


@pytest.mark.parametrize(
    ("make", "targets"), [(tiny_bert, ["query", "value"]), (tiny_gpt2, ["c_attn", "c_fc"])]
)
def test_other_checkpoint_is_reported(make: object, targets: list[str], tmp_path: Path) -> None:
    adir = _saved(make, targets, tmp_path)
    doc = json.loads((adir / "adapter_config.json").read_text())
    sketches = doc["base_model"]["weight_sketch"]
    assert sorted(sketches) == sorted(doc["modules"])
    # the same base: silent
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_adapter(make(0), adir)  # type: ignore[operator]
    # the same architecture, other weights: a warning naming the layers, or an error
    with pytest.warns(UserWarning, match=MISMATCH) as rec:
        load_adapter(make(1), adir)  # type: ignore[operator]
    assert f"{len(doc['modules'])} of its {len(doc['modules'])} layers" in str(rec[0].message)
    with pytest.raises(ValueError, match=MISMATCH):
        load_adapter(make(1), adir, check_base="error")  # type: ignore[operator]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_adapter(make(1), adir, check_base="ignore")  # type: ignore[operator]
    with pytest.raises(ValueError, match="check_base must be one of"):
        load_adapter(make(0), adir, check_base="strict")  # type: ignore[operator]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_base_passes(dtype: torch.dtype, tmp_path: Path) -> None:
    adir = _saved(tiny_bert, ["query", "value"], tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_adapter(tiny_bert(0).to(dtype), adir, check_base="error")


def test_one_changed_layer_and_merged_adapters(tmp_path: Path) -> None:
    adir = _saved(tiny_bert, ["query", "value"], tmp_path)
    # one fine-tuned layer among many is named
    model = tiny_bert(0)
    name = next(n for n, _ in model.named_modules() if n.endswith("layer.1.attention.self.value"))
    layer = model.get_submodule(name)
    with torch.no_grad():
        layer.weight.add_(torch.randn_like(layer.weight) * layer.weight.std())
    with pytest.raises(ValueError, match=r"1 of its 4 layers") as err:
        load_adapter(model, adir, check_base="error")
    assert f"({name!r};" in str(err.value)
    # a model whose adapters are merged (exactly or not) saves its unmerged base
    for exact in (True, False):
        merged = tiny_bert(0)
        torch.manual_seed(12)
        inject_adapters(
            merged, BCAConfig(block_size=8, target_modules=["query", "value"], init="gaussian")
        )
        merge_adapters(merged, exact_unmerge=exact)
        out = save_adapter(merged, tmp_path / f"merged_{exact}")
        load_adapter(tiny_bert(0), out, check_base="error")


def test_adapters_without_sketch_still_load(tmp_path: Path) -> None:
    """Files from bca versions before the sketch load unchecked."""
    adir = _saved(tiny_bert, ["query"], tmp_path)
    path = adir / "adapter_config.json"
    doc = json.loads(path.read_text())
    del doc["base_model"]["weight_sketch"]
    path.write_text(json.dumps(doc))
    load_adapter(tiny_bert(1), adir, check_base="error")
