"""Traffic splits on the app (fake engine): the served version in `model` and `x-adapter-version` on every
API, sticky per `user`, weighted without one, changes and promotion seen by the next request, metrics and
feedback records by version."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from hub.store import LocalStore
from hub.traffic import parse_split
from server.feedback.store import FeedbackStore
from tests.server.fakes import FakeServer, populate


@pytest.fixture
def server(tmp_path: Path) -> Iterator[FakeServer]:
    store = LocalStore(tmp_path / "registry")
    populate(store)  # chat@1 (tagged prod) and chat@2
    with FakeServer(store, feedback_db=tmp_path / "feedback.sqlite") as server:
        yield server


def complete(server: FakeServer, model: str, user: str | None = None) -> tuple[str, str]:
    body = {"model": model, "prompt": "x", "max_tokens": 1, **({"user": user} if user else {})}
    response = server.client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.headers["x-adapter-version"] == response.json()["model"]
    adapter = server.scheduler.requests[-1].adapter
    return response.json()["model"], adapter.key if adapter is not None else "tiny"


def test_every_api_names_the_version_that_served_it(server: FakeServer) -> None:
    assert complete(server, "chat@prod") == ("chat@1", "chat@1")
    assert complete(server, "tiny") == ("tiny", "tiny")
    chat = server.client.post(
        "/v1/chat/completions", json={"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
    )
    assert chat.json()["model"] == chat.headers["x-adapter-version"] == "chat@2"
    streamed = server.client.post(
        "/v1/completions", json={"model": "chat@prod", "prompt": "x", "stream": True}
    )
    assert streamed.headers["x-adapter-version"] == "chat@1" and '"model":"chat@1"' in streamed.text
    tgi = server.client.post("/generate", json={"inputs": "x", "parameters": {"adapter_id": "chat@prod"}})
    assert tgi.headers["x-adapter-version"] == "chat@1"
    task = server.client.post("/v1/classify", json={"adapter": "sentiment", "inputs": ["x"]})
    assert task.headers["x-adapter-version"] == task.json()["model"] == "sentiment@1"
    assert "x-adapter-version" not in server.client.post("/v1/completions", json={"model": "nope"}).headers


def test_split_is_sticky_per_user_weighted_without_and_changes_at_once(server: FakeServer) -> None:
    store = server.state.store
    store.route("chat", "prod", parse_split("1=75,2=25"))
    for user in ("ann", "bob", "cy", "dee"):
        first = complete(server, "chat@prod", user)
        assert all(complete(server, "chat@prod", user) == first for _ in range(5))
        assert first[0] == first[1]  # the answer names the adapter that ran
    drawn = Counter(complete(server, "chat@prod")[0] for _ in range(400))
    sigma = math.sqrt(400 * 0.25 * 0.75)
    assert abs(drawn["chat@2"] - 100) < 4 * sigma, drawn
    store.route("chat", "prod", parse_split("2=1"))  # a split of one: everyone moves
    assert {complete(server, "chat@prod", u)[0] for u in ("ann", "bob", "cy", "dee")} == {"chat@2"}
    store.tag("chat@1", "prod")  # promotion back: a plain tag, all traffic
    assert {complete(server, "chat@prod")[0] for _ in range(20)} == {"chat@1"}
    metrics = server.client.get("/metrics").text
    for version in ("chat@1", "chat@2"):
        assert (
            f'adapterdock_requests_total{{adapter="{version}",endpoint="/v1/completions",status="200"}}'
            in metrics
        )


def test_feedback_pairs_record_the_version_a_split_served(server: FakeServer) -> None:
    server.state.store.route("chat", "prod", parse_split("1=1,2=1"))
    served = set()
    for _ in range(12):
        response = server.client.post("/v1/feedback/pairs", json={"model": "chat@prod", "prompt": "hello"})
        for candidate in response.json()["candidates"]:
            served.add(candidate["model"])
    assert served == {"chat@1", "chat@2"}
    pairs = FeedbackStore(server.config.feedback_db, create=False).pairs()
    recorded = {f"{p.adapter_a}@{p.version_a}" for p in pairs} | {
        f"{p.adapter_b}@{p.version_b}" for p in pairs
    }
    assert recorded == {"chat@1", "chat@2"}


def test_a_split_tag_inside_a_weighted_set_is_sticky_per_user(server: FakeServer) -> None:
    server.state.store.route("chat", "prod", parse_split("1=50,2=50"))

    def served(user: str) -> str:
        body = {"model": "chat@prod*0.5+other*0.5", "prompt": "x", "max_tokens": 1, "user": user}
        response = server.client.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
        return response.json()["model"]

    by_user = {user: served(user) for user in ("ann", "bob", "cy", "dee", "eve", "fay", "gus", "hal")}
    assert all(served(user) == first for user, first in by_user.items() for _ in range(3))
    assert set(by_user.values()) == {"chat@1+other@1", "chat@2+other@1"}  # both versions drawn, by user
