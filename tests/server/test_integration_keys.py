"""Scoped keys and quotas on the real server (`python -m server`, tiny base, loopback only).

Two keys with disjoint scopes cannot use or list each other's adapters (openai and httpx clients); rights
are enforced; 16 concurrent clients stay within a key's requests and tokens per minute; a malformed keys
file stops the start listing every bad entry.

Tolerances (token buckets hold one minute's allowance and refill at limit/60 per second):
- requests: admitted <= rpm + rpm/60 * elapsed + 1, and >= rpm (the clients keep asking long after the
  burst, so the whole burst is admitted);
- tokens: admission needs a positive balance and tokens are charged when counted, so the overshoot is at
  most what the requests in flight use: used <= tpm + tpm/60 * elapsed + 16 * (tokens of one request).
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from hub.bases import BaseInfo
from hub.store import LocalStore
from tests.server.conftest import make_peft_adapter
from tests.server.test_integration_server import REPO, launch, stop_server, wait_ready

pytestmark = [pytest.mark.slow, pytest.mark.network, pytest.mark.timeout(300)]

RPM, TPM, CLIENTS, SECONDS = 40, 400, 16, 4.0
KEYS = [
    {"name": "team-a", "key": "key-a", "adapters": ["team-a/*", "shared/*"], "rights": ["infer"]},
    {"name": "team-b", "key": "key-b", "adapters": ["team-b/*", "tiny"], "rights": ["infer", "admin"]},
    {"name": "paced", "key": "key-rpm", "adapters": ["*"], "rights": ["infer"], "requests_per_minute": RPM},
    {"name": "frugal", "key": "key-tpm", "adapters": ["*"], "rights": ["infer"], "tokens_per_minute": TPM},
]


@dataclass
class Live:
    url: str

    def client(self, secret: str) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {secret}"}, timeout=30)


@pytest.fixture(scope="module")
def live(tiny_base: BaseInfo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    root = tmp_path_factory.mktemp("keys")
    store = LocalStore(root / "registry")
    make = functools.partial(make_peft_adapter, tiny_base)
    put = functools.partial(store.put, method="lora", base=tiny_base.spec, task="instruction")
    put(make(root / "a", r=4, seed=1), name="team-a/gen")
    put(make(root / "b", r=4, seed=2), name="team-b/gen")
    put(make(root / "s", r=4, seed=3), name="shared/gen")
    keys = root / "keys.json"
    keys.write_text(json.dumps(KEYS))
    log = root / "server.log"
    url, process = launch(
        "tiny", store, log, "--quantize", "none", "--keys-file", str(keys), "--max-batch-size", "16"
    )
    try:
        wait_ready(url, process, log)
        yield Live(url)
    finally:
        stop_server(process)


def complete(client: httpx.Client, model: str) -> httpx.Response:
    body = {"model": model, "prompt": "Hello there", "max_tokens": 1, "temperature": 0}
    return client.post("/v1/completions", json=body)


def test_disjoint_scopes_cannot_use_or_list_each_other(live: Live) -> None:
    from openai import NotFoundError, OpenAI

    a = OpenAI(base_url=f"{live.url}/v1", api_key="key-a", max_retries=0, timeout=30)
    b = OpenAI(base_url=f"{live.url}/v1", api_key="key-b", max_retries=0, timeout=30)
    assert a.completions.create(model="team-a/gen", prompt="Hi", max_tokens=2).usage.completion_tokens >= 1
    assert b.completions.create(model="team-b/gen", prompt="Hi", max_tokens=2).usage.completion_tokens >= 1
    assert a.completions.create(model="shared/gen", prompt="Hi", max_tokens=1)
    for client, model in ((a, "team-b/gen"), (b, "team-a/gen"), (b, "shared/gen"), (a, "tiny")):
        with pytest.raises(NotFoundError):
            client.completions.create(model=model, prompt="Hi", max_tokens=1)
    assert {m.id for m in a.models.list()} == {"team-a/gen", "team-a/gen@1", "shared/gen", "shared/gen@1"}
    assert {m.id for m in b.models.list()} == {"tiny", "team-b/gen", "team-b/gen@1"}
    with live.client("key-a") as client:
        assert {x["name"] for x in client.get("/v1/adapters").json()["data"]} == {"team-a/gen", "shared/gen"}
        tgi = client.post("/generate", json={"inputs": "Hi", "parameters": {"adapter_id": "team-b/gen"}})
        assert tgi.status_code == 404


def test_rights_are_enforced(live: Live) -> None:
    with live.client("key-a") as a, live.client("key-b") as b, httpx.Client(base_url=live.url) as anon:
        refused = a.post("/v1/adapters/team-a/gen/pin")
        assert refused.status_code == 403 and "'admin' right" in refused.json()["error"]["message"]
        assert a.post("/v1/adapters/load", json={"adapter": "team-a/gen"}).status_code == 403
        assert b.post("/v1/adapters/team-b/gen/pin").json()["pinned"]
        assert b.post("/v1/adapters/team-a/gen/pin").status_code == 404
        assert b.post("/v1/adapters/team-b/gen/unpin").status_code == 200
        assert a.get("/v1/feedback/progress").status_code == 403
        assert anon.get("/v1/models").status_code == 401 and anon.get("/health").status_code == 200


def hammer(live: Live, secret: str) -> tuple[list[httpx.Response], float]:
    """CLIENTS threads sending requests back to back for SECONDS; every response and the elapsed time."""
    started = time.monotonic()

    def client_loop(_: int) -> list[httpx.Response]:
        responses = []
        with live.client(secret) as client:
            while time.monotonic() - started < SECONDS:
                responses.append(complete(client, "shared/gen"))
        return responses

    with ThreadPoolExecutor(CLIENTS) as pool:
        results = [r for batch in pool.map(client_loop, range(CLIENTS)) for r in batch]
    return results, time.monotonic() - started


def test_requests_per_minute_hold_under_16_concurrent_clients(live: Live) -> None:
    responses, elapsed = hammer(live, "key-rpm")
    admitted = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 429]
    assert len(admitted) + len(refused) == len(responses)
    assert RPM <= len(admitted) <= RPM + RPM / 60 * elapsed + 1, (len(admitted), elapsed)
    assert refused and all(int(r.headers["Retry-After"]) >= 1 for r in refused)
    assert refused[0].json()["error"]["code"] == "rate_limit_exceeded"
    with live.client("key-a") as client:
        metrics = client.get("/metrics").text
    assert f'adapterdock_key_requests_total{{key="paced",status="200"}} {len(admitted)}.0' in metrics
    assert "key-rpm" not in metrics


def test_tokens_per_minute_hold_under_16_concurrent_clients(live: Live) -> None:
    responses, elapsed = hammer(live, "key-tpm")
    admitted = [r for r in responses if r.status_code == 200]
    used = sum(r.json()["usage"]["total_tokens"] for r in admitted)
    per_request = max(r.json()["usage"]["total_tokens"] for r in admitted)
    assert TPM <= used <= TPM + TPM / 60 * elapsed + CLIENTS * per_request, (used, elapsed)
    assert any(r.status_code == 429 for r in responses)


def test_a_malformed_keys_file_stops_the_start_listing_every_bad_entry(tmp_path: Path) -> None:
    bad = [
        KEYS[0],
        {"name": "x", "key": "k", "adapters": "team-a/*", "rights": ["infer"]},
        {"name": "y", "key_sha256": "zz", "adapters": ["*"], "rights": ["write"]},
        {"name": "z", "adapters": ["*"], "rights": ["infer"], "requests_per_minute": -1},
    ]
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(bad))
    command = [sys.executable, "-m", "server", "--base", "tiny", "--keys-file", str(path), "--port", "0"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2, done.stderr
    for expected in ("entry 1 ('x'): `adapters`", "entry 2 ('y'): `key_sha256`", "entry 2 ('y'): `rights`",
                     "entry 3 ('z'): give exactly one", "entry 3 ('z'): `requests_per_minute`"):  # fmt: skip
        assert expected in done.stderr, done.stderr
