"""The engine: one loaded base, adapters in slots, the base's own forward over our slot KV cache.

The forward is the base model's own (`model.base_model(...)`): embeddings, norms, rotary, q/k/v/o (or
fused qkv), MLP and lm_head are transformers' modules for that architecture, so bnb-quantized linears
and each family's details (biases, q/k norms, scaled embeddings, sliding windows, soft-capping) just
work; `lora_batch` adds each row's adapter inside the wrapped linears, and `server.attention` plugs our
cache into every attention call. The KV cache (`server.kv_cache`) grows as sequences need it, up to the
rows the memory budget holds (`server.memory_budget`); what it allocates is charged to the budget it
shares with the adapters' rank-sized pages (`server.memory_ledger`): `make_room` grows it, before a
prefill, to every admitted sequence's full length (prompt + max new tokens), so a running sequence never
needs memory the budget may no longer have, and the cache is freed when no sequence runs. Each
row has its own length and positions, so sequences at different points of their generation decode in
one step. Active rows are kept packed at the front of the cache (`server.kv_rows`: a finished row is
replaced by the last one), so a decode step reads plain views, never a gather of the cache. Only the
architectures of
`server.attention.SUPPORTED_MODEL_TYPES` are served; any other is refused at start.

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
from torch.nn.attention import SDPBackend, sdpa_kernel

from hub.manifest import Manifest
from server.adapter_sets import combine_lora
from server.adapter_weights import AdapterWeights, BaseLayout, read_adapter
from server.attention import (
    ATTN_IMPLEMENTATION,
    KV_KWARG,
    KVForward,
    check_supported,
    exact_context,
    register_attention,
    skip_training_wrappers,
)
from server.errors import EngineCapacityError, SequenceTooLongError
from server.heads import Head
from server.kv_cache import KVCache
from server.kv_rows import KVRows
from server.lora_batch import AdapterBanks
from server.memory_budget import format_report, plan_memory, process_rss
from server.memory_ledger import MemoryLedger
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
    """Bytes it holds in the engine: its rank-sized pages and task head (for the memory budget)."""
    manifest: Manifest
    head: Head | None = field(default=None, repr=False)
    """Task head for classification / NER / reward adapters."""


class Engine:
    """One base model serving many adapters, row by row."""

    def __init__(
        self,
        base_path: Path,
        *,
        base_name: str,
        quantize: str = "nf4",
        dtype: str | None = None,
        max_adapters: int = 16,
        max_rank: int = 64,
        max_batch_size: int = 16,
        max_seq_len: int = 1024,
        memory_budget_mb: float | None = None,
        device: torch.device | None = None,
    ) -> None:
        """Load the base, wrap its linears with adapter banks, and allocate the KV cache.

        Args:
            base_path: local HF folder of the base.
            base_name: the name clients use for "no adapter".
            quantize: nf4, int8 or none.
            dtype: compute dtype, auto, bf16 or fp32 (`server.model_loader.compute_dtype`); None: the
                serving default (`server.config.default_dtype`). The KV cache and adapter banks use it too.
            max_adapters: adapter slots (slot 0, "no adapter", comes on top).
            max_rank: largest LoRA rank (and bottleneck size) a slot holds.
            max_batch_size: rows of the KV cache (sequences decoding at once).
            max_seq_len: prompt + generated tokens per sequence.
            memory_budget_mb: MiB for adapter pages + KV cache (`server.memory_budget`); None derives it
                from the memory free after the base loads. The KV cache may then hold fewer rows than
                `max_batch_size` (logged); `ledger` is the budget adapters and the KV cache share.

        Raises:
            ServerConfigError: the budget cannot hold the KV cache of one full-length sequence.
        """
        from transformers import AutoConfig, AutoTokenizer

        self.base_name = base_name
        self.base_path = Path(base_path)
        check_supported(AutoConfig.from_pretrained(str(base_path)))
        register_attention()
        loaded = load_base(base_path, quantize, device, dtype)
        self.model, self.device, self.dtype = loaded.model, loaded.device, loaded.dtype
        self.quantize = quantize
        self.memory_footprint = loaded.memory_footprint
        self.tokenizer = AutoTokenizer.from_pretrained(str(base_path))
        self.model.set_attn_implementation(ATTN_IMPLEMENTATION)
        skip_training_wrappers(self.model)
        self.config = self.model.config
        self.layout = BaseLayout.from_config(self.config)
        self.max_rank, self.max_batch_size = max_rank, max_batch_size
        self.max_seq_len = exact_context(self.config, max_seq_len)
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
        self._init_cache(memory_budget_mb)
        self._warm_up()
        logger.info(
            "engine ready: %s compute, %d adapter slots, KV cache up to %d rows x %d tokens (%.1f MiB); "
            "memory budget %.0f MiB%s, shared by adapters and the KV cache",
            str(self.dtype).removeprefix("torch."),
            max_adapters,
            self.max_batch_size,
            self.max_seq_len,
            self.kv.max_nbytes / 2**20,
            self.memory.budget / 2**20,
            " (derived: half the free memory)" if self.memory.derived else "",
        )
        logger.info("engine memory: %s", format_report(self.memory_report()))

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
        return self._install(key, weights, manifest)

    def load_adapter_set(self, key: str, parts: list[tuple[str, Path, Manifest, float]]) -> LoadedAdapter:
        """Load a weighted adapter set as one LoRA in one slot (`server.adapter_sets`). Blocking.

        Args:
            key: the set's canonical key (`hub.adapter_set.set_key`).
            parts: (`name@version`, folder, manifest, weight) per part, each already resolved and checked.

        Raises:
            CorruptAdapterError, BaseMismatchError: as `load_adapter`, for any part.
            NotCombinableError: a part that is not a plain LoRA. AdapterSetTooLargeError: summed rank
                above `max_rank`. EngineCapacityError: every slot is taken.
        """
        read = [
            (name, read_adapter(folder, manifest, self.layout, max_rank=self.max_rank), weight)
            for name, folder, manifest, weight in parts
        ]
        weights = combine_lora(key, read, self.max_rank)
        return self._install(key, weights, parts[0][2])

    def _install(self, key: str, weights: AdapterWeights, manifest: Manifest) -> LoadedAdapter:
        """Copy checked weights into a free slot (and keep the task head); -> the resident adapter."""
        head = None
        if weights.head_weight is not None:
            bias = weights.head_bias
            # Heads stay fp32 whatever the compute dtype: a few KiB, and scores and rewards keep fp32's
            # precision (bf16 would round a reward to 3 significant digits).
            head = Head(
                weight=weights.head_weight.to(self.device, torch.float32),
                bias=None if bias is None else bias.to(self.device, torch.float32),
            )
        with self._slot_lock:
            if not self._free_slots:
                raise EngineCapacityError(f"No free adapter slot for {key}.")
            slot = self._free_slots.pop()
        try:
            charged = self.banks.write(slot, weights)
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
            nbytes=charged + (head.nbytes if head is not None else 0),
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
    def _init_cache(self, memory_budget_mb: float | None) -> None:
        """Size the memory budget, open its ledger and create the (empty, grown by use) KV cache."""
        cfg = self.config
        head_dim = self.model.base_model.layers[0].self_attn.head_dim  # the model's own, not re-derived
        self.num_heads, self.num_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = head_dim
        layers = cfg.num_hidden_layers
        token_bytes = KVCache.token_bytes(layers, self.num_kv_heads, head_dim, self.dtype)
        self.memory = plan_memory(
            memory_budget_mb,
            row_bytes=token_bytes * self.max_seq_len,
            max_batch_size=self.max_batch_size,
            device_type=self.device.type,
        )
        if self.memory.kv_rows < self.max_batch_size:
            logger.warning(
                "the memory budget holds the KV cache of %d sequences at %d tokens, not %d "
                "(--max-batch-size); raise --memory-budget or lower the context to run more at once",
                self.memory.kv_rows,
                self.max_seq_len,
                self.max_batch_size,
            )
        self.max_batch_size = self.memory.kv_rows
        self.ledger = MemoryLedger(self.memory.budget)
        self.banks.byte_limit = self.memory.budget
        self.kv = KVCache(
            layers=layers,
            kv_heads=self.num_kv_heads,
            head_dim=head_dim,
            max_rows=self.max_batch_size,
            max_len=self.max_seq_len,
            dtype=self.dtype,
            device=self.device,
        )
        self.rows = KVRows(self.kv, self.ledger, self.memory.budget, self._set_adapter_limit)

    def _set_adapter_limit(self, nbytes: int) -> None:
        """The bytes adapters may take now (what the KV cache leaves of the budget): near it, the adapter
        pools grow by exactly what a load needs (`AdapterBanks.byte_limit`)."""
        self.banks.byte_limit = nbytes

    @property
    def k_cache(self) -> torch.Tensor:
        return self.kv.k

    @property
    def v_cache(self) -> torch.Tensor:
        return self.kv.v

    def memory_report(self) -> dict[str, int]:
        """Bytes by part: base weights, adapters (in use, allocated, gathered for recent batches: working
        copies outside the budget), KV cache (in use, allocated), what
        either may still take of the shared budget (`*_free`: the budget less everything charged to the
        ledger; the KV cache's also capped by its ceiling), the budget and the process RSS. Cheap; safe
        from any thread."""
        adapters_used = self.banks.used_bytes + sum(h.nbytes for h in list(self._heads.values()))
        kv_used = self.rows.used_bytes
        free = max(self.ledger.free, 0)
        return {
            "base_bytes": int(self.memory_footprint),
            "adapter_bytes_in_use": adapters_used,
            "adapter_bytes_allocated": self.banks.nbytes,
            "adapter_bytes_free": free,
            "adapter_bytes_gathered": self.banks.gathered_bytes,
            "kv_bytes_in_use": kv_used,
            "kv_bytes_allocated": self.kv.nbytes,
            "kv_bytes_free": min(free, max(self.kv.max_nbytes - self.kv.nbytes, 0)),
            "budget_bytes": self.memory.budget,
            "rss_bytes": process_rss(),
        }

    @property
    def active_ids(self) -> list[int]:
        """Sequence ids of the rows in the cache, in row order (the order `decode` expects)."""
        return self.rows.active_ids

    @property
    def free_rows(self) -> int:
        return self.max_batch_size - len(self.rows.rows)

    def make_room(self, reserves: list[int]) -> int:
        """Grow the KV cache for one new row per entry of `reserves` (the tokens each may reach) beside the
        live ones, charging the shared budget (`KVRows.make_room`); the scheduler calls it before `prefill`;
        worker only. -> 0 when they fit now, else the bytes the budget is short."""
        return self.rows.make_room(reserves)

    def release(self, seq_id: int) -> None:
        """Drop a sequence from the cache (no-op if absent): `KVRows.release`."""
        self.rows.release(seq_id)

    # ---- forward passes --------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(
        self,
        seq_ids: list[int],
        prompts: list[list[int]],
        slots: list[int],
        reserves: list[int] | None = None,
    ) -> torch.Tensor:
        """Add sequences to the cache and run their prompts (padded into one batch).

        Args:
            reserves: tokens each sequence may reach, as given to `make_room` (default: its prompt).

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
        start = len(self.rows.rows)
        ids, lengths = self._pad(prompts)
        self.rows.ensure(start + len(prompts), ids.shape[1])
        positions = torch.arange(ids.shape[1], device=self.device).expand_as(ids)
        hidden = self._forward(ids, positions, lengths, slots, cache_rows=(start, len(prompts)))
        sizes = [len(p) for p in prompts]
        self.rows.add(seq_ids, slots, sizes, reserves or sizes)
        last = hidden[torch.arange(len(prompts), device=self.device), lengths - 1]
        return self._logits(last)

    @torch.inference_mode()
    def decode(self, tokens: list[int]) -> torch.Tensor:
        """One decode step for every row: `tokens[i]` is appended to row i (see `active_ids`).

        Returns:
            [rows, vocab] fp32 logits for the next token of each row.
        """
        rows = self.rows.rows
        if len(tokens) != len(rows):
            raise ValueError(f"decode got {len(tokens)} tokens for {len(rows)} rows")
        for row in rows:
            self._check_length(row.length + 1)
        self.rows.ensure(len(rows), max((r.length for r in rows), default=0) + 1)
        ids = torch.tensor(tokens, dtype=torch.long, device=self.device).view(-1, 1)
        positions = torch.tensor([r.length for r in rows], device=self.device).view(-1, 1)
        hidden = self._forward(ids, positions, positions[:, 0] + 1, [r.slot for r in rows], decoding=True)
        self.rows.advance()
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
        logits = self.model.lm_head(hidden).float()
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap:  # Gemma 2 (and 3 when set): applied by *ForCausalLM.forward, after lm_head
            logits = torch.tanh(logits / cap) * cap
        return logits

    def _forward(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        lengths: torch.Tensor,
        slots: list[int],
        cache_rows: tuple[int, int] | None = None,
        decoding: bool = False,
    ) -> torch.Tensor:
        """Run the base's own forward with per-row adapters and our cache; -> final hidden states.

        Args:
            ids, positions: [rows, tokens].
            lengths: [rows] keys each row may attend to after this step (prompt length, or cache
                length + 1 when decoding).
            slots: adapter slot per row.
            cache_rows: (first row, count) when prefilling into the cache.
            decoding: one new token for each active row, attending to the cache.
        """
        mode = "prefill" if cache_rows is not None else "decode" if decoding else "encode"
        state = KVForward(
            k_cache=self.k_cache,
            v_cache=self.v_cache,
            positions=positions,
            lengths=lengths,
            mode=mode,
            first_row=cache_rows[0] if cache_rows is not None else 0,
        )
        with self.banks.forward(slots), sdpa_kernel(SDPA_BACKENDS):
            out = self.model.base_model(
                input_ids=ids, position_ids=positions, use_cache=False, **{KV_KWARG: state}
            )
        return out.last_hidden_state
