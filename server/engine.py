"""The engine: one loaded base, adapters in slots, and our own batched Llama forward with a KV cache.

The forward calls the base's own modules (embedding, norms, rotary, q/k/v/o, MLP, lm_head), so bnb
quantized linears just work, while `lora_batch` adds each row's adapter inside those linears. The KV
cache is preallocated per layer for `max_batch_size` rows; each row has its own length and positions,
so sequences at different points of their generation decode in one step. Active rows are kept packed
at the front of the cache (a finished row is replaced by the last one), so a decode step reads plain
views, never a gather of the cache.

Boundary: tensors, slots and token ids. Only the scheduler's worker thread calls `prefill`, `decode`,
`release` and `encode` (a forward that overlaps another raises `ConcurrentForwardError`);
`load_adapter` / `unload_adapter` may run on any thread (a load reads and checks files first, then
copies into a slot no running row uses). Nothing here knows about HTTP, queues or text streaming.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from hub.manifest import Manifest
from server.adapter_weights import BaseLayout, read_adapter
from server.errors import EngineCapacityError, SequenceTooLongError
from server.heads import Head
from server.lora_batch import AdapterBanks
from server.model_loader import load_base

logger = logging.getLogger(__name__)

# Attention backends the engine lets SDPA choose from. cuDNN's is left out: it builds an execution
# plan per new key length, i.e. on every decode step (~10 ms per layer on an H100, measured in
# benchmarks/results/decode_step_profile_h100.md); the memory-efficient kernel takes our masks as is.
SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass
class LoadedAdapter:
    """An adapter resident in an engine slot."""

    key: str
    """Immutable "name@version"."""
    slot: int
    """Internal slot id (the public name is kept apart)."""
    task: str
    """The manifest's task."""
    labels: list[str]
    nbytes: int
    """Bytes its weights occupy (for the cache's byte bound)."""
    manifest: Manifest
    head: Head | None = field(default=None, repr=False)
    """Task head for classification / NER / reward adapters."""


@dataclass
class _Row:
    seq_id: int
    slot: int
    length: int
    """Tokens in the cache for this row."""


