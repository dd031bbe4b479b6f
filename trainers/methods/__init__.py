"""Adaptation methods: which weights train, how the base is loaded for them, how results are saved.

Each method module (`lora`, `qlora`, `bottleneck`, `full`) exposes the same small interface, so a
recipe calls `method = get_method(config.method)` and then:

- `method.load_kwargs(config, device) -> dict`: extra `from_pretrained` arguments (quantization).
- `method.prepare(model, config, task) -> model`: freeze/wrap the base; seed first for repeatability.
- `method.save(model, out_dir, tokenizer)`: write the adapter (or model) folder.
- `method.quantization(config, device) -> dict | None`: what the manifest records.
- `method.KIND` ("adapter" | "model") and `method.ADAPTER_FORMAT` ("peft" | "bottleneck" | "hf-model").
"""

from __future__ import annotations

import importlib
from types import ModuleType

from hub.manifest import METHODS


def get_method(name: str) -> ModuleType:
    """The method module for `name` (one of hub.manifest.METHODS)."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; use one of {', '.join(METHODS)}")
    return importlib.import_module(f"trainers.methods.{name}")
