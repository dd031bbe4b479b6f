"""Reward recipe end to end on the tiny base: train, register, reload with plain PEFT, bad data."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from hub.bases import BaseInfo
from hub.store import LocalStore
from tests.trainers.conftest import read_json
from trainers import reward
from trainers.configs import ConfigError
from trainers.data.collate import collate_pairs
from trainers.data.preference import read_preference_pairs
from trainers.data.tokenize import encode_pair
from trainers.errors import DataError


def plain_peft_rewards(folder: Path, base: BaseInfo, pairs_file: Path, max_length: int) -> torch.Tensor:
    """(chosen, rejected) rewards of every pair, loaded with transformers + PEFT only."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base.path)
    model = AutoModelForSequenceClassification.from_pretrained(base.path, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    model = PeftModel.from_pretrained(model, folder).eval()
    pairs = [encode_pair(tokenizer, p, max_length) for p in read_preference_pairs(pairs_file).pairs]
    batch = collate_pairs(pairs, tokenizer.pad_token_id)
    with torch.no_grad():
        scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
    return torch.stack(scores.chunk(2), dim=1)


@pytest.mark.slow
def test_reward_trains_registers_and_reloads(
    pref_config: Callable[..., Any],
    registry: LocalStore,
    tiny_base: BaseInfo,
    pref_data: dict[str, Path],
) -> None:
    # fp32: the eval margin is compared with plain PEFT's (fp32) to 1e-3; under the default bf16 autocast on
    # CPUs that have it, a margin of ~4 differs by bf16's rounding (1.6e-3 seen in CI)
    config = pref_config(reward, max_steps=5, lr=3e-3, precision="fp32")
    manifest = reward.train(config)
    assert (manifest.task, manifest.method, manifest.labels) == ("reward", "lora", ["reward"])
    metrics = manifest.metrics
    assert metrics["baseline_accuracy"] <= 0.75  # an untrained head is no better than chance here
    assert metrics["accuracy"] >= 0.9 and metrics["margin"] > metrics["baseline_margin"]
    assert metrics["loss"] < metrics["baseline_loss"]

    stored = registry.get(manifest.ref)
    assert {"adapter_config.json", "adapter_model.safetensors", "metrics.json", "loss_curve.png"} <= set(
        manifest.files
    )
    adapter_config = read_json(stored.path / "adapter_config.json")
    assert adapter_config["task_type"] == "SEQ_CLS" and "score" in adapter_config["modules_to_save"]

    # The head survives the round trip: plain PEFT reproduces the eval accuracy and margin.
    rewards = plain_peft_rewards(stored.path, tiny_base, pref_data["eval_pairs"], config.max_length)
    diff = rewards[:, 0] - rewards[:, 1]
    assert float((diff > 0).float().mean()) == pytest.approx(metrics["accuracy"])
    assert float(diff.mean()) == pytest.approx(metrics["margin"], abs=1e-3)


@pytest.mark.slow
def test_reward_qlora(pref_config: Callable[..., Any], registry: LocalStore) -> None:
    manifest = reward.train(pref_config(reward, method="qlora", max_steps=2, baseline=False))
    assert manifest.quantization and manifest.quantization["bits"] == 4
    assert manifest.method == "qlora" and manifest.task == "reward"
    assert "adapter_model.safetensors" in manifest.files


def test_bad_pairs_fail_before_training(
    pref_config: Callable[..., Any],
    registry: LocalStore,
    tmp_path: Path,
) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "Q", "chosen": "a"}\nnot json\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not a JSON line"):
        reward.train(pref_config(reward, data=str(bad)))
    bad.write_text('{"prompt": "Q", "chosen": "a"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:1: missing field 'rejected'"):
        reward.train(pref_config(reward, data=str(bad)))
    assert registry.list() == []


def test_reward_config_problems(pref_config: Callable[..., Any]) -> None:
    with pytest.raises(ConfigError) as info:
        pref_config(reward, center_rewards=-1.0, name="").validate()
    assert "--center-rewards must be >= 0" in str(info.value) and "--name is required" in str(info.value)
