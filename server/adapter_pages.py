"""Adapter weights in pages sized by each adapter's real rank: the storage under `server.lora_batch`.

A `PagePool` holds rows ("pages") of one or more tensors that share page ids; one page is one rank of one
adapter on one layer (a row of its A and the matching row of its scaled B), so an adapter of rank r on a
layer takes r pages there and nothing on layers it does not adapt. Page 0 is the padding page (zeros, or
the fill value), so a row whose adapter has a smaller rank than the batch's largest, or no adapter at all,
gathers page 0 and adds nothing. A pool grows on demand (never shrinks: freed pages are reused, and since
every page has the same size there is no fragmentation) and each bank keeps a page table
`[slots, max_rank]` of page ids per slot. The hot path gathers one batch's factors with one `index_select`
per tensor, exactly as the former `[slots, in, r_max]` banks did, sliced to the batch's largest rank.

Growth swaps in a larger tensor after copying the old pages, so a forward that still holds the old tensor
reads the same values for its rows; pages being written belong to no running row. Writers hold the owning
`AdapterBanks`' write lock. Boundary: tensors and page ids; which adapter is in which slot is the engine's.
"""

from __future__ import annotations

import torch
from torch import nn

from server.packed_linear import can_pack, pack_weight, packed_add_linear, packed_linear

_SLOW_DECODE_DTYPES = (torch.bfloat16, torch.float16)
"""On CPU, small matmuls of a decode step's LoRA delta run 2.5-4x slower in bf16 than in fp32 as batched
matmuls ([rows, 1, in] @ [rows, in, r]; measured on avx512_bf16: 120 us against 48 us for 8 rows, in 576,
rank 16, out 1536), while prefill's (64 tokens a row) run 2x faster in bf16. Mixed decode batches avoid
`bmm` altogether (`LoraBank._add_delta_decode`); a batch on one adapter decodes in fp32 from fp32 copies of
its factors (also the more exact sum); prefill stays in the bank's dtype."""
GROWTH = 1.25
"""A full pool grows to at least this factor of its capacity: amortises the copies of a growing pool while
keeping the free slack under a quarter (16 rank-16 adapters on smollm2-135m: 1.5 left 43 % free)."""


class PagePool:
    """Pages shared by one or more named tensors of their own width; page 0 stays the padding page."""

    def __init__(
        self, widths: dict[str, int], dtype: torch.dtype, device, fills: dict[str, float] | None = None
    ):
        self.fills = {name: (fills or {}).get(name, 0.0) for name in widths}
        self.tensors = {
            name: torch.full((1, width), self.fills[name], dtype=dtype, device=device)
            for name, width in widths.items()
        }
        self._free: list[int] = []
        self.used = 0
        """Pages in use (page 0 not counted)."""

    @property
    def capacity(self) -> int:
        """Allocated pages, page 0 not counted."""
        return next(iter(self.tensors.values())).shape[0] - 1

    @property
    def page_bytes(self) -> int:
        return sum(t.shape[1] * t.element_size() for t in self.tensors.values())

    @property
    def nbytes(self) -> int:
        """Bytes allocated, page 0 included."""
        return (self.capacity + 1) * self.page_bytes

    def allocate(self, n: int, growth: float = GROWTH) -> list[int]:
        """Take `n` pages (growing the pool when too few are free, by `growth`; 1: exactly); -> their ids."""
        if len(self._free) < n:
            spare = (int(self.capacity * (growth - 1)), 4) if growth > 1 else (0,)
            self._grow(max(n - len(self._free), *spare))
        pages, self._free = self._free[:n], self._free[n:]
        self.used += n
        return pages

    def release(self, pages: list[int]) -> None:
        """Return pages, reset to the fill value so that a stale page id can never add anything."""
        if not pages:
            return
        index = torch.tensor(pages, dtype=torch.long, device=next(iter(self.tensors.values())).device)
        for name, tensor in self.tensors.items():
            tensor.index_fill_(0, index, self.fills[name])
        self._free = sorted(self._free + pages)
        self.used -= len(pages)

    def write(self, pages: list[int], **rows: torch.Tensor) -> None:
        """Copy `rows[name]` ([len(pages), width]) into the pages of each named tensor."""
        first = pages[0]
        contiguous = pages == list(range(first, first + len(pages)))
        for name, values in rows.items():
            tensor = self.tensors[name]
            values = values.to(tensor.device, tensor.dtype).reshape(len(pages), -1)
            if contiguous:
                tensor[first : first + len(pages)].copy_(values)
            else:
                tensor[torch.tensor(pages, dtype=torch.long)] = values

    def _grow(self, extra: int) -> None:
        start = self.capacity + 1
        for name, old in list(self.tensors.items()):
            new = torch.empty((start + extra, old.shape[1]), dtype=old.dtype, device=old.device)
            new[:start].copy_(old)
            new[start:].fill_(self.fills[name])
            self.tensors[name] = new  # a running forward keeps reading `old`: same values for its rows
        self._free += list(range(start, start + extra))


