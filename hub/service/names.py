"""Validation of what clients name: repo ids, revisions (branches, tags, commits) and file paths in a repo.

Boundary: pure string rules, no storage. Every name the service stores or looks up passed through here first;
blobs live under their sha256, so no client string ever becomes a path on disk.
"""

from __future__ import annotations

import re

from hub import ref
from hub.errors import InvalidReferenceError
from hub.service.errors import BadRequestError

MAX_REPO_NAME = ref.MAX_REPO_NAME
MAX_PATH = 1024
MAX_PATH_SEGMENT = 255
MAX_REVISION = 128
RESERVED_NAMESPACES = frozenset({"api", "static", "models", "datasets", "spaces", "lfs"})

_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
COMMIT_OID = re.compile(r"^[0-9a-f]{40}$")
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


def _has_control(text: str) -> bool:
    return any(ord(c) < 32 or ord(c) == 127 for c in text)


def validate_repo_id(repo_id: str) -> str:
    """Return `repo_id` if it is `namespace/name` with HF's naming rules (`hub.ref.validate_repo_id`)
    and its namespace is not one of the service's own URL prefixes.

    Raises:
        BadRequestError: naming the rule broken.
    """
    try:
        ref.validate_repo_id(repo_id)
    except InvalidReferenceError as exc:
        raise BadRequestError(exc.message, exc.remedy) from exc
    namespace = repo_id.split("/")[0]
    if namespace.lower() in RESERVED_NAMESPACES:
        raise BadRequestError(
            f"Namespace {namespace!r} is reserved: it names a route of the service.",
            f"Use NAMESPACE/NAME with a namespace other than {', '.join(sorted(RESERVED_NAMESPACES))}.",
        )
    return repo_id


def validate_revision(revision: str) -> str:
    """Return `revision` if it can name a branch, a tag or a commit (no '/', no '..')."""
    remedy = "Branch and tag names use letters, digits, '-', '_' and '.', without '/' or '..'."
    if (
        not isinstance(revision, str)
        or not revision
        or len(revision) > MAX_REVISION
        or _has_control(revision)
        or not _REVISION.match(revision)
        or ".." in revision
        or revision.endswith(".lock")
    ):
        raise BadRequestError(f"Invalid revision {revision!r}.", remedy)
    return revision


def validate_path(path: str) -> str:
    """Return `path` if it is a relative POSIX path inside a repo.

    Raises:
        BadRequestError: for absolute paths, `..` or `.` segments, empty segments, backslashes, control
            characters, `.git` folders, or lengths over the bounds.
    """
    remedy = "File paths are relative POSIX paths without '..', control characters or backslashes."
    if not isinstance(path, str) or not path:
        raise BadRequestError("File path is empty.", remedy)
    shown = path[:80]
    if len(path) > MAX_PATH:
        raise BadRequestError(f"File path {shown!r}... is longer than {MAX_PATH} characters.", remedy)
    if _has_control(path):
        raise BadRequestError(f"File path {shown!r} contains control characters.", remedy)
    if path.startswith("/") or "\\" in path:
        raise BadRequestError(f"File path {shown!r} is absolute or uses backslashes.", remedy)
    for segment in path.split("/"):
        if segment in ("", ".", "..", ".git"):
            raise BadRequestError(f"File path {shown!r} has an empty, '.', '..' or '.git' part.", remedy)
        if len(segment) > MAX_PATH_SEGMENT:
            raise BadRequestError(f"File path {shown!r} has a part over {MAX_PATH_SEGMENT} chars.", remedy)
    return path


def validate_folder(path: str) -> str:
    """Like `validate_path`, for a folder given with or without a trailing '/'."""
    return validate_path(path.rstrip("/"))
