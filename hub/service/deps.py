"""FastAPI dependencies shared by the hub service's routes: limits, state, the caller's grant, bounded bodies.

Boundary: request plumbing only. Routes stay thin: they validate names, ask `Authenticator`, call `Storage`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request

from hub.service.auth import Authenticator, Grant
from hub.service.errors import BadRequestError, ForbiddenError, PayloadTooLargeError, UnauthorizedError
from hub.service.names import validate_repo_id
from hub.service.storage import Storage


@dataclass(frozen=True)
class ServiceLimits:
    """Bounds on what one request may send."""

    max_json_body: int = 2 * 1024 * 1024
    """Bytes of a JSON request body (repo creation, preupload, LFS batch, tags)."""
    max_commit_body: int = 64 * 1024 * 1024
    """Bytes of a commit's NDJSON body (regular files travel inline, base64-encoded)."""
    max_regular_file: int = 10 * 1024 * 1024
    """Bytes of one file sent inline in a commit; larger files must go through LFS."""
    max_lfs_object: int = 50 * 1024**3
    """Bytes of one LFS object."""
    lfs_threshold: int = 1024 * 1024
    """Files at least this big, binary files and weight files are uploaded through LFS."""
    upload_url_ttl: int = 3600
    """Seconds a signed LFS upload URL stays valid."""
    max_commit_operations: int = 1000
    """Operations (files added or deleted) in one commit, and objects in one LFS batch or preupload."""


@dataclass
class ServiceState:
    """What every route needs: storage, auth and limits (kept on `app.state.hub`)."""

    storage: Storage
    auth: Authenticator
    limits: ServiceLimits


def get_state(request: Request) -> ServiceState:
    return request.app.state.hub


def get_caller(request: Request) -> Grant | None:
    """The grant of the request's bearer token (None without one); unknown tokens raise 401."""
    return get_state(request).auth.identify(request.headers.get("authorization"))


State = Annotated[ServiceState, Depends(get_state)]
Caller = Annotated[Grant | None, Depends(get_caller)]


def repo_id_of(namespace: str, name: str) -> str:
    return validate_repo_id(f"{namespace}/{name}")


def base_url(request: Request) -> str:
    """The URL clients reached us at, without a trailing slash (used in hrefs we hand out)."""
    return str(request.base_url).rstrip("/")


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing more than `limit` bytes (checked on Content-Length and while reading).

    Raises:
        PayloadTooLargeError.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(f"Request body of {declared} bytes is over the limit of {limit}.")
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise PayloadTooLargeError(f"Request body is over the limit of {limit} bytes.")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    """A bounded JSON object body.

    Raises:
        PayloadTooLargeError, BadRequestError (not JSON, or not an object).
    """
    body = await read_body(request, limit)
    try:
        data = json.loads(body or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequestError(f"Request body is not valid JSON: {exc}.") from exc
    if not isinstance(data, dict):
        raise BadRequestError("Request body must be a JSON object.")
    return data


async def json_body(request: Request) -> dict[str, Any]:
    """The request's JSON object body, bounded by `max_json_body` (read on the event loop)."""
    return await read_json(request, get_state(request).limits.max_json_body)


async def writer_json_body(request: Request, caller: Caller) -> dict[str, Any]:
    """The JSON body of a write, read only once the caller's token may write: the repo of the path
    (`/{namespace}/{name}`) or, for routes that name the repo in the body, some repo at all.

    Raises:
        UnauthorizedError, ForbiddenError (before a byte of the body is read), then as `read_json`.
    """
    state = get_state(request)
    namespace, name = request.path_params.get("namespace"), request.path_params.get("name")
    if namespace is not None and name is not None:
        state.auth.check_write(caller, repo_id_of(namespace, name))
    elif caller is None and not state.auth.open:
        raise UnauthorizedError("Writing needs a token.")
    elif caller is not None and caller.access != "write":
        raise ForbiddenError(f"Token of {caller.user!r} is read-only.")
    return await read_json(request, state.limits.max_json_body)


# Bodies come in through async dependencies so that handlers can stay plain `def` (run off the event loop).
JsonBody = Annotated[dict[str, Any], Depends(json_body)]
WriterJsonBody = Annotated[dict[str, Any], Depends(writer_json_body)]


def truthy(value: str | None) -> bool:
    return value is not None and value.lower() in ("1", "true", "yes")
