"""One memory budget shared by adapter weights and the KV cache, against the real engine (tiny base, fp32).

Sizes on the tiny base: a rank-8 adapter takes as many bytes as one 128-token row of KV cache, so budgets
below are sums of measured adapter sizes and rows. Checked: KV growth evicts idle adapters LRU, never a
pinned or leased one; a sequence that cannot fit waits and is admitted once a running one finishes; one
that can never fit gets a 503 through the app; adapters may use memory the KV cache is not using, and a
load the KV cache's memory blocks lands once it is freed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from types import SimpleNamespace

import pytest

from server.adapter_cache import AdapterCache
from server.app import _share_budget
from server.memory_ledger import ADAPTERS, KV
from server.requests import GenerationRequest
from server.scheduler import Scheduler
from tests.server.conftest import budget_engine

SEQ_LEN = 128
PROMPT = "The adapter dock serves"
TIMEOUT = 60
WAIT = 10
"""Seconds an adapter load waits for room (`AdapterCache.wait_timeout`)."""


@pytest.fixture(scope="module")
def sizes(engine, adapters) -> dict[str, int]:
    """Bytes each adapter takes loaded, and one full-length KV row ("row")."""
    assert engine.dtype.itemsize == 4 and engine.max_seq_len == SEQ_LEN
    out = {"row": engine.kv.bytes_per_token * SEQ_LEN}
    for name in ("gen-a", "gen-b", "gen-c", "gen-d", "zero"):
        a = adapters[name]
        loaded = engine.load_adapter(a.key, a.path, a.manifest)
        engine.unload_adapter(loaded)
        out[name] = loaded.nbytes
    return out


@asynccontextmanager
async def serving(engine, adapters, sizes):
    """The adapter cache and scheduler over `engine`, wired to its ledger as `server.app` wires them."""
    cache = AdapterCache(engine.unload_adapter, max_adapters=6, wait_timeout=WAIT, ledger=engine.ledger)
    state = SimpleNamespace(engine=engine, cache=cache, closers=[])
    _share_budget(state)
    scheduler = Scheduler(engine, max_batch_size=4)
    await scheduler.start()

    async def acquire(name: str):
        a = adapters[name]
        load = lambda: engine.load_adapter(a.key, a.path, a.manifest)  # noqa: E731
        return await cache.acquire(name, load, nbytes_hint=sizes[name])

    try:
        yield cache, scheduler, acquire
    finally:
        await scheduler.stop(drain_timeout=5)
        for entry in cache.entries():
            entry.leases = 0
            await cache.unload(entry.key)
        for close in state.closers:
            close()


def _request(engine, adapter, new_tokens: int) -> GenerationRequest:
    ids = engine.tokenizer(PROMPT)["input_ids"]
    return GenerationRequest(ids, adapter, max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)


async def _timed(stream) -> list[float]:
    """The arrival time of each event."""
    return [time.monotonic() async for _ in stream]


def test_kv_growth_evicts_idle_adapters_lru_never_pinned_or_leased(tiny_base, adapters, sizes, caplog):
    row = sizes["row"]
    held = sum(sizes[n] for n in ("zero", "gen-b", "gen-a", "gen-d", "gen-c"))
    # room for the first sequence's 64-token row and half a row more: the second (2 rows x 128) must evict
    engine = budget_engine(tiny_base, held + row)

    async def scenario() -> tuple[set[str], list[int]]:
        async with serving(engine, adapters, sizes) as (cache, scheduler, acquire):
            await cache.pin("zero", lambda: engine.load_adapter(*_parts(adapters, "zero")), nbytes_hint=row)
            for name in ("gen-b", "gen-a"):  # idle, gen-b least recently used
                await acquire(name)
                cache.release(name)
            running, waiting = await acquire("gen-d"), await acquire("gen-c")
            assert engine.ledger.free == row
            first = scheduler.generate(_request(engine, running, 56))  # 8 + 56 tokens: a 64-token row
            second = scheduler.generate(_request(engine, waiting, 112))  # 2 rows x 128 tokens do not fit
            lengths = await asyncio.wait_for(asyncio.gather(_timed(first), _timed(second)), TIMEOUT)
            cache.release("gen-d")
            cache.release("gen-c")
            return {e.key for e in cache.entries()}, [len(times) for times in lengths]

    with caplog.at_level(logging.INFO, logger="server.adapter_cache"):
        resident, lengths = asyncio.run(scenario())
    evicted = [r.args[0] for r in caplog.records if "for the KV cache" in r.getMessage()]
    assert evicted == ["gen-b", "gen-a"]  # LRU order, and only as many as the KV cache needed
    assert resident == {"zero", "gen-d", "gen-c"}  # pinned and leased adapters stay
    assert lengths == [56, 112]
    assert engine.ledger.charged(KV) == 0 == engine.kv.nbytes  # freed when no sequence runs


def test_a_sequence_that_does_not_fit_waits_for_a_running_one(tiny_base, adapters, sizes):
    row = sizes["row"]
    engine = budget_engine(tiny_base, sizes["zero"] + row)  # a pinned adapter and one full row of KV

    async def scenario() -> tuple[list[float], list[float], set[str]]:
        async with serving(engine, adapters, sizes) as (cache, scheduler, _):
            await cache.pin("zero", lambda: engine.load_adapter(*_parts(adapters, "zero")), nbytes_hint=row)
            first = scheduler.generate(_request(engine, None, 112))
            second = scheduler.generate(_request(engine, None, 112))  # nothing to evict: it must wait
            times = await asyncio.wait_for(asyncio.gather(_timed(first), _timed(second)), TIMEOUT)
            return times[0], times[1], {e.key for e in cache.entries() if e.pinned}

    first, second, pinned = asyncio.run(scenario())
    assert len(first) == len(second) == 112
    assert second[0] >= first[-1]  # admitted only once the first had finished
    assert pinned == {"zero"}


def test_a_request_that_can_never_fit_gets_503_through_the_app(tiny_base, adapter_store, sizes):
    from fastapi.testclient import TestClient

    from server.app import create_app
    from server.config import ServerConfig

    budget = sizes["gen-c"] + sizes["row"] // 2  # the pinned rank-16 adapter leaves half a row
    config = ServerConfig(base="tiny", registry=adapter_store.root, quantize="none", dtype="fp32",
                          max_adapters=2, max_input_tokens=64, max_new_tokens=64,
                          memory_budget_mb=budget / 2**20, preload=("gen-c",))  # fmt: skip
    body = {"model": "gen-c", "prompt": PROMPT, "temperature": 0}
    with TestClient(create_app(config, base=tiny_base)) as client:
        fits = client.post("/v1/completions", json={**body, "max_tokens": 20})  # a 64-token row
        refused = client.post("/v1/completions", json={**body, "max_tokens": 64})  # a 128-token row
        memory = client.get("/v1/adapters").json()["memory"]
    assert fits.status_code == 200, fits.text
    assert refused.status_code == 503, refused.text
    error = refused.json()["error"]
    assert error["code"] == "memory_budget_full"
    assert "does not fit" in error["message"] and "--memory-budget" in error["message"]
    assert memory["adapter_bytes_free"] == budget - sizes["gen-c"]  # the KV cache freed again


def test_adapters_use_memory_the_kv_cache_is_not_using(tiny_base, adapters, sizes):
    row, big = sizes["row"], sizes["gen-c"]
    budget = big + row // 2  # the former fixed half (one row of KV) would leave adapters too little
    assert big > budget - row
    engine = budget_engine(tiny_base, budget)

    async def scenario() -> tuple[dict[str, int], int, set[str]]:
        async with serving(engine, adapters, sizes) as (cache, scheduler, acquire):
            await acquire("gen-c")
            cache.release("gen-c")
            report = engine.memory_report()
            charged = engine.ledger.charged(ADAPTERS)
            # a full-length sequence now needs the idle adapter's bytes: it is evicted for it
            events = scheduler.generate(_request(engine, None, 112))
            await asyncio.wait_for(_timed(events), TIMEOUT)
            return report, charged, {e.key for e in cache.entries()}

    report, charged, resident = asyncio.run(scenario())
    assert charged == big and report["adapter_bytes_free"] == budget - big
    assert report["kv_bytes_free"] == budget - big  # the same free bytes: one budget
    assert resident == set()


def test_an_adapter_load_waits_for_the_kv_cache_of_a_running_sequence(tiny_base, adapters, sizes):
    row = sizes["row"]
    engine = budget_engine(tiny_base, row + sizes["gen-a"])  # the KV cache's growth slack takes it all

    async def scenario() -> tuple[list[float], float, int]:
        async with serving(engine, adapters, sizes) as (cache, scheduler, acquire):
            stream = aiter(scheduler.generate(_request(engine, None, 112)))
            first = await anext(stream)
            assert engine.ledger.charged(KV) == engine.ledger.budget
            load = asyncio.create_task(acquire("gen-a"))
            times = [time.monotonic(), *await asyncio.wait_for(_timed(stream), TIMEOUT)]
            await asyncio.wait_for(load, TIMEOUT)
            loaded_at = time.monotonic()
            cache.release("gen-a")
            assert first.finish_reason is None
            return times, loaded_at, engine.ledger.charged(ADAPTERS)

    times, loaded_at, charged = asyncio.run(scenario())
    assert len(times) == 112 and loaded_at >= times[-1]  # it landed once the sequence had freed the KV cache
    assert loaded_at - times[-1] < WAIT / 2  # woken by the freed bytes, not by its wait timing out
    assert charged == sizes["gen-a"]


def _parts(adapters, name: str):
    a = adapters[name]
    return a.key, a.path, a.manifest
