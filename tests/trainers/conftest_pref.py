"""Fixtures and helpers for the preference-tuning tests (reward, DPO, PPO).

Imported by name from those test modules (pytest only auto-loads files called conftest.py).
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

SAMPLES = Path(__file__).resolve().parents[2] / "trainers" / "sample_data"


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
    return json.loads(path.read_text())
