"""Generation streams: submit a request's generations together, then collect or interleave their events.

Boundary: between the routes and the scheduler. It knows requests as `GenerationRequest`s and answers
as `TokenEvent`s; wire formats (OpenAI, TGI, server-sent events) stay in `server.routes`, adapter
leases in `server.leases`. Every first event is awaited before a route answers, so errors (a full
queue, a prompt too long) surface as HTTP errors rather than inside a stream.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from server.requests import GenerationRequest, TokenEvent
from server.runtime import SchedulerLike

logger = logging.getLogger(__name__)

_END = object()


@dataclass
class Completion:
    """One finished generation."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    token_texts: list[str] = field(default_factory=list)
    logprobs: list[float | None] = field(default_factory=list)
    finish_reason: str = "length"

    def add(self, event: TokenEvent) -> None:
        self.text += event.text or ""
        if event.token_id is not None:
            self.token_ids.append(event.token_id)
            self.token_texts.append(event.text or "")
            self.logprobs.append(event.logprob)
        if event.finish_reason is not None:
            self.finish_reason = event.finish_reason


class Stream:
    """A scheduler event stream whose first event was already awaited (so errors surface before headers)."""

    def __init__(self, events: AsyncIterator[TokenEvent], first: TokenEvent | object) -> None:
        self._events = events
        self._first = first

    async def __aiter__(self) -> AsyncIterator[TokenEvent]:
        if self._first is not _END:
            first, self._first = self._first, _END
            yield first
            if first.finish_reason is not None:
                return
            async for event in self._events:
                yield event
                if event.finish_reason is not None:
                    return

    async def aclose(self) -> None:
        closer = getattr(self._events, "aclose", None)
        if closer is not None:
            await closer()


async def _first_event(events: AsyncIterator[TokenEvent]) -> TokenEvent | object:
    try:
        return await events.__anext__()
    except StopAsyncIteration:
        return _END


async def start(scheduler: SchedulerLike, requests: list[GenerationRequest]) -> list[Stream]:
    """Submit every request at once (so they share batches) and wait for each one's first event.

    Raises:
        QueueFullError (and any scheduler error): after closing every stream already opened.
    """
    generators: list[AsyncIterator[TokenEvent]] = []
    try:
        for gen_request in requests:
            generators.append(scheduler.generate(gen_request))
        firsts = await asyncio.gather(*(_first_event(g) for g in generators), return_exceptions=True)
    except BaseException:
        await close_all(generators)
        raise
    failures = [f for f in firsts if isinstance(f, BaseException)]
    if failures:
        await close_all(generators)
        raise failures[0]
    return [Stream(g, f) for g, f in zip(generators, firsts, strict=True)]


async def close_all(streams: list[Any]) -> None:
    for stream in streams:
        closer = getattr(stream, "aclose", None)
        if closer is not None:
            try:
                await closer()
            except Exception:  # noqa: BLE001 - closing is best effort; the request already failed or ended
                logger.debug("closing a generation stream failed", exc_info=True)


async def collect(stream: Stream) -> Completion:
    """Run one stream to its end."""
    completion = Completion()
    async for event in stream:
        completion.add(event)
    return completion


async def collect_all(streams: list[Stream]) -> list[Completion]:
    """Run every stream to its end, concurrently."""
    try:
        return list(await asyncio.gather(*(collect(s) for s in streams)))
    finally:
        await close_all(streams)


async def merge(streams: list[Stream]) -> AsyncIterator[tuple[int, TokenEvent]]:
    """Interleave events of several streams as `(index, event)` in arrival order; closing cancels all."""
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

    async def pump(index: int, stream: Stream) -> None:
        try:
            async for event in stream:
                await queue.put((index, event))
        except Exception as exc:  # noqa: BLE001 - forwarded to the consumer, which raises it
            await queue.put((index, exc))
            return
        await queue.put((index, _END))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(tasks)
    try:
        while remaining:
            index, item = await queue.get()
            if item is _END:
                remaining -= 1
                continue
            if isinstance(item, Exception):
                raise item
            yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await close_all(streams)
