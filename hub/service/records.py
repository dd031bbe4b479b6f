"""What the hub service's index holds, as frozen dataclasses: repos, commits, files, commit operations.

Boundary: plain values and the two git-compatible ids the HF API reports (blob oid, LFS pointer). No I/O.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timezone


def utc_now() -> str:
    """ISO-8601 UTC with milliseconds and a Z, the form the HF API returns."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def git_blob_oid(data: bytes) -> str:
    """The git object id of a file's bytes (sha1 of `blob <size>\\0<data>`), as the HF API reports."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The git-lfs pointer file git would store for an LFS object."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass(frozen=True)
class RepoRecord:
    """A repo: its id, visibility, owner and creation time."""

    repo_id: str
    private: bool
    owner: str | None
    created_at: str


@dataclass(frozen=True)
class CommitRecord:
    """One commit of a repo."""

    oid: str
    repo_id: str
    parent: str | None
    summary: str
    description: str
    author: str | None
    created_at: str


@dataclass(frozen=True)
class FileRecord:
    """One file of a commit: where its bytes are (sha256) and how the HF API describes it."""

    path: str
    sha256: str
    size: int
    git_oid: str
    lfs: bool

    @property
    def etag(self) -> str:
        """What HF sends as ETag: the sha256 for LFS files, the git oid for regular ones."""
        return self.sha256 if self.lfs else self.git_oid

    @property
    def pointer_size(self) -> int:
        return len(lfs_pointer(self.sha256, self.size))


@dataclass(frozen=True)
class AddFile:
    """Commit operation: put the blob `sha256` at `path` (the blob must already be stored)."""

    path: str
    sha256: str
    size: int
    lfs: bool
    git_oid: str


@dataclass(frozen=True)
class DeleteFile:
    """Commit operation: remove the file at `path`."""

    path: str


@dataclass(frozen=True)
class DeleteFolder:
    """Commit operation: remove every file under `path/`."""

    path: str


Operation = AddFile | DeleteFile | DeleteFolder
