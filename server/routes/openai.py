"""OpenAI-compatible routes: `POST /v1/completions`, `POST /v1/chat/completions`, `GET /v1/models`.

Boundary: OpenAI's wire format only. `model` names an adapter reference (`name`, `name@3`, `name@prod`) or the
base's name for no adapter; answers carry the immutable `name@version` that served them in their `model`.
Leases come from `server.leases`, generations run through `server.streams`. Streams are server-sent events in
OpenAI's chunk format ending with `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Request

from server import leases, streams
from server.access import visible
from server.errors import InvalidInputError
from server.prompts import chat_ids, check_count, check_length, check_max_tokens, check_token_ids, encode
from server.requests import generation_requests
from server.resolver import ENDPOINT_TASKS, GENERATE
from server.routes.streaming import event_stream, sse
from server.runtime import ServerState, State
from server.schemas import ChatCompletionRequest, CompletionRequest, SamplingBody

router = APIRouter(tags=["OpenAI-compatible"])


@dataclass
class _Reply:
    """What every response and chunk of one request shares."""

    id: str
    object: str
    created: int
    model: str

    def envelope(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }


@router.get("/v1/models")
async def list_models(request: Request, state: State) -> dict[str, Any]:
    """The base (no adapter) and every registered generation adapter, as `name` and `name@version`; a
    scoped key sees only what it may use."""
    assert state.resolver is not None
    caller = leases.principal(request)
    manifests = [m for m in await asyncio.to_thread(state.resolver.registered) if visible(caller, m.name)]
    targets = await asyncio.to_thread(  # a hub name's plain alias is the hub's main, as requests resolve it
        lambda: {m.name: state.resolver.plain_name_target(m.name) for m in manifests}
    )
    base = state.base_name
    models = [_model(base, int(state.started_at), root=base, parent=None)] if visible(caller, base) else []
    latest: dict[str, Any] = {}
    for manifest in manifests:
        if manifest.kind != "adapter" or manifest.task not in ENDPOINT_TASKS[GENERATE]:
            continue
        if state.base is None or manifest.base.fingerprint != state.base.fingerprint:
            continue
        models.append(_model(manifest.ref, _epoch(manifest.created_at), root=manifest.ref, parent=base))
        if manifest.name not in latest or manifest.version > latest[manifest.name].version:
            latest[manifest.name] = manifest
    for name, manifest in sorted(latest.items()):
        root = targets.get(name) or manifest.ref
        models.append(_model(name, _epoch(manifest.created_at), root=root, parent=base))
    return {"object": "list", "data": models}


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request, state: State) -> Any:
    """Text completion for each prompt (x `n`), with the adapter `model` names."""
    body.check_supported()
    max_tokens = check_max_tokens(body.max_tokens, state.config)
    prompts = body.prompts()
    check_count(len(prompts) * body.n, state.config, what="completions (prompts x n)")
    tokenizer = state.engine.tokenizer
    prompt_ids: list[list[int]] = []
    prompt_texts: list[str] = []
    for prompt in prompts:
        if isinstance(prompt, str):
            ids = await encode(tokenizer, prompt)
            prompt_texts.append(prompt)
        else:
            ids = check_token_ids(prompt, len(tokenizer))
            prompt_texts.append(tokenizer.decode(ids) if body.echo else "")
        check_length(ids, state.config)
        prompt_ids.append(ids)
    lease, started = await _start(state, request, body, prompt_ids, max_tokens)
    reply = _Reply(f"cmpl-{uuid.uuid4().hex}", "text_completion", int(time.time()), lease.label)
    echoes = [prompt_texts[i // body.n] if body.echo else "" for i in range(len(started))]
    prompt_tokens = sum(len(ids) for ids in prompt_ids)
    if body.stream:
        chunks = _completion_chunks(state, reply, body, lease, started, echoes, prompt_tokens)
        return event_stream(chunks, lease, started)
    try:
        results = await streams.collect_all(started)
    finally:
        lease.release()
    generated = sum(len(r.token_ids) for r in results)
    state.metrics.observe_tokens(lease.label, prompt_tokens, generated)
    choices = [
        {"index": i, "text": echoes[i] + r.text, "logprobs": None, "finish_reason": r.finish_reason}
        for i, r in enumerate(results)
    ]
    return reply.envelope(choices, usage=_usage(prompt_tokens, generated))


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request, state: State) -> Any:
    """Chat completion through the base's chat template, with the adapter `model` names."""
    body.check_supported()
    max_tokens = check_max_tokens(body.requested_max_tokens, state.config)
    check_count(body.n, state.config, what="choices")
    messages = [
        {"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages
    ]
    try:
        ids = await chat_ids(state.engine.tokenizer, messages)
    except Exception as exc:  # noqa: BLE001 - template errors (e.g. role order) are the client's to fix
        raise InvalidInputError(
            f"The base's chat template refused these messages: {exc}", "Check the message roles and order."
        ) from exc
    check_length(ids, state.config)
    lease, started = await _start(state, request, body, [ids], max_tokens)
    reply = _Reply(f"chatcmpl-{uuid.uuid4().hex}", "chat.completion", int(time.time()), lease.label)
    if body.stream:
        reply.object = "chat.completion.chunk"
        chunks = _chat_chunks(state, reply, body, lease, started, len(ids))
        return event_stream(chunks, lease, started)
    try:
        results = await streams.collect_all(started)
    finally:
        lease.release()
    generated = sum(len(r.token_ids) for r in results)
    state.metrics.observe_tokens(lease.label, len(ids), generated)
    choices = [
        {
            "index": i,
            "message": {"role": "assistant", "content": r.text},
            "logprobs": None,
            "finish_reason": r.finish_reason,
        }
        for i, r in enumerate(results)
    ]
    return reply.envelope(choices, usage=_usage(len(ids), generated))


# ---- helpers -------------------------------------------------------------------------------------
async def _start(
    state: ServerState,
    request: Request,
    body: SamplingBody,
    prompt_ids: list[list[int]],
    max_tokens: int,
) -> tuple[leases.Lease, list[streams.Stream]]:
    """Lease the model's adapter (a split tag picks its version by `user`) and submit `n` generations per
    prompt; errors release the lease."""
    lease = await leases.acquire_model(state, request, body.model, user=body.user)
    try:
        requests = generation_requests(
            prompt_ids,
            lease.adapter,
            max_new_tokens=max_tokens,
            sampling=body.sampling_settings(),
            n=body.n,
        )
        started = await streams.start(state.scheduler, requests)
    except BaseException:
        lease.release()
        raise
    return lease, started


async def _completion_chunks(
    state: ServerState,
    reply: _Reply,
    body: CompletionRequest,
    lease: leases.Lease,
    started: list[streams.Stream],
    echoes: list[str],
    prompt_tokens: int,
) -> AsyncIterator[str]:
    generated = 0
    for index, echo in enumerate(echoes):
        if echo:
            yield sse(reply.envelope([_text_choice(index, echo, None)]))
    async for index, event in streams.merge(started):
        generated += event.token_id is not None
        yield sse(reply.envelope([_text_choice(index, event.text or "", event.finish_reason)]))
    state.metrics.observe_tokens(lease.label, prompt_tokens, generated)
    if body.include_usage:
        yield sse(reply.envelope([], usage=_usage(prompt_tokens, generated)))
    yield sse("[DONE]")


async def _chat_chunks(
    state: ServerState,
    reply: _Reply,
    body: ChatCompletionRequest,
    lease: leases.Lease,
    started: list[streams.Stream],
    prompt_tokens: int,
) -> AsyncIterator[str]:
    generated = 0
    for index in range(len(started)):
        yield sse(reply.envelope([_delta_choice(index, {"role": "assistant", "content": ""}, None)]))
    async for index, event in streams.merge(started):
        generated += event.token_id is not None
        if event.text:
            yield sse(reply.envelope([_delta_choice(index, {"content": event.text}, None)]))
        if event.finish_reason is not None:
            yield sse(reply.envelope([_delta_choice(index, {}, event.finish_reason)]))
    state.metrics.observe_tokens(lease.label, prompt_tokens, generated)
    if body.include_usage:
        yield sse(reply.envelope([], usage=_usage(prompt_tokens, generated)))
    yield sse("[DONE]")


def _text_choice(index: int, text: str, finish_reason: str | None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}


def _delta_choice(index: int, delta: dict[str, str], finish_reason: str | None) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _model(model_id: str, created: int, *, root: str, parent: str | None) -> dict[str, Any]:
    return {
        "id": model_id,
        "object": "model",
        "created": created,
        "owned_by": "adapterdock",
        "root": root,
        "parent": parent,
    }


def _epoch(iso: str) -> int:
    try:
        return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp())
    except ValueError:
        return 0
