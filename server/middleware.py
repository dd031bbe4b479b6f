"""ASGI middleware at the server's edge: request metrics, API-key auth, and the request body size limit.

Boundary: pure ASGI (no buffering of responses, so server-sent event streams pass through untouched). Errors
are answered in OpenAI's shape through `server.errors`; nothing here knows adapters beyond the metrics label
a route leaves in `scope["state"]["adapter"]`.
"""

from __future__ import annotations

import hmac
import time

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import AuthenticationError, BodyTooLargeError, error_response
from server.feedback.auth import RATER_PATHS
from server.metrics import NO_ADAPTER, Metrics

PUBLIC_PATHS = frozenset({"/health"}) | RATER_PATHS
"""Paths served without an API key: /health, and the rating paths, whose rule (API key or rater token)
`server.feedback.auth` holds and the rating routes apply before reading a body."""


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


class ApiKeyMiddleware:
    """Requires `Authorization: Bearer <key>` on every path but /health; compares in constant time."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self._key = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        if not self._authorized(scope):
            missing = not _header(scope, b"authorization")
            problem = "Missing API key." if missing else "Invalid API key."
            await error_response(AuthenticationError(problem))(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        value = _header(scope, b"authorization")
        scheme, _, token = value.partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        return hmac.compare_digest(token.strip(), self._key)


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
