"""Hostile input: path traversal, pickles, lying safetensors headers, oversized and malformed bodies, SSRF.

Each hostile request must get a 4xx with a clear message (never a 5xx or a traceback), must not touch files
outside the registry (checked with access times on a loadable adapter planted beside it), must not make the
server allocate what a header claims (RSS checked), and `adapter_source: hub` must only ever reach the
configured hub (a listening socket on another port must receive nothing).
"""

from __future__ import annotations

import builtins
import http.client
import json
import os
import pickle
import shutil
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from hub.durable import sha256_file
from hub.manifest import FileEntry, Manifest
from hub.store import LocalStore
from tests.reliability.conftest import (
    MAX_BODY,
    MAX_INPUT_TOKENS,
    MAX_NEW_TOKENS,
    PortProbe,
    ServerProcess,
)

pytestmark = [pytest.mark.slow, pytest.mark.network, pytest.mark.timeout(180)]

WEIGHTS = "adapter_model.safetensors"
RSS_SLACK = 64 * 2**20


def ask(live: ServerProcess, path: str, body: dict | bytes, **headers: str) -> httpx.Response:
    with live.client() as client:
        if isinstance(body, bytes):
            return client.post(path, content=body, headers={"content-type": "application/json", **headers})
        return client.post(path, json=body)


def assert_refused(response: httpx.Response, status: int | tuple[int, ...], *words: str) -> dict:
    """A 4xx in OpenAI's error shape whose message says what was wrong."""
    statuses = (status,) if isinstance(status, int) else status
    assert response.status_code in statuses, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "code"} and error["message"], error
    assert "Traceback" not in error["message"]
    for word in words:
        assert word.lower() in error["message"].lower(), (word, error["message"])
    return error


# ---- path traversal ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def planted(live: ServerProcess) -> Iterator[list[Path]]:
    """A loadable adapter planted outside the registry, with access times set to catch any read."""
    outside = live.registry.root.parent / "outside"
    version = outside / "evil" / "1"
    shutil.copytree(live.registry.get("load-00@1").path, version)
    (outside / "evil" / "tags.json").write_text('{"prod": 1}')
    paths = sorted([outside, *outside.rglob("*")])
    for path in paths:
        stat = path.stat()
        os.utime(path, (stat.st_mtime - 1000, stat.st_mtime))  # relatime updates atime on the next read
    yield paths
    shutil.rmtree(outside)


TRAVERSALS = [
    "../outside/evil",
    "../outside/evil@1",
    "../../outside/evil@prod",
    "load-00/../../outside/evil",
    "..%2Foutside%2Fevil",
    "%2e%2e/outside/evil",
    "..\\outside\\evil",
    "/etc/passwd",
    "//etc/passwd",
    "~/.ssh/id_rsa",
    "C:\\Windows\\win.ini",
    "file:///etc/passwd",
    "load-00\x00../../outside/evil",
    "\x00",
    "load-00@1\x00",
    "./load-00",
    "outside/../../evil",
]


def test_path_traversal_is_refused_without_touching_outside_files(live: ServerProcess, planted: list[Path]):
    atimes = {p: p.stat().st_atime for p in planted}
    tried = 0
    with live.client() as client:
        for ref in TRAVERSALS:
            for path, body in (
                ("/v1/completions", {"model": ref, "prompt": "x", "max_tokens": 1}),
                ("/generate", {"inputs": "x", "parameters": {"adapter_id": ref, "max_new_tokens": 1}}),
                ("/v1/classify", {"adapter": ref, "inputs": "x"}),
                ("/v1/adapters/load", {"adapter": ref}),
            ):
                error = assert_refused(client.post(path, json=body), 400)
                assert error["code"] == "invalid_reference", (ref, path, error)
                tried += 1
    # In the URL path: percent-encoded (decoded by the server) and raw dot segments (no client normalising).
    conn = http.client.HTTPConnection("127.0.0.1", int(live.url.rsplit(":", 1)[1]), timeout=30)
    for ref in TRAVERSALS[:6]:
        for raw in (quote(ref, safe=""), ref.replace("%2F", "/")):
            for method, suffix in (("POST", "/pin"), ("POST", "/unpin"), ("DELETE", "")):
                conn.request(method, f"/v1/adapters/{raw}{suffix}", headers=live.headers())
                response = conn.getresponse()
                payload = json.loads(response.read())
                assert response.status == 400, (raw, response.status, payload)
                assert payload["error"]["code"] == "invalid_reference", (raw, payload)
                tried += 1
    conn.close()
    with live.client() as client:
        ids = [a["id"] for a in client.get("/v1/adapters").json()["data"]]
    assert not [i for i in ids if "evil" in i or "outside" in i]
    touched = [str(p) for p in planted if p.stat().st_atime != atimes[p]]
    assert not touched, f"files outside the registry were read: {touched}"
    assert live.alive()
    print(f"\nhostile: {tried} traversal requests refused")


