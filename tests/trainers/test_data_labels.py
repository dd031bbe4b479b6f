"""Label sets: BIO/IOB1 normalisation, class and tag sets, eval labels unseen in train."""

from __future__ import annotations

import pytest

from trainers.data.labels import bio_label_set, check_eval_labels, class_label_set, normalize_tags
from trainers.data.records import Origin, TextRecord, TokensRecord
from trainers.errors import DataError


def test_iob1_becomes_bio_and_bio_is_unchanged() -> None:
    iob1 = ["I-PER", "I-PER", "O", "I-LOC", "B-LOC", "I-ORG"]
    assert normalize_tags(iob1) == ("B-PER", "I-PER", "O", "B-LOC", "B-LOC", "B-ORG")
    bio = ("B-PER", "I-PER", "O", "B-LOC", "B-LOC", "I-LOC")
    assert normalize_tags(bio) == bio


def test_label_sets() -> None:
    origin = Origin("x", 1)
    records = [TokensRecord(("a", "b"), ("B-PER", "O"), origin), TokensRecord(("c",), ("I-LOC",), origin)]
    assert bio_label_set(records) == ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
    texts = [TextRecord("t", label, origin) for label in ("10", "9", "2")]
    assert class_label_set(texts) == ["2", "9", "10"]


def test_eval_label_unseen_in_train_names_the_line() -> None:
    eval_records = [
        TextRecord("x", "pos", Origin("eval.jsonl", 1)),
        TextRecord("y", "meh", Origin("eval.jsonl", 2)),
    ]
    with pytest.raises(DataError, match=r"eval\.jsonl:2: label 'meh' is not in the train data"):
        check_eval_labels(["neg", "pos"], eval_records, "label")
