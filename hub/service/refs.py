"""Refs of the hub service's index: branches and tags, and what a revision string names.

Branches and tags share one namespace per repo (a branch can never shadow a tag); tags never move once made.
A revision is a branch, a tag (with or without `refs/heads/` / `refs/tags/`), a full commit oid or a unique
oid prefix of at least 7 hex characters. Moving a branch by committing is `hub.service.commits`'.
Boundary: functions on an open `sqlite3.Connection` (the caller holds the transaction, see
`hub.service.index_db`); whether the repo exists is checked by the caller.
"""

from __future__ import annotations

import sqlite3

from hub.service.commits import read_commit
from hub.service.errors import ConflictError, RevisionNotFoundError
from hub.service.records import CommitRecord


def resolve_revision(db: sqlite3.Connection, repo_id: str, revision: str) -> CommitRecord:
    """The commit a branch, tag, full commit oid or unique oid prefix (>= 7 hex) names.

    Raises:
        RevisionNotFoundError: nothing in `repo_id` answers to `revision`.
    """
    name = revision.removeprefix("refs/heads/").removeprefix("refs/tags/")
    row = db.execute(
        "SELECT commit_oid FROM refs WHERE repo_id = ? AND name = ? ORDER BY kind = 'branch'",
        (repo_id, name),
    ).fetchone()
    oid = row[0] if row else None
    if oid is None and 7 <= len(revision) <= 40 and all(c in "0123456789abcdef" for c in revision):
        rows = db.execute(
            "SELECT oid FROM commits WHERE repo_id = ? AND oid LIKE ?", (repo_id, revision + "%")
        ).fetchall()
        oid = rows[0][0] if len(rows) == 1 else None
    commit = read_commit(db, oid) if oid else None
    if commit is None:
        raise RevisionNotFoundError(f"Revision {revision!r} not found in {repo_id}.")
    return commit


def list_refs(db: sqlite3.Connection, repo_id: str) -> dict[str, list[tuple[str, str]]]:
    """`{"branch": [(name, oid)], "tag": [...]}`, each sorted by name."""
    rows = db.execute(
        "SELECT kind, name, commit_oid FROM refs WHERE repo_id = ? ORDER BY kind, name", (repo_id,)
    ).fetchall()
    out: dict[str, list[tuple[str, str]]] = {"branch": [], "tag": []}
    for kind, name, oid in rows:
        out[kind].append((name, oid))
    return out


def insert_ref(db: sqlite3.Connection, repo_id: str, kind: str, name: str, commit_oid: str) -> None:
    """Create branch or tag `name` at `commit_oid`.

    Raises:
        ConflictError: a branch or a tag of that name exists (branches and tags share one namespace).
    """
    exists = db.execute("SELECT kind FROM refs WHERE repo_id = ? AND name = ?", (repo_id, name)).fetchone()
    if exists:
        raise ConflictError(
            f"{exists[0].capitalize()} {name!r} already exists in {repo_id}; branches and tags "
            "share one namespace.",
            "Pick another name.",
        )
    db.execute(
        "INSERT INTO refs(repo_id, kind, name, commit_oid) VALUES (?, ?, ?, ?)",
        (repo_id, kind, name, commit_oid),
    )


def remove_ref(db: sqlite3.Connection, repo_id: str, kind: str, name: str) -> bool:
    """Delete branch or tag `name`; False when there was none."""
    deleted = db.execute(
        "DELETE FROM refs WHERE repo_id = ? AND kind = ? AND name = ?", (repo_id, kind, name)
    ).rowcount
    return bool(deleted)
