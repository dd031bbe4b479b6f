"""Load a base model and tokenizer for a task: the Auto class, the pad token, the seed.

Boundary: a resolved `hub.bases.BaseInfo` in, a `transformers` model (not yet adapted) out. Which
weights get trained is the methods' business (`trainers.methods`); this module never wraps a model.
Call `seed_everything` before loading, so a task head's random init (and, later, the adapter's)
is the same on every run with the same seed.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from accelerate.utils import set_seed
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    PreTrainedModel,
)

from hub.bases import BaseInfo

logger = logging.getLogger(__name__)

AUTO_CLASSES = {
    "classification": AutoModelForSequenceClassification,
    "reward": AutoModelForSequenceClassification,
    "ner": AutoModelForTokenClassification,
    "instruction": AutoModelForCausalLM,
    "dpo": AutoModelForCausalLM,
    "ppo": AutoModelForCausalLM,
}
PEFT_TASK_TYPES = {
    "classification": "SEQ_CLS",
    "reward": "SEQ_CLS",
    "ner": "TOKEN_CLS",
    "instruction": "CAUSAL_LM",
    "dpo": "CAUSAL_LM",
    "ppo": "CAUSAL_LM",
}
HEAD_MODULES = ("score",)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) and make CPU kernels deterministic where cheap."""
    set_seed(seed)


def has_head(task: str) -> bool:
    """Whether the task's model has a freshly initialised head (`score`) that must be trained."""
    return AUTO_CLASSES[task] is not AutoModelForCausalLM


def load_tokenizer(base: BaseInfo) -> Any:
    """The base's tokenizer, with a pad token (EOS stands in when the base has none)."""
    tokenizer = AutoTokenizer.from_pretrained(base.path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
        logger.info("base %s has no pad token; using eos %r", base.name_or_path, tokenizer.eos_token)
    tokenizer.padding_side = "right"
    return tokenizer


def load_model(
    base: BaseInfo,
    task: str,
    tokenizer: Any,
    labels: list[str] | None = None,
    **load_kwargs: Any,
) -> PreTrainedModel:
    """Load the base with the task's Auto class (and a `len(labels)`-way head for labelled tasks).

    Args:
        base: the resolved base.
        task: one of `AUTO_CLASSES`.
        tokenizer: its pad id is written into the model config (sequence classification needs it).
        labels: class names (index = id) for classification/NER; one label for a reward head.
        **load_kwargs: passed to `from_pretrained` (e.g. `quantization_config`, `dtype`).
    """
    kwargs: dict[str, Any] = {"dtype": torch.float32, **load_kwargs}
    if has_head(task):
        labels = labels or ["score"]
        kwargs |= {
            "num_labels": len(labels),
            "id2label": dict(enumerate(labels)),
            "label2id": {label: index for index, label in enumerate(labels)},
        }
    model = AUTO_CLASSES[task].from_pretrained(base.path, **kwargs)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count as their unpacked size."""
    trainable = total = 0
    for parameter in model.parameters():
        count = parameter.numel()
        if parameter.__class__.__name__ == "Params4bit":
            count *= 2
        total += count
        if parameter.requires_grad:
            trainable += count
    return trainable, total
