"""Feedback routes over the fake engine/scheduler: pairs, judgements, next/progress, the page, access."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from hub.store import LocalStore
from server.feedback.auth import RATER_PATHS
from server.feedback.store import FeedbackStore
from tests.server.fakes import FakeServer, populate

API_KEY = "admin-key"
RATER_TOKEN = "rater-secret"
ADMIN = {"Authorization": f"Bearer {API_KEY}"}
RATER = {"Authorization": f"Bearer {RATER_TOKEN}"}
USER_TURN = {"role": "user", "content": "q"}
ASSISTANT_TURN = {"role": "assistant", "content": "a"}


def start(store: LocalStore, db_path, **kwargs) -> FakeServer:
    """A fake server over the shared registry with its own feedback database."""
    return FakeServer(store, max_new_tokens=64, feedback_db=db_path, **kwargs).__enter__()


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory: pytest.TempPathFactory) -> LocalStore:
    store = LocalStore(tmp_path_factory.mktemp("feedback-api") / "registry")
    populate(store)
    return store


@pytest.fixture
def secured(shared_store: LocalStore, tmp_path) -> Iterator[FakeServer]:
    fake = start(shared_store, tmp_path / "feedback.sqlite", api_key=API_KEY, rater_token=RATER_TOKEN)
    yield fake
    fake.__exit__(None, None, None)


@pytest.fixture
def fresh(shared_store: LocalStore, tmp_path) -> Iterator[FakeServer]:
    """An open server (no keys)."""
    fake = start(shared_store, tmp_path / "feedback.sqlite")
    yield fake
    fake.__exit__(None, None, None)


def make_pair(fake: FakeServer, headers: dict | None = None, **body) -> dict:
    body = {"model": "chat", "prompt": "hello", "max_tokens": 32, "temperature": 0.7, **body}
    response = fake.client.post("/v1/feedback/pairs", json=body, headers=headers or ADMIN)
    assert response.status_code == 200, response.text
    return response.json()


def db(fake: FakeServer) -> FeedbackStore:
    return FeedbackStore(fake.config.feedback_db, create=False)


def test_two_samples_of_one_adapter_use_two_seeds(secured: FakeServer):
    body = make_pair(secured, seed=41, stop=["zz"])
    a, b = body["candidates"]
    assert (a["label"], b["label"]) == ("a", "b")
    assert a["model"] == b["model"] == "chat@2"
    assert (a["seed"], b["seed"]) == (41, 42)
    assert a["text"] == "chat@2|<user>hello\n<assistant>"[::-1]  # the fake's answer: key|prompt, reversed
    requests = secured.scheduler.requests[-2:]
    assert [r.seed for r in requests] == [41, 42]
    assert all(r.adapter.key == "chat@2" and r.temperature == 0.7 and r.stop == ["zz"] for r in requests)
    assert requests[0].prompt_ids == requests[1].prompt_ids  # the chat template around one user turn
    assert secured.engine.tokenizer.decode(requests[0].prompt_ids) == "<user>hello\n<assistant>"
    stored = db(secured).get_pair(body["pair_id"])
    assert (stored.adapter_a, stored.version_a, stored.adapter_b, stored.version_b) == ("chat", 2, "chat", 2)
    assert stored.prompt == "hello" and stored.answer_a == a["text"] and stored.answer_b == b["text"]
    assert stored.params["seed_a"] == 41 and stored.params["temperature"] == 0.7
    assert secured.state.cache.stats["in_use"] == 0  # both leases released


def test_one_answer_from_each_model_with_versions(secured: FakeServer):
    body = make_pair(secured, model="chat@prod", model_b="tiny", seed=5)
    a, b = body["candidates"]
    assert (a["model"], b["model"]) == ("chat@1", "tiny")
    assert (a["seed"], b["seed"]) == (5, 5)  # two models: the same seed is the fair comparison
    assert a["text"] != b["text"]
    stored = db(secured).get_pair(body["pair_id"])
    assert (stored.adapter_a, stored.version_a, stored.adapter_b, stored.version_b) == (
        "chat",
        1,
        "tiny",
        None,
    )


def test_messages_are_stored_and_rendered_through_the_template(secured: FakeServer):
    messages = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hi"}]
    body = make_pair(secured, prompt=None, messages=messages)
    assert body["prompt"] == messages
    assert db(secured).get_pair(body["pair_id"]).prompt == messages
    decoded = secured.engine.tokenizer.decode(secured.scheduler.requests[-1].prompt_ids)
    assert decoded == "<system>be kind\n<user>hi\n<assistant>"


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"prompt": None}, 400, "invalid_input"),
        ({"messages": [{"role": "user", "content": "x"}]}, 400, "invalid_input"),
        ({"prompt": None, "messages": [USER_TURN, ASSISTANT_TURN]}, 400, "invalid_input"),
        ({"temperature": 0}, 400, "invalid_input"),
        ({"model": "nope"}, 404, "adapter_not_found"),
        ({"model_b": "sentiment"}, 400, "wrong_task"),
        ({"model": "foreign"}, 409, "base_mismatch"),
        ({"max_tokens": 1000}, 400, "input_too_long"),
        ({"top_p": 0}, 422, "invalid_body"),
    ],
)  # fmt: skip
def test_bad_pair_requests(secured: FakeServer, body: dict, status: int, code: str):
    full = {"model": "chat", "prompt": "hello", **body}
    response = secured.client.post("/v1/feedback/pairs", json=full, headers=ADMIN)
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
    assert secured.state.cache.stats["in_use"] == 0  # a failed second lease releases the first


def test_judge_is_idempotent_and_reports_replacements(secured: FakeServer):
    pair_id = make_pair(secured)["pair_id"]

    def judge(choice: str, comment: str | None = None) -> dict:
        body = {"pair_id": pair_id, "choice": choice, "comment": comment}  # the token says who rates
        response = secured.client.post("/v1/feedback", json=body, headers=RATER)
        assert response.status_code == 200, response.text
        return response.json()

    assert (judge("a")["status"], judge("a")["status"]) == ("recorded", "unchanged")
    replaced = judge("tie", "both fine")
    assert (replaced["status"], replaced["previous"]) == ("replaced", "a")
    [stored] = db(secured).judgements(pair_id)
    assert (stored.rater, stored.choice, stored.comment) == ("rater", "tie", "both fine")


def test_next_hides_the_models_and_left_right_maps_back(fresh: FakeServer):
    made = {}
    for i in range(3):
        body = make_pair(fresh, model="chat@1", model_b="other", prompt=f"q{i}")
        made[body["pair_id"]] = {c["text"]: c["label"] for c in body["candidates"]}
    for rater, choice in (("r1", "left"), ("r2", "right")):
        for _ in made:
            pair = fresh.client.get("/v1/feedback/next", params={"rater": rater}).json()["pair"]
            assert set(pair) == {"pair_id", "prompt", "left", "right", "choices"}  # no model, no a/b
            assert pair["choices"] == ["left", "right", "tie", "both_bad"]
            body = {"pair_id": pair["pair_id"], "choice": choice, "rater": rater}
            assert fresh.client.post("/v1/feedback", json=body).json()["choice"] == choice
            [stored] = [j for j in db(fresh).judgements(pair["pair_id"]) if j.rater == rater]
            assert stored.choice == made[pair["pair_id"]][pair[choice]]  # the chosen text, mapped to a/b
            assert stored.swapped == (pair["left"] == [t for t, lab in made[pair["pair_id"]].items()
                                                       if lab == "b"][0])  # fmt: skip
        assert fresh.client.get("/v1/feedback/next", params={"rater": rater}).json()["pair"] is None


def test_changed_view_choice_reports_previous_in_view_terms(secured: FakeServer):
    pair_id = make_pair(secured, model_b="other")["pair_id"]
    body = {"pair_id": pair_id, "choice": "left", "rater": "rater"}  # `--rater-token`'s rater id
    secured.client.post("/v1/feedback", json=body, headers=RATER)
    answer = secured.client.post("/v1/feedback", json={**body, "choice": "right"}, headers=RATER).json()
    assert (answer["status"], answer["previous"]) == ("replaced", "left")


def test_next_and_progress_walk_through_every_pair(fresh: FakeServer):
    ids = [make_pair(fresh, prompt=f"p{i}")["pair_id"] for i in range(3)]
    progress = fresh.client.get("/v1/feedback/progress").json()
    assert progress == {"object": "feedback.progress", "pairs": 3, "judgements": 0, "raters": 0}
    order = []
    while True:
        body = fresh.client.get("/v1/feedback/next", params={"rater": "bo"}).json()
        if body["pair"] is None:
            break
        order.append(body["pair"]["pair_id"])
        assert body["progress"]["pending"] == 3 - len(order) + 1
        fresh.client.post("/v1/feedback", json={"pair_id": order[-1], "choice": "both_bad", "rater": "bo"})
    assert order == ids  # oldest first, each once
    assert body["progress"] == {"pairs": 3, "judgements": 3, "raters": 1, "rated": 3, "pending": 0}
    other = fresh.client.get("/v1/feedback/progress", params={"rater": "cy"}).json()
    assert (other["rated"], other["pending"]) == (0, 3)


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"pair_id": "pair-missing", "choice": "a", "rater": "x"}, 404),
        ({"choice": "best", "rater": "x"}, 422),
        ({"choice": "a", "rater": "   "}, 400),
        ({"choice": "a"}, 400),  # no rater named, and no rater token to name one
    ],
)
def test_bad_judgements(fresh: FakeServer, body: dict, status: int):
    pair_id = make_pair(fresh)["pair_id"]
    response = fresh.client.post("/v1/feedback", json={"pair_id": pair_id, **body})
    assert response.status_code == status, response.text
    assert "error" in response.json()


def test_rater_token_opens_only_the_rating_endpoints(secured: FakeServer):
    client = secured.client
    pair_id = make_pair(secured)["pair_id"]
    judgement = {"pair_id": pair_id, "choice": "b", "rater": "rater"}  # `--rater-token`'s rater id
    for headers in (RATER, ADMIN):
        assert client.get("/v1/feedback/next?rater=rater", headers=headers).status_code == 200
        assert client.get("/v1/feedback/progress", headers=headers).status_code == 200
        assert client.post("/v1/feedback", json=judgement, headers=headers).status_code == 200
    wrong = {"Authorization": "Bearer nope"}
    for headers, message in (
        ({}, "Missing"),
        (wrong, "Invalid"),
        ({"Authorization": RATER_TOKEN}, "Invalid"),
    ):
        for response in (
            client.get("/v1/feedback/next?rater=rater", headers=headers),
            client.get("/v1/feedback/progress", headers=headers),
            client.post("/v1/feedback", json=judgement, headers=headers),
        ):
            assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
            assert response.headers["www-authenticate"] == "Bearer"
            assert response.json()["error"]["message"].startswith(f"{message} rater token.")
    # Access is checked before the body: a stranger learns nothing from validation errors.
    assert client.post("/v1/feedback", json={"choice": "nonsense"}).status_code == 401
    # The rater token is not an API key: no pairs, no completions, no admin.
    denied = [
        client.post("/v1/feedback/pairs", json={"model": "chat", "prompt": "x"}, headers=RATER),
        client.post("/v1/completions", json={"model": "chat", "prompt": "x"}, headers=RATER),
        client.get("/v1/models", headers=RATER),
    ]
    assert [r.status_code for r in denied] == [401, 401, 401]


def test_api_key_alone_guards_the_rating_endpoints(shared_store: LocalStore, tmp_path):
    fake = start(shared_store, tmp_path / "fb.sqlite", api_key=API_KEY)
    try:
        assert fake.client.get("/v1/feedback/progress").status_code == 401
        assert fake.client.get("/v1/feedback/progress", headers=RATER).status_code == 401
        assert fake.client.get("/v1/feedback/progress", headers=ADMIN).status_code == 200
    finally:
        fake.__exit__(None, None, None)


def test_page_is_served_with_a_nonce_policy(secured: FakeServer):
    response = secured.client.get("/feedback", headers=RATER)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    nonce = re.search(r"script-src 'nonce-([\w-]+)'", response.headers["content-security-policy"]).group(1)
    assert f'<script nonce="{nonce}">' in response.text and "__NONCE__" not in response.text
    assert "connect-src 'self'" in response.headers["content-security-policy"]
    assert response.headers["cache-control"] == "no-store"
    again = secured.client.get("/feedback", headers=RATER).headers["content-security-policy"]
    assert nonce not in again  # fresh per response
    for key in ('data-choice="left"', 'data-choice="both_bad"', "/v1/feedback/next", "Bearer "):
        assert key in response.text


def test_default_feedback_db_is_beside_the_registry(shared_store: LocalStore):
    with FakeServer(shared_store, max_new_tokens=64) as fake:
        pair_id = make_pair(fake)["pair_id"]
    assert FeedbackStore(shared_store.root / "feedback.sqlite", create=False).get_pair(pair_id)
    assert shared_store.list()  # the registry still lists its adapters beside the database files


def test_the_server_mounts_and_configures_feedback(shared_store: LocalStore, tmp_path):
    """create_app mounts the routes (the page too), serve takes the flags."""
    from server import cli

    assert "/feedback" in RATER_PATHS
    client = FakeServer(shared_store).client  # not started: no engine, but the page needs none
    assert client.get("/feedback").status_code == 200
    db_path = tmp_path / "fb.sqlite"
    flags = ["--rater-token", RATER_TOKEN, "--api-key", API_KEY, "--feedback-db", str(db_path)]
    config = cli.config_from_args(cli.build_parser().parse_args(flags))
    assert (config.rater_token, config.feedback_db) == (RATER_TOKEN, db_path)
    assert RATER_TOKEN not in repr(config)
