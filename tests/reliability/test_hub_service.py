"""The hub service (`python -m hub.service`, a real subprocess) under hostile tokens and content: namespaces
own their repos, tags never move, one malformed repo never breaks the listings, private repos answer as
missing ones, bodies are read only after the token is checked and are bounded, LFS signatures take any bytes,
unreferenced blobs are collected, and new folders are fsynced (the last in-process, over the real storage).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from hub.bases import BaseInfo
from hub.remote import HubClient
from hub.store import LocalStore
from tests.hub.conftest import REPO_ROOT, HubProcess, start_hub
from tests.reliability.conftest import lora_variants

pytestmark = [pytest.mark.slow, pytest.mark.network]

ALICE = "hf_svc_alice_6161"  # write acme/*
BOB = "hf_svc_bob_6262"  # write other/*, and acme-ish globs an attacker would try (literal namespaces)
READER = "hf_svc_reader_6363"
TOKENS = f"""{ALICE}  write  acme/*        alice
{BOB}    write  other/*,acmecorp/*,Acme/*,ACME/*  bob
{READER} read   *             ci
"""


def bearer(token: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"} if token else {}


def commit_body(*ops: dict, summary: str = "test") -> bytes:
    header = {"key": "header", "value": {"summary": summary, "description": ""}}
    return b"".join(json.dumps(op).encode() + b"\n" for op in (header, *ops))


def inline(path: str, data: bytes) -> dict:
    content = base64.b64encode(data).decode()
    return {"key": "file", "value": {"path": path, "content": content, "encoding": "base64"}}


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    folder = tmp_path_factory.mktemp("svc-hub")
    (folder / "tokens.txt").write_text(TOKENS)
    process = start_hub(folder / "root", folder / "tokens.txt")
    yield process
    process.stop()


@pytest.fixture(scope="module")
def adapter(tiny_base: BaseInfo, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA for the tiny base, saved by PEFT."""
    return lora_variants(tiny_base, tmp_path_factory.mktemp("svc-adapter"), ["a"])["a"]


@pytest.fixture(scope="module")
def http(hub: HubProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=hub.url, timeout=30) as client:
        yield client


def create(http: httpx.Client, repo: str, token: str, private: bool = False) -> None:
    namespace, name = repo.split("/")
    r = http.post("/api/repos/create", headers=bearer(token),
                  json={"name": name, "organization": namespace, "private": private})  # fmt: skip
    assert r.status_code == 200, r.text


def put(http: httpx.Client, repo: str, token: str, path: str, data: bytes, branch: str = "main") -> str:
    r = http.post(f"/api/models/{repo}/commit/{branch}", headers=bearer(token),
                  content=commit_body(inline(path, data)))  # fmt: skip
    assert r.status_code == 200, r.text
    return r.json()["commitOid"]


# ---- ownership ---------------------------------------------------------------------------------------
def test_a_namespace_owns_its_repos(hub: HubProcess, http: httpx.Client, tmp_path: Path):
    create(http, "acme/owned", ALICE, private=True)
    head = put(http, "acme/owned", ALICE, "a.txt", b"alice's")
    attempts = [
        ("POST", "/api/models/acme/owned/commit/main", {"content": commit_body(inline("a.txt", b"bob's"))}),
        ("PUT", "/api/models/acme/owned/settings", {"json": {"private": False}}),
        ("DELETE", "/api/repos/delete", {"json": {"name": "owned", "organization": "acme"}}),
        ("POST", "/api/models/acme/owned/tag/main", {"json": {"tag": "bobs"}}),
        ("POST", "/api/models/acme/owned/branch/bob", {"json": {}}),
        ("POST", "/acme/owned.git/info/lfs/objects/batch", {"json": {"operation": "upload", "objects": []}}),
    ]
    for method, path, kwargs in attempts:
        for token in (BOB, READER):
            r = http.request(method, path, headers=bearer(token), **kwargs)
            assert r.status_code == 403, (method, path, token, r.text)
    info = http.get("/api/models/acme/owned", headers=bearer(ALICE)).json()
    assert info["sha"] == head and info["private"] is True
    # bob's `acmecorp/*` is its own namespace, not a way into acme's; `Acme/*` cannot shadow acme's repos
    for look_alike in ("Acme/owned", "ACME/new"):
        namespace, name = look_alike.split("/")
        spec = {"name": name, "organization": namespace}
        r = http.post("/api/repos/create", headers=bearer(BOB), json=spec)
        assert r.status_code == 409 and "ignore case" in r.json()["error"], r.text
    create(http, "acmecorp/x", BOB)
    assert http.post("/api/models/acmecorp/x/commit/main", headers=bearer(ALICE),
                     content=commit_body(inline("a", b"a"))).status_code == 403  # fmt: skip
    # a token file whose write glob reaches across namespaces is refused when the service starts
    bad = tmp_path / "tokens.txt"
    bad.write_text(f"{ALICE} write acme/* alice\nhf_svc_mallory_1 write ac*/* mallory\nhf_m2 write */x eve\n")
    with pytest.raises(RuntimeError, match="could reach into other namespaces") as info:
        start_hub(tmp_path / "root", bad)
    assert "ac*/*" in str(info.value) and "*/x" in str(info.value)


