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
The index's schema and transactions are `index_db`'s, commits `commits`', branches and tags `refs`', blob
references and gc `blob_index`'s; `Storage` is the one object the routes use, and holds repos and tokens.
Boundary: no HTTP and no auth decisions; names are validated by the caller (`hub.service.names`).
"""

from __future__ import annotations

import logging
from pathlib import Path

from hub.service import blob_index, commits, refs
from hub.service.blobs import BlobStore, BlobUpload
from hub.service.errors import ConflictError, CorruptBlobError, RepoNotFoundError, RevisionNotFoundError
from hub.service.index_db import connect, create_index, transaction
from hub.service.records import (
    AddFile,
    CommitRecord,
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


class Storage:
    """Blobs plus the SQLite index of one hub service root. Thread-safe; one instance per process."""

    def __init__(self, root: Path, *, clean_tmp: bool = True) -> None:
        """Open (creating) the storage in `root`; `clean_tmp=False` for a second process (`hub gc`)."""
        self.root = Path(root)
        self.blobs = BlobStore(self.root, clean_tmp=clean_tmp)
        self.secret = self.blobs.secret
        self.db_path = self.root / "index.sqlite"
        create_index(self.db_path)

    # ---- blobs ---------------------------------------------------------------------------------
    def begin_upload(self) -> BlobUpload:
        return self.blobs.begin()

    def finish_upload(self, upload: BlobUpload, expected_sha256: str | None = None) -> tuple[str, int]:
        """Move a checked upload into place, then index it (file first, index second).

        Raises:
            UnprocessableError: the bytes do not hash to `expected_sha256` (nothing is kept).
        """
        sha256 = self.blobs.seal(upload, expected_sha256)  # the long fsync, outside the write lock
        # the rename inside the transaction: `collect` cannot unlink a blob being re-added
        with transaction(self.db_path) as db:
            size = self.blobs.place(upload, sha256)
            blob_index.index_blob(db, sha256, size)
        return sha256, size

    def put_bytes(self, data: bytes) -> tuple[str, int]:
        """Store `data` as a blob (idempotent); return its sha256 and size."""
        upload = self.begin_upload()
        upload.write(data)
        return self.finish_upload(upload)

    def blob_size(self, sha256: str) -> int | None:
        """The indexed size of a blob, None when it is not stored."""
        with connect(self.db_path) as db:
            return blob_index.indexed_size(db, sha256)

    def has_blob(self, sha256: str, size: int) -> bool:
        """True if the blob is indexed with `size` and its bytes on disk still match (corrupt ones are
        quarantined and reported absent, so the client uploads them again)."""
        if self.blob_size(sha256) != size:
            return False
        try:
            self.blobs.verify(sha256, size)
        except CorruptBlobError:
            self.blobs.quarantine(sha256)
            with transaction(self.db_path) as db:
                blob_index.unindex_blob(db, sha256)
            return False
        return True

    def check_blob_size(self, sha256: str, size: int, path_in_repo: str | None = None) -> Path:
        return self.blobs.check_size(sha256, size, path_in_repo)

    def verify_blob(self, sha256: str, size: int, path_in_repo: str | None = None) -> Path:
        return self.blobs.verify(sha256, size, path_in_repo)

    def claim(self, repo_id: str, sha256: str) -> None:
        """Record that `repo_id` uploaded `sha256`, so its commits may reference it."""
        with transaction(self.db_path) as db:
            blob_index.claim(db, repo_id, sha256)

    def is_claimed(self, repo_id: str, sha256: str) -> bool:
        with connect(self.db_path) as db:
            return blob_index.is_claimed(db, repo_id, sha256)

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
        with transaction(self.db_path) as db:
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
            commits.write_commit(db, repo_id, "main", None, {}, [add], "initial commit", "", owner)
        logger.info("created repo %s (private=%s)", repo_id, private)
        return record

    def get_repo(self, repo_id: str) -> RepoRecord:
        with connect(self.db_path) as db:
            row = db.execute(
                "SELECT repo_id, private, owner, created_at FROM repos WHERE repo_id = ?", (repo_id,)
            ).fetchone()
        if row is None:
            raise RepoNotFoundError(f"Repository {repo_id} not found.")
        return RepoRecord(row[0], bool(row[1]), row[2], row[3])

    def list_repos(self) -> list[RepoRecord]:
        with connect(self.db_path) as db:
            rows = db.execute(
                "SELECT repo_id, private, owner, created_at FROM repos ORDER BY repo_id"
            ).fetchall()
        return [RepoRecord(r[0], bool(r[1]), r[2], r[3]) for r in rows]

    def set_private(self, repo_id: str, private: bool) -> None:
        with transaction(self.db_path) as db:
            if not db.execute(
                "UPDATE repos SET private = ? WHERE repo_id = ?", (int(private), repo_id)
            ).rowcount:
                raise RepoNotFoundError(f"Repository {repo_id} not found.")

    def delete_repo(self, repo_id: str) -> list[str]:
        """Remove a repo and its history from the index, then the blobs no other repo uses.

        Returns:
            The sha256 of each blob removed.
        """
        with transaction(self.db_path) as db:
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
        cutoff = blob_index.age_cutoff(min_age_s)
        with transaction(self.db_path) as db:  # unlinked inside: no upload can re-add a blob meanwhile
            removed = blob_index.collect(db, self.blobs, cutoff, only)
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
        with connect(self.db_path) as db:
            return refs.resolve_revision(db, repo_id, revision)

    def files(self, commit_oid: str) -> dict[str, FileRecord]:
        """Every file of a commit, by path."""
        with connect(self.db_path) as db:
            return commits.read_files(db, commit_oid)

    def file(self, commit_oid: str, path: str) -> FileRecord:
        with connect(self.db_path) as db:
            return commits.read_file(db, commit_oid, path)

    def refs(self, repo_id: str) -> dict[str, list[tuple[str, str]]]:
        """`{"branch": [(name, oid)], "tag": [...]}`."""
        self.get_repo(repo_id)
        with connect(self.db_path) as db:
            return refs.list_refs(db, repo_id)

    def create_ref(self, repo_id: str, kind: str, name: str, commit_oid: str) -> None:
        """Create branch or tag `name` at `commit_oid`.

        Branches and tags share one namespace: a branch can never shadow a tag (or a tag a branch), so a
        tag such as `v3` keeps naming the commit it was made at.

        Raises:
            ConflictError: a branch or a tag of that name exists (tags never move once made).
        """
        with transaction(self.db_path) as db:
            refs.insert_ref(db, repo_id, kind, name, commit_oid)
        logger.info("%s %s of %s -> %s", kind, name, repo_id, commit_oid)

    def delete_ref(self, repo_id: str, kind: str, name: str) -> None:
        with transaction(self.db_path) as db:
            deleted = refs.remove_ref(db, repo_id, kind, name)
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
        with transaction(self.db_path) as db:
            commit = commits.commit_on_branch(
                db, repo_id, branch, operations, summary, description, author, parent_commit
            )
        logger.info("commit %s on %s@%s (%d operations)", commit.oid[:12], repo_id, branch, len(operations))
        return commit

    def history(self, commit_oid: str, limit: int = 1000) -> list[CommitRecord]:
        """The commit and its ancestors, newest first."""
        with connect(self.db_path) as db:
            return commits.read_history(db, commit_oid, limit)

    # ---- tokens --------------------------------------------------------------------------------
    def replace_tokens(self, rows: list[tuple[str, str, str, str]]) -> None:
        """Replace every stored token by `rows` of (token_sha256, user, access, repos-globs-csv)."""
        with transaction(self.db_path) as db:
            db.execute("DELETE FROM tokens")
            db.executemany("INSERT INTO tokens(token_sha256, user, access, repos) VALUES (?, ?, ?, ?)", rows)

    def tokens(self) -> list[tuple[str, str, str, str]]:
        with connect(self.db_path) as db:
            return [tuple(r) for r in db.execute("SELECT token_sha256, user, access, repos FROM tokens")]


def _like_prefix(prefix: str) -> str:
    """A LIKE pattern matching strings that start with `prefix` (its `%`, `_` and `!` escaped with `!`)."""
    return "".join("!" + c if c in "%_!" else c for c in prefix) + "%"
