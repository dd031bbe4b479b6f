"""The hub service's SQLite index: its schema and how a connection or a write transaction is opened.

Tables: repos, commits, per-commit file lists (`files`), refs (branches and tags), blobs, repo_blobs (which
repo uploaded which blob) and tokens. Every connection runs with `synchronous=FULL` and a 30 s busy timeout;
a write is one `BEGIN IMMEDIATE` transaction, rolled back on any error. The database is in WAL mode.
Boundary: sqlite3 only; what is read and written is `hub.service.storage`'s and its helpers'
(`commits`, `refs`, `blob_index`).
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS repos(
    repo_id TEXT PRIMARY KEY, private INTEGER NOT NULL, owner TEXT, created_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS commits(
    oid TEXT PRIMARY KEY, repo_id TEXT NOT NULL, parent TEXT, summary TEXT NOT NULL,
    description TEXT NOT NULL, author TEXT, created_at TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS commits_by_repo ON commits(repo_id);
CREATE TABLE IF NOT EXISTS files(
    commit_oid TEXT NOT NULL, path TEXT NOT NULL, sha256 TEXT NOT NULL, size INTEGER NOT NULL,
    git_oid TEXT NOT NULL, lfs INTEGER NOT NULL, PRIMARY KEY(commit_oid, path));
CREATE TABLE IF NOT EXISTS refs(
    repo_id TEXT NOT NULL, kind TEXT NOT NULL CHECK(kind IN ('branch', 'tag')), name TEXT NOT NULL,
    commit_oid TEXT NOT NULL, PRIMARY KEY(repo_id, kind, name));
CREATE TABLE IF NOT EXISTS blobs(sha256 TEXT PRIMARY KEY, size INTEGER NOT NULL, created_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS repo_blobs(
    repo_id TEXT NOT NULL, sha256 TEXT NOT NULL, PRIMARY KEY(repo_id, sha256));
CREATE TABLE IF NOT EXISTS tokens(
    token_sha256 TEXT PRIMARY KEY, user TEXT NOT NULL, access TEXT NOT NULL, repos TEXT NOT NULL);
"""


def create_index(db_path: Path) -> None:
    """Open (creating) the index at `db_path` in WAL mode with every table of SCHEMA."""
    with connect(db_path) as db:
        db.execute("PRAGMA journal_mode=WAL")
        db.executescript(SCHEMA)


@contextlib.contextmanager
def connect(db_path: Path) -> Iterator[sqlite3.Connection]:
    """A connection to the index, closed on exit (autocommit: each statement is its own transaction)."""
    db = sqlite3.connect(db_path, timeout=30, isolation_level=None)
    try:
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA busy_timeout=30000")
        yield db
    finally:
        db.close()


@contextlib.contextmanager
def transaction(db_path: Path) -> Iterator[sqlite3.Connection]:
    """A write transaction (`BEGIN IMMEDIATE`): committed when the block ends, rolled back if it raises."""
    with connect(db_path) as db:
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
