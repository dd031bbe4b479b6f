"""Commits of the hub service's index: applying operations on a branch head, and reading commits and files.

A commit stores its FULL file list (path, sha256, size, git oid, LFS flag) and moves its branch in the same
transaction, so a reader sees the previous commit or the new one. Its oid is a sha1 over the tree, the
parent, the author, the time and a nonce (40 hex characters, like git's, but not git's object).
Boundary: functions on an open `sqlite3.Connection` (the caller holds the transaction, see
`hub.service.index_db`); blobs must already be stored and indexed (`hub.service.blob_index`).
"""

from __future__ import annotations

import hashlib
import sqlite3
import uuid

from hub.service.errors import (
    ConflictError,
    EntryNotFoundError,
    RevisionNotFoundError,
    UnprocessableError,
)
from hub.service.names import COMMIT_OID
from hub.service.records import AddFile, CommitRecord, DeleteFile, FileRecord, Operation, utc_now


def commit_on_branch(
    db: sqlite3.Connection,
    repo_id: str,
    branch: str,
    operations: list[Operation],
    summary: str,
    description: str,
    author: str | None,
    parent_commit: str | None,
) -> CommitRecord:
    """Apply `operations` on top of `branch`'s head and move the branch (inside the caller's transaction).

    Raises:
        RevisionNotFoundError: no such branch. ConflictError: `parent_commit` is not the branch head.
        EntryNotFoundError: deleting a path that does not exist. UnprocessableError: a missing blob.
    """
    row = db.execute(
        "SELECT commit_oid FROM refs WHERE repo_id = ? AND kind = 'branch' AND name = ?",
        (repo_id, branch),
    ).fetchone()
    if row is None:
        raise RevisionNotFoundError(
            f"Branch {branch!r} not found in {repo_id}.", "Create it first (HfApi.create_branch)."
        )
    head = row[0]
    if parent_commit is not None and not head.startswith(parent_commit):
        raise ConflictError(
            f"Branch {branch!r} of {repo_id} is at {head}, not at parent commit {parent_commit}.",
            "Someone pushed meanwhile: fetch the new head and commit again.",
        )
    files = read_files(db, head)
    return write_commit(db, repo_id, branch, head, files, operations, summary, description, author)


def write_commit(
    db: sqlite3.Connection,
    repo_id: str,
    branch: str,
    parent: str | None,
    files: dict[str, FileRecord],
    operations: list[Operation],
    summary: str,
    description: str,
    author: str | None,
) -> CommitRecord:
    """Write the commit of `operations` applied to `files` (its parent's) and point `branch` at it.

    Raises:
        EntryNotFoundError: deleting a path that does not exist. UnprocessableError: a missing blob.
    """
    files = dict(files)
    for op in operations:
        if isinstance(op, AddFile):
            row = db.execute("SELECT size FROM blobs WHERE sha256 = ?", (op.sha256,)).fetchone()
            if row is None or row[0] != op.size:
                raise UnprocessableError(
                    f"The content of {op.path!r} (sha256:{op.sha256}, {op.size} B) was never uploaded.",
                    "Upload it through the LFS batch endpoint before committing.",
                )
            files[op.path] = FileRecord(op.path, op.sha256, op.size, op.git_oid, op.lfs)
        elif isinstance(op, DeleteFile):
            if files.pop(op.path, None) is None:
                raise EntryNotFoundError(f"A file with this name doesn't exist: {op.path!r}.")
        else:
            prefix = op.path.rstrip("/") + "/"
            doomed = [p for p in files if p.startswith(prefix)]
            if not doomed:
                raise EntryNotFoundError(f"A folder with this name doesn't exist: {op.path!r}.")
            for p in doomed:
                del files[p]
    created_at = utc_now()
    tree = "".join(f"{p}\0{f.git_oid}\n" for p, f in sorted(files.items()))
    oid = hashlib.sha1(
        f"tree {hashlib.sha1(tree.encode()).hexdigest()}\nparent {parent}\nauthor {author} {created_at}\n"
        f"nonce {uuid.uuid4().hex}\n\n{summary}\n{description}".encode()
    ).hexdigest()
    assert COMMIT_OID.match(oid)
    db.execute(
        "INSERT INTO commits(oid, repo_id, parent, summary, description, author, created_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        (oid, repo_id, parent, summary, description, author, created_at),
    )
    db.executemany(
        "INSERT INTO files(commit_oid, path, sha256, size, git_oid, lfs) VALUES (?, ?, ?, ?, ?, ?)",
        [(oid, f.path, f.sha256, f.size, f.git_oid, int(f.lfs)) for f in files.values()],
    )
    db.execute(
        "INSERT OR REPLACE INTO refs(repo_id, kind, name, commit_oid) VALUES (?, 'branch', ?, ?)",
        (repo_id, branch, oid),
    )
    return CommitRecord(oid, repo_id, parent, summary, description, author, created_at)


def read_commit(db: sqlite3.Connection, oid: str) -> CommitRecord | None:
    """The commit `oid`, None when the index has none."""
    row = db.execute(
        "SELECT oid, repo_id, parent, summary, description, author, created_at FROM commits WHERE oid = ?",
        (oid,),
    ).fetchone()
    return CommitRecord(*row) if row else None


def read_files(db: sqlite3.Connection, commit_oid: str) -> dict[str, FileRecord]:
    """Every file of a commit, by path."""
    rows = db.execute(
        "SELECT path, sha256, size, git_oid, lfs FROM files WHERE commit_oid = ? ORDER BY path",
        (commit_oid,),
    ).fetchall()
    return {r[0]: FileRecord(r[0], r[1], r[2], r[3], bool(r[4])) for r in rows}


def read_file(db: sqlite3.Connection, commit_oid: str, path: str) -> FileRecord:
    """One file of a commit.

    Raises:
        EntryNotFoundError: the commit has no file at `path`.
    """
    row = db.execute(
        "SELECT path, sha256, size, git_oid, lfs FROM files WHERE commit_oid = ? AND path = ?",
        (commit_oid, path),
    ).fetchone()
    if row is None:
        raise EntryNotFoundError(f"Entry {path!r} not found at commit {commit_oid}.")
    return FileRecord(row[0], row[1], row[2], row[3], bool(row[4]))


def read_history(db: sqlite3.Connection, commit_oid: str, limit: int = 1000) -> list[CommitRecord]:
    """The commit and its ancestors, newest first."""
    out: list[CommitRecord] = []
    oid: str | None = commit_oid
    while oid and len(out) < limit:
        commit = read_commit(db, oid)
        if commit is None:
            break
        out.append(commit)
        oid = commit.parent
    return out
