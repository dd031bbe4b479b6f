"""PPO recipe on the tiny base: end to end, one base in memory, the guards, the KL controller."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from hub.bases import BaseInfo
from hub.store import LocalStore
from tests.trainers.conftest import (
    SAMPLES,
    adapter_files,
    base_copies_in_memory,
    base_numel,
    non_adapter_numel,
    read_json,
    register_sft_adapter,
)
from trainers import ppo, ppo_rollout, reward
from trainers.configs import ConfigError
from trainers.data.preference import read_prompts
from trainers.data.tokenize import encode_prompt
from trainers.modeling import load_tokenizer


@pytest.fixture(scope="module")
def reward_registry(tmp_path_factory: pytest.TempPathFactory, tiny_base: BaseInfo) -> LocalStore:
    """A registry holding a reward adapter `rm` trained briefly on the shipped pairs."""
    store = LocalStore(tmp_path_factory.mktemp("ppo-registry"))
    config = reward.Config(
        base=tiny_base.name_or_path, data=str(SAMPLES / "preference_pairs.jsonl"), name="rm",
        registry=str(store.root), max_steps=4, batch_size=4, max_length=48, lr=2e-3,
        progress=False, baseline=False, cpu=True,
    )  # fmt: skip
    reward.train(config)
    return store


@pytest.fixture
def ppo_config(
    tiny_base: BaseInfo,
    reward_registry: LocalStore,
    pref_data: dict[str, Path],
) -> Callable[..., ppo.Config]:
    def build(**overrides: Any) -> ppo.Config:
        values: dict[str, Any] = {
            "base": tiny_base.name_or_path,
            "prompts": str(pref_data["prompts"]),
            "eval": str(pref_data["eval_prompts"]),
            "reward": "rm",
            "name": "test-ppo",
            "registry": str(reward_registry.root),
            "max_steps": 2,
            "batch_size": 4,
            "mini_batch_size": 2,
            "ppo_epochs": 2,
            "max_new_tokens": 8,
            "max_length": 48,
            "lr": 1e-3,
            "log_every": 1,
            "progress": False,
            "cpu": True,
        }
        return ppo.Config(**(values | overrides))

    return build


def ppo_versions(store: LocalStore) -> list[str]:
    return [m.ref for m in store.list(task="ppo", all_versions=True)]


@pytest.mark.slow
def test_ppo_end_to_end_on_one_base(
    ppo_config: Callable[..., ppo.Config],
    reward_registry: LocalStore,
    tiny_base: BaseInfo,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: dict[str, Any] = {}
    original = ppo.load_models
    already = base_copies_in_memory()  # models other tests of the session still hold

    def wrapper(*args: Any, **kwargs: Any) -> ppo.PPOModels:
        models = original(*args, **kwargs)
        seen["backbones"] = base_copies_in_memory() - already
        seen["base_weights"] = non_adapter_numel(models.policy)
        seen["adapters"] = sorted(models.policy.peft_config)
        seen["reference"] = models.reference_adapter
        return models

    monkeypatch.setattr(ppo, "load_models", wrapper)
    manifest = ppo.train(ppo_config(batch_size=2, samples_per_prompt=2))
    # Policy, reference (adapter disabled) and reward model all run on one base.
    assert seen == {
        "backbones": 1,
        "base_weights": base_numel(tiny_base),
        "adapters": ["default", "reward"],
        "reference": None,
    }
    assert manifest.task == "ppo" and manifest.trainer["data"]["reward"] == "rm@1"
    for key in ("mean_reward", "kl", "mean_length", "baseline_mean_reward", "baseline_kl", "reward_gain"):
        assert key in manifest.metrics
    # the paired gain is the mean of per-prompt differences, so it equals the difference of the means
    gain = manifest.metrics["mean_reward"] - manifest.metrics["baseline_mean_reward"]
    assert manifest.metrics["reward_gain"] == pytest.approx(gain, abs=1e-5)
    assert manifest.metrics["reward_gain_ci95"] >= 0
    assert manifest.metrics["baseline_kl"] == pytest.approx(0.0, abs=1e-5)  # policy == reference

    stored = reward_registry.get(manifest.ref)
    assert {"reward_curve.png", "loss_curve.png", "metrics.json"} <= adapter_files(stored.path)
    assert "reward/" not in adapter_files(stored.path)  # only the policy adapter is saved
    steps = [e for e in read_json(stored.path / "metrics.json")["history"] if "reward" in e]
    assert [e["step"] for e in steps] == [1, 2]
    for key in ("reward", "kl", "policy_loss", "value_loss", "clip_fraction", "entropy", "kl_coef"):
        assert all(torch.isfinite(torch.tensor(e[key])) for e in steps), key

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_base.path)
    assert isinstance(PeftModel.from_pretrained(model, stored.path), PeftModel)


@pytest.mark.slow
def test_first_update_starts_at_ratio_one(
    ppo_config: Callable[..., ppo.Config], reward_registry: LocalStore, tiny_base: BaseInfo
) -> None:
    """Rollout log-probs and values match the training forward: with lr 0 nothing is clipped."""
    config = ppo_config(lr=0.0, ppo_epochs=1)
    tokenizer = load_tokenizer(tiny_base)
    models = ppo.load_models(config, tiny_base, tokenizer, "cpu")
    models.policy.eval()
    prompts = [encode_prompt(tokenizer, r.prompt, 40) for r in read_prompts(config.prompts)[:4]]
    torch.manual_seed(0)
    batch = ppo.rollout(models, prompts, tokenizer, config)
    assert batch.mask.sum(-1).min() >= 1 and batch.sequences.shape[0] == 4
    optimizer = torch.optim.SGD(list(models.value_head.parameters()), lr=0.0)
    stats = ppo.ppo_step(models, batch, optimizer, 0.05, config, step=1)
    assert stats["approx_kl"] == pytest.approx(0.0, abs=1e-6)
    assert stats["clip_fraction"] == 0.0
    # Fresh LoRA (B = 0): the sampled-token KL to the disabled-adapter reference is exactly 0.
    assert stats["kl"] == pytest.approx(0.0, abs=1e-5)


@pytest.mark.slow
def test_ppo_from_sft_adapter_uses_it_as_frozen_reference(
    ppo_config: Callable[..., ppo.Config], reward_registry: LocalStore, tiny_base: BaseInfo, tmp_path: Path
) -> None:
    sft = register_sft_adapter(reward_registry, tiny_base, tmp_path / "sft")
    config = ppo_config(from_adapter=sft, max_steps=1, baseline=False)
    models = ppo.load_models(config, tiny_base, load_tokenizer(tiny_base), "cpu")
    assert sorted(models.policy.peft_config) == ["default", "reference", "reward"]
    trainable = {n.split(".")[-2] for n, p in models.policy.named_parameters() if p.requires_grad}
    assert trainable == {"default"} and models.reference_adapter == "reference"
    del models
    manifest = ppo.train(config)
    stored = reward_registry.get(manifest.ref)
    assert adapter_files(stored.path) & {"reference/", "reward/"} == set()


@pytest.mark.slow
def test_kl_blow_up_stops_and_registers_nothing(
    ppo_config: Callable[..., ppo.Config], reward_registry: LocalStore
) -> None:
    before = ppo_versions(reward_registry)
    with pytest.raises(ppo.PPOStoppedError, match=r"KL to the reference reached .* \(--max-kl 1e-06\)"):
        ppo.train(ppo_config(max_kl=1e-6, lr=5e-2, baseline=False, max_steps=3))
    assert ppo_versions(reward_registry) == before


@pytest.mark.slow
def test_nan_rewards_and_empty_generations_stop(
    ppo_config: Callable[..., ppo.Config], reward_registry: LocalStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = ppo_versions(reward_registry)
    monkeypatch.setattr(ppo_rollout, "reward_scores", lambda *args: torch.full((4,), float("nan")))
    with pytest.raises(ppo.PPOStoppedError, match="reward_scores became NaN"):
        ppo.train(ppo_config(baseline=False, max_steps=1))
    monkeypatch.undo()

    original = ppo.load_models

    def always_eos(*args: Any, **kwargs: Any) -> ppo.PPOModels:
        models = original(*args, **kwargs)
        eos = load_tokenizer(args[1]).eos_token_id

        def hook(module: Any, inputs: Any, output: torch.Tensor) -> torch.Tensor:
            output = output.clone()
            output[..., eos] += 1e4
            return output

        models.policy.get_base_model().lm_head.register_forward_hook(hook)
        return models

    monkeypatch.setattr(ppo, "load_models", always_eos)
    with pytest.raises(ppo.PPOStoppedError, match="every sampled completion was empty"):
        ppo.train(ppo_config(baseline=False, max_steps=1))
    assert ppo_versions(reward_registry) == before


def test_paired_gain_interval() -> None:
    before = torch.tensor([0.0, 1.0, 5.0, -2.0])
    gain = ppo.paired_gain(before + torch.tensor([0.1, 0.3, 0.1, 0.3]), before)
    assert gain["reward_gain"] == pytest.approx(0.2)
    # the prompts' own spread (std ~3) cancels: only the differences' std (0.1155) counts
    assert gain["reward_gain_ci95"] == pytest.approx(1.96 * 0.11547 / 2, rel=1e-3)


def test_adaptive_kl_controller() -> None:
    controller = ppo.AdaptiveKLController(0.1, target=6.0, horizon=100)
    controller.update(kl=12.0, n_samples=10)  # error clipped to +0.2: 0.1 * (1 + 0.2 * 10 / 100)
    assert controller.coef == pytest.approx(0.102)
    controller.update(kl=5.4, n_samples=50)  # error -0.1: 0.102 * (1 - 0.1 * 0.5)
    assert controller.coef == pytest.approx(0.102 * 0.95)
    fixed = ppo.AdaptiveKLController(0.1, target=None, horizon=100)
    fixed.update(kl=100.0, n_samples=10)
    assert fixed.coef == 0.1


def test_ppo_config_problems(ppo_config: Callable[..., ppo.Config]) -> None:
    with pytest.raises(ConfigError) as info:
        ppo_config(method="full", mini_batch_size=8, prompts="", max_new_tokens=64).validate()
    message = str(info.value)
    for problem in (
        "--prompts is required",
        "--method full is not supported by ppo",
        "--mini-batch-size must not exceed --batch-size x --samples-per-prompt",
        "--max-new-tokens must be below --max-length",
    ):
        assert problem in message
    assert ppo_config(prompts="", data="p.txt").prompts == "p.txt"  # --data is an alias


def test_reward_ref_must_be_a_reward_adapter(
    ppo_config: Callable[..., ppo.Config], reward_registry: LocalStore, tiny_base: BaseInfo, tmp_path: Path
) -> None:
    sft = register_sft_adapter(reward_registry, tiny_base, tmp_path / "sft2")
    with pytest.raises(ConfigError, match="is a 'instruction' adapter; expected reward"):
        ppo.train(ppo_config(reward=sft))
