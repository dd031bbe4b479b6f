"""The feedback database: pairs, idempotent judgements, per-rater shuffling, concurrency, durability."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sqlite3
import threading
from pathlib import Path

import pytest

from hub.errors import AdapterDockError
from server.feedback.records import InvalidJudgementError, Pair, swapped_for, to_canonical, to_view
from server.feedback.store import (
    FeedbackDatabaseNotFoundError,
    FeedbackStore,
    PairNotFoundError,
    default_db_path,
)

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]


@pytest.fixture
def store(tmp_path: Path) -> FeedbackStore:
    return FeedbackStore(tmp_path / "registry" / "feedback.sqlite")


def add(store: FeedbackStore, prompt: str | list = "Say hi", a: str = "hi", b: str = "hello") -> Pair:
    return store.add_pair(
        prompt, a, b, adapter_a="chat", version_a=2, adapter_b="tiny", version_b=None,
        params={"temperature": 0.7, "seed_a": 1, "seed_b": 1},
    )  # fmt: skip


def test_pairs_round_trip(store: FeedbackStore):
    first, second = add(store), add(store, MESSAGES, "red", "blue")
    assert first.pair_id != second.pair_id and first.shuffle_seed != second.shuffle_seed
    again = store.get_pair(second.pair_id)
    assert again == second and again.prompt == MESSAGES
    assert (again.model_a, again.model_b) == ("chat@2", "tiny")
    assert [p.pair_id for p in store.pairs()] == [first.pair_id, second.pair_id]
    assert [p.pair_id for p in store.pairs(since=second.created_at)] == [second.pair_id]
    with pytest.raises(PairNotFoundError, match="pair-nope") as err:
        store.get_pair("pair-nope")
    assert isinstance(err.value, LookupError) and isinstance(err.value, AdapterDockError)


def test_judge_records_keeps_and_replaces(store: FeedbackStore):
    pair = add(store)
    first = store.judge(pair.pair_id, "ann", "a")
    assert (first.status, first.judgement.choice, first.previous) == ("recorded", "a", None)
    same = store.judge(pair.pair_id, " ann ", "a")  # names are stripped
    assert same.status == "unchanged" and same.judgement == first.judgement
    changed = store.judge(pair.pair_id, "ann", "b", comment="b is friendlier")
    assert changed.status == "replaced" and changed.previous.choice == "a"
    assert changed.judgement.created_at == first.judgement.created_at
    assert changed.judgement.updated_at >= first.judgement.updated_at
    assert store.judge(pair.pair_id, "ann", "b", comment="b is friendlier").status == "unchanged"
    assert store.judge(pair.pair_id, "ann", "b").status == "replaced"  # a changed comment counts
    store.judge(pair.pair_id, "bob", "tie")
    assert [(j.rater, j.choice) for j in store.judgements(pair.pair_id)] == [("ann", "b"), ("bob", "tie")]
    assert store.progress() == {"pairs": 1, "judgements": 2, "raters": 2}


@pytest.mark.parametrize(
    ("pair_id", "rater", "choice", "comment", "error"),
    [
        ("pair-missing", "ann", "a", "", PairNotFoundError),
        (None, "ann", "better", "", InvalidJudgementError),
        (None, "", "a", "", InvalidJudgementError),
        (None, "x" * 65, "a", "", InvalidJudgementError),
        (None, "bad\nname", "a", "", InvalidJudgementError),
        (None, "ann", "a", "c" * 4001, InvalidJudgementError),
    ],
)
def test_bad_judgements_are_refused(store: FeedbackStore, pair_id, rater, choice, comment, error):
    pair = add(store)
    with pytest.raises(error):
        store.judge(pair_id or pair.pair_id, rater, choice, comment)
    assert store.judgements() == []


def test_left_right_map_back_per_rater(store: FeedbackStore):
    pair = add(store, a="answer A", b="answer B")
    raters = [f"rater-{i}" for i in range(200)]
    swapped = [pair.swapped_for(r) for r in raters]
    assert 60 < sum(swapped) < 140  # both orders, roughly half each
    assert swapped == [swapped_for(pair.shuffle_seed, r) for r in raters]  # stable
    for rater, flipped in list(zip(raters, swapped, strict=True))[:6]:
        left, right = pair.view(rater)
        assert (left, right) == (("answer B", "answer A") if flipped else ("answer A", "answer B"))
        result = store.judge(pair.pair_id, rater, "left")
        assert result.judgement.choice == ("b" if flipped else "a")  # the text shown on the left
        assert result.judgement.swapped is flipped
    assert store.judge(pair.pair_id, "direct", "a").judgement.swapped is None
    for choice in ("a", "b", "tie", "both_bad"):
        for flipped in (True, False):
            assert to_canonical(to_view(choice, flipped), flipped) == choice


def test_next_pair_and_progress_per_rater(store: FeedbackStore):
    pairs = [add(store, f"prompt {i}") for i in range(3)]
    assert store.next_pair("ann") == pairs[0]
    store.judge(pairs[0].pair_id, "ann", "a")
    store.judge(pairs[1].pair_id, "bob", "a")
    assert store.next_pair("ann") == pairs[1] and store.next_pair("bob") == pairs[0]
    assert store.progress("ann") == {"pairs": 3, "judgements": 2, "raters": 2, "rated": 1, "pending": 2}
    for pair in pairs[1:]:
        store.judge(pair.pair_id, "ann", "both_bad")
    assert store.next_pair("ann") is None


def test_file_settings_and_missing_database(tmp_path: Path, store: FeedbackStore):
    with sqlite3.connect(store.path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with store._connect() as conn:
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert conn.execute("PRAGMA busy_timeout").fetchone()[0] >= 10_000
    with pytest.raises(FeedbackDatabaseNotFoundError, match="--db"):
        FeedbackStore(tmp_path / "absent.sqlite", create=False)
    assert not (tmp_path / "absent.sqlite").exists()
    assert default_db_path(tmp_path / "reg") == tmp_path / "reg" / "feedback.sqlite"


def test_concurrent_threads(store: FeedbackStore):
    pairs = [add(store, f"p{i}") for i in range(4)]
    errors: list[BaseException] = []
    statuses: list[str] = []

    def worker(index: int) -> None:
        try:
            for pair in pairs:
                statuses.append(store.judge(pair.pair_id, "same-rater", "a").status)  # all race on one row
                store.judge(pair.pair_id, f"rater-{index}", "b")
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert sorted(statuses).count("recorded") == 4 and statuses.count("unchanged") == 12
    assert len(store.judgements()) == 4 * 5
    assert store.progress()["raters"] == 5


def _judge_in_child(path: str, pair_id: str, rater: str, queue) -> None:
    store = FeedbackStore(path, create=False)
    queue.put([store.judge(pair_id, rater, c).status for c in ("a", "b", "b")])


def test_concurrent_processes(store: FeedbackStore):
    pair = add(store)
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    children = [
        context.Process(target=_judge_in_child, args=(str(store.path), pair.pair_id, f"p{i % 2}", queue))
        for i in range(4)
    ]
    for child in children:
        child.start()
    results = [queue.get(timeout=60) for _ in children]
    for child in children:
        child.join(30)
        assert child.exitcode == 0
    flat = [status for result in results for status in result]
    # Two processes per rater: each rater's row was created exactly once, whoever came first.
    assert flat.count("recorded") == 2 and len(flat) == 12
    assert {(j.rater, j.choice) for j in store.judgements()} == {("p0", "b"), ("p1", "b")}


def _write_then_die(path: str, pair_id: str) -> None:
    store = FeedbackStore(path, create=False)
    store.judge(pair_id, "killed", "tie", comment="written just before SIGKILL")
    os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no close: as if the server were killed


def test_a_judgement_survives_a_killed_writer(store: FeedbackStore):
    pair = add(store)
    child = multiprocessing.get_context("fork").Process(
        target=_write_then_die, args=(str(store.path), pair.pair_id)
    )
    child.start()
    child.join(30)
    assert child.exitcode == -signal.SIGKILL
    [judgement] = FeedbackStore(store.path, create=False).judgements()
    assert (judgement.rater, judgement.choice) == ("killed", "tie")
