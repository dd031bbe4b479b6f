"""Classification end to end on the tiny base: train, register, reload with plain PEFT, predict."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from trainers import classification
from trainers.configs import ConfigError
from trainers.errors import DataError

DATA = Path(__file__).resolve().parents[1] / "data" / "trainers"
TEXTS = ["my parcel never arrived", "I was charged twice", "the app crashes on start"]


def logits_of(model: torch.nn.Module, tokenizer, texts: list[str]) -> torch.Tensor:
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    model.eval()
    with torch.no_grad():
        return model(**batch).logits.float()


@pytest.mark.parametrize("method", ["lora", "bottleneck", "full", "qlora"])
def test_train_register_reload_predict(
    method, make_config, registry, capture_model, reload_stored, tiny_base
) -> None:
    seen = capture_model(classification)
    grad_accum = 2 if method == "bottleneck" else 1
    config = make_config("classification", method=method, name=f"cls-{method}", grad_accum=grad_accum)
    manifest = classification.train(config)

    assert manifest.ref == f"cls-{method}@1" and manifest.task == "classification"
    assert manifest.labels == ["billing", "shipping", "technical"]
    assert 0.0 <= manifest.metrics["accuracy"] <= 1.0 and "majority_accuracy" in manifest.metrics
    assert manifest.trainer["method"] == method and manifest.trainer["lr"] == 1e-3
    stored = registry.get(manifest.ref)
    assert {"README.md", "metrics.json", "loss_curve.png"} <= set(manifest.files)
    assert manifest.metrics["train_steps"] == 3 and manifest.metrics["eval_examples"] == 12
    assert manifest.metrics["epochs"] == 3 * 8 * grad_accum / 32  # 32 training rows
    history = json.loads((stored.path / "metrics.json").read_text())["history"]
    assert [e["step"] for e in history if "loss" in e] == [1, 2, 3] and history[-1]["eval"]
    card = (stored.path / "README.md").read_text()
    assert "Task: classification" in card and f"Method: {method}" in card and "| accuracy |" in card
    assert "## Usage" in card and (stored.path / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    if method == "full":
        assert (manifest.kind, manifest.adapter_format) == ("model", "hf-model")
        assert "model.safetensors" in manifest.files and "tokenizer.json" in manifest.files
    else:
        assert manifest.kind == "adapter"
        assert manifest.adapter_format == ("bottleneck" if method == "bottleneck" else "peft")
    if method == "qlora":
        assert manifest.quantization == {
            "bits": 4, "quant_type": "nf4", "double_quant": True,
            "compute_dtype": "float32", "library": "bitsandbytes",
        }  # fmt: skip
    else:
        assert manifest.quantization is None

    tokenizer = AutoTokenizer.from_pretrained(tiny_base.path)
    reloaded = logits_of(reload_stored(stored), tokenizer, TEXTS)
    assert reloaded.shape == (3, 3) and torch.isfinite(reloaded).all()
    if method == "qlora":  # trained on a 4-bit base, reloaded onto the full-precision one
        return
    trained = logits_of(seen["model"], tokenizer, TEXTS)
    torch.testing.assert_close(reloaded, trained, rtol=1e-4, atol=1e-5)


def test_same_seed_same_metrics_and_weights(make_config, registry) -> None:
    first = classification.train(make_config("classification", name="rep"))
    second = classification.train(make_config("classification", name="rep"))
    drop = {"train_seconds", "peak_memory_mb"}
    assert {k: v for k, v in first.metrics.items() if k not in drop} == {
        k: v for k, v in second.metrics.items() if k not in drop
    }
    weights = "adapter_model.safetensors"
    assert first.files[weights].sha256 == second.files[weights].sha256
    assert second.version == 2  # a rerun is a new version with identical content


def test_eval_split_from_train_when_no_eval_file(make_config) -> None:
    config = make_config("classification", eval=None, eval_fraction=0.25)
    train_records, eval_records, labels = classification.load_data(config)
    assert (len(train_records), len(eval_records)) == (24, 8)
    assert {r.label for r in eval_records} <= set(labels)


@pytest.mark.parametrize(
    ("data", "eval_file", "expected"),
    [
        ("missing_field.jsonl", None, r"missing_field\.jsonl:3: missing field 'label'"),
        ("not_json.jsonl", None, r"not_json\.jsonl:2: not a JSON line"),
        ("empty.jsonl", None, r"empty\.jsonl: the file holds no records"),
        (None, "eval_unseen.jsonl", r"eval_unseen\.jsonl:2: label 'neutral' is not in the train"),
    ],
)
def test_bad_data_fails_before_training_and_registers_nothing(
    data, eval_file, expected, make_config, registry, monkeypatch
) -> None:
    monkeypatch.setattr(classification, "set_up_training", _must_not_load)
    overrides = {}
    if data:
        overrides["data"] = str(DATA / data)
    if eval_file:
        overrides["eval"] = str(DATA / eval_file)
    with pytest.raises(DataError, match=expected):
        classification.train(make_config("classification", **overrides))
    assert registry.list() == []


def test_invalid_options_all_reported(make_config, registry) -> None:
    config = make_config("classification", rank=0, dropout=1.5, method="magic", name="Bad Name")
    with pytest.raises(ConfigError) as info:
        classification.train(config)
    message = str(info.value)
    for fragment in ("--rank", "--dropout", "--method", "--name"):
        assert fragment in message
    assert registry.list() == []


def _must_not_load(*args, **kwargs):
    raise AssertionError("the model was loaded before the data was checked")
