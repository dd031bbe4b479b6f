"""The one record format every trainer reads: small frozen dataclasses, one per kind of example.

Readers (`trainers.data.readers`) turn files into these records; `trainers.data.tokenize` turns
records into token ids. Nothing here knows about files or tokenizers. Every record carries an
`Origin` (file and line) so any later problem can be reported where the user can fix it.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

ROLES = ("system", "user", "assistant")
R = TypeVar("R")


@dataclass(frozen=True)
class Origin:
    """Where a record came from: a file and a 1-based line number (0 when not line-based)."""

    path: str
    line: int = 0

    def __str__(self) -> str:
        return f"{self.path}:{self.line}" if self.line else self.path


@dataclass(frozen=True)
class Message:
    """One chat turn: `role` is one of `ROLES`, `content` is plain text."""

    role: str
    content: str

    def to_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


@dataclass(frozen=True)
class TextRecord:
    """A text with a class label (classification); `label` is a string ("0" for integer 0)."""

    text: str
    label: str
    origin: Origin


@dataclass(frozen=True)
class TokensRecord:
    """A sentence as words with one BIO tag per word (NER)."""

    tokens: tuple[str, ...]
    tags: tuple[str, ...]
    origin: Origin


@dataclass(frozen=True)
class ChatRecord:
    """A conversation (instruction tuning); the loss falls on the assistant turns only."""

    messages: tuple[Message, ...]
    origin: Origin


@dataclass(frozen=True)
class PreferenceRecord:
    """A preference pair: a shared prompt and two assistant continuations (reward, DPO).

    `prompt` ends with a user turn; `chosen` and `rejected` are the assistant turns that follow it.
    """

    prompt: tuple[Message, ...]
    chosen: tuple[Message, ...]
    rejected: tuple[Message, ...]
    origin: Origin


@dataclass(frozen=True)
class PromptRecord:
    """A prompt to sample completions for (PPO): ending with a user turn."""

    prompt: tuple[Message, ...]
    origin: Origin


def split_off_eval(
    records: Sequence[R], fraction: float, seed: int, key: Callable[[R], str] | None = None
) -> tuple[list[R], list[R]]:
    """Hold out `fraction` of `records` for eval, deterministically for a seed.

    With `key` (e.g. the class label) the split is stratified: each group gives the same share,
    so every eval label also occurs in train (groups of one stay in train).

    Returns:
        (train, eval), each in the original order.
    """
    groups: dict[str, list[int]] = {}
    for index, record in enumerate(records):
        groups.setdefault(key(record) if key else "", []).append(index)
    rng, held_out = random.Random(seed), set()
    for name in sorted(groups):
        indices = groups[name]
        rng.shuffle(indices)
        count = round(len(indices) * fraction) if len(indices) > 1 else 0
        held_out.update(indices[: min(count, len(indices) - 1)] if count else [])
    if not held_out and len(records) > 1:
        held_out.add(rng.randrange(len(records)))
    train = [r for i, r in enumerate(records) if i not in held_out]
    return train, [r for i, r in enumerate(records) if i in held_out]
