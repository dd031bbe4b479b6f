"""Reward model recipe: a scalar head on the base, trained on preference pairs (Bradley-Terry).

`adapterdock train reward --base BASE --data PAIRS [--eval PAIRS] --name NAME [--method ...]`

The model is the base's sequence-classification form with one output (`num_labels=1`); the score
of a text is the head applied to the hidden state of its last token (the assistant's end-of-turn
token, since prompt + reply are rendered with the chat template). LoRA/QLoRA adapters keep the
head in `modules_to_save`, so `PeftModel.from_pretrained(AutoModelForSequenceClassification
.from_pretrained(base, num_labels=1), folder)` reloads it. Loss: -log sigmoid(r_chosen -
r_rejected) (`trainers.losses.bradley_terry_loss`); eval metrics: pairwise accuracy and mean
margin, before and after training. Registered with task "reward".
Boundary: the recipe only; data reading, the loop and registration are shared modules.
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

logger = logging.getLogger(__name__)

TASK = "reward"
LABELS = ["reward"]  # one output: the scalar reward

HELP = "Train a reward model (scalar head, Bradley-Terry loss) on preference pairs."
EXAMPLE = (
    "adapterdock train reward --base tiny --data trainers/sample_data/preference_pairs.jsonl "
    "--name my-reward --max-length 128"
)


@dataclass
class Config(TrainConfig):
    """Reward-model options (on top of the shared training options)."""

    data: str = option(
        "",
        "Preference pairs: JSONL with prompt/chosen/rejected (strings or chat messages), "
        "or Anthropic HH chosen/rejected dialogues.",
        required=True,
    )
    center_rewards: float = option(
        0.0,
        "Weight of an auxiliary (r_chosen + r_rejected)^2 term that keeps rewards near zero (0 disables).",
    )

    def problems(self) -> list[str]:
        found = super().problems()
        if self.center_rewards < 0:
            found.append(f"--center-rewards must be >= 0, got {self.center_rewards}")
        return found


def pair_rewards(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Scalar rewards [2B] of a `collate_pairs` batch (chosen rows first)."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]


def train(config: Config) -> Manifest | None:
    """Train, evaluate and register a reward adapter; None on non-main processes."""
    config.validate()
    seed_everything(config.seed)
    base = resolve_base(config.base, registry=config.registry)
    split = load_preference_split(config.data, config.eval, config.eval_fraction, config.seed)
    tokenizer = load_tokenizer(base)
    train_pairs = [encode_pair(tokenizer, p, config.max_length) for p in split.train]
    eval_pairs = [encode_pair(tokenizer, p, config.max_length) for p in split.eval]

    setup = set_up_training(config, base, TASK, tokenizer, LABELS)

    def loss_fn(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> Any:
        chosen, rejected = pair_rewards(model, batch).float().chunk(2)
        loss = losses.bradley_terry_loss(chosen, rejected)
        if config.center_rewards:
            loss = loss + config.center_rewards * ((chosen + rejected) ** 2).mean()
        return loss, losses.preference_metrics(chosen.detach(), rejected.detach())

    def eval_step(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> list[Any]:
        chosen, rejected = pair_rewards(model, batch).float().chunk(2)
        return list(zip(chosen.tolist(), rejected.tolist(), strict=True))

    def compute_metrics(outputs: list[Any]) -> dict[str, float]:
        chosen = torch.tensor([c for c, _ in outputs])
        rejected = torch.tensor([r for _, r in outputs])
        metrics = losses.preference_metrics(chosen, rejected)
        metrics["loss"] = float(losses.bradley_terry_loss(chosen, rejected))
        return metrics

    result = run_training(
        setup.model, train_pairs, eval_pairs, lambda b: collate_pairs(b, tokenizer.pad_token_id),
        config, setup.accelerator, eval_step=eval_step, compute_metrics=compute_metrics,
        loss_fn=loss_fn,
    )  # fmt: skip
    logger.info(
        "reward eval accuracy %.3f (before %.3f), margin %.3f",
        result.metrics["accuracy"], result.baseline.get("accuracy", float("nan")),
        result.metrics["margin"],
    )  # fmt: skip
    if not setup.accelerator.is_main_process:
        return None
    return save_and_register(
        result.model, tokenizer=tokenizer, config=config, task=TASK, method=setup.method,
        device=setup.device, base=base, labels=LABELS, result=result, data=split.info,
    )  # fmt: skip
