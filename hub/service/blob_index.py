"""Blob references in the hub service's index: which blobs are stored, which repo uploaded which, and gc.

A blob is indexed (sha256, size, time) only once its file is in place (`hub.service.blobs`); a repo's claim
on a blob (`repo_blobs`) lets its commits reference an LFS upload; `collect` removes blobs no commit
references, keeping recent uploads whose commit may still be on its way.
Boundary: functions on an open `sqlite3.Connection` (the caller holds the transaction, see
`hub.service.index_db`); the bytes on disk are `hub.service.blobs`'.
"""

from __future__ import annotations

import sqlite3
import time
from datetime import datetime, timezone

from hub.service.blobs import BlobStore
from hub.service.records import utc_now


def index_blob(db: sqlite3.Connection, sha256: str, size: int) -> None:
    """Record that blob `sha256` of `size` bytes is stored (again: its time is renewed)."""
    db.execute(
        "INSERT OR REPLACE INTO blobs(sha256, size, created_at) VALUES (?, ?, ?)",
        (sha256, size, utc_now()),
    )


def indexed_size(db: sqlite3.Connection, sha256: str) -> int | None:
    """The indexed size of a blob, None when it is not stored."""
    row = db.execute("SELECT size FROM blobs WHERE sha256 = ?", (sha256,)).fetchone()
    return None if row is None else int(row[0])


def unindex_blob(db: sqlite3.Connection, sha256: str) -> None:
    """Forget blob `sha256` (its file was quarantined or removed)."""
    db.execute("DELETE FROM blobs WHERE sha256 = ?", (sha256,))


def claim(db: sqlite3.Connection, repo_id: str, sha256: str) -> None:
    """Record that `repo_id` uploaded `sha256`, so its commits may reference it."""
    db.execute("INSERT OR IGNORE INTO repo_blobs(repo_id, sha256) VALUES (?, ?)", (repo_id, sha256))


def is_claimed(db: sqlite3.Connection, repo_id: str, sha256: str) -> bool:
    """Whether `repo_id` uploaded `sha256`."""
    row = db.execute(
        "SELECT 1 FROM repo_blobs WHERE repo_id = ? AND sha256 = ?", (repo_id, sha256)
    ).fetchone()
    return row is not None


def age_cutoff(min_age_s: float) -> str:
    """The `created_at` of a blob stored `min_age_s` seconds ago, as the index writes times."""
    cutoff = datetime.fromtimestamp(time.time() - min_age_s, timezone.utc)
    return cutoff.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def collect(db: sqlite3.Connection, blobs: BlobStore, cutoff: str, only: set[str] | None) -> list[str]:
    """Remove blobs that no commit references and that were stored at or before `cutoff` (`age_cutoff`).

    Args:
        db: a connection inside a write transaction (files are unlinked inside it, so no upload can re-add
            a blob meanwhile).
        blobs: the files.
        cutoff: keep blobs stored later (LFS uploads whose commit may still be on its way); older uploads
            that were never committed are removed with their claim.
        only: consider only these blobs (a deleted repo's), and keep any another repo has claimed (an
            upload of the same bytes whose commit may be on its way); None considers every blob.

    Returns:
        The sha256 of each blob removed.
    """
    removed: list[str] = []
    rows = db.execute(
        "SELECT sha256 FROM blobs WHERE created_at <= ? AND sha256 NOT IN (SELECT sha256 FROM files)",
        (cutoff,),
    ).fetchall()
    claimed = {r[0] for r in db.execute("SELECT sha256 FROM repo_blobs")} if only is not None else set()
    for (sha256,) in rows:
        if only is not None and (sha256 not in only or sha256 in claimed):
            continue
        db.execute("DELETE FROM blobs WHERE sha256 = ?", (sha256,))
        db.execute("DELETE FROM repo_blobs WHERE sha256 = ?", (sha256,))
        blobs.remove(sha256)
        removed.append(sha256)
    return removed
