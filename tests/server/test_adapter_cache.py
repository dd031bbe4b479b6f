"""The adapter cache: LRU by count and bytes, pins, leases, single flight, FIFO waits, failed loads."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass

import pytest

from hub.errors import CorruptAdapterError
from server.adapter_cache import AdapterCache
from server.errors import AdapterBusyError, AdapterInUseError, AdapterTooLargeError, PinLimitError


@dataclass
class Loaded:
    key: str
    nbytes: int = 10


class Loader:
    """Counts loads and unloads; loads may be slowed to expose concurrency."""

    def __init__(self, seconds: float = 0.0) -> None:
        self.seconds = seconds
        self.loads: list[str] = []
        self.unloads: list[str] = []
        self.threads: set[str] = set()

    def load(self, key: str, nbytes: int = 10):
        def run() -> Loaded:
            self.threads.add(threading.current_thread().name)
            time.sleep(self.seconds)
            self.loads.append(key)
            return Loaded(key, nbytes)

        return run

    def unload(self, adapter: Loaded) -> None:
        self.unloads.append(adapter.key)


def run(coro):
    return asyncio.run(coro)


def test_hits_misses_and_lru_eviction():
    loader = Loader(seconds=0.01)

    async def scenario() -> AdapterCache:
        cache = AdapterCache(loader.unload, max_adapters=2)
        for key in ("a", "b", "a", "c"):  # "a" was used after "b", so "b" is the LRU when "c" comes
            await cache.acquire(key, loader.load(key))
            cache.release(key)
        return cache

    cache = run(scenario())
    assert loader.loads == ["a", "b", "c"]
    assert loader.unloads == ["b"]
    assert [e.key for e in cache.entries()] == ["a", "c"]
    stats = cache.stats
    assert (stats["hits"], stats["misses"], stats["evictions"], stats["loads"]) == (1, 3, 1, 3)
    assert stats["load_seconds_total"] >= 3 * 0.01  # three loads of at least 10 ms each


def test_a_hint_above_the_budget_loads_when_the_real_size_fits():
    """The hint is the files' size; fp32 files served in bf16 take half: such an adapter is not refused."""
    loader = Loader()

    async def scenario() -> AdapterCache:
        cache = AdapterCache(loader.unload, max_adapters=10, max_bytes=100)
        await cache.acquire("a", loader.load("a", 40), nbytes_hint=40)
        cache.release("a")
        await cache.acquire("fp32-file", loader.load("fp32-file", 60), nbytes_hint=120)
        cache.release("fp32-file")
        with pytest.raises(AdapterTooLargeError, match="never stay resident"):
            await cache.acquire("too-big", loader.load("too-big", 150), nbytes_hint=150)
        return cache

    cache = run(scenario())
    assert [e.key for e in cache.entries()] == []  # room was made for 100 bytes; too-big was unloaded
    assert loader.unloads == ["a", "fp32-file", "too-big"]


def test_byte_budget_evicts_until_it_fits_and_refuses_oversized():
    loader = Loader()

    async def scenario() -> AdapterCache:
        cache = AdapterCache(loader.unload, max_adapters=10, max_bytes=100)
        for key in ("a", "b", "c"):
            await cache.acquire(key, loader.load(key, 40), nbytes_hint=40)
            cache.release(key)
        with pytest.raises(AdapterTooLargeError):
            await cache.acquire("huge", loader.load("huge", 500), nbytes_hint=500)
        return cache

    cache = run(scenario())
    assert loader.unloads == ["a"]
    assert cache.stats["resident_bytes"] == 80
    assert "huge" not in loader.loads


