"""Faults: corrupted adapters, processes killed mid-write, clients that vanish, a dead hub, SIGTERM.

Every case checks the outcome: the broken adapter (corrupted on disk, or registered with bad tensors) gets a
clear 422 and is never cached while the others keep answering their known outputs; a registry writer killed
with SIGKILL at each phase of a write, or a hub service killed mid-upload, leaves no partial version and the
previous one intact; a client that disconnects mid-stream frees its batch slot and its lease; an unreachable
hub costs that one request a 502, not the server; no free adapter slot is a 503 with Retry-After; SIGTERM lets
in-flight requests finish.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from hub.store import LocalStore
from tests.hub.conftest import HubProcess, start_hub
from tests.hub.test_service_crash import send_in_background
from tests.reliability.conftest import (
    PROMPT,
    REPO,
    ServerProcess,
    wait_ready,
)

pytestmark = [pytest.mark.slow, pytest.mark.network, pytest.mark.timeout(240)]

WEIGHTS = "adapter_model.safetensors"


def healthy(
    live: ServerProcess, solo: dict[str, str], names: tuple[str, ...] = ("load-01", "load-02")
) -> None:
    """The reference adapters still answer exactly their solo outputs."""
    for name in names:
        assert live.greedy(name) == solo[name], name


def resident(live: ServerProcess) -> dict[str, dict]:
    with live.client() as client:
        return {a["id"]: a for a in client.get("/v1/adapters").json()["data"]}


# ---- corrupt adapters ---------------------------------------------------------------------------
def flip_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) * 3 // 4] ^= 0x10
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size // 2)


def rewrite(path: Path, change: Callable[[dict[str, np.ndarray]], None]) -> None:
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def first_a(tensors: dict[str, np.ndarray]) -> str:
    return sorted(k for k in tensors if "lora_A" in k)[0]


def wrong_shape(tensors: dict[str, np.ndarray]) -> None:
    key = first_a(tensors)
    tensors[key] = np.zeros((tensors[key].shape[0], tensors[key].shape[1] // 2), dtype=np.float32)


def wrong_dtype(tensors: dict[str, np.ndarray]) -> None:
    key = first_a(tensors)
    tensors[key] = tensors[key].astype(np.float64)


def int_dtype(tensors: dict[str, np.ndarray]) -> None:
    key = first_a(tensors)
    tensors[key] = tensors[key].astype(np.int32)


AFTER_REGISTRATION: dict[str, Callable[[Path], None]] = {
    "bit-flip": flip_bit,
    "truncated": truncate,
    "wrong-shape": lambda p: rewrite(p, wrong_shape),
    "wrong-dtype": lambda p: rewrite(p, wrong_dtype),
    "missing-file": lambda p: p.unlink(),
}
# The same defects registered as they are (checksums valid): the loader's own checks must catch them.
AT_REGISTRATION: dict[str, tuple[Callable[[Path], None], str]] = {
    "reg-wrong-shape": (lambda p: rewrite(p, wrong_shape), "has shape"),
    "reg-wrong-dtype": (lambda p: rewrite(p, wrong_dtype), "dtype F64"),
    "reg-int-dtype": (lambda p: rewrite(p, int_dtype), "dtype I32"),
    "reg-truncated": (truncate, "truncated or damaged"),
}


def test_corrupt_adapters_get_422_are_never_cached_and_others_keep_serving(
    live: ServerProcess, solo: dict[str, str], tmp_path: Path
):
    spec = live.registry.get("load-00").manifest.base
    failures_before = live.metric("adapterdock_adapter_cache_load_failures_total")
    cases: dict[str, str] = {}
    for name, corrupt in AFTER_REGISTRATION.items():
        manifest = live.registry.put(live.folders["load-00"], name=f"fault-{name}", task="instruction",
                                     method="lora", base=spec)  # fmt: skip
        corrupt(live.registry.get(manifest.ref, verify=False).path / WEIGHTS)
        cases[f"fault-{name}"] = WEIGHTS  # the checksum check names the file
    for name, (corrupt, expected) in AT_REGISTRATION.items():
        folder = tmp_path / name
        shutil.copytree(live.folders["load-00"], folder)
        corrupt(folder / WEIGHTS)
        live.registry.put(folder, name=f"fault-{name}", task="instruction", method="lora", base=spec)
        cases[f"fault-{name}"] = expected

    for index, (model, expected) in enumerate(cases.items()):
        for _ in range(2):  # twice: a failed load must not be cached as a success (nor as a failure)
            response = live.complete(model)
            assert response.status_code == 422, (model, response.text)
            error = response.json()["error"]
            assert error["code"] == "corrupt_adapter" and expected in error["message"], (model, error)
            assert "Traceback" not in error["message"]
        healthy(live, solo, (f"load-{index % 4 + 1:02d}",))
    listed = resident(live)
    assert not any(listed[f"{m}@1"]["loaded"] for m in cases)
    failures = live.metric("adapterdock_adapter_cache_load_failures_total") - failures_before
    assert failures >= 2 * len(cases)
    assert live.alive()


def nan_weights(tensors: dict[str, np.ndarray]) -> None:
    key = sorted(k for k in tensors if "lora_B" in k)[0]
    tensors[key] = tensors[key].copy()
    tensors[key][0, 0] = np.nan
    tensors[key][1, 0] = np.inf


def test_adapter_with_non_finite_weights_is_422_and_spares_its_batch(
    live: ServerProcess, solo: dict[str, str], tmp_path: Path
):
    folder = tmp_path / "nan"
    shutil.copytree(live.folders["load-00"], folder)
    rewrite(folder / WEIGHTS, nan_weights)
    spec = live.registry.get("load-00").manifest.base
    live.registry.put(folder, name="fault-non-finite", task="instruction", method="lora", base=spec)
    neighbour: dict[str, httpx.Response] = {}
    thread = threading.Thread(target=lambda: neighbour.update(r=live.complete("load-01", max_tokens=160)))
    thread.start()
    time.sleep(0.5)  # the neighbour is decoding when the sampled request joins the batch
    with live.client() as client:
        sampled = client.post("/v1/completions", json={"model": "fault-non-finite", "prompt": PROMPT,
                                                       "max_tokens": 4, "temperature": 0.8})  # fmt: skip
    thread.join(60)
    assert neighbour["r"].status_code == 200, neighbour["r"].text
    for response in (sampled, live.complete("fault-non-finite")):
        assert response.status_code == 422, response.text
        assert "finite" in response.json()["error"]["message"]


# ---- SIGKILL mid-write --------------------------------------------------------------------------
WRITER = """
import os, shutil, sys, time
from hub.manifest import BaseSpec
from hub.store import LocalStore

