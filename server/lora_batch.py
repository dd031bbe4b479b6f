"""Per-row adapter math: LoRA factors and bottleneck weights in rank-sized pages, applied row by row.

Each target linear of the base gets a `server.adapter_pages.LoraBank`: a pool of pages, one per rank of
each adapter that adapts that linear (a row of A and the matching row of B, stored pre-scaled), and a page
table per slot. An adapter of rank 8 takes 8 pages per linear it adapts and nothing elsewhere: memory
follows what is loaded, not slots x r_max. Slot 0 is "no adapter" and holds no pages. A forward pass runs
inside `AdapterBanks.forward(slots)`, which sets one `RowContext` (each row's slot id) for its duration and
refuses, with `ConcurrentForwardError`, a second forward that would overlap it (the context is shared by
every wrapped linear, so two at once would mix their rows' adapters); every wrapped linear then computes

    y = base(x) + scale[s] * (x @ A[s]) @ B[s]        for each row, with s = that row's slot,

as two batched matmuls over factors gathered by page id (once per batch composition), padded with the
zero page to the largest rank in the batch, or, in a decode step (one token a row), as two dense matmuls
over the batch's adapters' pages concatenated, each row masked to its own adapter's columns: no Python
loop over adapters either way. A DoRA adapter adds, once a
batch holds one, a per-row rescaling `y * g[s] + shift[s]` (`server.dora`; g = 1 and shift = 0 for every
other slot), one page per layer. Bottleneck adapters (h + up(act(down(h))) after o_proj / down_proj) use
the same slot ids and pages of their own (one per unit), on banks created on first use. Boundary: tensors
and modules only; which adapter lives in which slot is the engine's business.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from server.adapter_pages import GROWTH, BottleneckBank, LoraBank
from server.adapter_weights import AdapterWeights, BaseLayout
from server.dora import dora_rescale
from server.errors import ConcurrentForwardError

ACTIVATION_FNS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "silu": F.silu,
}
_ACTIVATION_IDS = {name: i + 1 for i, name in enumerate(ACTIVATION_FNS)}  # 0 = no bottleneck
TIGHT_SHARE = 0.75
"""Past this share of `byte_limit`, page pools stop growing ahead of need (GROWTH x 0.75 < 1)."""


@dataclass
class RowContext:
    """Which slot each row of the current forward uses, and what that implies for the hot path."""

    slots: torch.Tensor
    """[rows] long, on the model's device."""
    rank: int
    """Largest LoRA rank among the rows' slots (0: no LoRA work at all)."""
    uniform_slot: int | None
    """The one slot every row shares, if so (lets the hot path skip the gather)."""
    bottleneck_size: int = 0
    """Largest bottleneck among the rows' slots (0: none)."""
    activations: list[tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]] = field(
        default_factory=list
    )
    """(activation, [rows, 1, 1] bool mask of rows using it), one entry per kind present."""
    key: tuple = ()
    """(slots, rank, bank version): identifies gathered factors that can be reused."""
    adapters_key: tuple = ((), 0)
    """(the distinct adapter slots in the batch, sorted, bank version): identifies concatenated factors."""
    dora: bool = False
    """Whether any row's slot holds a DoRA adapter (else the rescaling is skipped altogether)."""


class AdapterLinear(nn.Module):
    """A base linear (nn.Linear, bnb Linear4bit or Linear8bitLt) plus per-row LoRA and bottleneck."""

    def __init__(self, base: nn.Module, lora: LoraBank, banks: AdapterBanks, site: str | None):
        super().__init__()
        self.base = base
        self.lora = lora
        self._banks = [banks]  # a list, so the shared owner is not registered as a submodule
        self.site = site
        """Bottleneck site key ("3.attn") if adapters may add a bottleneck after this layer."""

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        ctx = self._banks[0].context
        if ctx is None:
            return y
        shape = x.shape
        if ctx.rank:
            x3 = x.reshape(shape[0], -1, shape[-1]).to(self.lora.dtype)
            y3 = y.reshape(shape[0], -1, y.shape[-1])
            if y3.dtype == x3.dtype:
                y = self.lora.add_delta(y3, x3, ctx).view(y.shape)
            else:  # e.g. an int8 base linear that returns fp16
                zero = torch.zeros_like(y3, dtype=x3.dtype)
                y = y + self.lora.add_delta(zero, x3, ctx).to(y.dtype).view(y.shape)
            if ctx.dora:
                y = self.lora.rescale(y.reshape(shape[0], -1, y.shape[-1]), ctx).view(y.shape)
        if ctx.bottleneck_size and self.site is not None:
            bank = self._banks[0].bottleneck.get(self.site)
            if bank is not None:
                y3 = y.reshape(shape[0], -1, y.shape[-1])
                y = y + bank.delta(y3, ctx).reshape(y.shape).to(y.dtype)
        return y