def test_concurrent_first_requests_load_once_off_the_event_loop():
    loader = Loader(seconds=0.2)

    async def scenario() -> tuple[AdapterCache, list]:
        cache = AdapterCache(loader.unload, max_adapters=2)
        adapters = await asyncio.gather(*(cache.acquire("a", loader.load("a")) for _ in range(5)))
        return cache, adapters

    cache, adapters = run(scenario())
    assert loader.loads == ["a"]
    assert all(a is adapters[0] for a in adapters)
    assert cache.get("a").leases == 5
    assert cache.stats["misses"] == 1 and cache.stats["coalesced"] == 4
    assert threading.main_thread().name not in loader.threads


def test_one_load_thread_runs_a_burst_of_loads_in_the_order_asked():
    """The default: loads queue for one thread, so the first asked is ready first (a burst run at once on
    the cores the engine uses finished all late), and the time each reports includes its wait."""
    loader = Loader(seconds=0.05)

    async def scenario() -> AdapterCache:
        cache = AdapterCache(loader.unload, max_adapters=8)
        await asyncio.gather(*(cache.acquire(k, loader.load(k)) for k in "abcd"))
        return cache

    cache = run(scenario())
    assert loader.loads == list("abcd") and len(loader.threads) == 1
    stats = cache.stats
    assert stats["load_seconds_total"] >= (1 + 2 + 3 + 4) * 0.05
    assert stats["load_seconds_buckets"][-1] == 4  # the +Inf bucket counts every load


def test_with_two_load_threads_a_slow_load_does_not_block_other_adapters():
    slow, fast = Loader(seconds=0.5), Loader()

    async def scenario() -> float:
        cache = AdapterCache(slow.unload, max_adapters=4, load_threads=2)
        slow_task = asyncio.create_task(cache.acquire("slow", slow.load("slow")))
        await asyncio.sleep(0.05)
        started = time.perf_counter()
        await cache.acquire("hot", fast.load("hot"))
        elapsed = time.perf_counter() - started
        await slow_task
        return elapsed

    assert run(scenario()) < 0.3


def test_leased_and_pinned_adapters_are_never_evicted_and_waits_are_fifo():
    loader = Loader()

    async def scenario() -> tuple[list[str], AdapterCache]:
        cache = AdapterCache(loader.unload, max_adapters=2, wait_timeout=5)
        await cache.pin("pinned", loader.load("pinned"))
        await cache.acquire("busy", loader.load("busy"))  # leased: the only other slot is taken
        order: list[str] = []

        async def want(key: str) -> None:
            await cache.acquire(key, loader.load(key))
            order.append(key)
            await asyncio.sleep(0.05)
            cache.release(key)

        waiters = [asyncio.create_task(want(k)) for k in ("x", "y", "z")]
        await asyncio.sleep(0.1)
        assert cache.stats["waiting"] == 3  # one waiting load per adapter, queued in arrival order
        assert "pinned" in [e.key for e in cache.entries()] and "busy" in [e.key for e in cache.entries()]
        cache.release("busy")
        await asyncio.gather(*waiters)
        return order, cache

    order, cache = run(scenario())
    assert order == ["x", "y", "z"]
    assert "pinned" not in loader.unloads
    assert cache.get("pinned").pinned


def test_wait_is_bounded_when_every_slot_stays_busy():
    loader = Loader()

    async def scenario() -> AdapterCache:
        cache = AdapterCache(loader.unload, max_adapters=1, wait_timeout=0.2)
        await cache.acquire("a", loader.load("a"))
        with pytest.raises(AdapterBusyError, match="pinned or serving"):
            await cache.acquire("b", loader.load("b"))
        return cache

    cache = run(scenario())
    assert cache.stats["load_failures"] == 1
    assert cache.get("b") is None and cache.get("a").leases == 1


def test_failed_loads_are_not_cached_and_do_not_hold_a_slot():
    attempts = []

    def corrupt() -> Loaded:
        attempts.append(1)
        raise CorruptAdapterError("adapter_model.safetensors is truncated.")

    async def scenario() -> AdapterCache:
        cache = AdapterCache(lambda a: None, max_adapters=1)
        for _ in range(2):
            with pytest.raises(CorruptAdapterError):
                await cache.acquire("bad", corrupt)
        await cache.acquire("good", lambda: Loaded("good"))
        return cache

    cache = run(scenario())
    assert len(attempts) == 2  # retried, not served from a cached failure
    assert [e.key for e in cache.entries()] == ["good"]


