"""Fixtures for the trainer tests: one torch thread, tiny data files, fast config factories.

`small_data`/`make_config` serve the classification, NER and instruction recipes; `pref_data`/
`pref_config` the preference recipes (reward, DPO, PPO). The plain helpers below them (a stand-in
SFT adapter, counting base copies in memory) are imported as `from tests.trainers.conftest import`.
"""

from __future__ import annotations

import gc
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from hub.bases import BaseInfo
from hub.store import LocalStore
from trainers.sample_data import sample_path

# The shared test machine has 2 cores and several workers; one thread avoids oversubscription
# (it makes tiny CPU training ~5-20x faster there).
torch.set_num_threads(1)

DATA = Path(__file__).resolve().parents[1] / "data" / "trainers"
SAMPLES = Path(__file__).resolve().parents[2] / "trainers" / "sample_data"


@pytest.fixture(scope="session")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    """Small train/eval files cut from the shipped samples (train and eval are disjoint)."""
    root = tmp_path_factory.mktemp("trainer-data")
    cls_lines = sample_path("classification").read_text().splitlines(keepends=True)
    (root / "cls_train.jsonl").write_text("".join(cls_lines[:32]))
    eval_rows = cls_lines[32:]
    labels_seen = {json.loads(line)["label"] for line in cls_lines[:32]}
    (root / "cls_eval.jsonl").write_text(
        "".join([r for r in eval_rows if json.loads(r)["label"] in labels_seen][:12])
    )
    blocks = [b for b in sample_path("ner").read_text().split("\n\n") if b.strip() and "DOCSTART" not in b]
    (root / "ner_train.conll").write_text("\n\n".join(blocks[:24]) + "\n")
    (root / "ner_eval.conll").write_text("\n\n".join(blocks[24:32]) + "\n")
    chat_lines = sample_path("instruction").read_text().splitlines(keepends=True)
    (root / "chat_train.jsonl").write_text("".join(chat_lines[:16]))
    (root / "chat_eval.jsonl").write_text("".join(chat_lines[16:24]))
    return {
        "classification": {"data": root / "cls_train.jsonl", "eval": root / "cls_eval.jsonl"},
        "ner": {"data": root / "ner_train.conll", "eval": root / "ner_eval.conll"},
        "instruction": {"data": root / "chat_train.jsonl", "eval": root / "chat_eval.jsonl"},
    }


@pytest.fixture
def make_config(
    tiny_base: BaseInfo, registry: LocalStore, small_data: dict[str, dict[str, Path]]
) -> Callable[..., Any]:
    """`make_config(task, **overrides)`: a seconds-long run of `task` on the tiny base."""
    import importlib

    def build(task: str, **overrides: Any) -> Any:
        recipe = importlib.import_module(f"trainers.{task}")
        values: dict[str, Any] = {
            "base": tiny_base.name_or_path,
            "data": str(small_data[task]["data"]),
            "eval": str(small_data[task]["eval"]),
            "name": f"test-{task}",
            "max_steps": 3,
            "batch_size": 8,
            "max_length": 48,
            "lr": 1e-3,
            "registry": str(registry.root),
            "progress": False,
            "baseline": False,
            "cpu": True,
        }
        values.update(overrides)
        return recipe.Config(**values)

    return build


@pytest.fixture
def capture_model(monkeypatch: pytest.MonkeyPatch) -> Callable[[Any], dict[str, Any]]:
    """`capture_model(recipe_module)`: records the trained model the recipe hands to export."""

    def install(recipe: Any) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        original = recipe.save_and_register

        def wrapper(model: Any, **kwargs: Any) -> Any:
            seen["model"] = model
            seen["result"] = kwargs["result"]
            return original(model, **kwargs)

        monkeypatch.setattr(recipe, "save_and_register", wrapper)
        return seen

    return install


