"""Task heads over the base's final hidden states: classification, reward, and NER with BIO decoding.

Pooling follows transformers' generic `*ForSequenceClassification` exactly, which every supported
family (Llama, Qwen2/3, Mistral, Gemma 2/3, Phi-3) uses: the rightmost token that is not the pad token.
NER scores every token and decodes BIO tags into character spans using the fast tokenizer's offsets.
`task_result` turns one input's hidden states into what its endpoint answers. Boundary: pure functions
of hidden states, head weights and token offsets; no model, no batching, no HTTP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from server.requests import TaskInput

CLASSIFICATION, NER, REWARD = "classification", "ner", "reward"
"""The task kinds a head serves (the manifest's task names)."""


@dataclass
class Head:
    """One adapter's task head: logits = hidden @ weight.T + bias."""

    weight: torch.Tensor
    """[num_labels, hidden]"""
    bias: torch.Tensor | None
    """[num_labels] or None."""

    @property
    def nbytes(self) -> int:
        """Bytes of its tensors (charged to its adapter's memory)."""
        tensors = [self.weight] + ([self.bias] if self.bias is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = hidden.to(self.weight.dtype) @ self.weight.t()
        return logits + self.bias if self.bias is not None else logits


def task_result(
    kind: str,
    head: Head,
    labels: list[str],
    item: TaskInput,
    states: torch.Tensor,
    pad_token_id: int | None,
) -> Any:
    """What one task input answers, from its final hidden states ([tokens, hidden]).

    Returns:
        NER: entities (see `bio_entities`). Reward: the scalar score. Classification: see
        `classification_result`.
    """
    if kind == NER:
        assert item.offsets is not None, "NER inputs carry token offsets (server.prompts.task_inputs)"
        return bio_entities(item.text, head(states), item.offsets, labels)
    logits = head(states[last_non_pad_index(item.ids, pad_token_id)])
    if kind == REWARD:
        return float(logits[0])
    return classification_result(logits, labels)


def last_non_pad_index(token_ids: list[int], pad_token_id: int | None) -> int:
    """The index HF's sequence classifiers pool: the rightmost token that is not padding.

    Mirrors `(arange(T) * (ids != pad)).argmax(-1)`: 0 when every token is padding, T-1 when there is
    no pad token.
    """
    if pad_token_id is None:
        return len(token_ids) - 1
    for i in range(len(token_ids) - 1, -1, -1):
        if token_ids[i] != pad_token_id:
            return i
    return 0


def classification_result(logits: torch.Tensor, labels: list[str]) -> dict:
    """{"label": best label, "scores": {label: softmax probability}} for one pooled logit row."""
    probs = torch.softmax(logits.float(), dim=-1).tolist()
    best = max(range(len(probs)), key=probs.__getitem__)
    return {"label": labels[best], "scores": dict(zip(labels, probs, strict=True))}


def bio_entities(
    text: str,
    token_logits: torch.Tensor,
    offsets: list[tuple[int, int]],
    labels: list[str],
) -> list[dict]:
    """Decode per-token BIO predictions into word-level entities.

    Args:
        text: the input text the offsets point into.
        token_logits: [tokens, num_labels].
        offsets: (start, end) character span of each token; (0, 0) marks special tokens (skipped).
        labels: the BIO tag set (e.g. O, B-PER, I-PER), index = class id.

    Returns:
        Entities {"type", "text", "start", "end", "score"}. Trainers label only a word's first
        sub-token, so a word takes its first token's tag and the rest of its tokens only extend the
        span (transformers' "first" aggregation). Score is the mean top softmax probability of the
        entity's words. An I- tag that does not continue an entity of its type starts a new one.
    """
    probs = torch.softmax(token_logits.float(), dim=-1)
    top_prob, top_id = probs.max(dim=-1)
    entities: list[dict] = []
    current: dict | None = None
    previous_end = -1
    for (start, end), tag_id, prob in zip(offsets, top_id.tolist(), top_prob.tolist(), strict=True):
        if start == end:
            continue
        inside_word = (
            start == previous_end
            and start > 0
            and not text[start].isspace()
            and not text[start - 1].isspace()
        )
        previous_end = end
        if inside_word:
            if current is not None:
                current["end"] = end
            continue
        tag = labels[tag_id]
        prefix, _, kind = tag.partition("-")
        if not kind and tag != "O":  # IO tagging ("PER"): a plain tag continues its type
            prefix, kind = "I", tag
        if prefix == "I" and current is not None and current["type"] == kind:
            current["end"] = end
            current["probs"].append(prob)
            continue
        if current is not None:
            entities.append(_finish(text, current))
            current = None
        if prefix in ("B", "I") and kind:
            current = {"type": kind, "start": start, "end": end, "probs": [prob]}
    if current is not None:
        entities.append(_finish(text, current))
    return entities


def _finish(text: str, entity: dict) -> dict:
    start, end = entity["start"], entity["end"]
    while start < end and text[start].isspace():  # byte-level BPE tokens may carry their space
        start += 1
    return {
        "type": entity["type"],
        "text": text[start:end],
        "start": start,
        "end": end,
        "score": sum(entity["probs"]) / len(entity["probs"]),
    }
