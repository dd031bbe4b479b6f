"""Export without training: manifest metrics, metrics.json, the card's usage per format, and
registration through a stand-in Method (its kind, format and quantization reach the manifest)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from hub.bases import BaseInfo
from hub.store import LocalStore
from trainers.configs import TrainConfig
from trainers.export import (
    manifest_metrics,
    save_and_register,
    usage_snippet,
    write_history,
    write_reward_curve,
)
from trainers.loop import TrainResult
from trainers.methods import Method, get_method

HISTORY = [
    {"step": 0, "epoch": 0.0, "eval": {"loss": 2.0}},
    {"step": 1, "epoch": 0.5, "loss": 1.5, "lr": 1e-3},
    {"step": 2, "epoch": 1.0, "loss": 1.0, "lr": 0.0},
    {"step": 2, "epoch": 1.0, "eval": {"loss": 1.2}},
]


class FakeMethod(Method):
    """Writes a stand-in PEFT folder; records a quantization that names the device it was given."""

    name = "qlora"
    adapter_format = "peft"
    quantized = True

    def prepare(self, model: torch.nn.Module, config: TrainConfig, task: str) -> torch.nn.Module:
        return model

    def save(self, model: Any, out_dir: Path, tokenizer: Any = None) -> None:
        if model == "broken":
            raise OSError("disk full")
        (out_dir / "adapter_config.json").write_text('{"peft_type": "LORA"}')
        (out_dir / "adapter_model.safetensors").write_bytes(b"weights")

    def quantization(self, config: TrainConfig, device: str) -> dict[str, Any]:
        return {"bits": 4, "device": device}


def result() -> TrainResult:
    return TrainResult(
        model=torch.nn.Linear(1, 1), metrics={"loss": 1.2, "accuracy": 0.75}, baseline={"loss": 2.0},
        history=HISTORY, steps=2, epochs=1.0, train_seconds=0.5, peak_memory_mb=10.0,
        trainable_params=8, total_params=100,
    )  # fmt: skip


def config(registry: LocalStore, **overrides: Any) -> TrainConfig:
    values = {"data": "train.jsonl", "name": "exported", "method": "qlora", "registry": str(registry.root)}
    return TrainConfig(**(values | overrides))


def test_manifest_metrics_and_history(tmp_path: Path) -> None:
    metrics = manifest_metrics(result())
    assert metrics["loss"] == 1.2 and metrics["baseline_loss"] == 2.0 and "baseline_accuracy" not in metrics
    assert (metrics["train_steps"], metrics["trainable_params"], metrics["total_params"]) == (2, 8, 100)
    write_history(tmp_path, result(), {"extra": 1})
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["final"] == {"loss": 1.2, "accuracy": 0.75} and saved["baseline"] == {"loss": 2.0}
    assert saved["summary"] == metrics and saved["history"] == HISTORY and saved["extra"] == 1


def test_reward_curve_is_a_png(tmp_path: Path) -> None:
    history = [{"step": 1, "reward": 0.1, "kl": 0.0}, {"step": 2, "reward": 0.3, "kl": 0.2}]
    write_reward_curve(tmp_path, history)
    assert (tmp_path / "reward_curve.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    ("method", "task", "expected"),
    [
        ("lora", "classification", 'PeftModel.from_pretrained(base, "ADAPTER_FOLDER")'),
        ("bottleneck", "ner", "load_bottleneck(model, "),
        ("full", "instruction", 'AutoModelForCausalLM.from_pretrained("ADAPTER_FOLDER")'),
    ],
)
def test_usage_snippet_per_format(method: str, task: str, expected: str) -> None:
    base = BaseInfo("tiny", Path("/bases/tiny"), "f" * 64)
    snippet = usage_snippet(task, get_method(method), base, ["a", "b"])
    assert expected in snippet
    assert (", num_labels=2" in snippet) == (task != "instruction" and method != "full")


def test_save_and_register_records_what_the_method_says(
    registry: LocalStore, tmp_path: Path, tiny_base: BaseInfo
) -> None:
    out = tmp_path / "out"
    manifest = save_and_register(
        "model", tokenizer=None, config=config(registry, output_dir=str(out)), task="classification",
        method=FakeMethod(), device="cpu", base=tiny_base, labels=["neg", "pos"], result=result(),
        data={"train": "train.jsonl"}, write_extra=lambda folder: (folder / "extra.txt").write_text("x"),
    )  # fmt: skip
    assert manifest.ref == "exported@1" and manifest.labels == ["neg", "pos"]
    assert (manifest.kind, manifest.adapter_format) == ("adapter", "peft")
    assert manifest.quantization == {"bits": 4, "device": "cpu"}
    assert manifest.metrics["accuracy"] == 0.75 and manifest.trainer["data"] == {"train": "train.jsonl"}
    assert {"README.md", "metrics.json", "loss_curve.png", "extra.txt", "adapter_config.json"} <= set(
        manifest.files
    )
    card = (registry.get(manifest.ref).path / "README.md").read_text()
    assert "- Method: qlora (adapter, format peft)" in card and "| accuracy | 0.7500 |  |" in card
    assert "| loss | 1.2000 | 2.0000 |" in card and "- Labels (2): neg, pos" in card
    assert (out / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"  # --output-dir keeps the folder


def test_a_failure_before_put_registers_nothing(registry: LocalStore, tiny_base: BaseInfo) -> None:
    with pytest.raises(OSError, match="disk full"):
        save_and_register(
            "broken", tokenizer=None, config=config(registry), task="instruction", method=FakeMethod(),
            device="cpu", base=tiny_base, labels=[], result=result(), data={},
        )  # fmt: skip
    assert registry.names() == []
