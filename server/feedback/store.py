"""Human feedback storage: answer pairs and people's judgements of them, in one SQLite file.

The file lives beside the registry by default (`<registry>/feedback.sqlite`). Every write is one
`BEGIN IMMEDIATE` transaction on a fresh connection in WAL mode with `synchronous=FULL`, so a
committed pair or judgement survives the server being killed right after it answered, and several
threads or processes (server workers, `adapterdock feedback export`) can use the file at once
(`busy_timeout` makes writers queue instead of failing).

Tables: `pairs` (prompt, both answers, which adapter@version made each, sampling parameters, a
shuffle seed) and `judgements` (one row per pair and rater: `a` | `b` | `tie` | `both_bad`).
The records and the a/b <-> left/right mapping are `server.feedback.records`.
Boundary: storage only; no HTTP, no generation, no aggregation beyond counts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hub.errors import AdapterDockError
from hub.store import LocalStore
from server.feedback.records import (
    CHOICES,
    MAX_COMMENT_LENGTH,
    VIEW_CHOICES,
    InvalidJudgementError,
    Judgement,
    JudgeResult,
    Pair,
    check_rater,
    swapped_for,
    to_canonical,
)

logger = logging.getLogger(__name__)

DB_FILE = "feedback.sqlite"
BUSY_TIMEOUT_MS = 30_000
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS pairs(
    pair_id TEXT PRIMARY KEY,
    prompt TEXT NOT NULL,
    answer_a TEXT NOT NULL,
    answer_b TEXT NOT NULL,
    adapter_a TEXT NOT NULL,
    version_a INTEGER,
    adapter_b TEXT NOT NULL,
    version_b INTEGER,
    params TEXT NOT NULL,
    shuffle_seed INTEGER NOT NULL,
    created_at TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS pairs_by_time ON pairs(created_at);
CREATE TABLE IF NOT EXISTS judgements(
    pair_id TEXT NOT NULL REFERENCES pairs(pair_id) ON DELETE CASCADE,
    rater TEXT NOT NULL,
    choice TEXT NOT NULL CHECK(choice IN ('a', 'b', 'tie', 'both_bad')),
    comment TEXT NOT NULL DEFAULT '',
    swapped INTEGER,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    UNIQUE(pair_id, rater));
CREATE INDEX IF NOT EXISTS judgements_by_rater ON judgements(rater);
"""


class FeedbackError(AdapterDockError, RuntimeError):
    """The feedback database cannot be opened or written."""

    default_remedy = "Check that the file is a feedback database and that its folder is writable."


class FeedbackDatabaseNotFoundError(AdapterDockError, FileNotFoundError):
    """No feedback database where one was expected."""

    default_remedy = (
        "Collect feedback first (`adapterdock serve` writes <registry>/feedback.sqlite), "
        "or pass --db FILE / --registry DIR."
    )


class RaterLimitError(AdapterDockError, RuntimeError):
    """A rater has recorded as many judgements as the server allows one rater (HTTP 429)."""

    default_remedy = "Change an earlier judgement instead, or ask for a higher --max-judgements-per-rater."


class PairNotFoundError(AdapterDockError, LookupError):
    """No answer pair with that id."""

    default_remedy = "Use a pair_id returned by POST /v1/feedback/pairs or GET /v1/feedback/next."