root, src, name, phase, base_name, fingerprint = sys.argv[1:7]


def stall_here():
    print("stalled", flush=True)  # the parent kills us now
    time.sleep(120)


def slow_copyfile(source, target, *, follow_symlinks=True):
    with open(source, "rb") as reader, open(target, "wb") as writer:
        while chunk := reader.read(1 << 20):
            writer.write(chunk)
            writer.flush()
            if phase == "mid-copy" and writer.tell() >= 2 << 20:
                stall_here()
    return target


real_rename, real_replace = os.rename, os.replace


def rename(old, new):
    staged = ".staging" in str(old)
    if staged and phase == "before-rename":
        stall_here()
    real_rename(old, new)
    if staged and phase == "after-rename":
        stall_here()


def replace(old, new):
    if phase == "before-tags" and str(new).endswith("tags.json"):
        stall_here()
    real_replace(old, new)


shutil.copyfile, os.rename, os.replace = slow_copyfile, rename, replace
store = LocalStore(root)
store.put(src, name=name, task="instruction", method="lora", base=BaseSpec(base_name, fingerprint),
          tags=["prod"] if phase == "before-tags" else ())
print("finished", flush=True)
"""
PHASES = ("mid-copy", "before-rename", "after-rename", "before-tags")
"""Where the writer is killed: half-way through copying a file into staging, after staging is complete and
checked but before it is renamed into place, just after the rename (before the version counter is bumped),
and before the tag file is replaced."""


def kill_writer_at(store: LocalStore, src: Path, name: str, spec, phase: str) -> None:
    """Run `LocalStore.put` in a subprocess and SIGKILL it when it reaches `phase`."""
    argv = [sys.executable, "-c", WRITER, str(store.root), str(src), name, phase, spec.name_or_path,
            spec.fingerprint]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    writer = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    ready, _, _ = select.select([writer.stdout], [], [], 60)
    line = writer.stdout.readline() if ready else b""
    assert line == b"stalled\n", (phase, line, writer.stderr.read() if writer.poll() is not None else "")
    writer.send_signal(signal.SIGKILL)
    writer.wait(10)


def assert_every_visible_version_complete(store: LocalStore, name: str) -> list[int]:
    fresh = LocalStore(store.root)  # a "restarted" reader
    versions = fresh.versions(name)
    for version in versions:
        fresh.get(f"{name}@{version}", verify=True)  # raises on any missing or partial file
    listed = [m.version for m in fresh.list(all_versions=True) if m.name == name]
    assert listed == versions
    return versions


def test_registry_writer_killed_mid_write_leaves_no_partial_version(
    live: ServerProcess, solo: dict[str, str], tmp_path: Path
):
    store, spec = live.registry, live.registry.get("load-00").manifest.base
    src = tmp_path / "big"
    shutil.copytree(live.folders["load-00"], src)
    (src / "training_log.txt").write_bytes(os.urandom(6 * 2**20))
    store.put(src, name="victim", task="instruction", method="lora", base=spec, tags=["prod"])
    assert live.greedy("victim") == solo["load-00"]
    expected = [1]
    for phase in PHASES:
        kill_writer_at(store, src, "victim", spec, phase)
        if phase in ("after-rename", "before-tags"):  # the rename is the commit point: the version exists
            expected.append(max(expected) + 1)
        assert assert_every_visible_version_complete(store, "victim") == expected, phase
        assert LocalStore(store.root).tags("victim")["prod"] == 1, phase
        assert live.greedy("victim@prod") == solo["load-00"]
    # The registry still takes writes (the killed writers' locks died with them), with a fresh number.
    after = LocalStore(store.root).put(src, name="victim", task="instruction", method="lora", base=spec)
    assert after.version == max(expected) + 1 and store.versions("victim") == [*expected, after.version]
    assert store.get("victim@1").manifest.files[WEIGHTS] == after.files[WEIGHTS]
    assert live.greedy("victim@1") == live.greedy("victim") == solo["load-00"]
    print(f"\nregistry: {len(PHASES)} writers killed with SIGKILL ({', '.join(PHASES)}); versions after: "
          f"{store.versions('victim')}")  # fmt: skip


def test_hub_killed_mid_upload_keeps_the_previous_version(
    live: ServerProcess, hub_online: None, tmp_path: Path
):
    from hub.remote import HubClient

    root = tmp_path / "hub-root"
    hub: HubProcess = start_hub(root, None)
    try:
        HubClient(hub.url, token="open").push(live.registry, "load-03@1", "acme/steady")
        weights = os.urandom(4 * 2**20)
        oid = hashlib.sha256(weights).hexdigest()
        batch = httpx.post(
            f"{hub.url}/acme/steady.git/info/lfs/objects/batch",
            json={"operation": "upload", "objects": [{"oid": oid, "size": len(weights)}],
                  "hash_algo": "sha256"},
            timeout=10,
        ).json()  # fmt: skip
        href = batch["objects"][0]["actions"]["upload"]["href"]
        manifest = json.dumps({"name": "steady", "version": 2}).encode() + b" " * 2_000_000
        ops = [
            {"key": "header", "value": {"summary": "v2", "description": ""}},
            {"key": "file", "value": {"path": "manifest.json", "encoding": "base64",
                                      "content": base64.b64encode(manifest).decode()}},
        ]  # fmt: skip
        commit = b"".join(json.dumps(op).encode() + b"\n" for op in ops)
        stop_event = threading.Event()
        threads = [
            send_in_background("PUT", href, weights, stop_event),
            send_in_background("POST", f"{hub.url}/api/models/acme/steady/commit/main", commit, stop_event),
        ]
        deadline = time.monotonic() + 30
        while not any(p.stat().st_size >= 2**20 for p in (root / "tmp").glob("*.part")):
            assert time.monotonic() < deadline, "the upload never reached the disk"
            time.sleep(0.05)
        time.sleep(0.3)
        hub.kill()
        stop_event.set()
        for thread in threads:
            thread.join(30)
        hub = start_hub(root, None)
        pulled_into = LocalStore(tmp_path / "pulled")
        manifest_v1 = live.registry.get("load-03@1").manifest
        pulled = HubClient(hub.url).pull("acme/steady", store=pulled_into, expected_base=manifest_v1.base)
        assert pulled.files[WEIGHTS] == manifest_v1.files[WEIGHTS]
        pulled_into.verify(pulled.ref)
        assert list((root / "tmp").iterdir()) == []
    finally:
        hub.stop()


# ---- clients and hubs that go away ----------------------------------------------------------------
def stream_and_drop(live: ServerProcess, path: str, body: dict, events: int = 3) -> None:
    with live.client() as client, client.stream("POST", path, json=body) as response:
        assert response.status_code == 200
        seen = 0
        for line in response.iter_lines():
            if line.startswith("data:"):
                seen += 1
                if seen == events:
                    break  # leaving the block closes the connection mid-stream


def wait_until(condition: Callable[[], bool], seconds: float = 15) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/completions", {"model": "load-04", "prompt": PROMPT, "max_tokens": 240, "stream": True,
                             "ignore_eos": True, "temperature": 0}),
        ("/generate_stream", {"inputs": PROMPT, "parameters": {"adapter_id": "load-05",
                              "max_new_tokens": 240, "ignore_eos_token": True}}),
    ],
    ids=["openai", "tgi"],
)  # fmt: skip
def test_client_disconnect_mid_stream_frees_its_slot(
    live: ServerProcess, solo: dict[str, str], path: str, body: dict
):
    tokens_before = live.metric("adapterdock_scheduler_tokens_generated")
    stream_and_drop(live, path, body)
    assert wait_until(lambda: live.metric("adapterdock_scheduler_running") == 0), "the batch slot leaked"
    assert wait_until(lambda: live.metric("adapterdock_adapter_cache_in_use") == 0), "the lease leaked"
    generated = live.metric("adapterdock_scheduler_tokens_generated") - tokens_before
    assert generated < 240, f"the abandoned generation ran to the end ({generated:.0f} tokens)"
    adapter = body.get("model") or body["parameters"]["adapter_id"]
    assert resident(live)[f"{adapter}@1"]["in_use"] == 0
    healthy(live, solo)


def test_unreachable_hub_is_a_502_for_that_request_only(live: ServerProcess, solo: dict[str, str]):
    assert live.hub is not None
    live.hub.close()  # the configured hub's port now refuses connections
    try:
        started = time.monotonic()
        response = live.complete("acme/not-here")
        took = time.monotonic() - started
        with live.client() as client:
            tgi = client.post("/generate", json={"inputs": "x", "parameters": {
                "adapter_id": "acme/not-here", "adapter_source": "hub", "max_new_tokens": 2}})  # fmt: skip
    finally:
        live.hub.open()
    for answer in (response, tgi):
        assert answer.status_code in (502, 504), answer.text
        error = answer.json()["error"]
        assert error["code"] == "hub_unavailable" and live.hub.url in error["message"], error
    assert took < 60, f"the request waited {took:.0f} s for a dead hub"
    assert live.alive()
    healthy(live, solo)
    assert live.registry.versions("acme/not-here") == []  # nothing half-registered


def test_no_free_adapter_slot_is_503_with_retry_after(spare: ServerProcess, solo: dict[str, str]):
    """One slot pinned (pins never take the last one: the second pin is a 409), the other leased by a
    long stream: a request for a third adapter waits --adapter-wait-timeout (0.25 s), then 503. (With a
    1 s wait the 256-token stream could end first on a busy machine, the slot freed, and a 200 served.)"""
    wait_ready(spare)
    body = {"model": "load-10", "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    with httpx.Client(base_url=spare.url, timeout=60) as client:
        assert client.post("/v1/adapters/load-08/pin").json()["pinned"]
        refused = client.post("/v1/adapters/load-09/pin")
        assert refused.status_code == 409 and refused.json()["error"]["code"] == "pin_limit", refused.text
        long = {**body, "model": "load-09", "max_tokens": 256, "stream": True}
        with client.stream("POST", "/v1/completions", json=long) as stream:
            lines = stream.iter_lines()
            next(line for line in lines if line.startswith("data:"))  # load-09 holds the free slot
            busy = client.post("/v1/completions", json=body)
            for _ in lines:  # read the stream to its end: the lease is released
                pass
        assert busy.status_code == 503, busy.text
        assert busy.headers["retry-after"].isdigit()
        assert busy.json()["error"]["code"] == "adapter_slots_busy"
        assert client.post("/v1/completions", json={**body, "model": "load-08"}).status_code == 200
        client.post("/v1/adapters/load-08/unpin")
        served = client.post("/v1/completions", json=body)
    assert served.status_code == 200 and served.json()["choices"][0]["text"] == solo["load-10"]


def test_sigterm_finishes_in_flight_requests(spare: ServerProcess):
    wait_ready(spare)
    tokens = 48
    results: list[tuple[str, int, int]] = []
    first_token = threading.Barrier(5, timeout=60)

    def plain(model: str) -> None:
        body = {"model": model, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
        with httpx.Client(base_url=spare.url, timeout=60) as client:
            first_token.wait()
            response = client.post("/v1/completions", json=body)
            results.append((model, response.status_code, response.json()["usage"]["completion_tokens"]))

    def streamed(model: str) -> None:
        body = {"model": model, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
        with httpx.Client(base_url=spare.url, timeout=60) as client:
            with client.stream("POST", "/v1/completions", json=body) as response:
                lines = response.iter_lines()
                next(line for line in lines if line.startswith("data:"))
                first_token.wait()  # SIGTERM arrives while this stream is mid-way
                chunks = [line[6:] for line in lines if line.startswith("data:")]
            usage = json.loads(chunks[-2])["usage"]
            assert chunks[-1] == "[DONE]"
            results.append((model, response.status_code, usage["completion_tokens"]))

    threads = [threading.Thread(target=streamed, args=(m,)) for m in ("load-06", "load-07")]
    threads += [threading.Thread(target=plain, args=(m,)) for m in ("load-06", "tiny")]
    for thread in threads:
        thread.start()
    first_token.wait()
    time.sleep(0.1)  # the plain requests are on the wire
    signalled = time.monotonic()
    spare.process.send_signal(signal.SIGTERM)
    for thread in threads:
        thread.join(60)
    # uvicorn re-raises the caught SIGTERM once it has shut down cleanly, so -SIGTERM is a clean exit too.
    assert spare.process.wait(40) in (0, -signal.SIGTERM)
    took = time.monotonic() - signalled
    assert sorted(results) == sorted(
        [("load-06", 200, tokens), ("load-07", 200, tokens), ("load-06", 200, tokens), ("tiny", 200, tokens)]
    )
    assert took < 30, f"shutdown took {took:.1f} s"
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{spare.url}/health", timeout=5)
    log = spare.log.read_text()
    assert "server stopped" in log and "Application shutdown complete" in log
