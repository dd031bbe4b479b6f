"""server.keys: the --keys-file format (every bad entry listed at once), scopes, and the scoped-key rights
that server.access applies per path."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from hub.errors import AdapterNotFoundError
from server.access import SCOPED, Access, check_scope, scoped_right, visible
from server.config import ServerConfig
from server.errors import AuthenticationError, ForbiddenError, ServerConfigError
from server.keys import parse_keys, read_keys_file

TEAM_A = {"name": "team-a", "key": "a-secret", "adapters": ["team-a/*", "shared/*"], "rights": ["infer"]}
TEAM_B = {
    "name": "team-b",
    "key_sha256": hashlib.sha256(b"b-secret").hexdigest(),
    "adapters": ["team-b/*", "tiny"],
    "rights": ["infer", "feedback", "admin"],
    "requests_per_minute": 60,
    "tokens_per_minute": 1000,
}


def test_parses_clear_and_hashed_keys_and_scopes() -> None:
    a, b = parse_keys([TEAM_A, TEAM_B])
    assert a.digest == hashlib.sha256(b"a-secret").digest() and not a.limited
    assert b.requests_per_minute == 60 and b.tokens_per_minute == 1000 and b.limited
    assert a.may_use("team-a/support") and a.may_use("shared/x") and not a.may_use("team-b/support")
    assert not a.may_use("tiny") and b.may_use("tiny") and not b.may_use("team-a/support")
    assert "a-secret" not in repr(a) and "digest" not in repr(a)


def test_every_bad_entry_is_listed_and_no_secret_shown(tmp_path: Path) -> None:
    entries = [
        TEAM_A,
        {"name": "no secret", "adapters": ["*"], "rights": ["infer"]},
        {"name": "both", "key": "x1", "key_sha256": "ab" * 32, "adapters": ["*"], "rights": ["infer"]},
        {"name": "short-hash", "key_sha256": "abc", "adapters": [], "rights": ["root"]},
        {"name": "limits", "key": "x2", "adapters": ["*"], "rights": ["infer"], "requests_per_minute": 0,
         "tokens_per_minute": "many", "colour": "red"},
        "just a string",
        {**TEAM_A, "name": "team-a-copy"},  # same secret as team-a
    ]  # fmt: skip
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(entries))
    with pytest.raises(ServerConfigError) as caught:
        read_keys_file(path)
    message = str(caught.value)
    for expected in (
        "entry 1 ('no secret'): `name` must be",
        "entry 1 ('no secret'): give exactly one of `key_sha256`",
        "entry 2 ('both'): give exactly one",
        "entry 3 ('short-hash'): `key_sha256` must be 64 hex digits",
        "entry 3 ('short-hash'): `adapters` must be a non-empty list",
        "entry 3 ('short-hash'): `rights` must be a non-empty list drawn from infer, feedback, admin",
        "entry 4 ('limits'): unknown field 'colour'",
        "entry 4 ('limits'): `requests_per_minute` must be a positive integer",
        "entry 4 ('limits'): `tokens_per_minute` must be a positive integer",
        "entry 5: is a str, not an object",
        "entry 'team-a-copy' shares its secret",
    ):
        assert expected in message, expected
    assert "a-secret" not in message and "x1" not in message


@pytest.mark.parametrize("text", ["not json", "{}", "[]"])
def test_a_file_that_is_not_a_list_is_refused(tmp_path: Path, text: str) -> None:
    path = tmp_path / "keys.json"
    path.write_text(text)
    with pytest.raises(ServerConfigError, match="keys"):
        read_keys_file(path)


def test_a_scoped_key_may_not_equal_another_credential() -> None:
    keys = parse_keys([TEAM_A])
    with pytest.raises(ServerConfigError, match="scoped key"):
        ServerConfig(api_key="a-secret", keys=keys).validate()


ROUTES = [
    ("POST", "/v1/completions", "infer"),
    ("GET", "/v1/models", "infer"),
    ("GET", "/v1/adapters", "infer"),
    ("GET", "/metrics", "infer"),
    ("POST", "/v1/feedback", "feedback"),
    ("POST", "/v1/feedback/pairs", "feedback"),
    ("GET", "/feedback", "feedback"),
    ("POST", "/v1/adapters/load", "admin"),
    ("POST", "/v1/adapters/x/pin", "admin"),
    ("DELETE", "/v1/adapters/x", "admin"),
]


@pytest.mark.parametrize(("method", "path", "right"), ROUTES)
def test_rights_open_their_paths_only(method: str, path: str, right: str) -> None:
    assert scoped_right(method, path) == right
    access = Access(ServerConfig(keys=parse_keys([TEAM_A, TEAM_B]), api_key="plain-key").validate())
    full = access.check(method, path, "Bearer b-secret")
    assert full.role == SCOPED and full.key is not None and full.key.name == "team-b"
    if right == "infer":
        assert access.check(method, path, "Bearer a-secret").key.name == "team-a"
    else:
        with pytest.raises(ForbiddenError, match=f"needs the '{right}' right; key 'team-a' has infer"):
            access.check(method, path, "Bearer a-secret")
    with pytest.raises(AuthenticationError):
        access.check(method, path, "Bearer wrong")


def test_keys_alone_lock_the_server_but_health() -> None:
    access = Access(ServerConfig(keys=parse_keys([TEAM_A])).validate())
    assert access.enabled and access.check("GET", "/health", "").key is None
    with pytest.raises(AuthenticationError):
        access.check("POST", "/v1/completions", "")
    with pytest.raises(AuthenticationError):
        access.check("GET", "/feedback", "")


def test_scope_refuses_out_of_scope_names_as_unknown() -> None:
    access = Access(ServerConfig(keys=parse_keys([TEAM_A])).validate())
    principal = access.check("POST", "/v1/completions", "Bearer a-secret")
    check_scope(principal, "team-a/support")
    with pytest.raises(AdapterNotFoundError, match="'team-b/support' is available to key 'team-a'"):
        check_scope(principal, "team-b/support")
    assert visible(principal, "shared/x") and not visible(principal, "tiny") and visible(None, "tiny")
