"""Recipe: train a text classifier (sequence classification head + LoRA/QLoRA/bottleneck/full).

Run it as `adapterdock train classification --base tiny --data train.jsonl --name my-classifier`.
Reads JSONL/JSON/CSV/TSV rows with a text and a label field, holds out an eval split unless
`--eval` is given, trains through the shared loop, reports accuracy and macro-F1 next to the
majority-class and untrained baselines, and registers the result. Labels (strings or integers)
are sorted (numerically when all are integers); index = class id, as recorded in the manifest.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from hub.bases import resolve_base
from hub.manifest import Manifest
from trainers.configs import TrainConfig, option
from trainers.data.collate import collate_fn
from trainers.data.labels import check_eval_labels, class_label_set
from trainers.data.readers import read_classification
from trainers.data.records import TextRecord, split_off_eval
from trainers.data.tokenize import tokenize_classification
from trainers.export import save_and_register
from trainers.loop import run_training
from trainers.metrics import classification_scores, majority_baseline
from trainers.modeling import load_tokenizer, seed_everything, set_up_training

logger = logging.getLogger(__name__)

TASK = "classification"
HELP = "Train a text classifier (labels from a text/label data file)."
EXAMPLE = (
    "adapterdock train classification --base tiny "
    "--data reviews.jsonl --name review-sentiment --method lora --epochs 3"
)


@dataclass
class Config(TrainConfig):
    """Options of the classification recipe."""

    text_field: str = option("text", "Field (JSON key or CSV/TSV column) holding the text.")
    label_field: str = option("label", "Field holding the label (a string or an integer).")


def load_data(config: Config) -> tuple[list[TextRecord], list[TextRecord], list[str]]:
    """Read train (and eval) records, split off eval if needed, check eval labels; no model yet."""
    records = read_classification(config.data, config.text_field, config.label_field)
    if config.eval:
        train_records = records
        eval_records = read_classification(config.eval, config.text_field, config.label_field)
    else:
        train_records, eval_records = split_off_eval(
            records, config.eval_fraction, config.seed, key=lambda r: r.label
        )
    labels = class_label_set(train_records)
    check_eval_labels(labels, eval_records, "label")
    return train_records, eval_records, labels


def train(config: Config) -> Manifest | None:
    """Train, evaluate and register a classifier.

    Returns:
        The registered manifest (on the main process; None on the other processes).

    Raises:
        ConfigError, DataError (before any training), BaseNotFoundError.
    """
    config.validate()
    base = resolve_base(config.base, registry=config.registry)
    train_records, eval_records, labels = load_data(config)
    label2id = {label: index for index, label in enumerate(labels)}

    seed_everything(config.seed)
    tokenizer = load_tokenizer(base)
    setup = set_up_training(config, base, TASK, tokenizer, labels)

    train_examples = tokenize_classification(train_records, tokenizer, label2id, config.max_length)
    eval_examples = tokenize_classification(eval_records, tokenizer, label2id, config.max_length)

    def eval_step(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> list[Any]:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return list(zip(logits.argmax(-1).tolist(), batch["labels"].tolist(), strict=True))

    def compute_metrics(outputs: list[tuple[int, int]]) -> dict[str, float]:
        predictions = [labels[p] for p, _ in outputs]
        references = [labels[r] for _, r in outputs]
        return classification_scores(predictions, references, labels)

    result = run_training(
        setup.model, train_examples, eval_examples, collate_fn(tokenizer.pad_token_id), config,
        setup.accelerator, eval_step=eval_step, compute_metrics=compute_metrics,
    )  # fmt: skip
    majority = majority_baseline([r.label for r in train_records], [r.label for r in eval_records], labels)
    result.metrics |= {f"majority_{key}": value for key, value in majority.items()}
    if not setup.accelerator.is_main_process:
        return None
    data = {
        "train": config.data,
        "eval": config.eval or f"{config.eval_fraction:.0%} of train (stratified, seed {config.seed})",
        "train_examples": len(train_records),
        "eval_examples": len(eval_records),
    }
    return save_and_register(
        result.model, tokenizer=tokenizer, config=config, task=TASK, method=setup.method,
        device=setup.device, base=base, labels=labels, result=result, data=data,
    )  # fmt: skip
