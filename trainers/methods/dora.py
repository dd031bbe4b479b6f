"""DoRA: LoRA whose update is split into a magnitude per output feature and a low-rank direction.

PEFT's `LoraConfig(use_dora=True)` on the full-precision base (`dora`) or on the 4-bit NF4 base exactly as
QLoRA loads it (`qdora`). Everything else is LoRA's and QLoRA's: target modules, rank, alpha, the task
head, the optimizer, the quantization record. The saved folder is PEFT's (adapter_config.json with
`use_dora: true`, a `lora_magnitude_vector` beside each module's factors), which `PeftModel.from_pretrained`
and `adapterdock serve` read; vLLM does not implement DoRA (`hub.vllm_resolver` refuses it).
"""

from __future__ import annotations

from trainers.methods.lora import LoRA
from trainers.methods.qlora import QLoRA


class DoRA(LoRA):
    """DoRA on the full-precision base."""

    name = "dora"
    use_dora = True


class QDoRA(QLoRA):
    """DoRA on the 4-bit NF4 base (QLoRA's loading, preparation and optimizer)."""

    name = "qdora"
    use_dora = True
