"""`HubClient.push` / `pull` and `adapterdock hub push|pull` against a live hub service: byte-for-byte
round trips, immutable `v<N>` tags, refusals (corrupt local files, wrong base, bad tokens, corrupt remote
blobs) that leave nothing behind, and PEFT loading an adapter from the service through HF_ENDPOINT."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from huggingface_hub import HfApi

from hub.bases import BaseInfo
from hub.cli import main as hub_main
from hub.errors import BaseMismatchError, ChecksumMismatchError, HubAuthError, HubError, ManifestError
from hub.manifest import MANIFEST_FILE, BaseSpec
from hub.remote import HubClient, split_repo_revision
from hub.store import LocalStore
from tests.hub.conftest import READER_TOKEN, REPO_ROOT, WRITER_TOKEN, HubProcess

pytestmark = [pytest.mark.network, pytest.mark.usefixtures("hub_online")]


@pytest.fixture
def source(tmp_path: Path, lora_folder: Path, tiny_base: BaseInfo) -> LocalStore:
    """A registry with chat@1 (tagged prod) and chat@2 (other weights)."""
    store = LocalStore(tmp_path / "source")
    store.put(lora_folder, name="chat", task="instruction", method="lora", base=tiny_base.spec,
              metrics={"eval_loss": 0.5}, tags=["prod"])  # fmt: skip
    changed = tmp_path / "changed"
    changed.mkdir()
    for f in lora_folder.iterdir():
        changed.joinpath(f.name).write_bytes(f.read_bytes())
    config = json.loads((changed / "adapter_config.json").read_text())
    (changed / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 16}))
    store.put(changed, name="chat", task="instruction", method="lora", base=tiny_base.spec)
    return store


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name != MANIFEST_FILE}


def leftovers() -> list[str]:
    return [p for p in os.listdir(tempfile.gettempdir()) if p.startswith("adapterdock-")]


def test_push_then_pull_round_trips_byte_for_byte(
    hub_service: HubProcess, source: LocalStore, tiny_base: BaseInfo, tmp_path: Path
) -> None:
    client = HubClient(hub_service.url, WRITER_TOKEN)
    commit = client.push(source, "chat@1", "acme/chat")
    refs = client.api.list_repo_refs("acme/chat")
    assert {t.name: t.target_commit for t in refs.tags} == {"v1": commit, "prod": commit}
    assert sorted(client.api.list_repo_files("acme/chat")) == [
        ".gitattributes", "README.md", "adapter_config.json", "adapter_model.safetensors", MANIFEST_FILE,
    ]  # fmt: skip
    target = LocalStore(tmp_path / "target")
    pulled = HubClient(hub_service.url, READER_TOKEN).pull("acme/chat", "v1", store=target,
                                                           expected_base=tiny_base.spec)  # fmt: skip
    original = source.get("chat@1")
    assert files_of(target.get(pulled.ref).path) == files_of(original.path)
    mine, theirs = pulled.to_dict(), original.manifest.to_dict()
    assert mine.pop("version") == 1 and theirs.pop("version") == 1
    assert mine == theirs


def test_version_tags_never_move(hub_service: HubProcess, source: LocalStore, tmp_path: Path) -> None:
    client = HubClient(hub_service.url, WRITER_TOKEN)
    v1 = client.push(source, "chat@1", "acme/tags")
    v2 = client.push(source, "chat@2", "acme/tags")
    assert v1 != v2
    assert client.push(source, "chat@1", "acme/tags") == v1  # same content again: accepted, nothing moves
    tags = {t.name: t.target_commit for t in client.api.list_repo_refs("acme/tags").tags}
    assert tags == {"v1": v1, "v2": v2, "prod": v1}
    impostor = LocalStore(tmp_path / "impostor")
    impostor.put(source.get("chat@2").path, name="chat", task="instruction", method="lora",
                 base=source.get("chat@2").manifest.base)  # fmt: skip
    with pytest.raises(HubError, match="never move"):
        client.push(impostor, "chat@1", "acme/tags")
    assert {t.name: t.target_commit for t in client.api.list_repo_refs("acme/tags").tags}["v1"] == v1
    pulled = client.pull("acme/tags", "v1", store=LocalStore(tmp_path / "t"), expected_base=None)
    assert pulled.files == source.get("chat@1").manifest.files
    main_config = client.api.hf_hub_download("acme/tags", "adapter_config.json", cache_dir=tmp_path / "c")
    assert json.loads(Path(main_config).read_text())["lora_alpha"] == 16  # main shows the latest push


def test_push_refuses_corrupt_local_files(
    hub_service: HubProcess, source: LocalStore, tmp_path: Path
) -> None:
    weights = source.get("chat@1").path / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatchError, match="adapter_model.safetensors"):
        HubClient(hub_service.url, WRITER_TOKEN).push(source, "chat@1", "acme/never-created")
    with pytest.raises(HubError, match="not found"):
        HubClient(hub_service.url, WRITER_TOKEN).pull("acme/never-created", store=LocalStore(tmp_path / "t"))


def test_pull_refuses_wrong_base_and_leaves_nothing(
    hub_service: HubProcess, source: LocalStore, tmp_path: Path
) -> None:
    client = HubClient(hub_service.url, WRITER_TOKEN)
    client.push(source, "chat@1", "acme/base-check")
    before = leftovers()
    target = LocalStore(tmp_path / "target")
    other = BaseSpec("small", "sha256:" + "0" * 64)
    with pytest.raises(BaseMismatchError, match="trained on base tiny"):
        client.pull("acme/base-check", store=target, expected_base=other)
    assert target.names() == [] and leftovers() == before


def test_pull_without_base_warns(hub_service: HubProcess, source: LocalStore, tmp_path: Path, caplog) -> None:
    client = HubClient(hub_service.url, WRITER_TOKEN)
    client.push(source, "chat@2", "acme/warn")
    with caplog.at_level(logging.WARNING, logger="hub.remote"):
        pulled = client.pull("acme/warn", store=LocalStore(tmp_path / "t"), as_name="team/chat")
    assert pulled.ref == "team/chat@1"
    assert "not checked" in caplog.text


def test_pull_detects_a_corrupt_remote_blob(
    hub_service: HubProcess, source: LocalStore, tmp_path: Path
) -> None:
    client = HubClient(hub_service.url, WRITER_TOKEN)
    client.push(source, "chat@1", "acme/rotten")
    sha = source.get("chat@1").manifest.files["adapter_model.safetensors"].sha256
    blob = hub_service.root / "blobs" / sha[:2] / sha[2:4] / sha
    original = blob.read_bytes()
    try:
        blob.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
        target = LocalStore(tmp_path / "target")
        with pytest.raises(HubError, match="corrupted"):
            client.pull("acme/rotten", store=target)
        assert target.names() == []
    finally:
        blob.write_bytes(original)


def test_tokens_are_checked(hub_service: HubProcess, source: LocalStore, tmp_path: Path) -> None:
    with pytest.raises(HubAuthError, match="401"):
        HubClient(hub_service.url, "hf_bogus").push(source, "chat@1", "acme/auth")
    with pytest.raises(HubAuthError, match="403"):
        HubClient(hub_service.url, READER_TOKEN).push(source, "chat@1", "acme/auth")
    assert HubClient(hub_service.url, WRITER_TOKEN).push(source, "chat@1", "acme/auth", private=True)
    with pytest.raises(HubError, match="not found"):  # issue 20: a private repo answers as a missing one
        HubClient(hub_service.url).pull("acme/auth", store=LocalStore(tmp_path / "t"))


def test_cli_push_and_pull(hub_service: HubProcess, source: LocalStore, tmp_path: Path, capsys) -> None:
    common = ["--endpoint", hub_service.url, "--token", WRITER_TOKEN]
    assert hub_main(["--registry", str(source.root), "push", "chat@prod", "--repo", "acme/cli",
                     "--revision", "dev", *common]) == 0  # fmt: skip
    assert "as v1" in capsys.readouterr().out
    assert HfApi(endpoint=hub_service.url).list_repo_files("acme/cli") == [".gitattributes"]  # main untouched
    target = tmp_path / "target"
    assert hub_main(["--registry", str(target), "pull", "acme/cli@v1", "--as", "cli-chat", "--base", "tiny",
                     *common]) == 0  # fmt: skip
    assert "as cli-chat@1" in capsys.readouterr().out
    assert hub_main(["--registry", str(target), "pull", "acme/cli@v9", *common]) == 2
    assert "no such revision" in capsys.readouterr().err
    assert split_repo_revision("acme/cli@v1") == ("acme/cli", "v1")


@pytest.mark.slow
def test_peft_loads_an_adapter_from_the_service(
    hub_service: HubProcess, peft_adapter: Path, tiny_base: BaseInfo, tmp_path: Path
) -> None:
    """Upload what PEFT's save_pretrained wrote, then `PeftModel.from_pretrained("acme/peft", ...)` in a fresh
    process via HF_ENDPOINT gives the same logits as loading the local folder."""
    api = HfApi(endpoint=hub_service.url, token=WRITER_TOKEN)
    api.create_repo("acme/peft", private=True)
    api.upload_folder(repo_id="acme/peft", folder_path=peft_adapter, commit_message="peft")
    script = """
