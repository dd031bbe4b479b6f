"""Weighted sets on the app (fake engine): one cached entry per canonical key, scoped keys see a set only
when they may use every part, response and metrics labels without weights."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from hub.store import LocalStore
from server.keys import parse_keys
from tests.server.fakes import FakeServer, populate

KEYS = [
    {"name": "all", "key": "all-key", "adapters": ["*"], "rights": ["infer"]},
    {"name": "chatters", "key": "chat-key", "adapters": ["chat", "tiny"], "rights": ["infer"]},
]


@pytest.fixture
def server(tmp_path) -> Iterator[FakeServer]:
    store = LocalStore(tmp_path / "registry")
    populate(store)
    with FakeServer(store, keys=parse_keys(KEYS)) as server:
        yield server


def complete(server: FakeServer, secret: str, model: str) -> object:
    body = {"model": model, "prompt": "x", "max_tokens": 2}
    return server.client.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {secret}"})


def test_a_set_is_built_once_per_canonical_key(server: FakeServer) -> None:
    first = complete(server, "all-key", "chat@1*0.5+other*0.5")
    assert first.status_code == 200, first.text
    assert first.json()["model"] == "chat@1+other@1"
    assert complete(server, "all-key", "other@1*0.5+chat@1*0.5").status_code == 200  # same versions, weights
    assert complete(server, "all-key", "other@1*0.25+chat@1*0.5").status_code == 200  # other weights
    assert server.engine.loads == ["chat@1*0.5+other@1*0.5", "chat@1*0.5+other@1*0.25"]
    metrics = server.client.get("/metrics", headers={"Authorization": "Bearer all-key"}).text
    assert 'adapter="chat@1+other@1"' in metrics and "*0.5" not in metrics


def test_scoped_keys_need_every_part_and_see_only_their_sets(server: FakeServer) -> None:
    refused = complete(server, "chat-key", "chat*0.5+other*0.5")
    assert refused.status_code == 404 and refused.json()["error"]["code"] == "adapter_not_found"
    assert complete(server, "all-key", "chat@2*0.5+other@1*0.5").status_code == 200
    assert complete(server, "chat-key", "chat@1*0.5+chat@2*0.5").status_code == 200

    def listed(secret: str) -> set[str]:
        answer = server.client.get("/v1/adapters", headers={"Authorization": f"Bearer {secret}"}).json()
        sets = [row for row in answer["data"] if "+" in row["id"]]
        assert all(row["loaded"] and "task" not in row for row in sets)
        return {row["id"] for row in sets}

    assert listed("all-key") == {"chat@2*0.5+other@1*0.5", "chat@1*0.5+chat@2*0.5"}
    assert listed("chat-key") == {"chat@1*0.5+chat@2*0.5"}, "a set with a part out of scope stays invisible"


def test_task_and_syntax_errors(server: FakeServer) -> None:
    wrong = complete(server, "all-key", "chat*0.5+sentiment*0.5")
    assert wrong.status_code == 400 and wrong.json()["error"]["code"] == "wrong_task"
    bad = complete(server, "all-key", "chat*x")
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_reference"
    foreign = complete(server, "all-key", "chat+foreign")
    assert foreign.status_code == 409 and foreign.json()["error"]["code"] == "base_mismatch"
