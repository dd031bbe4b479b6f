"""Incremental detokenization and the stop rules of one generation: token ids in, `TokenEvent`s out.

Text is decoded with prefix/read offsets (as TGI and vLLM do), so a multi-token character is emitted
once complete; a tail that could still become a stop string is held back. Stop strings are matched
incrementally (`StopMatcher`, Knuth-Morris-Pratt), so each character of output costs O(stop strings),
whatever their length. `SequenceOutput` applies
stop strings, stop tokens, `ignore_eos`, `min_tokens` and `max_new_tokens` and says when a request is
finished. Boundary: torch-free; no batching, no sampling (see `server.sampling`), no HTTP.
"""

from __future__ import annotations

from typing import Any

from server.requests import GenerationRequest, TokenEvent


class StopMatcher:
    """Knuth-Morris-Pratt over one stop string: fed text one character at a time, it knows how much of the
    stop string the text ends with, in amortized O(1) per character whatever the stop strings hold.

    Rescanning the tail for every token (what this replaced) cost stops x length^2 per token: 16 stop strings
    of 256 characters made each decode step of the whole batch wait on one request.
    """

    def __init__(self, stop: str) -> None:
        self.stop = stop
        self.matched = 0
        """Length of the longest prefix of `stop` that the text fed so far ends with (< len(stop))."""
        self.fail = [0] * len(stop)
        k = 0
        for i in range(1, len(stop)):
            while k and stop[i] != stop[k]:
                k = self.fail[k - 1]
            if stop[i] == stop[k]:
                k += 1
            self.fail[i] = k

    def feed(self, char: str) -> bool:
        """Advance by one character; True when the text now ends with the whole stop string."""
        stop, k = self.stop, self.matched
        while k and stop[k] != char:
            k = self.fail[k - 1]
        if stop[k] == char:
            k += 1
        whole = k == len(stop)
        self.matched = self.fail[k - 1] if whole else k
        return whole


class Detokenizer:
    """Incremental detokenization (prefix/read offsets, as TGI and vLLM do) plus stop strings."""

    def __init__(self, tokenizer: Any, stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.prefix_offset = self.read_offset = 0
        self.text = ""
        """The text so far; it only grows (stop matching reads each character once)."""
        self.emitted = 0
        self.stop = [s for s in stop if s]
        self._matchers = [StopMatcher(s) for s in self.stop]
        self._scanned = 0
        self._hits: list[int] = []

    def add(self, token: int) -> None:
        self.tokens.append(token)
        decode = self.tokenizer.decode
        prefix = decode(self.tokens[self.prefix_offset : self.read_offset], skip_special_tokens=True)
        full = decode(self.tokens[self.prefix_offset :], skip_special_tokens=True)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.text += full[len(prefix) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)

    def _scan(self) -> None:
        """Feed the text added since the last scan to every stop matcher; record where matches begin."""
        if self._scanned == len(self.text) or not self._matchers:
            return
        self._hits = []
        for index in range(self._scanned, len(self.text)):
            char = self.text[index]
            for matcher in self._matchers:
                if matcher.feed(char):
                    self._hits.append(index + 1 - len(matcher.stop))
        self._scanned = len(self.text)

    def find_stop(self) -> int | None:
        """Index in `text` where the earliest stop string completed by the newest text begins, if any."""
        self._scan()
        return min(self._hits) if self._hits else None

    def take(self, upto: int | None = None, final: bool = False) -> str:
        """Text not yet emitted, holding back a tail that could still become a stop string."""
        end = len(self.text) if upto is None else upto
        if not final and upto is None:
            end -= self._held_back()
        delta = self.text[self.emitted : end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return delta

    def _held_back(self) -> int:
        """Characters at the end of `text` that begin some stop string (the longest such tail)."""
        self._scan()
        return max((m.matched for m in self._matchers), default=0)


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
