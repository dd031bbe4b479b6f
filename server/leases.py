"""Adapter leases: a request's model name -> checked adapter -> a hold on it in the adapter cache.

Boundary: glue between the routes, the resolver and the adapter cache. `resolve` runs the resolver
(names, manifest, base fingerprint, task) off the event loop; `acquire` and `pin` load on a miss,
verifying checksums meanwhile (the adapter is usable only once they match). A `Lease` keeps an adapter
resident for exactly as long as a request (or its stream) runs. A weighted set (`tone@2*0.5+facts@1*0.5`,
`hub.adapter_set`) resolves and checks every part like a single reference, then leases one combined LoRA
cached under the set's canonical key (`acquire_set`). A scoped key's adapter scope is checked here, before
the registry is read, so every route that names an adapter is covered. Generation itself is
`server.streams`'.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from fastapi import Request

from hub.adapter_set import is_adapter_set, parse_adapter_set, set_key
from server.access import check_scope
from server.adapter_cache import CacheEntry
from server.adapter_sets import check_combinable
from server.requests import AdapterHandle
from server.resolver import GENERATE, ResolvedAdapter, parse_reference
from server.runtime import ServerState

logger = logging.getLogger(__name__)

_WEIGHT_SUFFIXES = (".safetensors",)
_VERIFIER = ThreadPoolExecutor(max_workers=2, thread_name_prefix="adapter-verify")
"""Checksum verification beside the load (`loader`); two loads at once are the common case under churn."""


class Lease:
    """One request's hold on an adapter (or on the bare base, `adapter is None`); release exactly once."""

    def __init__(
        self, state: ServerState, key: str | None, adapter: AdapterHandle | None, label: str | None = None
    ) -> None:
        self._state = state
        self.key = key
        self.adapter = adapter
        self._released = key is None
        self._label = label

    @property
    def label(self) -> str:
        """Metrics label and response `model`: `name@version`, a set's parts (`a@1+b@2`, without weights,
        so that weights cannot multiply metric series), or the base's name."""
        return self._label or self.key or self._state.base_name

    def release(self) -> None:
        if not self._released:
            self._released = True
            assert self._state.cache is not None and self.key is not None
            self._state.cache.release(self.key)


async def resolve(
    state: ServerState,
    request: Request,
    text: str,
    endpoint: str | None,
    source: str | None = None,
    *,
    user: str | None = None,
) -> ResolvedAdapter:
    """Resolve and check a reference off the event loop (inside the caller's key scope; `user` for sticky
    traffic splits); tag the request with the version for metrics and the `x-adapter-version` header."""
    assert state.resolver is not None
    check_scope(principal(request), parse_reference(text).name)
    resolved = await asyncio.to_thread(
        state.resolver.resolve, text, endpoint=endpoint, source=source, user=user
    )
    request.state.adapter = resolved.key
    return resolved


def loader(state: ServerState, resolved: ResolvedAdapter) -> Callable[[], AdapterHandle]:
    """The blocking load of `resolved`: the checksums are verified while the engine copies it into a slot.

    The two overlap (hashing releases the GIL; a rank-16 adapter for smollm2-135m is 19.5 MB, about 15 ms of
    sha256 here), and the load counts only once both succeed: until `load` returns, the adapter is in no
    cache entry, so no request can use a slot whose files turn out not to match; on a mismatch the slot is
    freed and the checksum error raised (it explains a parse error of the same bytes too).
    """
    resolver, engine = state.resolver, state.engine
    assert resolver is not None

    def load() -> AdapterHandle:
        check = _VERIFIER.submit(resolver.verify, resolved)
        try:
            adapter = engine.load_adapter(resolved.key, resolved.path, resolved.manifest)
        except BaseException:
            check.result()  # a checksum mismatch is the cause to report
            raise
        try:
            check.result()
        except BaseException:
            engine.unload_adapter(adapter)
            raise
        return adapter

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
    user: str | None = None,
) -> Lease:
    """Lease what a generation request's `model` names: the bare base for the base's name, else an adapter
    (a split tag picks its version by `user`)."""
    if model is None or (model == state.base_name and source != "hub"):
        check_scope(principal(request), state.base_name)
        request.state.adapter = state.base_name
        return Lease(state, None, None)
    if is_adapter_set(model):
        return await acquire_set(state, request, model, endpoint=endpoint, source=source, user=user)
    resolved = await resolve(state, request, model, endpoint, source, user=user)
    return await acquire(state, resolved)


async def acquire_set(
    state: ServerState,
    request: Request,
    text: str,
    *,
    endpoint: str = GENERATE,
    source: str | None = None,
    user: str | None = None,
) -> Lease:
    """Lease the weighted set `text` names as one combined LoRA, built on its first request.

    Every part is resolved and checked as a single reference would be (scope, base fingerprint, task; a
    split tag picks its version by `user`), then must be a plain LoRA; the combined adapter is cached
    under the canonical key of the resolved versions and weights, so a moved tag makes a new set and
    never serves a stale one.

    Raises:
        InvalidReferenceError: malformed set syntax. NotCombinableError: a DoRA or bottleneck part.
        AdapterSetTooLargeError: summed rank above --max-rank. And whatever resolving a part raises.
    """
    assert state.cache is not None and state.resolver is not None
    parts = parse_adapter_set(text)
    resolved = [await resolve(state, request, str(part.ref), endpoint, source, user=user) for part in parts]
    for one in resolved:
        check_combinable(one.key, one.manifest)
    key = set_key([(one.key, part.weight) for one, part in zip(resolved, parts, strict=True)])
    label = "+".join(sorted(one.key for one in resolved))
    request.state.adapter = label
    resolver, engine = state.resolver, state.engine

    def load() -> AdapterHandle:
        for one in resolved:
            resolver.verify(one)
        members = [
            (one.key, one.path, one.manifest, part.weight) for one, part in zip(resolved, parts, strict=True)
        ]
        return engine.load_adapter_set(key, members)

    adapter = await state.cache.acquire(
        key,
        load,
        nbytes_hint=sum(weights_bytes(one) for one in resolved),
        stamp="+".join(sorted(one.manifest.created_at for one in resolved)),
    )
    return Lease(state, key, adapter, label=label)


def principal(request: Request) -> object:
    """The request's `server.access.Principal` (None on an app without the access middleware)."""
    return getattr(request, "scope", {}).get("state", {}).get("principal")


def weights_bytes(resolved: ResolvedAdapter) -> int:
    """Expected resident bytes of an adapter: the size of its weight files."""
    return sum(e.size for n, e in resolved.manifest.files.items() if n.endswith(_WEIGHT_SUFFIXES))