class Engine:
    """One base model serving many adapters, row by row."""

    def __init__(
        self,
        base_path: Path,
        *,
        base_name: str,
        quantize: str = "nf4",
        max_adapters: int = 16,
        max_rank: int = 64,
        max_batch_size: int = 16,
        max_seq_len: int = 1024,
        device: torch.device | None = None,
    ) -> None:
        """Load the base, wrap its linears with adapter banks, and allocate the KV cache.

        Args:
            base_path: local HF folder of the base.
            base_name: the name clients use for "no adapter".
            quantize: nf4, int8 or none.
            max_adapters: adapter slots (slot 0, "no adapter", comes on top).
            max_rank: largest LoRA rank (and bottleneck size) a slot holds.
            max_batch_size: rows of the KV cache (sequences decoding at once).
            max_seq_len: prompt + generated tokens per sequence.
        """
        from transformers import AutoTokenizer

        self.base_name = base_name
        self.base_path = Path(base_path)
        loaded = load_base(base_path, quantize, device)
        self.model, self.device, self.dtype = loaded.model, loaded.device, loaded.dtype
        self.quantize = quantize
        self.memory_footprint = loaded.memory_footprint
        self.tokenizer = AutoTokenizer.from_pretrained(str(base_path))
        self.config = self.model.config
        self.layout = BaseLayout.from_config(self.config)
        self.max_rank, self.max_batch_size = max_rank, max_batch_size
        self.max_seq_len = min(max_seq_len, self.config.max_position_embeddings)
        self.banks = AdapterBanks(
            self.model,
            self.layout,
            num_slots=max_adapters + 1,
            max_rank=max_rank,
            dtype=self.dtype,
            device=self.device,
        )
        self._free_slots = list(range(max_adapters, 0, -1))
        self._slot_lock = threading.Lock()
        self._heads: dict[int, Head] = {}
        self._init_cache()
        self._warm_up()
        logger.info(
            "engine ready: %d adapter slots (%.1f MiB of banks), %d rows x %d tokens of KV cache",
            max_adapters,
            self.banks.nbytes / 2**20,
            max_batch_size,
            self.max_seq_len,
        )

    def _warm_up(self) -> None:
        """One prefill and one decode step before the first request, so that request does not pay
        for first-use initialisation (cuBLAS handles, lazily loaded kernels)."""
        warm_id = -1
        logits = self.prefill([warm_id], [[self.tokenizer.bos_token_id or 0] * 4], [0])
        self.decode([int(logits[0].argmax())])
        self.release(warm_id)

    # ---- adapters --------------------------------------------------------------------------------
    def load_adapter(self, key: str, folder: Path, manifest: Manifest) -> LoadedAdapter:
        """Read, check and copy an adapter into a free slot. Blocking; safe from any thread.

        The manifest's base fingerprint was checked by `server.resolver` (the one check on the request
        path); here the weights are checked against the loaded base's shapes.

        Raises:
            CorruptAdapterError: unreadable or ill-fitting files (nothing is loaded).
            BaseMismatchError: weights shaped for another base.
            EngineCapacityError: every slot is taken.
        """
        weights = read_adapter(folder, manifest, self.layout, max_rank=self.max_rank)
        head = None
        if weights.head_weight is not None:
            bias = weights.head_bias
            head = Head(
                weight=weights.head_weight.to(self.device, self.dtype),
                bias=None if bias is None else bias.to(self.device, self.dtype),
            )
        with self._slot_lock:
            if not self._free_slots:
                raise EngineCapacityError(f"No free adapter slot for {key}.")
            slot = self._free_slots.pop()
        try:
            self.banks.write(slot, weights)
        except BaseException:
            with self._slot_lock:
                self._free_slots.append(slot)
            raise
        if head is not None:
            self._heads[slot] = head
        adapter = LoadedAdapter(
            key=key,
            slot=slot,
            task=manifest.task,
            labels=list(manifest.labels),
            nbytes=weights.nbytes,
            manifest=manifest,
            head=head,
        )
        logger.info(
            "adapter %s loaded into slot %d (%s, %d bytes)", key, slot, weights.method, adapter.nbytes
        )
        return adapter

    def unload_adapter(self, adapter: LoadedAdapter) -> None:
        """Free an adapter's slot. The caller guarantees no running request still uses it."""
        with self._slot_lock:
            if adapter.slot in self._free_slots or adapter.slot == 0:
                return
            self.banks.clear(adapter.slot)
            self._heads.pop(adapter.slot, None)
            self._free_slots.append(adapter.slot)
        logger.info("adapter %s unloaded from slot %d", adapter.key, adapter.slot)

    @property
    def free_slots(self) -> int:
        return len(self._free_slots)

    # ---- KV cache bookkeeping --------------------------------------------------------------------
    def _init_cache(self) -> None:
        cfg = self.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.num_heads, self.num_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = head_dim
        shape = (
            cfg.num_hidden_layers,
            self.max_batch_size,
            self.num_kv_heads,
            self.max_seq_len,
            head_dim,
        )
        self.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self._rows: list[_Row] = []

    @property
    def active_ids(self) -> list[int]:
        """Sequence ids of the rows in the cache, in row order (the order `decode` expects)."""
        return [row.seq_id for row in self._rows]

    @property
    def free_rows(self) -> int:
        return self.max_batch_size - len(self._rows)

    def release(self, seq_id: int) -> None:
        """Drop a sequence from the cache (no-op if absent); the last row moves into its place."""
        index = next((i for i, row in enumerate(self._rows) if row.seq_id == seq_id), None)
        if index is None:
            return
        last = len(self._rows) - 1
        if index != last:
            n = self._rows[last].length
            self.k_cache[:, index, :, :n] = self.k_cache[:, last, :, :n]
            self.v_cache[:, index, :, :n] = self.v_cache[:, last, :, :n]
            self._rows[index] = self._rows[last]
        self._rows.pop()

    # ---- forward passes --------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, seq_ids: list[int], prompts: list[list[int]], slots: list[int]) -> torch.Tensor:
        """Add sequences to the cache and run their prompts (padded into one batch).

        Returns:
            [len(prompts), vocab] fp32 logits of each prompt's last token.

        Raises:
            EngineCapacityError: not enough free rows. SequenceTooLongError: an empty or too long
                prompt.
        """
        if len(prompts) > self.free_rows:
            raise EngineCapacityError(f"{len(prompts)} prompts, {self.free_rows} free rows.")
        for prompt in prompts:
            self._check_length(len(prompt))
        start = len(self._rows)
        ids, lengths = self._pad(prompts)
        positions = torch.arange(ids.shape[1], device=self.device).expand_as(ids)
        hidden = self._forward(ids, positions, lengths, slots, cache_rows=(start, len(prompts)))
        for seq_id, slot, prompt in zip(seq_ids, slots, prompts, strict=True):
            self._rows.append(_Row(seq_id=seq_id, slot=slot, length=len(prompt)))
        last = hidden[torch.arange(len(prompts), device=self.device), lengths - 1]
        return self._logits(last)

    @torch.inference_mode()
    def decode(self, tokens: list[int]) -> torch.Tensor:
        """One decode step for every row: `tokens[i]` is appended to row i (see `active_ids`).

        Returns:
            [rows, vocab] fp32 logits for the next token of each row.
        """
        rows = self._rows
        if len(tokens) != len(rows):
            raise ValueError(f"decode got {len(tokens)} tokens for {len(rows)} rows")
        for row in rows:
            self._check_length(row.length + 1)
        ids = torch.tensor(tokens, dtype=torch.long, device=self.device).view(-1, 1)
        positions = torch.tensor([r.length for r in rows], device=self.device).view(-1, 1)
        hidden = self._forward(ids, positions, positions[:, 0] + 1, [r.slot for r in rows], decoding=True)
        for row in rows:
            row.length += 1
        return self._logits(hidden[:, -1])

    @torch.inference_mode()
    def encode(self, prompts: list[list[int]], slots: list[int]) -> list[torch.Tensor]:
        """Final hidden states (after the last norm) of each prompt, without touching the cache.

        Returns:
            One [len(prompt), hidden] tensor per prompt.
        """
        for prompt in prompts:
            self._check_length(len(prompt))
        ids, lengths = self._pad(prompts)
        positions = torch.arange(ids.shape[1], device=self.device).expand_as(ids)
        hidden = self._forward(ids, positions, lengths, slots)
        return [hidden[i, : len(p)] for i, p in enumerate(prompts)]

    def _check_length(self, n: int) -> None:
        if n < 1 or n > self.max_seq_len:
            raise SequenceTooLongError(
                f"A sequence of {n} tokens does not fit (1..{self.max_seq_len} tokens)."
            )

    def _pad(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(p) for p in prompts)
        pad = self.config.pad_token_id or 0
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        for i, prompt in enumerate(prompts):
            ids[i, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
        lengths = torch.tensor([len(p) for p in prompts], device=self.device)
        return ids.to(self.device), lengths

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(hidden).float()

    def _forward(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        lengths: torch.Tensor,
        slots: list[int],
        cache_rows: tuple[int, int] | None = None,
        decoding: bool = False,
    ) -> torch.Tensor:
        """Run the base with per-row adapters.

        Args:
            ids, positions: [rows, tokens].
            lengths: [rows] keys each row may attend to after this step (prompt length, or cache
                length + 1 when decoding).
            slots: adapter slot per row.
            cache_rows: (first row, count) when prefilling into the cache.
            decoding: one new token for each active row, attending to the cache.
        """
        inner = self.model.model
        hidden = inner.embed_tokens(ids)
        cos, sin = inner.rotary_emb(hidden, position_ids=positions)
        mask = self._mask(positions, lengths, decoding)
        groups = self.num_heads // self.num_kv_heads
        if groups > 1:  # one mask row per folded query head (see _attention), built once
            mask = mask.repeat(1, 1, groups, 1)
        with self.banks.forward(slots), sdpa_kernel(SDPA_BACKENDS):
            rope = (cos, sin)
            for index, layer in enumerate(inner.layers):
                hidden = self._layer(index, layer, hidden, rope, mask, positions, cache_rows, decoding)
        return inner.norm(hidden)

    def _mask(self, positions: torch.Tensor, lengths: torch.Tensor, decoding: bool) -> torch.Tensor:
        """[rows, 1, queries, keys] bool: causal, and only the row's own valid keys."""
        if decoding:
            keys = torch.arange(int(lengths.max()), device=self.device)
            return (keys.view(1, -1) < lengths.view(-1, 1)).view(len(lengths), 1, 1, -1)
        keys = torch.arange(positions.shape[1], device=self.device)
        causal = keys.view(1, 1, -1) <= positions.unsqueeze(-1)
        valid = keys.view(1, 1, -1) < lengths.view(-1, 1, 1)
        return (causal & valid).unsqueeze(1)

    def _layer(
        self,
        index: int,
        layer: torch.nn.Module,
        hidden: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor,
        positions: torch.Tensor,
        cache_rows: tuple[int, int] | None,
        decoding: bool,
    ) -> torch.Tensor:
        """One decoder layer (pre-norm attention then MLP), writing/reading this layer's cache."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        attn = layer.self_attn
        rows, tokens = hidden.shape[:2]
        h = layer.input_layernorm(hidden)
        q = attn.q_proj(h).view(rows, tokens, self.num_heads, self.head_dim).transpose(1, 2)
        k = attn.k_proj(h).view(rows, tokens, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = attn.v_proj(h).view(rows, tokens, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, *rotary)
        if cache_rows is not None:
            first, count = cache_rows
            self.k_cache[index, first : first + count, :, :tokens] = k
            self.v_cache[index, first : first + count, :, :tokens] = v
        elif decoding:
            row_index = torch.arange(rows, device=self.device)
            pos = positions[:, 0]
            self.k_cache[index, row_index, :, pos] = k[:, :, 0]
            self.v_cache[index, row_index, :, pos] = v[:, :, 0]
            width = mask.shape[-1]
            k = self.k_cache[index, :rows, :, :width]
            v = self.v_cache[index, :rows, :, :width]
        out = self._attention(q, k, v, mask, attn.scaling)
        out = out.transpose(1, 2).reshape(rows, tokens, -1)
        hidden = hidden + attn.o_proj(out)
        return hidden + layer.mlp(layer.post_attention_layernorm(hidden))

    def _attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scaling: float
    ) -> torch.Tensor:
        """Grouped-query attention without repeating K/V: query heads are folded per KV head.

        `mask` is [rows, 1, groups * tokens, keys], already repeated per folded head.
        """
        rows, heads, tokens, dim = q.shape
        groups = heads // self.num_kv_heads
        q = q.reshape(rows, self.num_kv_heads, groups * tokens, dim)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)
        return out.reshape(rows, heads, tokens, dim)