class PagedFactors:
    """Per-slot page tables over a pool: which pages (one per rank) each slot's adapter holds."""

    def __init__(self, pool: PagePool, slots: int, max_rank: int) -> None:
        self.pool = pool
        device = next(iter(pool.tensors.values())).device
        self.table = torch.zeros(slots, max_rank, dtype=torch.int32, device=device)
        self.pages: dict[int, list[int]] = {}

    def put(self, slot: int, *, growth: float = GROWTH, **rows: torch.Tensor) -> int:
        """Store `rows` (each [rank, width]) for `slot`, replacing what it held; -> bytes now charged."""
        self.drop(slot)
        rank = next(iter(rows.values())).shape[0]
        pages = self.pool.allocate(rank, growth)
        self.pool.write(pages, **rows)
        self.table[slot, :rank] = torch.tensor(pages, dtype=torch.int32)
        self.pages[slot] = pages
        return rank * self.pool.page_bytes

    def drop(self, slot: int) -> None:
        pages = self.pages.pop(slot, None)
        if pages:
            self.table[slot].zero_()
            self.pool.release(pages)

    def index(self, slots: torch.Tensor, rank: int) -> torch.Tensor:
        """[rows * rank] page ids of `slots`, each padded to `rank` with page 0."""
        return self.table.index_select(0, slots)[:, :rank].reshape(-1)


