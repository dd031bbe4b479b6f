"""Refusals of the hub service: bad tokens (401), missing rights (403), bad names (400), oversized bodies
(413), forged upload URLs, commits naming bytes never uploaded, and blobs corrupted on disk (500)."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import HfHubHTTPError

from hub.service import create_app
from hub.service.deps import ServiceLimits
from tests.hub.conftest import OTHER_TOKEN, READER_TOKEN, WRITER_TOKEN, HubProcess

pytestmark = [pytest.mark.network, pytest.mark.usefixtures("hub_online")]


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def commit_body(*lines: dict) -> bytes:
    header = {"key": "header", "value": {"summary": "test", "description": ""}}
    return b"".join(json.dumps(item).encode() + b"\n" for item in (header, *lines))


def inline(path: str, data: bytes) -> dict:
    return {
        "key": "file",
        "value": {"path": path, "content": base64.b64encode(data).decode(), "encoding": "base64"},
    }


@pytest.fixture(scope="module")
def repo(hub_online: None, hub_service: HubProcess) -> str:
    HfApi(endpoint=hub_service.url, token=WRITER_TOKEN).create_repo("acme/guarded")
    return "acme/guarded"


def test_wrong_token_is_401_with_a_clear_message(hub_service: HubProcess, repo: str) -> None:
    with pytest.raises(HfHubHTTPError) as info:
        HfApi(endpoint=hub_service.url, token="hf_not_a_real_token").whoami()
    assert info.value.response.status_code == 401
    r = httpx.get(f"{hub_service.url}/api/models/{repo}", headers=bearer("hf_wrong"), timeout=10)
    assert r.status_code == 401 and "Invalid credentials" in r.json()["error"]


def test_writing_needs_a_token_with_write_rights(hub_service: HubProcess, repo: str) -> None:
    url = f"{hub_service.url}/api/models/{repo}/commit/main"
    body = commit_body(inline("a.txt", b"a"))
    anonymous = httpx.post(url, content=body, timeout=10)
    assert anonymous.status_code == 401 and "needs a token" in anonymous.json()["error"]
    reader = httpx.post(url, content=body, headers=bearer(READER_TOKEN), timeout=10)
    assert reader.status_code == 403 and "no write access" in reader.json()["error"]
    other = httpx.post(url, content=body, headers=bearer(OTHER_TOKEN), timeout=10)
    assert other.status_code == 403 and "bob" in other.json()["error"]
    with pytest.raises(HfHubHTTPError) as info:
        HfApi(endpoint=hub_service.url, token=OTHER_TOKEN).create_repo("acme/not-bobs")
    assert info.value.response.status_code == 403
    assert HfApi(endpoint=hub_service.url, token=WRITER_TOKEN).list_repo_files(repo) == [".gitattributes"]


@pytest.mark.parametrize(
    ("name", "organization"),
    [("..", "acme"), ("a\x01b", "acme"), ("x" * 200, "acme"), ("ok", "api"), ("a/b", "acme"), ("-x", "acme")],
)
def test_bad_repo_names_are_400(hub_service: HubProcess, name: str, organization: str) -> None:
    r = httpx.post(
        f"{hub_service.url}/api/repos/create",
        json={"name": name, "organization": organization},
        headers=bearer(WRITER_TOKEN),
        timeout=10,
    )
    assert r.status_code == 400, r.text
    assert "repo id" in r.json()["error"].lower() or "namespace" in r.json()["error"].lower()


@pytest.mark.parametrize(
    "path", ["../escape.txt", "a/../../b", "/etc/passwd", "a\x07b", "a//b", ".git/config"]
)
def test_bad_file_paths_are_400_and_change_nothing(hub_service: HubProcess, repo: str, path: str) -> None:
    url = f"{hub_service.url}/api/models/{repo}/commit/main"
    r = httpx.post(url, content=commit_body(inline(path, b"x")), headers=bearer(WRITER_TOKEN), timeout=10)
    assert r.status_code == 400 and "path" in r.json()["error"].lower()
    pre = httpx.post(
        f"{hub_service.url}/api/models/{repo}/preupload/main",
        json={"files": [{"path": path, "size": 1, "sample": ""}]},
        headers=bearer(WRITER_TOKEN),
        timeout=10,
    )
    assert pre.status_code == 400
    assert HfApi(endpoint=hub_service.url).list_repo_files(repo) == [".gitattributes"]


def test_commit_cannot_reference_lfs_bytes_it_did_not_upload(hub_service: HubProcess, repo: str) -> None:
    """Knowing another repo's sha256 is not enough to link its (maybe private) bytes."""
    secret = b"\0weights of someone else" * 100
    other = HfApi(endpoint=hub_service.url, token=OTHER_TOKEN)
    other.create_repo("other/private-weights", private=True)
    other.upload_file(path_or_fileobj=secret, path_in_repo="w.safetensors", repo_id="other/private-weights")
    oid = hashlib.sha256(secret).hexdigest()
    line = {
        "key": "lfsFile",
        "value": {"path": "stolen.bin", "algo": "sha256", "oid": oid, "size": len(secret)},
    }
    r = httpx.post(f"{hub_service.url}/api/models/{repo}/commit/main", content=commit_body(line),
                   headers=bearer(WRITER_TOKEN), timeout=10)  # fmt: skip
    assert r.status_code == 422 and "not uploaded" in r.json()["error"]
    batch = httpx.post(
        f"{hub_service.url}/{repo}.git/info/lfs/objects/batch",
        json={"operation": "upload", "objects": [{"oid": oid, "size": len(secret)}], "hash_algo": "sha256"},
        headers=bearer(WRITER_TOKEN),
        timeout=10,
    ).json()
    assert "upload" in batch["objects"][0]["actions"]  # must prove possession by uploading


