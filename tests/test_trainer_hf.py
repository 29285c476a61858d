"""bca adapters train under the Hugging Face Trainer (tiny model from a config, CPU), and
the trained adapter saves and loads with bca's save_adapter / load_adapter."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from bca.model import (  # noqa: E402
    BCAConfig,
    adapter_modules,
    count_parameters,
    inject_adapters,
    load_adapter,
    parameter_groups,
    save_adapter,
)
from bca.nn import rust_available  # noqa: E402

BACKENDS = ["torch"] + (["rust"] if rust_available() else [])


def tiny_classifier() -> torch.nn.Module:
    cfg = transformers.RobertaConfig(
        vocab_size=61,
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=2,
    )
    torch.manual_seed(0)
    return transformers.RobertaForSequenceClassification(cfg)


class TinyDataset(torch.utils.data.Dataset):
    """Label = whether token 7 occurs: learnable from the tokens."""

    def __init__(self, n: int = 32, seq: int = 10) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(8, 61, (n, seq), generator=g)
        self.ids[: n // 2, 3] = 7
        self.labels = (self.ids == 7).any(dim=1).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.ids[i],
            "attention_mask": torch.ones_like(self.ids[i]),
            "labels": self.labels[i],
        }


@pytest.mark.parametrize("backend", BACKENDS)
def test_trainer_trains_and_adapter_round_trips(backend: str, tmp_path: Path) -> None:
    model = inject_adapters(
        tiny_classifier(),
        BCAConfig(
            block_size=16,
            target_modules=["query", "value"],
            backend=backend,
            modules_to_save=["classifier"],
        ),
    )
    counts = count_parameters(model)
    kernel_params = sum(m.bca_kernel.numel() for _, m in adapter_modules(model))
    head = sum(p.numel() for p in model.classifier.parameters())
    assert counts.trainable == kernel_params + head == 4 * 3 * 3 * 16 + head
    before = {n: m.bca_kernel.detach().clone() for n, m in adapter_modules(model)}

    # the paper's heuristic: lr / p for kernels, plain lr for the head
    optimizer = torch.optim.AdamW(parameter_groups(model, lr=1e-2 * 16), lr=1e-2)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        max_steps=6,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=TinyDataset(), optimizers=(optimizer, None)
    )
    result = trainer.train()
    assert result.global_step == 6
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    for n, m in adapter_modules(model):
        assert not torch.equal(m.bca_kernel.detach(), before[n]), f"{n} did not train"
        assert m.base_layer.weight.requires_grad is False

    model.eval()
    batch = TinyDataset()[0:4]
    with torch.no_grad():
        want = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    save_adapter(model, tmp_path / "adapter")
    fresh = load_adapter(tiny_classifier(), tmp_path / "adapter", backend=backend).eval()
    with torch.no_grad():
        got = fresh(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
