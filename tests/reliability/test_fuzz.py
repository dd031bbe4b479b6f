"""Fuzzing the HTTP API with hypothesis: no body, path or header may produce a 5xx.

Volume runs in-process (the real app, routes, resolver and adapter cache over the fake engine and scheduler
of tests/server/fakes.py), a few hundred examples per test, derandomized so CI is reproducible. A smaller pass
sends well-formed but extreme sampling requests to the real server (real tokenizer, real sampling code).
Every example asserts: status < 500, errors in OpenAI's shape, and afterwards no adapter lease is left held.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hub.store import LocalStore
from tests.reliability.conftest import ServerProcess
from tests.server.fakes import FakeServer, FakeTokenizer, populate

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

FUZZ = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


class TextTokenizer(FakeTokenizer):
    """The fake's byte tokenizer, but total over Python strings (lone surrogates included), as the real
    tokenizer is (test_hostile_input sends lone surrogates to the real one)."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [b + 5 for b in text.encode("utf-8", "surrogatepass")]


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeServer]:
    store = LocalStore(tmp_path_factory.mktemp("fuzz") / "registry")
    populate(store)
    with FakeServer(store, max_new_tokens=32, max_input_tokens=64, max_body_bytes=32768) as server:
        server.engine.tokenizer = TextTokenizer()
        yield server


# ---- strategies -----------------------------------------------------------------------------------
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30)
)
anything = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)
refs = st.sampled_from(
    ["chat", "chat@1", "chat@2", "chat@prod", "tiny", "other", "sentiment", "people", "judge", "merged",
     "foreign", "nope", "acme/x", "chat@latest", "chat@999", "../chat", "chat@", "@1", ""]
) | st.text(max_size=40)  # fmt: skip
small_ints = st.integers(-3, 70) | st.integers(-(2**64), 2**64)
floats = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0.0, 1e-40, 1.0, 2.0, 100.0])
texts = st.text(max_size=80)
stop_lists = st.lists(st.text(min_size=1, max_size=8), max_size=4)
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user", "assistant", "developer"]),
         "content": texts | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": texts}),
                                     max_size=2)},
    ),
    min_size=1, max_size=4,
).filter(lambda m: m[0]["role"] != "assistant")  # fmt: skip


def body(required: dict, optional: dict) -> st.SearchStrategy:
    """Half well-formed bodies (in range, so they reach the handlers), half with any field replaced by
    anything at all (wrong types, NaN, huge numbers, nesting) or with fields missing."""
    good = st.fixed_dictionaries(required, optional=optional)
    fields = {**required, **optional}
    hostile = st.fixed_dictionaries({}, optional={k: v | anything for k, v in fields.items()})
    return good | hostile


