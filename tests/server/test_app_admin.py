"""Management, health, metrics, API keys, body limits, corrupt adapters, single-flight loads, moving tags."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from hub.store import LocalStore
from tests.server.fakes import FakeServer, populate, register

KEY = "s3cret-key"


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory: pytest.TempPathFactory) -> LocalStore:
    store = LocalStore(tmp_path_factory.mktemp("admin") / "registry")
    populate(store)
    return store


@pytest.fixture
def server(shared_store: LocalStore) -> Iterator[FakeServer]:
    with FakeServer(shared_store, max_adapters=2, adapter_wait_timeout=0.5) as server:
        yield server


def complete(server: FakeServer, model: str, **extra) -> object:
    return server.client.post("/v1/completions", json={"model": model, "prompt": "x", **extra})


def test_list_load_pin_unpin_unload(server: FakeServer):
    client = server.client
    listed = client.get("/v1/adapters").json()
    by_id = {a["id"]: a for a in listed["data"]}
    assert by_id["chat@1"]["tags"] == ["prod"] and by_id["chat@2"]["tags"] == ["latest"]
    assert by_id["foreign@1"]["compatible"] is False and by_id["merged@1"]["kind"] == "model"
    assert not any(a["loaded"] for a in listed["data"]) and listed["cache"]["resident"] == 0

    loaded = client.post("/v1/adapters/load", json={"adapter": "sentiment"}).json()
    assert loaded["id"] == "sentiment@1" and loaded["loaded"] and not loaded["pinned"]
    pinned = client.post("/v1/adapters/chat@prod/pin").json()
    assert pinned["id"] == "chat@1" and pinned["pinned"]
    # the pinned adapter survives pressure on the 2 slots; the unpinned one is evicted
    for model in ("other", "chat@2"):
        assert complete(server, model).status_code == 200
    resident = {e.key for e in server.state.cache.entries()}
    assert "chat@1" in resident and "sentiment@1" not in resident
    assert client.post("/v1/adapters/chat/unpin").json()["unpinned"] == ["chat@1", "chat@2"]
    assert not server.state.cache.get("chat@1").pinned
    unloaded = client.delete("/v1/adapters/chat@1").json()
    assert unloaded["unloaded"] == ["chat@1"] and server.state.cache.get("chat@1") is None
    missing = client.delete("/v1/adapters/chat@1")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "adapter_not_found"
    stats = client.get("/v1/adapters").json()["cache"]
    assert stats["evictions"] >= 1 and stats["loads"] >= 3


def test_loading_refuses_foreign_and_full_models(server: FakeServer):
    assert server.client.post("/v1/adapters/load", json={"adapter": "foreign"}).status_code == 409
    assert server.client.post("/v1/adapters/merged/pin").status_code == 409
    refused = server.client.delete("/v1/adapters/..%2Fx")
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "invalid_reference"


def test_all_slots_busy_gives_503_with_retry_after(server: FakeServer):
    client = server.client
    assert client.post("/v1/adapters/chat@1/pin").json()["pinned"]
    refused = client.post("/v1/adapters/chat@2/pin")  # pins never take the last slot
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "pin_limit"
    server.engine.gate = threading.Event()  # chat@2's load holds the free slot
    with ThreadPoolExecutor(1) as pool:
        loading = pool.submit(complete, server, "chat@2")
        time.sleep(0.2)
        response = complete(server, "other")
        server.engine.gate.set()
        assert loading.result().status_code == 200
    server.engine.gate = None
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert response.json()["error"]["code"] == "adapter_slots_busy"
    assert complete(server, "other").status_code == 200


def test_concurrent_first_requests_load_once(server: FakeServer):
    server.engine.gate = threading.Event()
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(complete, server, "other") for _ in range(6)]
        time.sleep(0.3)
        server.engine.gate.set()
        statuses = [f.result().status_code for f in futures]
    server.engine.gate = None
    assert statuses == [200] * 6
    assert server.engine.loads.count("other@1") == 1
    stats = server.state.cache.stats
    assert stats["misses"] == 1 and stats["coalesced"] == 5


def test_corrupt_adapter_is_422_and_not_cached(tmp_path):
    store = LocalStore(tmp_path / "registry")
    register(store, "broken")
    (store.get("broken").path / "adapter_model.safetensors").write_bytes(b"garbage")
    register(store, "fine")
    with FakeServer(store) as server:
        for _ in range(2):
            response = complete(server, "broken")
            assert response.status_code == 422
            assert response.json()["error"]["code"] == "corrupt_adapter"
            assert "adapter_model.safetensors" in response.json()["error"]["message"]
        assert server.state.cache.get("broken@1") is None
        assert server.state.cache.stats["load_failures"] == 2
        assert complete(server, "fine").status_code == 200  # the server keeps serving others


def test_a_moved_latest_is_never_served_stale(tmp_path):
    store = LocalStore(tmp_path / "registry")
    register(store, "moving")
    with FakeServer(store) as server:
        assert complete(server, "moving", max_tokens=64).json()["choices"][0]["text"].startswith("x|1@")
        register(store, "moving")
        assert complete(server, "moving", max_tokens=64).json()["choices"][0]["text"].startswith("x|2@")
        store.tag("moving@1", "prod")
        assert complete(server, "moving@prod", max_tokens=64).json()["choices"][0]["text"].startswith("x|1@")


def test_health_ready_and_metrics(server: FakeServer):
    client = server.client
    assert client.get("/health").json() == {"status": "ok", "ready": True}
    ready = client.get("/ready").json()
    assert ready["status"] == "ready" and ready["memory_footprint"] == 123_456
    complete(server, "chat")
    complete(server, "nope")
    text = client.get("/metrics").text
    assert 'adapterdock_requests_total{adapter="chat@2",endpoint="/v1/completions",status="200"} 1.0' in text
    assert 'adapterdock_requests_total{adapter="-",endpoint="/v1/completions",status="404"} 1.0' in text
    assert 'adapterdock_prompt_tokens_total{adapter="chat@2"} 1.0' in text
    assert 'adapterdock_generated_tokens_total{adapter="chat@2"}' in text
    for name in (
        "adapterdock_request_duration_seconds_bucket",
        "adapterdock_adapter_cache_misses_total 1.0",
        "adapterdock_adapter_cache_loads_total 1.0",
        "adapterdock_adapter_load_seconds_total",
        'adapterdock_adapter_load_latency_seconds_bucket{le="+Inf"} 1.0',
        "adapterdock_adapter_cache_evictions_total",
        "adapterdock_queue_depth",
        "adapterdock_batch_size",
        "adapterdock_base_memory_bytes 123456.0",
    ):
        assert name in text, name


def test_not_ready_is_503(server: FakeServer):
    server.state.ready = False
    try:
        response = complete(server, "chat")
        ready = server.client.get("/ready")
        health = server.client.get("/health")
    finally:
        server.state.ready = True
    assert response.status_code == 503 and response.headers["retry-after"] == "2"
    assert ready.status_code == 503 and health.status_code == 200


def test_unknown_route_and_method_keep_the_error_shape(server: FakeServer):
    missing = server.client.get("/v2/nothing")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    wrong = server.client.get("/v1/completions")
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed"


def test_body_limit(shared_store: LocalStore):
    with FakeServer(shared_store, max_body_bytes=200) as server:
        big = {"model": "chat", "prompt": "x" * 500}
        declared = server.client.post("/v1/completions", json=big)
        assert declared.status_code == 413 and declared.json()["error"]["code"] == "body_too_large"

        def chunks():
            yield b'{"model": "chat", "prompt": "'
            yield b"x" * 500
            yield b'"}'

        streamed = server.client.post(
            "/v1/completions", content=chunks(), headers={"content-type": "application/json"}
        )
        assert streamed.status_code == 413 and streamed.json()["error"]["code"] == "body_too_large"
        assert complete(server, "chat").status_code == 200


def test_api_key(shared_store: LocalStore):
    with FakeServer(shared_store, api_key=KEY) as server:
        client = server.client
        assert client.get("/health").status_code == 200
        for path in ("/ready", "/metrics", "/v1/models", "/v1/adapters", "/docs", "/openapi.json"):
            response = client.get(path)
            assert response.status_code == 401, path
            assert response.headers["www-authenticate"] == "Bearer"
            assert response.json()["error"]["code"] == "invalid_api_key"
        assert complete(server, "chat").status_code == 401
        wrong = client.get("/v1/models", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and "Invalid" in wrong.json()["error"]["message"]
        assert client.get("/v1/models", headers={"Authorization": KEY}).status_code == 401
        good = {"Authorization": f"Bearer {KEY}"}
        assert client.get("/v1/models", headers=good).status_code == 200
        assert (
            client.post("/v1/completions", json={"model": "chat", "prompt": "x"}, headers=good).status_code
            == 200
        )
