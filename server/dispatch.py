"""Old name of the request path's glue, now `server.leases` (adapter leases) and `server.streams`
(generation streams); re-exported only until `server.feedback.routes` imports those two directly.

Boundary: names only, no code. New code imports `server.leases` and `server.streams`.
"""

from __future__ import annotations

from server.leases import Lease, acquire, acquire_model, loader, pin, resolve, weights_bytes
from server.streams import Completion, Stream, close_all, collect, collect_all, merge, start

__all__ = [
    "Completion",
    "Lease",
    "Stream",
    "acquire",
    "acquire_model",
    "close_all",
    "collect",
    "collect_all",
    "loader",
    "merge",
    "pin",
    "resolve",
    "start",
    "weights_bytes",
]
