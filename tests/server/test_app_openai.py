"""OpenAI-compatible routes over fake engine/scheduler: shapes, streaming, adapters, limits, errors."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from hub.store import LocalStore
from tests.server.fakes import FakeServer, populate


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeServer]:
    store = LocalStore(tmp_path_factory.mktemp("openai") / "registry")
    populate(store)
    with FakeServer(store, max_new_tokens=64) as server:
        yield server


def events(text: str) -> list:
    """The JSON payloads of an SSE body (and the [DONE] marker as a string)."""
    out = []
    for line in text.splitlines():
        if line.startswith("data: "):
            payload = line[len("data: ") :]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def test_completion_uses_the_named_adapter(server: FakeServer):
    response = server.client.post(
        "/v1/completions", json={"model": "chat", "prompt": "hello", "max_tokens": 8}
    )
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "text_completion" and body["model"] == "chat@2"  # the version that served it
    assert body["choices"] == [{"index": 0, "text": "olleh|2@", "logprobs": None, "finish_reason": "length"}]
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 8, "total_tokens": 13}
    assert server.scheduler.requests[-1].adapter.key == "chat@2"


def test_pinned_version_tag_and_base(server: FakeServer):
    def text(model: str) -> str:
        body = {"model": model, "prompt": "ab", "max_tokens": 64}
        return server.client.post("/v1/completions", json=body).json()["choices"][0]["text"]

    assert text("chat@1") == "ba|1@tahc"
    assert text("chat@prod") == "ba|1@tahc"
    assert text("tiny") == "ba|esab"  # the base's name means no adapter
    assert server.scheduler.requests[-1].adapter is None


def test_sampling_parameters_reach_the_scheduler(server: FakeServer):
    body = {
        "model": "other",
        "prompt": [[70, 71], [72]],
        "max_tokens": 3,
        "temperature": 0.5,
        "top_p": 0.9,
        "seed": 11,
        "n": 2,
        "stop": ["zz"],
        "ignore_eos": True,
        "min_tokens": 2,
    }
    response = server.client.post("/v1/completions", json=body)
    assert response.status_code == 200
    assert [c["index"] for c in response.json()["choices"]] == [0, 1, 2, 3]
    sent = server.scheduler.requests[-4:]
    assert [r.prompt_ids for r in sent] == [[70, 71], [70, 71], [72], [72]]
    assert [r.seed for r in sent] == [11, 12, 11, 12]
    first = sent[0]
    assert (first.max_new_tokens, first.temperature, first.top_p, first.stop) == (3, 0.5, 0.9, ["zz"])
    assert (first.ignore_eos, first.min_tokens) == (True, 2)


def test_stop_and_echo(server: FakeServer):
    body = {"model": "chat", "prompt": "hello", "max_tokens": 64, "stop": ["|"], "echo": True}
    choice = server.client.post("/v1/completions", json=body).json()["choices"][0]
    assert choice == {"index": 0, "text": "helloolleh", "logprobs": None, "finish_reason": "stop"}


def test_streamed_completion_matches_the_unstreamed_one(server: FakeServer):
    body = {"model": "chat@1", "prompt": "stream me", "max_tokens": 12}
    whole = server.client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    response = server.client.post(
        "/v1/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}}
    )
    assert response.headers["content-type"].startswith("text/event-stream")
    chunks = events(response.text)
    assert chunks[-1] == "[DONE]"
    usage = chunks[-2]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 12
    texts = [c["choices"][0]["text"] for c in chunks[:-2]]
    assert "".join(texts) == whole
    assert chunks[-3]["choices"][0]["finish_reason"] == "length"
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks[:-1])


def test_chat_completion_and_its_stream(server: FakeServer):
    body = {
        "model": "chat",
        "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}],
        "max_tokens": 64,
    }
    response = server.client.post("/v1/chat/completions", json=body).json()
    assert response["object"] == "chat.completion"
    message = response["choices"][0]["message"]
    assert message["role"] == "assistant"
    assert message["content"] == ("chat@2|<system>s\n<user>hi\n<assistant>")[::-1]
    assert response["choices"][0]["finish_reason"] == "stop"
    chunks = events(server.client.post("/v1/chat/completions", json={**body, "stream": True}).text)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1] == "[DONE]"
    assert chunks[-2]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    assert streamed == message["content"]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks[:-1])


def test_chat_template_errors_are_400(server: FakeServer):
    body = {"model": "chat", "messages": [{"role": "assistant", "content": "first"}]}
    response = server.client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_input"


def test_models_lists_base_and_generation_adapters(server: FakeServer):
    ids = [m["id"] for m in server.client.get("/v1/models").json()["data"]]
    assert ids[0] == "tiny"
    assert {"chat", "chat@1", "chat@2", "other", "other@1"} <= set(ids)
    assert not {"sentiment", "people", "judge", "foreign", "merged"} & {i.split("@")[0] for i in ids}


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"model": "nope", "prompt": "x"}, 404, "adapter_not_found"),
        ({"model": "chat@7", "prompt": "x"}, 404, "adapter_not_found"),
        ({"model": "foreign", "prompt": "x"}, 409, "base_mismatch"),
        ({"model": "merged", "prompt": "x"}, 409, "adapter_is_full_model"),
        ({"model": "sentiment", "prompt": "x"}, 400, "wrong_task"),
        ({"model": "../etc/passwd", "prompt": "x"}, 400, "invalid_reference"),
        ({"model": "chat", "prompt": "x", "max_tokens": 65}, 400, "input_too_long"),
        ({"model": "chat", "prompt": "x" * 800}, 400, "input_too_long"),
        ({"model": "chat", "prompt": [99999]}, 400, "invalid_input"),
        ({"model": "chat", "prompt": "x", "n": 8, "max_tokens": 1}, 200, None),
        ({"model": "chat", "prompt": ["x"] * 9, "n": 8}, 400, "input_too_long"),
        ({"model": "chat", "prompt": "x", "frequency_penalty": 1}, 400, "unsupported_parameter"),
        ({"model": "chat", "prompt": "x", "temperature": -1}, 422, "invalid_body"),
        ({"model": "chat"}, 422, "invalid_body"),
    ],
)
def test_errors_have_openai_shape_and_status(server: FakeServer, body: dict, status: int, code: str | None):
    response = server.client.post("/v1/completions", json=body)
    assert response.status_code == status, response.text
    if code is not None:
        error = response.json()["error"]
        assert error["code"] == code and error["message"] and error["type"] == "invalid_request_error"


def test_malformed_json_is_422(server: FakeServer):
    response = server.client.post(
        "/v1/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_body"


def test_wrong_task_names_the_endpoint(server: FakeServer):
    body = {"model": "people", "messages": [{"role": "user", "content": "x"}]}
    message = server.client.post("/v1/chat/completions", json=body).json()["error"]["message"]
    assert "POST /v1/ner" in message


def test_queue_full_is_503_with_retry_after_and_releases_the_lease(server: FakeServer):
    server.scheduler.full = True
    try:
        response = server.client.post("/v1/completions", json={"model": "other", "prompt": "x"})
    finally:
        server.scheduler.full = False
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert response.json()["error"]["code"] == "queue_full"
    assert server.state.cache.get("other@1").leases == 0


def test_leases_end_with_each_request(server: FakeServer):
    for stream in (False, True):
        server.client.post("/v1/completions", json={"model": "chat", "prompt": "x", "stream": stream})
    assert all(e.leases == 0 for e in server.state.cache.entries())


def test_a_failure_mid_stream_ends_with_an_error_event_and_no_traceback(server: FakeServer):
    server.scheduler.fail_after = 2
    try:
        body = {"model": "chat", "prompt": "hello", "max_tokens": 8, "stream": True}
        streamed = server.client.post("/v1/completions", json=body)
        whole = server.client.post("/v1/completions", json={**body, "stream": False})
    finally:
        server.scheduler.fail_after = None
    chunks = events(streamed.text)
    assert [c["choices"][0]["text"] for c in chunks[:2]] == ["o", "l"]
    assert chunks[-1]["error"]["code"] == "internal_error" and "Traceback" not in streamed.text
    assert whole.status_code == 500 and whole.json()["error"]["type"] == "server_error"
    assert all(e.leases == 0 for e in server.state.cache.entries())
