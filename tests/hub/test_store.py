"""The local registry: versions, tags, checksums, atomic and concurrent writes."""

from __future__ import annotations

import json
import multiprocessing
import os
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from hub.durable import write_atomic
from hub.errors import (
    AdapterNotFoundError,
    ChecksumMismatchError,
    CorruptAdapterError,
    InvalidReferenceError,
    ManifestError,
    RegistryError,
)
from hub.manifest import BaseSpec, Manifest
from hub.store import LocalStore

BASE = BaseSpec("tiny", "sha256:" + "0" * 64)


def make_adapter(folder: Path, payload: bytes = b"weights") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": 4, "peft_type": "LORA"}))
    (folder / "adapter_model.safetensors").write_bytes(payload)
    return folder


def put(store: LocalStore, src: Path, name: str = "sent", **kw) -> Manifest:
    args = dict(task="classification", method="lora", base=BASE, labels=["neg", "pos"])
    args.update(kw)
    return store.put(src, name=name, **args)


def test_put_assigns_versions_and_checksums(registry: LocalStore, tmp_path: Path) -> None:
    src = make_adapter(tmp_path / "a")
    first = put(registry, src, metrics={"accuracy": 0.9})
    second = put(registry, src)
    assert (first.version, second.version) == (1, 2)
    stored = registry.get("sent@1")
    assert stored.path == registry.root / "sent" / "1"
    assert stored.manifest.metrics == {"accuracy": 0.9}
    assert set(stored.manifest.files) == {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    assert stored.manifest.files["adapter_model.safetensors"].size == len(b"weights")
    assert stored.manifest.adapter_format == "peft"
    assert stored.manifest.created_at.endswith("Z")
    on_disk = json.loads((stored.path / "manifest.json").read_text())
    for key in ("name", "version", "task", "method", "base", "labels", "metrics", "files", "created_at",
                "trainer", "format_version"):  # fmt: skip
        assert key in on_disk
    assert "sent v1" in (stored.path / "README.md").read_text()


def test_references_tags_and_latest(registry: LocalStore, tmp_path: Path) -> None:
    src = make_adapter(tmp_path / "a")
    put(registry, src)
    put(registry, src, tags=["prod"])
    put(registry, src)
    assert str(registry.resolve("sent")) == "sent@3"
    assert str(registry.resolve("sent@latest")) == "sent@3"
    assert str(registry.resolve("sent@prod")) == "sent@2"
    registry.tag("sent@1", "prod")
    assert str(registry.resolve("sent@prod")) == "sent@1"
    assert registry.tags("sent") == {"prod": 1, "latest": 3}
    with pytest.raises(InvalidReferenceError):
        registry.tag("sent@1", "latest")
    with pytest.raises(AdapterNotFoundError, match="no version 7"):
        registry.resolve("sent@7")
    with pytest.raises(AdapterNotFoundError, match="no tag 'staging'"):
        registry.resolve("sent@staging")
    with pytest.raises(AdapterNotFoundError, match="hub list"):
        registry.resolve("other")


def test_delete_never_reuses_a_version(registry: LocalStore, tmp_path: Path) -> None:
    src = make_adapter(tmp_path / "a")
    put(registry, src)
    put(registry, src, tags=["prod"])
    registry.delete("sent@2")
    assert registry.versions("sent") == [1]
    assert "prod" not in registry.tags("sent")
    assert put(registry, src).version == 3
    registry.delete("sent")
    assert registry.versions("sent") == []
    assert registry.names() == []


def test_list_filters_and_namespaces(registry: LocalStore, tmp_path: Path) -> None:
    src = make_adapter(tmp_path / "a")
    put(registry, src, name="team/sent")
    put(registry, src, name="tagger", task="ner", labels=["O", "B-PER", "I-PER"])
    other = BaseSpec("small", "sha256:" + "1" * 64)
    put(registry, src, name="gen", task="instruction", labels=[], base=other)
    assert registry.names() == ["gen", "tagger", "team/sent"]
    assert [m.name for m in registry.list(task="ner")] == ["tagger"]
    assert [m.name for m in registry.list(base=other.fingerprint)] == ["gen"]
    assert [m.name for m in registry.list(base="tiny")] == ["tagger", "team/sent"]


@pytest.mark.parametrize("bad", ["../../etc/passwd", "/etc/passwd", "..", "a/../../b", "x\x00y", "%2e%2e/x"])
def test_bad_names_never_touch_the_filesystem(registry: LocalStore, tmp_path: Path, bad: str) -> None:
    src = make_adapter(tmp_path / "a")
    with pytest.raises(InvalidReferenceError):
        put(registry, src, name=bad)
    with pytest.raises(InvalidReferenceError):
        registry.get(bad)
    assert not (tmp_path / "etc").exists()
    assert not registry.root.exists() or registry.names() == []


def test_checksum_failure_names_the_file(registry: LocalStore, tmp_path: Path) -> None:
    put(registry, make_adapter(tmp_path / "a", b"0123456789"))
    weights = registry.root / "sent" / "1" / "adapter_model.safetensors"
    weights.write_bytes(b"0123456780")  # same size, one byte flipped
    with pytest.raises(ChecksumMismatchError, match="adapter_model.safetensors") as info:
        registry.get("sent")
    assert info.value.path == str(weights)
    assert registry.get("sent", verify=False).manifest.version == 1
    weights.write_bytes(b"01234")
    with pytest.raises(ChecksumMismatchError, match="5 bytes"):
        registry.verify("sent@1")
    weights.unlink()
    with pytest.raises(ChecksumMismatchError, match="missing"):
        registry.get("sent")


def test_invalid_fields_are_reported_together(registry: LocalStore, tmp_path: Path) -> None:
    src = make_adapter(tmp_path / "a")
    with pytest.raises(ManifestError) as info:
        put(registry, src, task="poetry", method="magic", labels=[])
    assert "task 'poetry'" in str(info.value) and "method 'magic'" in str(info.value)
    assert registry.names() == []


def test_pickles_and_empty_folders_are_refused(registry: LocalStore, tmp_path: Path) -> None:
    src = make_adapter(tmp_path / "a")
    (src / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(CorruptAdapterError, match="safetensors only"):
        put(registry, src)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorruptAdapterError, match="adapter_config.json"):
        put(registry, tmp_path / "empty")
    assert registry.names() == []
    assert not (registry.root / ".staging").exists() or not any((registry.root / ".staging").iterdir())


def test_failed_write_leaves_nothing_visible(registry: LocalStore, tmp_path: Path, monkeypatch) -> None:
    src = make_adapter(tmp_path / "a")
    put(registry, src)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("hub.store.os.rename", crash)
    with pytest.raises(OSError, match="disk full"):
        put(registry, src)
    monkeypatch.undo()
    assert registry.versions("sent") == [1]
    assert list((registry.root / ".staging").iterdir()) == []
    assert registry.get("sent").manifest.version == 1


def test_racing_threads_get_distinct_versions(registry: LocalStore, tmp_path: Path) -> None:
    results: list[int] = []
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            src = make_adapter(tmp_path / f"src{i}", payload=f"weights-{i}".encode())
            results.append(put(registry, src).version)
        except BaseException as exc:  # noqa: BLE001 - surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors
    assert sorted(results) == list(range(1, 13))
    for version in results:  # each version holds exactly one writer's files
        stored = registry.get(f"sent@{version}")
        payload = (stored.path / "adapter_model.safetensors").read_bytes()
        assert payload.startswith(b"weights-")


def _process_put(root: str, src: str, queue) -> None:
    store = LocalStore(root)
    queue.put(put(store, Path(src)).version)


def test_racing_processes_get_distinct_versions(registry: LocalStore, tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = []
    for i in range(6):
        src = make_adapter(tmp_path / f"p{i}", payload=os.urandom(64))
        procs.append(ctx.Process(target=_process_put, args=(str(registry.root), str(src), queue)))
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    versions = sorted(queue.get(timeout=5) for _ in procs)
    assert versions == list(range(1, 7))
    for v in versions:
        registry.verify(f"sent@{v}")


def test_hand_edited_manifest_is_caught(registry: LocalStore, tmp_path: Path) -> None:
    put(registry, make_adapter(tmp_path / "a"))
    manifest_file = registry.root / "sent" / "1" / "manifest.json"
    data = json.loads(manifest_file.read_text())
    data["version"] = 9
    manifest_file.write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="edited by hand"):
        registry.get("sent")
    manifest_file.write_text("{not json")
    with pytest.raises(ManifestError, match="not a readable JSON"):
        registry.get("sent")


def test_put_manifest_can_keep_a_hub_version(registry: LocalStore, tmp_path: Path) -> None:
    """Issue 20: a hub's version N is registered as N, in any order, once; another copy of N is refused."""
    src = make_adapter(tmp_path / "a")
    other = make_adapter(tmp_path / "b", payload=b"other weights")
    first = put(registry, src, name="acme/chat")
    hub_v3 = registry.put_manifest(src, replace(first, version=3), keep_version=True)
    hub_v2 = registry.put_manifest(other, replace(first, version=2), keep_version=True)
    assert (hub_v3.ref, hub_v2.ref) == ("acme/chat@3", "acme/chat@2")
    assert registry.versions("acme/chat") == [1, 2, 3]
    again = registry.put_manifest(other, replace(first, version=2, files=hub_v2.files), keep_version=True)
    assert again.created_at == hub_v2.created_at and registry.versions("acme/chat") == [1, 2, 3]
    with pytest.raises(RegistryError, match="already registered"):
        registry.put_manifest(src, replace(first, version=2, files=hub_v3.files), keep_version=True)
    assert put(registry, src, name="acme/chat").version == 4  # local versions continue after the hub's
    assert list((registry.root / ".staging").iterdir()) == []


def test_new_registry_folders_are_created_durably(tmp_path: Path) -> None:
    root = tmp_path / "a" / "b" / "registry"
    store = LocalStore(root)
    put(store, make_adapter(tmp_path / "src"), name="ns/chat")
    assert store.versions("ns/chat") == [1]
    write_atomic(root / "deep" / "er" / "file.txt", "x")
    assert (root / "deep" / "er" / "file.txt").read_text() == "x"
