"""The memory budget against the real engine (tiny base): adapters charged their real, rank-sized bytes;
LRU eviction by bytes; pinned and in-use adapters never evicted; refusal of what can never fit; the KV
cache grown by use and bounded by the budget; the memory report by part, in the engine and over HTTP.
The budget shared by adapters and the KV cache is tested in test_shared_budget.py."""

from __future__ import annotations

import asyncio

import pytest

from server.adapter_cache import AdapterCache
from server.errors import AdapterBusyError, AdapterTooLargeError, ServerConfigError
from server.memory_budget import plan_memory
from tests.server.conftest import budget_engine
from tests.server.fakes import FakeServer, populate

REPORT_FIELDS = {
    "base_bytes",
    "adapter_bytes_in_use",
    "adapter_bytes_allocated",
    "adapter_bytes_free",
    "adapter_bytes_gathered",
    "kv_bytes_in_use",
    "kv_bytes_allocated",
    "kv_bytes_free",
    "budget_bytes",
    "rss_bytes",
}


def _load(engine, adapters, name):
    a = adapters[name]
    return lambda: engine.load_adapter(a.key, a.path, a.manifest)


def _bytes_of(engine, adapters, name) -> int:
    adapter = _load(engine, adapters, name)()
    engine.unload_adapter(adapter)
    return adapter.nbytes


