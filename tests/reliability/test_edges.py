"""The server's edges, against a real server: feedback access and rater identity, admin rights, pin limits,
bounded stop-string cost, and the limits docs/reliability.md claims (queue_full, --max-inputs-per-request,
--max-rank, the shutdown deadline).

One server process ("edges") runs with an API key, an admin key, a rater tokens file (ann, bob), at most
3 judgements per rater, 3 adapter slots, 2 rows per batch, a queue of 2, 2 inputs per request and
--max-rank 8. The shutdown test starts its own server, since it ends it.
"""

from __future__ import annotations

import base64
import signal
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from hub.bases import BaseInfo
from hub.store import LocalStore
from server.detokenize import Detokenizer
from server.feedback.store import FeedbackStore
from tests.reliability.conftest import (
    MAX_BODY,
    PROMPT,
    ServerProcess,
    launch,
    lora_variants,
    register,
    stop,
    wait_ready,
)
from tests.server.conftest import make_peft_adapter

pytestmark = [pytest.mark.slow, pytest.mark.network, pytest.mark.timeout(300)]

API_KEY, ADMIN_KEY = "edges-api-key-5e1", "edges-admin-key-93c"
RATERS = {"ann": "edges-rater-ann-7a0", "bob": "edges-rater-bob-c44"}
MAX_JUDGEMENTS = 3
NAMES = [f"edge-{i}" for i in range(5)]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def basic(secret: str, user: str = "ann") -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{secret}".encode()).decode()}


API, ADMIN, ANN, BOB = bearer(API_KEY), bearer(ADMIN_KEY), bearer(RATERS["ann"]), bearer(RATERS["bob"])


