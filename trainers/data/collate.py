"""Pad lists of tokenized examples into batch tensors (right padding).

Boundary: `trainers.data.tokenize` dicts in, `torch.Tensor` batches out. `input_ids` are padded
with the tokenizer's pad id, `attention_mask` with 0, token-level `labels` with -100; a scalar
`labels` (classification) becomes a 1-D tensor. Any other key holding equal-length lists or
scalars is stacked too. Preference pairs (`EncodedPair`s) have their own `collate_pairs`: chosen
and rejected rows in one batch, loss only on the replies.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from trainers.data.tokenize import IGNORE_INDEX, EncodedPair


def pad_sequences(rows: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    """Right-pad integer lists to the longest one."""
    width = max((len(row) for row in rows), default=0)
    return torch.tensor([list(row) + [value] * (width - len(row)) for row in rows], dtype=torch.long)


def _pad_value(key: str, pad_token_id: int) -> int:
    if key.endswith("input_ids"):
        return pad_token_id
    return IGNORE_INDEX if key.endswith("labels") else 0


def collate_fn(pad_token_id: int) -> Callable[[Sequence[dict[str, Any]]], dict[str, torch.Tensor]]:
    """A DataLoader `collate_fn` padding every list-valued field of the examples.

    Args:
        pad_token_id: the id used to pad `input_ids` (and any other `*input_ids` key).
    """

    def collate(examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = {}
        for key in examples[0]:
            values = [example[key] for example in examples]
            if isinstance(values[0], (list, tuple)):
                batch[key] = pad_sequences(values, _pad_value(key, pad_token_id))
            elif isinstance(values[0], float):
                batch[key] = torch.tensor(values, dtype=torch.float)
            else:
                batch[key] = torch.tensor(values)
        return batch

    return collate


def collate_pairs(batch: Sequence[EncodedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors for a batch of pairs: rows [0, B) are chosen, [B, 2B) rejected.

    Returns `input_ids`, `attention_mask` and `labels` ([2B, T]; -100 on prompt and padding).
    """
    rows = [(p.prompt_ids, p.chosen_ids) for p in batch]
    rows += [(p.prompt_ids, p.rejected_ids) for p in batch]
    width = max(len(prompt) + len(reply) for prompt, reply in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for index, (prompt, reply) in enumerate(rows):
        ids = prompt + reply
        input_ids[index, : len(ids)] = torch.tensor(ids)
        attention[index, : len(ids)] = 1
        labels[index, len(prompt) : len(ids)] = torch.tensor(reply, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
