"""Liveness, readiness and metrics: `GET /health`, `GET /ready`, `GET /metrics`.

Boundary: reads state, changes nothing. /health answers without an API key (load balancers probe it); /ready
says 503 until the base is loaded and while shutting down.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response

from server.errors import NotReadyError
from server.runtime import AnyState

router = APIRouter(tags=["Health"])


@router.get("/health")
async def health(state: AnyState) -> dict[str, Any]:
    """The process is up (whether or not the base has loaded)."""
    return {"status": "ok", "ready": state.ready}


@router.get("/ready")
async def ready(state: AnyState) -> dict[str, Any]:
    """200 once the server serves requests; 503 with Retry-After before that and while stopping."""
    if not state.ready:
        raise NotReadyError("The server is not ready: the base model is loading or the server is stopping.")
    assert state.cache is not None
    return {
        "status": "ready",
        "base": state.base_name,
        "quantize": state.config.quantize,
        "memory_footprint": int(getattr(state.engine, "memory_footprint", 0) or 0),
        "adapters_resident": state.cache.stats["resident"],
    }


@router.get("/metrics")
async def metrics(state: AnyState) -> Response:
    """Prometheus metrics of this server."""
    return Response(state.metrics.render(), media_type=state.metrics.content_type)
