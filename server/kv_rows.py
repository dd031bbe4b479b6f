"""Which sequence owns which row of the KV cache, how far each has got, and the cache's charge to the budget.

The engine's forward passes need three facts about the cache: the rows in flight (packed at the front, in
the order `decode` takes its tokens), each row's length (its positions) and the tokens it may reach (its
reserve: prompt + max new tokens, held from its prefill on, see `server.kv_admission`). This module keeps
them and keeps the tensors (`server.kv_cache`) and the shared memory budget (`server.memory_ledger`) in
step with them: the cache grows before an admission and is charged for what it allocates; a finished row is
replaced by the last one (one row copy, so a decode step reads plain views); the cache is freed when the
last row goes, so idle KV memory is given back to adapters.

Boundary: bookkeeping on the scheduler's worker thread; `used_bytes` and `rows` may be read from any thread
for the memory report. No forward passes (`server.engine`), no queue (`server.scheduler`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from server.errors import MemoryBudgetError
from server.kv_cache import KVCache
from server.memory_ledger import KV, MemoryLedger


@dataclass
class Row:
    seq_id: int
    slot: int
    length: int
    """Tokens in the cache for this row."""
    reserve: int
    """Tokens the row may reach (prompt + max new tokens): the cache holds them from its prefill on."""


class KVRows:
    """The rows in flight over one `KVCache`, charged to `ledger` as the cache is (re)allocated.

    Args:
        kv: the cache tensors.
        ledger: the budget shared with adapter pages.
        budget: its size in bytes.
        on_charge: called with the bytes the KV cache leaves to adapters after each change (the adapter
            pools grow by exactly what a load needs near that limit).
    """

    def __init__(
        self, kv: KVCache, ledger: MemoryLedger, budget: int, on_charge: Callable[[int], None]
    ) -> None:
        self.kv, self.ledger, self.budget = kv, ledger, budget
        self._on_charge = on_charge
        self.rows: list[Row] = []

    @property
    def active_ids(self) -> list[int]:
        """Sequence ids of the rows, in row order (the order `Engine.decode` expects)."""
        return [row.seq_id for row in self.rows]

    @property
    def used_bytes(self) -> int:
        """Bytes of the cache the rows' tokens fill now (safe from any thread)."""
        return sum(row.length for row in list(self.rows)) * self.kv.bytes_per_token

    def make_room(self, reserves: list[int]) -> int:
        """Grow the cache so the live rows and one new row per entry of `reserves` (the tokens each may
        reach) all fit, charging the budget.

        Returns:
            0 when the cache holds them now. Else the bytes the budget is short: nothing changed, and the
            ledger keeps the room claimed (adapter loads will not take it) until a later call succeeds.
        """
        rows = len(self.rows) + len(reserves)
        length = max([row.reserve for row in self.rows] + list(reserves))
        live = len(self.rows), self._live_length()
        for tight in (False, True):  # the usual growth slack if the budget has it, else exactly the need
            shape = self.kv.shape_for(rows, length, tight=tight)
            if shape == self.kv.shape or self.ledger.try_set(KV, self.kv.shape_bytes(shape)):
                self._resize(shape, live)
                return 0
        need = self.kv.shape_bytes(shape)
        self.ledger.want_kv(need)
        return need - self.ledger.room(KV)

    def ensure(self, rows: int, length: int) -> None:
        """Make the cache hold `rows` rows of `length` tokens (the live rows are kept). A no-op after
        `make_room`; a caller that skipped it (tests, warm-up) is charged as a fact, not refused."""
        self.kv.ensure(rows, length, len(self.rows), self._live_length())
        self._charge()

    def add(self, seq_ids: list[int], slots: list[int], lengths: list[int], reserves: list[int]) -> None:
        """Record prefilled sequences as the next rows (their keys and values are in the cache already)."""
        for seq_id, slot, length, reserve in zip(seq_ids, slots, lengths, reserves, strict=True):
            self.rows.append(Row(seq_id, slot, length=length, reserve=max(reserve, length)))

    def advance(self) -> None:
        """Every row got one more token (a decode step)."""
        for row in self.rows:
            row.length += 1
            row.reserve = max(row.reserve, row.length)

    def release(self, seq_id: int) -> None:
        """Drop a sequence (no-op if absent); the last row moves into its place. The last one frees the
        cache: idle KV memory goes back to the budget adapters share."""
        index = next((i for i, row in enumerate(self.rows) if row.seq_id == seq_id), None)
        if index is None:
            return
        last = len(self.rows) - 1
        if index != last:
            self.kv.move_row(last, index, self.rows[last].length)
            self.rows[index] = self.rows[last]
        self.rows.pop()
        if not self.rows:
            self.kv.clear()
            self._charge()

    def _live_length(self) -> int:
        return max((row.length for row in self.rows), default=0)

    def _resize(self, shape: tuple[int, int], live: tuple[int, int]) -> None:
        """Reallocate the cache as charged; a device that has less free than the budget assumed refuses
        the admission (the old cache, and the rows in it, are kept)."""
        try:
            self.kv.resize(shape, *live)
        except torch.OutOfMemoryError as exc:
            raise MemoryBudgetError(
                f"The device ran out of memory growing the KV cache to "
                f"{self.kv.shape_bytes(shape) / 2**20:.1f} MiB inside the "
                f"{self.budget / 2**20:.0f} MiB memory budget: something else holds device memory.",
                "Lower --memory-budget (or free the device), or lower --max-batch-size or the context.",
            ) from exc
        finally:
            self._charge()
            self.ledger.want_kv(0)

    def _charge(self) -> None:
        """Record the cache's allocation in the ledger and tell the adapters what it leaves them."""
        self.ledger.set(KV, self.kv.nbytes)
        self._on_charge(self.budget - self.kv.nbytes)
