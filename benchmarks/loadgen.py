"""The load generator of `serve_bench.py`: workload (prompts, adapter choice) and C concurrent HTTP clients.

Boundary: speaks OpenAI's streamed `POST /v1/completions` over httpx to any server (adapterdock, the naive
PEFT server, vLLM) and measures what a client sees: time to first token, latency, generated tokens. It
starts no process and knows nothing about the server's internals.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

FIRST_ORDINARY_ID = 5
"""Ids below this are the built-in bases' special tokens (<pad> <s> </s> <|im_start|> <|im_end|>)."""


# ---- workload ---------------------------------------------------------------------------------------
def build_prompts(count: int, length: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    """`count` prompts of exactly `length` token ids, drawn from the ordinary (non-special) vocabulary.

    Sent as token-id prompts, so no tokenizer round trip can change their length.
    """
    if length < 1 or vocab_size <= FIRST_ORDINARY_ID:
        raise ValueError("length must be >= 1 and the vocabulary must have ordinary tokens")
    rng = random.Random(seed)
    return [[rng.randrange(FIRST_ORDINARY_ID, vocab_size) for _ in range(length)] for _ in range(count)]


def zipf_weights(n: int, s: float = 1.0) -> list[float]:
    """Normalised Zipf probabilities p_k ∝ 1 / k**s for ranks k = 1..n."""
    if n < 1:
        raise ValueError("n must be at least 1")
    raw = [1.0 / (k**s) for k in range(1, n + 1)]
    total = sum(raw)
    return [w / total for w in raw]


def sample_adapters(
    names: Sequence[str], count: int, dist: str = "uniform", seed: int = 0, zipf_s: float = 1.0
) -> list[str]:
    """Adapter per request: uniform over `names`, or Zipf by list order (the first is hottest)."""
    if not names:
        raise ValueError("names is empty")
    rng = random.Random(seed)
    if dist == "uniform":
        return [rng.choice(list(names)) for _ in range(count)]
    if dist == "zipf":
        return rng.choices(list(names), weights=zipf_weights(len(names), zipf_s), k=count)
    raise ValueError(f"dist must be 'uniform' or 'zipf', not {dist!r}")


# ---- one request ------------------------------------------------------------------------------------
@dataclass
class RequestResult:
    """What the client saw for one streamed completion."""

    model: str
    ok: bool
    ttft_s: float | None = None
    latency_s: float | None = None
    completion_tokens: int = 0
    prompt_tokens: int | None = None
    error: str | None = None


async def stream_completion(
    client: httpx.AsyncClient,
    model: str,
    prompt: list[int],
    max_tokens: int,
    timeout_s: float,
) -> RequestResult:
    """One greedy streamed completion that must produce exactly `max_tokens` tokens (ignore_eos)."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "min_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    result = RequestResult(model=model, ok=False)
    chunks = 0

    async def consume() -> bool:
        nonlocal chunks
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")[:300]
                result.error = f"HTTP {response.status_code}: {text}"
                return False
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if event.get("choices"):
                    if result.ttft_s is None:
                        result.ttft_s = time.perf_counter() - start
                    chunks += 1
                if event.get("usage"):
                    result.completion_tokens = int(event["usage"].get("completion_tokens") or 0)
                    result.prompt_tokens = event["usage"].get("prompt_tokens")
        return True

    try:
        if not await asyncio.wait_for(consume(), timeout_s):
            return result
    except (httpx.HTTPError, asyncio.TimeoutError, json.JSONDecodeError) as err:
        result.error = f"{type(err).__name__}: {err}"[:300]
        return result
    result.latency_s = time.perf_counter() - start
    if not result.completion_tokens:
        result.completion_tokens = chunks  # no usage chunk: one token per chunk
    result.ok = result.completion_tokens == max_tokens
    if not result.ok:
        result.error = f"generated {result.completion_tokens} tokens, expected {max_tokens}"
    return result


# ---- a load run --------------------------------------------------------------------------------------
@dataclass
class LoadResult:
    """Aggregate of one scenario at one concurrency."""

    concurrency: int
    requests: int
    ok: int
    errors: int
    wall_s: float
    generated_tokens: int
    tokens_per_s: float
    requests_per_s: float
    ttft_p50_ms: float | None
    ttft_p95_ms: float | None
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    prompt_tokens_seen: list[int] = field(default_factory=list)
    first_errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) by linear interpolation; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = (len(ordered) - 1) * q / 100.0
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summarise(results: list[RequestResult], concurrency: int, wall_s: float) -> LoadResult:
    """Throughput and latency percentiles of finished requests (failed ones count as errors only)."""
    good = [r for r in results if r.ok]
    tokens = sum(r.completion_tokens for r in good)
    ms = [1000.0 * r.ttft_s for r in good if r.ttft_s is not None]
    lat = [1000.0 * r.latency_s for r in good if r.latency_s is not None]
    return LoadResult(
        concurrency=concurrency,
        requests=len(results),
        ok=len(good),
        errors=len(results) - len(good),
        wall_s=round(wall_s, 3),
        generated_tokens=tokens,
        tokens_per_s=round(tokens / wall_s, 2) if wall_s > 0 else 0.0,
        requests_per_s=round(len(good) / wall_s, 3) if wall_s > 0 else 0.0,
        ttft_p50_ms=_round(percentile(ms, 50)),
        ttft_p95_ms=_round(percentile(ms, 95)),
        latency_p50_ms=_round(percentile(lat, 50)),
        latency_p95_ms=_round(percentile(lat, 95)),
        prompt_tokens_seen=sorted({int(r.prompt_tokens) for r in good if r.prompt_tokens is not None}),
        first_errors=[r.error for r in results if r.error][:3],
    )


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


async def run_load(
    base_url: str,
    models: list[str],
    prompts: list[list[int]],
    *,
    concurrency: int,
    max_tokens: int,
    time_limit_s: float,
    request_timeout_s: float,
) -> LoadResult:
    """Send `len(models)` requests (request i uses models[i]) from `concurrency` clients.

    Bounded: no request starts after `time_limit_s`, and each request is cut at `request_timeout_s`.
    """
    results: list[RequestResult] = []
    next_index = 0
    deadline = time.perf_counter() + time_limit_s
    limits = httpx.Limits(max_connections=concurrency + 2, max_keepalive_connections=concurrency + 2)

    async with httpx.AsyncClient(base_url=base_url, timeout=request_timeout_s, limits=limits) as client:

        async def worker() -> None:
            nonlocal next_index
            while next_index < len(models) and time.perf_counter() < deadline:
                i = next_index
                next_index += 1
                prompt = prompts[i % len(prompts)]
                results.append(
                    await stream_completion(client, models[i], prompt, max_tokens, request_timeout_s)
                )

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return summarise(results, concurrency, wall)


def warm_up(base_url: str, models: list[str], prompt: list[int], timeout_s: float) -> LoadResult:
    """One 2-token request per model, so a measured run starts with resident adapters and warm code paths."""
    return asyncio.run(
        run_load(
            base_url,
            models,
            [prompt],
            concurrency=min(4, len(models)),
            max_tokens=2,
            time_limit_s=timeout_s,
            request_timeout_s=timeout_s,
        )
    )
