"""Admission by memory (`server.kv_admission`) against a real ledger and a stand-in for the engine's cache."""

from __future__ import annotations

from concurrent.futures import Future

from server.kv_admission import KVAdmission
from server.memory_ledger import MemoryLedger

SHORT = 1000


class _ShortEngine:
    """An engine whose cache is always `SHORT` bytes short of the admission asked."""

    def __init__(self) -> None:
        self.ledger = MemoryLedger(10_000)

    def make_room(self, reserves: list[int]) -> int:
        return SHORT


def test_an_adapter_idling_after_a_fruitless_eviction_is_asked_for_again() -> None:
    """The eviction asked when a sequence retires can run before that sequence's adapter lease ends (the
    route releases it a few loop turns later) and free nothing; the adapter's going idle must make the
    waiting head ask again, not wait for the next retirement (which may be thousands of steps away)."""
    engine, asked, wakes = _ShortEngine(), [], []

    def reclaim(nbytes: int) -> Future[int]:
        asked.append(nbytes)
        done: Future[int] = Future()
        done.set_result(0)  # the adapter is still leased: nothing idle to evict
        return done

    engine.ledger.reclaimer = reclaim
    admission = KVAdmission(engine, wake=lambda: wakes.append(1))
    engine.ledger.on_free(lambda: wakes.append("ledger"))

    assert admission.admit([64], running=True, retired=1) == 0
    assert asked == [SHORT]
    assert admission.admit([64], running=True, retired=1) == 0
    assert asked == [SHORT]  # nothing changed since: no new request for evictions
    engine.ledger.note_idle()  # the lease ended: the adapter is evictable now
    assert "ledger" in wakes  # the worker is woken to look again
    assert admission.admit([64], running=True, retired=1) == 0
    assert asked == [SHORT, SHORT]