# ---- pickles and lying safetensors headers ---------------------------------------------------------
class Payload:
    """Unpickling this creates a file: proof that a pickle was loaded."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return builtins.open, (str(self.target), "w")


def plant_version(store: LocalStore, name: str, source: Path, extra: dict[str, bytes], drop=()) -> None:
    """Register `source`, then add/drop files in the version folder and re-checksum its manifest (as if a
    registry had been written by a tool that allows them)."""
    spec = store.get("load-00").manifest.base
    manifest = store.put(source, name=name, task="instruction", method="lora", base=spec)
    folder = store.get(manifest.ref, verify=False).path
    files = dict(manifest.files)
    for fname in drop:
        (folder / fname).unlink()
        files.pop(fname)
    for fname, data in extra.items():
        (folder / fname).write_bytes(data)
        files[fname] = FileEntry(sha256=sha256_file(folder / fname), size=len(data))
    replace(manifest, files=files).save(folder)
    assert Manifest.load(folder / "manifest.json").files == files
    store.verify(manifest.ref)  # checksums agree: only the loader's rules can refuse it


def safetensors_bytes(header: dict, data: bytes = b"", length: int | None = None) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def test_pickles_are_refused_and_never_unpickled(live: ServerProcess, tmp_path: Path):
    proof = tmp_path / "unpickled"
    payload = pickle.dumps(Payload(proof))
    source = live.folders["load-00"]
    plant_version(live.registry, "pickle-only", source, {"adapter_model.bin": payload}, drop=[WEIGHTS])
    plant_version(live.registry, "pickle-beside", source, {"adapter_model.bin": payload})
    plant_version(live.registry, "pickle-pt", source, {"training_args.pt": payload})
    for name in ("pickle-only", "pickle-beside", "pickle-pt"):
        error = assert_refused(live.complete(name), 422, "pickle")
        assert error["code"] == "corrupt_adapter"
    assert not proof.exists()
    assert live.alive()


HUGE = 2**40
LYING_HEADERS = {
    "huge-tensor": safetensors_bytes(
        {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight":
         {"dtype": "F32", "shape": [2**20, 2**18], "data_offsets": [0, HUGE]}}, b"\0" * 64),
    "huge-header-length": safetensors_bytes({}, b"\0" * 64, length=2**62),
    "header-beyond-file": safetensors_bytes({}, b"\0" * 64, length=60 * 2**20),
    "negative-shape": safetensors_bytes(
        {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight":
         {"dtype": "F32", "shape": [-8, 256], "data_offsets": [0, 64]}}, b"\0" * 64),
    "shape-offsets-disagree": safetensors_bytes(
        {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight":
         {"dtype": "F32", "shape": [2**16, 2**16], "data_offsets": [0, 64]}}, b"\0" * 64),
    "header-not-json": struct.pack("<Q", 16) + b"\xff\xfe{not json}\x00\x00" + b"\0" * 64,
}  # fmt: skip


def test_lying_safetensors_headers_are_refused_before_allocation(live: ServerProcess, tmp_path: Path):
    rss_before = live.rss()
    for name, data in LYING_HEADERS.items():
        folder = tmp_path / name
        folder.mkdir()
        shutil.copy(live.folders["load-00"] / "adapter_config.json", folder)
        (folder / WEIGHTS).write_bytes(data)
        spec = live.registry.get("load-00").manifest.base
        live.registry.put(folder, name=f"lying-{name}", task="instruction", method="lora", base=spec)
        error = assert_refused(live.complete(f"lying-{name}"), 422, WEIGHTS)
        assert error["code"] == "corrupt_adapter"
    growth = live.rss() - rss_before
    assert growth < RSS_SLACK, f"RSS grew by {growth / 2**20:.0f} MiB on lying headers"
    assert live.alive()


# ---- malformed and oversized requests --------------------------------------------------------------
def test_oversized_bodies_are_413(live: ServerProcess):
    big = {"model": "tiny", "prompt": "x" * (MAX_BODY + 10)}
    assert_refused(ask(live, "/v1/completions", big), 413, str(MAX_BODY))

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit must hold while reading
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(MAX_BODY // 4096 + 2):
            yield b"y" * 4096
        yield b'"}'

    with live.client() as client:
        response = client.post("/v1/completions", content=chunks(),
                               headers={"content-type": "application/json"})  # fmt: skip
    assert_refused(response, 413, str(MAX_BODY))
    assert live.alive()


LIMITS = [
    ("/v1/completions", {"model": "tiny", "prompt": "word " * (MAX_INPUT_TOKENS * 2)}, 400,
     str(MAX_INPUT_TOKENS)),
    ("/v1/completions", {"model": "tiny", "prompt": [5] * (MAX_INPUT_TOKENS + 1)}, 400,
     str(MAX_INPUT_TOKENS)),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi " * 400}]},
     400, str(MAX_INPUT_TOKENS)),
    ("/generate", {"inputs": "word " * (MAX_INPUT_TOKENS * 2)}, 400, str(MAX_INPUT_TOKENS)),
    ("/v1/classify", {"adapter": "load-00", "inputs": "word " * (MAX_INPUT_TOKENS * 2)}, 400, ""),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": MAX_NEW_TOKENS + 1}, 400,
     str(MAX_NEW_TOKENS)),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                              "max_completion_tokens": 10**9}, 400, str(MAX_NEW_TOKENS)),
    ("/generate", {"inputs": "x", "parameters": {"max_new_tokens": 10**6}}, 400, str(MAX_NEW_TOKENS)),
    ("/v1/completions", {"model": "tiny", "prompt": [2**40]}, 400, "vocabulary"),
    ("/v1/completions", {"model": "tiny", "prompt": [-1]}, 400, "vocabulary"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 0}, 422, "max_tokens"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": -5}, 422, "max_tokens"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "temperature": -1}, 422, "temperature"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "temperature": 1e9}, 422, "temperature"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "top_p": -0.5}, 422, "top_p"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "top_p": 1.5}, 422, "top_p"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "n": 0}, 422, "n"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "n": 10**6}, 422, "n"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "seed": -1}, 422, "seed"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "min_tokens": -3}, 422, "min_tokens"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "stop": ["s"] * 100}, 422, "stop"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "temperature": "hot"}, 422, "temperature"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "logit_bias": {"5": 100}}, 400, "logit_bias"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "top_k": 5}, 400, "top_k"),
    ("/generate", {"inputs": "x", "parameters": {"temperature": -1}}, 422, "temperature"),
    ("/generate", {"inputs": "x", "parameters": {"top_p": 0}}, 422, "top_p"),
    ("/generate", {"inputs": "x", "parameters": {"adapter_source": "s3"}}, 422, "adapter_source"),
    ("/v1/completions", {"model": "x" * 5000, "prompt": "x"}, 422, "model"),
    ("/v1/completions", {"prompt": "x"}, 422, "model"),
    ("/v1/completions", {"model": "tiny", "prompt": []}, 422, "prompt"),
    ("/v1/chat/completions", {"model": "tiny", "messages": []}, 422, "messages"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "root", "content": "x"}]}, 422, "role"),
    ("/v1/score", {"adapter": "load-00", "inputs": [["only-one"]]}, 422, "inputs"),
    ("/v1/completions", ["not", "an", "object"], 422, ""),
]  # fmt: skip
RAW_BODIES = [
    pytest.param(b'{"model": "tiny", "prompt": "x", "temperature": NaN}', "temperature", id="nan"),
    pytest.param(b'{"model": "tiny", "prompt": "x", "top_p": NaN}', "top_p", id="nan-top_p"),
    pytest.param(b'{"model": "tiny", "prompt": "x", "temperature": Infinity}', "temperature", id="inf"),
    pytest.param(b'{"model": "tiny", "prompt": "x", "temperature": -Infinity}', "temperature", id="-inf"),
    pytest.param(b'{"model": "tiny", "prompt": "\xff\xfe\xfd"}', "UTF-8", id="non-utf8-prompt"),
    pytest.param(b'{"model": "tin\xc3\x28", "prompt": "x"}', "UTF-8", id="bad-utf8-sequence"),
    pytest.param(b"\xef\xbb\xbf\x00\x00", "JSON", id="bom-and-nuls"),
    pytest.param(b'{"model": "tiny", "prompt": "x"', "JSON", id="truncated-json"),
    pytest.param(b"", "body", id="empty"),
    pytest.param(b"[" * 30000 + b"]" * 30000, "nested", id="nested-arrays"),
    pytest.param(b'{"model": "tiny", "prompt": ' + b"[" * 20000 + b"]" * 20000 + b"}", "nested",
                 id="nested-prompt"),
    pytest.param(b'{"a":' * 10000 + b"1" + b"}" * 10000, "nested", id="nested-objects"),
]  # fmt: skip


@pytest.mark.parametrize("path, body, status, word", LIMITS, ids=[f"{i}" for i in range(len(LIMITS))])
def test_limits_and_bad_parameters_are_4xx_with_a_clear_message(
    live: ServerProcess, path: str, body: dict, status: int, word: str
):
    assert_refused(ask(live, path, body), status, *([word] if word else []))


@pytest.mark.parametrize("raw, word", RAW_BODIES)
def test_nan_non_utf8_and_deeply_nested_bodies_are_4xx_with_a_clear_message(
    live: ServerProcess, raw: bytes, word: str
):
    response = ask(live, "/v1/completions", raw)
    assert 400 <= response.status_code < 500, (raw[:60], response.status_code, response.text[:300])
    assert_refused(response, response.status_code, *([word] if word else []))


def test_tiny_temperature_is_served_or_refused_without_hurting_its_batch(live: ServerProcess):
    neighbour: dict[str, httpx.Response] = {}

    def long_neighbour() -> None:
        neighbour["response"] = live.complete("load-01", max_tokens=200)

    thread = threading.Thread(target=long_neighbour)
    thread.start()
    time.sleep(0.5)  # the neighbour is decoding
    tiny = {"model": "tiny", "prompt": "x", "max_tokens": 4, "temperature": 1e-40}
    response = ask(live, "/v1/completions", tiny)
    thread.join(60)
    assert neighbour["response"].status_code == 200, neighbour["response"].text
    assert neighbour["response"].json()["usage"]["completion_tokens"] == 200
    assert response.status_code == 200 or 400 <= response.status_code < 500, response.text


def test_control_characters_in_valid_json_are_served(live: ServerProcess):
    """NULs, escape codes and BOMs inside valid JSON strings are just text."""
    for prompt in (b'"a\\u0000b"', b'"\\u001b[31mred"', b'"\\ufeff\\u200bx"', b'"\\u202e!olleh"'):
        raw = b'{"model": "tiny", "max_tokens": 2, "prompt": ' + prompt + b"}"
        response = ask(live, "/v1/completions", raw)
        assert response.status_code == 200, (prompt, response.text)
    assert live.alive()


@pytest.mark.parametrize(
    "path, field",
    [("/v1/completions", b'"model": "tiny", "max_tokens": 2, "prompt": '),
     ("/v1/chat/completions", b'"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": '),
     ("/generate", b'"inputs": '),
     ("/v1/classify", b'"adapter": "load-00", "inputs": ')],
    ids=["completions", "chat", "generate", "classify"],
)  # fmt: skip
def test_lone_surrogates_are_4xx_with_a_clear_message(live: ServerProcess, path: str, field: bytes):
    """JSON can carry a lone UTF-16 surrogate ("\\ud800"), which is not Unicode text: refused by name."""
    close = b"}]}" if b"messages" in field else b"}"
    response = ask(live, path, b"{" + field + b'"x\\ud800y"' + close)
    message = assert_refused(response, (400, 422))["message"].lower()
    assert "surrogate" in message or "unicode" in message, message
    assert live.alive()


# ---- SSRF -----------------------------------------------------------------------------------------
def test_hub_source_reaches_only_the_configured_hub(live: ServerProcess):
    assert live.hub is not None
    victim = PortProbe()
    elsewhere = f"127.0.0.1:{victim.port}"
    try:
        refs = [
            f"http://{elsewhere}/acme/x",
            f"https://{elsewhere}/acme/x",
            f"//{elsewhere}/acme/x",
            f"{elsewhere}/acme/x",
            f"acme/x@http://{elsewhere}",
            f"http://user@{elsewhere}/acme/x",
            f"acme/x?endpoint=http://{elsewhere}",
            f"acme/x#@{elsewhere}",
            f"file://{elsewhere}/x",
            f"\\\\{elsewhere}\\share",
            f"acme/x@v1/../../{elsewhere}",
        ]
        hub_seen = len(live.hub.connections)
        for ref in refs:
            for body in (
                {"inputs": "x", "parameters": {"adapter_id": ref, "adapter_source": "hub",
                                               "max_new_tokens": 1}},
                {"inputs": "x", "parameters": {"adapter_id": ref, "max_new_tokens": 1}},
            ):  # fmt: skip
                assert_refused(ask(live, "/generate", body), (400, 422))
            load = {"adapter": ref, "adapter_source": "hub"}
            assert_refused(ask(live, "/v1/adapters/load", load), (400, 422))
        assert len(live.hub.connections) == hub_seen, "a refused reference still reached the hub"
        # A well-formed hub id goes to the configured hub, and only there (which answers nothing: 502).
        body = {"inputs": "x", "parameters": {"adapter_id": "acme/ssrf-check", "adapter_source": "hub"}}
        assert_refused(ask(live, "/generate", body), (502, 504))
        assert len(live.hub.connections) > hub_seen
        assert b"acme/ssrf-check" in b"".join(live.hub.connections[hub_seen:])
        assert victim.connections == [], "a reference made the server connect to another host"
    finally:
        victim.close()
