"""Task routes: `POST /v1/classify`, `POST /v1/ner`, `POST /v1/score`.

Boundary: JSON in and out for task adapters (classification, NER, reward). Inputs are tokenized once, by
`server.prompts`; the heads run in the engine through the scheduler. An adapter of another task is refused
with 400 naming the endpoint that serves it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Request

from server import leases
from server.prompts import check_count, score_inputs, task_inputs
from server.requests import TaskInput
from server.resolver import CLASSIFY, NER, SCORE
from server.runtime import SchedulerLike, ServerState, State
from server.schemas import ScoreRequest, TextsRequest

router = APIRouter(tags=["Tasks"])


@router.post("/v1/classify")
async def classify(body: TextsRequest, request: Request, state: State) -> dict[str, Any]:
    """Label and per-label scores for each input, from a classification adapter."""
    texts = body.texts()
    check_count(len(texts), state.config)
    inputs = await task_inputs(state.engine.tokenizer, texts, state.config)
    results, key, tokens = await _run(
        state, request, body, CLASSIFY, inputs, lambda s, a: s.classify(a, inputs)
    )
    data = [{"index": i, "label": r["label"], "scores": r["scores"]} for i, r in enumerate(results)]
    return {"object": "list", "model": key, "data": data, "usage": {"prompt_tokens": tokens}}


@router.post("/v1/ner")
async def ner(body: TextsRequest, request: Request, state: State) -> dict[str, Any]:
    """Entities (type, text, character start/end, score) for each input, from an NER adapter."""
    texts = body.texts()
    check_count(len(texts), state.config)
    inputs = await task_inputs(state.engine.tokenizer, texts, state.config, offsets=True)
    results, key, tokens = await _run(state, request, body, NER, inputs, lambda s, a: s.ner(a, inputs))
    data = [{"index": i, "entities": entities} for i, entities in enumerate(results)]
    return {"object": "list", "model": key, "data": data, "usage": {"prompt_tokens": tokens}}


@router.post("/v1/score")
async def score(body: ScoreRequest, request: Request, state: State) -> dict[str, Any]:
    """A scalar reward for each prompt/response pair, from a reward adapter."""
    pairs = body.pairs()
    check_count(len(pairs), state.config)
    inputs = await score_inputs(state.engine.tokenizer, pairs, state.config)
    results, key, tokens = await _run(state, request, body, SCORE, inputs, lambda s, a: s.score(a, inputs))
    data = [{"index": i, "score": float(value)} for i, value in enumerate(results)]
    return {"object": "list", "model": key, "data": data, "usage": {"prompt_tokens": tokens}}


async def _run(
    state: ServerState,
    request: Request,
    body: Any,
    endpoint: str,
    inputs: list[TaskInput],
    call: Callable[[SchedulerLike, Any], Awaitable[list[Any]]],
) -> tuple[list[Any], str, int]:
    """Lease the adapter and run `call(scheduler, adapter)`; returns (results, key, prompt tokens)."""
    resolved = await leases.resolve(state, request, body.adapter, endpoint, body.adapter_source)
    lease = await leases.acquire(state, resolved)
    try:
        results = await call(state.scheduler, lease.adapter)
    finally:
        lease.release()
    tokens = sum(len(item.ids) for item in inputs)
    state.metrics.observe_tokens(lease.label, tokens, 0)
    return results, resolved.key, tokens
