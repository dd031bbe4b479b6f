"""`adapterdock export vllm` and `adapterdock hub show --resolve`, through the real entry point."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import pytest

from adapterdock.cli import main as adapterdock
from hub.bases import BaseInfo
from hub.durable import sha256_file
from hub.store import LocalStore


@pytest.fixture
def store(
    lora_folder: Path, tiny_base: BaseInfo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> LocalStore:
    store = LocalStore(tmp_path / "registry")
    monkeypatch.setenv("ADAPTERDOCK_REGISTRY", str(store.root))
    spec = tiny_base.spec
    store.put(lora_folder, name="chat", task="instruction", method="lora", base=spec)
    store.put(lora_folder, name="chat", task="instruction", method="lora", base=spec, tags=["prod"])
    store.put(lora_folder, name="team/bot", task="dpo", method="lora", base=spec)
    store.put(lora_folder, name="cls", task="classification", method="lora", base=spec, labels=["a", "b"])
    return store


def test_show_resolve_prints_the_immutable_reference(
    store: LocalStore, capsys: pytest.CaptureFixture
) -> None:
    assert adapterdock(["hub", "show", "chat@prod", "--resolve"]) == 0
    assert capsys.readouterr().out == "chat@2\n"
    store.tag("chat@1", "prod")
    assert adapterdock(["hub", "show", "chat@prod", "--resolve"]) == 0
    assert capsys.readouterr().out == "chat@1\n"
    assert adapterdock(["hub", "show", "nope@prod", "--resolve"]) == 2
    assert "No adapter named 'nope'" in capsys.readouterr().err


def test_export_writes_peft_folders_and_the_vllm_command(
    store: LocalStore, tiny_base: BaseInfo, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "export"
    assert adapterdock(["export", "vllm", "chat@prod", "chat@1", "team/bot", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    folders = {"chat@2": out / "chat@2", "chat@1": out / "chat@1", "team/bot@1": out / "team__bot@1"}
    for ref, folder in folders.items():
        assert sorted(p.name for p in folder.iterdir()) == ["README.md", "adapter_config.json",
                                                            "adapter_model.safetensors"]  # fmt: skip
        manifest = store.get(ref).manifest
        assert (
            sha256_file(folder / "adapter_model.safetensors")
            == manifest.files["adapter_model.safetensors"].sha256
        )
        assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == "LORA"
    script = (out / "vllm-serve.sh").read_text()
    argv = shlex.split(script.split("\n", 1)[1].replace("\\\n", " "))
    assert argv[:4] == ["vllm", "serve", str(tiny_base.path), "--enable-lora"]
    assert argv[argv.index("--max-loras") + 1] == "3" and argv[argv.index("--max-lora-rank") + 1] == "8"
    modules = [argv[i + 1] for i, a in enumerate(argv) if a == "--lora-modules"]
    assert modules == [f"{ref}={folder.resolve()}" for ref, folder in folders.items()]
    assert "vllm serve" in printed and "wrote chat@2" in printed


def test_export_refuses_what_vllm_cannot_serve_and_writes_nothing(
    store: LocalStore, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "export"
    assert adapterdock(["export", "vllm", "chat@1", "cls", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "cls@1 is a classification adapter" in err and "adapterdock serve" in err
    assert not out.exists()


def test_export_checks_the_base_it_is_told(
    store: LocalStore, tiny_base: BaseInfo, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    other = tmp_path / "other-base"  # same shapes, another config: another fingerprint
    shutil.copytree(tiny_base.path, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-6}))
    assert adapterdock(["export", "vllm", "chat@1", "--out", str(tmp_path / "x"), "--base", str(other)]) == 2
    assert "was trained on base" in capsys.readouterr().err
