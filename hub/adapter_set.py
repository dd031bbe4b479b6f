"""Weighted adapter sets, `tone@2*0.5+facts@1*0.5`: the one owner of their syntax and canonical key.

A set names up to `MAX_SET_PARTS` adapter references joined by `+`, each optionally followed by `*weight`
(weight 1 when absent). `*` and `+` can never occur in an adapter name, a version or a tag (`hub.ref`), so
the form is unambiguous and a plain reference is never read as a set. What a set means (the weighted sum
of the parts' LoRA deltas on one row) is the server's business (`server.adapter_sets`).

Boundary: pure string rules, no file access, no torch.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from hub.errors import InvalidReferenceError
from hub.ref import AdapterRef

MAX_SET_PARTS = 8
"""Most adapters one request may combine."""
PART_SEPARATOR = "+"
WEIGHT_SEPARATOR = "*"
_WEIGHT = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
"""A decimal number (no `inf`, `nan`, `_` or hex, which Python's float() would also take)."""
SET_REMEDY = (
    "Write a weighted set as REF*WEIGHT+REF*WEIGHT (e.g. tone@2*0.5+facts@1*0.5): at most "
    f"{MAX_SET_PARTS} distinct adapter references, each with an optional finite decimal weight (default 1)."
)


@dataclass(frozen=True)
class SetPart:
    """One adapter of a set and its weight."""

    ref: AdapterRef
    weight: float


def is_adapter_set(text: str) -> bool:
    """Whether `text` is written as a weighted set (it holds `+` or `*`) rather than one reference."""
    return isinstance(text, str) and (PART_SEPARATOR in text or WEIGHT_SEPARATOR in text)


def parse_adapter_set(text: str) -> tuple[SetPart, ...]:
    """Parse `ref*w+ref*w+...` into its parts, in the order written.

    Raises:
        InvalidReferenceError: an empty part, a malformed or non-finite weight, an invalid reference, the
            same reference twice, or more than MAX_SET_PARTS parts; the message names the part.
    """
    pieces = text.split(PART_SEPARATOR)
    if len(pieces) > MAX_SET_PARTS:
        raise InvalidReferenceError(
            f"Adapter set {text[:200]!r} has {len(pieces)} parts; at most {MAX_SET_PARTS}.", SET_REMEDY
        )
    parts: list[SetPart] = []
    for piece in pieces:
        ref_text, sep, weight_text = piece.partition(WEIGHT_SEPARATOR)
        if not ref_text:
            raise InvalidReferenceError(f"Adapter set {text!r} has an empty part.", SET_REMEDY)
        weight = _weight(text, piece, weight_text) if sep else 1.0
        parts.append(SetPart(AdapterRef.parse(ref_text), weight))
    refs = [str(part.ref) for part in parts]
    repeated = sorted({r for r in refs if refs.count(r) > 1})
    if repeated:
        raise InvalidReferenceError(
            f"Adapter set {text!r} names {', '.join(repeated)} more than once.",
            "Name each adapter once and give it the sum of the weights.",
        )
    return tuple(parts)


def _weight(text: str, piece: str, weight_text: str) -> float:
    if not _WEIGHT.fullmatch(weight_text):
        raise InvalidReferenceError(
            f"Adapter set {text!r}: part {piece!r} has weight {weight_text!r}, not a decimal number.",
            SET_REMEDY,
        )
    weight = float(weight_text)
    if not math.isfinite(weight):
        raise InvalidReferenceError(
            f"Adapter set {text!r}: part {piece!r} has a weight too large to be finite.", SET_REMEDY
        )
    return weight


def names_in(key: str) -> list[str]:
    """The adapter names a resident key holds: one for `name@version`, each part's for a set's key.

    Lets a listing show a set only to a caller allowed to use every one of its parts.
    """
    pieces = key.split(PART_SEPARATOR) if is_adapter_set(key) else [key]
    return [piece.partition(WEIGHT_SEPARATOR)[0].rpartition("@")[0] or piece for piece in pieces]


def set_key(parts: list[tuple[str, float]]) -> str:
    """The canonical key of a set of resolved `name@version`s and weights: sorted, weights as `repr` floats.

    Two requests that write the same immutable versions and weights (in any order) share one key, hence
    one combined adapter in the server's cache; a moved tag gives another key.
    """
    return PART_SEPARATOR.join(f"{key}{WEIGHT_SEPARATOR}{weight!r}" for key, weight in sorted(parts))
