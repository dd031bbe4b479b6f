"""Scale-out, the documented way: one hub service, two server replicas with separate local caches.

An adapter pushed once to the hub is pulled on demand by each replica (on its first request) and gives the
same greedy answer on both (docs/scaling.md).
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from hub.bases import BaseInfo
from hub.remote import HubClient
from hub.store import LocalStore
from tests.hub.conftest import hub_online, start_hub  # noqa: F401 - hub_online is a fixture
from tests.server.conftest import make_peft_adapter
from tests.server.test_integration_server import launch, stop_server, wait_ready

pytestmark = [pytest.mark.slow, pytest.mark.network]


@pytest.mark.usefixtures("hub_online")  # the replicas and our client talk to the loopback hub
def test_two_replicas_pull_on_demand_and_agree(tiny_base: BaseInfo, tmp_path: Path) -> None:
    hub = start_hub(tmp_path / "hub-root", token_file=None)
    replicas = []
    try:
        origin = LocalStore(tmp_path / "origin")
        folder = make_peft_adapter(tiny_base, tmp_path / "lora", seed=3)
        manifest = origin.put(folder, name="chat", task="instruction", method="lora", base=tiny_base.spec)
        HubClient(endpoint=hub.url).push(origin, manifest.ref, "acme/chat")

        for i in range(2):
            store = LocalStore(tmp_path / f"replica-{i}")
            url, proc = launch("tiny", store, tmp_path / f"replica-{i}.log", "--quantize", "none",
                               "--hub", hub.url)  # fmt: skip
            replicas.append((url, proc, store))
        answers = []
        for url, proc, store in replicas:
            wait_ready(url, proc, Path(str(store.root) + ".log"))
            assert store.names() == []  # nothing local before the first request
            body = {"model": "acme/chat", "prompt": "The weather today is", "max_tokens": 8, "temperature": 0}
            response = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
            assert response.status_code == 200, response.text
            answers.append(response.json()["choices"][0]["text"])
            pulled = store.get("acme/chat").manifest
            assert pulled.base.fingerprint == tiny_base.fingerprint
            assert pulled.files["adapter_model.safetensors"] == manifest.files["adapter_model.safetensors"]
        assert answers[0] == answers[1] and answers[0]
        base_body = {"model": "tiny", "prompt": "The weather today is", "max_tokens": 8, "temperature": 0}
        base_answer = httpx.post(f"{replicas[0][0]}/v1/completions", json=base_body, timeout=120)
        assert base_answer.status_code == 200, base_answer.text
        assert base_answer.json()["choices"][0]["text"] != answers[0]  # the adapter really was applied
    finally:
        for _, proc, _ in replicas:
            stop_server(proc)
        hub.stop()
