"""The hub service against the real huggingface_hub client: repos, uploads (regular + LFS), listing,
downloads (snapshot_download, hf_hub_download, HEAD, ranges), refs and tags, private repos, browsing."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import httpx
import pytest
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from hub.bases import BaseInfo
from hub.store import LocalStore
from tests.hub.conftest import OTHER_TOKEN, READER_TOKEN, WRITER_TOKEN, HubProcess

pytestmark = [pytest.mark.network, pytest.mark.usefixtures("hub_online")]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def uploaded(hub_online: None, hub_service: HubProcess, lora_folder: Path) -> dict:
    """acme/lora-a with the LoRA folder uploaded in one commit."""
    api = HfApi(endpoint=hub_service.url, token=WRITER_TOKEN)
    api.create_repo("acme/lora-a")
    info = api.upload_folder(repo_id="acme/lora-a", folder_path=lora_folder, commit_message="add adapter")
    return {"api": api, "commit": info.oid}


def test_upload_then_list_and_info(uploaded: dict, lora_folder: Path) -> None:
    api: HfApi = uploaded["api"]
    assert sorted(api.list_repo_files("acme/lora-a")) == [
        ".gitattributes",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    info = api.model_info("acme/lora-a", files_metadata=True)
    assert info.sha == uploaded["commit"] and info.private is False
    siblings = {s.rfilename: s for s in info.siblings}
    weights = siblings["adapter_model.safetensors"]
    assert weights.lfs is not None and weights.lfs.sha256 == sha256(lora_folder / "adapter_model.safetensors")
    assert siblings["adapter_config.json"].lfs is None  # small text goes the regular way
    assert siblings["adapter_config.json"].size == (lora_folder / "adapter_config.json").stat().st_size
    tree = {f.path: f for f in api.list_repo_tree("acme/lora-a", recursive=True)}
    assert (
        tree["adapter_model.safetensors"].lfs.size
        == (lora_folder / "adapter_model.safetensors").stat().st_size
    )


def test_snapshot_and_file_download_are_byte_identical(
    uploaded: dict, hub_service: HubProcess, lora_folder: Path, tmp_path: Path
) -> None:
    folder = Path(snapshot_download("acme/lora-a", endpoint=hub_service.url, cache_dir=tmp_path / "c1"))
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (folder / name).read_bytes() == (lora_folder / name).read_bytes()
    path = hf_hub_download(
        "acme/lora-a", "adapter_model.safetensors", revision=uploaded["commit"], endpoint=hub_service.url,
        cache_dir=tmp_path / "c2", token=READER_TOKEN,
    )  # fmt: skip
    assert sha256(Path(path)) == sha256(lora_folder / "adapter_model.safetensors")


def test_resolve_headers_head_and_ranges(uploaded: dict, hub_service: HubProcess, lora_folder: Path) -> None:
    data = (lora_folder / "adapter_model.safetensors").read_bytes()
    url = f"{hub_service.url}/acme/lora-a/resolve/main/adapter_model.safetensors"
    head = httpx.head(url, timeout=10)
    assert head.status_code == 200
    assert head.headers["etag"] == f'"{hashlib.sha256(data).hexdigest()}"'
    assert head.headers["x-linked-etag"] == head.headers["etag"]
    assert head.headers["x-linked-size"] == str(len(data)) == head.headers["content-length"]
    assert head.headers["x-repo-commit"] == uploaded["commit"]
    assert "xet" not in " ".join(head.headers.keys()).lower()
    part = httpx.get(url, headers={"Range": "bytes=10-19"}, timeout=10)
    assert part.status_code == 206 and part.content == data[10:20]
    assert part.headers["content-range"] == f"bytes 10-19/{len(data)}"
    tail = httpx.get(url, headers={"Range": "bytes=-7"}, timeout=10)
    assert tail.status_code == 206 and tail.content == data[-7:]
    bad = httpx.get(url, headers={"Range": f"bytes={len(data) + 5}-"}, timeout=10)
    assert bad.status_code == 416 and bad.headers["content-range"] == f"bytes */{len(data)}"
    config = httpx.head(f"{hub_service.url}/acme/lora-a/resolve/main/adapter_config.json", timeout=10)
    raw = (lora_folder / "adapter_config.json").read_bytes()
    git_oid = hashlib.sha1(b"blob %d\0" % len(raw) + raw).hexdigest()
    assert config.headers["etag"] == f'"{git_oid}"' and "x-linked-etag" not in config.headers


def test_missing_things_map_to_the_clients_errors(
    uploaded: dict, hub_service: HubProcess, tmp_path: Path
) -> None:
    kwargs = {"endpoint": hub_service.url, "cache_dir": tmp_path}
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download("acme/lora-a", "nope.json", **kwargs)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("acme/lora-a", "adapter_config.json", revision="no-such-branch", **kwargs)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("acme/missing", "adapter_config.json", **kwargs)
    missing = httpx.head(f"{hub_service.url}/acme/lora-a/resolve/main/nope.json", timeout=10)
    assert missing.status_code == 404 and missing.headers["x-error-code"] == "EntryNotFound"
    assert missing.headers["x-repo-commit"] == uploaded["commit"]


def test_tags_branches_and_immutable_history(uploaded: dict, hub_service: HubProcess, tmp_path: Path) -> None:
    api: HfApi = uploaded["api"]
    first = uploaded["commit"]
    api.create_tag("acme/lora-a", tag="v1", revision=first)
    with pytest.raises(HfHubHTTPError) as info:
        api.create_tag("acme/lora-a", tag="v1")
    assert info.value.response.status_code == 409
    api.create_branch("acme/lora-a", branch="dev")
    api.create_commit(
        "acme/lora-a",
        operations=[
            CommitOperationAdd("notes/readme.txt", b"dev notes\n"),
            CommitOperationDelete("adapter_config.json"),
        ],
        commit_message="dev work",
        revision="dev",
    )
    refs = api.list_repo_refs("acme/lora-a")
    assert {t.name: t.target_commit for t in refs.tags} == {"v1": first}
    branches = {b.name: b.target_commit for b in refs.branches}
    assert branches["main"] == first and branches["dev"] != first
    assert "adapter_config.json" not in api.list_repo_files("acme/lora-a", revision="dev")
    assert "adapter_config.json" in api.list_repo_files("acme/lora-a", revision="v1")
    folders = [f.path for f in api.list_repo_tree("acme/lora-a", revision="dev") if not hasattr(f, "size")]
    assert folders == ["notes"]
    path = hf_hub_download("acme/lora-a", "adapter_config.json", revision="v1", endpoint=hub_service.url,
                           cache_dir=tmp_path)  # fmt: skip
    assert json.loads(Path(path).read_text())["peft_type"] == "LORA"
    commits = api.list_repo_commits("acme/lora-a", revision="dev")
    assert [c.title for c in commits] == ["dev work", "add adapter", "initial commit"]


def test_private_repo_needs_a_token_with_rights(hub_service: HubProcess, tmp_path: Path) -> None:
    writer = HfApi(endpoint=hub_service.url, token=WRITER_TOKEN)
    writer.create_repo("acme/secret", private=True)
    writer.upload_file(path_or_fileobj=b"{}", path_in_repo="config.json", repo_id="acme/secret")
    # issue 20: a reader without rights gets the answer a missing repo gets (404 RepoNotFound)
    with pytest.raises(HfHubHTTPError) as info:
        HfApi(endpoint=hub_service.url, token=False).model_info("acme/secret")
    assert info.value.response.status_code == 404 and "not found" in str(info.value)
    assert HfApi(endpoint=hub_service.url, token=READER_TOKEN).model_info("acme/secret").private is True
    with pytest.raises(HfHubHTTPError) as info:
        HfApi(endpoint=hub_service.url, token=OTHER_TOKEN).model_info("acme/secret")
    assert info.value.response.status_code == 404
    anonymous = httpx.get(f"{hub_service.url}/acme/secret/resolve/main/config.json", timeout=10)
    assert anonymous.status_code == 404
    listed = httpx.get(f"{hub_service.url}/api/models", timeout=10).json()
    assert "acme/secret" not in [m["id"] for m in listed]


def test_browse_lists_adapters_by_task_and_base(
    hub_service: HubProcess, lora_folder: Path, tiny_base: BaseInfo, tmp_path: Path
) -> None:
    store = LocalStore(tmp_path / "reg")
    manifest = store.put(
        lora_folder, name="chat", task="instruction", method="lora", base=tiny_base.spec,
        metrics={"eval_loss": 1.25}, description="Chats politely.",
    )  # fmt: skip
    api = HfApi(endpoint=hub_service.url, token=WRITER_TOKEN)
    api.create_repo("acme/chat-browse")
    api.upload_folder(repo_id="acme/chat-browse", folder_path=store.get("chat").path, commit_message="push")
    found = httpx.get(f"{hub_service.url}/api/adapters", params={"task": "instruction"}, timeout=10).json()
    entry = next(a for a in found if a["repo_id"] == "acme/chat-browse")
    assert entry["name"] == "chat" and entry["version"] == manifest.version
    assert entry["base"]["fingerprint"] == tiny_base.fingerprint and entry["metrics"] == {"eval_loss": 1.25}
    by_base = httpx.get(f"{hub_service.url}/api/adapters", params={"base": tiny_base.fingerprint}, timeout=10)
    assert "acme/chat-browse" in [a["repo_id"] for a in by_base.json()]
    none = httpx.get(f"{hub_service.url}/api/adapters", params={"task": "ner"}, timeout=10).json()
    assert "acme/chat-browse" not in [a["repo_id"] for a in none]
    page = httpx.get(hub_service.url + "/", timeout=10)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "acme/chat-browse" in page.text and "Chats politely." in page.text
    info = api.model_info("acme/chat-browse")
    assert {"adapterdock", "instruction", "lora"} <= set(info.tags)


def test_unicode_and_nested_paths_round_trip(hub_service: HubProcess, tmp_path: Path) -> None:
    api = HfApi(endpoint=hub_service.url, token=WRITER_TOKEN)
    api.create_repo("acme/unicode")
    api.upload_file(
        path_or_fileobj="é".encode(), path_in_repo="données/modèle 1.json", repo_id="acme/unicode"
    )
    path = hf_hub_download(
        "acme/unicode", "données/modèle 1.json", endpoint=hub_service.url, cache_dir=tmp_path
    )
    assert Path(path).read_text(encoding="utf-8") == "é"
    assert [f.path for f in api.list_repo_tree("acme/unicode", path_in_repo="données")] == [
        "données/modèle 1.json"
    ]
