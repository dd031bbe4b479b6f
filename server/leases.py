"""Adapter leases: a request's model name -> checked adapter -> a hold on it in the adapter cache.

Boundary: glue between the routes, the resolver and the adapter cache. `resolve` runs the resolver
(names, manifest, base fingerprint, task) off the event loop; `acquire` and `pin` load on a miss,
verifying checksums first. A `Lease` keeps an adapter resident for exactly as long as a request (or
its stream) runs. A scoped key's adapter scope is checked here, before the registry is read, so every route
that names an adapter is covered. Generation itself is `server.streams`'.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from fastapi import Request

from server.access import check_scope
from server.adapter_cache import CacheEntry
from server.requests import AdapterHandle
from server.resolver import GENERATE, ResolvedAdapter, parse_reference
from server.runtime import ServerState

logger = logging.getLogger(__name__)

_WEIGHT_SUFFIXES = (".safetensors",)


class Lease:
    """One request's hold on an adapter (or on the bare base, `adapter is None`); release exactly once."""

    def __init__(self, state: ServerState, key: str | None, adapter: AdapterHandle | None) -> None:
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
    """Resolve and check a reference off the event loop (inside the caller's key scope); tag the request
    for metrics."""
    assert state.resolver is not None
    check_scope(principal(request), parse_reference(text).name)
    resolved = await asyncio.to_thread(state.resolver.resolve, text, endpoint=endpoint, source=source)
    request.state.adapter = resolved.key
    return resolved


def loader(state: ServerState, resolved: ResolvedAdapter) -> Callable[[], AdapterHandle]:
    """The blocking load of `resolved`: checksums first, then the engine copies it into a slot."""
    resolver, engine = state.resolver, state.engine
    assert resolver is not None

    def load() -> AdapterHandle:
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
        check_scope(principal(request), state.base_name)
        request.state.adapter = state.base_name
        return Lease(state, None, None)
    resolved = await resolve(state, request, model, endpoint, source)
    return await acquire(state, resolved)


def principal(request: Request) -> object:
    """The request's `server.access.Principal` (None on an app without the access middleware)."""
    return getattr(request, "scope", {}).get("state", {}).get("principal")


def weights_bytes(resolved: ResolvedAdapter) -> int:
    """Expected resident bytes of an adapter: the size of its weight files."""
    return sum(e.size for n, e in resolved.manifest.files.items() if n.endswith(_WEIGHT_SUFFIXES))