# Well-formed values per field (each `body` also sends anything at all in their place).
sampling = {
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0.01, 1),
    "n": st.integers(1, 2),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}),
    "stop": st.none() | st.text(min_size=1, max_size=8) | stop_lists,
    "seed": st.integers(0, 2**32),
    "ignore_eos": st.booleans(),
    "min_tokens": st.integers(0, 4),
    "presence_penalty": st.just(0.0) | floats,
    "top_k": st.just(-1) | small_ints,
    "logit_bias": st.just({}) | st.dictionaries(texts, floats, max_size=2),
}
generation_refs = st.sampled_from(["chat", "chat@1", "chat@2", "chat@prod", "tiny", "other"]) | refs
prompts = (
    texts
    | st.lists(texts, min_size=1, max_size=3)
    | st.lists(st.integers(5, 260), min_size=1, max_size=8)
    | st.lists(st.lists(st.integers(5, 260), min_size=1, max_size=4), min_size=1, max_size=3)
    | st.lists(small_ints, max_size=8)
)
tgi_parameters = st.fixed_dictionaries(
    {},
    optional={
        "adapter_id": generation_refs,
        "adapter_source": st.sampled_from(["local", "hub", "s3", None]),
        "max_new_tokens": st.integers(1, 32) | small_ints,
        "temperature": st.floats(0, 2) | floats,
        "top_p": st.floats(0.01, 1) | floats,
        "do_sample": st.booleans(),
        "stop": stop_lists,
        "details": st.booleans(),
        "return_full_text": st.booleans(),
        "truncate": st.integers(1, 64) | small_ints,
        "seed": st.integers(0, 2**32),
        "min_new_tokens": st.integers(0, 4),
        "ignore_eos_token": st.booleans(),
    },
)
task_inputs = texts | st.lists(texts, min_size=1, max_size=4)
pairs = st.fixed_dictionaries({"prompt": texts, "response": texts})
score_inputs = pairs | st.lists(pairs | st.tuples(texts, texts), min_size=1, max_size=3)
BODIES: dict[str, st.SearchStrategy] = {
    "/v1/completions": body(
        {"model": generation_refs, "prompt": prompts},
        {"max_tokens": st.integers(1, 32), "echo": st.booleans(), **sampling},
    ),
    "/v1/chat/completions": body(
        {"model": generation_refs, "messages": messages},
        {"max_tokens": st.integers(1, 32), "max_completion_tokens": st.integers(1, 32), **sampling},
    ),
    "/generate": body({"inputs": texts}, {"parameters": tgi_parameters}),
    "/generate_stream": body({"inputs": texts}, {"parameters": tgi_parameters}),
    "/": body({"inputs": texts}, {"parameters": tgi_parameters, "stream": st.booleans()}),
    "/v1/classify": body({"adapter": st.just("sentiment") | refs, "inputs": task_inputs}, {}),
    "/v1/ner": body({"adapter": st.just("people") | refs, "inputs": task_inputs}, {}),
    "/v1/score": body({"adapter": st.just("judge") | refs, "inputs": score_inputs}, {}),
    "/v1/adapters/load": body(
        {"adapter": refs}, {"pin": st.booleans(), "adapter_source": st.sampled_from(["local", "hub"])}
    ),
}
requests = st.sampled_from(sorted(BODIES)).flatmap(lambda path: st.tuples(st.just(path), BODIES[path]))


STATUSES: collections.Counter[int] = collections.Counter()
"""Status codes the in-process body fuzz saw (to check it reached the handlers, not just validation)."""


def check(response, what) -> None:
    STATUSES[response.status_code] += 1
    assert response.status_code < 500, (what, response.status_code, response.text[:500])
    if response.status_code >= 400:
        error = response.json()["error"]
        assert error["message"] and error["code"], (what, error)
    elif response.headers.get("content-type", "").startswith("text/event-stream"):
        for line in response.text.splitlines():
            if line.startswith("data:") and line != "data: [DONE]":
                assert "error" not in json.loads(line[5:]), (what, line)


def no_leases(server: FakeServer) -> None:
    """No request left a lease behind; pins (which the fuzz may set) are lifted for the next example."""
    for entry in server.state.cache.entries():
        assert entry.leases == 0, entry
        if entry.pinned:
            server.state.cache.unpin(entry.key)


# ---- in-process -----------------------------------------------------------------------------------
@settings(FUZZ, max_examples=400)
@given(request=requests)
def test_fuzz_request_bodies_never_5xx(fake: FakeServer, request):
    path, body = request
    response = fake.client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
    check(response, (path, body))
    no_leases(fake)


def test_the_body_fuzz_reached_the_handlers(fake: FakeServer):
    """Random bodies are mostly refused; enough must be served that the fuzz exercised the routes. Metric
    labels stay bounded (only resolved adapters and known routes become labels, never client strings)."""
    lines = fake.client.get("/metrics").text.splitlines()
    series = [line for line in lines if line.startswith("adapterdock_")]
    assert len(series) < 600, len(series)
    assert not [line for line in series if "nope" in line or "../" in line]
    total = sum(STATUSES.values())
    assert total >= FUZZ.max_examples, STATUSES
    # About 19% of these bodies are servable (half are hostile by construction); an eighth of them
    # being served shows the handlers ran, without depending on which derandomized sample comes out.
    assert STATUSES[200] >= total // 8, STATUSES
    assert len([s for s in STATUSES if 400 <= s < 500]) >= 3, STATUSES
    print(f"\nfuzz: statuses over {total} bodies: {dict(sorted(STATUSES.items()))}")


