"""The live state of one server app and the FastAPI dependencies that hand it to routes.

Boundary: a plain container filled by `server.app`'s lifespan (base, engine, scheduler, registry, resolver,
cache, metrics) plus `Annotated` dependency aliases. Routes receive it; they never reach for globals.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, Request

from hub.bases import BaseInfo
from hub.store import LocalStore
from server.adapter_cache import AdapterCache
from server.config import ServerConfig
from server.errors import NotReadyError
from server.metrics import Metrics
from server.resolver import Resolver


@dataclass
class ServerState:
    """Everything a request may need, created once per app."""

    config: ServerConfig
    metrics: Metrics
    base: BaseInfo | None = None
    engine: Any = None
    scheduler: Any = None
    store: LocalStore | None = None
    resolver: Resolver | None = None
    cache: AdapterCache | None = None
    ready: bool = False
    """True between a finished start-up and the start of shutdown."""
    started_at: float = field(default_factory=time.time)

    @property
    def base_name(self) -> str:
        """The `model` name that means "the base, no adapter"."""
        return self.base.name_or_path if self.base is not None else self.config.base


def app_state(request: Request) -> ServerState:
    """The app's state, ready or not (for /health and /ready)."""
    return request.app.state.server


def ready_state(request: Request) -> ServerState:
    """The app's state once it serves.

    Raises:
        NotReadyError: while the model loads or the server shuts down (503 with Retry-After).
    """
    state: ServerState = request.app.state.server
    if not state.ready:
        raise NotReadyError("The server is not ready: the base model is loading or the server is stopping.")
    return state


AnyState = Annotated[ServerState, Depends(app_state)]
State = Annotated[ServerState, Depends(ready_state)]
