"""The preference benchmark's verdicts and table (pure functions; the benchmark itself is not run here)."""

from __future__ import annotations

from typing import Any

from benchmarks.preference_quality import markdown, verdicts


def results(gains: list[tuple[float, float]], kl: float = 5.0) -> dict[str, Any]:
    ppo = [
        {"seed": seed, "mean_reward": 0.7 + gain, "baseline_mean_reward": 0.7, "reward_gain": gain,
         "reward_gain_ci95": half, "kl": kl, "baseline_kl": 0.0, "mean_length": 9.0,
         "baseline_mean_length": 20.0, "steps": 40, "seconds": 1.0}
        for seed, (gain, half) in enumerate(gains)
    ]  # fmt: skip
    return {
        "data": {"train_pairs": 10, "dpo_train_pairs": 5, "eval_pairs": 4, "seed": 0, "sft_chats": 3,
                 "sft_max_reply_tokens": 20, "ppo_train_prompts": 10, "ppo_eval_prompts": 4,
                 "ppo_eval_offset": 2},
        "settings": {"ppo": {"temperature": 0.5}},
        "reward": {"accuracy": 0.6, "baseline_accuracy": 0.5, "margin": 0.1, "accuracy_95ci": [0.55, 0.65],
                   "seconds": 1.0},
        "dpo": {"reward_accuracy": 0.55, "baseline_reward_accuracy": 0.0, "reward_margin": 0.05,
                "logp_accuracy": 0.58, "baseline_logp_accuracy": 0.56, "loss": 0.68, "baseline_loss": 0.69,
                "kl": 0.02, "seconds": 1.0},
        "sft": {"loss": 7.4, "baseline_loss": 8.4, "seconds": 1.0},
        "ppo": ppo,
        "machine": {"torch_threads": 1},
    }  # fmt: skip


PPO_RAISES = "PPO raises mean reward on held-out prompts (paired 95% interval above 0, every seed)"


def test_ppo_verdict_needs_every_seed_interval_above_zero() -> None:
    assert verdicts(results([(0.15, 0.03), (0.14, 0.03)]))[PPO_RAISES]
    assert not verdicts(results([(0.15, 0.03), (0.02, 0.03)]))[PPO_RAISES]  # one interval holds 0
    assert not verdicts(results([(0.15, 0.03)], kl=12.0))["PPO KL per sample bounded (< 10 nats, every seed)"]


def test_markdown_has_a_row_per_ppo_seed_and_the_verdicts() -> None:
    data = results([(0.15, 0.03), (-0.11, 0.02)])
    text = markdown(data | {"verdicts": verdicts(data)})
    assert "| ppo seed 0 |" in text and "| ppo seed 1 |" in text
    assert "paired gain -0.1100 +- 0.0200" in text
    assert f"| {PPO_RAISES} | NO |" in text
