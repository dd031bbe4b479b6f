"""Server-sent event responses that hold an adapter lease until the stream ends.

Boundary: wraps an async iterator of already formatted SSE strings into a `StreamingResponse`. When the
client goes away or the stream ends, the generations are closed (which cancels them in the scheduler) and
the lease is released. An error after the headers went out is sent as a final `data: {"error": ...}` event.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import StreamingResponse

from server.errors import error_body, spec_for
from server.leases import Lease
from server.streams import close_all

logger = logging.getLogger(__name__)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(data: Any) -> str:
    """One server-sent event carrying `data` as JSON (or as is, for `[DONE]`)."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n"


def event_stream(events: AsyncIterator[str], lease: Lease, streams: list[Any]) -> StreamingResponse:
    """A `text/event-stream` response over `events`; closes `streams` and releases `lease` at the end."""

    async def body() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield event
        except Exception as exc:  # noqa: BLE001 - headers are sent; report in-band, never a traceback
            spec = spec_for(exc)
            if spec.status >= 500 and spec.code == "internal_error":
                logger.exception("generation stream failed")
                message = "Internal server error; the server log has the details."
            else:
                message = str(exc)
            yield sse(error_body(message, type_=spec.type, code=spec.code))
        finally:
            await close_all([events, *streams])
            lease.release()

    return StreamingResponse(body(), media_type="text/event-stream", headers=SSE_HEADERS)
