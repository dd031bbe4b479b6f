"""ASGI middleware at the server's edge: request metrics, access (keys, tokens, per-key quotas), and the body
size limit.

Boundary: pure ASGI (no buffering of responses, so server-sent event streams pass through untouched). Errors
are answered in OpenAI's shape through `server.errors`; who may call what is `server.access`'s; nothing here
knows adapters beyond the metrics label a route leaves in `scope["state"]["adapter"]`.
"""

from __future__ import annotations

import time

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.access import Access
from server.errors import (
    AuthenticationError,
    BodyTooLargeError,
    ForbiddenError,
    QuotaExceededError,
    error_response,
)
from server.feedback.auth import PAGE_PATH
from server.metrics import NO_ADAPTER, Metrics
from server.quotas import Quotas, bind_token_sink, unbind_token_sink

VERSION_HEADER = b"x-adapter-version"
PAGE_CHALLENGE = 'Basic realm="adapterdock feedback", charset="UTF-8"'
"""Asked of a browser opening /feedback without a token, so it prompts for one (the token as password)."""


class MetricsMiddleware:
    """Counts every HTTP request and times it to the last byte of its response (streams included)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        recorded = False

        def record() -> None:
            nonlocal recorded
            if recorded:
                return
            recorded = True
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            adapter = scope.get("state", {}).get("adapter", NO_ADAPTER)
            self.metrics.observe_request(endpoint, adapter, status, time.perf_counter() - started)
            key = getattr(scope.get("state", {}).get("principal"), "key", None)
            if key is not None:
                self.metrics.observe_key_request(key.name, status)

        async def timed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                record()

        try:
            await self.app(scope, receive, timed_send)
        finally:
            record()


class AccessMiddleware:
    """Checks every request's credential against `server.access.Access` before its body is read.

    A refused request gets 401 (403 for a valid key without the right, 429 for a scoped key over its
    quota) and its body is never parsed; an accepted one carries its `Principal` in
    `scope["state"]["principal"]` for the routes (rater identity, admin rights, adapter scope). The tokens
    a scoped key's request uses are charged to it (`server.quotas.charge_tokens`) wherever they are counted.
    """

    def __init__(self, app: ASGIApp, access: Access, quotas: Quotas, metrics: Metrics) -> None:
        self.app = app
        self.access = access
        self.quotas = quotas
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        authorization = _header(scope, b"authorization").decode("latin-1")
        try:
            principal = self.access.check(scope["method"], scope["path"], authorization)
            scope.setdefault("state", {})["principal"] = principal
            if principal.key is not None:
                self.quotas.admit(principal.key.name)
        except (AuthenticationError, ForbiddenError, QuotaExceededError) as exc:
            response = error_response(exc)
            if scope["path"] == PAGE_PATH and response.status_code == 401:
                response.headers["WWW-Authenticate"] = PAGE_CHALLENGE
            await response(scope, receive, send)
            return
        if principal.key is None:
            await self.app(scope, receive, send)
            return
        name = principal.key.name

        def charge(tokens: int) -> None:
            self.quotas.charge(name, tokens)
            self.metrics.observe_key_tokens(name, tokens)

        bound = bind_token_sink(charge)
        try:
            await self.app(scope, receive, send)
        finally:
            unbind_token_sink(bound)


class AdapterVersionMiddleware:
    """Tags each response with `x-adapter-version`: the immutable `name@version` (or the base's name) that
    served it, as the route left it in `scope["state"]["adapter"]`, so a client of a split tag (or of the
    LoRAX/TGI routes, whose bodies have no `model`) knows which version answered."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def tagged_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                served = scope.get("state", {}).get("adapter")
                if served and served != NO_ADAPTER:
                    headers = list(message.get("headers", []))
                    headers.append((VERSION_HEADER, served.encode("latin-1", "replace")))
                    message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, tagged_send)


class _BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"Request body is larger than this server's limit of {limit} bytes.")


class BodyLimitMiddleware:
    """Refuses request bodies over `max_bytes` with 413: by Content-Length upfront, else while reading."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared.isdigit() and int(declared) > self.max_bytes:
            exc = BodyTooLargeError(
                f"Request body is {int(declared)} bytes; this server accepts at most {self.max_bytes}."
            )
            await error_response(exc)(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, limited_receive, send)


def _header(scope: Scope, name: bytes) -> bytes:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value
    return b""
