"""The request path the routes share: model name -> checked adapter -> lease -> scheduler -> events.

Boundary: glue between the HTTP routes and the resolver, adapter cache and scheduler. It knows requests as
`GenerationRequest`s and answers as `TokenEvent`s; wire formats (OpenAI, TGI) stay in `server.routes`.
A `Lease` keeps an adapter resident for exactly as long as a request (or its stream) runs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from server.adapter_cache import CacheEntry
from server.metrics import NO_ADAPTER
from server.resolver import GENERATE, ResolvedAdapter
from server.runtime import ServerState

logger = logging.getLogger(__name__)

_WEIGHT_SUFFIXES = (".safetensors",)


class Lease:
    """One request's hold on an adapter (or on the bare base, `adapter is None`); release exactly once."""

    def __init__(self, state: ServerState, key: str | None, adapter: Any) -> None:
        self._state = state
        self.key = key
        self.adapter = adapter
        self._released = key is None

    @property
    def label(self) -> str:
        """Metrics label: `name@version`, or the base's name."""
        return self.key or self._state.base_name

    def release(self) -> None:
        if not self._released:
            self._released = True
            assert self._state.cache is not None and self.key is not None
            self._state.cache.release(self.key)


async def resolve(
    state: ServerState, request: Request, text: str, endpoint: str | None, source: str | None = None
) -> ResolvedAdapter:
    """Resolve and check a reference off the event loop; tag the request for metrics."""
    assert state.resolver is not None
    resolved = await asyncio.to_thread(state.resolver.resolve, text, endpoint=endpoint, source=source)
    request.state.adapter = resolved.key
    return resolved


def loader(state: ServerState, resolved: ResolvedAdapter) -> Callable[[], Any]:
    """The blocking load of `resolved`: checksums first, then the engine copies it into a slot."""
    resolver, engine = state.resolver, state.engine
    assert resolver is not None

    def load() -> Any:
        resolver.verify(resolved)
        return engine.load_adapter(resolved.key, resolved.path, resolved.manifest)

    return load


async def acquire(state: ServerState, resolved: ResolvedAdapter) -> Lease:
    """Lease `resolved`, loading it (off the event loop) on a miss."""
    assert state.cache is not None
    adapter = await state.cache.acquire(
        resolved.key,
        loader(state, resolved),
        nbytes_hint=weights_bytes(resolved),
        stamp=resolved.manifest.created_at,
    )
    return Lease(state, resolved.key, adapter)


async def pin(state: ServerState, resolved: ResolvedAdapter) -> CacheEntry:
    """Load `resolved` if needed and keep it resident."""
    assert state.cache is not None
    return await state.cache.pin(
        resolved.key,
        loader(state, resolved),
        nbytes_hint=weights_bytes(resolved),
        stamp=resolved.manifest.created_at,
    )


async def acquire_model(
    state: ServerState,
    request: Request,
    model: str | None,
    *,
    endpoint: str = GENERATE,
    source: str | None = None,
) -> Lease:
    """Lease what a generation request's `model` names: the bare base for the base's name, else an adapter."""
    if model is None or (model == state.base_name and source != "hub"):
        request.state.adapter = state.base_name
        return Lease(state, None, None)
    resolved = await resolve(state, request, model, endpoint, source)
    return await acquire(state, resolved)


def weights_bytes(resolved: ResolvedAdapter) -> int:
    """Expected resident bytes of an adapter: the size of its weight files."""
    return sum(e.size for n, e in resolved.manifest.files.items() if n.endswith(_WEIGHT_SUFFIXES))


def request_label(request: Request) -> str:
    return getattr(request.state, "adapter", NO_ADAPTER)


# ---- generation --------------------------------------------------------------------------------
_END = object()


@dataclass
class Completion:
    """One finished generation."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    token_texts: list[str] = field(default_factory=list)
    logprobs: list[float | None] = field(default_factory=list)
    finish_reason: str = "length"

    def add(self, event: Any) -> None:
        self.text += event.text or ""
        if event.token_id is not None:
            self.token_ids.append(event.token_id)
            self.token_texts.append(event.text or "")
            self.logprobs.append(getattr(event, "logprob", None))
        if event.finish_reason is not None:
            self.finish_reason = event.finish_reason


class Stream:
    """A scheduler event stream whose first event was already awaited (so errors surface before headers)."""

    def __init__(self, events: AsyncIterator[Any], first: Any) -> None:
        self._events = events
        self._first = first

    async def __aiter__(self) -> AsyncIterator[Any]:
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


async def _first_event(events: AsyncIterator[Any]) -> Any:
    try:
        return await events.__anext__()
    except StopAsyncIteration:
        return _END


async def start(scheduler: Any, requests: list[Any]) -> list[Stream]:
    """Submit every request at once (so they share batches) and wait for each one's first event.

    Raises:
        QueueFullError (and any scheduler error): after closing every stream already opened.
    """
    generators: list[AsyncIterator[Any]] = []
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


async def merge(streams: list[Stream]) -> AsyncIterator[tuple[int, Any]]:
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