@settings(FUZZ, max_examples=150)
@given(ref=st.text(max_size=60), action=st.sampled_from(["pin", "unpin", "delete"]))
def test_fuzz_adapter_paths_never_5xx(fake: FakeServer, ref: str, action: str):
    encoded = quote(ref, safe="")
    if action == "delete":
        response = fake.client.delete(f"/v1/adapters/{encoded}")
    else:
        response = fake.client.post(f"/v1/adapters/{encoded}/{action}")
    check(response, (action, ref))
    no_leases(fake)


@settings(FUZZ, max_examples=100)
@given(raw=st.binary(max_size=300) | anything.map(lambda v: json.dumps(v).encode()),
       content_type=st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded",
                                     "application/json; charset=latin-1", ""]),
       path=st.sampled_from(sorted(BODIES)))  # fmt: skip
def test_fuzz_raw_bytes_never_5xx(fake: FakeServer, raw: bytes, content_type: str, path: str):
    headers = {"content-type": content_type} if content_type else {}
    check(fake.client.post(path, content=raw, headers=headers), (path, raw[:80]))
    no_leases(fake)


@settings(FUZZ, max_examples=100)
@given(authorization=st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=60))
def test_fuzz_authorization_headers_are_401(tmp_path_factory: pytest.TempPathFactory, authorization: str):
    key = "fuzz-key-123"
    if authorization.strip() == f"Bearer {key}":
        return
    server = _keyed_server(tmp_path_factory)
    response = server.client.get("/v1/models", headers={"authorization": authorization})
    assert response.status_code == 401, (authorization, response.text)


_KEYED: list[FakeServer] = []


def _keyed_server(tmp_path_factory: pytest.TempPathFactory) -> FakeServer:
    if not _KEYED:
        store = LocalStore(Path(tmp_path_factory.mktemp("fuzz-keyed")) / "registry")
        populate(store)
        _KEYED.append(FakeServer(store, api_key="fuzz-key-123").__enter__())
    return _KEYED[0]


@pytest.fixture(scope="module", autouse=True)
def _close_keyed() -> Iterator[None]:
    yield
    while _KEYED:
        _KEYED.pop().__exit__(None, None, None)


# ---- against the real server -----------------------------------------------------------------------
# Tiny positive temperatures once overflowed the softmax and failed whole batches: keep them in the mix.
real_temperature = st.just(0.0) | st.floats(0.0, 100.0) | st.sampled_from([5e-324, 1e-40, 1e-6, 1e-5])
real_bodies = st.fixed_dictionaries(
    {"model": st.sampled_from(["tiny", "load-00", "load-01", "load-02"]),
     "prompt": st.text(min_size=1, max_size=40) | st.lists(st.integers(0, 4095), min_size=1, max_size=8),
     "max_tokens": st.integers(1, 4)},
    optional={"temperature": real_temperature, "top_p": st.floats(1e-6, 1.0),
              "seed": st.integers(0, 2**63 - 1),
              "stop": st.lists(st.text(min_size=1, max_size=5), max_size=3), "n": st.integers(1, 2),
              "stream": st.booleans(), "echo": st.booleans(), "min_tokens": st.integers(0, 4),
              "ignore_eos": st.booleans()},
)  # fmt: skip


@settings(FUZZ, max_examples=25)
@given(body=real_bodies)
def test_fuzz_real_sampling_never_5xx(live: ServerProcess, body: dict):
    with live.client() as client:
        response = client.post("/v1/completions", json=body)
    check(response, body)
    if response.status_code == 200 and not body.get("stream"):
        usage = response.json()["usage"]
        assert usage["completion_tokens"] <= body["max_tokens"] * body.get("n", 1)
