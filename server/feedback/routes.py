"""Human feedback routes: make answer pairs, collect people's judgements, serve the rating page.

- `POST /v1/feedback/pairs` (API key): two answers to one prompt, either two samples of one adapter
  with different seeds or one from each of `model` and `model_b`, generated through the same
  resolver -> adapter lease -> scheduler path as the completions endpoints, stored with a `pair_id`.
- `POST /v1/feedback`: one rater's choice on a pair (`a` | `b` | `tie` | `both_bad`, or `left` /
  `right` as the page showed it); idempotent per rater and pair, a changed mind is `replaced`; at most
  `--max-judgements-per-rater` per rater, comments up to MAX_COMMENT_LENGTH characters.
- `GET /v1/feedback/next[?rater=]`: the next pair that rater has not judged, answers as left/right in
  a per-rater shuffled order, without saying which adapter made which (mapped back server-side).
- `GET /v1/feedback/progress[?rater=]` and `GET /feedback` (the page, `server/static/feedback.html`).

Access: the middleware (`server.access`) checks every path before its body is read: a rater token, the API
key or the admin key for the rating paths. The rater is the one the token stands for (`rater_for`); a rater
token cannot act as another rater, and only the API key's holder names raters freely.
Boundary: HTTP only; storage is `server.feedback.store`; leases, requests and generation are
`server.leases`, `server.requests` and `server.streams`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import time
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, ConfigDict, Field

from server import leases, streams
from server.access import check_scope
from server.config import ServerConfig
from server.errors import InvalidInputError
from server.feedback.auth import rater_for
from server.feedback.records import MAX_COMMENT_LENGTH, MAX_RATER_LENGTH, VIEW_CHOICES, Pair, to_view
from server.feedback.store import FeedbackStore, default_db_path
from server.prompts import chat_ids, check_length, check_max_tokens
from server.requests import Sampling, generation_requests
from server.resolver import GENERATE
from server.runtime import ServerState, State
from server.schemas import MAX_STOP_LENGTH, MAX_STOP_SEQUENCES, ChatMessage, Seed, Temperature, TopP

logger = logging.getLogger(__name__)

router = APIRouter(tags=["Human feedback"])

PAGE = Path(__file__).resolve().parents[1] / "static" / "feedback.html"
PAGE_CHOICES = ["left", "right", "tie", "both_bad"]
"""What the page offers, keys 1-4 (left/right are mapped back to a/b per rater)."""
_SEED_RANGE = 2**31

Rater = Annotated[str | None, Query(min_length=1, max_length=MAX_RATER_LENGTH)]
StopText = Annotated[str, Field(min_length=1, max_length=MAX_STOP_LENGTH)]


class PairRequest(BaseModel):
    """`POST /v1/feedback/pairs`: `prompt` (one user turn) or chat `messages`, and who answers."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str = Field(min_length=1, max_length=256)
    model_b: str | None = Field(default=None, min_length=1, max_length=256)
    """A second adapter (or the base's name): one answer each. Unset: two samples of `model`."""
    prompt: str | None = Field(default=None, min_length=1)
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    max_tokens: int | None = Field(default=None, ge=1)
    seed: Seed | None = None
    """Seed of answer a; answer b uses seed + 1 (same model) or the same seed (two models)."""
    stop: list[StopText] = Field(default_factory=list, max_length=MAX_STOP_SEQUENCES)

    def sampling_settings(self, seed: int) -> Sampling:
        """The sampling fields of one answer (seeded `seed`), for `server.requests.generation_requests`."""
        return Sampling(temperature=self.temperature, top_p=self.top_p, seed=seed, stop=tuple(self.stop))


class JudgementRequest(BaseModel):
    """`POST /v1/feedback`."""

    model_config = ConfigDict(extra="ignore")

    pair_id: str = Field(min_length=1, max_length=64)
    choice: Literal["a", "b", "tie", "both_bad", "left", "right"]
    rater: str | None = Field(default=None, min_length=1, max_length=MAX_RATER_LENGTH)
    """Who judges; with a rater token, the token's rater (leave it out, or send that id)."""
    comment: str | None = Field(default=None, max_length=MAX_COMMENT_LENGTH)


# ---- settings and storage ----------------------------------------------------------------------
def feedback_db(config: ServerConfig) -> Path:
    """The feedback database: `config.feedback_db`, else `<registry>/feedback.sqlite`."""
    return Path(config.feedback_db) if config.feedback_db else default_db_path(config.registry)


