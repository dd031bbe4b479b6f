"""Records to token ids: the one place that knows chat templates, prompt masking and NER alignment.

Boundary: `trainers.data.records` + a Hugging Face fast tokenizer in, plain Python dicts of lists
out (`input_ids`, `attention_mask`, `labels`); padding into tensors happens in `collate`.

- Chat: rendered with the tokenizer's chat template; `labels` are -100 everywhere except the
  assistant's tokens (from the template's `{% generation %}` markers, or, for templates without
  them, from the character spans of each assistant turn found by rendering prefixes).
- NER: words are joined by single spaces (what a served model sees), and each word's label goes on
  its FIRST sub-word token; the other sub-words and special tokens get -100.
- Tags: BIO and IOB1 are both accepted and normalised to BIO.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from trainers.errors import DataError
from trainers.data.records import ChatRecord, Message, TextRecord, TokensRecord

IGNORE_INDEX = -100
logger = logging.getLogger(__name__)

Example = dict[str, Any]


# ---- labels --------------------------------------------------------------------------------------


def normalize_tags(tags: Sequence[str]) -> tuple[str, ...]:
    """Return BIO tags: an IOB1 `I-X` starting an entity (after `O` or another type) becomes `B-X`.

    Valid BIO passes through unchanged, so the function is safe on either scheme.
    """
    out, previous = [], "O"
    for tag in tags:
        if tag.startswith("I-") and (previous == "O" or previous[2:] != tag[2:]):
            tag = "B-" + tag[2:]
        out.append(tag)
        previous = tag
    return tuple(out)


def bio_label_set(records: Sequence[TokensRecord]) -> list[str]:
    """The BIO tag set of `records`: `O` first, then B- and I- of every entity type, sorted."""
    types = sorted({tag[2:] for record in records for tag in record.tags if tag != "O"})
    return ["O"] + [f"{prefix}-{kind}" for kind in types for prefix in ("B", "I")]


def class_label_set(records: Sequence[TextRecord]) -> list[str]:
    """Sorted labels; numerically when every label is an integer, so "10" follows "9"."""
    labels = {record.label for record in records}
    if all(label.lstrip("-").isdigit() for label in labels):
        return sorted(labels, key=int)
    return sorted(labels)


def check_eval_labels(train_labels: Sequence[str], eval_records: Sequence[Any], field: str) -> None:
    """Raise DataError for eval records whose label (or tag) never occurs in the training data."""
    from trainers.data.readers import Problems

    known, problems = set(train_labels), Problems()
    for record in eval_records:
        values = getattr(record, field)
        values = values if isinstance(values, tuple) else (values,)
        unseen = sorted({value for value in values if value not in known})
        if unseen:
            problems.add(record.origin, f"label {', '.join(map(repr, unseen))} is not in the train data")
    problems.raise_if_any("Every eval label must occur in the train data; add examples or drop rows.")


# ---- classification ------------------------------------------------------------------------------


def tokenize_classification(
    records: Sequence[TextRecord], tokenizer: Any, label2id: dict[str, int], max_length: int
) -> list[Example]:
    """Token ids of each text (truncated to `max_length`) with its integer class label."""
    encoded = tokenizer([r.text for r in records], truncation=True, max_length=max_length)
    return [
        {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": label2id[r.label]}
        for ids, r in zip(encoded["input_ids"], records, strict=True)
    ]


# ---- NER -----------------------------------------------------------------------------------------


def word_spans(words: Sequence[str]) -> tuple[str, list[tuple[int, int]]]:
    """The text a sentence is served as (words joined by one space) and each word's char span."""
    spans, position = [], 0
    for word in words:
        spans.append((position, position + len(word)))
        position += len(word) + 1
    return " ".join(words), spans


def first_subword_labels(
    offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]], word_labels: Sequence[int]
) -> list[int]:
    """Label the first token overlapping each word's span; every other token gets IGNORE_INDEX."""
    labels, word, previous_word = [], 0, -1
    for start, end in offsets:
        while word < len(spans) and spans[word][1] <= start:
            word += 1
        inside = start < end and word < len(spans) and end > spans[word][0]
        if inside and word != previous_word:
            labels.append(word_labels[word])
            previous_word = word
        else:
            labels.append(IGNORE_INDEX)
    return labels


