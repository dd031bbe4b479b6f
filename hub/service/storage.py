"""Storage of the self-hosted hub: content-addressed blobs on disk (`blobs.py`) plus a SQLite index.

Layout under the service root:
    blobs/<aa>/<bb>/<sha256>    file contents, named by their sha256, written once
    tmp/                        uploads in progress (wiped at start-up)
    quarantine/                 blobs found corrupted, moved aside for inspection
    index.sqlite                repos, commits, per-commit file lists, refs, blobs, token hashes (WAL)
    secret                      key that signs LFS upload URLs (mode 0600)

Atomicity: a blob is written to tmp/, fsynced, checked against its sha256 and renamed into blobs/ before the
index knows it. A commit is one SQLite transaction (`BEGIN IMMEDIATE`) that inserts the commit and its full
file list and moves the branch, so a reader sees the previous commit or the new one, never a half-made one; a
process killed mid-upload leaves at most an orphan blob or a tmp file.
Boundary: no HTTP and no auth decisions; names are validated by the caller (`hub.service.names`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import sqlite3
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

from hub.service.blobs import BlobStore, BlobUpload
from hub.service.errors import (
    ConflictError,
    CorruptBlobError,
    EntryNotFoundError,
    RepoNotFoundError,
    RevisionNotFoundError,
    UnprocessableError,
)
from hub.service.names import COMMIT_OID
from hub.service.records import (
    AddFile,
    CommitRecord,
    DeleteFile,
    FileRecord,
    Operation,
    RepoRecord,
    git_blob_oid,
    utc_now,
)

logger = logging.getLogger(__name__)

INITIAL_GITATTRIBUTES = (
    b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
    b"*.bin filter=lfs diff=lfs merge=lfs -text\n"
    b"*.pt filter=lfs diff=lfs merge=lfs -text\n"
    b"*.png filter=lfs diff=lfs merge=lfs -text\n"
    b"*.gguf filter=lfs diff=lfs merge=lfs -text\n"
)

_SCHEMA = """
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


