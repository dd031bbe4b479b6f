"""Task routes over fake engine/scheduler: classify, ner, score, wrong tasks and input limits."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from hub.store import LocalStore
from tests.server.fakes import FakeServer, populate


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeServer]:
    store = LocalStore(tmp_path_factory.mktemp("tasks") / "registry")
    populate(store)
    with FakeServer(store, max_inputs_per_request=4, max_input_tokens=32) as server:
        yield server


def test_classify(server: FakeServer):
    body = server.client.post("/v1/classify", json={"adapter": "sentiment", "inputs": ["a", "bb"]}).json()
    assert body["model"] == "sentiment@1"
    assert body["data"] == [
        {"index": 0, "label": "pos", "scores": {"neg": 0.0, "pos": 1.0}},
        {"index": 1, "label": "neg", "scores": {"neg": 1.0, "pos": 0.0}},
    ]
    assert body["usage"] == {"prompt_tokens": 3}


def test_ner_single_text(server: FakeServer):
    body = server.client.post("/v1/ner", json={"adapter": "people@1", "inputs": "Ann went home"}).json()
    assert body["data"] == [
        {"index": 0, "entities": [{"type": "PER", "text": "Ann", "start": 0, "end": 3, "score": 0.9}]}
    ]


def test_score_pairs_are_tokenized_once_through_the_chat_template(server: FakeServer):
    body = {"adapter": "judge", "inputs": [{"prompt": "abc", "response": "d"}, ["a", "bcdef"]]}
    answer = server.client.post("/v1/score", json=body).json()
    # the fake scores the token count: "<user>abc\n<assistant>d\n" is 23 bytes, the second pair 25
    assert answer["data"] == [{"index": 0, "score": 23.0}, {"index": 1, "score": 25.0}]
    assert answer["usage"] == {"prompt_tokens": 48}


def test_score_length_check_counts_the_chat_template(server: FakeServer):
    # 20 characters of text fit the 32-token limit; rendered with the template (+19 tokens) they do not
    response = server.client.post("/v1/score", json={"adapter": "judge", "inputs": [["p" * 10, "r" * 10]]})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "input_too_long"


@pytest.mark.parametrize(
    ("path", "body", "status", "code", "hint"),
    [
        ("/v1/classify", {"adapter": "people", "inputs": "x"}, 400, "wrong_task", "POST /v1/ner"),
        ("/v1/ner", {"adapter": "judge", "inputs": "x"}, 400, "wrong_task", "POST /v1/score"),
        ("/v1/score", {"adapter": "sentiment", "inputs": [["p", "r"]]}, 400, "wrong_task", "/v1/classify"),
        ("/v1/classify", {"adapter": "chat", "inputs": "x"}, 400, "wrong_task", "/v1/chat/completions"),
        ("/v1/classify", {"adapter": "nope", "inputs": "x"}, 404, "adapter_not_found", "nope"),
        ("/v1/classify", {"adapter": "sentiment", "inputs": ["x"] * 5}, 400, "input_too_long", "at most 4"),
        ("/v1/classify", {"adapter": "sentiment", "inputs": "x" * 40}, 400, "input_too_long", "32"),
        ("/v1/classify", {"adapter": "sentiment", "inputs": []}, 422, "invalid_body", "inputs"),
        ("/v1/classify", {"inputs": "x"}, 422, "invalid_body", "adapter"),
    ],
)
def test_task_errors(server: FakeServer, path: str, body: dict, status: int, code: str, hint: str):
    response = server.client.post(path, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and hint in error["message"]
