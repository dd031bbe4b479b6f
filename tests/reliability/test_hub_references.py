"""Hub references against a real server pulling from a real hub service: `ns/name@N` is the hub's version N
everywhere, a version is pulled once, and a redirecting, stalling or dripping hub costs a request a 502/504
(or a 503 at once when the pulls are busy), never the threads that serve other adapters.

The server (`python -m server`, `--hub-timeout 10 --hub-max-pulls 1`) is pointed at `HubProxy`, a small HTTP
relay in front of a `python -m hub.service` subprocess: it forwards every request unchanged, except for
repos given a misbehaviour (redirect off the hub, redirect within it, stall, drip), and records each path.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from hub.bases import BaseInfo
from hub.remote import HubClient
from hub.store import LocalStore
from tests.hub.conftest import HubProcess, free_port, start_hub
from tests.reliability.conftest import (
    KEY,
    PortProbe,
    ServerProcess,
    launch,
    lora_variants,
    register,
    stop,
    wait_ready,
)

pytestmark = [pytest.mark.slow, pytest.mark.network]

WRITER = "hf_refs_writer_5151"
READER = "hf_refs_reader_5252"
RELAYED = ("content-type", "content-length", "etag", "location", "x-error-code", "x-error-message",
           "x-repo-commit", "x-linked-etag", "x-linked-size")  # fmt: skip


class HubProxy:
    """An HTTP relay to `upstream` that misbehaves for chosen repos; `requests` lists every path asked."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.modes: dict[str, str] = {}  # repo id -> redirect-out | redirect-in | stall | drip
        self.redirect_to = ""
        self.requests: list[str] = []
        self.release = threading.Event()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                proxy.handle(self)

            def do_HEAD(self) -> None:  # noqa: N802 - huggingface_hub's downloads start with a HEAD
                proxy.handle(self)

        class Quiet(ThreadingHTTPServer):
            def handle_error(self, request: object, client_address: object) -> None:
                pass  # clients that hang up on a stalled or dripping answer

        self.server = Quiet(("127.0.0.1", free_port()), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def mode_for(self, path: str) -> str | None:
        for repo, mode in self.modes.items():
            if f"/{repo}/" in path or path.endswith(f"/{repo}"):
                return mode
        return None

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        self.requests.append(h.path)
        mode = self.mode_for(h.path.split("?")[0]) if "hop=1" not in h.path else None
        is_file = "/resolve/" in h.path
        if mode == "stall":
            self.release.wait(60)
            return
        if mode in ("redirect-out", "redirect-in") and is_file:
            target = self.redirect_to + h.path if mode == "redirect-out" else h.path + "?hop=1"
            h.send_response(302)
            h.send_header("Location", target)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        headers = {k: v for k, v in h.headers.items() if k.lower() == "authorization"}
        url = self.upstream + h.path.replace("?hop=1", "")
        answer = httpx.request(h.command, url, headers=headers, timeout=30)
        h.send_response(answer.status_code)
        for key in RELAYED:
            if key in answer.headers:
                h.send_header(key, answer.headers[key])
        h.end_headers()
        if h.command == "HEAD":
            return
        if mode == "drip" and is_file:
            for i in range(len(answer.content)):
                if self.release.wait(0.5):
                    return
                h.wfile.write(answer.content[i : i + 1])
                h.wfile.flush()
            return
        h.wfile.write(answer.content)

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory, hub_online: None) -> Iterator[HubProcess]:
    folder = tmp_path_factory.mktemp("refs-hub")
    (folder / "tokens.txt").write_text(f"{WRITER} write acme/* alice\n{READER} read * ci\n")
    process = start_hub(folder / "root", folder / "tokens.txt")
    yield process
    process.stop()


