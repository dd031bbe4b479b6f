"""DPO recipe end to end on the tiny base, with the reference sharing the one base in memory."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from hub.bases import BaseInfo
from hub.store import LocalStore
from tests.trainers.conftest import (
    adapter_files,
    base_copies_in_memory,
    base_numel,
    non_adapter_numel,
    read_json,
    register_sft_adapter,
)
from trainers import dpo
from trainers.configs import ConfigError


def inspect_models(monkeypatch: pytest.MonkeyPatch, tiny_base: BaseInfo) -> dict[str, Any]:
    """Wrap dpo.run_training to record, as training starts, what is in memory."""
    seen: dict[str, Any] = {}
    original = dpo.run_training
    already = base_copies_in_memory()  # models other tests of the session still hold

    def wrapper(model: Any, *args: Any, **kwargs: Any) -> Any:
        seen["backbones"] = base_copies_in_memory() - already
        seen["base_weights"] = non_adapter_numel(model)
        seen["expected_weights"] = base_numel(tiny_base)
        seen["adapters"] = sorted(model.peft_config)
        seen["trainable_adapters"] = sorted(
            {n.split(".")[-2] for n, p in model.named_parameters() if p.requires_grad and "lora_" in n}
        )
        return original(model, *args, **kwargs)

    monkeypatch.setattr(dpo, "run_training", wrapper)
    return seen


@pytest.mark.slow
def test_dpo_trains_against_the_disabled_adapter(
    pref_config: Callable[..., Any],
    registry: LocalStore,
    tiny_base: BaseInfo,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen = inspect_models(monkeypatch, tiny_base)
    manifest = dpo.train(pref_config(dpo, max_steps=3, lr=5e-3))
    assert seen["backbones"] == 1 and seen["base_weights"] == seen["expected_weights"]
    assert seen["adapters"] == ["default"]

    metrics = manifest.metrics
    # Before training the policy is the reference: zero implicit rewards (ties count as wrong), no KL.
    assert metrics["baseline_reward_accuracy"] == 0.0 and metrics["baseline_kl"] == pytest.approx(
        0.0, abs=1e-6
    )
    assert metrics["baseline_loss"] == pytest.approx(0.6931, abs=1e-3)
    assert metrics["reward_accuracy"] > 0.5 and metrics["reward_margin"] > 0
    assert metrics["loss"] < metrics["baseline_loss"] and metrics["kl"] > 0

    stored = registry.get(manifest.ref)
    assert (manifest.task, manifest.labels) == ("dpo", [])
    assert read_json(stored.path / "adapter_config.json")["task_type"] == "CAUSAL_LM"
    history = read_json(stored.path / "metrics.json")["history"]
    assert any("loss" in entry and "accuracy" in entry for entry in history)


@pytest.mark.slow
def test_dpo_from_sft_adapter_loads_it_twice_on_one_base(
    pref_config: Callable[..., Any],
    registry: LocalStore,
    tiny_base: BaseInfo,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sft = register_sft_adapter(registry, tiny_base, tmp_path / "sft", rank=4)
    seen = inspect_models(monkeypatch, tiny_base)
    manifest = dpo.train(pref_config(dpo, from_adapter=sft, max_steps=2, rank=16))
    assert seen["backbones"] == 1 and seen["base_weights"] == seen["expected_weights"]
    assert seen["adapters"] == ["default", "reference"] and seen["trainable_adapters"] == ["default"]

    metrics = manifest.metrics
    # The reference is the SFT adapter, not the bare base: at the start policy == reference.
    assert metrics["baseline_kl"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["baseline_reward_margin"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["kl"] > 0
    stored = registry.get(manifest.ref)
    assert adapter_files(stored.path) >= {"adapter_config.json", "adapter_model.safetensors"}
    assert "reference/" not in adapter_files(stored.path)  # only the trained adapter is saved
    adapter_config = read_json(stored.path / "adapter_config.json")
    assert adapter_config["r"] == 4  # the SFT adapter's shape, not --rank
    assert read_json(stored.path / "metrics.json")
    assert manifest.trainer["data"]["from"] == sft


def test_dpo_refuses_methods_without_a_shared_base(pref_config: Callable[..., Any]) -> None:
    with pytest.raises(ConfigError, match="--method full is not supported by dpo"):
        pref_config(dpo, method="full").validate()
    with pytest.raises(ConfigError, match="--beta must be > 0"):
        pref_config(dpo, beta=0.0).validate()


def test_dpo_from_must_be_an_instruction_lora(
    pref_config: Callable[..., Any],
    registry: LocalStore,
    tiny_base: BaseInfo,
    tmp_path: Path,
) -> None:
    register_sft_adapter(registry, tiny_base, tmp_path / "sft")
    stored = registry.get("sft")
    registry.put(stored.path, name="not-sft", task="reward", method="lora", base=tiny_base.spec)
    with pytest.raises(ConfigError, match="is a 'reward' adapter; expected instruction"):
        dpo.train(pref_config(dpo, from_adapter="not-sft"))
    assert [m.name for m in registry.list()] == sorted(["not-sft", "sft"])
