"""Fixtures of the reliability suite: one real server process shared by the session, adapters, port probes.

The server is `python -m server` on 127.0.0.1 with the tiny base (`--quantize none`), an API key, a small
adapter cache (4 slots) and `--hub` pointing at a `PortProbe` (a bare listening socket that records who
connects), so modules can test the hub path and SSRF without a network. Starting it takes tens of seconds on
a busy machine, so every module shares it; each module registers adapters under its own names. Adapters are
made by PEFT (`save_pretrained`) once, then varied by re-seeding their LoRA factors (same files, same format).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest

from hub.bases import BaseInfo
from hub.store import LocalStore
from tests.hub.conftest import hub_online  # noqa: F401 - a fixture, used by test_faults and test_auth
from tests.server.conftest import make_peft_adapter

REPO = Path(__file__).resolve().parents[2]
KEY = "rel-key-9f2c1e7b5a"
"""The API key of the shared server (grepped for in its log)."""
HUB_TOKEN = "hf_reliability_hub_token_77aa"
"""The token the shared server sends to its hub (HF_TOKEN; grepped for in its log)."""
PROMPT = "The adapter dock serves"
MAX_TOKENS = 8
LOAD_ADAPTERS = 20
CACHE_SLOTS = 4
MAX_BODY = 65536
MAX_INPUT_TOKENS = 128
MAX_NEW_TOKENS = 256


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PortProbe:
    """A listening socket on 127.0.0.1 that accepts, records and drops every connection.

    `close()` makes the port refuse connections (an unreachable hub); `open()` listens on it again.
    """

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.connections: list[bytes] = []
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self.open()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def open(self) -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(16)
        sock.settimeout(0.2)
        self._sock = sock
        self._thread = threading.Thread(target=self._accept, args=(sock,), daemon=True)
        self._thread.start()

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
        if self._thread is not None:
            self._thread.join(5)

    def _accept(self, sock: socket.socket) -> None:
        while self._sock is sock:
            try:
                conn, _ = sock.accept()
            except (TimeoutError, OSError):
                continue
            with conn:
                conn.settimeout(1)
                try:
                    first = conn.recv(4096)
                except OSError:
                    first = b""
                self.connections.append(first)


@dataclass
class ServerProcess:
    """A running `python -m server`, with handles the tests need."""

    url: str
    process: subprocess.Popen
    log: Path
    registry: LocalStore
    hub: PortProbe | None = None
    folders: dict[str, Path] = field(default_factory=dict)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {KEY}"}

    def client(self, timeout: float = 60, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers(), timeout=timeout, **kwargs)

    def rss(self) -> int:
        """Resident memory of the server process in bytes."""
        return psutil.Process(self.process.pid).memory_info().rss

    def metric(self, name: str) -> float:
        """One unlabelled sample from /metrics (0 when absent)."""
        text = httpx.get(f"{self.url}/metrics", headers=self.headers(), timeout=10).text
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return 0.0

    def complete(self, model: str, prompt: str = PROMPT, max_tokens: int = MAX_TOKENS) -> httpx.Response:
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True}  # fmt: skip
        with self.client() as client:
            return client.post("/v1/completions", json=body)

    def greedy(self, model: str, prompt: str = PROMPT, max_tokens: int = MAX_TOKENS) -> str:
        response = self.complete(model, prompt, max_tokens)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["text"]

    def alive(self) -> bool:
        if self.process.poll() is not None:
            return False
        try:
            return httpx.get(f"{self.url}/health", timeout=5).json()["ready"] is True
        except httpx.HTTPError:
            return False


def launch(registry: LocalStore, log: Path, *extra: str, env: dict[str, str] | None = None) -> ServerProcess:
    """Start `python -m server` on a free port without waiting for it."""
    port = free_port()
    command = [
        sys.executable, "-m", "server", "--base", "tiny", "--quantize", "none",
        "--registry", str(registry.root), "--port", str(port),
        "--max-input-tokens", str(MAX_INPUT_TOKENS), "--max-new-tokens", str(MAX_NEW_TOKENS),
        *extra,
    ]  # fmt: skip
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    with open(log, "wb") as sink:
        process = subprocess.Popen(command, cwd=REPO, env=full_env, stdout=sink, stderr=subprocess.STDOUT)
    return ServerProcess(f"http://127.0.0.1:{port}", process, log, registry)


def wait_ready(server: ServerProcess, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise AssertionError(f"server exited with {server.process.returncode}:\n{server.log.read_text()}")
        if server.alive():
            return
        time.sleep(0.25)
    stop(server)
    raise AssertionError(f"server did not become ready:\n{server.log.read_text()[-4000:]}")


def stop(server: ServerProcess) -> None:
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(30)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait(5)


def lora_variants(base: BaseInfo, out: Path, names: list[str], *, seed: int = 0) -> dict[str, Path]:
    """One PEFT LoRA (r=8, all linear layers) saved by PEFT, then a copy per name with re-seeded factors."""
    from safetensors.numpy import load_file, save_file

    template = make_peft_adapter(base, out / "_template", r=8, seed=seed)
    tensors = load_file(str(template / "adapter_model.safetensors"))
    folders = {}
    for index, name in enumerate(names):
        rng = np.random.default_rng(1000 * seed + index)
        varied = {
            key: (value + rng.standard_normal(value.shape).astype(value.dtype) * 0.05)
            if "lora_B" in key
            else value
            for key, value in tensors.items()
        }
        folder = out / name
        folder.mkdir(parents=True)
        save_file(varied, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
        config = json.loads((template / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
        folders[name] = folder
    return folders


def register(store: LocalStore, base: BaseInfo, folders: dict[str, Path], **kwargs) -> None:
    for name, folder in folders.items():
        store.put(folder, name=name, task="instruction", method="lora", base=base.spec, **kwargs)


@pytest.fixture(scope="session")
def hub_probe() -> Iterator[PortProbe]:
    """The shared server's `--hub`: a socket that records connections and answers nothing."""
    probe = PortProbe()
    yield probe
    probe.close()


