"""Our slot KV cache, plugged into transformers' own decoder layers through its attention interface.

The engine runs the base model's own forward (embeddings with their scaling, rotary per layer type, q/k
norms, biases, fused projections, residuals, final norm: all the model's code), with the config's
`_attn_implementation` set to `ATTN_IMPLEMENTATION`. Every attention module then calls `kv_attention`
with its rotated q/k and its v; `kv_attention` writes them into the engine's preallocated cache rows,
reads each row's keys back and attends with a mask built here: causal, only the row's own valid keys,
and the layer's sliding window if it has one. Attention logit soft-capping (Gemma 2) is applied exactly,
in the eager formula. The per-forward state (`KVForward`) reaches the attention through the forward's
keyword arguments, which transformers passes down unchanged.

Boundary: attention math, the cache tensors and masks; which sequence lives in which cache row is the
engine's business, adapters are `lora_batch`'s. `SUPPORTED_MODEL_TYPES` is the declared list of
architectures the engine runs exactly; `check_supported` refuses anything else at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn import functional as F

from server.model_loader import UnsupportedModelError

ATTN_IMPLEMENTATION = "adapterdock_kv"
"""The name our attention is registered under in transformers' `AttentionInterface`."""
KV_KWARG = "adapterdock_kv"
"""The forward keyword that carries the `KVForward` down to every attention call."""

SUPPORTED_MODEL_TYPES: dict[str, str] = {
    "llama": "Llama (and SmolLM2, TinyLlama, ...)",
    "qwen2": "Qwen2 / Qwen2.5",
    "qwen3": "Qwen3 (dense)",
    "mistral": "Mistral",
    "gemma2": "Gemma 2",
    "gemma3_text": "Gemma 3 (text-only, e.g. gemma-3-1b)",
    "phi3": "Phi-3 / Phi-3.5 / Phi-4-mini",
}
"""config.json `model_type` -> the family it covers. Each is proven equal to PEFT in
tests/server/test_engine_architectures.py; add one only with its tiny config there."""


def check_supported(config: Any) -> None:
    """Refuse, before any weight is loaded, a base the engine cannot run exactly.

    Raises:
        UnsupportedModelError: naming the model type and the supported ones.
    """
    model_type = getattr(config, "model_type", None)
    supported = ", ".join(SUPPORTED_MODEL_TYPES)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"Base model type {model_type!r} is not supported by the serving engine "
            f"(supported: {supported}).",
            "Serve a base of a supported architecture; docs/server.md says how to add one.",
        )
    if getattr(config, "use_bidirectional_attention", False):
        raise UnsupportedModelError(
            f"Base model type {model_type!r} with use_bidirectional_attention=True is an encoder "
            "variant, not a causal LM; the engine serves causal decoders only.",
            "Serve the causal (generation) checkpoint of this family.",
        )


def exact_context(config: Any, requested: int) -> int:
    """The longest sequence the engine serves exactly: `requested`, capped by the base's positions.

    Rotary types whose frequencies depend on the batch's largest position (Phi-3's `longrope`, `dynamic`
    NTK) switch for the whole batch at `original_max_position_embeddings`, so a row past it would change
    its batch mates' positions (and its own cached keys were rotated the other way): cap there.
    """
    limit = min(requested, config.max_position_embeddings)
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if isinstance(rope, dict) and rope.get("rope_type") in ("longrope", "dynamic"):
        original = rope.get("original_max_position_embeddings") or getattr(
            config, "original_max_position_embeddings", None
        )
        if original:
            limit = min(limit, int(original))
    return limit


def skip_training_wrappers(model: torch.nn.Module) -> None:
    """Call each decoder layer's and attention module's own `forward` without transformers' wrappers.

    The wrappers are for training and API migration only (gradient checkpointing, a keyword rename),
    yet cost about 80 Python calls per layer per step: 6-9 % of a decode step on the 30-layer
    smollm2-135m at batch 1 (benchmarks/results/engine_arch_ab.md). The code run is the model's own.
    """
    import inspect
    import types

    for layer in model.base_model.layers:
        for module in (layer, layer.self_attn):
            module.forward = types.MethodType(inspect.unwrap(type(module).forward), module)