@pytest.fixture(scope="module")
def edges(tiny_base: BaseInfo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("edges")
    store = LocalStore(root / "registry")
    tokens = root / "raters.txt"
    tokens.write_text("# rater_id:token\n" + "".join(f"{r}:{t}\n" for r, t in RATERS.items()))
    server = launch(
        store, root / "edges.log",
        "--api-key", API_KEY, "--admin-key", ADMIN_KEY, "--rater-tokens-file", str(tokens),
        "--max-judgements-per-rater", str(MAX_JUDGEMENTS), "--max-adapters", "3", "--max-batch-size", "2",
        "--max-queue", "2", "--max-inputs-per-request", "2", "--max-rank", "8",
        "--max-body-bytes", str(MAX_BODY), "--adapter-wait-timeout", "5",
    )  # fmt: skip
    try:
        server.folders = lora_variants(tiny_base, root / "src", NAMES, seed=7)
        register(store, tiny_base, server.folders)
        wide = make_peft_adapter(tiny_base, root / "src" / "wide", r=16, seed=3)
        store.put(wide, name="edge-rank-16", task="instruction", method="lora", base=tiny_base.spec)
        wait_ready(server)
        yield server
    finally:
        stop(server)


def call(
    server: ServerProcess, method: str, path: str, headers: dict | None = None, **kwargs
) -> httpx.Response:
    with httpx.Client(base_url=server.url, timeout=60) as client:
        return client.request(method, path, headers=headers or {}, **kwargs)


def make_pair(server: ServerProcess, prompt: str) -> str:
    body = {"model": "edge-0", "prompt": prompt, "max_tokens": 4, "temperature": 1.0, "seed": 1}
    response = call(server, "POST", "/v1/feedback/pairs", API, json=body)
    assert response.status_code == 200, response.text
    return response.json()["pair_id"]


# ---- feedback: access before the body ------------------------------------------------------------------
FEEDBACK_ROUTES = [
    ("GET", "/feedback"),
    ("GET", "/v1/feedback/next"),
    ("GET", "/v1/feedback/progress"),
    ("POST", "/v1/feedback"),
    ("POST", "/v1/feedback/pairs"),
]
BODIES = {
    "valid": b'{"pair_id": "pair-x", "choice": "a", "rater": "ann", "model": "edge-0", "prompt": "x"}',
    "malformed": b'{"pair_id": ',
    "not-utf8": b'{"choice": "\xff\xfe"}',
    "nested": b"[" * 50_000 + b"]" * 50_000,
    "oversized": b"x" * (MAX_BODY * 4),
}
STRANGERS = {
    "none": {},
    "wrong": bearer("edges-wrong"),
    "basic-wrong": basic("edges-wrong"),
    "rater-as-basic-on-api": basic(RATERS["ann"]),
}


def test_feedback_routes_refuse_strangers_with_401_before_the_body(edges: ServerProcess):
    refused = 0
    for method, path in FEEDBACK_ROUTES:
        for body_name, body in BODIES.items():
            for who, headers in STRANGERS.items():
                if who == "rater-as-basic-on-api" and path == "/feedback":
                    continue  # the page takes Basic: that one is a valid credential there
                response = call(
                    edges, method, path, {**headers, "content-type": "application/json"}, content=body
                )
                assert response.status_code == 401, (
                    method,
                    path,
                    body_name,
                    who,
                    response.status_code,
                    response.text,
                )
                error = response.json()["error"]
                assert error["code"] == "invalid_api_key" and error["message"].startswith(
                    ("Missing", "Invalid")
                )
                challenge = response.headers["www-authenticate"]
                assert challenge.startswith("Basic") if path == "/feedback" else challenge == "Bearer"
                refused += 1
    # A rater token opens the rating paths only, never pairs (which generate text).
    assert (
        call(edges, "POST", "/v1/feedback/pairs", ANN, json={"model": "edge-0", "prompt": "x"}).status_code
        == 401
    )
    # The page itself: a rater token (Bearer, or Basic as a browser sends it), the API key or the admin key.
    for headers in (ANN, basic(RATERS["bob"]), API, ADMIN):
        page = call(edges, "GET", "/feedback", headers)
        assert page.status_code == 200 and "<script nonce=" in page.text
    print(f"\nfeedback: {refused} unauthenticated requests refused with 401 before their bodies")


def judge(server: ServerProcess, headers: dict, pair_id: str, choice: str, **extra) -> httpx.Response:
    return call(server, "POST", "/v1/feedback", headers, json={"pair_id": pair_id, "choice": choice, **extra})


def test_a_rater_is_who_their_token_says(edges: ServerProcess):
    pair_id = make_pair(edges, "identity")
    as_bob = judge(edges, ANN, pair_id, "a", rater="bob")  # ann's token cannot act as bob
    assert as_bob.status_code == 403 and as_bob.json()["error"]["code"] == "forbidden", as_bob.text
    assert "belongs to rater 'ann'" in as_bob.json()["error"]["message"]
    assert call(edges, "GET", "/v1/feedback/next", ANN, params={"rater": "bob"}).status_code == 403
    mine = judge(edges, ANN, pair_id, "a")  # no rater field: the token says ann
    assert mine.status_code == 200 and mine.json()["rater"] == "ann" and mine.json()["status"] == "recorded"
    assert judge(edges, ANN, pair_id, "b", rater="ann").json()["status"] == "replaced"  # her own, by name
    bobs = judge(edges, BOB, pair_id, "tie")  # bob's judgement is his own; ann's stays
    assert bobs.json()["rater"] == "bob" and bobs.json()["status"] == "recorded"
    assert call(edges, "GET", "/v1/feedback/next", BOB).json()["rater"] == "bob"
    stored = FeedbackStore(edges.registry.root / "feedback.sqlite", create=False).judgements(pair_id)
    assert sorted((j.rater, j.choice) for j in stored) == [("ann", "b"), ("bob", "tie")]
    # The API key's holder (an operator's script) names the rater.
    assert judge(edges, API, pair_id, "a", rater="carol").json()["rater"] == "carol"
    assert judge(edges, API, pair_id, "a").status_code == 400  # and must name one


def test_per_rater_limits_on_judgements_and_comments(edges: ServerProcess):
    pairs = [make_pair(edges, f"limit {i}") for i in range(MAX_JUDGEMENTS + 1)]
    db = FeedbackStore(edges.registry.root / "feedback.sqlite", create=False)
    allowed = MAX_JUDGEMENTS - sum(j.rater == "bob" for j in db.judgements())  # bob may have judged before
    statuses = [judge(edges, BOB, pair_id, "a").status_code for pair_id in pairs]
    assert statuses == [200] * allowed + [429] * (len(pairs) - allowed), statuses
    over = judge(edges, BOB, pairs[-1], "a")
    assert over.json()["error"]["code"] == "rater_limit" and "bob" in over.json()["error"]["message"]
    assert judge(edges, BOB, pairs[0], "tie").json()["status"] == "replaced"  # changing one is not a new one
    assert judge(edges, ANN, pairs[-1], "a").status_code == 200  # the limit is per rater
    long = judge(edges, ANN, pairs[-1], "a", comment="x" * 4001)
    assert long.status_code == 422 and "comment" in long.text


# ---- admin rights and pins ------------------------------------------------------------------------------
def test_pins_and_unloads_need_the_admin_key_and_never_take_every_slot(edges: ServerProcess):
    for method, path, body in [
        ("POST", "/v1/adapters/edge-1/pin", None),
        ("POST", "/v1/adapters/edge-1/unpin", None),
        ("DELETE", "/v1/adapters/edge-1", None),
        ("POST", "/v1/adapters/load", {"adapter": "edge-1", "pin": True}),
    ]:
        response = call(edges, method, path, API, json=body)
        assert response.status_code == 403, (method, path, response.text)
        assert (
            response.json()["error"]["code"] == "forbidden"
            and "admin key" in response.json()["error"]["message"]
        )
        assert call(edges, method, path, {}, json=body).status_code == 401
        assert call(edges, method, path, ANN, json=body).status_code == 401
    loaded = call(edges, "POST", "/v1/adapters/load", API, json={"adapter": "edge-1"})  # loading is inference
    assert loaded.status_code == 200 and not loaded.json()["pinned"]
    for name in ("edge-1", "edge-2"):  # 3 slots: 2 may be pinned
        assert call(edges, "POST", f"/v1/adapters/{name}/pin", ADMIN).json()["pinned"]
    third = call(edges, "POST", "/v1/adapters/edge-3/pin", ADMIN)
    assert third.status_code == 409 and third.json()["error"]["code"] == "pin_limit", third.text
    for name, key in (("edge-3", API), ("edge-4", API), ("edge-0", API), ("edge-1", ADMIN)):
        body = {"model": name, "prompt": PROMPT, "max_tokens": 2}  # the free slot serves every other adapter
        assert call(edges, "POST", "/v1/completions", key, json=body).status_code == 200
    assert call(edges, "POST", "/v1/adapters/edge-2/unpin", ADMIN).json()["unpinned"] == ["edge-2@1"]
    assert call(edges, "DELETE", "/v1/adapters/edge-1", ADMIN).json()["unloaded"] == ["edge-1@1"]


# ---- stop strings ---------------------------------------------------------------------------------------
def _detokenize_cost(tokenizer, ids: list[int], stops: list[str], rounds: int = 3) -> float:
    """Median seconds to detokenize `ids` with `stops` (emitting as the server does, token by token)."""
    times = []
    for _ in range(rounds):
        detok = Detokenizer(tokenizer, stops)
        started = time.perf_counter()
        for token in ids:
            detok.add(token)
            assert detok.find_stop() is None
            detok.take()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def test_stop_strings_cost_per_token_does_not_grow_with_their_length(
    edges: ServerProcess, tiny_base: BaseInfo
):
    """16 stop strings of 256 characters that keep almost matching cost about what 16 short ones do.

    Rescanning the tail for every token cost stops x length^2 per token, and the batch waited on it.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_base.path)
    ids = tokenizer("aaaa ab " * 400)["input_ids"][:1500]
    long = ["a" * 255 + str(i % 10) for i in range(16)]  # every tail of a's is a prefix of each
    short = ["aaa" + str(i % 10) for i in range(16)]
    ratio = _detokenize_cost(tokenizer, ids, long) / _detokenize_cost(tokenizer, ids, short)
    assert ratio < 3, f"256-character stop strings cost {ratio:.1f}x what 4-character ones do"
    # Against the server: such a request is served, and a stop string still cuts where it appears.
    body = {"model": "edge-0", "prompt": PROMPT, "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    text = call(edges, "POST", "/v1/completions", API, json=body).json()["choices"][0]["text"]
    hostile = call(edges, "POST", "/v1/completions", API, json={**body, "stop": long})
    assert hostile.status_code == 200 and hostile.json()["choices"][0]["text"] == text
    cut = text[len(text) // 2 : len(text) // 2 + 3]
    if cut.strip():
        stopped = call(edges, "POST", "/v1/completions", API, json={**body, "stop": [*long[:15], cut]})
        assert stopped.json()["choices"][0]["text"] == text[: text.index(cut)]


# ---- claims of docs/reliability.md -----------------------------------------------------------------------
def scheduler_load(server: ServerProcess) -> int:
    """Requests the scheduler holds now: running plus waiting (from /metrics)."""
    text = call(server, "GET", "/metrics", API).text
    values = {
        line.split()[0]: float(line.split()[1])
        for line in text.splitlines()
        if line.startswith("adapterdock_")
    }
    return int(
        values.get("adapterdock_scheduler_running", 0) + values.get("adapterdock_scheduler_queue_depth", 0)
    )


def test_a_full_queue_is_503_queue_full_with_retry_after(edges: ServerProcess):
    """2 rows run, 2 requests wait (--max-queue 2): the next one is refused at once."""
    long = {"model": "edge-0", "prompt": PROMPT, "max_tokens": 256, "temperature": 0, "ignore_eos": True}
    results: list[int] = []

    def ask() -> None:
        results.append(call(edges, "POST", "/v1/completions", API, json=long).status_code)

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for held, thread in enumerate(threads, 1):
        thread.start()
        deadline = time.monotonic() + 30
        while (
            scheduler_load(edges) < held and time.monotonic() < deadline
        ):  # one at a time, so none is refused
            time.sleep(0.02)
    assert scheduler_load(edges) == 4, "the four long requests are not all held"
    refused = call(edges, "POST", "/v1/completions", API, json={**long, "max_tokens": 2})
    for thread in threads:
        thread.join(120)
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "queue_full" and refused.headers["retry-after"].isdigit()
    assert results == [200] * 4  # the accepted ones were all served


def test_more_inputs_than_max_inputs_per_request_are_400(edges: ServerProcess):
    three = ["one", "two", "three"]
    for path, body in [
        ("/v1/completions", {"model": "edge-0", "prompt": three, "max_tokens": 1}),
        ("/v1/completions", {"model": "edge-0", "prompt": "x", "max_tokens": 1, "n": 3}),
        ("/v1/classify", {"adapter": "edge-0", "inputs": three}),
    ]:
        response = call(edges, "POST", path, API, json=body)
        assert response.status_code == 400, (path, body, response.text)
        assert "at most 2" in response.json()["error"]["message"], response.text
    two = {"model": "edge-0", "prompt": three[:2], "max_tokens": 1}
    assert call(edges, "POST", "/v1/completions", API, json=two).status_code == 200


def test_an_adapter_above_max_rank_is_422_and_not_cached(edges: ServerProcess):
    for _ in range(2):
        response = call(edges, "POST", "/v1/completions", API, json={"model": "edge-rank-16", "prompt": "x"})
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["code"] == "corrupt_adapter" and "--max-rank 8" in error["message"], error
    listed = {a["id"]: a for a in call(edges, "GET", "/v1/adapters", API).json()["data"]}
    assert not listed["edge-rank-16@1"]["loaded"]


def test_shutdown_deadline_ends_the_process_with_work_left(tiny_base: BaseInfo, tmp_path: Path):
    """More work than the deadline allows (15 s for in-flight requests, then 10 s of draining): SIGTERM still
    ends the process within the deadline, and every client gets an answer or a closed connection."""
    store = LocalStore(tmp_path / "registry")
    register(store, tiny_base, lora_variants(tiny_base, tmp_path / "src", ["deadline-0"], seed=5))
    server = launch(store, tmp_path / "deadline.log", "--max-batch-size", "1", "--max-queue", "64")
    try:
        wait_ready(server)
        body = {
            "model": "deadline-0",
            "prompt": PROMPT,
            "max_tokens": 256,
            "temperature": 0,
            "ignore_eos": True,
        }
        started = time.monotonic()
        assert call(server, "POST", "/v1/completions", json=body).status_code == 200
        per_request = time.monotonic() - started
        count = min(64, int(45 / per_request) + 2)  # about 45 s of work, one row at a time
        outcomes: list[str] = []

        def client() -> None:
            try:
                outcomes.append(str(call(server, "POST", "/v1/completions", json=body).status_code))
            except httpx.HTTPError as exc:
                outcomes.append(type(exc).__name__)

        threads = [threading.Thread(target=client) for _ in range(count)]
        for thread in threads:
            thread.start()
        time.sleep(1.0)
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        exit_code = server.process.wait(60)
        took = time.monotonic() - signalled
        for thread in threads:
            thread.join(30)
    finally:
        stop(server)
    assert exit_code in (0, -signal.SIGTERM)
    assert took < 15 + 10 + 5, f"the process took {took:.1f} s to end after SIGTERM"
    assert len(outcomes) == count and not any(t.is_alive() for t in threads)  # nobody hangs
    assert outcomes.count("200") < count, f"all {count} finished: the deadline was never reached"
    print(f"\nshutdown: {count} requests of {per_request:.1f} s; exit after {took:.1f} s; {sorted(outcomes)}")
