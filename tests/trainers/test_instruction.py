"""Instruction tuning end to end on the tiny base: train, register, reload, generate."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoTokenizer

from trainers import instruction
from trainers.errors import DataError

DATA = Path(__file__).resolve().parents[1] / "data" / "trainers"
PROMPT = [{"role": "user", "content": "Add 2 and 3."}]


@pytest.mark.parametrize("method", ["lora", "bottleneck", "full", "qlora", "dora", "qdora"])
def test_train_register_reload_generate(
    method, make_config, registry, capture_model, reload_stored, tiny_base
) -> None:
    seen = capture_model(instruction)
    manifest = instruction.train(make_config("instruction", method=method, name=f"chat-{method}"))

    assert manifest.task == "instruction" and manifest.labels == []
    assert math.isclose(manifest.metrics["perplexity"], math.exp(manifest.metrics["loss"]), rel_tol=1e-9)
    assert manifest.kind == ("model" if method == "full" else "adapter")
    if method == "lora":
        config = json.loads((registry.get(manifest.ref).path / "adapter_config.json").read_text())
        assert config["task_type"] == "CAUSAL_LM" and config["base_model_name_or_path"] == "tiny"
        assert set(config["target_modules"]) == {
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
        }  # fmt: skip
    if method in ("dora", "qdora"):  # PEFT's DoRA format: use_dora and one magnitude per adapted linear
        folder = registry.get(manifest.ref).path
        config = json.loads((folder / "adapter_config.json").read_text())
        with safe_open(str(folder / "adapter_model.safetensors"), "pt") as tensors:
            names = list(tensors.keys())
        magnitudes = [k for k in names if "lora_magnitude_vector" in k]
        factors = [k for k in names if "lora_A" in k]
        assert config["use_dora"] is True and manifest.method == method
        assert len(magnitudes) == len(factors) > 0

    tokenizer = AutoTokenizer.from_pretrained(tiny_base.path)
    ids = tokenizer.apply_chat_template(
        PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    model = reload_stored(registry.get(manifest.ref))
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
        reloaded = model(**ids).logits
    assert out.shape[1] > ids["input_ids"].shape[1]
    if method not in ("qlora", "qdora"):
        seen["model"].eval()
        with torch.no_grad():
            trained = seen["model"](**ids).logits
        torch.testing.assert_close(reloaded, trained, rtol=1e-4, atol=1e-5)


def test_training_lowers_eval_loss_below_untrained(make_config) -> None:
    config = make_config("instruction", baseline=True, max_steps=8, lr=3e-3, name="learns")
    manifest = instruction.train(config)
    assert manifest.metrics["loss"] < manifest.metrics["baseline_loss"] - 0.5


def test_alpaca_file_and_bad_rows(make_config, registry, tmp_path) -> None:
    train_records, eval_records = instruction.load_data(
        make_config("instruction", data=str(DATA / "alpaca.json"), eval=str(DATA / "alpaca.json"))
    )
    assert train_records[0].messages[1].content == "5"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:1: missing field"):
        instruction.train(make_config("instruction", data=str(bad)))
    assert registry.list() == []