def tokenize_ner(
    records: Sequence[TokensRecord], tokenizer: Any, label2id: dict[str, int], max_length: int
) -> list[Example]:
    """Token ids of each sentence with first-sub-word labels (tags normalised to BIO)."""
    examples = []
    for record in records:
        text, spans = word_spans(record.tokens)
        encoded = tokenizer(text, truncation=True, max_length=max_length, return_offsets_mapping=True)
        word_labels = [label2id[tag] for tag in normalize_tags(record.tags)]
        labels = first_subword_labels(encoded["offset_mapping"], spans, word_labels)
        examples.append(
            {
                "input_ids": encoded["input_ids"],
                "attention_mask": [1] * len(encoded["input_ids"]),
                "labels": labels,
            }
        )
    return examples


# ---- chat ----------------------------------------------------------------------------------------


def render_chat(tokenizer: Any, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
    """Render messages with the tokenizer's chat template (the prompt a served model receives)."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            "The base's tokenizer has no chat template, so conversations cannot be rendered.",
            "Use a base with a chat template (the built-in bases have one) or add `chat_template` "
            "to its tokenizer_config.json.",
        )
    return tokenizer.apply_chat_template(
        [m.to_dict() for m in messages], tokenize=False, add_generation_prompt=add_generation_prompt
    )


def assistant_char_spans(tokenizer: Any, messages: Sequence[Message]) -> list[tuple[int, int]]:
    """Character spans of each assistant turn (content and end-of-turn marker) in the rendering.

    Found by rendering prefixes: the turn starts where `messages[:i]` + generation prompt ends and
    stops where `messages[:i+1]` ends. Works for any template whose renderings extend each other.
    """
    spans = []
    for index, message in enumerate(messages):
        if message.role != "assistant":
            continue
        start = len(render_chat(tokenizer, messages[:index], add_generation_prompt=True))
        end = len(render_chat(tokenizer, messages[: index + 1]))
        spans.append((start, end))
    return spans


def tokenize_chat(tokenizer: Any, messages: Sequence[Message], max_length: int) -> Example:
    """Token ids of a conversation with labels on the assistant's tokens only (-100 elsewhere)."""
    if "{% generation %}" in (getattr(tokenizer, "chat_template", None) or ""):
        encoded = tokenizer.apply_chat_template(
            [m.to_dict() for m in messages], tokenize=True, return_dict=True,
            return_assistant_tokens_mask=True,
        )  # fmt: skip
        ids, mask = encoded["input_ids"][:max_length], encoded["assistant_masks"][:max_length]
    else:
        text = render_chat(tokenizer, messages)
        encoded = tokenizer(
            text, add_special_tokens=False, truncation=True, max_length=max_length,
            return_offsets_mapping=True,
        )  # fmt: skip
        spans = assistant_char_spans(tokenizer, messages)
        ids = encoded["input_ids"]
        mask = [
            any(start < span_end and end > span_start for span_start, span_end in spans)
            for start, end in encoded["offset_mapping"]
        ]
    labels = [token if keep else IGNORE_INDEX for token, keep in zip(ids, mask, strict=True)]
    return {"input_ids": list(ids), "attention_mask": [1] * len(ids), "labels": labels}


def tokenize_instruction(records: Sequence[ChatRecord], tokenizer: Any, max_length: int) -> list[Example]:
    """Tokenize conversations; drops (and logs) those whose assistant turns fall past `max_length`.

    Raises:
        DataError: when no conversation keeps any assistant token within `max_length`.
    """
    examples, dropped = [], []
    for record in records:
        example = tokenize_chat(tokenizer, record.messages, max_length)
        if all(label == IGNORE_INDEX for label in example["labels"]):
            dropped.append(str(record.origin))
            continue
        examples.append(example)
    if dropped:
        logger.warning(
            "%d conversation(s) have no assistant token within max_length=%d and were skipped "
            "(first: %s)", len(dropped), max_length, dropped[0],
        )  # fmt: skip
    if records and not examples:
        raise DataError(
            f"No conversation keeps an assistant token within max_length={max_length} (first: {dropped[0]}).",
            "Raise --max-length or shorten the prompts.",
        )
    return examples
