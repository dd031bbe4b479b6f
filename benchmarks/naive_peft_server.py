"""The multi-adapter server a user writes by hand: the naive baseline of `serve_bench.py`.

One `PeftModel` holds every adapter (`load_adapter`); requests are served one at a time under a lock,
`set_adapter` per request, and `model.generate` produces the tokens. It speaks the subset of OpenAI's
`POST /v1/completions` the benchmark uses (text or token-id prompt, `max_tokens`, greedy or sampled,
`stream` with `stream_options.include_usage`, vLLM's `ignore_eos` and `min_tokens`), so the same clients drive
it and adapterdock. Boundary: a benchmark peer, not part of the product; it imports nothing from `server/`.

Run:
    python benchmarks/naive_peft_server.py --base small --port 8100 \\
        --adapter a000=/tmp/adapters/a000 --adapter a001=/tmp/adapters/a001
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI, HTTPException
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.generation.streamers import BaseStreamer

from hub.bases import resolve_base


class CompletionBody(BaseModel):
    model: str
    prompt: str | list[int]
    max_tokens: int = Field(default=16, ge=1, le=4096)
    temperature: float = 1.0
    top_p: float = 1.0
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    seed: int | None = None


class _QueueStreamer(BaseStreamer):
    """Hands each new token id from the generate thread to the event loop (prompt ids are skipped)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> None:
        self.loop, self.queue, self.prompt_seen = loop, queue, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.loop.call_soon_threadsafe(self.queue.put_nowait, token)

    def end(self) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, None)


class NaivePeftServer:
    """One base, all adapters loaded into one PeftModel, one request at a time."""

    def __init__(self, base: str, adapters: dict[str, Path], quantize: str = "none") -> None:
        info = resolve_base(base)
        self.base_name = base
        self.tokenizer = AutoTokenizer.from_pretrained(info.path)
        kwargs: dict[str, Any] = {"dtype": torch.float32}
        if quantize == "nf4":
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
            )
        model = AutoModelForCausalLM.from_pretrained(info.path, **kwargs)
        if adapters:
            from peft import PeftModel

            names = list(adapters)
            model = PeftModel.from_pretrained(model, adapters[names[0]], adapter_name=names[0])
            for name in names[1:]:
                model.load_adapter(adapters[name], adapter_name=name)
        self.model = model.eval()
        self.adapters = set(adapters)
        self.lock = threading.Lock()  # one request at a time, as a hand-written server does

    def _adapter_context(self, name: str) -> Any:
        if name == self.base_name:
            return self.model.disable_adapter() if self.adapters else nullcontext()
        if name not in self.adapters:
            raise HTTPException(404, f"unknown model {name!r}")
        self.model.set_adapter(name)
        return nullcontext()

    def generate(self, body: CompletionBody, ids: list[int], streamer: BaseStreamer | None) -> list[int]:
        """Generate for one request under the lock; returns the new token ids."""
        greedy = body.temperature == 0.0
        min_new = body.max_tokens if body.ignore_eos else min(body.min_tokens, body.max_tokens)
        with self.lock, torch.inference_mode():
            if body.seed is not None:
                torch.manual_seed(body.seed)
            with self._adapter_context(body.model):
                out = self.model.generate(
                    input_ids=torch.tensor([ids]),
                    attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                    max_new_tokens=body.max_tokens,
                    min_new_tokens=min_new,
                    do_sample=not greedy,
                    temperature=None if greedy else body.temperature,
                    top_p=None if greedy else body.top_p,
                    pad_token_id=self.tokenizer.pad_token_id,
                    streamer=streamer,
                )
        return out[0, len(ids) :].tolist()

    def prompt_ids(self, body: CompletionBody) -> list[int]:
        if isinstance(body.prompt, list):
            return list(body.prompt)
        return list(self.tokenizer.encode(body.prompt))


def _chunk(rid: str, model: str, text: str, finish: str | None, usage: dict | None = None) -> str:
    payload: dict[str, Any] = {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [] if usage else [{"index": 0, "text": text, "finish_reason": finish}],
    }
    if usage:
        payload["usage"] = usage
    return f"data: {json.dumps(payload)}\n\n"


def create_app(server: NaivePeftServer) -> FastAPI:
    app = FastAPI(title="naive PEFT server")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        names = [server.base_name, *sorted(server.adapters)]
        return {"object": "list", "data": [{"id": n, "object": "model"} for n in names]}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody) -> Any:
        if body.model != server.base_name and body.model not in server.adapters:
            return JSONResponse(
                {"error": {"message": f"unknown model {body.model!r}", "type": "not_found", "code": 404}},
                status_code=404,
            )
        ids = server.prompt_ids(body)
        rid = f"cmpl-{uuid.uuid4().hex[:12]}"
        if not body.stream:
            new = await asyncio.to_thread(server.generate, body, ids, None)
            usage = {"prompt_tokens": len(ids), "completion_tokens": len(new)}
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
            text = server.tokenizer.decode(new, skip_special_tokens=True)
            choice = {"index": 0, "text": text, "finish_reason": "length"}
            return {
                "id": rid,
                "object": "text_completion",
                "model": body.model,
                "choices": [choice],
                "usage": usage,
            }
        return StreamingResponse(_stream(server, body, ids, rid), media_type="text/event-stream")

    return app


async def _stream(
    server: NaivePeftServer, body: CompletionBody, ids: list[int], rid: str
) -> AsyncIterator[str]:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    job = asyncio.create_task(asyncio.to_thread(server.generate, body, ids, _QueueStreamer(loop, queue)))
    count = 0
    while (token := await queue.get()) is not None:
        count += 1
        finish = "length" if count == body.max_tokens else None
        yield _chunk(rid, body.model, server.tokenizer.decode([token]), finish)
    await job
    if body.stream_options and body.stream_options.get("include_usage"):
        usage = {"prompt_tokens": len(ids), "completion_tokens": count, "total_tokens": len(ids) + count}
        yield _chunk(rid, body.model, "", None, usage)
    yield "data: [DONE]\n\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="A hand-written multi-adapter PEFT server (the naive baseline).",
        epilog="example: python benchmarks/naive_peft_server.py --base small --adapter a=/tmp/a --port 8100",
    )
    parser.add_argument("--base", default="tiny", help="built-in base name or HF folder")
    parser.add_argument(
        "--adapter", action="append", default=[], metavar="NAME=PATH", help="a PEFT adapter folder"
    )
    parser.add_argument("--quantize", choices=("none", "nf4"), default="none")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    adapters = {}
    for item in args.adapter:
        name, _, path = item.partition("=")
        adapters[name] = Path(path)
    server = NaivePeftServer(args.base, adapters, args.quantize)
    uvicorn.run(create_app(server), host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