def test_unload_refuses_in_use_and_unpin_allows_eviction():
    loader = Loader()

    async def scenario() -> None:
        cache = AdapterCache(loader.unload, max_adapters=2)  # pins leave a slot free: 1 slot cannot pin
        await cache.acquire("a", loader.load("a"))
        with pytest.raises(AdapterInUseError):
            await cache.unload("a")
        cache.release("a")
        await cache.pin("a", loader.load("a"))
        assert cache.unpin("a") and not cache.unpin("a")
        for key in ("b", "c"):  # "a" is evictable again: "c" evicts it
            await cache.acquire(key, loader.load(key))
            cache.release(key)
        assert await cache.unload("b") and not await cache.unload("b")

    run(scenario())
    assert loader.unloads == ["a", "b"]


def test_a_changed_registration_of_the_same_key_is_reloaded():
    loader = Loader()

    async def scenario() -> None:
        cache = AdapterCache(loader.unload, max_adapters=2)
        await cache.acquire("a@1", loader.load("a@1"), stamp="t1")
        cache.release("a@1")
        await cache.acquire("a@1", loader.load("a@1"), stamp="t1")
        cache.release("a@1")
        await cache.acquire("a@1", loader.load("a@1"), stamp="t2")
        cache.release("a@1")

    run(scenario())
    assert loader.loads == ["a@1", "a@1"] and loader.unloads == ["a@1"]


def test_a_cancelled_waiter_does_not_leak_a_lease():
    loader = Loader(seconds=0.2)

    async def scenario() -> AdapterCache:
        cache = AdapterCache(loader.unload, max_adapters=1)
        first = asyncio.create_task(cache.acquire("a", loader.load("a")))
        second = asyncio.create_task(cache.acquire("a", loader.load("a")))
        await asyncio.sleep(0.05)
        second.cancel()
        await first
        with pytest.raises(asyncio.CancelledError):
            await second
        return cache

    assert run(scenario()).get("a").leases == 1


def test_pins_never_take_every_slot():
    loader = Loader()

    async def scenario() -> None:
        cache = AdapterCache(loader.unload, max_adapters=3, wait_timeout=0.2)
        await cache.pin("a", loader.load("a"))
        await cache.pin("b", loader.load("b"))
        with pytest.raises(PinLimitError, match="2 of 3 adapter slots are pinned"):
            await cache.pin("c", loader.load("c"))
        assert cache.get("c") is None  # refused before loading
        await cache.pin("a", loader.load("a"))  # pinning a pinned one again is fine
        await cache.acquire("c", loader.load("c"))  # the free slot serves the rest
        cache.release("c")
        cache.unpin("b")
        await cache.pin("c", loader.load("c"))
        with pytest.raises(PinLimitError):
            await AdapterCache(loader.unload, max_adapters=1).pin("x", loader.load("x"))

    run(scenario())
    assert loader.loads.count("c") == 1


def test_the_last_lease_ending_tells_the_ledger_an_adapter_idles():
    """The KV admission waiting for memory asks for evictions again when an adapter becomes evictable."""
    from server.memory_ledger import MemoryLedger

    loader, ledger = Loader(), MemoryLedger(10_000)
    wakes: list[int] = []
    ledger.on_free(lambda: wakes.append(ledger.idle_epoch))

    async def scenario() -> None:
        cache = AdapterCache(loader.unload, max_adapters=2, ledger=ledger)
        await cache.acquire("a", loader.load("a"))
        await cache.acquire("a", loader.load("a"))
        cache.release("a")
        assert ledger.idle_epoch == 0  # still leased once
        cache.release("a")

    run(scenario())
    assert ledger.idle_epoch == 1 and wakes[-1] == 1
