"""Per-row adapter math: slot banks of LoRA factors and bottleneck weights, applied row by row.

Each target linear of the base gets preallocated banks, A: [slots, in, r_max], B: [slots, r_max, out]
and scale: [slots]; slot 0 is "no adapter" and stays zero. Loading an adapter is a copy into a free
slot (rank padded to r_max with zeros, which changes nothing). A forward pass runs inside
`AdapterBanks.forward(slots)`, which sets one `RowContext` (each row's slot id) for its duration and
refuses, with `ConcurrentForwardError`, a second forward that would overlap it (the context is shared by
every wrapped linear, so two at once would mix their rows' adapters); every wrapped linear then computes

    y = base(x) + scale[s] * (x @ A[s]) @ B[s]        for each row, with s = that row's slot,

as two batched matmuls over gathered factors, sliced to the largest rank in the batch: no Python loop
over adapters. A DoRA slot adds, once a batch holds one, a per-row rescaling `y * g[s] + shift[s]`
(`server.dora`; g = 1 and shift = 0 for every other slot), whose banks a layer allocates on its first
DoRA adapter. Bottleneck adapters (h + up(act(down(h))) after o_proj / down_proj) use the same slot
ids and banks of their own, allocated on first use. Boundary: tensors and modules only; which adapter
lives in which slot is the engine's business.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from server.adapter_weights import AdapterWeights, BaseLayout
from server.dora import dora_rescale
from server.errors import ConcurrentForwardError

ACTIVATION_FNS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "silu": F.silu,
}
_ACTIVATION_IDS = {name: i + 1 for i, name in enumerate(ACTIVATION_FNS)}  # 0 = no bottleneck


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
    dora: bool = False
    """Whether any row's slot holds a DoRA adapter (else the rescaling is skipped altogether)."""


