"""Evaluation metrics and the baselines reported beside them; plain functions over Python lists.

Boundary: predictions and references in, floats out; no models, no tensors. Entity scores call
`seqeval` directly (never `evaluate.load`, which fetches code from the Hub at run time).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence


def accuracy(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Share of predictions equal to their reference (0.0 for no examples)."""
    if not references:
        return 0.0
    return sum(p == r for p, r in zip(predictions, references, strict=True)) / len(references)


def macro_f1(predictions: Sequence[str], references: Sequence[str], labels: Sequence[str]) -> float:
    """Unweighted mean of per-class F1 over `labels` (a class never predicted nor present scores 0)."""
    scores = []
    for label in labels:
        tp = sum(p == label and r == label for p, r in zip(predictions, references, strict=True))
        fp = sum(p == label and r != label for p, r in zip(predictions, references, strict=True))
        fn = sum(p != label and r == label for p, r in zip(predictions, references, strict=True))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / len(scores) if scores else 0.0


def classification_scores(
    predictions: Sequence[str], references: Sequence[str], labels: Sequence[str]
) -> dict[str, float]:
    """`accuracy` and `macro_f1`."""
    return {
        "accuracy": accuracy(predictions, references),
        "macro_f1": macro_f1(predictions, references, labels),
    }


def majority_baseline(
    train_labels: Sequence[str], references: Sequence[str], labels: Sequence[str]
) -> dict[str, float]:
    """Scores of always predicting the most frequent training label (ties: the first in `labels`)."""
    counts = Counter(train_labels)
    majority = max(labels, key=lambda label: (counts[label], -labels.index(label)))
    return classification_scores([majority] * len(references), references, labels)


def entity_scores(
    predictions: Sequence[Sequence[str]], references: Sequence[Sequence[str]]
) -> dict[str, float]:
    """Entity-level micro precision, recall and F1 (seqeval's conlleval-style spans; 0 if undefined).

    seqeval is imported here: it pulls in scikit-learn, seconds of start-up every other recipe skips.
    """
    from seqeval.metrics import f1_score, precision_score, recall_score

    kwargs = {"zero_division": 0}
    refs, preds = [list(r) for r in references], [list(p) for p in predictions]
    return {
        "precision": float(precision_score(refs, preds, **kwargs)),
        "recall": float(recall_score(refs, preds, **kwargs)),
        "f1": float(f1_score(refs, preds, **kwargs)),
    }


def perplexity(mean_loss: float) -> float:
    """exp(mean token cross-entropy), capped to stay finite."""
    return math.exp(min(mean_loss, 50.0))


def token_loss_scores(total_loss: float, total_tokens: int) -> dict[str, float]:
    """`loss` (mean per token) and `perplexity` from summed token losses."""
    loss = total_loss / max(total_tokens, 1)
    return {"loss": loss, "perplexity": perplexity(loss)}
