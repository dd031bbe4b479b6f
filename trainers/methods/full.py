"""Full fine-tuning: every weight trains; the result is a complete HF model folder.

Boundary: the model is returned unwrapped with all parameters trainable; `save` writes
`config.json`, `model.safetensors` and the tokenizer files. The registry records it as kind
"model" (adapter_format "hf-model"): the server serves it as a base, not as a swappable adapter.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from trainers.configs import TrainConfig
from trainers.modeling import seed_everything

KIND = "model"
ADAPTER_FORMAT = "hf-model"


def load_kwargs(config: TrainConfig, device: str) -> dict[str, Any]:
    """No extra loading arguments."""
    return {}


def quantization(config: TrainConfig, device: str) -> dict[str, Any] | None:
    """Full fine-tuning uses no quantization."""
    return None


def prepare(model: torch.nn.Module, config: TrainConfig, task: str) -> torch.nn.Module:
    """Make every parameter trainable."""
    seed_everything(config.seed)
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    return model


def save(model: Any, out_dir: Path, tokenizer: Any = None) -> None:
    """`save_pretrained` (safetensors) plus the tokenizer, so the folder is a loadable base."""
    model.save_pretrained(out_dir, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