def test_tags_and_branches_share_one_namespace(http: httpx.Client):
    create(http, "acme/tagged", ALICE)
    v1 = put(http, "acme/tagged", ALICE, "w.txt", b"one")
    assert http.post("/api/models/acme/tagged/tag/main", headers=bearer(ALICE),
                     json={"tag": "v1"}).status_code == 200  # fmt: skip
    put(http, "acme/tagged", ALICE, "w.txt", b"two")
    shadow = http.post("/api/models/acme/tagged/branch/v1", headers=bearer(ALICE), json={})
    assert shadow.status_code == 409 and "one namespace" in shadow.json()["error"], shadow.text
    tag_over_branch = http.post(
        "/api/models/acme/tagged/tag/main", headers=bearer(ALICE), json={"tag": "main"}
    )
    assert tag_over_branch.status_code == 409
    moved = http.post("/api/models/acme/tagged/commit/v1", headers=bearer(ALICE),
                      content=commit_body(inline("w.txt", b"evil")))  # fmt: skip
    assert moved.status_code == 404
    deleted = http.delete("/api/models/acme/tagged/tag/v1", headers=bearer(ALICE))
    assert deleted.status_code == 409 and "never move" in deleted.json()["error"]
    assert http.get("/api/models/acme/tagged/revision/v1").json()["sha"] == v1
    assert http.get("/acme/tagged/resolve/v1/w.txt").content == b"one"


# ---- malformed repos -------------------------------------------------------------------------------
BOMB = (
    "---\na0: &a0 [x, x, x, x, x, x, x, x, x]\n"
    + "".join(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 10))
    + "tags: *a9\nlibrary_name: *a9\n---\n# bomb\n"
)
"""9^10 list elements once expanded (aliases share one object until something serializes them)."""


def test_one_malformed_repo_never_breaks_the_listings(
    hub: HubProcess,
    http: httpx.Client,
    hub_online: None,
    adapter: Path,
    tiny_base: BaseInfo,
    tmp_path: Path,
):
    store = LocalStore(tmp_path / "reg")
    store.put(adapter, name="good", task="instruction", method="lora", base=tiny_base.spec)
    HubClient(hub.url, ALICE).push(store, "good@1", "acme/good")
    manifest = store.get("good@1").manifest.to_dict()
    hostile = {
        "acme/nan-metrics": json.dumps({**manifest, "metrics": {"loss": float("nan")}}).encode(),
        "acme/bad-size": json.dumps({**manifest, "files": {"a": {"sha256": "0" * 64, "size": [1]}}}).encode(),
        "acme/not-json": b"{not json",
        "acme/a-list": b"[1, 2]",
    }
    for repo, data in hostile.items():
        create(http, repo, ALICE)
        put(http, repo, ALICE, "manifest.json", data)
    create(http, "acme/bomb", ALICE)
    put(http, "acme/bomb", ALICE, "manifest.json", json.dumps(manifest).encode())
    put(http, "acme/bomb", ALICE, "README.md", BOMB.encode())
    started = time.monotonic()
    listing = http.get("/api/adapters")
    assert listing.status_code == 200, listing.text
    names = {a["repo_id"] for a in listing.json()}
    assert {"acme/good", "acme/bomb"} <= names and not names & set(hostile)
    page = http.get("/")
    assert page.status_code == 200 and "acme/good" in page.text
    info = http.get("/api/models/acme/bomb")
    assert info.status_code == 200 and info.json()["cardData"] is None
    assert time.monotonic() - started < 20
    assert (
        "skipping repo acme/nan-metrics" in hub.log.read_text() or "invalid manifest" in hub.log.read_text()
    )
    assert http.post("/api/validate-yaml", json={"content": BOMB}).status_code == 400


