"""Adapter names and references (`name`, `name@3`, `name@prod`) and hub repo ids: parsing and validation.

Boundary: pure string rules, no file access. Every path the store builds comes from a name that passed
`validate_name`, so a reference can never point outside the registry.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from hub.errors import InvalidReferenceError

MAX_NAME_LENGTH = 96
MAX_REPO_NAME = 96
_SEGMENT = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_TAG = re.compile(r"^[a-z][a-z0-9._-]{0,63}$")
_REPO_SEGMENT = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?$")
RESERVED_NAMES = frozenset({"tags.json", "manifest.json", "readme.md"})
"""Names of the registry's own files (compared case-insensitively): never an adapter name or namespace."""
_REPO_REMEDY = (
    "Hub repo ids are NAMESPACE/NAME (e.g. acme/sentiment-lora): letters, digits, '-', '_' and '.', "
    f"at most {MAX_REPO_NAME} characters each, starting and ending with a letter or digit."
)


def _has_control(text: str) -> bool:
    return any(ord(c) < 32 or ord(c) == 127 for c in text)


def validate_name(name: str) -> str:
    """Return `name` if it is a valid adapter name (`name` or `namespace/name`).

    Raises:
        InvalidReferenceError: naming the rule that `name` breaks.
    """
    if not isinstance(name, str) or not name:
        raise InvalidReferenceError("Adapter name is empty.")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidReferenceError(f"Adapter name is {len(name)} characters; at most {MAX_NAME_LENGTH}.")
    if _has_control(name):
        raise InvalidReferenceError(f"Adapter name {name!r} contains control characters.")
    segments = name.split("/")
    if len(segments) > 2:
        raise InvalidReferenceError(f"Adapter name {name!r} has more than one '/'.")
    for segment in segments:
        if segment in ("", ".", "..") or not _SEGMENT.fullmatch(segment) or ".." in segment:
            raise InvalidReferenceError(f"Invalid adapter name {name!r}.")
        if segment.lower() in RESERVED_NAMES:
            raise InvalidReferenceError(
                f"Adapter name {name!r} uses {segment!r}, a file name the registry keeps for itself.",
                f"Pick a name without a part named {', '.join(sorted(RESERVED_NAMES))}.",
            )
        if segment.isdigit():
            raise InvalidReferenceError(
                f"Adapter name {name!r} has an all-digit part, which would read as a version."
            )
    return name


def validate_tag(tag: str) -> str:
    """Return `tag` if it is a valid movable tag (`prod`, `staging`, ...); numbers are versions, not tags."""
    if not isinstance(tag, str) or not _TAG.fullmatch(tag):  # fullmatch: `$` would allow a final "\n"
        raise InvalidReferenceError(
            f"Invalid tag {tag!r}.",
            "Tags start with a lowercase letter and use lowercase letters, digits, '-', '_' and '.'.",
        )
    return tag


def validate_repo_id(repo_id: str) -> str:
    """Return `repo_id` if it is a hub repo id `namespace/name` under Hugging Face's naming rules.

    Raises:
        InvalidReferenceError: naming the rule broken.
    """
    if not isinstance(repo_id, str) or not repo_id:
        raise InvalidReferenceError("Hub repo id is empty.", _REPO_REMEDY)
    if _has_control(repo_id):
        raise InvalidReferenceError(f"Hub repo id {repo_id!r} contains control characters.", _REPO_REMEDY)
    parts = repo_id.split("/")
    if len(parts) != 2:
        raise InvalidReferenceError(f"Hub repo id {repo_id!r} must have exactly one '/'.", _REPO_REMEDY)
    for part in parts:
        if len(part) > MAX_REPO_NAME:
            raise InvalidReferenceError(
                f"Hub repo id part {part[:20]!r}... is longer than {MAX_REPO_NAME}.", _REPO_REMEDY
            )
        if not _REPO_SEGMENT.match(part) or ".." in part or "--" in part:
            raise InvalidReferenceError(f"Invalid hub repo id {repo_id!r}.", _REPO_REMEDY)
    return repo_id


@dataclass(frozen=True)
class AdapterRef:
    """A reference to an adapter: a name plus at most one of version or tag."""

    name: str
    version: int | None = None
    tag: str | None = None

    def __post_init__(self) -> None:
        validate_name(self.name)
        if self.version is not None and self.tag is not None:
            raise InvalidReferenceError(f"Reference to {self.name!r} has both a version and a tag.")
        if self.version is not None and (not isinstance(self.version, int) or self.version < 1):
            raise InvalidReferenceError(
                f"Version {self.version!r} of {self.name!r} is not a positive integer."
            )
        if self.tag is not None:
            validate_tag(self.tag)

    @classmethod
    def parse(cls, text: str | AdapterRef) -> AdapterRef:
        """Parse `name`, `name@3` or `name@tag`.

        Raises:
            InvalidReferenceError: for anything else (paths, empty parts, several '@').
        """
        if isinstance(text, AdapterRef):
            return text
        if not isinstance(text, str):
            raise InvalidReferenceError(f"Adapter reference must be a string, got {type(text).__name__}.")
        name, sep, suffix = text.partition("@")
        if not sep:
            return cls(name)
        if not suffix or "@" in suffix:
            raise InvalidReferenceError(f"Invalid adapter reference {text!r}.")
        if suffix.isdigit():
            return cls(name, version=int(suffix))
        if suffix.startswith("v") and suffix[1:].isdigit():
            return cls(name, version=int(suffix[1:]))
        return cls(name, tag=suffix)

    @property
    def is_pinned(self) -> bool:
        """True when the reference names an immutable version."""
        return self.version is not None

    def __str__(self) -> str:
        if self.version is not None:
            return f"{self.name}@{self.version}"
        if self.tag is not None:
            return f"{self.name}@{self.tag}"
        return self.name
