"""Who may read and write which repos of the hub service: the token file, hashed tokens, access checks.

Token file (`--token-file`), one token per line, `#` starts a comment:

    # TOKEN                 ACCESS   REPOS (globs, default *)   USER (default: token-<hash prefix>)
    hf_team_a_7Qx...        write    acme/*,shared/*            alice
    sha256:9f86d081884c...  read     *                          ci

ACCESS is `read` or `write` (write implies read). A repo belongs to its namespace: a write glob names its
namespace literally (`acme/*`, `acme/chat-*`), or is `*` (every namespace, for an operator), so no glob
such as `ac*/*` or `*/chat` can reach into another namespace's repos; a write line with a wildcard in its
namespace is refused when the file is read. A token may be given as `sha256:<hex>` (the sha256 of the
token) so the file need not hold secrets. The same data may be a JSON list of objects
`{"token" | "token_sha256", "access", "repos": [...], "user"}`. Only sha256 hashes are kept (in memory and in
the SQLite index); a presented token is hashed and compared against every entry with `hmac.compare_digest`.

Rules: an unknown token gets 401 on every request; writing needs a token (401 without, 403 without rights);
a private repo is read only with a token that covers it, and to anyone else it is answered exactly as a
missing repo (404 `RepoNotFound`, the same message). Without a token file the service
runs open: anyone reads and writes everything (for a laptop; `serve` warns unless bound to loopback).
Boundary: decisions only; the routes ask, storage knows nothing of users.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from hub.errors import AdapterDockError
from hub.service.errors import ForbiddenError, RepoNotFoundError, UnauthorizedError

logger = logging.getLogger(__name__)

ACCESS_LEVELS = ("read", "write")
INVALID_TOKEN_MESSAGE = "Invalid credentials in Authorization header"  # HF's wording; the client keys on it


class TokenFileError(AdapterDockError, ValueError):
    """A token file that cannot be parsed; the message lists every bad line."""

    default_remedy = "Each line is `TOKEN read|write [REPO-GLOB,...] [USER]`; see `hub/service/auth.py`."


@dataclass(frozen=True)
class Grant:
    """What one token allows: a user name, an access level and the repos it applies to."""

    user: str
    access: str
    repos: tuple[str, ...] = ("*",)

    def covers(self, repo_id: str) -> bool:
        return any(fnmatch.fnmatchcase(repo_id, pattern) for pattern in self.repos)

    def can_read(self, repo_id: str) -> bool:
        return self.covers(repo_id)

    def can_write(self, repo_id: str) -> bool:
        """Write rights: a glob of the repo's own namespace (named literally) covers it, or `*`."""
        if self.access != "write":
            return False
        namespace, _, name = repo_id.partition("/")
        for pattern in self.repos:
            if pattern == "*":
                return True
            owner, sep, names = pattern.partition("/")
            if sep and owner == namespace and fnmatch.fnmatchcase(name, names):
                return True
        return False


ANONYMOUS_WRITER = Grant(user="anonymous", access="write", repos=("*",))


