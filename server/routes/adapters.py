"""Adapter management: `GET /v1/adapters`, `POST /v1/adapters/load`, `DELETE /v1/adapters/{ref}`,
`POST /v1/adapters/{ref}/pin` and `/unpin`.

Pinning, unpinning and unloading are admin rights (`server.access`: the admin key when the server has one).
Boundary: residency on this server only. Loading, pinning and unloading change what sits in the engine's
slots; the registry itself is never modified here (`adapterdock hub` does that).
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request

from hub.adapter_set import is_adapter_set, names_in
from hub.errors import AdapterNotFoundError
from hub.manifest import Manifest
from server import leases
from server.access import check_scope, require_admin, visible
from server.adapter_cache import CacheEntry
from server.resolver import parse_reference
from server.runtime import ServerState, State
from server.schemas import LoadAdapterRequest

router = APIRouter(tags=["Adapter management"])


@router.get("/v1/adapters")
async def list_adapters(request: Request, state: State) -> dict[str, Any]:
    """Every registered version (tags, fits this base or not), what is loaded, and cache stats; a scoped
    key sees only the adapters it may use."""
    assert state.cache is not None and state.base is not None
    caller = leases.principal(request)
    everything = await asyncio.to_thread(_registered_with_tags, state)
    registered = [(m, tags) for m, tags in everything if visible(caller, m.name)]
    resident = {
        e.key: e for e in state.cache.entries() if all(visible(caller, name) for name in names_in(e.key))
    }
    data = []
    for manifest, tags in registered:
        entry = resident.pop(manifest.ref, None)
        data.append(_describe(state, manifest, tags, entry))
    for entry in resident.values():  # weighted sets (no manifest of their own); loaded, then deleted
        manifest = None if is_adapter_set(entry.key) else getattr(entry.adapter, "manifest", None)
        data.append(_describe(state, manifest, [], entry, key=entry.key))
    return {
        "object": "list",
        "base": {"name": state.base_name, "fingerprint": state.base.fingerprint},
        "data": data,
        "cache": state.cache.stats,
        "memory": _memory(state),
    }


def _memory(state: State) -> dict[str, int]:
    """The engine's memory report by part (`Engine.memory_report`); empty for an engine without one."""
    report = getattr(state.engine, "memory_report", None)
    return report() if report is not None else {}


@router.post("/v1/adapters/load")
async def load_adapter(body: LoadAdapterRequest, request: Request, state: State) -> dict[str, Any]:
    """Load an adapter of any task now (and pin it with `pin: true`, which needs the admin key if any)."""
    assert state.cache is not None
    if body.pin:
        require_admin(request.scope.get("state", {}).get("principal"), state.config, "Pinning an adapter")
    resolved = await leases.resolve(state, request, body.adapter, None, body.adapter_source)
    if body.pin:
        entry = await leases.pin(state, resolved)
    else:
        lease = await leases.acquire(state, resolved)
        lease.release()
        entry = state.cache.get(resolved.key)
    return _describe(state, resolved.manifest, [], entry, key=resolved.key)


@router.delete("/v1/adapters/{ref:path}")
async def unload_adapter(ref: str, request: Request, state: State) -> dict[str, Any]:
    """Unload a resident adapter; a bare name unloads every resident version of it."""
    assert state.cache is not None
    keys = await _resident_keys(state, request, ref)
    for key in keys:
        await state.cache.unload(key)
    return {"object": "list", "unloaded": keys}


@router.post("/v1/adapters/{ref:path}/pin")
async def pin_adapter(ref: str, request: Request, state: State) -> dict[str, Any]:
    """Load (if needed) and pin the version `ref` resolves to now; it stays resident until unpinned."""
    resolved = await leases.resolve(state, request, ref, None)
    entry = await leases.pin(state, resolved)
    return _describe(state, resolved.manifest, [], entry, key=resolved.key)


@router.post("/v1/adapters/{ref:path}/unpin")
async def unpin_adapter(ref: str, request: Request, state: State) -> dict[str, Any]:
    """Let a pinned adapter be evicted again; a bare name unpins every resident version of it."""
    assert state.cache is not None
    keys = await _resident_keys(state, request, ref)
    for key in keys:
        state.cache.unpin(key)
    return {"object": "list", "unpinned": keys}


async def _resident_keys(state: ServerState, request: Request, ref: str) -> list[str]:
    """Resident `name@version` keys that `ref` names (a bare name: all its versions).

    Raises:
        AdapterNotFoundError: nothing that `ref` names is loaded.
    """
    assert state.cache is not None
    parsed = parse_reference(ref)
    check_scope(leases.principal(request), parsed.name)
    if parsed.version is None and parsed.tag is None:
        keys = [e.key for e in state.cache.entries() if e.key.rpartition("@")[0] == parsed.name]
    else:
        resolved = await leases.resolve(state, request, ref, None, "local")
        keys = [resolved.key] if state.cache.get(resolved.key) is not None else []
    if not keys:
        raise AdapterNotFoundError(
            f"Adapter {ref!r} is not loaded on this server.", "GET /v1/adapters lists what is loaded."
        )
    request.state.adapter = keys[0]
    return keys


def _registered_with_tags(state: ServerState) -> list[tuple[Manifest, list[str]]]:
    assert state.store is not None
    manifests = state.store.list(all_versions=True)
    tags_by_name = {name: state.store.tags(name) for name in {m.name for m in manifests}}
    return [(m, sorted(t for t, v in tags_by_name[m.name].items() if v == m.version)) for m in manifests]


def _describe(
    state: ServerState,
    manifest: Manifest | None,
    tags: list[str],
    entry: CacheEntry | None,
    *,
    key: str | None = None,
) -> dict[str, Any]:
    assert state.base is not None
    described: dict[str, Any] = {"id": key or (manifest.ref if manifest else None)}
    if manifest is not None:
        described.update(
            name=manifest.name,
            version=manifest.version,
            task=manifest.task,
            method=manifest.method,
            kind=manifest.kind,
            labels=list(manifest.labels),
            created_at=manifest.created_at,
            compatible=manifest.kind == "adapter" and manifest.base.fingerprint == state.base.fingerprint,
        )
    described.update(
        tags=tags,
        loaded=entry is not None,
        pinned=bool(entry and entry.pinned),
        in_use=entry.leases if entry else 0,
        nbytes=entry.nbytes if entry else None,
    )
    return described
