"""The FastAPI application: `create_app(config)` wires the request path and loads the model in `lifespan`.

Boundary: assembly only. Routes live in `server.routes`, edge concerns (auth, body limit, metrics) in
`server.middleware`, error mapping in `server.errors`. The base loads once, on a worker thread, before the app
serves; its memory footprint is logged. Run it with `adapterdock serve` (or `python -m server`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from hub.bases import BaseInfo, resolve_base
from hub.hub_http import PullLimits
from hub.remote import HubClient
from hub.store import LocalStore
from server import leases
from server.access import Access
from server.adapter_cache import AdapterCache
from server.config import ServerConfig
from server.errors import install_error_handlers
from server.feedback import routes as feedback
from server.memory_ledger import MemoryLedger
from server.metrics import Metrics
from server.middleware import (
    AccessMiddleware,
    AdapterVersionMiddleware,
    BodyLimitMiddleware,
    MetricsMiddleware,
)
from server.quotas import Quotas
from server.resolver import Resolver
from server.routes import adapters, health, lorax, openai, tasks
from server.runtime import EngineLike, SchedulerLike, ServerState

logger = logging.getLogger(__name__)

EngineFactory = Callable[[ServerConfig, BaseInfo], EngineLike]
SchedulerFactory = Callable[[EngineLike, ServerConfig], SchedulerLike]
DRAIN_SECONDS = 10.0


def build_engine(config: ServerConfig, base: BaseInfo) -> EngineLike:
    """The real engine: the base loaded (quantized as configured) with adapter slots and a KV cache, on
    the CPU threads `--threads` asks for (`server.model_loader.cpu_threads`)."""
    import torch

    from server.engine import Engine
    from server.model_loader import cpu_threads

    threads = cpu_threads(config.threads)
    if threads is not None:
        torch.set_num_threads(threads)
    logger.info("CPU compute threads: %d", torch.get_num_threads())
    return Engine(
        base.path,
        base_name=base.name_or_path,
        quantize=config.quantize,
        dtype=config.dtype,
        max_adapters=config.max_adapters,
        max_rank=config.max_rank,
        max_batch_size=config.max_batch_size,
        max_seq_len=config.max_input_tokens + config.max_new_tokens,
        memory_budget_mb=config.memory_budget_mb,
    )


def build_scheduler(engine: EngineLike, config: ServerConfig) -> SchedulerLike:
    """The real scheduler over `engine`."""
    from server.scheduler import Scheduler

    return Scheduler(engine, max_batch_size=config.max_batch_size, max_queue=config.max_queue)


def create_app(
    config: ServerConfig,
    *,
    base: BaseInfo | None = None,
    engine_factory: EngineFactory = build_engine,
    scheduler_factory: SchedulerFactory = build_scheduler,
) -> FastAPI:
    """Build the app for `config`.

    Args:
        config: the server configuration (validated here).
        base: an already resolved base; None resolves `config.base` at start-up.
        engine_factory: builds the engine (tests pass a fake).
        scheduler_factory: builds the scheduler over the engine (tests pass a fake).
    """
    config.validate()
    state = ServerState(config=config, metrics=Metrics())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            await _start(state, base, engine_factory, scheduler_factory)
            yield
        finally:
            await _stop(state)

    app = FastAPI(
        title="adapterdock",
        summary="One base model, many adapters: OpenAI-, LoRAX/TGI-compatible and task endpoints.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.server = state
    install_error_handlers(app)
    for module in (openai, lorax, tasks, adapters, feedback, health):
        app.include_router(module.router)
    # Last added runs first: metrics see every response, auth runs before the body is read.
    app.add_middleware(AdapterVersionMiddleware)
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_body_bytes)
    quotas = Quotas(config.keys)
    app.add_middleware(AccessMiddleware, access=Access(config), quotas=quotas, metrics=state.metrics)
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)
    return app


def _share_budget(state: ServerState) -> None:
    """Let the KV cache reclaim idle adapters' bytes (the cache evicts on this loop, the worker thread
    gets a future) and wake waiting adapter loads when the KV cache frees bytes; undone at shutdown."""
    ledger: MemoryLedger | None = getattr(state.engine, "ledger", None)
    cache = state.cache
    if ledger is None or cache is None:
        return
    loop = asyncio.get_running_loop()

    def notify() -> None:
        if not loop.is_closed():
            loop.call_soon_threadsafe(cache.notify_room)

    def unshare() -> None:
        ledger.off_free(notify)
        ledger.reclaimer = None

    ledger.on_free(notify)
    ledger.reclaimer = lambda nbytes: asyncio.run_coroutine_threadsafe(cache.evict_idle(nbytes), loop)
    state.closers.append(unshare)


async def _start(
    state: ServerState,
    base: BaseInfo | None,
    engine_factory: EngineFactory,
    scheduler_factory: SchedulerFactory,
) -> None:
    config = state.config
    if base is None:
        base = await asyncio.to_thread(resolve_base, config.base, config.registry)
    state.base = base
    logger.info("loading base %s from %s (quantize=%s)", base.name_or_path, base.path, config.quantize)
    state.engine = await asyncio.to_thread(engine_factory, config, base)
    footprint = int(getattr(state.engine, "memory_footprint", 0) or 0)
    logger.info(
        "base %s loaded: quantize=%s, memory footprint %d bytes (%.2f MiB)",
        base.name_or_path,
        config.quantize,
        footprint,
        footprint / 2**20,
    )
    state.scheduler = scheduler_factory(state.engine, config)
    await state.scheduler.start()
    state.store = LocalStore(config.registry)
    limits = PullLimits(
        deadline=config.hub_timeout,
        read_timeout=min(30.0, config.hub_timeout),
        connect_timeout=min(10.0, config.hub_timeout),
    )
    hub = HubClient(config.hub, config.hub_token, limits) if config.hub else None
    state.resolver = Resolver(
        state.store, base, hub=hub, hub_refresh_s=config.hub_refresh, max_pulls=config.hub_max_pulls
    )
    state.cache = AdapterCache(
        state.engine.unload_adapter,
        max_adapters=config.max_adapters,
        max_bytes=config.max_adapter_bytes,
        wait_timeout=config.adapter_wait_timeout,
        ledger=getattr(state.engine, "ledger", None),
        load_threads=config.load_threads,
    )
    state.closers.append(state.cache.close)
    _share_budget(state)
    state.metrics.bind(cache=state.cache, scheduler=state.scheduler, engine=state.engine)
    for ref in config.preload:
        resolved = await asyncio.to_thread(state.resolver.resolve, ref)
        await leases.pin(state, resolved)
        logger.info("preloaded and pinned %s as %s", ref, resolved.key)
    state.ready = True
    logger.info("serving base %s with registry %s", base.name_or_path, state.store.root)


async def _stop(state: ServerState) -> None:
    state.ready = False
    if state.scheduler is not None:
        await state.scheduler.stop(drain_timeout=DRAIN_SECONDS)
    for close in state.closers:
        close()
    state.closers.clear()
    logger.info("server stopped")