def test_budget_evicts_lru_by_real_bytes_and_never_pinned_or_in_use(engine, adapters):
    r8 = _bytes_of(engine, adapters, "gen-a")
    assert _bytes_of(engine, adapters, "gen-d") == _bytes_of(engine, adapters, "zero") == r8
    assert _bytes_of(engine, adapters, "gen-c") == 2 * r8  # rank 16: twice the pages of rank 8

    async def scenario() -> None:
        cache = AdapterCache(engine.unload_adapter, max_adapters=8, max_bytes=r8 * 5 // 2, wait_timeout=0.2)

        async def use(name: str, keep: bool = False) -> None:
            await cache.acquire(name, _load(engine, adapters, name), nbytes_hint=r8)
            if not keep:
                cache.release(name)

        def resident() -> set[str]:
            return {e.key for e in cache.entries()}

        try:
            await use("gen-a")
            await use("gen-d")
            await use("gen-a")  # gen-d is now the least recently used
            await use("zero")
            assert resident() == {"gen-a", "zero"} and cache.stats["evictions"] == 1
            await cache.pin("zero", _load(engine, adapters, "zero"), nbytes_hint=r8)
            await use("gen-d", keep=True)  # gen-a goes: zero is pinned
            assert resident() == {"zero", "gen-d"}
            with pytest.raises(AdapterBusyError, match="adapter memory"):
                await use("gen-a")  # nothing evictable: one pinned, one in use
            assert resident() == {"zero", "gen-d"}
            cache.release("gen-d")
        finally:
            for key in list(resident()):
                await cache.unload(key)

    free = engine.free_slots
    asyncio.run(scenario())
    assert engine.free_slots == free


def test_an_adapter_that_can_never_fit_is_refused_and_leaves_nothing(engine, adapters):
    r16 = _bytes_of(engine, adapters, "gen-c")
    free, used = engine.free_slots, engine.banks.used_bytes

    async def scenario(hint: int) -> None:
        cache = AdapterCache(engine.unload_adapter, max_adapters=8, max_bytes=r16 - 1)
        with pytest.raises(AdapterTooLargeError, match="never"):
            await cache.acquire("gen-c", _load(engine, adapters, "gen-c"), nbytes_hint=hint)
        assert cache.entries() == []

    asyncio.run(scenario(3 * r16))  # refused from the hint (over twice the bound), before loading
    asyncio.run(scenario(0))  # or once loaded, from its real size (then unloaded)
    assert engine.free_slots == free and engine.banks.used_bytes == used


def test_the_kv_ceiling_is_the_rows_the_whole_budget_holds():
    mib = 2**20
    plan = plan_memory(8, row_bytes=mib, max_batch_size=16, device_type="cpu")
    assert (plan.kv_rows, plan.kv_max_bytes, plan.budget) == (8, 8 * mib, 8 * mib)  # no fixed half
    roomy = plan_memory(1000, row_bytes=mib, max_batch_size=16, device_type="cpu")
    assert roomy.kv_rows == 16 and roomy.kv_max_bytes == 16 * mib
    with pytest.raises(ServerConfigError, match="--memory-budget"):
        plan_memory(0.5, row_bytes=mib, max_batch_size=16, device_type="cpu")
    derived = plan_memory(None, row_bytes=mib, max_batch_size=16, device_type="cpu")
    assert derived.derived and derived.budget > 0


def test_the_report_counts_the_factors_gathered_for_a_mixed_batch(engine, adapters):
    """A mixed decode step reads its adapters' pages concatenated (one copy per set of adapters): the
    report shows those working bytes beside the pages, and a write (a load) drops them."""
    loaded = [_load(engine, adapters, name)() for name in ("gen-a", "gen-c")]
    try:
        before = engine.memory_report()["adapter_bytes_gathered"]
        engine.prefill([1, 2], [[5] * 8, [6] * 8], [loaded[0].slot, loaded[1].slot])
        engine.decode([7, 8])
        gathered = engine.memory_report()["adapter_bytes_gathered"]
        pages = loaded[0].nbytes + loaded[1].nbytes  # rank 8 + rank 16, every target linear
        assert gathered >= pages > before  # at least the concatenation (plus the prefill's per-row copy)
        engine.release(1)
        engine.release(2)
        other = _load(engine, adapters, "gen-d")()
        assert engine.memory_report()["adapter_bytes_gathered"] == 0  # the write dropped every copy
        engine.unload_adapter(other)
    finally:
        for adapter in loaded:
            engine.unload_adapter(adapter)


def test_kv_cache_grows_by_use_and_the_report_counts_it(engine):
    report = engine.memory_report()
    assert set(report) == REPORT_FIELDS and report["kv_bytes_in_use"] == 0
    assert report["base_bytes"] == engine.memory_footprint and report["rss_bytes"] > report["base_bytes"]
    assert engine.kv.nbytes <= engine.kv.max_nbytes
    prompt = [5] * 100
    engine.prefill([1, 2], [prompt, prompt[:10]], [0, 0])
    try:
        assert engine.k_cache.shape[3] >= 100 and engine.k_cache.shape[1] >= 2
        assert engine.memory_report()["kv_bytes_in_use"] == 110 * engine.kv.bytes_per_token
    finally:
        engine.release(1)
        engine.release(2)
    assert engine.memory_report()["kv_bytes_in_use"] == 0


def test_a_small_budget_holds_fewer_kv_rows(tiny_base, engine):
    row = engine.kv.bytes_per_token * engine.max_seq_len
    small = budget_engine(tiny_base, 3.5 * row, rows=8, max_adapters=2)
    assert small.max_batch_size == 3 and small.ledger.budget == int(3.5 * row)


def test_memory_report_over_http(tmp_path):
    from hub.store import LocalStore

    store = LocalStore(tmp_path / "registry")
    populate(store)
    with FakeServer(store) as server:
        memory = server.client.get("/v1/adapters").json()["memory"]
        assert set(memory) == REPORT_FIELDS
        metrics = server.client.get("/metrics").text
        assert 'adapterdock_memory_bytes{part="kv_free"} 4096.0' in metrics
        assert 'adapterdock_memory_bytes{part="adapter_in_use"} 1024.0' in metrics


def test_near_the_limit_pools_grow_by_exactly_what_a_load_needs(engine, adapters):
    limit = engine.banks.byte_limit
    engine.banks.byte_limit = engine.banks.nbytes  # already "at" the limit
    try:
        before = engine.banks.nbytes
        adapter = _load(engine, adapters, "gen-c")()
        assert engine.banks.nbytes - before <= adapter.nbytes  # no spare pages beyond the load's own
        engine.unload_adapter(adapter)
    finally:
        engine.banks.byte_limit = limit
