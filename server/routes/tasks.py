"""Task routes: `POST /v1/classify`, `POST /v1/ner`, `POST /v1/score`.

Boundary: JSON in and out for task adapters (classification, NER, reward); the heads run in the engine through
the scheduler. An adapter of another task is refused with 400 naming the endpoint that serves it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Request

from server import dispatch
from server.prompts import check_count, check_length, encode
from server.resolver import CLASSIFY, NER, SCORE
from server.runtime import ServerState, State
from server.schemas import ScoreRequest, TextsRequest

router = APIRouter(tags=["Tasks"])


@router.post("/v1/classify")
async def classify(body: TextsRequest, request: Request, state: State) -> dict[str, Any]:
    """Label and per-label scores for each input, from a classification adapter."""
    texts = body.texts()
    results, key, tokens = await _run(
        state, request, body, CLASSIFY, texts, lambda s, a: s.classify(a, texts)
    )
    data = [{"index": i, "label": r["label"], "scores": r["scores"]} for i, r in enumerate(results)]
    return {"object": "list", "model": key, "data": data, "usage": {"prompt_tokens": tokens}}


@router.post("/v1/ner")
async def ner(body: TextsRequest, request: Request, state: State) -> dict[str, Any]:
    """Entities (type, text, character start/end, score) for each input, from an NER adapter."""
    texts = body.texts()
    results, key, tokens = await _run(state, request, body, NER, texts, lambda s, a: s.ner(a, texts))
    data = [{"index": i, "entities": entities} for i, entities in enumerate(results)]
    return {"object": "list", "model": key, "data": data, "usage": {"prompt_tokens": tokens}}


@router.post("/v1/score")
async def score(body: ScoreRequest, request: Request, state: State) -> dict[str, Any]:
    """A scalar reward for each prompt/response pair, from a reward adapter."""
    pairs = body.pairs()
    texts = [prompt + response for prompt, response in pairs]
    results, key, tokens = await _run(state, request, body, SCORE, texts, lambda s, a: s.score(a, pairs))
    data = [{"index": i, "score": float(value)} for i, value in enumerate(results)]
    return {"object": "list", "model": key, "data": data, "usage": {"prompt_tokens": tokens}}


async def _run(
    state: ServerState,
    request: Request,
    body: Any,
    endpoint: str,
    texts: list[str],
    call: Callable[[Any, Any], Awaitable[list[Any]]],
) -> tuple[list[Any], str, int]:
    """Check limits, lease the adapter, run `call(scheduler, adapter)`; returns (results, key, tokens)."""
    check_count(len(texts), state.config)
    tokens = 0
    for index, text in enumerate(texts):
        ids = await encode(state.engine.tokenizer, text)
        check_length(ids, state.config, what=f"Input {index}")
        tokens += len(ids)
    resolved = await dispatch.resolve(state, request, body.adapter, endpoint, body.adapter_source)
    lease = await dispatch.acquire(state, resolved)
    try:
        results = await call(state.scheduler, lease.adapter)
    finally:
        lease.release()
    state.metrics.observe_tokens(lease.label, tokens, 0)
    return results, resolved.key, tokens