class LoraBank(nn.Module):
    """The LoRA slots of one target linear. B is stored pre-multiplied by its slot's scale."""

    def __init__(self, slots: int, in_features: int, out_features: int, max_rank: int, dtype, device) -> None:
        super().__init__()
        kw = {"dtype": dtype, "device": device}
        self.register_buffer("a", torch.zeros(slots, in_features, max_rank, **kw))
        self.register_buffer("b", torch.zeros(slots, max_rank, out_features, **kw))
        self.register_buffer("scale", torch.zeros(slots, **kw))
        self.dora_g: torch.Tensor | None = None
        """[slots, out] DoRA factor per slot (1 where no DoRA); None before a DoRA adapter targets it."""
        self.dora_shift: torch.Tensor | None = None
        """[slots, out] (1 - g) * bias per slot, for a layer with a bias; else None."""
        self._gathered: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._gathered_dora: dict[tuple, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def add_delta(self, y: torch.Tensor, x: torch.Tensor, ctx: RowContext) -> torch.Tensor:
        """y + scale[s] * (x @ A[s]) @ B[s] per row; x is [rows, tokens, in], y [rows, tokens, out]."""
        r = ctx.rank
        if ctx.uniform_slot is not None:  # one adapter for the whole batch: plain matmuls
            s = ctx.uniform_slot
            h = x.reshape(-1, x.shape[-1]) @ self.a[s, :, :r]
            return torch.addmm(y.reshape(-1, y.shape[-1]), h, self.b[s, :r]).view(y.shape)
        a, b = self._factors(ctx)
        return torch.baddbmm(y, torch.bmm(x, a), b)

    def _factors(self, ctx: RowContext) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's A and B, gathered once per batch composition (decode steps reuse them)."""
        gathered = self._gathered  # a loader thread may swap in a fresh dict meanwhile
        cached = gathered.get(ctx.key)
        if cached is None:
            r = ctx.rank
            cached = (
                self.a[:, :, :r].index_select(0, ctx.slots),
                self.b[:, :r].index_select(0, ctx.slots),
            )
            if len(gathered) >= 2:  # keep the decode batch's and one other (prefill/encode)
                gathered.clear()
            gathered[ctx.key] = cached
        return cached

    def rescale(self, y: torch.Tensor, ctx: RowContext) -> torch.Tensor:
        """DoRA's y * g[s] + shift[s] per row (identity for rows without DoRA); y is [rows, tokens, out]."""
        if self.dora_g is None:
            return y
        if ctx.uniform_slot is not None:
            g, shift = self.dora_g[ctx.uniform_slot], self._shift_of(ctx.uniform_slot)
        else:
            g, shift = self._dora_factors(ctx)
        g = g.to(y.dtype)
        return y * g if shift is None else torch.addcmul(shift.to(y.dtype), y, g)

    def _shift_of(self, slot: int) -> torch.Tensor | None:
        return None if self.dora_shift is None else self.dora_shift[slot]

    def _dora_factors(self, ctx: RowContext) -> tuple[torch.Tensor, torch.Tensor | None]:
        gathered = self._gathered_dora
        cached = gathered.get(ctx.key)
        if cached is None:
            g = self.dora_g.index_select(0, ctx.slots).unsqueeze(1)
            shift = (
                None if self.dora_shift is None else self.dora_shift.index_select(0, ctx.slots).unsqueeze(1)
            )
            cached = (g, shift)
            if len(gathered) >= 2:
                gathered.clear()
            gathered[ctx.key] = cached
        return cached

    @torch.no_grad()
    def write(
        self,
        slot: int,
        a: torch.Tensor | None,
        b: torch.Tensor | None,
        scale: float,
        dora: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    ) -> None:
        """Copy factors a [r, in], b [out, r] into `slot`, zero-padding the rank; None clears it.

        Args:
            dora: (g [out], shift [out] or None) of a DoRA adapter (`server.dora.dora_rescale`).
        """
        self.a[slot].zero_()
        self.b[slot].zero_()
        self.scale[slot] = 0.0
        self._gathered, self._gathered_dora = {}, {}
        if self.dora_g is not None:
            self.dora_g[slot].fill_(1.0)
        if self.dora_shift is not None:
            self.dora_shift[slot].zero_()
        if a is None or b is None:
            return
        r = a.shape[0]
        self.a[slot, :, :r].copy_(a.t())
        self.b[slot, :r].copy_(b.t() * scale)
        self.scale[slot] = scale
        if dora is not None:
            self._write_dora(slot, *dora)

    def _write_dora(self, slot: int, g: torch.Tensor, shift: torch.Tensor | None) -> None:
        slots, out = self.b.shape[0], self.b.shape[2]
        kw = {"dtype": self.b.dtype, "device": self.b.device}
        if self.dora_g is None:
            self.dora_g = torch.ones(slots, out, **kw)
        if shift is not None and self.dora_shift is None:
            self.dora_shift = torch.zeros(slots, out, **kw)
        self.dora_g[slot].copy_(g)
        if shift is not None:
            self.dora_shift[slot].copy_(shift)


class BottleneckBank(nn.Module):
    """The bottleneck slots of one site (after one layer's o_proj or down_proj)."""

    def __init__(self, slots: int, hidden: int, size: int, dtype, device) -> None:
        super().__init__()
        kw = {"dtype": dtype, "device": device}
        self.register_buffer("down_w", torch.zeros(slots, hidden, size, **kw))
        self.register_buffer("down_b", torch.zeros(slots, size, **kw))
        self.register_buffer("up_w", torch.zeros(slots, size, hidden, **kw))
        self.register_buffer("up_b", torch.zeros(slots, hidden, **kw))

    def delta(self, h: torch.Tensor, ctx: RowContext) -> torch.Tensor:
        """up(act(down(h))) per row; h is [rows, tokens, hidden]. Zero for rows without one."""
        k = ctx.bottleneck_size
        down_w = self.down_w[:, :, :k].index_select(0, ctx.slots)
        down_b = self.down_b[:, :k].index_select(0, ctx.slots).unsqueeze(1)
        z = torch.baddbmm(down_b, h, down_w)
        act = torch.zeros_like(z)
        for fn, mask in ctx.activations:  # at most one pass per activation kind, not per adapter
            act = torch.where(mask, fn(z), act)
        up_w = self.up_w[:, :k].index_select(0, ctx.slots)
        up_b = self.up_b.index_select(0, ctx.slots).unsqueeze(1)
        return torch.baddbmm(up_b, act, up_w)

    @torch.no_grad()
    def write(self, slot: int, site=None) -> None:
        """Copy one `BottleneckSite` into `slot` (zero-padded); None clears the slot."""
        for buf in (self.down_w, self.down_b, self.up_w, self.up_b):
            buf[slot].zero_()
        if site is None:
            return
        size = site.down_weight.shape[0]
        self.down_w[slot, :, :size].copy_(site.down_weight.t())
        self.down_b[slot, :size].copy_(site.down_bias)
        self.up_w[slot, :size].copy_(site.up_weight.t())
        self.up_b[slot].copy_(site.up_bias)


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
            x3 = x.reshape(shape[0], -1, shape[-1]).to(self.lora.a.dtype)
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
    """Every slot bank of one model, the slots' bookkeeping, and the current forward's context."""

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
            num_slots: slots including slot 0 (no adapter).
            max_rank: largest LoRA rank and bottleneck size a slot holds.
        """
        self.layout = layout
        self.num_slots, self.max_rank = num_slots, max_rank
        self.dtype, self.device = dtype, device
        self.context: RowContext | None = None
        """The running forward's rows; set only by `forward`."""
        self._forward_lock = threading.Lock()
        self._forward_thread: str | None = None
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
        """Bytes held by every bank (preallocated, whatever is loaded)."""
        banks = [*self.lora.values(), *self.bottleneck.values()]
        return sum(b.numel() * b.element_size() for bank in banks for b in bank.buffers())

    def write(self, slot: int, weights: AdapterWeights) -> None:
        """Copy an adapter's weights into `slot` (every bank of that slot is overwritten)."""
        if weights.method == "bottleneck":
            self._ensure_bottleneck_banks()
        for path, bank in self.lora.items():
            module = weights.lora.get(path)
            if module is None:
                bank.write(slot, None, None, 0.0)
                continue
            dora = None
            if module.magnitude is not None:
                base = self.linears[path].base
                dora = dora_rescale(base, module.a, module.b, module.scale, module.magnitude)
            bank.write(slot, module.a, module.b, module.scale, dora)
        for key, bank in self.bottleneck.items():
            layer, where = key.split(".")
            bank.write(slot, weights.bottleneck.get((int(layer), where)))
        self.slot_rank[slot] = weights.rank
        self.slot_dora[slot] = any(m.magnitude is not None for m in weights.lora.values())
        self.version += 1
        self.slot_bottleneck[slot] = weights.bottleneck_size
        self.slot_activation[slot] = _ACTIVATION_IDS.get(weights.activation, 0)

    def clear(self, slot: int) -> None:
        """Zero `slot` so that it adds nothing."""
        self.write(slot, AdapterWeights(method="lora"))

    def _ensure_bottleneck_banks(self) -> None:
        if self.bottleneck:
            return
        for layer in range(self.layout.num_layers):
            for where in ("attn", "mlp"):
                self.bottleneck[f"{layer}.{where}"] = BottleneckBank(
                    self.num_slots, self.layout.hidden_size, self.max_rank, self.dtype, self.device
                )

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
            dora=any(self.slot_dora[s] for s in distinct),
        )
