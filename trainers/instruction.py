"""Recipe: instruction tuning (causal LM + LoRA/QLoRA/bottleneck/full), loss on assistant tokens only.

Run it as `adapterdock train instruction --base tiny --data chats.jsonl --name my-assistant`.
Reads JSONL/JSON in chat form (`messages`: role/content) or alpaca form (`instruction`, `input`,
`output`), renders each conversation with the base's chat template, and masks everything but the
assistant's turns. Reports eval loss and perplexity next to the untrained adapter's, and
registers the result as an ordinary generation adapter (no labels).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from hub.bases import resolve_base
from hub.manifest import Manifest
from trainers.configs import TrainConfig
from trainers.data.collate import collate_fn
from trainers.data.readers import read_instruction
from trainers.data.records import ChatRecord, split_off_eval
from trainers.data.tokenize import IGNORE_INDEX, tokenize_instruction
from trainers.export import save_and_register
from trainers.loop import run_training
from trainers.metrics import token_loss_scores
from trainers.modeling import load_tokenizer, seed_everything, set_up_training

logger = logging.getLogger(__name__)

TASK = "instruction"
HELP = "Instruction-tune a generation adapter (chat `messages` or alpaca rows)."
EXAMPLE = (
    "adapterdock train instruction --base tiny --data chats.jsonl --name my-assistant "
    "--method qlora --max-length 512"
)


@dataclass
class Config(TrainConfig):
    """Options of the instruction recipe."""


def load_data(config: Config) -> tuple[list[ChatRecord], list[ChatRecord]]:
    """Read conversations and split off eval if needed (no model yet)."""
    records = read_instruction(config.data)
    if config.eval:
        return records, read_instruction(config.eval)
    return split_off_eval(records, config.eval_fraction, config.seed)


def eval_step(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> list[Any]:
    """Per conversation: (summed next-token loss over assistant tokens, number of those tokens)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    losses = F.cross_entropy(
        logits[:, :-1].transpose(1, 2).float(), targets, ignore_index=IGNORE_INDEX, reduction="none"
    )
    mask = targets != IGNORE_INDEX
    return [(float(losses[i][mask[i]].sum()), int(mask[i].sum())) for i in range(len(targets))]


def compute_metrics(outputs: list[tuple[float, int]]) -> dict[str, float]:
    """Token-weighted eval loss and perplexity over the whole eval set."""
    return token_loss_scores(sum(o[0] for o in outputs), sum(o[1] for o in outputs))


def train(config: Config) -> Manifest | None:
    """Train, evaluate and register an instruction adapter.

    Returns:
        The registered manifest (on the main process; None on the other processes).

    Raises:
        ConfigError, DataError (before any training), BaseNotFoundError.
    """
    config.validate()
    base = resolve_base(config.base, registry=config.registry)
    train_records, eval_records = load_data(config)

    seed_everything(config.seed)
    tokenizer = load_tokenizer(base)
    train_examples = tokenize_instruction(train_records, tokenizer, config.max_length)
    eval_examples = tokenize_instruction(eval_records, tokenizer, config.max_length)
    setup = set_up_training(config, base, TASK, tokenizer)

    result = run_training(
        setup.model, train_examples, eval_examples, collate_fn(tokenizer.pad_token_id), config,
        setup.accelerator, eval_step=eval_step, compute_metrics=compute_metrics,
    )  # fmt: skip
    if not setup.accelerator.is_main_process:
        return None
    data = {
        "train": config.data,
        "eval": config.eval or f"{config.eval_fraction:.0%} of train (seed {config.seed})",
        "train_conversations": len(train_examples),
        "eval_conversations": len(eval_examples),
        "loss_on": "assistant tokens only (chat template)",
    }
    return save_and_register(
        result.model, tokenizer=tokenizer, config=config, task=TASK, method=setup.method,
        device=setup.device, base=base, labels=[], result=result, data=data,
    )  # fmt: skip