def hash_token(token: str) -> str:
    """Hex sha256 of a token (tokens are random, so an unsalted hash is safe to store)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def parse_token_file(path: Path) -> dict[str, Grant]:
    """Read a token file into `{token_sha256: Grant}`.

    Raises:
        TokenFileError: listing every malformed line.
    """
    text = Path(path).read_text(encoding="utf-8")
    entries: list[tuple[str, str, str, list[str], str | None]] = []  # (where, secret, access, repos, user)
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TokenFileError(f"{path} is not valid JSON: {exc}.") from exc
        for i, item in enumerate(data if isinstance(data, list) else [data]):
            item = item if isinstance(item, dict) else {}
            secret = item.get("token") or ("sha256:" + str(item.get("token_sha256") or ""))
            repos = item.get("repos", ["*"])
            entries.append((f"entry {i}", secret, item.get("access", ""), list(repos), item.get("user")))
    else:
        for lineno, raw in enumerate(text.splitlines(), start=1):
            fields = raw.split("#", 1)[0].split()
            if not fields:
                continue
            repos = fields[2].split(",") if len(fields) > 2 else ["*"]
            user = fields[3] if len(fields) > 3 else None
            access = fields[1] if len(fields) > 1 else ""
            entries.append((f"line {lineno}", fields[0], access, repos, user))
    grants: dict[str, Grant] = {}
    problems: list[str] = []
    for where, secret, access, repos, user in entries:
        digest = _digest_of(secret)
        if digest is None:
            problems.append(f"{where}: token is empty or not `sha256:<64 hex>`")
            continue
        if access not in ACCESS_LEVELS:
            problems.append(f"{where}: access must be read or write, got {access!r}")
            continue
        if not repos or not all(isinstance(r, str) and r for r in repos):
            problems.append(f"{where}: repos must be non-empty globs")
            continue
        shared = [r for r in repos if access == "write" and not _owns_namespace(r)]
        if shared:
            problems.append(
                f"{where}: write globs must name one namespace literally (NAMESPACE/GLOB) or be '*'; "
                f"{', '.join(shared)} could reach into other namespaces"
            )
            continue
        grants[digest] = Grant(user=user or f"token-{digest[:8]}", access=access, repos=tuple(repos))
    if problems:
        raise TokenFileError(f"Token file {path}: " + "; ".join(problems) + ".")
    return grants


def _owns_namespace(pattern: str) -> bool:
    """`*`, or `NAMESPACE/GLOB` with no wildcard in NAMESPACE."""
    if pattern == "*":
        return True
    owner, sep, _ = pattern.partition("/")
    return bool(sep and owner) and not any(c in owner for c in "*?[]")


def _digest_of(secret: str) -> str | None:
    if not isinstance(secret, str) or not secret:
        return None
    if secret.startswith("sha256:"):
        digest = secret.removeprefix("sha256:").lower()
        return digest if len(digest) == 64 and all(c in "0123456789abcdef" for c in digest) else None
    return hash_token(secret)


class Authenticator:
    """Maps a request's token to a `Grant` and checks it against a repo."""

    def __init__(self, grants: dict[str, Grant] | None) -> None:
        """`grants` keyed by token sha256; None means open mode (no token file)."""
        self.open = grants is None
        self._grants = grants or {}

    def identify(self, authorization: str | None) -> Grant | None:
        """The grant of the bearer token in an Authorization header; None when no token was sent.

        Raises:
            UnauthorizedError: a token was sent that the service does not know.
        """
        token = _bearer(authorization)
        if self.open:
            return ANONYMOUS_WRITER
        if token is None:
            return None
        digest = hash_token(token).encode()
        found: Grant | None = None
        for known, grant in self._grants.items():  # no early exit: same work for every token
            if hmac.compare_digest(digest, known.encode()):
                found = grant
        if found is None:
            raise UnauthorizedError(INVALID_TOKEN_MESSAGE + ".", "Check the token, or ask for a new one.")
        return found

    def check_read(self, grant: Grant | None, repo_id: str, private: bool) -> None:
        """Raise unless `grant` may read `repo_id` (public repos are readable without a token).

        A private repo the caller may not read answers exactly as a missing one (`RepoNotFoundError`), so
        its existence does not leak.
        """
        if not private or (grant is not None and grant.can_read(repo_id)):
            return
        raise RepoNotFoundError(f"Repository {repo_id} not found.")

    def check_write(self, grant: Grant | None, repo_id: str) -> None:
        """Raise unless `grant` may write `repo_id`."""
        if grant is None:
            raise UnauthorizedError(f"Writing to {repo_id} needs a token.")
        if not grant.can_write(repo_id):
            level = "read-only" if grant.access == "read" else "write"
            raise ForbiddenError(f"Token of {grant.user!r} ({level}) has no write access to {repo_id}.")


def _bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()
