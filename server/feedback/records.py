"""Human feedback records: answer pairs, judgements, and the left/right view each rater gets.

`a`/`b` are canonical: the page shows each rater the two answers as left/right in an order drawn from
the pair's shuffle seed and the rater's name (`swapped_for`); `to_canonical` maps a left/right click back
and `to_view` maps it forward again. Boundary: plain data and pure functions; no storage, no HTTP.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from hub.errors import AdapterDockError

CHOICES = ("a", "b", "tie", "both_bad")
VIEW_CHOICES = ("left", "right")
"""Choices in display terms, as the page sends them; mapped to a/b per rater."""
MAX_RATER_LENGTH = 64
MAX_COMMENT_LENGTH = 4000


class InvalidJudgementError(AdapterDockError, ValueError):
    """A judgement with an unknown choice or a bad rater name."""

    default_remedy = (
        "Send choice a, b, tie or both_bad (left/right from the page) and a rater name of "
        f"1 to {MAX_RATER_LENGTH} printable characters."
    )


@dataclass(frozen=True)
class Pair:
    """Two answers to one prompt, and where each came from."""

    pair_id: str
    prompt: str | list[dict[str, str]]
    """A plain prompt (one user turn) or chat messages, as the request sent it."""
    answer_a: str
    answer_b: str
    adapter_a: str
    """Adapter name, or the base's name for no adapter."""
    version_a: int | None
    adapter_b: str
    version_b: int | None
    params: dict[str, Any] = field(default_factory=dict)
    """Sampling parameters, including each answer's seed."""
    shuffle_seed: int = 0
    created_at: str = ""

    @property
    def model_a(self) -> str:
        """`name@version` of answer a (the bare name for the base)."""
        return model_label(self.adapter_a, self.version_a)

    @property
    def model_b(self) -> str:
        return model_label(self.adapter_b, self.version_b)

    def swapped_for(self, rater: str) -> bool:
        """Whether `rater` sees answer b on the left (stable per pair and rater)."""
        return swapped_for(self.shuffle_seed, rater)

    def view(self, rater: str) -> tuple[str, str]:
        """(left, right) answers as `rater` sees them."""
        if self.swapped_for(rater):
            return self.answer_b, self.answer_a
        return self.answer_a, self.answer_b


@dataclass(frozen=True)
class Judgement:
    """One rater's verdict on one pair (choice in canonical a/b terms)."""

    pair_id: str
    rater: str
    choice: str
    comment: str = ""
    swapped: bool | None = None
    """For left/right judgements: whether b was shown on the left; None for direct a/b ones."""
    created_at: str = ""
    updated_at: str = ""


@dataclass(frozen=True)
class JudgeResult:
    """What `FeedbackStore.judge` did: status `recorded`, `unchanged` or `replaced`."""

    status: str
    judgement: Judgement
    previous: Judgement | None = None


def swapped_for(shuffle_seed: int, rater: str) -> bool:
    """Whether `rater` is shown answer b on the left of a pair with `shuffle_seed`."""
    digest = hashlib.sha256(f"{shuffle_seed}:{rater}".encode()).digest()
    return bool(digest[0] & 1)


def model_label(adapter: str, version: int | None) -> str:
    """`name@version`, or the bare name for the base (no version)."""
    return adapter if version is None else f"{adapter}@{version}"


def check_rater(rater: str) -> str:
    """The rater name, stripped; raises InvalidJudgementError when empty, too long or unprintable."""
    name = rater.strip() if isinstance(rater, str) else ""
    if not name or len(name) > MAX_RATER_LENGTH or not name.isprintable():
        raise InvalidJudgementError(f"Rater name {rater!r} is not usable.")
    return name


def to_canonical(choice: str, swapped: bool) -> str:
    """Map a choice (a/b/tie/both_bad, or left/right as shown with `swapped`) to a/b/tie/both_bad."""
    if choice in CHOICES:
        return choice
    if choice in VIEW_CHOICES:
        return ("b" if swapped else "a") if choice == "left" else ("a" if swapped else "b")
    raise InvalidJudgementError(f"Choice {choice!r} is not one of {', '.join(CHOICES + VIEW_CHOICES)}.")


def to_view(choice: str, swapped: bool) -> str:
    """The inverse of `to_canonical` for a rater who judged by position."""
    if choice == "a":
        return "right" if swapped else "left"
    if choice == "b":
        return "left" if swapped else "right"
    return choice
