"""server.quotas: token buckets per key (burst, refill, Retry-After), tokens charged after the fact, and
exact counts when many threads admit at once."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from server.errors import QuotaExceededError
from server.keys import ScopedKey
from server.quotas import Quotas, bind_token_sink, charge_tokens, unbind_token_sink


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def key(name: str, rpm: int | None = None, tpm: int | None = None) -> ScopedKey:
    return ScopedKey(name, b"x" * 32, ("*",), frozenset({"infer"}), rpm, tpm)


def test_requests_burst_to_the_limit_then_refill_at_its_rate() -> None:
    clock = Clock()
    quotas = Quotas((key("a", rpm=6), key("free")), clock=clock)
    for _ in range(6):
        quotas.admit("a")
    with pytest.raises(QuotaExceededError, match="6 requests per minute") as caught:
        quotas.admit("a")
    assert caught.value.retry_after == 10  # one request comes back every 60/6 s
    for _ in range(100):
        quotas.admit("free")  # unlimited keys are never counted
    clock.now += 9.9
    with pytest.raises(QuotaExceededError):
        quotas.admit("a")
    clock.now += 0.2
    quotas.admit("a")


def test_tokens_are_charged_after_the_fact_and_block_until_positive() -> None:
    clock = Clock()
    quotas = Quotas((key("a", tpm=600),), clock=clock)
    quotas.admit("a")
    quotas.charge("a", 500)
    quotas.admit("a")  # 100 left: admitted
    quotas.charge("a", 250)  # the overshoot: -150
    with pytest.raises(QuotaExceededError, match="600 tokens per minute") as caught:
        quotas.admit("a")
    assert caught.value.retry_after == 16  # 151 tokens at 10 per second
    clock.now += 15.2
    quotas.admit("a")


def test_concurrent_admissions_never_exceed_the_allowance() -> None:
    quotas = Quotas((key("a", rpm=500),), clock=Clock())

    def attempt(_: int) -> bool:
        try:
            quotas.admit("a")
        except QuotaExceededError:
            return False
        return True

    with ThreadPoolExecutor(16) as pool:
        admitted = sum(pool.map(attempt, range(2000)))
    assert admitted == 500


def test_the_token_sink_is_per_context() -> None:
    seen: list[int] = []
    charge_tokens(5)  # no sink bound: nothing happens
    bound = bind_token_sink(seen.append)
    charge_tokens(7)
    charge_tokens(0)
    unbind_token_sink(bound)
    charge_tokens(9)
    assert seen == [7]