def utc_now() -> str:
    """Now, in UTC, as the database stores times (ISO 8601 with microseconds and a Z)."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def default_db_path(registry: str | Path | None = None) -> Path:
    """`<registry>/feedback.sqlite`; the registry defaults as `LocalStore` does."""
    return LocalStore(registry).root / DB_FILE


class FeedbackStore:
    """Pairs and judgements in one SQLite file; safe across threads and processes.

    Args:
        path: the database file.
        create: create the file (and its folder) if missing; False raises
            FeedbackDatabaseNotFoundError instead (readers such as the export command).
    """

    def __init__(self, path: str | Path, *, create: bool = True) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            if not create:
                raise FeedbackDatabaseNotFoundError(f"No feedback database at {self.path}.")
            self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as conn:
            if conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION:
                return  # made earlier (WAL mode is a property of the file and persists)
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode.lower() != "wal":
                logger.warning("feedback database %s runs in %s mode, not WAL", self.path, mode)
            with self._write(conn):
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def __repr__(self) -> str:
        return f"FeedbackStore({str(self.path)!r})"

    # ---- connections -----------------------------------------------------------------------
    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """A fresh connection per call: nothing is shared between threads, forks or processes."""
        try:
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        except sqlite3.Error as exc:
            raise FeedbackError(f"Cannot open the feedback database {self.path}: {exc}.") from exc
        try:
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            yield conn
        except sqlite3.DatabaseError as exc:
            raise FeedbackError(f"Feedback database {self.path} failed: {exc}.") from exc
        finally:
            conn.close()

    @staticmethod
    @contextlib.contextmanager
    def _write(conn: sqlite3.Connection) -> Iterator[None]:
        """One write transaction, holding the write lock from its start (no upgrade deadlocks)."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    # ---- pairs -----------------------------------------------------------------------------
    def add_pair(
        self,
        prompt: str | list[dict[str, str]],
        answer_a: str,
        answer_b: str,
        *,
        adapter_a: str,
        version_a: int | None,
        adapter_b: str,
        version_b: int | None,
        params: dict[str, Any] | None = None,
    ) -> Pair:
        """Store a new pair (with a fresh id and shuffle seed) and return it."""
        token = uuid.uuid4()
        pair = Pair(
            pair_id=f"pair-{token.hex}",
            prompt=prompt,
            answer_a=answer_a,
            answer_b=answer_b,
            adapter_a=adapter_a,
            version_a=version_a,
            adapter_b=adapter_b,
            version_b=version_b,
            params=dict(params or {}),
            shuffle_seed=token.int >> 66,  # 62 random bits: fits SQLite's signed 64-bit integers
            created_at=utc_now(),
        )
        with self._connect() as conn, self._write(conn):
            conn.execute(
                "INSERT INTO pairs(pair_id, prompt, answer_a, answer_b, adapter_a, version_a, adapter_b,"
                " version_b, params, shuffle_seed, created_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (
                    pair.pair_id, json.dumps(prompt), answer_a, answer_b, adapter_a, version_a,
                    adapter_b, version_b, json.dumps(pair.params), pair.shuffle_seed, pair.created_at,
                ),
            )  # fmt: skip
        logger.info("feedback pair %s stored (%s vs %s)", pair.pair_id, pair.model_a, pair.model_b)
        return pair

    def get_pair(self, pair_id: str) -> Pair:
        """The pair with `pair_id`.

        Raises:
            PairNotFoundError: no such pair.
        """
        with self._connect() as conn:
            row = conn.execute("SELECT * FROM pairs WHERE pair_id = ?", (pair_id,)).fetchone()
        if row is None:
            raise PairNotFoundError(f"No feedback pair {pair_id!r}.")
        return _pair(row)

    def pairs(self, *, since: str | None = None) -> list[Pair]:
        """Every pair (created at or after the ISO time `since`), oldest first."""
        query, args = "SELECT * FROM pairs", ()
        if since is not None:
            query, args = query + " WHERE created_at >= ?", (since,)
        with self._connect() as conn:
            return [_pair(r) for r in conn.execute(query + " ORDER BY created_at, rowid", args)]

    def next_pair(self, rater: str) -> Pair | None:
        """The oldest pair `rater` has not judged, or None when they have judged them all."""
        rater = check_rater(rater)
        with self._connect() as conn:
            row = conn.execute(
                "SELECT * FROM pairs p WHERE NOT EXISTS (SELECT 1 FROM judgements j"
                " WHERE j.pair_id = p.pair_id AND j.rater = ?) ORDER BY p.created_at, p.rowid LIMIT 1",
                (rater,),
            ).fetchone()
        return None if row is None else _pair(row)

    # ---- judgements ------------------------------------------------------------------------
    def judge(
        self, pair_id: str, rater: str, choice: str, comment: str = "", *, max_per_rater: int | None = None
    ) -> JudgeResult:
        """Record `rater`'s choice on a pair, idempotently.

        The same judgement again changes nothing (`unchanged`); a different one replaces the
        previous (`replaced`, with `previous` set). `choice` may be left/right as the page shows
        the pair to this rater.

        Args:
            max_per_rater: most judgements one rater may have recorded (replacing one is always allowed).

        Raises:
            InvalidJudgementError: unknown choice, bad rater name, or an overlong comment.
            PairNotFoundError: no such pair.
            RaterLimitError: a new judgement beyond `max_per_rater`.
        """
        rater = check_rater(rater)
        comment = (comment or "").strip()
        if len(comment) > MAX_COMMENT_LENGTH:
            raise InvalidJudgementError(
                f"The comment has {len(comment)} characters; at most {MAX_COMMENT_LENGTH}."
            )
        if choice not in CHOICES + VIEW_CHOICES:
            to_canonical(choice, False)  # raises with the list of choices
        with self._connect() as conn, self._write(conn):
            row = conn.execute("SELECT shuffle_seed FROM pairs WHERE pair_id = ?", (pair_id,)).fetchone()
            if row is None:
                raise PairNotFoundError(f"No feedback pair {pair_id!r}.")
            swapped = None
            if choice in VIEW_CHOICES:
                swapped = swapped_for(row[0], rater)
            canonical = to_canonical(choice, bool(swapped))
            old = conn.execute(
                "SELECT * FROM judgements WHERE pair_id = ? AND rater = ?", (pair_id, rater)
            ).fetchone()
            now = utc_now()
            if old is None and max_per_rater is not None:
                query = "SELECT COUNT(*) FROM judgements WHERE rater = ?"
                (count,) = conn.execute(query, (rater,)).fetchone()
                if count >= max_per_rater:
                    raise RaterLimitError(f"Rater {rater!r} has recorded {count} judgements, the limit.")
            if old is None:
                conn.execute(
                    "INSERT INTO judgements(pair_id, rater, choice, comment, swapped, created_at, updated_at)"
                    " VALUES (?,?,?,?,?,?,?)",
                    (pair_id, rater, canonical, comment, swapped, now, now),
                )
                status, previous = "recorded", None
            elif old["choice"] == canonical and old["comment"] == comment:
                return JudgeResult("unchanged", _judgement(old))
            else:
                conn.execute(
                    "UPDATE judgements SET choice = ?, comment = ?, swapped = ?, updated_at = ?"
                    " WHERE pair_id = ? AND rater = ?",
                    (canonical, comment, swapped, now, pair_id, rater),
                )
                status, previous = "replaced", _judgement(old)
            new = conn.execute(
                "SELECT * FROM judgements WHERE pair_id = ? AND rater = ?", (pair_id, rater)
            ).fetchone()
        logger.info("feedback %s by %s on %s: %s", status, rater, pair_id, canonical)
        return JudgeResult(status, _judgement(new), previous)

    def judgements(self, pair_id: str | None = None) -> list[Judgement]:
        """Every judgement (of one pair), in the order they were first made."""
        query, args = "SELECT * FROM judgements", ()
        if pair_id is not None:
            query, args = query + " WHERE pair_id = ?", (pair_id,)
        with self._connect() as conn:
            return [_judgement(r) for r in conn.execute(query + " ORDER BY created_at, rowid", args)]

    def progress(self, rater: str | None = None) -> dict[str, int]:
        """Counts: pairs, judgements, raters; with `rater`, also what they rated and what is pending."""
        with self._connect() as conn:
            pairs, judgements, raters = conn.execute(
                "SELECT (SELECT COUNT(*) FROM pairs), (SELECT COUNT(*) FROM judgements),"
                " (SELECT COUNT(DISTINCT rater) FROM judgements)"
            ).fetchone()
            out = {"pairs": pairs, "judgements": judgements, "raters": raters}
            if rater is not None:
                rater = check_rater(rater)
                rated = conn.execute("SELECT COUNT(*) FROM judgements WHERE rater = ?", (rater,)).fetchone()[
                    0
                ]
                out.update(rated=rated, pending=pairs - rated)
        return out


def _pair(row: sqlite3.Row) -> Pair:
    return Pair(
        pair_id=row["pair_id"],
        prompt=json.loads(row["prompt"]),
        answer_a=row["answer_a"],
        answer_b=row["answer_b"],
        adapter_a=row["adapter_a"],
        version_a=row["version_a"],
        adapter_b=row["adapter_b"],
        version_b=row["version_b"],
        params=json.loads(row["params"]),
        shuffle_seed=row["shuffle_seed"],
        created_at=row["created_at"],
    )


def _judgement(row: sqlite3.Row) -> Judgement:
    swapped = row["swapped"]
    return Judgement(
        pair_id=row["pair_id"],
        rater=row["rater"],
        choice=row["choice"],
        comment=row["comment"],
        swapped=None if swapped is None else bool(swapped),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )
