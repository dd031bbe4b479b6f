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
from trainers.methods import Method
from trainers.modeling import seed_everything


class FullFineTuning(Method):
    """Every weight trains; AdamW; saved as a complete HF model folder."""

    name = "full"
    kind = "model"
    adapter_format = "hf-model"

    def prepare(self, model: torch.nn.Module, config: TrainConfig, task: str) -> torch.nn.Module:
        """Make every parameter trainable."""
        seed_everything(config.seed)
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        return model

    def save(self, model: Any, out_dir: Path, tokenizer: Any = None) -> None:
        """`save_pretrained` (safetensors) plus the tokenizer, so the folder is a loadable base."""
        model.save_pretrained(out_dir, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(out_dir)
