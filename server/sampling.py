"""Choosing the next token of each row: greedy or temperature + top-p, each row with its own generator.

Boundary: logits in, token ids and their log-probabilities out. No batching (see `server.scheduler`),
no text (see `server.detokenize`), no HTTP.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from server.requests import GenerationRequest

SAMPLING_EPS = 1e-5
"""Temperatures below this decode greedily (as in vLLM): dividing logits by them overflows to inf/NaN."""


def new_generator(request: GenerationRequest, device: torch.device) -> torch.Generator | None:
    """The generator a sampled request draws from (seeded when it asks), None for greedy ones."""
    if request.temperature <= 0:
        return None
    generator = torch.Generator(device=device)
    if request.seed is None:
        generator.seed()
    else:
        generator.manual_seed(request.seed)
    return generator


def suppress(logits: torch.Tensor, rows: Iterable[int], token_ids: set[int]) -> None:
    """Make `token_ids` impossible in `rows` (in place): end-of-sequence before `min_tokens`."""
    if not token_ids:
        return
    columns = list(token_ids)
    for row in rows:
        logits[row, columns] = float("-inf")


def sample_tokens(logits: torch.Tensor, requests: list[GenerationRequest], generators: list) -> list[int]:
    """Next token per row: argmax when temperature is (about) 0, else temperature + top-p sampling.

    Each sampled row draws from its own `torch.Generator`, so a seeded request gets the same draws
    whatever else shares its batch.
    """
    tokens = logits.argmax(dim=-1).tolist()
    for i, (request, generator) in enumerate(zip(requests, generators, strict=True)):
        if request.temperature < SAMPLING_EPS:
            continue
        probs = torch.softmax(logits[i] / request.temperature, dim=-1)
        if request.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            keep = sorted_probs.cumsum(0) - sorted_probs < request.top_p
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
        tokens[i] = int(torch.multinomial(probs, 1, generator=generator))
    return tokens


def token_logprobs(logits: torch.Tensor, tokens: list[int]) -> list[float | None]:
    """Log-probability of each row's chosen token under the untempered logits (None if impossible)."""
    chosen = torch.tensor(tokens, device=logits.device).unsqueeze(-1)
    values = torch.log_softmax(logits.float(), dim=-1).gather(-1, chosen).squeeze(-1).tolist()
    return [v if v != float("-inf") else None for v in values]
