"""NER end to end on the tiny base: train, register, reload with plain PEFT, predict; bad tags."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from trainers import ner
from trainers.errors import DataError

DATA = Path(__file__).resolve().parents[1] / "data" / "trainers"
SENTENCES = ["Anna Berg works for Orbitex in Oslo .", "flights from Lima to Cairo were delayed ."]
LABELS = ["O", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-PER", "I-PER"]


def logits_of(model: torch.nn.Module, tokenizer) -> torch.Tensor:
    batch = tokenizer(SENTENCES, return_tensors="pt", padding=True)
    model.eval()
    with torch.no_grad():
        return model(**batch).logits.float()


@pytest.mark.parametrize("method", ["lora", "bottleneck", "full", "qlora"])
def test_train_register_reload_predict(
    method, make_config, registry, capture_model, reload_stored, tiny_base
) -> None:
    seen = capture_model(ner)
    manifest = ner.train(make_config("ner", method=method, name=f"ner-{method}"))

    assert manifest.task == "ner" and manifest.labels == LABELS
    assert {"precision", "recall", "f1", "all_o_f1"} <= set(manifest.metrics)
    assert manifest.metrics["all_o_f1"] == 0.0
    assert manifest.kind == ("model" if method == "full" else "adapter")
    assert (manifest.quantization or {}).get("quant_type") == ("nf4" if method == "qlora" else None)

    tokenizer = AutoTokenizer.from_pretrained(tiny_base.path)
    reloaded = logits_of(reload_stored(registry.get(manifest.ref)), tokenizer)
    assert reloaded.shape[-1] == len(LABELS) and torch.isfinite(reloaded).all()
    if method != "qlora":
        torch.testing.assert_close(reloaded, logits_of(seen["model"], tokenizer), rtol=1e-4, atol=1e-5)


def test_iob1_input_trains_with_bio_labels(make_config, registry, tmp_path) -> None:
    config = make_config("ner", data=str(DATA / "iob1.conll"), eval=str(DATA / "iob1.conll"))
    train_records, _, labels = ner.load_data(config)
    assert train_records[0].tags[:4] == ("B-PER", "I-PER", "O", "B-PER")
    assert labels == LABELS


def test_jsonl_input(make_config, tmp_path) -> None:
    path = tmp_path / "ner.jsonl"
    rows = [{"tokens": ["Mei", "Chen", "left"], "tags": ["B-PER", "I-PER", "O"]}] * 4
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train_records, eval_records, labels = ner.load_data(make_config("ner", data=str(path), eval=None))
    assert labels == ["O", "B-PER", "I-PER"] and len(train_records) + len(eval_records) == 4


def test_unknown_tag_scheme_fails_before_training(make_config, registry) -> None:
    with pytest.raises(DataError, match=r"bioes\.conll:1: unknown tag scheme"):
        ner.train(make_config("ner", data=str(DATA / "bioes.conll")))
    assert registry.list() == []


def test_eval_entity_type_unseen_in_train(make_config, registry, tmp_path) -> None:
    path = tmp_path / "eval.conll"
    path.write_text("Anna\tB-PER\n\nAcme\tB-MISC\nrocks\tO\n")
    with pytest.raises(DataError, match=r"eval\.conll:3: label 'B-MISC' is not in the train data"):
        ner.train(make_config("ner", eval=str(path)))
    assert registry.list() == []