def test_forged_or_wrong_uploads_are_refused(hub_service: HubProcess, repo: str) -> None:
    data = b"\0real bytes" * 50
    oid = hashlib.sha256(data).hexdigest()
    batch = httpx.post(
        f"{hub_service.url}/{repo}.git/info/lfs/objects/batch",
        json={"operation": "upload", "objects": [{"oid": oid, "size": len(data)}], "hash_algo": "sha256"},
        headers=bearer(WRITER_TOKEN),
        timeout=10,
    ).json()
    href = batch["objects"][0]["actions"]["upload"]["href"]
    forged = httpx.put(href.replace("sig=", "sig=00"), content=data, timeout=10)
    assert forged.status_code == 403 and "signature" in forged.json()["error"]
    other_repo = httpx.put(href.replace("acme/guarded", "acme/elsewhere"), content=data, timeout=10)
    assert other_repo.status_code == 403
    tampered = httpx.put(href, content=data[:-1] + b"!", timeout=10)
    assert tampered.status_code == 422 and "hash" in tampered.json()["error"]
    line = {"key": "lfsFile", "value": {"path": "w.bin", "algo": "sha256", "oid": oid, "size": len(data)}}
    r = httpx.post(f"{hub_service.url}/api/models/{repo}/commit/main", content=commit_body(line),
                   headers=bearer(WRITER_TOKEN), timeout=10)  # fmt: skip
    assert r.status_code == 422
    assert HfApi(endpoint=hub_service.url).list_repo_files(repo) == [".gitattributes"]


def test_corrupted_blob_is_detected_and_healed_by_a_new_upload(
    hub_service: HubProcess, tmp_path: Path
) -> None:
    api = HfApi(endpoint=hub_service.url, token=WRITER_TOKEN)
    api.create_repo("acme/fragile")
    data = b"\0" + bytes(range(256)) * 64
    api.upload_file(path_or_fileobj=data, path_in_repo="adapter_model.safetensors", repo_id="acme/fragile")
    oid = hashlib.sha256(data).hexdigest()
    blob = hub_service.root / "blobs" / oid[:2] / oid[2:4] / oid
    blob.write_bytes(data[:100] + b"X" + data[101:])  # bit rot: same size, other bytes
    url = f"{hub_service.url}/acme/fragile/resolve/main/adapter_model.safetensors"
    r = httpx.get(url, timeout=10)
    assert r.status_code == 500 and r.headers["x-error-code"] == "CorruptedBlob"
    assert "adapter_model.safetensors" in r.json()["error"] and "corrupted" in r.json()["error"]
    with pytest.raises(Exception) as info:  # noqa: PT011 - huggingface_hub wraps it; the message is what counts
        hf_hub_download(
            "acme/fragile", "adapter_model.safetensors", endpoint=hub_service.url, cache_dir=tmp_path
        )
    chain, err = [], info.value
    while err is not None:
        chain.append(str(err))
        err = err.__cause__ or err.__context__
    assert any("corrupted" in text for text in chain)
    api.upload_file(path_or_fileobj=data, path_in_repo="adapter_model.safetensors", repo_id="acme/fragile")
    assert httpx.get(url, timeout=10).content == data  # re-uploading replaced the bad copy


def test_bodies_are_bounded(tmp_path: Path) -> None:
    limits = ServiceLimits(max_json_body=1024, max_commit_body=4096, max_regular_file=512)
    client = TestClient(create_app(tmp_path / "root", None, limits))
    big = client.post("/api/repos/create", content=b"{" + b" " * 5000 + b"}")
    assert big.status_code == 413 and "limit" in big.json()["error"]
    assert client.post("/api/repos/create", json={"name": "r", "organization": "acme"}).status_code == 200
    huge_commit = client.post(
        "/api/models/acme/r/commit/main", content=commit_body(inline("a.txt", b"a" * 5000))
    )
    assert huge_commit.status_code == 413
    big_inline = client.post(
        "/api/models/acme/r/commit/main", content=commit_body(inline("a.txt", b"a" * 1000))
    )
    assert big_inline.status_code == 413 and "a.txt" in big_inline.json()["error"]
    siblings = client.get("/api/models/acme/r").json()["siblings"]
    assert [s["rfilename"] for s in siblings] == [".gitattributes"]  # nothing half-committed