class LoraBank(nn.Module):
    """The LoRA (and DoRA) pages of one target linear. B is stored pre-multiplied by its adapter's scale."""

    def __init__(self, slots: int, in_features: int, out_features: int, max_rank: int, dtype, device) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.dtype = dtype
        self.factors = PagedFactors(
            PagePool({"a": in_features, "b": out_features}, dtype, device), slots, max_rank
        )
        self.dora: PagedFactors | None = None
        """g (1 where no DoRA) and (1 - g) * bias per slot, one page each; None before a DoRA adapter."""
        self._gathered: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._gathered_dora: dict[tuple, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._concat_by_set: dict[tuple, tuple | None] = {}
        """(adapters, bank version) -> the batch's adapters' pages concatenated, for `_add_delta_decode`."""
        self._concat_masks: dict[tuple, tuple | None] = {}
        """Batch composition -> (A_cat, B_cat, the rows' column mask)."""
        self._gathered_fp32: tuple | None = None
        """(the gathered A they were made from, A and B in fp32), for `_add_delta_fp32`."""

    @property
    def nbytes(self) -> int:
        return self.factors.pool.nbytes + (self.dora.pool.nbytes if self.dora else 0)

    @property
    def used_bytes(self) -> int:
        pools = [self.factors.pool] + ([self.dora.pool] if self.dora else [])
        return sum(p.used * p.page_bytes for p in pools)

    @property
    def gathered_bytes(self) -> int:
        """Bytes of the working copies of factors gathered for recent batches (outside the pages)."""
        fp32 = self._gathered_fp32  # read once: the worker thread may replace it meanwhile
        held: list = [*self._gathered.values(), *self._gathered_dora.values()]  # C-level copies: no race
        concatenated = [v for v in list(self._concat_by_set.values()) if v is not None]
        held += [v[:2] for v in concatenated]
        held += [fp32[1:]] if fp32 is not None else []
        storages = {}  # a view and its base count once
        for tensor in (t for group in held for t in group if t is not None):
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        packed = sum(p.numel() * p.element_size() for v in concatenated if v[3] for p in v[3])
        return sum(storages.values()) + packed  # packed (oneDNN) copies hold as many elements

    def add_delta(self, y: torch.Tensor, x: torch.Tensor, ctx) -> torch.Tensor:
        """y + scale[s] * (x @ A[s]) @ B[s] per row; x is [rows, tokens, in], y [rows, tokens, out]."""
        if x.shape[1] == 1 and ctx.uniform_slot is None:
            return self._add_delta_decode(y, x, ctx)
        a, b = self._factors(ctx)
        if x.shape[1] == 1 and x.dtype in _SLOW_DECODE_DTYPES and x.device.type == "cpu":
            return self._add_delta_fp32(y, x, ctx, a, b)
        if ctx.uniform_slot is not None:  # one adapter for the whole batch: plain matmuls
            h = x.reshape(-1, x.shape[-1]) @ a.t()
            return torch.addmm(y.reshape(-1, y.shape[-1]), h, b).view(y.shape)
        return torch.baddbmm(y, torch.bmm(x, a), b)

    def _add_delta_decode(self, y: torch.Tensor, x: torch.Tensor, ctx) -> torch.Tensor:
        """A mixed decode step's delta over the batch's adapters concatenated: `((x @ A_cat) * mask) @ B_cat`.

        A_cat holds each distinct adapter's pages once (its real rank), and `mask` keeps, for each row, the
        columns of its own adapter, so each row gets exactly its adapter's delta (other columns add exact
        zeros). Against the per-row gather (`_factors`: every row's factors padded to the batch's largest
        rank, then `bmm`) it reads each adapter's factors once per step instead of once per row that uses
        it, in two dense matmuls that run well in bf16 too (bf16 `bmm` does not: `_SLOW_DECODE_DTYPES`);
        mixed ranks cost their own ranks, not the largest one. On smollm2-135m, 16 rows on 8 rank-16
        adapters, the factors held for a step are 78 MiB instead of 156 MiB gathered per row plus their
        311 MiB fp32 copies; a change of batch composition rebuilds only the mask unless the set of
        adapters changes; the decode step is 5 % faster (benchmarks/results/lora_decode_ab.md).
        """
        cat = self._concatenated(ctx)
        if cat is None:  # no row's adapter adapts this linear
            return y
        a, b, mask, packed = cat
        x2, y2 = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
        if packed is not None:  # bf16 on CPU: oneDNN-packed factors, same bits (`server.packed_linear`)
            h = packed_linear(x2, packed[0]).mul_(mask)
            return packed_add_linear(y2, h, packed[1]).view(y.shape)
        h = (x2 @ a.t()).mul_(mask)
        return torch.addmm(y2, h, b).view(y.shape)

    def _concatenated(self, ctx) -> tuple | None:
        """(A_cat [R, in], B_cat [R, out], mask [rows, R], packed) of this batch, or None when R = 0.

        A_cat/B_cat (and, for bf16 on CPU, both packed for oneDNN: `packed`, else None) are cached per set
        of adapters (and bank version), the mask per batch composition.
        """
        masks = self._concat_masks  # a writer may swap in a fresh dict meanwhile
        cached = masks.get(ctx.key, False)
        if cached is not False:
            return cached
        by_set = self._concat_by_set
        parts = by_set.get(ctx.adapters_key, False)
        if parts is False:
            pages: list[int] = []
            owners: list[int] = []
            for slot in ctx.adapters_key[0]:
                held = self.factors.pages.get(slot, ())
                pages += held
                owners += [slot] * len(held)
            parts = None
            if pages:
                pool, device = self.factors.pool.tensors, ctx.slots.device
                index = torch.tensor(pages, dtype=torch.long, device=device)
                owner = torch.tensor(owners, dtype=torch.long, device=device)
                a, b = pool["a"].index_select(0, index), pool["b"].index_select(0, index)
                packed = None
                if can_pack(a.device, a.dtype):  # then only the packed copies are kept
                    packed, a, b = (pack_weight(a), pack_weight(b.t())), None, None
                parts = (a, b, owner, packed)
            if len(by_set) >= 2:
                by_set.clear()
            by_set[ctx.adapters_key] = parts
        if parts is None:
            cached = None
        else:
            a, b, owner, packed = parts
            cached = (a, b, (ctx.slots.view(-1, 1) == owner.view(1, -1)).to(self.dtype), packed)
        if len(masks) >= 2:
            masks.clear()
        masks[ctx.key] = cached
        return cached

    def _add_delta_fp32(self, y: torch.Tensor, x: torch.Tensor, ctx, a: torch.Tensor, b: torch.Tensor):
        """The decode-step delta computed in fp32 from fp32 copies of the gathered factors (made once per
        batch composition), added to the bf16/fp16 output: see `_SLOW_DECODE_DTYPES`."""
        cached = self._gathered_fp32
        if cached is None or cached[0] is not a:  # `a` is the gather of this batch composition
            cached = (a, a.float(), b.float())
            self._gathered_fp32 = cached
        a32, b32 = cached[1], cached[2]
        if ctx.uniform_slot is not None:
            delta = (x.reshape(-1, x.shape[-1]).float() @ a32.t()) @ b32
            return y + delta.view(y.shape).to(y.dtype)
        return y + torch.bmm(torch.bmm(x.float(), a32), b32).to(y.dtype)

    def _factors(self, ctx) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows' A and B, gathered once per batch composition (decode steps reuse them)."""
        gathered = self._gathered  # a writer may swap in a fresh dict meanwhile
        key = (ctx.key, ctx.uniform_slot is not None)  # the two paths gather different shapes
        cached = gathered.get(key)
        if cached is None:
            r, pool = ctx.rank, self.factors.pool.tensors
            if ctx.uniform_slot is not None:  # [r, in], [r, out]
                index = self.factors.table[ctx.uniform_slot, :r]
                cached = (pool["a"].index_select(0, index), pool["b"].index_select(0, index))
            else:  # [rows, in, r] as a transposed view (copying costs more than bmm's strided read)
                index, rows = self.factors.index(ctx.slots, r), ctx.slots.shape[0]
                a = pool["a"].index_select(0, index).view(rows, r, -1).transpose(1, 2)
                cached = (a, pool["b"].index_select(0, index).view(rows, r, -1))
            if len(gathered) >= 2:  # keep the decode batch's and one other (prefill/encode)
                gathered.clear()
            gathered[key] = cached
        return cached

    def rescale(self, y: torch.Tensor, ctx) -> torch.Tensor:
        """DoRA's y * g[s] + shift[s] per row (identity for rows without DoRA); y is [rows, tokens, out]."""
        if self.dora is None:
            return y
        gathered = self._gathered_dora
        cached = gathered.get(ctx.key)
        if cached is None:
            index = self.dora.index(ctx.slots, 1)
            pool = self.dora.pool.tensors
            shift = pool.get("shift")
            cached = (
                pool["g"].index_select(0, index).unsqueeze(1),
                None if shift is None else shift.index_select(0, index).unsqueeze(1),
            )
            if len(gathered) >= 2:
                gathered.clear()
            gathered[ctx.key] = cached
        g, shift = cached
        g = g.to(y.dtype)
        return y * g if shift is None else torch.addcmul(shift.to(y.dtype), y, g)

    @torch.no_grad()
    def write(
        self,
        slot: int,
        a: torch.Tensor | None,
        b: torch.Tensor | None,
        scale: float,
        dora: tuple[torch.Tensor, torch.Tensor | None] | None = None,
        growth: float = GROWTH,
    ) -> int:
        """Store factors a [r, in], b [out, r] for `slot` in r pages; None clears it. -> bytes charged.

        Args:
            dora: (g [out], shift [out] or None) of a DoRA adapter (`server.dora.dora_rescale`).
            growth: how a full pool grows (1: exactly what is needed, near the memory budget).
        """
        self._gathered, self._gathered_dora = {}, {}
        self._concat_by_set, self._concat_masks = {}, {}
        self._gathered_fp32 = None
        self.factors.drop(slot)
        if self.dora is not None:
            self.dora.drop(slot)
        if a is None or b is None:
            return 0
        charged = self.factors.put(slot, growth=growth, a=a, b=b.t() * scale)
        if dora is not None:
            g, shift = dora
            if self.dora is None:
                widths = {"g": self.out_features} | ({} if shift is None else {"shift": self.out_features})
                pool = PagePool(widths, self.dtype, g.device, fills={"g": 1.0})
                self.dora = PagedFactors(pool, self.factors.table.shape[0], 1)
            rows = {"g": g.view(1, -1)} | ({} if shift is None else {"shift": shift.view(1, -1)})
            charged += self.dora.put(slot, growth=growth, **rows)
        return charged


class BottleneckBank(nn.Module):
    """The bottleneck pages of one site (after one layer's o_proj or down_proj): one page per unit."""

    def __init__(self, slots: int, hidden: int, max_size: int, dtype, device) -> None:
        super().__init__()
        units = PagePool({"down": hidden, "down_b": 1, "up": hidden}, dtype, device)
        self.units = PagedFactors(units, slots, max_size)
        self.up_bias = PagedFactors(PagePool({"up_b": hidden}, dtype, device), slots, 1)

    @property
    def nbytes(self) -> int:
        return self.units.pool.nbytes + self.up_bias.pool.nbytes

    @property
    def used_bytes(self) -> int:
        return sum(f.pool.used * f.pool.page_bytes for f in (self.units, self.up_bias))

    def delta(self, h: torch.Tensor, ctx) -> torch.Tensor:
        """up(act(down(h))) per row; h is [rows, tokens, hidden]. Zero for rows without one."""
        k, rows = ctx.bottleneck_size, ctx.slots.shape[0]
        index, pool = self.units.index(ctx.slots, k), self.units.pool.tensors
        down_w = pool["down"].index_select(0, index).view(rows, k, -1).transpose(1, 2)
        down_b = pool["down_b"].index_select(0, index).view(rows, 1, k)
        z = torch.baddbmm(down_b, h, down_w)
        act = torch.zeros_like(z)
        for fn, mask in ctx.activations:  # at most one pass per activation kind, not per adapter
            act = torch.where(mask, fn(z), act)
        up_w = pool["up"].index_select(0, index).view(rows, k, -1)
        up_b = (
            self.up_bias.pool.tensors["up_b"].index_select(0, self.up_bias.index(ctx.slots, 1)).unsqueeze(1)
        )
        return torch.baddbmm(up_b, act, up_w)

    @torch.no_grad()
    def write(self, slot: int, site=None, growth: float = GROWTH) -> int:
        """Store one `BottleneckSite` for `slot`; None clears the slot. -> bytes charged."""
        self.units.drop(slot)
        self.up_bias.drop(slot)
        if site is None:
            return 0
        down, up = site.down_weight, site.up_weight.t()
        charged = self.units.put(slot, growth=growth, down=down, down_b=site.down_bias.view(-1, 1), up=up)
        return charged + self.up_bias.put(slot, growth=growth, up_b=site.up_bias.view(1, -1))
