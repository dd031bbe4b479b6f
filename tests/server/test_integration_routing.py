"""Version routing and canaries on the real server (`python -m server`, tiny base, loopback only).

`support@prod` is split between two versions with `adapterdock hub route`; a running server follows every
change from its next request (asserted within 2 s). Checked with httpx: over 1,000 requests without a
`user` the share of the canary is within 4 binomial sigmas of its weight (n = 1000, p = 0.1: sigma = 9.5,
so 100 +- 38); the same `user` always gets the same version (the one `TrafficSplit.pick` names); each
answer is its version's own greedy output (the cache serves both versions, never a stale one); promotion
moves all traffic; the version is in `model`, `x-adapter-version` (LoRAX/TGI too), the metrics, and the
feedback records that `adapterdock feedback stats --adapter NAME@V` cuts by.
"""

from __future__ import annotations

import functools
import json
import math
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from hub.bases import BaseInfo
from hub.store import LocalStore
from hub.traffic import TrafficSplit
from tests.server.conftest import make_peft_adapter
from tests.server.test_integration_server import REPO, launch, stop_server, wait_ready

pytestmark = [pytest.mark.slow, pytest.mark.network, pytest.mark.timeout(600)]

REQUESTS, CANARY_SHARE, SIGMAS, CONCURRENCY = 1000, 0.1, 4, 8
PROMPT = "The adapter dock serves"
BIN = Path(sys.executable).parent


@dataclass
class Live:
    url: str
    store: LocalStore
    client: httpx.Client

    def complete(self, model: str = "support@prod", user: str | None = None) -> tuple[str, str]:
        """(served version, text) of one greedy 2-token completion."""
        body = {"model": model, "prompt": PROMPT, "max_tokens": 2, "temperature": 0}
        if user is not None:
            body["user"] = user
        response = self.client.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
        served = response.json()["model"]
        assert response.headers["x-adapter-version"] == served
        return served, response.json()["choices"][0]["text"]

    def hub(self, *args: str) -> str:
        command = [str(BIN / "adapterdock"), "hub", *args, "--registry", str(self.store.root)]
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stderr
        return done.stdout


@pytest.fixture(scope="module")
def live(tiny_base: BaseInfo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    root = tmp_path_factory.mktemp("routing")
    store = LocalStore(root / "registry")
    make = functools.partial(make_peft_adapter, tiny_base)
    put = functools.partial(store.put, method="lora", base=tiny_base.spec, task="instruction")
    put(make(root / "v1", r=8, seed=21), name="support", tags=["prod"])
    put(make(root / "v2", r=8, seed=22), name="support")
    log = root / "server.log"
    url, process = launch(
        "tiny", store, log, "--quantize", "none", "--max-batch-size", "16", "--max-adapters", "2"
    )
    try:
        wait_ready(url, process, log)
        with httpx.Client(base_url=url, timeout=60) as client:
            yield Live(url, store, client)
    finally:
        stop_server(process)


@pytest.fixture(scope="module")
def solo(live: Live) -> dict[str, str]:
    """Each version's own greedy answer, asked by its immutable reference."""
    answers = {v: live.complete(v)[1] for v in ("support@1", "support@2")}
    assert answers["support@1"] != answers["support@2"], "the check below needs the versions to differ"
    return answers


def metric(live: Live, version: str) -> float:
    wanted = f'adapterdock_requests_total{{adapter="{version}",endpoint="/v1/completions",status="200"}}'
    for line in live.client.get("/metrics").text.splitlines():
        if line.startswith(wanted):
            return float(line.split()[-1])
    return 0.0


def test_split_of_1000_requests_is_within_binomial_noise(live: Live, solo: dict[str, str]) -> None:
    shown = live.hub("route", "support", "prod", "--split", "1=90,2=10")
    assert "support@1 90%, support@2 10%" in shown
    assert "support@1 90%, support@2 10%" in live.hub("show", "support@prod")
    before = {v: metric(live, v) for v in solo}
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        answers = list(pool.map(lambda _: live.complete(), range(REQUESTS)))
    counts = Counter(version for version, _ in answers)
    sigma = math.sqrt(REQUESTS * CANARY_SHARE * (1 - CANARY_SHARE))
    assert set(counts) == {"support@1", "support@2"}
    assert abs(counts["support@2"] - REQUESTS * CANARY_SHARE) <= SIGMAS * sigma, counts
    stale = [(version, text) for version, text in answers if text != solo[version]]
    assert not stale, stale[:5]  # every answer is its own version's: both resident, neither stale
    assert {v: metric(live, v) - before[v] for v in solo} == {v: float(counts[v]) for v in solo}


def test_the_same_user_always_gets_the_same_version(live: Live) -> None:
    live.hub("route", "support", "prod", "--split", "1=50,2=50")
    split = TrafficSplit(((1, 50), (2, 50)))
    users = [f"user-{i}" for i in range(40)]
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        seen = list(pool.map(lambda u: (u, live.complete(user=u)[0]), users * 3))
    by_user: dict[str, set[str]] = {}
    for user, version in seen:
        by_user.setdefault(user, set()).add(version)
    assert all(len(versions) == 1 for versions in by_user.values()), by_user
    assert {u: v.pop() for u, v in by_user.items()} == {
        u: f"support@{split.pick(u, 'support', 'prod')}" for u in users
    }
    assert {version for _, version in seen} == {"support@1", "support@2"}


def test_a_route_change_reaches_a_running_server_within_2_s_and_promotion_moves_all(
    live: Live, solo: dict[str, str]
) -> None:
    live.hub("route", "support", "prod", "--split", "1=1,2=1")
    live.hub("route", "support", "prod", "--split", "1=100")
    changed = time.monotonic()
    while {live.complete()[0] for _ in range(5)} != {"support@1"}:
        assert time.monotonic() - changed < 2.0, "the server did not follow the new split within 2 s"
    assert time.monotonic() - changed < 2.0
    assert "support@prod -> support@2 (all traffic)" in live.hub("route", "support", "prod", "--promote", "2")
    promoted = time.monotonic()
    answers = [live.complete(user=f"u{i % 7}") for i in range(30)] + [live.complete() for _ in range(30)]
    assert time.monotonic() - promoted < 30
    assert set(answers) == {("support@2", solo["support@2"])}
    assert json.loads((live.store.root / "support" / "tags.json").read_text())["prod"] == 2
    assert not (live.store.root / "support" / "routes.json").exists()


def test_lorax_answers_name_the_version_and_feedback_is_cut_by_version(live: Live) -> None:
    live.hub("route", "support", "prod", "--split", "1=1,2=1")
    tgi = live.client.post("/generate", json={"inputs": "Hi", "parameters": {"adapter_id": "support@prod"}})
    assert tgi.status_code == 200 and tgi.headers["x-adapter-version"] in ("support@1", "support@2")
    served = Counter()
    for _ in range(10):
        pair = live.client.post("/v1/feedback/pairs", json={"model": "support@prod", "prompt": "Hello"})
        assert pair.status_code == 200, pair.text
        served.update(c["model"] for c in pair.json()["candidates"])
    assert set(served) == {"support@1", "support@2"}
    command = [str(BIN / "adapterdock"), "feedback", "stats", "--registry", str(live.store.root), "--json"]
    for version in ("support@1", "support@2"):
        done = subprocess.run([*command, "--adapter", version], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        # pairs of two samples of one version count once each; mixed pairs count for both versions
        pairs = json.loads(done.stdout)["pairs"]
        assert served[version] / 2 <= pairs <= min(10, served[version]), (version, pairs, served)