import json, sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
base_path, local = sys.argv[1], sys.argv[2]
ids = torch.tensor([[1, 40, 41, 42, 43]])
def logits(source):
    base = AutoModelForCausalLM.from_pretrained(base_path)
    model = PeftModel.from_pretrained(base, source).eval()
    with torch.no_grad():
        return model(ids).logits
remote, here = logits("acme/peft"), logits(local)
plain = AutoModelForCausalLM.from_pretrained(base_path)(ids).logits
print(json.dumps({"same": torch.equal(remote, here), "changed": not torch.allclose(remote, plain)}))
"""
    env = {
        **os.environ,
        "HF_ENDPOINT": hub_service.url,
        "HF_TOKEN": READER_TOKEN,
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_XET": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "PYTHONPATH": str(REPO_ROOT),
    }
    env.pop("TRANSFORMERS_OFFLINE", None)
    result = subprocess.run([sys.executable, "-c", script, str(tiny_base.path), str(peft_adapter)], env=env,
                            capture_output=True, text=True, timeout=240)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"same": True, "changed": True}
    cached = list((tmp_path / "hf").rglob("adapter_model.safetensors"))
    digest = hashlib.sha256((peft_adapter / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert cached and hashlib.sha256(cached[0].read_bytes()).hexdigest() == digest


def test_pull_refuses_unsafe_file_names(hub_service: HubProcess, source: LocalStore, tmp_path: Path) -> None:
    """A hostile manifest cannot make pull write outside its temporary folder."""
    manifest = source.get("chat@1").manifest.to_dict()
    manifest["files"]["../../escaped.txt"] = {"sha256": "0" * 64, "size": 1}
    api = HfApi(endpoint=hub_service.url, token=WRITER_TOKEN)
    api.create_repo("acme/hostile")
    api.upload_file(
        path_or_fileobj=json.dumps(manifest).encode(), path_in_repo=MANIFEST_FILE, repo_id="acme/hostile"
    )
    target = LocalStore(tmp_path / "deep" / "target")
    with pytest.raises(ManifestError, match="unsafe file name"):
        HubClient(hub_service.url, WRITER_TOKEN).pull("acme/hostile", store=target)
    assert target.names() == [] and not (tmp_path / "escaped.txt").exists()


def test_server_resolver_follows_a_tag_moved_on_the_hub(
    hub_service: HubProcess, source: LocalStore, tiny_base: BaseInfo, tmp_path: Path
) -> None:
    from server.resolver import Resolver

    client = HubClient(hub_service.url, WRITER_TOKEN)
    v1 = client.push(source, "chat@1", "acme/moving")  # chat@1 is tagged prod: so is v1 on the hub
    assert client.revision_commit("acme/moving", "prod") == v1
    replica = LocalStore(tmp_path / "replica")
    resolver = Resolver(replica, tiny_base, hub=HubClient(hub_service.url, READER_TOKEN), hub_refresh_s=0)
    first = resolver.resolve("acme/moving@prod")
    assert first.key == "acme/moving@1" and first.manifest.files == source.get("chat@1").manifest.files
    source.tag("chat@2", "prod")
    v2 = client.push(source, "chat@2", "acme/moving")  # moves prod on the hub
    assert client.revision_commit("acme/moving", "prod") == v2 != v1
    moved = resolver.resolve("acme/moving@prod")
    assert moved.key == "acme/moving@2" and moved.manifest.files == source.get("chat@2").manifest.files
    assert resolver.resolve("acme/moving@prod").key == "acme/moving@2"  # unchanged since: no new pull
    assert replica.versions("acme/moving") == [1, 2]
