"""The one ledger of the memory budget: bytes charged by adapter weights and by the KV cache.

Both users of `--memory-budget` charge here and nowhere else, so "how much of the budget is used" has one
owner. Adapters are charged by the adapter cache (`server.adapter_cache`): the real bytes of the resident
adapters plus what loads in progress reserved. The KV cache is charged by the engine (`server.engine`): the
bytes it has allocated, since an allocated tensor holds its memory whether its rows are live or not.
Neither user has a fixed share: each may take what the other has not charged (the KV cache also stops at
its own ceiling, `server.memory_budget`).

The KV cache has priority: when an admission needs more KV than is free, the scheduler sets a KV target
(`want_kv`) that adapter loads must leave free, and asks the reclaimer (the adapter cache, registered at
start by `server.app`) to evict idle, unpinned adapters LRU. The reclaimer runs on the event loop; the
scheduler's worker thread gets a `concurrent.futures.Future` back and never blocks on it.

Boundary: integers under a lock, and callbacks. Thread-safe: the KV cache charges from the engine's worker
thread, the adapter cache from the event loop. Listeners are called outside the lock when a charge drops
(room may have freed up for whoever waits).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future

ADAPTERS = "adapters"
KV = "kv"

Reclaimer = Callable[[int], "Future[int]"]
"""Evict idle adapters to free at least this many bytes; the future gives the bytes freed."""


class MemoryLedger:
    """Bytes charged against one budget by adapters and the KV cache.

    Args:
        budget: bytes adapters and the KV cache may take together.
    """

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self._lock = threading.Lock()
        self._charges = {ADAPTERS: 0, KV: 0}
        self._kv_target = 0
        self._listeners: list[Callable[[], None]] = []
        self.idle_epoch = 0
        """Bumped each time an adapter's last lease ends (`note_idle`): an eviction that found nothing idle
        before may now free bytes."""
        self.reclaimer: Reclaimer | None = None
        """Set by whoever can free adapter bytes (the app wires the adapter cache); None: nothing can."""

    # ---- views -----------------------------------------------------------------------------------
    def charged(self, part: str) -> int:
        """Bytes `part` ("adapters" or "kv") holds now."""
        return self._charges[part]

    @property
    def used(self) -> int:
        """Bytes charged by both parts."""
        with self._lock:
            return sum(self._charges.values())

    @property
    def free(self) -> int:
        """Bytes of the budget nobody has charged (negative only if a forced charge overshot)."""
        return self.budget - self.used

    def room(self, part: str) -> int:
        """Bytes `part` may hold in total now: the budget less the other part's charge (for adapters, less
        the KV target too, if one is set)."""
        with self._lock:
            return self._room(part)

    # ---- charges ---------------------------------------------------------------------------------
    def try_set(self, part: str, nbytes: int) -> bool:
        """Charge `part` `nbytes` in total if the budget holds it beside the other part; a drop always
        succeeds. Atomic, so the two users can never both take the last free bytes.

        Returns:
            True when charged; False (nothing changed) when it does not fit.
        """
        with self._lock:
            old = self._charges[part]
            if nbytes > old and nbytes > self._room(part):
                return False
            self._charges[part] = nbytes
        if nbytes < old:
            self._notify()
        return True

    def set(self, part: str, nbytes: int) -> None:
        """Record `part`'s charge as a fact (an allocation already made, a size known only once loaded)."""
        with self._lock:
            old, self._charges[part] = self._charges[part], nbytes
        if nbytes < old:
            self._notify()

    def want_kv(self, nbytes: int) -> None:
        """Keep room for the KV cache to reach `nbytes` in total: adapter loads may not take it meanwhile.
        0 withdraws the claim."""
        with self._lock:
            old, self._kv_target = self._kv_target, nbytes
        if nbytes < old:
            self._notify()

    def reclaim(self, nbytes: int) -> Future[int]:
        """Ask the reclaimer to evict idle adapters for `nbytes`; a future of the bytes freed (0 at once
        when no reclaimer is registered)."""
        if self.reclaimer is None or nbytes <= 0:
            done: Future[int] = Future()
            done.set_result(0)
            return done
        return self.reclaimer(nbytes)

    def note_idle(self) -> None:
        """An adapter just became evictable (its last lease ended): bump `idle_epoch` and wake the listeners,
        so a sequence waiting for memory asks for evictions again instead of waiting for a retirement."""
        with self._lock:
            self.idle_epoch += 1
        self._notify()

    def on_free(self, listener: Callable[[], None]) -> None:
        """Call `listener` (from any thread) whenever a charge or the KV target drops."""
        self._listeners.append(listener)

    def off_free(self, listener: Callable[[], None]) -> None:
        """Stop calling `listener` (a stopped scheduler, a closed app)."""
        if listener in self._listeners:
            self._listeners.remove(listener)

    def describe(self) -> str:
        """The charges in words, for error messages."""
        with self._lock:
            adapters, kv = self._charges[ADAPTERS], self._charges[KV]
        return (
            f"adapters hold {adapters / 2**20:.1f} MiB and the KV cache {kv / 2**20:.1f} MiB of the "
            f"{self.budget / 2**20:.1f} MiB memory budget"
        )

    def _room(self, part: str) -> int:
        if part == ADAPTERS:
            return self.budget - max(self._charges[KV], self._kv_target)
        return self.budget - self._charges[ADAPTERS]

    def _notify(self) -> None:
        for listener in list(self._listeners):
            listener()
