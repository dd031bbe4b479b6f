"""Adapter leases: the base needs none; an adapter is resolved, verified, loaded and held exactly once."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from hub.errors import ChecksumMismatchError
from hub.store import LocalStore
from server import leases
from server.adapter_cache import AdapterCache
from server.config import ServerConfig
from server.errors import WrongTaskError
from server.metrics import Metrics
from server.resolver import CLASSIFY, Resolver
from server.runtime import ServerState
from tests.server.fakes import FAKE_BASE, FakeEngine, populate


@pytest.fixture
def state(registry: LocalStore) -> ServerState:
    populate(registry)
    engine = FakeEngine()
    return ServerState(
        config=ServerConfig(registry=registry.root),
        metrics=Metrics(),
        base=FAKE_BASE,
        engine=engine,
        store=registry,
        resolver=Resolver(registry, FAKE_BASE),
        cache=AdapterCache(engine.unload_adapter, max_adapters=4),
        ready=True,
    )


def http_request() -> SimpleNamespace:
    """The part of a FastAPI request the leases use: `request.state`, tagged for metrics."""
    return SimpleNamespace(state=SimpleNamespace())


def test_the_base_name_or_no_model_is_a_lease_on_nothing(state: ServerState):
    for model in (None, "tiny"):
        request = http_request()
        lease = asyncio.run(leases.acquire_model(state, request, model))
        assert (lease.key, lease.adapter, lease.label, request.state.adapter) == (None, None, "tiny", "tiny")
        lease.release()
    assert state.engine.loads == []


def test_an_adapter_is_loaded_once_and_released_exactly_once(state: ServerState):
    request = http_request()

    async def main() -> tuple[leases.Lease, leases.Lease]:
        return (
            await leases.acquire_model(state, request, "chat@prod"),
            await leases.acquire_model(state, http_request(), "chat@1"),
        )

    first, second = asyncio.run(main())
    assert first.key == second.key == first.label == "chat@1" and request.state.adapter == "chat@1"
    assert first.adapter.slot == second.adapter.slot and state.engine.loads == ["chat@1"]
    assert state.cache.get("chat@1").leases == 2
    first.release()
    first.release()  # a second release of the same lease changes nothing
    assert state.cache.get("chat@1").leases == 1
    second.release()
    assert state.cache.get("chat@1").leases == 0


def test_files_that_fail_their_checksums_never_become_usable(state: ServerState):
    """The checksums are verified while the engine loads (they overlap); a mismatch frees the slot the
    load took and leaves nothing in the cache, so no request can ever run on the tampered files."""
    resolved = state.resolver.resolve("other")
    (resolved.path / "adapter_model.safetensors").write_bytes(b"tampered")
    with pytest.raises(ChecksumMismatchError):
        asyncio.run(leases.acquire(state, resolved))
    assert state.engine.loads == state.engine.unloads == [resolved.key]
    assert state.cache.get(resolved.key) is None


def test_a_checksum_mismatch_is_the_error_reported_when_the_load_fails_too(
    state: ServerState, monkeypatch: pytest.MonkeyPatch
):
    resolved = state.resolver.resolve("other")
    (resolved.path / "adapter_model.safetensors").write_bytes(b"tampered")

    def unparsable(*args):
        raise ValueError("not a safetensors file")

    monkeypatch.setattr(state.engine, "load_adapter", unparsable)
    with pytest.raises(ChecksumMismatchError):
        asyncio.run(leases.acquire(state, resolved))
    assert state.cache.get(resolved.key) is None


def test_resolve_checks_the_endpoint_and_pin_keeps_the_adapter(state: ServerState):
    with pytest.raises(WrongTaskError):
        asyncio.run(leases.resolve(state, http_request(), "chat", CLASSIFY))
    resolved = asyncio.run(leases.resolve(state, http_request(), "sentiment", CLASSIFY))
    assert leases.weights_bytes(resolved) == 64 * 4  # the fake's safetensors file: 64 bytes per rank
    entry = asyncio.run(leases.pin(state, resolved))
    assert entry.pinned and entry.leases == 0 and state.engine.loads == ["sentiment@1"]
