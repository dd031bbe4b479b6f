"""Recipe: train a named-entity tagger (token classification head + LoRA/QLoRA/bottleneck/full).

Run it as `adapterdock train ner --base tiny --data train.conll --name my-ner`.
Reads CoNLL columns or JSONL `tokens`/`tags`; BIO and IOB1 tags are normalised to BIO; each word's
tag goes on its first sub-word token (the rest are ignored in the loss); sentences are served as
their words joined by single spaces. Reports seqeval entity precision/recall/F1 next to the
untrained model's and the all-`O` baseline, and registers the BIO tag set in the manifest.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

import torch

from hub.bases import resolve_base
from hub.manifest import Manifest
from trainers.configs import TrainConfig
from trainers.data.collate import collate_fn
from trainers.data.labels import bio_label_set, check_eval_labels, normalize_tags
from trainers.data.readers import read_ner
from trainers.data.records import TokensRecord, split_off_eval
from trainers.data.tokenize import IGNORE_INDEX, tokenize_ner
from trainers.export import save_and_register
from trainers.loop import run_training
from trainers.metrics import entity_scores
from trainers.modeling import load_tokenizer, seed_everything, set_up_training

logger = logging.getLogger(__name__)

TASK = "ner"
HELP = "Train a named-entity tagger (CoNLL columns or JSONL tokens/tags, BIO or IOB1)."
EXAMPLE = "adapterdock train ner --base tiny --data train.conll --eval dev.conll --name my-ner"


@dataclass
class Config(TrainConfig):
    """Options of the NER recipe."""


def load_data(config: Config) -> tuple[list[TokensRecord], list[TokensRecord], list[str]]:
    """Read sentences, normalise tags to BIO, split off eval if needed, check eval tags."""

    def read(path: str) -> list[TokensRecord]:
        return [replace(r, tags=normalize_tags(r.tags)) for r in read_ner(path)]

    records = read(config.data)
    if config.eval:
        train_records, eval_records = records, read(config.eval)
    else:
        train_records, eval_records = split_off_eval(records, config.eval_fraction, config.seed)
    labels = bio_label_set(train_records)
    check_eval_labels(labels, eval_records, "tags")
    return train_records, eval_records, labels


def train(config: Config) -> Manifest | None:
    """Train, evaluate and register an NER tagger.

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

    train_examples = tokenize_ner(train_records, tokenizer, label2id, config.max_length)
    eval_examples = tokenize_ner(eval_records, tokenizer, label2id, config.max_length)

    def eval_step(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> list[Any]:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        outputs = []
        for predicted, gold in zip(logits.argmax(-1).tolist(), batch["labels"].tolist(), strict=True):
            keep = [i for i, label in enumerate(gold) if label != IGNORE_INDEX]
            outputs.append(([predicted[i] for i in keep], [gold[i] for i in keep]))
        return outputs

    def compute_metrics(outputs: list[tuple[list[int], list[int]]]) -> dict[str, float]:
        predictions = [[labels[i] for i in predicted] for predicted, _ in outputs]
        references = [[labels[i] for i in gold] for _, gold in outputs]
        return entity_scores(predictions, references)

    result = run_training(
        setup.model, train_examples, eval_examples, collate_fn(tokenizer.pad_token_id), config,
        setup.accelerator, eval_step=eval_step, compute_metrics=compute_metrics,
    )  # fmt: skip
    all_o = entity_scores([["O"] * len(r.tags) for r in eval_records], [r.tags for r in eval_records])
    result.metrics |= {f"all_o_{key}": value for key, value in all_o.items()}
    if not setup.accelerator.is_main_process:
        return None
    data = {
        "train": config.data,
        "eval": config.eval or f"{config.eval_fraction:.0%} of train (seed {config.seed})",
        "train_sentences": len(train_records),
        "eval_sentences": len(eval_records),
        "entity_types": sorted({label[2:] for label in labels if label != "O"}),
    }
    return save_and_register(
        result.model, tokenizer=tokenizer, config=config, task=TASK, method=setup.method,
        device=setup.device, base=base, labels=labels, result=result, data=data,
    )  # fmt: skip
