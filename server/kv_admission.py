"""Admission by memory: how many of the queue's first sequences the shared memory budget holds now.

The scheduler's worker asks before every prefill. A sequence is admitted only once the KV cache holds it at
its FULL length (prompt + max new tokens; `Engine.make_room` grows the cache that far up front). Why: a
running sequence then never needs memory again, so it can never fail or stall mid-generation because
adapters took the budget meanwhile; the price is that memory a sequence might not use (it stops early) is
held until it finishes, which is exactly the room it could have needed.

When the budget is short, the head of the queue waits (first in, first out: a long request is not starved
by shorter ones behind it) with its room claimed in the ledger, so adapter loads cannot take bytes as they
free, and the adapter cache is asked, through the ledger's reclaimer, to evict idle, unpinned adapters LRU.
The eviction runs on the event loop; the worker only holds a future and never blocks on it. If nothing can
be evicted and no sequence runs (nothing would free memory), the head is refused with `MemoryBudgetError`
(503) once that has lasted `MEMORY_GRACE_S`.

Boundary: the decision and its bookkeeping; the queue is the scheduler's, the tensors the engine's.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from typing import Protocol

from server.errors import MemoryBudgetError
from server.memory_ledger import MemoryLedger

MEMORY_GRACE_S = 0.5
"""How long the head of the queue waits, with nothing running and nothing evictable, before it is refused:
a finished request releases its adapter lease (making it evictable) a moment after its row retires."""


class _Engine(Protocol):
    ledger: MemoryLedger

    def make_room(self, reserves: list[int]) -> int: ...


class KVAdmission:
    """The memory side of admission, on the worker thread.

    Args:
        engine: grows its KV cache (`make_room`) and holds the shared ledger.
        wake: wakes the worker (called from the event loop when an eviction finishes).
    """

    def __init__(self, engine: _Engine, wake) -> None:
        self.engine = engine
        self._wake = wake
        self._reclaim: Future[int] | None = None
        """The adapter evictions asked for the head of the queue, if any."""
        self._epoch: tuple[int, int] = (0, 0)
        """(`retired`, the ledger's `idle_epoch`) when the last eviction was asked: a change of either means
        an adapter may have become evictable since."""
        self._stuck_since: float | None = None

    def admit(self, reserves: list[int], *, running: bool, retired: int) -> int:
        """How many of the first sequences (`reserves`: the tokens each may reach) fit now; their KV cache
        is grown for them. 0: the head waits (evictions are asked for it).

        Args:
            running: whether sequences run (and would free memory when they finish).
            retired: sequences retired so far (a change means leases may have ended).

        Raises:
            MemoryBudgetError: the head cannot fit while what holds the budget stays.
        """
        short = 0
        for count in range(len(reserves), 0, -1):
            short = self.engine.make_room(reserves[:count])
            if short <= 0:
                self._reclaim, self._stuck_since = None, None
                return count
        self._wait(reserves[0], short, running, retired)
        return 0

    def idle(self) -> None:
        """The queue is empty: withdraw any room claimed for a head that has gone (cancelled)."""
        self.engine.ledger.want_kv(0)
        self._reclaim, self._stuck_since = None, None

    def _wait(self, reserve: int, short: int, running: bool, retired: int) -> None:
        last = self._reclaim
        if last is not None and not last.done():
            return  # an eviction is under way; it wakes the worker when done
        freed_nothing = last is not None and _freed(last) == 0
        epoch = (retired, self.engine.ledger.idle_epoch)
        if freed_nothing and not running:
            now = time.monotonic()
            self._stuck_since = self._stuck_since or now
            if now - self._stuck_since >= MEMORY_GRACE_S:
                self.idle()
                raise MemoryBudgetError(
                    f"The KV cache of this request ({reserve} tokens: prompt + max new tokens) does not "
                    f"fit: {self.engine.ledger.describe()}, {short / 2**20:.2f} MiB short, and no idle "
                    "adapter is left to evict (the rest are pinned or serve other requests)."
                )
        elif freed_nothing and epoch == self._epoch:
            return  # nothing evictable: wait for a sequence to finish or an adapter's last lease to end
        else:
            self._stuck_since = None
        self._epoch = epoch
        try:
            self._reclaim = self.engine.ledger.reclaim(short)
        except RuntimeError:  # the event loop is gone (shutting down): nothing will be evicted
            self._reclaim = Future()
            self._reclaim.set_result(0)
        self._reclaim.add_done_callback(lambda _: self._wake())


def _freed(evictions: Future[int]) -> int:
    """Bytes a finished eviction freed; 0 if it failed or was cancelled (the loop went away)."""
    if evictions.cancelled() or evictions.exception() is not None:
        return 0
    return evictions.result()
