"""LoRAX / TGI-compatible routes: `POST /generate`, `POST /generate_stream`, `POST /` and `GET /info`.

Boundary: TGI's wire format, as the `lorax-client` and `text-generation` packages read it.
`parameters.adapter_id` names an adapter reference (or is absent for the base); `adapter_source` is `local`
or `hub` (only with --hub); arbitrary hub ids are never fetched. `POST /` is what those clients actually
call: it returns a one-element list, or streams when `stream` is true. Errors keep OpenAI's shape; the
clients map them by status code.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request

from server import leases, streams
from server.prompts import check_length, check_max_tokens, encode
from server.requests import generation_requests
from server.routes.streaming import event_stream, sse
from server.runtime import ServerState, State
from server.schemas import GenerateParameters, GenerateRequest

router = APIRouter(tags=["LoRAX / TGI-compatible"])


@router.get("/info")
async def info(state: State) -> dict[str, Any]:
    """TGI's server info: the base, its limits, and this server's version."""
    return {
        "model_id": state.base_name,
        "model_sha": state.base.fingerprint if state.base else None,
        "model_dtype": state.config.quantize,
        "max_input_length": state.config.max_input_tokens,
        "max_total_tokens": state.config.max_input_tokens + state.config.max_new_tokens,
        "max_batch_size": state.config.max_batch_size,
        "max_concurrent_requests": state.config.max_queue,
        "router": "adapterdock",
        "version": "0.1.0",
    }


@router.post("/generate")
async def generate(body: GenerateRequest, request: Request, state: State) -> Any:
    """One generation; `details` adds finish reason, token counts and the tokens."""
    run = await _Run.start(state, request, body.inputs, body.parameters)
    return await run.response()


@router.post("/generate_stream")
async def generate_stream(body: GenerateRequest, request: Request, state: State) -> Any:
    """One generation streamed as server-sent events, one token per event."""
    run = await _Run.start(state, request, body.inputs, body.parameters)
    return event_stream(run.events(), run.lease, run.streams)


@router.post("/")
async def compat_generate(body: GenerateRequest, request: Request, state: State) -> Any:
    """TGI's root route, used by both clients: a list of one response, or a stream when `stream` is true."""
    run = await _Run.start(state, request, body.inputs, body.parameters)
    if body.stream:
        return event_stream(run.events(), run.lease, run.streams)
    return [await run.response()]


class _Run:
    """One TGI generation: its lease, its stream and what its answer needs."""

    def __init__(
        self,
        state: ServerState,
        inputs: str,
        params: GenerateParameters,
        prompt_ids: list[int],
        lease: leases.Lease,
        started: list[streams.Stream],
    ) -> None:
        self.state, self.inputs, self.params = state, inputs, params
        self.prompt_ids, self.lease, self.streams = prompt_ids, lease, started
        tokenizer = state.engine.tokenizer
        self._eos = getattr(tokenizer, "eos_token_id", None)
        self._special = set(getattr(tokenizer, "all_special_ids", ()) or ())

    @classmethod
    async def start(
        cls, state: ServerState, request: Request, inputs: str, params: GenerateParameters
    ) -> _Run:
        params.check_supported()
        max_new = check_max_tokens(params.max_new_tokens, state.config)
        ids = await encode(state.engine.tokenizer, inputs)
        if params.truncate is not None:
            ids = ids[-params.truncate :]
        check_length(ids, state.config)
        lease = await leases.acquire_model(
            state, request, params.adapter_id or None, source=params.adapter_source
        )
        try:
            requests = generation_requests(
                [ids], lease.adapter, max_new_tokens=max_new, sampling=params.sampling_settings()
            )
            started = await streams.start(state.scheduler, requests)
        except BaseException:
            lease.release()
            raise
        return cls(state, inputs, params, ids, lease, started)

    async def response(self) -> dict[str, Any]:
        """Run to the end and answer TGI's `GenerateResponse`."""
        try:
            (result,) = await streams.collect_all(self.streams)
        finally:
            self.lease.release()
        self.state.metrics.observe_tokens(self.lease.label, len(self.prompt_ids), len(result.token_ids))
        answer: dict[str, Any] = {"generated_text": self._full(result.text)}
        if self.params.details:
            tokens = [
                self._token(tid, text, lp)
                for tid, text, lp in zip(result.token_ids, result.token_texts, result.logprobs, strict=True)
            ]
            answer["details"] = {
                **self._details(result.finish_reason, result.token_ids),
                "prefill": [],
                "tokens": tokens,
                "best_of_sequences": None,
            }
        return answer

    async def events(self) -> AsyncIterator[str]:
        """TGI's stream: one event per token; the last carries `generated_text` and `details`."""
        (stream,) = self.streams
        text, token_ids = "", []
        pending: Any = None  # one event of look-ahead, so the final one can carry the finish
        async for event in stream:
            text += event.text or ""
            if event.token_id is not None:
                token_ids.append(event.token_id)
                if pending is not None:
                    yield sse(self._stream_event(pending))
                pending = event
            if event.finish_reason is not None:
                if pending is None:
                    pending = event
                self.state.metrics.observe_tokens(self.lease.label, len(self.prompt_ids), len(token_ids))
                final = self._stream_event(pending, text_tail=event.text if pending is not event else "")
                final["generated_text"] = self._full(text)
                final["details"] = (
                    self._details(event.finish_reason, token_ids) if self.params.details else None
                )
                yield sse(final)
                return

    # ---- wire pieces ---------------------------------------------------------------------------
    def _full(self, text: str) -> str:
        return self.inputs + text if self.params.return_full_text else text

    def _token(self, token_id: int | None, text: str, logprob: float | None) -> dict[str, Any]:
        return {
            "id": token_id if token_id is not None else -1,
            "text": text,
            "logprob": logprob,
            "special": token_id in self._special,
        }

    def _stream_event(self, event: Any, text_tail: str = "") -> dict[str, Any]:
        token = self._token(event.token_id, (event.text or "") + text_tail, getattr(event, "logprob", None))
        return {"token": token, "generated_text": None, "details": None}

    def _details(self, finish_reason: str, token_ids: list[int]) -> dict[str, Any]:
        return {
            "finish_reason": self._finish(finish_reason, token_ids),
            "prompt_tokens": len(self.prompt_ids),
            "generated_tokens": len(token_ids),
            "seed": self.params.seed,
        }

    def _finish(self, reason: str, token_ids: list[int]) -> str:
        if reason == "length":
            return "length"
        if token_ids and token_ids[-1] == self._eos and not self.params.ignore_eos_token:
            return "eos_token"
        return "stop_sequence"