class Storage:
    """Blobs plus the SQLite index of one hub service root. Thread-safe; one instance per process."""

    def __init__(self, root: Path, *, clean_tmp: bool = True) -> None:
        """Open (creating) the storage in `root`; `clean_tmp=False` for a second process (`hub gc`)."""
        self.root = Path(root)
        self.blobs = BlobStore(self.root, clean_tmp=clean_tmp)
        self.secret = self.blobs.secret
        self.db_path = self.root / "index.sqlite"
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)

    # ---- plumbing ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.db_path, timeout=30, isolation_level=None)
        try:
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA busy_timeout=30000")
            yield db
        finally:
            db.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    # ---- blobs ---------------------------------------------------------------------------------
    def begin_upload(self) -> BlobUpload:
        return self.blobs.begin()

    def finish_upload(self, upload: BlobUpload, expected_sha256: str | None = None) -> tuple[str, int]:
        """Move a checked upload into place, then index it (file first, index second).

        Raises:
            UnprocessableError: the bytes do not hash to `expected_sha256` (nothing is kept).
        """
        sha256 = self.blobs.seal(upload, expected_sha256)  # the long fsync, outside the write lock
        with self._transaction() as db:  # the rename inside: `collect` cannot unlink a blob being re-added
            size = self.blobs.place(upload, sha256)
            db.execute(
                "INSERT OR REPLACE INTO blobs(sha256, size, created_at) VALUES (?, ?, ?)",
                (sha256, size, utc_now()),
            )
        return sha256, size

    def put_bytes(self, data: bytes) -> tuple[str, int]:
        """Store `data` as a blob (idempotent); return its sha256 and size."""
        upload = self.begin_upload()
        upload.write(data)
        return self.finish_upload(upload)

    def blob_size(self, sha256: str) -> int | None:
        """The indexed size of a blob, None when it is not stored."""
        with self._connect() as db:
            row = db.execute("SELECT size FROM blobs WHERE sha256 = ?", (sha256,)).fetchone()
        return None if row is None else int(row[0])

    def has_blob(self, sha256: str, size: int) -> bool:
        """True if the blob is indexed with `size` and its bytes on disk still match (corrupt ones are
        quarantined and reported absent, so the client uploads them again)."""
        if self.blob_size(sha256) != size:
            return False
        try:
            self.blobs.verify(sha256, size)
        except CorruptBlobError:
            self.blobs.quarantine(sha256)
            with self._transaction() as db:
                db.execute("DELETE FROM blobs WHERE sha256 = ?", (sha256,))
            return False
        return True

    def check_blob_size(self, sha256: str, size: int, path_in_repo: str | None = None) -> Path:
        return self.blobs.check_size(sha256, size, path_in_repo)

    def verify_blob(self, sha256: str, size: int, path_in_repo: str | None = None) -> Path:
        return self.blobs.verify(sha256, size, path_in_repo)

    def claim(self, repo_id: str, sha256: str) -> None:
        """Record that `repo_id` uploaded `sha256`, so its commits may reference it."""
        with self._transaction() as db:
            db.execute("INSERT OR IGNORE INTO repo_blobs(repo_id, sha256) VALUES (?, ?)", (repo_id, sha256))

    def is_claimed(self, repo_id: str, sha256: str) -> bool:
        with self._connect() as db:
            row = db.execute(
                "SELECT 1 FROM repo_blobs WHERE repo_id = ? AND sha256 = ?", (repo_id, sha256)
            ).fetchone()
        return row is not None

    # ---- repos ---------------------------------------------------------------------------------
    def create_repo(self, repo_id: str, private: bool, owner: str | None) -> RepoRecord:
        """Create a repo with an initial commit holding `.gitattributes` on branch `main`.

        Namespaces and repo ids are told apart without regard to case (as on the HF Hub): nobody can create
        `Acme/chat` beside `acme/chat`, or open a look-alike `ACME` namespace beside `acme`.

        Raises:
            ConflictError: the repo exists, or its namespace exists spelled with other case.
        """
        sha256, size = self.put_bytes(INITIAL_GITATTRIBUTES)
        record = RepoRecord(repo_id, private, owner, utc_now())
        add = AddFile(".gitattributes", sha256, size, False, git_blob_oid(INITIAL_GITATTRIBUTES))
        with self._transaction() as db:
            if db.execute("SELECT 1 FROM repos WHERE repo_id = ?", (repo_id,)).fetchone():
                raise ConflictError(f"Repo {repo_id} already exists.", "Use it, or pick another name.")
            namespace = repo_id.split("/")[0]
            for (other,) in db.execute(  # SQLite's LIKE ignores ASCII case
                "SELECT repo_id FROM repos WHERE repo_id LIKE ? ESCAPE '!'", (_like_prefix(namespace + "/"),)
            ):
                if other.lower() == repo_id.lower() or other.split("/")[0] != namespace:
                    raise ConflictError(
                        f"Repo {repo_id} would shadow {other}: namespaces and names ignore case.",
                        f"Use {other.split('/')[0]}/... as it is spelled, or pick another name.",
                    )
            db.execute(
                "INSERT INTO repos(repo_id, private, owner, created_at) VALUES (?, ?, ?, ?)",
                (repo_id, int(private), owner, record.created_at),
            )
            self._write_commit(db, repo_id, "main", None, {}, [add], "initial commit", "", owner)
        logger.info("created repo %s (private=%s)", repo_id, private)
        return record

    def get_repo(self, repo_id: str) -> RepoRecord:
        with self._connect() as db:
            row = db.execute(
                "SELECT repo_id, private, owner, created_at FROM repos WHERE repo_id = ?", (repo_id,)
            ).fetchone()
        if row is None:
            raise RepoNotFoundError(f"Repository {repo_id} not found.")
        return RepoRecord(row[0], bool(row[1]), row[2], row[3])

    def list_repos(self) -> list[RepoRecord]:
        with self._connect() as db:
            rows = db.execute(
                "SELECT repo_id, private, owner, created_at FROM repos ORDER BY repo_id"
            ).fetchall()
        return [RepoRecord(r[0], bool(r[1]), r[2], r[3]) for r in rows]

    def set_private(self, repo_id: str, private: bool) -> None:
        with self._transaction() as db:
            if not db.execute(
                "UPDATE repos SET private = ? WHERE repo_id = ?", (int(private), repo_id)
            ).rowcount:
                raise RepoNotFoundError(f"Repository {repo_id} not found.")

    def delete_repo(self, repo_id: str) -> list[str]:
        """Remove a repo and its history from the index, then the blobs no other repo uses.

        Returns:
            The sha256 of each blob removed.
        """
        with self._transaction() as db:
            if not db.execute("DELETE FROM repos WHERE repo_id = ?", (repo_id,)).rowcount:
                raise RepoNotFoundError(f"Repository {repo_id} not found.")
            used = {
                r[0]
                for r in db.execute(
                    "SELECT sha256 FROM files WHERE commit_oid IN (SELECT oid FROM commits WHERE repo_id = ?)"
                    " UNION SELECT sha256 FROM repo_blobs WHERE repo_id = ?",
                    (repo_id, repo_id),
                )
            }
            db.execute(
                "DELETE FROM files WHERE commit_oid IN (SELECT oid FROM commits WHERE repo_id = ?)",
                (repo_id,),
            )
            for table in ("commits", "refs", "repo_blobs"):
                db.execute(f"DELETE FROM {table} WHERE repo_id = ?", (repo_id,))
        removed = self.collect(min_age_s=0, only=used)
        logger.info("deleted repo %s (%d blob(s) no other repo used removed)", repo_id, len(removed))
        return removed

    def collect(self, min_age_s: float = 3600, only: set[str] | None = None) -> list[str]:
        """Remove blobs that no commit references (garbage collection).

        Args:
            min_age_s: keep blobs stored less than this many seconds ago (LFS uploads whose commit may
                still be on its way); older uploads that were never committed are removed with their claim.
            only: consider only these blobs (a deleted repo's), and keep any another repo has claimed (an
                upload of the same bytes whose commit may be on its way); None considers every blob.

        Returns:
            The sha256 of each blob removed.
        """
        cutoff = datetime.fromtimestamp(time.time() - min_age_s, timezone.utc)
        cutoff_text = cutoff.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        removed: list[str] = []
        with self._transaction() as db:  # unlinked inside: no upload can re-add a blob meanwhile
            rows = db.execute(
                "SELECT sha256 FROM blobs WHERE created_at <= ? AND sha256 NOT IN (SELECT sha256 FROM files)",
                (cutoff_text,),
            ).fetchall()
            claimed = (
                {r[0] for r in db.execute("SELECT sha256 FROM repo_blobs")} if only is not None else set()
            )
            for (sha256,) in rows:
                if only is not None and (sha256 not in only or sha256 in claimed):
                    continue
                db.execute("DELETE FROM blobs WHERE sha256 = ?", (sha256,))
                db.execute("DELETE FROM repo_blobs WHERE sha256 = ?", (sha256,))
                self.blobs.remove(sha256)
                removed.append(sha256)
        if removed:
            logger.info("collected %d unreferenced blob(s)", len(removed))
        return removed

    # ---- revisions -----------------------------------------------------------------------------
    def resolve(self, repo_id: str, revision: str) -> CommitRecord:
        """The commit a branch, tag, full commit oid or unique oid prefix (>= 7 hex) names.

        Raises:
            RepoNotFoundError, RevisionNotFoundError.
        """
        self.get_repo(repo_id)
        name = revision.removeprefix("refs/heads/").removeprefix("refs/tags/")
        with self._connect() as db:
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
            commit = self._commit(db, oid) if oid else None
        if commit is None:
            raise RevisionNotFoundError(f"Revision {revision!r} not found in {repo_id}.")
        return commit

    @staticmethod
    def _commit(db: sqlite3.Connection, oid: str) -> CommitRecord | None:
        row = db.execute(
            "SELECT oid, repo_id, parent, summary, description, author, created_at"
            " FROM commits WHERE oid = ?",
            (oid,),
        ).fetchone()
        return CommitRecord(*row) if row else None

    def files(self, commit_oid: str) -> dict[str, FileRecord]:
        """Every file of a commit, by path."""
        with self._connect() as db:
            return self._files(db, commit_oid)

    @staticmethod
    def _files(db: sqlite3.Connection, commit_oid: str) -> dict[str, FileRecord]:
        rows = db.execute(
            "SELECT path, sha256, size, git_oid, lfs FROM files WHERE commit_oid = ? ORDER BY path",
            (commit_oid,),
        ).fetchall()
        return {r[0]: FileRecord(r[0], r[1], r[2], r[3], bool(r[4])) for r in rows}

    def file(self, commit_oid: str, path: str) -> FileRecord:
        with self._connect() as db:
            row = db.execute(
                "SELECT path, sha256, size, git_oid, lfs FROM files WHERE commit_oid = ? AND path = ?",
                (commit_oid, path),
            ).fetchone()
        if row is None:
            raise EntryNotFoundError(f"Entry {path!r} not found at commit {commit_oid}.")
        return FileRecord(row[0], row[1], row[2], row[3], bool(row[4]))

    def refs(self, repo_id: str) -> dict[str, list[tuple[str, str]]]:
        """`{"branch": [(name, oid)], "tag": [...]}`."""
        self.get_repo(repo_id)
        with self._connect() as db:
            rows = db.execute(
                "SELECT kind, name, commit_oid FROM refs WHERE repo_id = ? ORDER BY kind, name", (repo_id,)
            ).fetchall()
        out: dict[str, list[tuple[str, str]]] = {"branch": [], "tag": []}
        for kind, name, oid in rows:
            out[kind].append((name, oid))
        return out

    def create_ref(self, repo_id: str, kind: str, name: str, commit_oid: str) -> None:
        """Create branch or tag `name` at `commit_oid`.

        Branches and tags share one namespace: a branch can never shadow a tag (or a tag a branch), so a
        tag such as `v3` keeps naming the commit it was made at.

        Raises:
            ConflictError: a branch or a tag of that name exists (tags never move once made).
        """
        with self._transaction() as db:
            exists = db.execute(
                "SELECT kind FROM refs WHERE repo_id = ? AND name = ?", (repo_id, name)
            ).fetchone()
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
        logger.info("%s %s of %s -> %s", kind, name, repo_id, commit_oid)

    def delete_ref(self, repo_id: str, kind: str, name: str) -> None:
        with self._transaction() as db:
            deleted = db.execute(
                "DELETE FROM refs WHERE repo_id = ? AND kind = ? AND name = ?", (repo_id, kind, name)
            ).rowcount
        if not deleted:
            raise RevisionNotFoundError(f"No {kind} {name!r} in {repo_id}.")

    # ---- commits -------------------------------------------------------------------------------
    def commit(
        self,
        repo_id: str,
        branch: str,
        operations: list[Operation],
        summary: str,
        description: str = "",
        author: str | None = None,
        parent_commit: str | None = None,
    ) -> CommitRecord:
        """Apply `operations` on top of `branch` and move the branch, in one transaction.

        Every `AddFile` blob must already be stored (and fsynced). Raises:
            RevisionNotFoundError: no such branch. ConflictError: `parent_commit` is not the branch head.
            EntryNotFoundError: deleting a path that does not exist. UnprocessableError: a missing blob.
        """
        with self._transaction() as db:
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
            files = self._files(db, head)
            commit = self._write_commit(
                db, repo_id, branch, head, files, operations, summary, description, author
            )
        logger.info("commit %s on %s@%s (%d operations)", commit.oid[:12], repo_id, branch, len(operations))
        return commit

    def _write_commit(
        self,
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

    def history(self, commit_oid: str, limit: int = 1000) -> list[CommitRecord]:
        """The commit and its ancestors, newest first."""
        out: list[CommitRecord] = []
        with self._connect() as db:
            oid: str | None = commit_oid
            while oid and len(out) < limit:
                commit = self._commit(db, oid)
                if commit is None:
                    break
                out.append(commit)
                oid = commit.parent
        return out

    # ---- tokens --------------------------------------------------------------------------------
    def replace_tokens(self, rows: list[tuple[str, str, str, str]]) -> None:
        """Replace every stored token by `rows` of (token_sha256, user, access, repos-globs-csv)."""
        with self._transaction() as db:
            db.execute("DELETE FROM tokens")
            db.executemany("INSERT INTO tokens(token_sha256, user, access, repos) VALUES (?, ?, ?, ?)", rows)

    def tokens(self) -> list[tuple[str, str, str, str]]:
        with self._connect() as db:
            return [tuple(r) for r in db.execute("SELECT token_sha256, user, access, repos FROM tokens")]


def _like_prefix(prefix: str) -> str:
    """A LIKE pattern matching strings that start with `prefix` (its `%`, `_` and `!` escaped with `!`)."""
    return "".join("!" + c if c in "%_!" else c for c in prefix) + "%"
