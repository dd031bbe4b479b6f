"""Label sets of labelled tasks: the class list, the BIO tag set, tag normalisation, eval checks.

Boundary: `trainers.data.records` in, plain lists of label names out; the index of a label in
its list is its class id (as the manifest records it). No tokenizer, no model.

- Classes: sorted, numerically when every label is an integer (so "10" follows "9").
- Tags: BIO and IOB1 are both accepted and normalised to BIO; the tag set is `O`, then `B-`/`I-`
  of every entity type, sorted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from trainers.data.readers import Problems
from trainers.data.records import TextRecord, TokensRecord


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
    known, problems = set(train_labels), Problems()
    for record in eval_records:
        values = getattr(record, field)
        values = values if isinstance(values, tuple) else (values,)
        unseen = sorted({value for value in values if value not in known})
        if unseen:
            problems.add(record.origin, f"label {', '.join(map(repr, unseen))} is not in the train data")
    problems.raise_if_any("Every eval label must occur in the train data; add examples or drop rows.")
