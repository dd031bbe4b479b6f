"""LoRA through PEFT: low-rank updates on the chosen linear layers, task heads in `modules_to_save`.

Boundary: a loaded base model in, a `peft.PeftModel` out; saved in PEFT's own format, so
`PeftModel.from_pretrained(AutoModelFor<Task>.from_pretrained(base, num_labels=N), folder)` reloads
it (the `score` head included) with no adapterdock code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from trainers.configs import TrainConfig
from trainers.methods import Method
from trainers.modeling import (
    HEAD_MODULES,
    PEFT_TASK_TYPES,
    block_linear_names,
    has_head,
    seed_everything,
)


def lora_config(
    config: TrainConfig, task: str, model: torch.nn.Module, *, use_dora: bool = False
) -> LoraConfig:
    """PEFT's LoraConfig for this run (heads of labelled tasks are trained and saved in full).

    Args:
        model: the base being wrapped; `all-linear` is expanded to its own block linears.
        use_dora: DoRA (`trainers.methods.dora`): the update split into magnitude and direction.
    """
    targets = block_linear_names(model) if config.wants_all_linear() else config.resolved_target_modules()
    return LoraConfig(
        task_type=PEFT_TASK_TYPES[task],
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=targets,
        modules_to_save=list(HEAD_MODULES) if has_head(task) else None,
        use_dora=use_dora,
    )


class LoRA(Method):
    """LoRA on the full-precision base; AdamW; saved as a PEFT adapter; no quantization."""

    name = "lora"
    adapter_format = "peft"
    use_dora: ClassVar[bool] = False
    """Whether the LoRA is a DoRA (`trainers.methods.dora`)."""

    def prepare(self, model: torch.nn.Module, config: TrainConfig, task: str) -> PeftModel:
        """Wrap `model` with LoRA; seeds first so the adapter's init is repeatable."""
        seed_everything(config.seed)
        base_name = config.base
        model.config.name_or_path = base_name
        peft_model = get_peft_model(model, lora_config(config, task, model, use_dora=self.use_dora))
        peft_model.peft_config["default"].base_model_name_or_path = base_name
        return peft_model

    def save(self, model: torch.nn.Module, out_dir: Path, tokenizer: Any = None) -> None:
        """`save_pretrained` in safetensors (adapter_config.json + adapter_model.safetensors).

        Embeddings are never trained here, so PEFT's check for a resized vocabulary (which looks the
        base up by name, possibly online) is skipped.
        """
        model.save_pretrained(out_dir, safe_serialization=True, save_embedding_layers=False)
