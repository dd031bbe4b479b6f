"""Tiny random bases of every architecture the engine declares, built locally with transformers.

Each is a real transformers model of its family (hidden 64, 2 layers, grouped-query attention) with the
family's own details switched on where they change results: attention biases (Qwen2), q/k norms
(Qwen3), short sliding windows (Mistral, Gemma 2/3, Phi-3) so test prompts cross them, attention and
final logit soft-capping small enough to bite (Gemma 2), fused qkv/gate_up (Phi-3), tied embeddings
(Gemma). They share the built-in tiny base's tokenizer (vocabulary and chat template), so prompts and
trainers work unchanged. `build_arch_base(family, out)` writes an HF folder (safetensors);
`LORA_TARGETS[family]` names its LoRA target modules as PEFT sees them.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from hub.builtin_bases import BOS, IM_END, PAD, VOCAB_SIZE

FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3_text", "phi3"]
"""model_type of each family under test (the engine's declared list)."""

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_TARGETS: dict[str, list[str]] = {f: ALL_LINEAR for f in FAMILIES} | {
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
}
"""Every block linear of the family, by PEFT target name."""

_COMMON: dict[str, Any] = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    pad_token_id=PAD,
    bos_token_id=BOS,
    eos_token_id=IM_END,
)

_FAMILY_CONFIG: dict[str, dict[str, Any]] = {
    "llama": dict(tie_word_embeddings=False),
    "qwen2": dict(tie_word_embeddings=False),  # q/k/v biases are Qwen2's default
    "qwen3": dict(head_dim=16, tie_word_embeddings=True),
    "mistral": dict(sliding_window=5, tie_word_embeddings=False),
    "gemma2": dict(
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=5,
        attn_logit_softcapping=2.0,
        final_logit_softcapping=3.0,
        hidden_activation="gelu_pytorch_tanh",
    ),
    "gemma3_text": dict(
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=5,
        layer_types=["sliding_attention", "full_attention"],
    ),
    "phi3": dict(sliding_window=6, tie_word_embeddings=False),
}


def arch_config(family: str) -> Any:
    """The transformers config of tiny `family`."""
    from transformers import AutoConfig

    return AutoConfig.for_model(family, **_COMMON, **_FAMILY_CONFIG[family])


def build_arch_base(family: str, out: Path, tokenizer_from: Path, seed: int = 0) -> Path:
    """Write a tiny random `family` model with the tiny base's tokenizer into `out` (returned)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(arch_config(family))
    with torch.no_grad():  # larger than the 0.02 init, so logits (and soft-capping) are not all ~0
        for name, param in model.named_parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.08)
            elif "norm" in name and "gemma" not in family:
                param.fill_(1.0)
    model.save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer_from / name).is_file():
            shutil.copy(tokenizer_from / name, out / name)
    return out
