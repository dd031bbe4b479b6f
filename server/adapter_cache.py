"""The adapter residency cache: which adapters sit in the engine's slots, and who is using them.

Boundary: bookkeeping over opaque adapters, keyed by the immutable `name@version`. It calls a blocking
`load` callable (given per request) and the `unload` callable (given once) on worker threads, never on the
event loop, and knows nothing about HTTP, manifests or tensors.

Guarantees:
- bounded by count (`max_adapters`) and, optionally, bytes: `max_bytes` (--max-adapter-memory) and the
  memory budget shared with the KV cache (`ledger`, `server.memory_ledger`: adapters may take what the KV
  cache has not allocated or claimed), evicting the least recently used idle, unpinned adapter first;
- the KV cache has priority: `evict_idle`, the ledger's reclaimer, evicts idle adapters LRU for it;
- an adapter leased by an in-flight request (`acquire` ... `release`) is never evicted; pinned ones neither;
- pins never take every slot: at most `max_adapters - 1` adapters are pinned (`PinLimitError` beyond), so
  requests for unpinned adapters always have a slot to wait for;
- concurrent first requests for one cold adapter share one load (single flight), and a load never blocks
  requests for other adapters;
- when every slot is pinned or leased, loads wait first come first served, at most `wait_timeout` seconds,
  then fail with `AdapterBusyError`;
- a failed load (a corrupt adapter) is never cached.

All methods run on one event loop; state changes happen between awaits, so no lock is needed (the ledger,
shared with the engine's worker thread, has its own).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from server.errors import AdapterBusyError, AdapterInUseError, AdapterTooLargeError, PinLimitError
from server.memory_ledger import ADAPTERS, MemoryLedger

logger = logging.getLogger(__name__)

LOAD_SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, float("inf"))
"""Upper bounds of the load-time histogram (`adapterdock_adapter_load_latency_seconds`), in seconds."""

HINT_SLACK = 2
"""A load's size hint is its files' size; served in a narrower dtype (fp32 files, bf16 compute) it takes up
to this many times less, so only a hint above this many times the byte bound is refused before loading
(anything else is loaded and refused, then unloaded, if its real size does not fit)."""


@dataclass
class CacheEntry:
    """A resident adapter."""

    key: str
    adapter: Any
    nbytes: int
    stamp: str = ""
    """Identifies the registered files (the manifest's created_at): a re-registered version reloads."""
    leases: int = 0
    pinned: bool = False
    loaded_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)


@dataclass
class _Loading:
    """A load in progress and the requests waiting on it (their leases start when it lands)."""

    nbytes: int
    stamp: str
    waiters: int = 0
    task: asyncio.Task | None = None


@dataclass
class _Waiter:
    event: asyncio.Event


