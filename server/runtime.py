"""The live state of one server app, what it needs of the engine and scheduler, and the route dependencies.

Boundary: a plain container filled by `server.app`'s lifespan (base, engine, scheduler, registry, resolver,
cache, metrics) plus `Annotated` dependency aliases. Routes receive it; they never reach for globals. The
engine and scheduler are typed by the Protocols below (`server.engine.Engine` and
`server.scheduler.Scheduler` implement them, as do the fakes of the HTTP tests), so nothing here imports
torch.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Protocol

from fastapi import Depends, Request

from hub.bases import BaseInfo
from hub.manifest import Manifest
from hub.store import LocalStore
from server.adapter_cache import AdapterCache
from server.config import ServerConfig
from server.errors import NotReadyError
from server.metrics import Metrics
from server.requests import AdapterHandle, GenerationRequest, TaskInput, TokenEvent
from server.resolver import Resolver


class EngineLike(Protocol):
    """What the HTTP layer uses of the engine: its tokenizer, adapter loads and its footprint."""

    tokenizer: Any
    """The base's (Hugging Face) tokenizer."""
    memory_footprint: int

    def load_adapter(self, key: str, folder: Path, manifest: Manifest) -> AdapterHandle: ...

    def load_adapter_set(self, key: str, parts: list[tuple[str, Path, Manifest, float]]) -> AdapterHandle: ...

    def unload_adapter(self, adapter: Any) -> None: ...


class SchedulerLike(Protocol):
    """What the HTTP layer uses of the scheduler: its lifecycle, generations, task batches and stats."""

    stats: dict[str, int]

    async def start(self) -> None: ...

    async def stop(self, drain_timeout: float = 10.0) -> None: ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]: ...

    async def classify(self, adapter: Any, inputs: list[TaskInput]) -> list[dict]: ...

    async def ner(self, adapter: Any, inputs: list[TaskInput]) -> list[list[dict]]: ...

    async def score(self, adapter: Any, inputs: list[TaskInput]) -> list[float]: ...


@dataclass
class ServerState:
    """Everything a request may need, created once per app."""

    config: ServerConfig
    metrics: Metrics
    base: BaseInfo | None = None
    engine: EngineLike | None = None
    scheduler: SchedulerLike | None = None
    store: LocalStore | None = None
    resolver: Resolver | None = None
    cache: AdapterCache | None = None
    ready: bool = False
    """True between a finished start-up and the start of shutdown."""
    closers: list[Callable[[], None]] = field(default_factory=list)
    """Undone at shutdown, last: hooks start-up gave the engine (the memory ledger's reclaimer)."""
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
