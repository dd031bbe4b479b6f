"""Generation streams: submitted together, errors before the first byte, collected or interleaved."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from server import streams
from server.errors import QueueFullError
from server.requests import GenerationRequest, TokenEvent


class Events:
    """A scheduler stream of `texts` (the last one finishing), optionally failing at `fail_at`."""

    def __init__(self, texts: list[str], fail_at: int | None = None, gate: asyncio.Event | None = None):
        self.texts, self.fail_at, self.gate = texts, fail_at, gate
        self.closed = False
        self._iter = self._events()

    async def _events(self) -> AsyncIterator[TokenEvent]:
        for i, text in enumerate(self.texts):
            if self.gate is not None and i > 0:
                await self.gate.wait()
            if i == self.fail_at:
                raise RuntimeError("step failed")
            last = i == len(self.texts) - 1
            yield TokenEvent(text, 10 + i, "stop" if last else None, logprob=-0.5 * i)

    def __aiter__(self) -> Events:
        return self

    async def __anext__(self) -> TokenEvent:
        return await self._iter.__anext__()

    async def aclose(self) -> None:
        self.closed = True
        await self._iter.aclose()


class Scheduler:
    """Hands out prepared streams in order; `full_after` submissions it refuses like a full queue."""

    def __init__(self, prepared: list[Events], full_after: int | None = None) -> None:
        self.prepared, self.full_after = prepared, full_after
        self.submitted: list[GenerationRequest] = []

    def generate(self, request: GenerationRequest) -> Events:
        if self.full_after is not None and len(self.submitted) >= self.full_after:
            raise QueueFullError("full")
        self.submitted.append(request)
        return self.prepared[len(self.submitted) - 1]


def requests(n: int) -> list[GenerationRequest]:
    return [GenerationRequest(prompt_ids=[1], adapter=None) for _ in range(n)]


def test_collect_all_runs_every_stream_to_its_end():
    prepared = [Events(["a", "b", "c"]), Events(["x"])]

    async def main() -> list[streams.Completion]:
        started = await streams.start(Scheduler(prepared), requests(2))
        return await streams.collect_all(started)

    first, second = asyncio.run(main())
    assert (first.text, first.token_ids, first.token_texts) == ("abc", [10, 11, 12], ["a", "b", "c"])
    assert first.logprobs == [-0.0, -0.5, -1.0] and first.finish_reason == "stop"
    assert (second.text, second.finish_reason) == ("x", "stop")
    assert all(events.closed for events in prepared)


def test_a_failure_before_the_first_event_closes_the_streams_already_opened():
    prepared = [Events(["a", "b"]), Events(["x"], fail_at=0)]
    with pytest.raises(RuntimeError, match="step failed"):
        asyncio.run(streams.start(Scheduler(prepared), requests(2)))
    assert prepared[0].closed

    refused = [Events(["a", "b"]), Events(["x"])]
    with pytest.raises(QueueFullError):
        asyncio.run(streams.start(Scheduler(refused, full_after=1), requests(2)))
    assert refused[0].closed


def test_merge_interleaves_by_arrival_and_forwards_a_later_failure():
    async def main() -> list[tuple[int, str]]:
        gate = asyncio.Event()
        prepared = [Events(["a1", "a2"], gate=gate), Events(["b1"])]
        started = await streams.start(Scheduler(prepared), requests(2))
        seen = []
        async for index, event in streams.merge(started):
            seen.append((index, event.text))
            if event.text == "b1":
                gate.set()  # a2 only once b's stream is done
        return seen

    assert asyncio.run(main()) == [(0, "a1"), (1, "b1"), (0, "a2")]

    async def failing() -> None:
        started = await streams.start(Scheduler([Events(["a", "b", "c"], fail_at=1)]), requests(1))
        async for _ in streams.merge(started):
            pass

    with pytest.raises(RuntimeError, match="step failed"):
        asyncio.run(failing())
