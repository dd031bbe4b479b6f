"""DPO recipe: Direct Preference Optimization of a causal-LM LoRA adapter on preference pairs.

`adapterdock train dpo --base BASE --data PAIRS [--eval PAIRS] --name NAME [--from REF] [--beta 0.1]`

Policy and reference share one base in memory:
- without `--from`, the policy is a fresh LoRA adapter and the reference is the same model with
  the adapter disabled (`model.disable_adapter()`);
- with `--from REF` (an instruction/SFT adapter in the registry), the adapter is loaded twice,
  as "default" (trainable, becomes the result) and "reference" (frozen), switched per forward.
Loss: `trainers.losses.dpo_loss` on summed response log-probs. Eval metrics before and after
training: implicit-reward accuracy and margin, the DPO loss, the policy's own log-prob accuracy
(log pi(chosen) > log pi(rejected); before training this is the reference's), and the mean
per-token KL(policy || reference) on eval responses. The result is an ordinary CAUSAL_LM adapter
(task "dpo"). We write our own loop on the shared one rather than TRL's DPOTrainer, whose
reference handling (a second model or precomputed log-probs) does not fit the one-base shape.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from hub.bases import resolve_base
from hub.manifest import Manifest
from trainers import losses
from trainers.configs import TrainConfig, option
from trainers.data.collate import collate_pairs
from trainers.data.preference import load_preference_split
from trainers.data.tokenize import encode_pair
from trainers.export import save_and_register
from trainers.loop import run_training
from trainers.modeling import load_tokenizer, seed_everything, set_up_training
from trainers.registered_adapters import (
    REFERENCE,
    load_policy_and_reference,
    registered_adapter,
    use_adapter,
)

logger = logging.getLogger(__name__)

TASK = "dpo"
START_TASKS = ("instruction", "dpo", "ppo")
SHARED_BASE_METHODS = ("lora", "qlora")

HELP = "Align a causal LM to preference pairs with DPO (LoRA/QLoRA; reference = the same base)."
EXAMPLE = (
    "adapterdock train dpo --base tiny --data trainers/sample_data/preference_pairs.jsonl "
    "--name my-dpo --beta 0.1 --max-length 128"
)

Batch = dict[str, torch.Tensor]


@dataclass
class Config(TrainConfig):
    """DPO options (on top of the shared training options)."""

    data: str = option(
        "",
        "Preference pairs: JSONL with prompt/chosen/rejected (strings or chat messages), "
        "or Anthropic HH chosen/rejected dialogues.",
        required=True,
    )
    from_adapter: str | None = option(
        None,
        "Start from this registered instruction (SFT) adapter, which also serves as the frozen "
        "reference (default: a new LoRA adapter; reference = the base).",
        flag="from",
    )
    beta: float = option(0.1, "DPO beta: strength of the implicit KL constraint to the reference.")
    label_smoothing: float = option(
        0.0, "Conservative DPO: assumed share of flipped preference labels (0 = plain DPO)."
    )

    def problems(self) -> list[str]:
        found = super().problems()
        if self.method not in SHARED_BASE_METHODS:
            found.append(
                f"--method {self.method} is not supported by dpo: the reference is the base with "
                "the adapter disabled, so use lora or qlora"
            )
        if not self.beta > 0:
            found.append(f"--beta must be > 0, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            found.append(f"--label-smoothing must be in [0, 0.5), got {self.label_smoothing}")
        return found


def response_logps(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed response log-probs [2B], logits [2B, T, V]) of a `collate_pairs` batch."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return losses.sequence_logprobs(logits, batch["labels"]), logits


def train(config: Config) -> Manifest | None:
    """Train, evaluate and register a DPO adapter; None on non-main processes."""
    config.validate()
    seed_everything(config.seed)
    base = resolve_base(config.base, registry=config.registry)
    split = load_preference_split(config.data, config.eval, config.eval_fraction, config.seed)
    start = None
    if config.from_adapter:
        start = registered_adapter(config.from_adapter, config.registry, base, START_TASKS, "--from-adapter")
        split.info["from"] = start.manifest.ref
    tokenizer = load_tokenizer(base)
    train_pairs = [encode_pair(tokenizer, p, config.max_length) for p in split.train]
    eval_pairs = [encode_pair(tokenizer, p, config.max_length) for p in split.eval]

    setup = set_up_training(config, base, TASK, tokenizer, prepare=start is None)
    if start is None:
        policy = setup.model
    else:
        policy = load_policy_and_reference(setup.model, start.path, quantized=setup.method.quantized)
        logger.info("policy and reference start from %s (its LoRA shape is kept)", start.manifest.ref)
    reference_adapter = REFERENCE if start is not None else None

    def reference(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad(), use_adapter(policy, reference_adapter):
            return response_logps(policy, batch)

    def loss_fn(model: torch.nn.Module, batch: Batch) -> Any:
        policy_logps, _ = response_logps(model, batch)
        ref_logps, _ = reference(batch)
        out = losses.dpo_loss(
            *policy_logps.chunk(2), *ref_logps.chunk(2), config.beta, config.label_smoothing
        )
        return out.loss, losses.preference_metrics(out.chosen_rewards, out.rejected_rewards)

    def eval_step(model: torch.nn.Module, batch: Batch) -> list[Any]:
        policy_logps, logits = response_logps(model, batch)
        ref_logps, ref_logits = reference(batch)
        mask = (batch["labels"][:, 1:] != losses.IGNORE_INDEX).float()
        kl = (losses.token_kl(logits[:, :-1], ref_logits[:, :-1]) * mask).sum(-1)
        columns = (*policy_logps.chunk(2), *ref_logps.chunk(2), *kl.chunk(2), *mask.sum(-1).chunk(2))
        return list(zip(*(c.tolist() for c in columns), strict=True))

    def compute_metrics(outputs: list[Any]) -> dict[str, float]:
        pc, pr, rc, rr, kl_c, kl_r, n_c, n_r = torch.tensor(outputs, dtype=torch.float64).T
        out = losses.dpo_loss(pc, pr, rc, rr, config.beta, config.label_smoothing)
        rewards = losses.preference_metrics(out.chosen_rewards, out.rejected_rewards)
        return {
            "loss": float(out.loss),
            "reward_accuracy": rewards["accuracy"],
            "reward_margin": rewards["margin"],
            "logp_accuracy": losses.preference_metrics(pc, pr)["accuracy"],
            "kl": float((kl_c + kl_r).sum() / (n_c + n_r).sum().clamp(min=1)),
        }

    result = run_training(
        policy, train_pairs, eval_pairs, lambda b: collate_pairs(b, tokenizer.pad_token_id),
        config, setup.accelerator, eval_step=eval_step, compute_metrics=compute_metrics,
        loss_fn=loss_fn,
    )  # fmt: skip
    logger.info(
        "dpo eval reward accuracy %.3f (before %.3f), logp accuracy %.3f (before %.3f), kl %.4f",
        result.metrics["reward_accuracy"], result.baseline.get("reward_accuracy", float("nan")),
        result.metrics["logp_accuracy"], result.baseline.get("logp_accuracy", float("nan")),
        result.metrics["kl"],
    )  # fmt: skip
    if not setup.accelerator.is_main_process:
        return None
    if start is not None:
        result.model.delete_adapter(REFERENCE)  # save only the trained adapter
    return save_and_register(
        result.model, tokenizer=tokenizer, config=config, task=TASK, method=setup.method,
        device=setup.device, base=base, labels=[], result=result, data=split.info,
    )  # fmt: skip
