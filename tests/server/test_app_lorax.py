"""LoRAX / TGI routes over fake engine/scheduler, checked against the clients' own response models."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from text_generation import types as tgi

from hub.store import LocalStore
from tests.server.fakes import FakeServer, populate


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeServer]:
    store = LocalStore(tmp_path_factory.mktemp("lorax") / "registry")
    populate(store)
    with FakeServer(store) as server:
        yield server


def sse_payloads(text: str) -> list[dict]:
    return [json.loads(line[5:]) for line in text.splitlines() if line.startswith("data:")]


def generate(server: FakeServer, path: str = "/generate", **parameters) -> object:
    return server.client.post(path, json={"inputs": "hey", "parameters": parameters})


def test_generate_with_adapter_and_details(server: FakeServer):
    response = generate(server, adapter_id="other", max_new_tokens=4, details=True)
    assert response.status_code == 200
    parsed = tgi.Response(**response.json())
    assert parsed.generated_text == "yeh|"
    details = parsed.details
    assert details.finish_reason == tgi.FinishReason.Length and details.generated_tokens == 4
    assert [t.text for t in details.tokens] == list("yeh|")
    assert response.json()["details"]["prompt_tokens"] == 3
    assert server.scheduler.requests[-1].adapter.key == "other@1"
    assert server.scheduler.requests[-1].temperature == 0.0  # TGI: greedy unless do_sample / knobs


def test_root_route_returns_a_list_or_streams(server: FakeServer):
    listed = server.client.post(
        "/", json={"inputs": "hey", "parameters": {"max_new_tokens": 3, "details": True}}
    )
    assert isinstance(listed.json(), list)
    assert tgi.Response(**listed.json()[0]).generated_text == "yeh"
    streamed = server.client.post(
        "/", json={"inputs": "hey", "parameters": {"max_new_tokens": 3}, "stream": True}
    )
    assert streamed.headers["content-type"].startswith("text/event-stream")
    assert [p["token"]["text"] for p in sse_payloads(streamed.text)] == ["y", "e", "h"]


def test_stream_events_and_final_details(server: FakeServer):
    response = generate(server, "/generate_stream", adapter_id="chat@1", max_new_tokens=64, details=True)
    payloads = sse_payloads(response.text)
    parsed = [tgi.StreamResponse(**p) for p in payloads]
    assert all(p.generated_text is None and p.details is None for p in parsed[:-1])
    final = parsed[-1]
    assert final.generated_text == "yeh|1@tahc" == "".join(p.token.text for p in parsed)
    assert final.details.finish_reason == tgi.FinishReason.EndOfSequenceToken
    assert final.details.generated_tokens == len(parsed)


def test_stop_sequence_full_text_and_truncate(server: FakeServer):
    body = generate(server, max_new_tokens=64, stop=["|"], return_full_text=True, details=True).json()
    assert body["generated_text"] == "heyyeh"
    assert body["details"]["finish_reason"] == "stop_sequence"
    generate(server, max_new_tokens=2, truncate=1)
    assert server.scheduler.requests[-1].prompt_ids == [ord("y") + 5]


def test_sampling_and_eos_parameters_map(server: FakeServer):
    generate(server, do_sample=True, top_p=0.5, seed=3, ignore_eos_token=True, max_new_tokens=2)
    sent = server.scheduler.requests[-1]
    assert (sent.temperature, sent.top_p, sent.seed, sent.ignore_eos) == (1.0, 0.5, 3, True)


@pytest.mark.parametrize(
    ("parameters", "status", "code"),
    [
        ({"adapter_id": "nope"}, 404, "adapter_not_found"),
        ({"adapter_id": "foreign"}, 409, "base_mismatch"),
        ({"adapter_id": "judge"}, 400, "wrong_task"),
        ({"adapter_id": "chat", "adapter_source": "hub"}, 400, "hub_not_configured"),
        ({"adapter_id": "chat", "adapter_source": "s3"}, 422, "invalid_body"),
        ({"adapter_id": "some-org/some-model-on-hf", "adapter_source": "hub"}, 400, "hub_not_configured"),
        ({"repetition_penalty": 1.3}, 400, "unsupported_parameter"),
        ({"max_new_tokens": 100000}, 400, "input_too_long"),
        ({"temperature": float("nan")}, 422, "invalid_body"),
    ],
)
def test_errors(server: FakeServer, parameters: dict, status: int, code: str):
    body = json.dumps({"inputs": "hey", "parameters": parameters}).replace("NaN", "NaN")
    response = server.client.post("/generate", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code


def test_info(server: FakeServer):
    info = server.client.get("/info").json()
    assert info["model_id"] == "tiny" and info["max_input_length"] == server.config.max_input_tokens
