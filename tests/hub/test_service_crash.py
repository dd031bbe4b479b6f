"""A service killed with SIGKILL in the middle of uploads restarts with every repo at its previous commit."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from huggingface_hub import HfApi, hf_hub_download

from tests.hub.conftest import HubProcess

pytestmark = [pytest.mark.network, pytest.mark.usefixtures("hub_online")]

CHUNK = 256 * 1024


def trickle(data: bytes, stop: threading.Event) -> Iterator[bytes]:
    """Send the first chunks at once, then stall until the server is dead."""
    for start in range(0, len(data), CHUNK):
        yield data[start : start + CHUNK]
        if start >= 6 * CHUNK:  # past the service's 1 MiB write buffer
            stop.wait(30)


def send_in_background(method: str, url: str, data: bytes, stop: threading.Event) -> threading.Thread:
    def run() -> None:
        try:
            httpx.request(method, url, content=trickle(data, stop), timeout=30)
        except httpx.HTTPError:
            pass  # the server died under us: expected

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def wait_for(condition: Callable[[], bool], seconds: float = 15) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)


@pytest.mark.slow
def test_sigkill_mid_upload_leaves_repo_at_previous_commit(
    start_service: Callable[..., HubProcess], tmp_path: Path
) -> None:
    root = tmp_path / "root"
    hub = start_service(root)
    api = HfApi(endpoint=hub.url, token="any-token-open-mode")
    api.create_repo("acme/crash")
    first = api.upload_file(path_or_fileobj=b'{"v": 1}', path_in_repo="config.json", repo_id="acme/crash").oid

    weights = os.urandom(4 * 1024 * 1024)
    oid = hashlib.sha256(weights).hexdigest()
    batch = httpx.post(
        f"{hub.url}/acme/crash.git/info/lfs/objects/batch",
        json={"operation": "upload", "objects": [{"oid": oid, "size": len(weights)}], "hash_algo": "sha256"},
        timeout=10,
    ).json()
    href = batch["objects"][0]["actions"]["upload"]["href"]
    content = base64.b64encode(b'{"v": 2}' + b" " * 2_000_000).decode()
    inline = {"key": "file", "value": {"path": "config.json", "encoding": "base64", "content": content}}
    header = {"key": "header", "value": {"summary": "second", "description": ""}}
    commit = b"".join(json.dumps(x).encode() + b"\n" for x in (header, inline))

    stop = threading.Event()
    threads = [
        send_in_background("PUT", href, weights, stop),
        send_in_background("POST", f"{hub.url}/api/models/acme/crash/commit/main", commit, stop),
    ]
    parts = root / "tmp"
    wait_for(lambda: any(p.stat().st_size >= 1024 * 1024 for p in parts.glob("*.part")))
    time.sleep(0.3)  # let the commit body start streaming too
    hub.kill()
    stop.set()
    for thread in threads:
        thread.join(timeout=30)

    restarted = start_service(root)
    info = HfApi(endpoint=restarted.url).model_info("acme/crash", files_metadata=True)
    assert info.sha == first
    assert sorted(s.rfilename for s in info.siblings) == [".gitattributes", "config.json"]
    config = hf_hub_download("acme/crash", "config.json", endpoint=restarted.url, cache_dir=tmp_path / "c")
    assert Path(config).read_bytes() == b'{"v": 1}'
    assert list(parts.iterdir()) == []  # the cut-off upload was cleaned away
    assert not (root / "blobs" / oid[:2] / oid[2:4] / oid).exists()

    again = HfApi(endpoint=restarted.url, token="any-token-open-mode")
    second = again.upload_file(
        path_or_fileobj=weights, path_in_repo="w.safetensors", repo_id="acme/crash"
    ).oid
    assert second != first
    assert HfApi(endpoint=restarted.url).model_info("acme/crash", revision=first).sha == first
