"""Scoped keys on the app (fake engine): scope on every route that names an adapter, filtered listings,
rights, 429 with Retry-After over a quota, and usage per key name in /metrics."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from hub.store import LocalStore
from server.keys import parse_keys
from tests.server.fakes import FakeServer, populate

KEYS = [
    {"name": "chatters", "key": "chat-key", "adapters": ["chat", "tiny"], "rights": ["infer"]},
    {"name": "others", "key": "other-key", "adapters": ["other", "sentiment"], "rights": ["infer", "admin"],
     "requests_per_minute": 5},
    {"name": "thrifty", "key": "thrifty-key", "adapters": ["*"], "rights": ["infer"],
     "tokens_per_minute": 10},
]  # fmt: skip


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory: pytest.TempPathFactory) -> LocalStore:
    store = LocalStore(tmp_path_factory.mktemp("keys") / "registry")
    populate(store)
    return store


@pytest.fixture
def server(shared_store: LocalStore) -> Iterator[FakeServer]:
    with FakeServer(shared_store, keys=parse_keys(KEYS)) as server:
        yield server


def complete(server: FakeServer, secret: str, model: str, **extra) -> object:
    body = {"model": model, "prompt": "x", "max_tokens": 2, **extra}
    return server.client.post("/v1/completions", json=body, headers=bearer(secret))


def test_disjoint_scopes_cannot_use_or_list_each_others_adapters(server: FakeServer) -> None:
    assert complete(server, "chat-key", "chat@prod").status_code == 200
    assert complete(server, "chat-key", "tiny").status_code == 200
    for secret, model in (("chat-key", "other"), ("other-key", "chat@1"), ("other-key", "tiny")):
        refused = complete(server, secret, model)
        assert refused.status_code == 404 and refused.json()["error"]["code"] == "adapter_not_found"
        assert "is available to key" in refused.json()["error"]["message"]
    unknown = complete(server, "chat-key", "nothing-here")  # out of scope: same answer as out of scope
    assert unknown.status_code == 404
    classify = server.client.post(
        "/v1/classify", json={"adapter": "sentiment", "inputs": ["x"]}, headers=bearer("chat-key")
    )
    assert classify.status_code == 404
    models = {m["id"] for m in server.client.get("/v1/models", headers=bearer("chat-key")).json()["data"]}
    assert models == {"tiny", "chat", "chat@1", "chat@2"}
    models = {m["id"] for m in server.client.get("/v1/models", headers=bearer("other-key")).json()["data"]}
    assert models == {"other", "other@1"}
    listed = server.client.get("/v1/adapters", headers=bearer("other-key")).json()["data"]
    assert {a["name"] for a in listed} == {"other", "sentiment"}
    listed = server.client.get("/v1/adapters", headers=bearer("chat-key")).json()["data"]
    assert {a["name"] for a in listed} == {"chat"}


def test_rights_and_admin_routes_in_scope(server: FakeServer) -> None:
    refused = server.client.post("/v1/adapters/load", json={"adapter": "chat"}, headers=bearer("chat-key"))
    assert refused.status_code == 403 and "'admin' right" in refused.json()["error"]["message"]
    assert server.client.post("/v1/adapters/other/pin", headers=bearer("other-key")).status_code == 200
    assert server.client.post("/v1/adapters/chat/pin", headers=bearer("other-key")).status_code == 404
    assert complete(server, "chat-key", "chat@1").status_code == 200
    assert server.client.delete("/v1/adapters/chat", headers=bearer("other-key")).status_code == 404
    pinned = server.client.post("/v1/adapters/load", json={"adapter": "sentiment", "pin": True},
                                headers=bearer("other-key"))  # fmt: skip
    assert pinned.status_code == 200 and pinned.json()["pinned"]
    feedback = server.client.get("/v1/feedback/progress", headers=bearer("chat-key"))
    assert feedback.status_code == 403
    assert server.client.get("/v1/models").status_code == 401


def test_over_quota_is_429_with_retry_after_and_metrics_name_the_key(server: FakeServer) -> None:
    statuses = [complete(server, "other-key", "other").status_code for _ in range(7)]
    assert statuses == [200] * 5 + [429] * 2
    refused = complete(server, "other-key", "other")
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(refused.headers["Retry-After"]) <= 12
    # tokens: the fake counts 1 prompt token + 2 generated per request, charged when counted; a balance
    # of 10 admits four requests (10 -> 7 -> 4 -> 1 -> -2), and the fifth waits for a positive balance
    tokens = [complete(server, "thrifty-key", "chat").status_code for _ in range(5)]
    assert tokens == [200] * 4 + [429]
    metrics = server.client.get("/metrics", headers=bearer("chat-key")).text
    assert 'adapterdock_key_requests_total{key="others",status="429"} 3.0' in metrics
    assert 'adapterdock_key_requests_total{key="others",status="200"} 5.0' in metrics
    assert 'adapterdock_key_tokens_total{key="thrifty"} 12.0' in metrics
    assert "other-key" not in metrics and "thrifty-key" not in metrics


def test_streamed_tokens_are_charged_to_the_key(server: FakeServer) -> None:
    body = {"model": "chat", "prompt": "x", "max_tokens": 2, "stream": True}
    streamed = server.client.post("/v1/completions", json=body, headers=bearer("chat-key"))
    assert streamed.status_code == 200 and streamed.text.rstrip().endswith("data: [DONE]")
    metrics = server.client.get("/metrics", headers=bearer("chat-key")).text
    assert 'adapterdock_key_tokens_total{key="chatters"} 3.0' in metrics  # 1 prompt + 2 generated tokens
