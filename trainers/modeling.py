"""Load a base model and tokenizer for a task: the Auto class, the pad token, the seed.

Boundary: a resolved `hub.bases.BaseInfo` in, a `transformers` model out. Which weights get trained
is the methods' business (`trainers.methods`): `set_up_training`, the setup every recipe shares,
asks the run's `Method` how to load the base and lets it adapt the model; this module never wraps
a model itself. Call `seed_everything` before loading, so a task head's random init (and, later,
the adapter's) is the same on every run with the same seed.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    PreTrainedModel,
)

from hub.bases import BaseInfo
from trainers.configs import ConfigError, TrainConfig
from trainers.loop import create_accelerator
from trainers.methods import Method, get_method

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
_BLOCK = re.compile(r"\.layers\.\d+\.")
"""Where a decoder block's modules sit in every supported architecture (`model.layers.N.`)."""


def block_linear_names(model: torch.nn.Module) -> list[str]:
    """The last name part of every linear inside the decoder blocks, sorted: what `all-linear` means.

    Read off the model, so each architecture gets its own names (Phi-3's fused `qkv_proj` and
    `gate_up_proj`, Llama's seven projections) and heads (`score`, `lm_head`) are never included.
    bitsandbytes' 4-bit and 8-bit linears subclass `nn.Linear`, so a quantized base answers the same.

    Raises:
        ConfigError: no linear inside `layers.N.` (an architecture laid out otherwise): name the modules.
    """
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and _BLOCK.search(name)
    }
    if not names:
        raise ConfigError(
            f"--target-modules all-linear found no linear layer in the decoder blocks of "
            f"{type(model).__name__}; name the modules to adapt, e.g. --target-modules q_proj v_proj."
        )
    return sorted(names)


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


@dataclass
class TrainingSetup:
    """What a recipe holds once its model is ready for the loop."""

    accelerator: Accelerator
    """Where the run happens (device, processes, mixed precision)."""
    method: Method
    """How the base was loaded and adapted; it also saves the result (`trainers.export`)."""
    model: torch.nn.Module
    """The loaded base, adapted by `method.prepare` (or as loaded, with `prepare=False`)."""

    @property
    def device(self) -> str:
        """The accelerator's device as a string, as `Method` calls take it."""
        return str(self.accelerator.device)


def set_up_training(
    config: TrainConfig,
    base: BaseInfo,
    task: str,
    tokenizer: Any,
    labels: list[str] | None = None,
    *,
    prepare: bool = True,
) -> TrainingSetup:
    """The setup every recipe shares: accelerator, method, base loaded for the method, adapted.

    Seeding stays with the recipe (call `seed_everything` before this, so the head's init is
    repeatable; `Method.prepare` seeds again before the adapter's init).

    Args:
        config: the run's config (`method` picks the `Method`).
        base, task, tokenizer, labels: as for `load_model`.
        prepare: False leaves the adapting to the caller (DPO starting from a registered adapter).
    """
    accelerator = create_accelerator(config)
    method = get_method(config.method)
    model = load_model(base, task, tokenizer, labels, **method.load_kwargs(config, str(accelerator.device)))
    if prepare:
        model = method.prepare(model, config, task)
    return TrainingSetup(accelerator, method, model)
