"""Adaptation methods: which weights train, how the base is loaded for them, how results are saved.

A `Method` is one typed object per method (`lora`, `qlora`, `dora`, `qdora`, `bottleneck`, `full`); a
recipe calls `method = get_method(config.method)` and then, in this order:

- `method.load_kwargs(config, device)`: extra `from_pretrained` arguments (quantization);
- `method.prepare(model, config, task)`: freeze/wrap the base (seeded, for a repeatable init);
- `method.optimizer(params, config, device)`: what the loop steps with;
- `method.save(model, out_dir, tokenizer)`: write the adapter (or model) folder;
- `method.quantization(config, device)`: the record the manifest keeps (None: not quantized).

Boundary: the interface and the lookup only. Each method lives in its own module, imported when
first asked for, so picking `bottleneck` never imports PEFT and `qlora` alone reaches bitsandbytes.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from hub.manifest import METHODS

if TYPE_CHECKING:
    from trainers.configs import TrainConfig

# name -> (module, class); the names are hub.manifest.METHODS
_CLASSES = {
    "lora": ("trainers.methods.lora", "LoRA"),
    "qlora": ("trainers.methods.qlora", "QLoRA"),
    "dora": ("trainers.methods.dora", "DoRA"),
    "qdora": ("trainers.methods.dora", "QDoRA"),
    "bottleneck": ("trainers.methods.bottleneck", "BottleneckMethod"),
    "full": ("trainers.methods.full", "FullFineTuning"),
}


class Method(ABC):
    """How one adaptation method turns a base into a trainable model and saves the result.

    Methods hold no state: every call gets the run's config, so one instance serves any run.

    Attributes:
        name: the method's name as the manifest records it (one of `hub.manifest.METHODS`).
        kind: "adapter" (swappable on a base) or "model" (a complete model, served as a base).
        adapter_format: the saved folder's format: "peft", "bottleneck" or "hf-model".
        quantized: whether the base is loaded k-bit quantized (so it needs k-bit preparation).
    """

    name: ClassVar[str]
    kind: ClassVar[str] = "adapter"
    adapter_format: ClassVar[str]
    quantized: ClassVar[bool] = False

    def load_kwargs(self, config: TrainConfig, device: str) -> dict[str, Any]:
        """Extra `from_pretrained` arguments for the base (none unless the method quantizes)."""
        return {}

    @abstractmethod
    def prepare(self, model: torch.nn.Module, config: TrainConfig, task: str) -> torch.nn.Module:
        """Freeze or wrap the loaded base so that exactly the method's weights train."""

    def optimizer(
        self, params: Iterable[torch.nn.Parameter], config: TrainConfig, device: torch.device
    ) -> torch.optim.Optimizer:
        """AdamW over `params` at the run's learning rate and weight decay."""
        return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)

    @abstractmethod
    def save(self, model: torch.nn.Module, out_dir: Path, tokenizer: Any = None) -> None:
        """Write the trained result to `out_dir` in `adapter_format`."""

    def quantization(self, config: TrainConfig, device: str) -> dict[str, Any] | None:
        """What the manifest records about quantization (None: the base is not quantized)."""
        return None


def get_method(name: str) -> Method:
    """The `Method` for `name` (one of hub.manifest.METHODS).

    Raises:
        ValueError: an unknown name.
    """
    if name not in METHODS or name not in _CLASSES:
        raise ValueError(f"unknown method {name!r}; use one of {', '.join(METHODS)}")
    module_name, class_name = _CLASSES[name]
    return getattr(importlib.import_module(module_name), class_name)()
