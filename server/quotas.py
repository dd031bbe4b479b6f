"""Per-key quotas: requests and tokens per minute, as token buckets, and the request's token sink.

Each limited key has up to two buckets that hold at most one minute's allowance and refill continuously
(`limit / 60` per second), so a key may burst up to its per-minute limit and then runs at the limit's rate.
A request is admitted when its key has a whole request left and a positive token balance; the request costs
one request at once and its prompt + generated tokens when they are counted (`charge_tokens`, called by
`server.metrics` where every route counts its tokens). Tokens are only known after a generation, so the
token balance may go negative: the overshoot is bounded by what the key's requests in flight use, and the
next request waits until the balance is positive again.

Boundary: arithmetic and a lock (requests are admitted on the event loop, tokens charged there or on worker
threads). Which key a request carries is `server.access`'s; the 429 is `server.errors`'.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from contextvars import ContextVar, Token
from dataclasses import dataclass

from server.errors import QuotaExceededError
from server.keys import ScopedKey


@dataclass
class _Bucket:
    """A per-minute allowance: `level` units now, refilled at `per_minute / 60` per second up to it."""

    per_minute: int
    level: float
    stamp: float

    def refill(self, now: float) -> None:
        self.level = min(self.per_minute, self.level + (now - self.stamp) * self.per_minute / 60.0)
        self.stamp = now

    def wait_for(self, amount: float) -> float:
        """Seconds until `level` reaches `amount` (0 if it has)."""
        return max(0.0, (amount - self.level) * 60.0 / self.per_minute)


class Quotas:
    """The buckets of every limited key.

    Args:
        keys: the server's scoped keys; unlimited ones are never counted here.
        clock: monotonic seconds (tests pass a fake).
    """

    def __init__(self, keys: tuple[ScopedKey, ...], clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        now = clock()
        self._requests = {
            k.name: _Bucket(k.requests_per_minute, float(k.requests_per_minute), now)
            for k in keys
            if k.requests_per_minute is not None
        }
        self._tokens = {
            k.name: _Bucket(k.tokens_per_minute, float(k.tokens_per_minute), now)
            for k in keys
            if k.tokens_per_minute is not None
        }

    def admit(self, key: str) -> None:
        """Take one request from `key`'s allowance.

        Raises:
            QuotaExceededError: no whole request left, or the token balance is not positive; its
            `retry_after` is when the allowance will have recovered.
        """
        with self._lock:
            now = self._clock()
            requests, tokens = self._requests.get(key), self._tokens.get(key)
            for bucket in (requests, tokens):
                if bucket is not None:
                    bucket.refill(now)
            if requests is not None and requests.level < 1:
                raise QuotaExceededError(
                    f"Key {key!r} is over its limit of {requests.per_minute} requests per minute.",
                    requests.wait_for(1),
                )
            if tokens is not None and tokens.level <= 0:
                raise QuotaExceededError(
                    f"Key {key!r} is over its limit of {tokens.per_minute} tokens per minute "
                    "(prompt + generated).",
                    tokens.wait_for(1),
                )
            if requests is not None:
                requests.level -= 1

    def charge(self, key: str, tokens: int) -> None:
        """Debit `tokens` (prompt + generated) from `key`'s token allowance, if it has one."""
        with self._lock:
            bucket = self._tokens.get(key)
            if bucket is not None:
                bucket.refill(self._clock())
                bucket.level -= tokens


_sink: ContextVar[Callable[[int], None] | None] = ContextVar("adapterdock_token_sink", default=None)


def bind_token_sink(sink: Callable[[int], None]) -> Token:
    """Send the tokens this request (this context) uses to `sink`; set by the access middleware.

    Returns:
        What `unbind_token_sink` takes when the request ends.
    """
    return _sink.set(sink)


def unbind_token_sink(bound: Token) -> None:
    """Undo `bind_token_sink`."""
    _sink.reset(bound)


def charge_tokens(tokens: int) -> None:
    """Count `tokens` against the current request's key, if it has one (no-op otherwise)."""
    sink = _sink.get()
    if sink is not None and tokens:
        sink(tokens)
