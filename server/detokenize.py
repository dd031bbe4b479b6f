"""Incremental detokenization and the stop rules of one generation: token ids in, `TokenEvent`s out.

Text is decoded with prefix/read offsets (as TGI and vLLM do), so a multi-token character is emitted
once complete; a tail that could still become a stop string is held back. `SequenceOutput` applies
stop strings, stop tokens, `ignore_eos`, `min_tokens` and `max_new_tokens` and says when a request is
finished. Boundary: torch-free; no batching, no sampling (see `server.sampling`), no HTTP.
"""

from __future__ import annotations

from typing import Any

from server.requests import GenerationRequest, TokenEvent


class Detokenizer:
    """Incremental detokenization (prefix/read offsets, as TGI and vLLM do) plus stop strings."""

    def __init__(self, tokenizer: Any, stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.prefix_offset = self.read_offset = 0
        self.text = ""
        self.emitted = 0
        self.stop = [s for s in stop if s]

    def add(self, token: int) -> None:
        self.tokens.append(token)
        decode = self.tokenizer.decode
        prefix = decode(self.tokens[self.prefix_offset : self.read_offset], skip_special_tokens=True)
        full = decode(self.tokens[self.prefix_offset :], skip_special_tokens=True)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.text += full[len(prefix) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)

    def find_stop(self) -> int | None:
        """Index in `text` where the earliest stop string begins, if any appeared."""
        window = self.emitted - max((len(s) for s in self.stop), default=0)
        hits = [i for s in self.stop if (i := self.text.find(s, max(0, window))) >= 0]
        return min(hits) if hits else None

    def take(self, upto: int | None = None, final: bool = False) -> str:
        """Text not yet emitted, holding back a tail that could still become a stop string."""
        end = len(self.text) if upto is None else upto
        if not final and upto is None:
            end -= self._held_back()
        delta = self.text[self.emitted : end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return delta

    def _held_back(self) -> int:
        for n in range(min(len(self.text), max((len(s) for s in self.stop), default=1) - 1), 0, -1):
            if any(s.startswith(self.text[-n:]) for s in self.stop):
                return n
        return 0


class SequenceOutput:
    """What one generation has produced so far, and whether the next token ends it."""

    def __init__(self, request: GenerationRequest, tokenizer: Any) -> None:
        self.request = request
        self.detok = Detokenizer(tokenizer, request.stop)
        self.generated = 0

    @property
    def last_token(self) -> int:
        return self.detok.tokens[-1]

    @property
    def before_min_tokens(self) -> bool:
        """Still short of `min_tokens`: end-of-sequence tokens must not be sampled."""
        return self.generated < self.request.min_tokens

    def advance(self, token: int, eos: set[int]) -> TokenEvent:
        """Add one sampled token; its event carries a finish reason when it ends the generation."""
        request, detok = self.request, self.detok
        self.generated += 1
        detok.add(token)
        past_min = self.generated >= request.min_tokens
        if token in eos and not request.ignore_eos and past_min:
            return TokenEvent(detok.take(final=True), token, "stop")
        if past_min and detok.stop:
            cut = detok.find_stop()
            if cut is not None:
                return TokenEvent(detok.take(upto=cut), token, "stop")
        if self.generated >= request.max_new_tokens:
            return TokenEvent(detok.take(final=True), token, "length")
        return TokenEvent(detok.take(), token, None)