@pytest.fixture(scope="module")
def source(hub: HubProcess, tiny_base: BaseInfo, tmp_path_factory: pytest.TempPathFactory) -> LocalStore:
    """acme/multi v1..v3 (different weights) on main and v4 on a branch, so main (v3) is not the highest
    version; and the adapters the misbehaving repos hold."""
    root = tmp_path_factory.mktemp("refs-source")
    store = LocalStore(root / "registry")
    folders = lora_variants(tiny_base, root / "src", ["multi-1", "multi-2", "multi-3", "multi-4"], seed=7)
    client = HubClient(hub.url, WRITER)
    for folder in folders.values():
        store.put(folder, name="multi", task="instruction", method="lora", base=tiny_base.spec)
    for version in (1, 2, 3):
        client.push(store, f"multi@{version}", "acme/multi")
    client.push(store, "multi@4", "acme/multi", revision="next")
    for repo in ("redirected", "inside", "slow", *(f"stall-{i}" for i in range(4))):
        client.push(store, "multi@1", f"acme/{repo}")
    return store


@pytest.fixture(scope="module")
def served(
    hub: HubProcess, source: LocalStore, tiny_base: BaseInfo, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerProcess, HubProxy]]:
    """A server with `--hub` at a relay to the hub, its three source versions also registered locally."""
    root = tmp_path_factory.mktemp("refs-server")
    proxy = HubProxy(hub.url)
    store = LocalStore(root / "registry")
    for version in (1, 2, 3, 4):
        stored = source.get(f"multi@{version}")
        store.put(stored.path, name=f"src-{version}", task="instruction", method="lora", base=tiny_base.spec)
    register(store, tiny_base, lora_variants(tiny_base, root / "local", ["local-a"], seed=3))
    server = launch(store, root / "server.log", "--api-key", KEY, "--hub", proxy.url, "--hub-timeout", "10",
                    "--hub-max-pulls", "1", env={"HF_TOKEN": READER, "HF_HUB_OFFLINE": "0"})  # fmt: skip
    try:
        wait_ready(server)
        yield server, proxy
    finally:
        stop(server)
        proxy.close()


def test_hub_versions_pulled_out_of_order_keep_their_numbers(
    served: tuple[ServerProcess, HubProxy], source: LocalStore
):
    server, proxy = served
    expected = {v: server.greedy(f"src-{v}") for v in (1, 2, 3, 4)}
    assert len(set(expected.values())) == 4, "the versions must answer differently"
    for version in (3, 1, 2):
        assert server.greedy(f"acme/multi@{version}") == expected[version], version
    assert server.registry.versions("acme/multi") == [1, 2, 3]
    for version in (1, 2, 3):
        manifest = server.registry.get(f"acme/multi@{version}").manifest
        assert manifest.files == source.get(f"multi@{version}").manifest.files, version
    with server.client() as client:
        ids = {m["id"] for m in client.get("/v1/models").json()["data"]}
    assert {"acme/multi@1", "acme/multi@2", "acme/multi@3", "acme/multi"} <= ids
    # pulled once: asking again by number asks the hub nothing; by plain name (main = v3) no copy
    asked = len(proxy.requests)
    for version in (2, 3, 1):
        assert server.greedy(f"acme/multi@{version}") == expected[version]
    assert len(proxy.requests) == asked
    assert server.greedy("acme/multi") == expected[3]  # main's manifest is read to learn its version...
    assert not any("adapter_model" in path for path in proxy.requests[asked:])  # ...no weights downloaded
    assert server.registry.versions("acme/multi") == [1, 2, 3]
    # v4 (on a branch) is pulled as 4; the plain name still means the hub's main, in answers and /v1/models
    assert server.greedy("acme/multi@4") == expected[4]
    assert server.greedy("acme/multi") == expected[3]
    with server.client() as client:
        models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert models["acme/multi"]["root"] == "acme/multi@3" and "acme/multi@4" in models
    assert server.registry.versions("acme/multi") == [1, 2, 3, 4]


def test_a_redirecting_hub_is_followed_only_within_itself(served: tuple[ServerProcess, HubProxy]):
    server, proxy = served
    probe = PortProbe()
    try:
        proxy.redirect_to = probe.url
        proxy.modes["acme/redirected"] = "redirect-out"
        proxy.modes["acme/inside"] = "redirect-in"
        refused = server.complete("acme/redirected@1")
        assert refused.status_code == 502, refused.text
        assert refused.json()["error"]["code"] == "hub_refused"
        assert "redirect" in refused.json()["error"]["message"]
        time.sleep(0.5)
        assert probe.connections == [], "the server followed a redirect off the hub"
        assert server.registry.versions("acme/redirected") == []
        assert server.complete("acme/inside@1").status_code == 200  # a redirect within the hub is fine
        assert any("hop=1" in path for path in proxy.requests)
    finally:
        probe.close()


