"""Metrics by hand: accuracy, macro-F1, the majority baseline, entity scores, perplexity."""

from __future__ import annotations

import math

import pytest

from trainers.metrics import (
    accuracy,
    classification_scores,
    entity_scores,
    macro_f1,
    majority_baseline,
    perplexity,
    token_loss_scores,
)


def test_accuracy_and_macro_f1_by_hand() -> None:
    predictions = ["a", "a", "b", "c"]
    references = ["a", "b", "b", "b"]
    assert accuracy(predictions, references) == 0.5
    assert accuracy([], []) == 0.0
    # a: tp 1 fp 1 fn 0 -> 2/3; b: tp 1 fp 0 fn 2 -> 1/2; c: tp 0 -> 0; d: never seen -> 0
    assert macro_f1(predictions, references, ["a", "b", "c"]) == pytest.approx((2 / 3 + 1 / 2) / 3)
    assert macro_f1(predictions, references, ["a", "b", "c", "d"]) == pytest.approx((2 / 3 + 1 / 2) / 4)
    assert macro_f1([], [], []) == 0.0
    assert classification_scores(predictions, references, ["a", "b", "c"]) == {
        "accuracy": 0.5,
        "macro_f1": pytest.approx((2 / 3 + 1 / 2) / 3),
    }


def test_majority_baseline_predicts_the_most_frequent_train_label() -> None:
    scores = majority_baseline(["b", "b", "a"], ["b", "a", "b", "c"], ["a", "b", "c"])
    assert scores["accuracy"] == 0.5  # always "b"
    assert scores["macro_f1"] == pytest.approx((2 * 2 / (2 * 2 + 2)) / 3)
    tie = majority_baseline(["x", "y"], ["y"], ["y", "x"])  # a tie goes to the first in `labels`
    assert tie["accuracy"] == 1.0


def test_entity_scores_count_whole_spans() -> None:
    references = [["B-PER", "I-PER", "O", "B-LOC"]]
    assert entity_scores(references, references) == {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    half = entity_scores([["B-PER", "O", "O", "B-LOC"]], references)  # PER span cut short: wrong
    assert half == {"precision": 0.5, "recall": 0.5, "f1": 0.5}
    assert entity_scores([["O", "O", "O", "O"]], references) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}


def test_perplexity_and_token_loss() -> None:
    assert perplexity(math.log(4.0)) == pytest.approx(4.0)
    assert perplexity(1e6) == math.exp(50.0)  # capped, still finite
    assert token_loss_scores(6.0, 3) == {"loss": 2.0, "perplexity": pytest.approx(math.exp(2.0))}
    assert token_loss_scores(0.0, 0) == {"loss": 0.0, "perplexity": 1.0}