@pytest.fixture
def reload_stored(tiny_base: BaseInfo) -> Callable[..., Any]:
    """`reload_stored(stored)`: load a registered result with plain transformers/PEFT (no adapterdock
    code for peft and hf-model folders; `load_bottleneck` for bottleneck ones)."""
    from peft import PeftModel
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
    )

    from trainers.methods.bottleneck import load_bottleneck

    classes = {
        "classification": AutoModelForSequenceClassification,
        "ner": AutoModelForTokenClassification,
        "instruction": AutoModelForCausalLM,
    }

    def load(stored: Any) -> Any:
        manifest = stored.manifest
        auto = classes[manifest.task]
        kwargs = {"num_labels": len(manifest.labels)} if manifest.labels else {}
        if manifest.adapter_format == "hf-model":
            return auto.from_pretrained(stored.path).eval()
        base = auto.from_pretrained(tiny_base.path, **kwargs)
        base.config.pad_token_id = 0
        if manifest.adapter_format == "bottleneck":
            return load_bottleneck(base, stored.path).eval()
        return PeftModel.from_pretrained(base, stored.path).eval()

    return load


# ---- preference recipes (reward, DPO, PPO) -------------------------------------------------------


@pytest.fixture(scope="session")
def pref_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Disjoint train/eval files cut from the shipped pairs and prompts."""
    root = tmp_path_factory.mktemp("pref-data")
    pairs = (SAMPLES / "preference_pairs.jsonl").read_text().splitlines(keepends=True)
    prompts = (SAMPLES / "prompts.jsonl").read_text().splitlines(keepends=True)
    files = {
        "pairs": pairs[::2][:32],
        "eval_pairs": pairs[1::2][:8],
        "prompts": prompts[:12],
        "eval_prompts": prompts[12:16],
    }
    for name, lines in files.items():
        (root / f"{name}.jsonl").write_text("".join(lines))
    return {name: root / f"{name}.jsonl" for name in files}


@pytest.fixture
def pref_config(tiny_base: BaseInfo, registry: LocalStore, pref_data: dict[str, Path]) -> Callable[..., Any]:
    """`pref_config(recipe_module, **overrides)`: a seconds-long run on the tiny base."""

    def build(recipe: Any, **overrides: Any) -> Any:
        values: dict[str, Any] = {
            "base": tiny_base.name_or_path,
            "data": str(pref_data["pairs"]),
            "eval": str(pref_data["eval_pairs"]),
            "name": f"test-{recipe.TASK}",
            "max_steps": 3,
            "batch_size": 4,
            "max_length": 48,
            "lr": 2e-3,
            "registry": str(registry.root),
            "progress": False,
            "cpu": True,
        }
        values.update(overrides)
        return recipe.Config(**values)

    return build


def register_sft_adapter(registry: LocalStore, base: BaseInfo, folder: Path, rank: int = 4) -> str:
    """Register a stand-in instruction adapter (seeded LoRA with non-zero B) and return its ref."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.float32)
    config = LoraConfig(
        task_type="CAUSAL_LM", r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"]
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    peft_model.save_pretrained(folder, safe_serialization=True)
    manifest = registry.put(folder, name="sft", task="instruction", method="lora", base=base.spec)
    return manifest.ref


def base_numel(base: BaseInfo) -> int:
    """Number of weights in the base checkpoint (read from the safetensors header only)."""
    total = 0
    for file in sorted(Path(base.path).glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            for key in handle.keys():
                total += math.prod(handle.get_slice(key).get_shape())
    return total


def base_copies_in_memory() -> int:
    """How many Llama backbones (`LlamaModel`) live in this process right now."""
    from transformers.models.llama.modeling_llama import LlamaModel

    gc.collect()
    return sum(1 for obj in gc.get_objects() if type(obj) is LlamaModel)


def non_adapter_numel(model: torch.nn.Module) -> int:
    """Weights of `model` that are not adapter weights, counting shared storage once."""
    seen, total = set(), 0
    for name, param in model.named_parameters():
        if "lora_" in name or "modules_to_save" in name:
            continue
        if param.data_ptr() not in seen:
            seen.add(param.data_ptr())
            total += param.numel()
    return total


def adapter_files(folder: Path) -> set[str]:
    """Names of the files in a registered adapter folder (sub-folders marked with '/')."""
    return {p.name + ("/" if p.is_dir() else "") for p in folder.iterdir()}


def read_json(path: Path) -> Any:
    """The JSON document in `path`."""
    return json.loads(path.read_text())
