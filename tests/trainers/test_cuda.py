"""The trainers' CUDA paths: QLoRA in bf16 with paged 8-bit AdamW, and the preference recipes on a GPU.

Skipped without a CUDA device (CI has none); run on a GPU machine with `pytest -m gpu`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch

from hub.store import LocalStore
from trainers import dpo, instruction, loop, ppo, reward

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture
def optimizer_spy(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Record which optimizer the training loop builds, and on which device."""
    seen: dict[str, Any] = {}
    build = loop.build_optimizer

    def spy(model: torch.nn.Module, config: Any, device: torch.device) -> torch.optim.Optimizer:
        optimizer = build(model, config, device)
        seen.update(optimizer=type(optimizer).__name__, device=device.type)
        return optimizer

    monkeypatch.setattr(loop, "build_optimizer", spy)
    return seen


def finite_losses(history: list[dict[str, Any]]) -> list[float]:
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert losses and all(math.isfinite(x) for x in losses)
    return losses


def test_qlora_instruction_trains_in_bf16_with_paged_adamw8bit(
    make_config: Callable[..., Any], registry: LocalStore, optimizer_spy: dict[str, Any], reload_stored: Any
) -> None:
    manifest = instruction.train(make_config("instruction", method="qlora", cpu=False, max_steps=8))
    assert optimizer_spy == {"optimizer": "PagedAdamW8bit", "device": "cuda"}
    assert manifest.quantization["compute_dtype"] == "bfloat16"
    assert manifest.quantization["quant_type"] == "nf4" and manifest.quantization["double_quant"]
    stored = registry.get(manifest.ref)
    finite_losses(json.loads((stored.path / "metrics.json").read_text())["history"])
    model = reload_stored(stored)  # the plain PEFT folder loads onto the fp32 base on the CPU
    logits = model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits
    assert torch.isfinite(logits).all()


def test_reward_and_dpo_qlora_on_cuda(pref_config: Callable[..., Any], registry: LocalStore) -> None:
    rm = reward.train(pref_config(reward, method="qlora", cpu=False, max_steps=4, baseline=False))
    assert rm.task == "reward" and rm.quantization["compute_dtype"] == "bfloat16"
    assert math.isfinite(rm.metrics["accuracy"])
    assert rm.metrics["peak_memory_mb"] > 0  # measured on the GPU
    policy = dpo.train(pref_config(dpo, method="qlora", cpu=False, max_steps=4))
    assert policy.task == "dpo" and math.isfinite(policy.metrics["loss"])


def test_ppo_qlora_on_cuda(pref_config: Callable[..., Any], pref_data: dict[str, Any]) -> None:
    rm = reward.train(pref_config(reward, method="qlora", cpu=False, max_steps=4, baseline=False, name="rm"))
    config = pref_config(
        ppo, method="qlora", cpu=False, reward=rm.ref, prompts=str(pref_data["prompts"]),
        eval=str(pref_data["eval_prompts"]), data="", max_steps=3, mini_batch_size=2, max_new_tokens=8,
        name="ppo-gpu",
    )  # fmt: skip
    manifest = ppo.train(config)
    assert manifest.task == "ppo" and manifest.quantization["compute_dtype"] == "bfloat16"
    assert math.isfinite(manifest.metrics["mean_reward"]) and manifest.metrics["kl"] < config.max_kl