def register_attention() -> None:
    """Register `kv_attention` in transformers' attention interface (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, kv_attention)


@dataclass
class KVForward:
    """One forward's view of the cache: which rows it writes, where each row's keys end.

    Attributes:
        k_cache, v_cache: [layers, max_rows, kv_heads, max_len, head_dim].
        positions: [rows, tokens] position of each query token.
        lengths: [rows] keys each row may attend to after this step.
        mode: "prefill" (write `first_row`.. rows, attend within the prompt), "decode" (write one
            key per active row at its position, attend to the cache), "encode" (no cache at all).
    """

    k_cache: torch.Tensor
    v_cache: torch.Tensor
    positions: torch.Tensor
    lengths: torch.Tensor
    mode: str
    first_row: int = 0
    width: int = 0
    """Keys a decode step reads per row (the longest row's length); set by `__post_init__`."""
    _masks: dict[tuple[int | None, int], torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode == "decode":  # one host read per step, not one per layer
            self.width = int(self.lengths.max())

    def mask(self, window: int | None, groups: int) -> torch.Tensor:
        """[rows, 1, groups * queries, keys] bool mask for a layer with this sliding window."""
        key = (window, groups)
        if key not in self._masks:
            mask = self._build_mask(window)
            self._masks[key] = mask.repeat(1, 1, groups, 1) if groups > 1 else mask
        return self._masks[key]

    def _build_mask(self, window: int | None) -> torch.Tensor:
        device = self.positions.device
        lengths = self.lengths.view(-1, 1, 1)
        queries = self.positions.unsqueeze(-1)  # [rows, tokens, 1]
        width = self.width if self.mode == "decode" else self.positions.shape[1]
        keys = torch.arange(width, device=device).view(1, 1, -1)
        allowed = (keys <= queries) & (keys < lengths)
        if window is not None:  # transformers' sliding_window_overlay: kv > q - window
            allowed &= keys > queries - window
            # a padding query past its row's end may see no key at all: let it see itself, so its
            # (discarded) output stays finite instead of NaN that later layers would multiply by 0
            allowed |= (keys == queries) & (queries >= lengths)
        return allowed.unsqueeze(1)


def kv_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The attention transformers' modules call: q [rows, heads, tokens, dim], k/v [rows, kv, tokens, dim].

    Returns:
        ([rows, tokens, heads, dim], None), as transformers' attention functions do.
    """
    del attention_mask, dropout  # our mask is built from the KVForward; inference only
    state: KVForward | None = kwargs.get(KV_KWARG)
    if state is None:
        raise RuntimeError(f"{ATTN_IMPLEMENTATION} attention needs the engine's KV state (`{KV_KWARG}=`).")
    key, value = _through_cache(state, module.layer_idx, key, value)
    if softcap is not None:
        out = _softcapped(state, query, key, value, scaling, sliding_window, softcap)
    else:
        out = _folded_sdpa(state, query, key, value, scaling, sliding_window)
    return out.transpose(1, 2), None


def _through_cache(
    state: KVForward, layer: int, key: torch.Tensor, value: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Write this step's keys/values into the layer's cache; when decoding, read the rows' keys back."""
    rows, _, tokens, _ = key.shape
    if state.mode == "prefill":
        first = state.first_row
        state.k_cache[layer, first : first + rows, :, :tokens] = key
        state.v_cache[layer, first : first + rows, :, :tokens] = value
        return key, value
    if state.mode == "decode":
        row_index = torch.arange(rows, device=key.device)
        pos = state.positions[:, 0]
        state.k_cache[layer, row_index, :, pos] = key[:, :, 0]
        state.v_cache[layer, row_index, :, pos] = value[:, :, 0]
        width = state.width
        return state.k_cache[layer, :rows, :, :width], state.v_cache[layer, :rows, :, :width]
    return key, value


def _folded_sdpa(
    state: KVForward,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scaling: float | None,
    window: int | None,
) -> torch.Tensor:
    """Grouped-query attention without repeating K/V: query heads are folded per KV head."""
    rows, heads, tokens, dim = q.shape
    kv_heads = k.shape[1]
    groups = heads // kv_heads
    q = q.reshape(rows, kv_heads, groups * tokens, dim)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=state.mask(window, groups), scale=scaling)
    return out.reshape(rows, heads, tokens, dim)


def _softcapped(
    state: KVForward,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scaling: float | None,
    window: int | None,
    softcap: float,
) -> torch.Tensor:
    """Eager attention with logit soft-capping, the formula of transformers' Gemma 2 eager path."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    weights = torch.matmul(q, k.transpose(2, 3)) * scale
    weights = torch.tanh(weights / softcap) * softcap
    weights = weights.masked_fill(~state.mask(window, 1), torch.finfo(weights.dtype).min)
    weights = torch.softmax(weights, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(weights, v)