# ---- private repos -----------------------------------------------------------------------------------
def test_a_private_repo_answers_as_a_missing_one(http: httpx.Client):
    create(http, "acme/hidden", ALICE, private=True)
    put(http, "acme/hidden", ALICE, "a.txt", b"secret")
    api = "/api/models/acme/{}"
    paths = [api, api + "/revision/main", api + "/refs", api + "/tree/main", api + "/commits/main",
             "/acme/{}/resolve/main/a.txt"]  # fmt: skip
    for token in (None, BOB):
        for path in paths:
            hidden = http.get(path.format("hidden"), headers=bearer(token))
            missing = http.get(path.format("nothing-here"), headers=bearer(token))
            assert hidden.status_code == missing.status_code == 404, (path, token, hidden.text)
            assert hidden.headers.get("x-error-code") == missing.headers.get("x-error-code") == "RepoNotFound"
            assert hidden.json()["error"].replace("hidden", "X") == missing.json()["error"].replace(
                "nothing-here", "X"
            )
    for token in (None, BOB):  # paths-info reads its body only once the repo may be read
        url = "/api/models/acme/hidden/paths-info/main"
        r = http.post(url, headers=bearer(token), content=b"x" * (3 << 20))
        assert r.status_code == 404 and r.headers.get("x-error-code") == "RepoNotFound", r.text
    listed = http.post(url, headers=bearer(READER), content=b"paths=a.txt")
    assert [e["path"] for e in listed.json()] == ["a.txt"]
    assert http.get("/api/models/acme/hidden", headers=bearer(READER)).status_code == 200


# ---- limits --------------------------------------------------------------------------------------------
def test_bodies_are_read_after_the_token_and_bounded(http: httpx.Client):
    create(http, "acme/limits", ALICE)
    huge = b"x" * (3 * 1024 * 1024)  # over the 2 MiB JSON limit, and not JSON
    for path in ("/api/models/acme/limits/tag/main", "/api/models/acme/limits/preupload/main",
                 "/acme/limits.git/info/lfs/objects/batch", "/api/repos/create"):  # fmt: skip
        assert http.post(path, content=huge, headers=bearer(READER)).status_code == 403, path
        assert http.post(path, content=b"{not json").status_code == 401, path
    assert (
        http.post("/api/models/acme/limits/tag/main", content=huge, headers=bearer(ALICE)).status_code == 413
    )
    many = [{"key": "deletedFile", "value": {"path": f"f{i}"}} for i in range(1001)]
    r = http.post("/api/models/acme/limits/commit/main", headers=bearer(ALICE), content=commit_body(*many))
    assert r.status_code == 413 and "1000 operations" in r.json()["error"]
    oid = hashlib.sha256(b"z").hexdigest()
    for sig in ("é", "\x00", "%ff", "0" * 64, "ℌ" * 64):
        r = http.put(f"/api/lfs/upload/acme/limits/{oid}", params={"size": 1, "expires": 2**40, "sig": sig},
                     content=b"z")  # fmt: skip
        assert r.status_code == 403 and "signature" in r.json()["error"], (sig, r.text)


# ---- garbage collection --------------------------------------------------------------------------------
def upload_lfs(http: httpx.Client, repo: str, data: bytes) -> str:
    oid = hashlib.sha256(data).hexdigest()
    batch = http.post(f"/{repo}.git/info/lfs/objects/batch", headers=bearer(ALICE),
                      json={"operation": "upload", "objects": [{"oid": oid, "size": len(data)}]})  # fmt: skip
    href = batch.json()["objects"][0]["actions"]["upload"]["href"]
    assert httpx.put(href, content=data, timeout=30).status_code == 200
    return oid