async def open_store(request: Request, state: ServerState) -> FeedbackStore:
    """The app's feedback store, opened (and created) on first use off the event loop."""
    store: FeedbackStore | None = getattr(request.app.state, "feedback_store", None)
    if store is None:
        store = await asyncio.to_thread(FeedbackStore, feedback_db(state.config))
        request.app.state.feedback_store = store
        logger.info("feedback database %s", store.path)
    return store


async def rater_store(request: Request) -> FeedbackStore:
    """Dependency of the rating routes: the store (access was checked by the middleware, before the body)."""
    return await open_store(request, request.app.state.server)


def principal(request: Request) -> Any:
    """The request's `server.access.Principal`, as the access middleware left it."""
    return request.scope.get("state", {}).get("principal")


RaterStore = Annotated[FeedbackStore, Depends(rater_store)]


# ---- routes -------------------------------------------------------------------------------------
@router.post("/v1/feedback/pairs")
async def create_pair(body: PairRequest, request: Request, state: State) -> dict[str, Any]:
    """Generate two answers to one prompt and store them as a pair to be judged."""
    if (body.prompt is None) == (body.messages is None):
        raise InvalidInputError("Send exactly one of `prompt` or `messages`.", "Drop one of the two.")
    if body.model_b is None and body.temperature == 0:
        raise InvalidInputError(
            "temperature 0 with one model gives two identical answers.",
            "Set temperature > 0, or name a second adapter in `model_b`.",
        )
    max_tokens = check_max_tokens(body.max_tokens, state.config)
    prompt, messages = _prompt(body)
    try:
        ids = await chat_ids(state.engine.tokenizer, messages)
    except Exception as exc:  # noqa: BLE001 - template errors (e.g. role order) are the client's to fix
        raise InvalidInputError(
            f"The base's chat template refused these messages: {exc}", "Check the message roles and order."
        ) from exc
    check_length(ids, state.config)
    seed_a = body.seed if body.seed is not None else random.randrange(_SEED_RANGE)
    seed_b = seed_a if body.model_b is not None else seed_a + 1
    models = (body.model, body.model_b or body.model)
    texts, finish, labels = await _generate(state, request, models, (seed_a, seed_b), ids, body, max_tokens)
    params = {
        "temperature": body.temperature,
        "top_p": body.top_p,
        "max_tokens": max_tokens,
        "stop": list(body.stop),
        "seed_a": seed_a,
        "seed_b": seed_b,
        "requested": {"model": body.model, "model_b": body.model_b},
    }
    store = await open_store(request, state)
    pair = await asyncio.to_thread(
        store.add_pair, prompt, texts[0], texts[1],
        adapter_a=labels[0][0], version_a=labels[0][1], adapter_b=labels[1][0], version_b=labels[1][1],
        params=params,
    )  # fmt: skip
    candidates = [
        {"label": "a", "model": pair.model_a, "text": texts[0], "finish_reason": finish[0], "seed": seed_a},
        {"label": "b", "model": pair.model_b, "text": texts[1], "finish_reason": finish[1], "seed": seed_b},
    ]
    return {
        "object": "feedback.pair",
        "pair_id": pair.pair_id,
        "created": int(time.time()),
        "prompt": prompt,
        "candidates": candidates,
    }


@router.post("/v1/feedback")
async def judge(body: JudgementRequest, request: Request, store: RaterStore) -> dict[str, Any]:
    """Record one rater's choice; the same again is `unchanged`, a different one `replaced`."""
    rater = rater_for(principal(request), body.rater)
    limit = request.app.state.server.config.max_judgements_per_rater
    result = await asyncio.to_thread(
        store.judge, body.pair_id, rater, body.choice, body.comment or "", max_per_rater=limit
    )
    by_view = body.choice in VIEW_CHOICES
    previous = None
    if result.previous is not None:
        previous = result.previous.choice
        if by_view:  # answer in the terms the rater used, so a/b (and the adapters) stay hidden
            previous = to_view(previous, bool(result.judgement.swapped))
    return {
        "object": "feedback.judgement",
        "pair_id": body.pair_id,
        "rater": result.judgement.rater,
        "choice": body.choice,
        "status": result.status,
        "previous": previous,
    }


