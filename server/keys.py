"""Scoped API keys: the `--keys-file` format, its validation, and what one key may use.

A keys file is a JSON list with one object per key:

    {"name": "team-a", "key_sha256": "<64 hex>" (or "key": "<clear text>", for tests),
     "adapters": ["team-a/*", "shared/*"], "rights": ["infer", "feedback", "admin"],
     "requests_per_minute": 600, "tokens_per_minute": 100000}

`adapters` are case-sensitive `fnmatch` globs over adapter names (the base counts as an adapter named as
the base); `rights` say which families of routes the key opens (`infer`: inference, listings, metrics;
`feedback`: the human feedback routes; `admin`: load, pin, unpin, unload). Limits are optional.

Boundary: parsing and the scope rule only. Which path needs which right is `server.access`'s; counting
requests and tokens is `server.quotas`'s. A malformed file is refused whole, with every bad entry listed,
so an operator fixes it in one pass instead of one error per restart.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.errors import ServerConfigError

INFER, FEEDBACK, ADMIN_RIGHT = "infer", "feedback", "admin"
RIGHTS = (INFER, FEEDBACK, ADMIN_RIGHT)
FIELDS = frozenset(
    {"name", "key", "key_sha256", "adapters", "rights", "requests_per_minute", "tokens_per_minute"}
)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")


@dataclass(frozen=True)
class ScopedKey:
    """One key of a keys file: who it is, the adapters it may use, its rights and its limits."""

    name: str
    """Shown in metrics and errors; never the secret."""
    digest: bytes = field(repr=False)
    """sha256 of the secret (the clear key is never kept)."""
    adapters: tuple[str, ...]
    """Globs over adapter names (and the base's name) this key may use."""
    rights: frozenset[str]
    """A subset of RIGHTS."""
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None

    def may_use(self, name: str) -> bool:
        """Whether an adapter (or base) named `name` is inside this key's scope."""
        return any(fnmatch.fnmatchcase(name, glob) for glob in self.adapters)

    @property
    def limited(self) -> bool:
        return self.requests_per_minute is not None or self.tokens_per_minute is not None


def digest(secret: str) -> bytes:
    """The sha256 a key is stored and compared as."""
    return hashlib.sha256(secret.encode("utf-8")).digest()


def read_keys_file(path: Path) -> tuple[ScopedKey, ...]:
    """Read and check a keys file.

    Raises:
        ServerConfigError: the file is unreadable or not a JSON list, or lists every bad entry (by index
        and name, never showing a secret).
    """
    try:
        entries = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ServerConfigError(
            f"Keys file {path} cannot be read as JSON: {exc}.",
            "Write a JSON list of key objects; docs/server.md#scoped-keys-and-quotas shows one.",
        ) from exc
    if not isinstance(entries, list) or not entries:
        raise ServerConfigError(
            f"Keys file {path} must hold a non-empty JSON list of key objects.",
            "Write a JSON list of key objects; docs/server.md#scoped-keys-and-quotas shows one.",
        )
    return parse_keys(entries, source=str(path))


def parse_keys(entries: list[Any], *, source: str = "keys file") -> tuple[ScopedKey, ...]:
    """Check every entry and report all problems at once.

    Raises:
        ServerConfigError: naming each bad entry and what is wrong with it.
    """
    keys: list[ScopedKey] = []
    problems: list[str] = []
    for index, entry in enumerate(entries):
        key, entry_problems = _parse_entry(entry)
        label = f"entry {index}" + (f" ({entry['name']!r})" if _has_name(entry) else "")
        problems += [f"{label}: {p}" for p in entry_problems]
        if key is not None:
            keys.append(key)
    problems += _duplicates(keys)
    if problems:
        raise ServerConfigError(
            f"{source} has {len(problems)} problem(s): " + "; ".join(problems) + ".",
            "Fix every listed entry; docs/server.md#scoped-keys-and-quotas describes the fields.",
        )
    return tuple(keys)


def _has_name(entry: Any) -> bool:
    return isinstance(entry, dict) and isinstance(entry.get("name"), str)


def _parse_entry(entry: Any) -> tuple[ScopedKey | None, list[str]]:
    """One entry as a key, or None and what is wrong with it."""
    if not isinstance(entry, dict):
        return None, [f"is a {type(entry).__name__}, not an object"]
    problems = [f"unknown field {name!r}" for name in sorted(set(entry) - FIELDS)]
    name = entry.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        problems.append("`name` must be 1-64 letters, digits, '.', '_' or '-'")
    secret = _secret(entry, problems)
    adapters = entry.get("adapters")
    if not isinstance(adapters, list) or not adapters or not all(isinstance(a, str) and a for a in adapters):
        problems.append('`adapters` must be a non-empty list of globs such as "team-a/*"')
    rights = entry.get("rights")
    if not isinstance(rights, list) or not rights or not all(r in RIGHTS for r in rights):
        problems.append(f"`rights` must be a non-empty list drawn from {', '.join(RIGHTS)}")
    limits = {}
    for limit in ("requests_per_minute", "tokens_per_minute"):
        value = entry.get(limit)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            problems.append(f"`{limit}` must be a positive integer (or left out for no limit)")
        limits[limit] = value
    if problems or secret is None:
        return None, problems
    return ScopedKey(name, secret, tuple(adapters), frozenset(rights), **limits), []


def _secret(entry: dict[str, Any], problems: list[str]) -> bytes | None:
    """The entry's key digest from `key_sha256` or `key` (exactly one of them)."""
    clear, hashed = entry.get("key"), entry.get("key_sha256")
    if (clear is None) == (hashed is None):
        problems.append("give exactly one of `key_sha256` (hex) or `key` (clear text)")
        return None
    if hashed is not None:
        if not isinstance(hashed, str) or not _SHA256.match(hashed):
            problems.append("`key_sha256` must be 64 hex digits (sha256 of the key)")
            return None
        return bytes.fromhex(hashed)
    if not isinstance(clear, str) or not clear.strip() or clear != clear.strip():
        problems.append("`key` must be a non-empty string without surrounding spaces")
        return None
    return digest(clear)


def _duplicates(keys: list[ScopedKey]) -> list[str]:
    problems = []
    names = [k.name for k in keys]
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"name {name!r} is used by more than one entry")
    digests = [k.digest for k in keys]
    for key in keys:
        if digests.count(key.digest) > 1:
            problems.append(f"entry {key.name!r} shares its secret with another entry")
    return problems
