"""`adapterdock base` and `adapterdock hub` through their real entry points."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from adapterdock.cli import main as adapterdock
from hub.bases import BaseInfo
from hub.store import LocalStore


@pytest.fixture(scope="module")
def peft_folder(tiny_base: BaseInfo, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter written by a plain PEFT script, as a user would bring it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_base.path)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    out = tmp_path_factory.mktemp("peft") / "lora"
    get_peft_model(model, config).save_pretrained(out)
    return out


def test_top_level_help_lists_groups(capsys) -> None:
    assert adapterdock(["--help"]) == 0
    out = capsys.readouterr().out
    for group in ("base", "train", "hub", "serve"):
        assert group in out


@pytest.mark.parametrize("argv", [["base", "--help"], ["hub", "--help"], ["hub", "import", "--help"]])
def test_group_help_has_an_example(argv: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as info:
        adapterdock(argv)
    assert info.value.code == 0
    assert "example:" in capsys.readouterr().out


def test_base_show_and_create(tiny_base: BaseInfo, tmp_path: Path, capsys) -> None:
    assert adapterdock(["base", "show", "tiny"]) == 0
    out = capsys.readouterr().out
    assert tiny_base.fingerprint in out and "LlamaForCausalLM" in out
    assert adapterdock(["base", "create", "tiny", "--out", str(tmp_path / "t")]) == 0
    assert (tmp_path / "t" / "tokenizer.json").is_file()


def test_import_list_tag_rm(peft_folder: Path, tiny_base: BaseInfo, tmp_path: Path, capsys) -> None:
    reg = str(tmp_path / "reg")
    args = ["hub", "--registry", reg]
    assert adapterdock([*args, "import", str(peft_folder), "--name", "chat", "--task", "instruction",
                        "--base", "tiny"]) == 0  # fmt: skip
    assert "registered chat@1" in capsys.readouterr().out
    stored = LocalStore(reg).get("chat")
    assert stored.manifest.base.fingerprint == tiny_base.fingerprint
    assert stored.manifest.adapter_format == "peft"
    assert adapterdock([*args, "tag", "chat@1", "prod"]) == 0
    assert adapterdock([*args, "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert [m["name"] for m in listed] == ["chat"]
    assert adapterdock([*args, "show", "chat@prod"]) == 0
    assert '"task": "instruction"' in capsys.readouterr().out
    assert adapterdock([*args, "rm", "chat@1"]) == 0
    assert adapterdock([*args, "show", "chat"]) == 2
    assert "No adapter named 'chat'" in capsys.readouterr().err


@pytest.mark.parametrize("place", ["before", "after"])
def test_registry_goes_before_or_after_the_command(
    place: str, peft_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setenv("ADAPTERDOCK_REGISTRY", str(tmp_path / "default"))  # must stay unused
    reg = str(tmp_path / "reg")

    def hub(*argv: str) -> int:
        where = ["--registry", reg]
        return adapterdock(["hub", *where, *argv] if place == "before" else ["hub", *argv, *where])

    assert hub("import", str(peft_folder), "--name", "chat", "--task", "instruction", "--base", "tiny") == 0
    assert hub("tag", "chat@1", "prod") == 0
    capsys.readouterr()
    assert hub("list") == 0 and "chat@1" in capsys.readouterr().out
    assert hub("show", "chat@prod", "--resolve") == 0
    assert LocalStore(reg).versions("chat") == [1]
    assert not (tmp_path / "default").exists()


def test_import_refuses_an_adapter_for_another_base(peft_folder: Path, tmp_path: Path, capsys) -> None:
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "adapter_config.json").write_text((peft_folder / "adapter_config.json").read_text())
    from safetensors.numpy import load_file, save_file

    tensors = load_file(peft_folder / "adapter_model.safetensors")
    import numpy as np

    save_file({k: np.zeros((v.shape[0], v.shape[1] * 2), v.dtype) if "lora_A" in k else v
               for k, v in tensors.items()}, str(wrong / "adapter_model.safetensors"))  # fmt: skip
    code = adapterdock(["hub", "--registry", str(tmp_path / "reg"), "import", str(wrong), "--name", "w",
                        "--task", "instruction", "--base", "tiny"])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "does not fit base" in err and "lora_A" in err
    assert LocalStore(tmp_path / "reg").names() == []


def test_python_dash_m_hub_works(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "hub", "--registry", str(tmp_path), "list"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 0 and "no adapters" in proc.stdout


def test_import_reads_the_method_off_the_folder_and_refuses_a_contradiction(
    tiny_base: BaseInfo, tmp_path: Path, capsys
) -> None:
    """A DoRA folder (use_dora) registers as dora, not as the plain LoRA a server would then serve it as;
    --method may refine it (qdora: trained on a 4-bit base) but not contradict it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_base.path)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True, task_type="CAUSAL_LM")
    folder = tmp_path / "dora"
    get_peft_model(model, config).save_pretrained(folder)
    args = ["hub", "--registry", str(tmp_path / "reg"), "import", str(folder), "--task", "instruction",
            "--base", "tiny"]  # fmt: skip
    assert adapterdock([*args, "--name", "d"]) == 0
    assert adapterdock([*args, "--name", "q", "--method", "qdora"]) == 0
    assert adapterdock([*args, "--name", "wrong", "--method", "lora"]) == 2
    err = capsys.readouterr().err
    assert "--method lora does not match the folder, which holds a dora adapter" in err
    assert "--method dora or qdora" in err
    store = LocalStore(tmp_path / "reg")
    assert (store.get("d").manifest.method, store.get("q").manifest.method) == ("dora", "qdora")
    assert "wrong" not in store.names()


def test_list_shows_traffic_splits(peft_folder: Path, tmp_path: Path, capsys) -> None:
    args = ["hub", "--registry", str(tmp_path / "reg")]
    for _ in range(2):
        assert adapterdock([*args, "import", str(peft_folder), "--name", "chat", "--task", "instruction",
                            "--base", "tiny"]) == 0  # fmt: skip
    assert adapterdock([*args, "route", "chat", "prod", "--split", "1=90,2=10"]) == 0
    capsys.readouterr()
    assert adapterdock([*args, "list"]) == 0
    assert "chat@prod -> chat@1 90%, chat@2 10% (split 1=90,2=10, sticky per user)" in capsys.readouterr().out
