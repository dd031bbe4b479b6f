"""Fixtures for the trainer tests: one torch thread, tiny data files, and a fast config factory."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from hub.bases import BaseInfo
from hub.store import LocalStore
from trainers.sample_data import sample_path

# The shared test machine has 2 cores and several workers; one thread avoids oversubscription
# (it makes tiny CPU training ~5-20x faster there).
torch.set_num_threads(1)

DATA = Path(__file__).resolve().parents[1] / "data" / "trainers"


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
