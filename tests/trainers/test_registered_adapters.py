"""Registered adapters on the one base: the checks on `--from`/`--reward`, policy and reference
loaded side by side, switching adapters, and the position helpers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from hub.bases import BaseInfo
from hub.errors import BaseMismatchError
from hub.store import LocalStore
from tests.trainers.conftest import register_sft_adapter
from trainers.configs import ConfigError
from trainers.registered_adapters import (
    POLICY,
    REFERENCE,
    attach_reward_adapter,
    last_token_index,
    load_policy_and_reference,
    positions,
    registered_adapter,
    reward_scores,
    use_adapter,
)

IDS = torch.tensor([[5, 17, 300, 42]])


@pytest.fixture
def sft(registry: LocalStore, tiny_base: BaseInfo, tmp_path: Path) -> str:
    """A registered instruction LoRA (non-zero B) for the tiny base."""
    return register_sft_adapter(registry, tiny_base, tmp_path / "sft")


def test_registered_adapter_checks_task_format_and_base(
    sft: str, registry: LocalStore, tiny_base: BaseInfo, tmp_path: Path
) -> None:
    stored = registered_adapter(sft, str(registry.root), tiny_base, ("instruction",), "--from")
    assert stored.manifest.ref == "sft@1"
    with pytest.raises(ConfigError, match=r"--reward sft@1 is a 'instruction' adapter; expected reward"):
        registered_adapter(sft, str(registry.root), tiny_base, ("reward",), "--reward")
    other = BaseInfo("other", tiny_base.path, "0" * 64)
    with pytest.raises(BaseMismatchError, match="--from sft@1 was trained on"):
        registered_adapter(sft, str(registry.root), other, ("instruction",), "--from")
    bottleneck = tmp_path / "bn"
    bottleneck.mkdir()
    (bottleneck / "bottleneck_config.json").write_text("{}")
    (bottleneck / "adapter_model.safetensors").write_bytes(b"")
    registry.put(bottleneck, name="bn", task="instruction", method="bottleneck", base=tiny_base.spec)
    with pytest.raises(ConfigError, match="must be a LoRA/QLoRA adapter"):
        registered_adapter("bn", str(registry.root), tiny_base, ("instruction",), "--from")


def test_policy_and_reference_share_the_base_and_switch(
    sft: str, registry: LocalStore, tiny_base: BaseInfo
) -> None:
    base = AutoModelForCausalLM.from_pretrained(tiny_base.path).eval()
    with torch.no_grad():
        bare = base(IDS).logits
    model = load_policy_and_reference(base, registry.get(sft).path).eval()
    assert set(model.peft_config) == {POLICY, REFERENCE} and model.active_adapter == POLICY
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(f".{POLICY}." in n for n in trainable)
    with torch.no_grad():
        policy = model(IDS).logits
        with use_adapter(model, REFERENCE):
            assert model.active_adapter == REFERENCE
            reference = model(IDS).logits
        with use_adapter(model, None):
            disabled = model(IDS).logits
    torch.testing.assert_close(reference, policy)  # the same SFT weights, loaded twice
    torch.testing.assert_close(disabled, bare)
    assert not torch.allclose(policy, bare)
    assert model.active_adapter == POLICY
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable


def test_reward_adapter_without_a_score_head_is_refused(
    sft: str, registry: LocalStore, tiny_base: BaseInfo
) -> None:
    folder = registry.get(sft).path
    model = load_policy_and_reference(AutoModelForCausalLM.from_pretrained(tiny_base.path), folder)
    with pytest.raises(ConfigError, match="holds 0 `score` head tensors"):
        attach_reward_adapter(model, folder)


def test_positions_and_last_token_follow_the_mask() -> None:
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert positions(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2], [0, 1, 2, 3, 4]]
    assert last_token_index(mask).tolist() == [4, 2, 4]


def test_reward_scores_read_where_the_reward_model_scores_when_pad_is_end_of_turn(
    tiny_base: BaseInfo, tmp_path: Path
) -> None:
    """PPO's score of a sequence equals the reward model's own (PEFT sequence-classification) score.

    On SmolLM2 the pad token is the end-of-turn token, and `AutoModelForSequenceClassification`
    pools the last token that is not the pad id: the token before `<|im_end|>`, not `<|im_end|>`.
    """
    end = 7  # stands for `<|im_end|>`, which is also the pad token
    torch.manual_seed(0)
    classifier = AutoModelForSequenceClassification.from_pretrained(tiny_base.path, num_labels=1)
    lora = LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    peft_classifier = get_peft_model(classifier, lora)
    with torch.no_grad():
        for name, param in peft_classifier.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    peft_classifier.save_pretrained(tmp_path / "rm", safe_serialization=True)
    ids = torch.tensor([[5, 17, 300, end, end], [5, 17, 42, 300, end], [5, 17, 42, 300, 9]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    reloaded = AutoModelForSequenceClassification.from_pretrained(tiny_base.path, num_labels=1)
    reloaded.config.pad_token_id = end
    rm = PeftModel.from_pretrained(reloaded, tmp_path / "rm").eval()
    causal = AutoModelForCausalLM.from_pretrained(tiny_base.path)
    causal.config.pad_token_id = end
    policy = get_peft_model(causal, LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj"]))
    head = attach_reward_adapter(policy, tmp_path / "rm")
    with torch.no_grad():
        expected = rm(input_ids=ids, attention_mask=mask).logits[:, 0]
        scores = reward_scores(policy.eval(), head, ids, mask)
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-4)