class AdapterCache:
    """LRU residency of adapters with pins, leases and single-flight loads.

    Args:
        unload: blocking callable that frees an adapter's slot (run on a worker thread).
        max_adapters: most adapters resident (or loading) at once.
        max_bytes: most bytes of resident adapters; None for no byte limit of their own.
        wait_timeout: seconds a load waits for a slot when all are pinned or in use.
        ledger: the memory budget shared with the KV cache, charged with the resident and reserved bytes.
        load_threads: threads that run loads and unloads, in the order asked. One by default: loads
            sharing the cores (and the GIL) with the engine all finished late when a burst ran at once
            (benchmarks/results/serve_bench_smollm2_loaders.md); in turn, the first is ready first.
    """

    def __init__(
        self,
        unload: Callable[[Any], None],
        *,
        max_adapters: int,
        max_bytes: int | None = None,
        wait_timeout: float = 30.0,
        ledger: MemoryLedger | None = None,
        load_threads: int = 1,
    ) -> None:
        if max_adapters < 1 or load_threads < 1:
            raise ValueError("max_adapters and load_threads must be at least 1")
        self._worker = ThreadPoolExecutor(load_threads, thread_name_prefix="adapterdock-load")
        self._unload = unload
        self.max_adapters = max_adapters
        self.max_bytes = max_bytes
        self.wait_timeout = wait_timeout
        self.ledger = ledger
        self._entries: OrderedDict[str, CacheEntry] = OrderedDict()
        self._loading: dict[str, _Loading] = {}
        self._waiters: deque[_Waiter] = deque()
        self._reserved_slots = 0
        self._reserved_bytes = 0
        self._stats = {
            "hits": 0,
            "misses": 0,
            "coalesced": 0,
            "loads": 0,
            "load_failures": 0,
            "evictions": 0,
            "load_seconds_total": 0.0,
            "load_seconds_buckets": [0] * len(LOAD_SECONDS_BUCKETS),
        }

    # ---- leases --------------------------------------------------------------------------------
    async def acquire(
        self, key: str, load: Callable[[], Any], *, nbytes_hint: int = 0, stamp: str = ""
    ) -> Any:
        """Return the adapter for `key`, loading it if needed, with a lease the caller must `release`.

        Args:
            key: immutable `name@version`.
            load: blocking callable returning the loaded adapter (must have `.nbytes`); run on a thread.
            nbytes_hint: expected bytes, to make room before loading.
            stamp: identity of the registered files; a resident entry with another stamp is reloaded.

        Raises:
            whatever `load` raises (nothing is cached then), AdapterBusyError, AdapterTooLargeError.
        """
        entry = self._entries.get(key)
        if entry is not None and entry.stamp != stamp:
            await self._drop_stale(entry)
            entry = None
        if entry is not None:
            entry.leases += 1
            entry.last_used = time.time()
            self._entries.move_to_end(key)
            self._stats["hits"] += 1
            return entry.adapter
        record = self._loading.get(key)
        if record is None:
            self._stats["misses"] += 1
            record = _Loading(nbytes=nbytes_hint, stamp=stamp)
            record.task = asyncio.create_task(self._load(key, record, load))
            record.task.add_done_callback(_consume_exception)
            self._loading[key] = record
        else:
            self._stats["coalesced"] += 1
        record.waiters += 1
        task = record.task
        assert task is not None
        try:
            entry = await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.done() and not task.cancelled() and task.exception() is None:
                self.release(key)  # the lease was handed to us as the load landed
            elif not task.done():
                record.waiters -= 1
            raise
        return entry.adapter

    def release(self, key: str) -> None:
        """End one lease on `key`; the adapter becomes evictable when its last lease ends."""
        entry = self._entries.get(key)
        if entry is None or entry.leases <= 0:
            logger.warning("release of %s without a lease", key)
            return
        entry.leases -= 1
        entry.last_used = time.time()
        if entry.leases == 0:
            self._wake_head()
            if self.ledger is not None:
                self.ledger.note_idle()  # a sequence waiting for memory may now evict it

    # ---- pins and unloads ----------------------------------------------------------------------
    async def pin(
        self, key: str, load: Callable[[], Any], *, nbytes_hint: int = 0, stamp: str = ""
    ) -> CacheEntry:
        """Load `key` if needed and keep it resident until `unpin` or `unload`.

        Raises:
            PinLimitError: `max_adapters - 1` other adapters are pinned already (nothing is loaded).
            Whatever `acquire` raises.
        """
        self._check_pin_room(key)
        await self.acquire(key, load, nbytes_hint=nbytes_hint, stamp=stamp)
        try:
            self._check_pin_room(key)  # another pin may have landed while this one loaded
            entry = self._entries[key]
            if not entry.pinned:
                entry.pinned = True
                logger.info("pinned adapter %s", key)
        finally:
            self.release(key)
        return entry

    def _check_pin_room(self, key: str) -> None:
        pinned = sorted(e.key for e in self._entries.values() if e.pinned and e.key != key)
        if len(pinned) >= self.max_adapters - 1:
            raise PinLimitError(
                f"Cannot pin {key}: {len(pinned)} of {self.max_adapters} adapter slots are pinned "
                f"({', '.join(pinned) or 'none'}) and one must stay free for other adapters."
            )

    def unpin(self, key: str) -> bool:
        """Let `key` be evicted again; False if it was not pinned."""
        entry = self._entries.get(key)
        if entry is None or not entry.pinned:
            return False
        entry.pinned = False
        logger.info("unpinned adapter %s", key)
        self._wake_head()
        return True

    async def unload(self, key: str) -> bool:
        """Evict `key` now (pinned or not); False if it was not resident.

        Raises:
            AdapterInUseError: requests still hold leases on it.
        """
        entry = self._entries.get(key)
        if entry is None:
            return False
        if entry.leases:
            raise AdapterInUseError(f"Adapter {key} is in use by {entry.leases} in-flight request(s).")
        del self._entries[key]
        await self._off_loop(self._unload, entry.adapter)
        self._sync()
        logger.info("unloaded adapter %s on request", key)
        self._wake_head()
        return True

    async def evict_idle(self, nbytes: int) -> int:
        """Evict idle, unpinned adapters, least recently used first, until `nbytes` are freed or none is
        left (the KV cache asks, through the ledger, before sequences wait); -> bytes freed."""
        freed = 0
        for victim in self._idle():
            if freed >= nbytes:
                break
            if not self._evictable(victim):  # leased, pinned or gone while an earlier one unloaded
                continue
            del self._entries[victim.key]
            freed += victim.nbytes
            await self._unload_evicted(victim, "to make room for the KV cache")
            self._sync()
        return freed

    def notify_room(self) -> None:
        """Let the first waiting load look for room again (the ledger calls it when bytes free up)."""
        self._wake_head()

    # ---- views ---------------------------------------------------------------------------------
    def get(self, key: str) -> CacheEntry | None:
        """The resident entry for `key`, if any (no lease taken)."""
        return self._entries.get(key)

    def entries(self) -> list[CacheEntry]:
        """Resident entries, least recently used first."""
        return list(self._entries.values())

    @property
    def stats(self) -> dict[str, Any]:
        """Counters (hits, misses, coalesced, loads, load_failures, evictions, load_seconds_total, and
        load_seconds_buckets: loads per `LOAD_SECONDS_BUCKETS` bound, cumulative) and gauges (resident,
        resident_bytes, pinned, in_use, loading, waiting)."""
        entries = self._entries.values()
        return {
            **self._stats,
            "load_seconds_buckets": list(self._stats["load_seconds_buckets"]),
            "resident": len(self._entries),
            "resident_bytes": sum(e.nbytes for e in entries),
            "pinned": sum(e.pinned for e in entries),
            "in_use": sum(e.leases > 0 for e in entries),
            "loading": len(self._loading),
            "waiting": len(self._waiters),
            "max_adapters": self.max_adapters,
            "max_bytes": self.max_bytes,
        }

    # ---- internals -----------------------------------------------------------------------------
    async def _load(self, key: str, record: _Loading, load: Callable[[], Any]) -> CacheEntry:
        reserved = landed = False
        try:
            record.nbytes = self._room_for(key, record.nbytes)
            victims = await self._reserve(key, record.nbytes)
            reserved = True
            for victim in victims:
                await self._unload_evicted(victim, f"to make room for {key}")
            started = time.perf_counter()  # from the ask, so a load waiting for the worker counts it
            adapter = await self._off_loop(load)
            seconds = time.perf_counter() - started
            await self._check_fits(key, adapter)
            landed = True
        except BaseException as exc:
            self._stats["load_failures"] += 1
            logger.info("refused adapter %s: %s", key, exc)
            raise
        finally:
            if reserved:
                self._reserved_slots -= 1
                self._reserved_bytes -= record.nbytes
            self._loading.pop(key, None)
            if not landed:
                self._sync()  # on success, once the entry replaces its reservation (no gap between)
            self._wake_head()
        entry = CacheEntry(
            key=key,
            adapter=adapter,
            nbytes=int(getattr(adapter, "nbytes", record.nbytes) or 0),
            stamp=record.stamp,
            leases=record.waiters,
        )
        self._entries[key] = entry
        self._sync()
        await self._trim(key)
        self._stats["loads"] += 1
        self._stats["load_seconds_total"] += seconds
        buckets = self._stats["load_seconds_buckets"]
        for i, bound in enumerate(LOAD_SECONDS_BUCKETS):  # cumulative, as Prometheus histograms are
            buckets[i] += seconds <= bound
        logger.info("loaded adapter %s (%d bytes) in %.3fs", key, entry.nbytes, seconds)
        return entry

    def _room_for(self, key: str, hint: int) -> int:
        """The bytes to make room for before a load, from its size hint (the files' size).

        Raises:
            AdapterTooLargeError: even at `HINT_SLACK` times smaller than its hint it would not fit.
        """
        ceiling = self._ceiling()
        if ceiling is None:
            return hint
        if hint > ceiling * HINT_SLACK:
            raise AdapterTooLargeError(
                f"Adapter {key} needs about {hint / 2**20:.1f} MiB; adapters may take at most "
                f"{ceiling / 2**20:.1f} MiB{self._ceiling_source()}, so it can never be loaded."
            )
        return min(hint, ceiling)  # its real size, checked once loaded, may be smaller

    async def _reserve(self, key: str, nbytes: int) -> list[CacheEntry]:
        """Claim a slot (and bytes) for a load, evicting idle entries; wait FIFO when none can go."""
        if not self._waiters:
            victims = self._try_reserve(nbytes)
            if victims is not None:
                return victims
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_timeout
        waiter = _Waiter(asyncio.Event())
        self._waiters.append(waiter)
        try:
            while True:
                if self._waiters[0] is waiter:
                    victims = self._try_reserve(nbytes)
                    if victims is not None:
                        return victims
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise AdapterBusyError(
                        f"No room for {key} freed up within {self.wait_timeout:g}s: {self._held()}."
                    )
                waiter.event.clear()
                try:
                    await asyncio.wait_for(waiter.event.wait(), remaining)
                except TimeoutError:
                    pass
        finally:
            self._waiters.remove(waiter)
            self._wake_head()

    def _try_reserve(self, nbytes: int) -> list[CacheEntry] | None:
        """Reserve room now, returning the entries to evict (already removed), or None if it cannot."""
        count = len(self._entries) + self._reserved_slots
        used = self._used()
        limit = self._limit()
        idle = self._idle()
        victims: list[CacheEntry] = []
        while count + 1 > self.max_adapters or (limit is not None and used + nbytes > limit):
            if not idle:
                return None
            victim = idle.pop(0)
            victims.append(victim)
            count -= 1
            used -= victim.nbytes
        if self.ledger is not None and not self.ledger.try_set(ADAPTERS, used + nbytes):
            return None  # the KV cache took the room meanwhile (another thread): wait for some to free
        for victim in victims:
            del self._entries[victim.key]
        self._reserved_slots += 1
        self._reserved_bytes += nbytes
        return victims

    async def _check_fits(self, key: str, adapter: Any) -> None:
        """Refuse (and unload) an adapter whose real size, known once loaded, exceeds the whole bound."""
        nbytes = int(getattr(adapter, "nbytes", 0) or 0)
        ceiling = self._ceiling()
        if ceiling is not None and nbytes > ceiling:
            await self._off_loop(self._unload, adapter)
            raise AdapterTooLargeError(
                f"Adapter {key} takes {nbytes / 2**20:.1f} MiB loaded; adapters may take at most "
                f"{ceiling / 2**20:.1f} MiB{self._ceiling_source()}, so it can never stay resident."
            )

    def _idle(self, keep: str | None = None) -> list[CacheEntry]:
        """Idle, unpinned entries, least recently used first (`keep`: a key never to evict)."""
        return [e for e in self._entries.values() if e.leases == 0 and not e.pinned and e.key != keep]

    async def _unload_evicted(self, victim: CacheEntry, reason: str) -> None:
        """Free the slot of an entry already taken out of the cache, and count and log the eviction."""
        await self._off_loop(self._unload, victim.adapter)
        self._stats["evictions"] += 1
        logger.info("evicted adapter %s (least recently used) %s", victim.key, reason)

    def close(self) -> None:
        """Let the load worker's thread end once idle (the app calls it at shutdown)."""
        self._worker.shutdown(wait=False)

    async def _off_loop(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a blocking load or unload on the load worker (in the order asked)."""
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)

    def _evictable(self, entry: CacheEntry) -> bool:
        """Still resident, idle and unpinned (a list of victims may be stale after an await)."""
        return self._entries.get(entry.key) is entry and entry.leases == 0 and not entry.pinned

    def _used(self) -> int:
        """Bytes of resident adapters plus what loads in progress reserved."""
        return sum(e.nbytes for e in self._entries.values()) + self._reserved_bytes

    def _sync(self) -> None:
        """Record the adapters' bytes in the shared ledger (a fact: they are held already)."""
        if self.ledger is not None:
            self.ledger.set(ADAPTERS, self._used())

    def _limit(self) -> int | None:
        """Bytes adapters may hold now: `max_bytes`, and what the KV cache leaves of the budget."""
        return _tightest(self.max_bytes, self.ledger.room(ADAPTERS) if self.ledger is not None else None)

    def _ceiling(self) -> int | None:
        """Bytes adapters could ever hold: `max_bytes`, and the whole budget (with the KV cache empty)."""
        return _tightest(self.max_bytes, self.ledger.budget if self.ledger is not None else None)

    def _ceiling_source(self) -> str:
        if self.max_bytes is not None and self.max_bytes == self._ceiling():
            return " (--max-adapter-memory)"
        return " (the whole memory budget)"

    def _held(self) -> str:
        """What holds the slots and bytes a load waits for, in words."""
        slots = f"the {self.max_adapters} adapter slots"
        pinned_or_used = "are held by adapters pinned or serving requests"
        if self.ledger is not None:
            return (
                f"{slots} or the memory budget {pinned_or_used} and by the KV cache of running sequences "
                f"({self.ledger.describe()})"
            )
        if self.max_bytes is None:
            return f"{slots} {pinned_or_used}"
        held = f"{self._used() / 2**20:.1f} of {self.max_bytes / 2**20:.1f} MiB"
        return f"{slots} or the adapter memory ({held}) {pinned_or_used}"

    async def _trim(self, loaded: str) -> None:
        """Evict idle LRU entries while the resident bytes exceed the bound: a load's real size (known
        once loaded) may exceed the hint it reserved room with."""
        limit = self._limit()
        if limit is None:
            return
        used = self._used()
        for victim in self._idle(keep=loaded):
            if used <= limit:
                break
            if not self._evictable(victim):  # leased, pinned or gone while an earlier one unloaded
                continue
            del self._entries[victim.key]
            used -= victim.nbytes
            await self._unload_evicted(victim, "to stay within the memory budget")
            self._sync()

    async def _drop_stale(self, entry: CacheEntry) -> None:
        if entry.leases:
            raise AdapterBusyError(
                f"Adapter {entry.key} was re-registered while requests still use the old copy.",
                "Retry when they finish.",
            )
        del self._entries[entry.key]
        await self._off_loop(self._unload, entry.adapter)
        self._sync()
        logger.info("evicted adapter %s: its registered files changed", entry.key)
        self._wake_head()

    def _wake_head(self) -> None:
        if self._waiters:
            self._waiters[0].event.set()


def _tightest(*limits: int | None) -> int | None:
    """The smallest of the limits that are set; None when none is."""
    known = [limit for limit in limits if limit is not None]
    return min(known) if known else None


def _consume_exception(task: asyncio.Task) -> None:
    """Mark a load's failure as seen even when every waiter has gone away."""
    if not task.cancelled():
        task.exception()
