"""The vLLM resolver's logic without vLLM: resolution, checks, refusals, stable ids, the plugin's guard.

The real vLLM CPU build runs the plugin in tests/integration/test_vllm_plugin.py (slow).
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hub.bases import BaseInfo
from hub.errors import (
    AdapterNotFoundError,
    BaseMismatchError,
    ChecksumMismatchError,
    InvalidReferenceError,
    NotServableError,
)
from hub.manifest import BaseSpec
from hub.store import LocalStore
from hub.vllm_plugin import register, resolve_or_none
from hub.vllm_resolver import ResolverSettings, VllmAdapterResolver, stable_lora_id

REPO = Path(__file__).resolve().parents[2]


def _variant(src: Path, out: Path, **config_changes: object) -> Path:
    shutil.copytree(src, out)
    config = json.loads((out / "adapter_config.json").read_text())
    config.update(config_changes)
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


@pytest.fixture
def store(lora_folder: Path, tiny_base: BaseInfo, tmp_path: Path) -> LocalStore:
    """chat@1, chat@2 (= prod), and one adapter for each refusal."""
    store = LocalStore(tmp_path / "registry")
    put = store.put
    spec = tiny_base.spec
    put(lora_folder, name="chat", task="instruction", method="lora", base=spec)
    put(lora_folder, name="chat", task="instruction", method="lora", base=spec, tags=["prod"])
    put(lora_folder, name="cls", task="classification", method="lora", base=spec, labels=["a", "b"])
    put(lora_folder, name="bneck", task="instruction", method="bottleneck", base=spec)
    put(_variant(lora_folder, tmp_path / "dora", use_dora=True), name="dora", task="instruction",
        method="lora", base=spec)  # fmt: skip
    put(
        lora_folder,
        name="foreign",
        task="instruction",
        method="lora",
        base=BaseSpec("other", "sha256:" + "0" * 64),
    )
    head = _variant(lora_folder, tmp_path / "head", modules_to_save=["lm_head"])
    put(head, name="head", task="instruction", method="lora", base=spec)
    return store


@pytest.fixture
def resolver(store: LocalStore) -> VllmAdapterResolver:
    return VllmAdapterResolver(ResolverSettings(registry=store.root))


def test_resolves_versions_and_tags_to_the_immutable_folder(
    resolver: VllmAdapterResolver, store: LocalStore, tiny_base: BaseInfo
) -> None:
    by_tag = resolver.resolve(str(tiny_base.path), "chat@prod")
    assert by_tag.ref == "chat@2" and by_tag.path == store.root / "chat" / "2"
    assert resolver.resolve(str(tiny_base.path), "chat").ref == "chat@2"  # latest
    pinned = resolver.resolve(str(tiny_base.path), "chat@1")
    assert pinned.ref == "chat@1" and pinned.path == store.root / "chat" / "1"
    assert by_tag.lora_int_id == stable_lora_id("chat@2") != pinned.lora_int_id


def test_stable_ids_are_positive_int32_and_collisions_move_on(
    resolver: VllmAdapterResolver, tiny_base: BaseInfo, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = [stable_lora_id(f"name-{i}@{i}") for i in range(200)]
    assert all(1 <= i <= 2**31 - 1 for i in ids) and len(set(ids)) == 200
    assert stable_lora_id("chat@1") == stable_lora_id("chat@1")
    monkeypatch.setattr("hub.vllm_resolver.stable_lora_id", lambda ref: 2**31 - 1)
    first = resolver.resolve(str(tiny_base.path), "chat@1").lora_int_id
    second = resolver.resolve(str(tiny_base.path), "chat@2").lora_int_id
    assert (first, second) == (2**31 - 1, 1)
    assert resolver.resolve(str(tiny_base.path), "chat@1").lora_int_id == first


def test_the_base_can_be_named_by_env_when_vllm_serves_it_by_another_name(
    store: LocalStore, tiny_base: BaseInfo
) -> None:
    env = {"ADAPTERDOCK_REGISTRY": str(store.root), "ADAPTERDOCK_BASE_PATH": str(tiny_base.path)}
    resolver = VllmAdapterResolver(ResolverSettings.from_env(env))
    assert resolver.resolve("org/served-name", "chat@1").ref == "chat@1"


@pytest.mark.parametrize(
    ("ref", "error", "words"),
    [
        ("cls", NotServableError, "classification adapter"),
        ("bneck", NotServableError, "bottleneck adapter"),
        ("dora", NotServableError, "DoRA"),
        ("head", NotServableError, "lm_head"),
        ("foreign", BaseMismatchError, "trained on base other"),
        ("missing", AdapterNotFoundError, "No adapter named 'missing'"),
        ("chat@7", AdapterNotFoundError, "no version 7"),
        ("/etc/passwd", InvalidReferenceError, "Adapter name"),
        ("/tmp", InvalidReferenceError, "Invalid adapter name"),
        ("../chat", InvalidReferenceError, "Invalid adapter name"),
    ],
)
def test_refusals_name_the_reason_and_the_remedy(
    resolver: VllmAdapterResolver, tiny_base: BaseInfo, ref: str, error: type, words: str
) -> None:
    with pytest.raises(error, match=words) as info:
        resolver.resolve(str(tiny_base.path), ref)
    assert info.value.remedy


def test_task_heads_and_bottlenecks_point_at_our_server(
    resolver: VllmAdapterResolver, tiny_base: BaseInfo
) -> None:
    for ref in ("cls", "bneck"):
        with pytest.raises(NotServableError, match="adapterdock serve"):
            resolver.resolve(str(tiny_base.path), ref)


def test_a_changed_file_is_refused(
    resolver: VllmAdapterResolver, store: LocalStore, tiny_base: BaseInfo
) -> None:
    weights = store.root / "chat" / "1" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(ChecksumMismatchError, match="adapter_model.safetensors"):
        resolver.resolve(str(tiny_base.path), "chat@1")


def test_an_unknown_base_says_to_set_the_base_path(resolver: VllmAdapterResolver, tmp_path: Path) -> None:
    with pytest.raises(Exception, match="ADAPTERDOCK_BASE_PATH"):
        resolver.resolve(str(tmp_path / "not-a-model"), "chat@1")


def test_the_plugin_turns_refusals_into_none_with_a_log_line(
    resolver: VllmAdapterResolver, tiny_base: BaseInfo, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="hub")
    assert resolve_or_none(resolver, str(tiny_base.path), "cls") is None
    assert "refused 'cls'" in caplog.text and "adapterdock serve" in caplog.text
    assert resolve_or_none(resolver, str(tiny_base.path), "missing") is None
    assert resolve_or_none(resolver, str(tiny_base.path), "chat@prod").ref == "chat@2"

    class Broken:
        def resolve(self, base: str, name: str) -> None:
            raise RuntimeError("boom")

    assert resolve_or_none(Broken(), "b", "x") is None
    assert "boom" in caplog.text


def test_register_never_raises_without_vllm(caplog: pytest.LogCaptureFixture) -> None:
    pytest.importorskip("hub.vllm_plugin")
    try:
        import vllm  # noqa: F401
    except ImportError:
        register()  # vllm missing: logged, not raised
        assert "not registered" in caplog.text
    else:
        pytest.skip("vllm is importable here; the slow integration test covers registration")


def test_the_plugin_modules_import_no_torch() -> None:
    code = (
        "import sys, hub.vllm_plugin, hub.vllm_resolver, hub.vllm_export, hub.export_cli\n"
        "hub.vllm_plugin.resolve_or_none\n"
        "assert not {'torch', 'transformers', 'vllm'} & set(sys.modules), sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)