@pytest.fixture(scope="session", autouse=True)
def servers(
    request: pytest.FixtureRequest,
    hub_probe: PortProbe,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, ServerProcess]]:
    """Launch, at the start of the session and without waiting, the servers its tests will ask for: the
    shared one ("live") and the disposable one ("spare", for the SIGTERM test). Booting takes tens of
    seconds here, so in-process tests run meanwhile; `live` and `spare` wait for readiness."""
    used = {name for item in request.session.items for name in item.fixturenames}
    wanted = used & {"live", "spare"}
    root = tmp_path_factory.mktemp("reliability")
    store = LocalStore(root / "registry")
    started: dict[str, ServerProcess] = {}
    if wanted:
        started["live"] = launch(
            store, root / "server.log",
            "--api-key", KEY, "--hub", hub_probe.url, "--max-adapters", str(CACHE_SLOTS),
            "--max-batch-size", "8", "--max-queue", "64", "--max-body-bytes", str(MAX_BODY),
            "--adapter-wait-timeout", "20",
            env={"HF_TOKEN": HUB_TOKEN, "HF_HUB_OFFLINE": "0"},
        )  # fmt: skip
        started["live"].hub = hub_probe
    if "spare" in wanted:
        started["spare"] = launch(
            store, root / "spare.log", "--max-batch-size", "8", "--max-adapters", "2",
            "--adapter-wait-timeout", "0.25",  # well inside the 256-token stream that holds the slot
        )  # fmt: skip
    try:
        yield started
    finally:
        for server in started.values():
            stop(server)


@pytest.fixture(scope="session")
def live(servers: dict[str, ServerProcess], tiny_base: BaseInfo) -> ServerProcess:
    """The shared server: API key, 4 adapter slots, `--hub` at `hub_probe`, 20 load adapters registered
    (made here while it boots)."""
    server = servers["live"]
    names = [f"load-{i:02d}" for i in range(LOAD_ADAPTERS)]
    server.folders = lora_variants(tiny_base, server.registry.root.parent / "src", names)
    register(server.registry, tiny_base, server.folders)
    wait_ready(server)
    return server


@pytest.fixture(scope="session")
def spare(servers: dict[str, ServerProcess], live: ServerProcess) -> ServerProcess:
    """A second server over the same registry: no API key, 2 adapter slots, 1 s slot wait; for tests that
    exhaust or end it (not yet ready: call `wait_ready`)."""
    return servers["spare"]


@pytest.fixture(scope="session")
def solo(live: ServerProcess) -> dict[str, str]:
    """Each load adapter's greedy output, asked alone (one request at a time)."""
    return {name: live.greedy(name) for name in live.folders}