class AdapterBanks:
    """Every bank of one model, the slots' bookkeeping, and the current forward's context."""

    def __init__(
        self,
        model: nn.Module,
        layout: BaseLayout,
        *,
        num_slots: int,
        max_rank: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        """Wrap every target linear of `model` (a supported *ForCausalLM) in place.

        Args:
            num_slots: slots including slot 0 (no adapter); a slot costs one page-table row, not weights.
            max_rank: largest LoRA rank and bottleneck size a slot may hold.
        """
        self.layout = layout
        self.num_slots, self.max_rank = num_slots, max_rank
        self.dtype, self.device = dtype, device
        self.context: RowContext | None = None
        """The running forward's rows; set only by `forward`."""
        self._forward_lock = threading.Lock()
        self._forward_thread: str | None = None
        self._write_lock = threading.Lock()
        self.byte_limit: int | None = None
        """Bytes adapters may take (the engine's share of the memory budget): near it, pools grow by exactly
        what a load needs, so their spare pages never push the allocation past the budget."""
        self.lora: dict[str, LoraBank] = {}
        self.linears: dict[str, AdapterLinear] = {}
        """Module path -> its wrapped linear (DoRA's scale reads the base weight)."""
        self.bottleneck: dict[str, BottleneckBank] = {}
        self.slot_rank = [0] * num_slots
        self.slot_dora = [False] * num_slots
        self.slot_bottleneck = [0] * num_slots
        self.slot_activation = [0] * num_slots
        self.version = 0
        """Bumped on every write, so gathered factors of an older layout are never reused."""
        for path, (in_features, out_features) in layout.linears.items():
            parent_path, _, attr = path.rpartition(".")
            parent = model.get_submodule(parent_path)
            linear = getattr(parent, attr)
            if (linear.in_features, linear.out_features) != (in_features, out_features):
                raise ValueError(  # a layout derived wrongly for this architecture: never serve it
                    f"{path} is {linear.in_features}->{linear.out_features} in the model, "
                    f"{in_features}->{out_features} in the layout."
                )
            bank = LoraBank(num_slots, in_features, out_features, max_rank, dtype, device)
            self.lora[path] = bank
            layer = int(path.split(".")[2])
            site = {"o_proj": f"{layer}.attn", "down_proj": f"{layer}.mlp"}.get(attr)
            wrapped = AdapterLinear(getattr(parent, attr), bank, self, site)
            self.linears[path] = wrapped
            setattr(parent, attr, wrapped)

    @property
    def nbytes(self) -> int:
        """Bytes the banks' page pools hold (sized by the adapters loaded so far, never by slots x r_max)."""
        return sum(bank.nbytes for bank in self._all_banks())

    @property
    def used_bytes(self) -> int:
        """Bytes of pages held by resident adapters (the rest of `nbytes` is free pages and page 0)."""
        return sum(bank.used_bytes for bank in self._all_banks())

    @property
    def gathered_bytes(self) -> int:
        """Bytes of factors gathered for recent batches (per-row, concatenated and fp32 working copies):
        outside the pages and the budget's ledger, which charges what is resident, not what a batch reads."""
        return sum(bank.gathered_bytes for bank in list(self.lora.values()))

    def _all_banks(self) -> list[LoraBank | BottleneckBank]:
        return [*self.lora.values(), *self.bottleneck.values()]

    def write(self, slot: int, weights: AdapterWeights) -> int:
        """Store an adapter's weights for `slot` (replacing what it held); -> bytes of pages it takes.

        Serialised by a lock (loads run on several threads; pools grow and page ids are handed out).
        """
        with self._write_lock:
            return self._write(slot, weights)

    def _write(self, slot: int, weights: AdapterWeights) -> int:
        if weights.method == "bottleneck":
            self._ensure_bottleneck_banks()
        charged = 0
        near_limit = self.byte_limit is not None and self.nbytes >= TIGHT_SHARE * self.byte_limit
        growth = 1.0 if near_limit else GROWTH
        for path, bank in self.lora.items():
            module = weights.lora.get(path)
            if module is None:
                bank.write(slot, None, None, 0.0)
                continue
            dora = None
            if module.magnitude is not None:
                base = self.linears[path].base
                dora = dora_rescale(base, module.a, module.b, module.scale, module.magnitude)
            charged += bank.write(slot, module.a, module.b, module.scale, dora, growth)
        for key, bank in self.bottleneck.items():
            layer, where = key.split(".")
            charged += bank.write(slot, weights.bottleneck.get((int(layer), where)), growth)
        self.slot_rank[slot] = weights.rank
        self.slot_dora[slot] = any(m.magnitude is not None for m in weights.lora.values())
        self.version += 1
        self.slot_bottleneck[slot] = weights.bottleneck_size
        self.slot_activation[slot] = _ACTIVATION_IDS.get(weights.activation, 0)
        return charged

    def clear(self, slot: int) -> None:
        """Free `slot`'s pages (its page-table rows point at page 0 again) so that it adds nothing."""
        self.write(slot, AdapterWeights(method="lora"))

    def _ensure_bottleneck_banks(self) -> None:
        if self.bottleneck:
            return
        banks = {
            f"{layer}.{where}": BottleneckBank(
                self.num_slots, self.layout.hidden_size, self.max_rank, self.dtype, self.device
            )
            for layer in range(self.layout.num_layers)
            for where in ("attn", "mlp")
        }
        self.bottleneck = banks  # swapped in whole: the memory report may iterate it from another thread

    @contextmanager
    def forward(self, slots: list[int]) -> Iterator[RowContext]:
        """Run one forward whose rows use `slots`: every wrapped linear reads this context meanwhile.

        Raises:
            ConcurrentForwardError: another forward is running (on another thread), whose rows'
                adapters this one would overwrite.
        """
        if not self._forward_lock.acquire(blocking=False):
            raise ConcurrentForwardError(
                f"A forward started on thread {threading.current_thread().name!r} while one runs on "
                f"{self._forward_thread!r}; the engine runs one forward at a time."
            )
        try:
            self._forward_thread = threading.current_thread().name
            self.context = self.context_for(slots)
            yield self.context
        finally:
            self.context = None
            self._forward_thread = None
            self._forward_lock.release()

    def context_for(self, slots: list[int]) -> RowContext:
        """The context of a forward whose rows use `slots` (one slot id per row)."""
        rank = max(self.slot_rank[s] for s in slots)
        size = max(self.slot_bottleneck[s] for s in slots)
        distinct = set(slots)
        uniform = next(iter(distinct)) if len(distinct) == 1 else None
        tensor = torch.tensor(slots, dtype=torch.long, device=self.device)
        activations = []
        if size:
            acts = torch.tensor([self.slot_activation[s] for s in slots], device=self.device)
            for name, act_id in _ACTIVATION_IDS.items():
                mask = (acts == act_id).view(-1, 1, 1)
                if bool(mask.any()):
                    activations.append((ACTIVATION_FNS[name], mask))
        return RowContext(
            slots=tensor,
            rank=rank,
            uniform_slot=uniform,
            bottleneck_size=size,
            activations=activations,
            key=(tuple(slots), rank, self.version),
            adapters_key=(tuple(sorted(s for s in distinct if self.slot_rank[s])), self.version),
            dora=any(self.slot_dora[s] for s in distinct),
        )