def test_a_stalling_hub_costs_its_requests_a_504_or_503_never_the_others(
    served: tuple[ServerProcess, HubProxy],
):
    server, proxy = served
    local = server.greedy("local-a")
    for i in range(4):
        proxy.modes[f"acme/stall-{i}"] = "stall"
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        started = time.monotonic()
        stalled = [pool.submit(server.complete, f"acme/stall-{i}@1") for i in range(4)]
        time.sleep(0.5)
        others = [pool.submit(server.greedy, "local-a") for _ in range(3)]
        assert [f.result(timeout=30) for f in others] == [local] * 3
        served_in = time.monotonic() - started
        answers = [f.result(timeout=60) for f in stalled]
    statuses = sorted(a.status_code for a in answers)
    assert statuses == [503, 503, 503, 504], [a.text for a in answers]
    for answer in answers:
        assert answer.headers.get("retry-after"), answer.headers
        code = answer.json()["error"]["code"]
        assert code == ("hub_timeout" if answer.status_code == 504 else "hub_busy")
    assert served_in < 20, f"local adapters waited {served_in:.1f} s behind a stalled hub"
    # a hub that drips bytes (each under the read timeout) still meets the pull deadline
    proxy.modes["acme/slow"] = "drip"
    started = time.monotonic()
    slow = server.complete("acme/slow@1")
    assert slow.status_code == 504 and slow.json()["error"]["code"] == "hub_timeout", slow.text
    assert time.monotonic() - started < 30
    assert server.registry.versions("acme/slow") == []
    assert server.greedy("local-a") == local


@pytest.mark.parametrize(
    "model", ["local-a@prod\n", "local-a@prod\r", "local-a@pr\x07od", "acme/tags.json", "acme/README.md",
              "acme/manifest.json@1", "tags.json"],
)  # fmt: skip
def test_registry_names_and_control_characters_are_400(served: tuple[ServerProcess, HubProxy], model: str):
    server, proxy = served
    asked = len(proxy.requests)
    response = server.complete(model)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "invalid_reference"
    assert len(proxy.requests) == asked, "a refused name reached the hub"


def test_pull_caps_bytes_and_files(hub: HubProcess, source: LocalStore, tmp_path: Path):
    from hub.errors import HubLimitError
    from hub.hub_http import PullLimits

    target = LocalStore(tmp_path / "target")
    with pytest.raises(HubLimitError, match="at most 20000 bytes"):  # the manifest's sizes, before a download
        HubClient(hub.url, READER, PullLimits(max_bytes=20000)).pull("acme/multi", "v1", target)
    with pytest.raises(HubLimitError, match="at most 2"):
        HubClient(hub.url, READER, PullLimits(max_files=2)).pull("acme/multi", "v1", target)
    assert target.names() == []
    pulled = HubClient(hub.url, READER).pull("acme/multi", "v2", target, keep_version=True)
    assert pulled.ref == "multi@2"


def test_the_vllm_resolver_keeps_hub_versions(hub: HubProcess, source: LocalStore, tiny_base: BaseInfo,
                                              tmp_path: Path):  # fmt: skip
    from hub.vllm_resolver import ResolverSettings, VllmAdapterResolver

    settings = ResolverSettings(registry=tmp_path / "vllm", hub_endpoint=hub.url, hub_token=READER)
    resolver = VllmAdapterResolver(settings)
    for version in (3, 1, 2, 3):
        got = resolver.resolve(str(tiny_base.path), f"acme/multi@{version}")
        assert got.ref == f"acme/multi@{version}"
        assert got.manifest.files == source.get(f"multi@{version}").manifest.files
    assert resolver.store.versions("acme/multi") == [1, 2, 3]
