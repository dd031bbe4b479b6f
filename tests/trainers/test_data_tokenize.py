"""Tokenization: first-sub-word NER labels, assistant-only chat labels, collation."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from hub.bases import BaseInfo
from trainers.data.collate import collate_fn
from trainers.data.records import Message, Origin, TokensRecord
from trainers.data.tokenize import (
    IGNORE_INDEX,
    first_subword_labels,
    tokenize_chat,
    tokenize_instruction,
    tokenize_ner,
    word_spans,
)
from trainers.errors import DataError


@pytest.fixture(scope="module")
def tokenizer(tiny_base: BaseInfo):
    return AutoTokenizer.from_pretrained(tiny_base.path)


def test_first_subword_alignment_by_hand() -> None:
    text, spans = word_spans(["Anna", "Kowalski", "ran"])
    assert text == "Anna Kowalski ran" and spans == [(0, 4), (5, 13), (14, 17)]
    offsets = [(0, 0), (0, 4), (4, 7), (7, 13), (13, 17)]  # special, Anna, " Kow", "alski", " ran"
    assert first_subword_labels(offsets, spans, [1, 2, 0]) == [IGNORE_INDEX, 1, 2, IGNORE_INDEX, 0]


def test_ner_labels_one_per_word_on_first_subtoken(tokenizer) -> None:
    record = TokensRecord(
        ("Kowalski", "visited", "Port", "Silva"), ("B-PER", "O", "B-LOC", "I-LOC"), Origin("x", 1)
    )
    label2id = {"O": 0, "B-PER": 1, "I-PER": 2, "B-LOC": 3, "I-LOC": 4}
    example = tokenize_ner([record], tokenizer, label2id, max_length=64)[0]
    kept = [label for label in example["labels"] if label != IGNORE_INDEX]
    assert kept == [1, 0, 3, 4]
    assert len(example["input_ids"]) > 4  # some words were split into several tokens
    pieces = tokenizer.convert_ids_to_tokens(example["input_ids"])
    first = pieces[example["labels"].index(1)]
    assert "Kowalski".startswith(first.lstrip("Ġ"))


def test_chat_labels_only_assistant_tokens(tokenizer) -> None:
    messages = (Message("system", "be brief"), Message("user", "hi there"), Message("assistant", "hello you"))
    example = tokenize_chat(tokenizer, messages, max_length=128)
    labelled = [
        t for t, label in zip(example["input_ids"], example["labels"], strict=True) if label != IGNORE_INDEX
    ]
    assert tokenizer.decode(labelled) == "hello you<|im_end|>"
    assert example["labels"][: len(example["labels"]) - len(labelled) - 1] == [IGNORE_INDEX] * (
        len(example["labels"]) - len(labelled) - 1
    )


def test_chat_labels_without_generation_markers_match(tokenizer) -> None:
    messages = (
        Message("user", "q1"),
        Message("assistant", "a1"),
        Message("user", "q2"),
        Message("assistant", "a2"),
    )
    with_markers = tokenize_chat(tokenizer, messages, max_length=128)
    plain = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    plain.chat_template = plain.chat_template.replace("{% generation %}", "").replace(
        "{% endgeneration %}", ""
    )
    without = tokenize_chat(plain, messages, max_length=128)
    assert without["input_ids"] == with_markers["input_ids"]
    decoded = plain.decode(
        [t for t, label in zip(without["input_ids"], without["labels"], strict=True) if label != IGNORE_INDEX]
    )
    assert decoded == "a1<|im_end|>\na2<|im_end|>\n"  # prefix spans also take the turn's newline


def test_truncated_conversations_are_dropped_or_rejected(tokenizer) -> None:
    from trainers.data.records import ChatRecord

    long = ChatRecord((Message("user", "word " * 50), Message("assistant", "ok")), Origin("c.jsonl", 4))
    short = ChatRecord((Message("user", "hi"), Message("assistant", "ok")), Origin("c.jsonl", 5))
    assert len(tokenize_instruction([long, short], tokenizer, max_length=16)) == 1
    with pytest.raises(DataError, match=r"c\.jsonl:4"):
        tokenize_instruction([long], tokenizer, max_length=16)


def test_collate_pads_right() -> None:
    batch = collate_fn(pad_token_id=0)(
        [
            {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [1, IGNORE_INDEX, 2]},
            {"input_ids": [8], "attention_mask": [1], "labels": [3]},
        ]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[1, IGNORE_INDEX, 2], [3, IGNORE_INDEX, IGNORE_INDEX]]
    scalar = collate_fn(0)([{"input_ids": [1], "labels": 2}, {"input_ids": [1, 2], "labels": 0}])
    assert scalar["labels"].tolist() == [2, 0]
