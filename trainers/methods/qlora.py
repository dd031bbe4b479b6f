"""QLoRA: LoRA on a base loaded in 4-bit NF4 with double quantization (bitsandbytes).

Boundary: `load_kwargs` tells `from_pretrained` how to quantize; `prepare` runs PEFT's k-bit
training preparation (frozen base, fp32 norms and head, input grads) and adds LoRA exactly as
`trainers.methods.lora` does. Compute runs in fp32 on CPU and bf16 on GPU. Task heads (`score`)
and `lm_head` stay unquantized. The saved folder is a plain PEFT LoRA adapter, so it also loads
onto the unquantized base. On a GPU it steps with bitsandbytes' paged 8-bit AdamW. bitsandbytes
is imported lazily (by transformers, and here for the optimizer), only when used.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from peft import PeftModel, prepare_model_for_kbit_training

from trainers.configs import TrainConfig
from trainers.methods.lora import LoRA

SKIP_MODULES = ["score", "lm_head"]


def compute_dtype(device: str) -> torch.dtype:
    """bf16 on a GPU that supports it, fp32 otherwise (CPU 4-bit kernels compute in fp32)."""
    if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


class QLoRA(LoRA):
    """LoRA on a 4-bit NF4 base; paged 8-bit AdamW on a GPU; saved as a plain PEFT adapter."""

    name = "qlora"
    quantized = True

    def load_kwargs(self, config: TrainConfig, device: str) -> dict[str, Any]:
        """`quantization_config` for a 4-bit NF4 load (heads kept in full precision)."""
        from transformers import BitsAndBytesConfig

        dtype = compute_dtype(device)
        bnb = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            llm_int8_skip_modules=SKIP_MODULES,
        )
        kwargs: dict[str, Any] = {"quantization_config": bnb}
        if device.startswith("cuda"):
            kwargs["device_map"] = {"": torch.cuda.current_device()}
        return kwargs

    def prepare(self, model: torch.nn.Module, config: TrainConfig, task: str) -> PeftModel:
        """k-bit training preparation, then LoRA (seeded) on the quantized base."""
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        return super().prepare(model, config, task)

    def optimizer(
        self, params: Iterable[torch.nn.Parameter], config: TrainConfig, device: torch.device
    ) -> torch.optim.Optimizer:
        """bitsandbytes' paged 8-bit AdamW on a GPU; AdamW elsewhere."""
        if device.type != "cuda":
            return super().optimizer(params, config, device)
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(params, lr=config.learning_rate, weight_decay=config.weight_decay)

    def quantization(self, config: TrainConfig, device: str) -> dict[str, Any]:
        """What the manifest records: 4-bit NF4, double quantization, compute dtype."""
        return {
            "bits": 4,
            "quant_type": "nf4",
            "double_quant": True,
            "compute_dtype": str(compute_dtype(device)).removeprefix("torch."),
            "library": "bitsandbytes",
        }