def test_unreferenced_blobs_are_collected(hub: HubProcess, http: httpx.Client):
    def blob(sha: str) -> Path:
        return hub.root / "blobs" / sha[:2] / sha[2:4] / sha

    create(http, "acme/doomed", ALICE)
    create(http, "acme/keeper", ALICE)
    weights, shared = os.urandom(4096), os.urandom(4096)
    kept_sha = upload_lfs(http, "acme/keeper", shared)
    doomed_sha = upload_lfs(http, "acme/doomed", weights)
    upload_lfs(http, "acme/doomed", shared)
    for repo, sha, data in (("acme/doomed", doomed_sha, weights), ("acme/doomed", kept_sha, shared),
                            ("acme/keeper", kept_sha, shared)):  # fmt: skip
        op = {"key": "lfsFile", "value": {"path": f"{sha[:8]}.safetensors", "algo": "sha256", "oid": sha,
                                          "size": len(data)}}  # fmt: skip
        assert http.post(f"/api/models/{repo}/commit/main", headers=bearer(ALICE),
                         content=commit_body(op)).status_code == 200  # fmt: skip
    assert blob(doomed_sha).is_file() and blob(kept_sha).is_file()
    r = http.request("DELETE", "/api/repos/delete", headers=bearer(ALICE),
                     json={"name": "doomed", "organization": "acme"})  # fmt: skip
    assert r.status_code == 200, r.text
    assert not blob(doomed_sha).exists(), "the deleted repo's own blob stayed"
    assert http.get("/acme/keeper/resolve/main/" + f"{kept_sha[:8]}.safetensors").content == shared
    # an upload whose commit never came: kept within the grace period, collected by `hub gc` after it
    orphan = upload_lfs(http, "acme/keeper", b"orphan" * 100)
    cli = [sys.executable, "-m", "hub", "gc", "--root", str(hub.root)]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    kept = subprocess.run(cli, capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=120)
    assert kept.returncode == 0, kept.stderr
    assert blob(orphan).is_file() and blob(kept_sha).is_file()
    http.post("/api/models/acme/keeper/commit/main", headers=bearer(ALICE),
              content=commit_body(inline("note.txt", b"n")))  # fmt: skip
    done = subprocess.run([*cli, "--grace", "0"], capture_output=True, text=True, cwd=REPO_ROOT, env=env,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0 and "removed" in done.stdout, done.stderr
    assert not blob(orphan).exists(), "an upload never committed outlived `hub gc --grace 0`"
    assert blob(kept_sha).is_file() and http.get("/acme/keeper/resolve/main/note.txt").content == b"n"


# ---- durability ----------------------------------------------------------------------------------------
@pytest.fixture
def fsynced(monkeypatch: pytest.MonkeyPatch) -> set[int]:
    """Inodes of the folders fsynced from here on (`os.fsync` on a directory fd)."""
    seen: set[int] = set()
    real = os.fsync

    def spy(fd: int) -> None:
        st = os.fstat(fd)
        if os.path.stat.S_ISDIR(st.st_mode):
            seen.add(st.st_ino)
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    return seen


def test_new_folders_are_fsynced_into_their_parents(
    fsynced: set[int], tmp_path: Path, adapter: Path, tiny_base: BaseInfo
):
    from hub.service.storage import Storage

    storage = Storage(tmp_path / "svc")
    fsynced.clear()
    sha, _ = storage.put_bytes(b"a blob in new folders")
    aa = tmp_path / "svc" / "blobs" / sha[:2]
    for folder in (aa.parent, aa, aa / sha[2:4]):  # blobs/ holds aa/, aa/ holds bb/, bb/ holds the blob
        assert folder.stat().st_ino in fsynced, folder
    store = LocalStore(tmp_path / "fresh" / "registry")
    fsynced.clear()
    store.put(adapter, name="ns/chat", task="instruction", method="lora", base=tiny_base.spec)
    root = store.root
    for folder in (root.parent, root, root / "ns", root / "ns" / "chat"):
        assert folder.stat().st_ino in fsynced, folder
