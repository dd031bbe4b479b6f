"""What flows between the HTTP layer and the scheduler: generation requests, token events, task inputs.

Boundary: plain, torch-free data types plus the one builder of `GenerationRequest`s, so routes import
them normally and the scheduler, engine and fakes share them. Wire formats (OpenAI, TGI) stay in
`server.schemas` and `server.routes`; tokenizing stays in `server.prompts`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol


class AdapterHandle(Protocol):
    """What a request needs of a resident adapter (the engine's `LoadedAdapter`, or a test fake)."""

    @property
    def key(self) -> str:
        """Immutable `name@version`."""
        ...

    @property
    def slot(self) -> int:
        """Engine slot id (0 is "no adapter")."""
        ...


@dataclass
class GenerationRequest:
    """One completion to generate."""

    prompt_ids: list[int]
    adapter: AdapterHandle | None
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0


@dataclass
class TokenEvent:
    """One generated token's text delta; the last event of a request carries `finish_reason`."""

    text: str
    token_id: int | None
    finish_reason: str | None
    """"stop" | "length" | None while running."""
    logprob: float | None = None
    """Log-probability of `token_id` under the model's (untempered) distribution, as TGI reports it."""


@dataclass(frozen=True)
class TaskInput:
    """One tokenized input of a task request (classify, NER, score), tokenized once by `server.prompts`."""

    text: str
    """The text the ids encode (for score: the conversation rendered by the chat template)."""
    ids: list[int]
    offsets: list[tuple[int, int]] | None = None
    """Character span of each token (NER only; (0, 0) for special tokens)."""


@dataclass(frozen=True)
class Sampling:
    """The sampling settings a request body carries, whatever its wire format (OpenAI, TGI, feedback)."""

    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    """Seed of the first sample; the j-th sample of a prompt uses seed + j."""
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    """Generate at least this many tokens (bounded by the request's max_new_tokens)."""


def generation_requests(
    prompts: Sequence[list[int]],
    adapter: AdapterHandle | None,
    *,
    max_new_tokens: int,
    sampling: Sampling,
    n: int = 1,
) -> list[GenerationRequest]:
    """`n` generation requests per prompt, prompt-major, as every generation route submits them.

    Args:
        prompts: token ids of each prompt (already checked against the server's limits).
        adapter: the leased adapter, or None for the bare base.
        max_new_tokens: tokens to generate at most (already bounded by --max-new-tokens).
        sampling: the body's sampling settings.
        n: samples per prompt; sample j is seeded with `sampling.seed + j`.

    Returns:
        `len(prompts) * n` requests: prompt 0's samples first.
    """
    return [
        GenerationRequest(
            prompt_ids=ids,
            adapter=adapter,
            max_new_tokens=max_new_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            seed=None if sampling.seed is None else sampling.seed + j,
            stop=list(sampling.stop),
            ignore_eos=sampling.ignore_eos,
            min_tokens=min(sampling.min_tokens, max_new_tokens),
        )
        for ids in prompts
        for j in range(n)
    ]