@router.get("/v1/feedback/next")
async def next_pair(request: Request, store: RaterStore, rater: Rater = None) -> dict[str, Any]:
    """The oldest pair this rater has not judged, answers shuffled per rater; `pair` null when done."""
    rater = rater_for(principal(request), rater)
    pair, progress = await asyncio.to_thread(_next_and_progress, store, rater)
    return {"object": "feedback.next", "rater": rater, "pair": pair, "progress": progress}


@router.get("/v1/feedback/progress")
async def progress(
    request: Request,
    store: RaterStore,
    rater: Annotated[str | None, Query(max_length=MAX_RATER_LENGTH)] = None,
) -> dict[str, Any]:
    """Pairs, judgements and raters; with `rater` (a rater token: its own), what they rated and pending."""
    if rater is not None:
        rater = rater_for(principal(request), rater)
    counts = await asyncio.to_thread(store.progress, rater)
    return {"object": "feedback.progress", **counts}


@router.get("/feedback", response_class=HTMLResponse, include_in_schema=False)
async def page() -> HTMLResponse:
    """The rating page (static; it asks for the rater token and calls the endpoints above)."""
    nonce = secrets.token_urlsafe(16)
    html = (await asyncio.to_thread(PAGE.read_text, encoding="utf-8")).replace("__NONCE__", nonce)
    policy = (
        f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    headers = {
        "Content-Security-Policy": policy,
        "Cache-Control": "no-store",
        "Referrer-Policy": "no-referrer",
    }
    return HTMLResponse(html, headers=headers)


# ---- helpers ------------------------------------------------------------------------------------
def _prompt(body: PairRequest) -> tuple[str | list[dict[str, str]], list[dict[str, str]]]:
    """(what is stored and exported, the chat messages the model sees)."""
    if body.prompt is not None:
        return body.prompt, [{"role": "user", "content": body.prompt}]
    messages = [
        {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        for m in body.messages or []
    ]
    if messages[-1]["role"] == "assistant":
        raise InvalidInputError(
            "The messages end with an assistant turn; a pair needs a prompt to answer.",
            "End `messages` with a user turn.",
        )
    return messages, messages


async def _lease(
    state: ServerState, request: Request, model: str
) -> tuple[leases.Lease, tuple[str, int | None]]:
    """Lease what `model` names, with the (adapter name, version) to store; the base has no version."""
    if model == state.base_name:
        check_scope(principal(request), state.base_name)
        return leases.Lease(state, None, None), (state.base_name, None)
    resolved = await leases.resolve(state, request, model, GENERATE)
    lease = await leases.acquire(state, resolved)
    return lease, (resolved.manifest.name, resolved.manifest.version)


async def _generate(
    state: ServerState,
    request: Request,
    models: tuple[str, str],
    seeds: tuple[int, int],
    ids: list[int],
    body: PairRequest,
    max_tokens: int,
) -> tuple[list[str], list[str], list[tuple[str, int | None]]]:
    """Both answers through the scheduler (submitted together, so they can share a batch)."""
    held: list[leases.Lease] = []
    labels: list[tuple[str, int | None]] = []
    try:
        for model in models:
            lease, label = await _lease(state, request, model)
            held.append(lease)
            labels.append(label)
        requests = [
            one
            for lease, seed in zip(held, seeds, strict=True)
            for one in generation_requests(
                [ids], lease.adapter, max_new_tokens=max_tokens, sampling=body.sampling_settings(seed)
            )
        ]
        running = await streams.start(state.scheduler, requests)
        results = await streams.collect_all(running)
    finally:
        for lease in held:
            lease.release()
    for lease, result in zip(held, results, strict=True):
        state.metrics.observe_tokens(lease.label, len(ids), len(result.token_ids))
    return [r.text for r in results], [r.finish_reason for r in results], labels


def _next_and_progress(store: FeedbackStore, rater: str) -> tuple[dict[str, Any] | None, dict[str, int]]:
    pair = store.next_pair(rater)
    return (None if pair is None else _shown(pair, rater.strip())), store.progress(rater)


def _shown(pair: Pair, rater: str) -> dict[str, Any]:
    """A pair as one rater sees it: the prompt as messages and the answers as left/right only."""
    left, right = pair.view(rater)
    prompt = pair.prompt if isinstance(pair.prompt, list) else [{"role": "user", "content": pair.prompt}]
    return {"pair_id": pair.pair_id, "prompt": prompt, "left": left, "right": right, "choices": PAGE_CHOICES}
