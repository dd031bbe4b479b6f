"""server.access: which credential opens which path, for every mix of API key, admin key and rater tokens."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from server.access import ADMIN, ANONYMOUS, RATER, USER, Access, is_admin_path
from server.config import ServerConfig
from server.errors import AuthenticationError, ForbiddenError, ServerConfigError
from server.feedback.auth import rater_for, read_rater_tokens
from server.feedback.records import InvalidJudgementError

API, ADMIN_KEY, ANN = "api-key-1", "admin-key-2", "ann-token-3"
OPEN = "open"


def outcome(access: Access, method: str, path: str, secret: str | None, scheme: str = "Bearer") -> str:
    header = f"{scheme} {secret}" if secret else ""
    if scheme == "Basic" and secret:
        header = "Basic " + base64.b64encode(f"someone:{secret}".encode()).decode()
    try:
        principal = access.check(method, path, header)
    except AuthenticationError:
        return "401"
    except ForbiddenError:
        return "403"
    return OPEN if principal.role == ANONYMOUS else principal.role


ROUTES = [
    ("POST", "/v1/completions"),
    ("GET", "/feedback"),
    ("POST", "/v1/feedback"),
    ("POST", "/v1/feedback/pairs"),
    ("POST", "/v1/adapters/x/pin"),
    ("DELETE", "/v1/adapters/x"),
]


@pytest.mark.parametrize(
    ("keys", "secret", "expected"),
    [
        # every credential configured
        ({"api_key": API, "admin_key": ADMIN_KEY, "rater_tokens": {"ann": ANN}}, None,
         ["401", "401", "401", "401", "401", "401"]),
        ({"api_key": API, "admin_key": ADMIN_KEY, "rater_tokens": {"ann": ANN}}, API,
         [USER, USER, USER, USER, "403", "403"]),
        ({"api_key": API, "admin_key": ADMIN_KEY, "rater_tokens": {"ann": ANN}}, ADMIN_KEY,
         [ADMIN, ADMIN, ADMIN, ADMIN, ADMIN, ADMIN]),
        ({"api_key": API, "admin_key": ADMIN_KEY, "rater_tokens": {"ann": ANN}}, ANN,
         ["401", RATER, RATER, "401", "401", "401"]),
        # no admin key: the API key keeps pins and unloads
        ({"api_key": API}, API, [USER, USER, USER, USER, USER, USER]),
        ({"api_key": API}, None, ["401", "401", "401", "401", "401", "401"]),
        # only an admin key: inference and rating stay open, admin paths need it
        ({"admin_key": ADMIN_KEY}, None, [OPEN, OPEN, OPEN, OPEN, "401", "401"]),
        # only rater tokens: every feedback route needs one, the rest is open
        ({"rater_tokens": {"ann": ANN}}, None, [OPEN, "401", "401", "401", OPEN, OPEN]),
        ({"rater_tokens": {"ann": ANN}}, ANN, [OPEN, RATER, RATER, RATER, OPEN, OPEN]),
        # nothing configured: open
        ({}, None, [OPEN] * 6),
    ],
)  # fmt: skip
def test_who_opens_what(keys: dict, secret: str | None, expected: list[str]):
    access = Access(ServerConfig(**keys).validate())
    assert [outcome(access, method, path, secret) for method, path in ROUTES] == expected


def test_basic_auth_opens_only_the_page():
    access = Access(ServerConfig(api_key=API, rater_tokens={"ann": ANN}).validate())
    assert outcome(access, "GET", "/feedback", ANN, scheme="Basic") == RATER
    assert outcome(access, "GET", "/v1/feedback/next", ANN, scheme="Basic") == "401"
    assert outcome(access, "POST", "/v1/completions", API, scheme="Basic") == "401"
    with pytest.raises(AuthenticationError):
        access.check("GET", "/feedback", "Basic !!not-base64")


def test_admin_paths():
    assert is_admin_path("POST", "/v1/adapters/chat@1/pin") and is_admin_path(
        "POST", "/v1/adapters/a/b/unpin"
    )
    assert is_admin_path("DELETE", "/v1/adapters/chat")
    assert not is_admin_path("POST", "/v1/adapters/load") and not is_admin_path("GET", "/v1/adapters")


def test_a_rater_is_their_token():
    access = Access(ServerConfig(api_key=API, rater_token="single", rater_tokens={}).validate())
    ann = Access(ServerConfig(rater_tokens={"ann": ANN}).validate()).identify(f"Bearer {ANN}")
    assert rater_for(ann, None) == "ann" and rater_for(ann, " ann ") == "ann"
    with pytest.raises(ForbiddenError, match="belongs to rater 'ann'"):
        rater_for(ann, "bob")
    assert rater_for(access.identify("Bearer single"), None) == "rater"  # --rater-token is one rater
    operator = access.identify(f"Bearer {API}")
    assert rater_for(operator, "carol") == "carol"
    with pytest.raises(InvalidJudgementError, match="Name the rater"):
        rater_for(operator, None)


def test_rater_tokens_file(tmp_path: Path):
    path = tmp_path / "raters.txt"
    path.write_text("# raters\n\nann: tok-a\nbob:tok-b\n")
    assert read_rater_tokens(path) == {"ann": "tok-a", "bob": "tok-b"}
    path.write_text("ann:tok-a\nann:tok-c\nno-colon\n:tok-d\nbob:\n")
    with pytest.raises(ServerConfigError) as info:
        read_rater_tokens(path)
    message = str(info.value)
    assert all(f"line {n}" in message for n in (2, 3, 4, 5)) and "tok-" not in message  # tokens never shown


@pytest.mark.parametrize(
    "keys",
    [
        {"api_key": "same", "admin_key": "same"},
        {"api_key": "same", "rater_tokens": {"ann": "same"}},
        {"rater_tokens": {"ann": "same", "bob": "same"}},
        {"admin_key": " "},
        {"rater_token": "t1", "rater_tokens": {"rater": "t2"}},
    ],
)
def test_credentials_must_differ(keys: dict):
    with pytest.raises(ServerConfigError):
        ServerConfig(**keys).validate()
