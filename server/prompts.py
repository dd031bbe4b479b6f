"""Turning request inputs into token ids, once, and enforcing the server's size limits on them.

Boundary: where requests are tokenized: OpenAI prompts (text or token ids), chat messages through the
base's chat template, TGI inputs, and task inputs (classify and NER texts, NER offsets, score pairs
through the chat template), with the length checks on exactly the ids the model will see. The rest of
the server gets ids (the completions route decodes token-id prompts only to `echo` them; the
scheduler's detokenizer turns generated ids into text). Long texts are encoded on a worker thread so
the event loop never stalls on a big prompt.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from server.config import ServerConfig
from server.errors import InputTooLongError, InvalidInputError
from server.requests import TaskInput

_INLINE_CHARS = 4096
"""Texts up to this length are encoded inline; longer ones on a thread."""


async def encode(tokenizer: Any, text: str, *, add_special_tokens: bool = True) -> list[int]:
    """Token ids of `text`.

    Raises:
        InvalidInputError: `text` is not valid Unicode (see `check_unicode`).
    """
    check_unicode(text)
    return list(await _maybe_on_thread(text, tokenizer.encode, text, add_special_tokens=add_special_tokens))


def check_unicode(text: str) -> None:
    """Refuse text with a lone UTF-16 surrogate: valid in JSON (`"\\ud800"`), but not Unicode text, and the
    tokenizer raises on it.

    Raises:
        InvalidInputError: naming the character and where it is.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidInputError(
            f"The input holds a lone surrogate (U+{ord(text[exc.start]):04X}) at character {exc.start}; "
            "it is not valid Unicode text.",
            "Send valid Unicode: JSON escapes \\ud800-\\udfff must come in high/low pairs.",
        ) from None


async def chat_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of `messages` rendered by the base's chat template, ending with the assistant's turn."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return await encode(tokenizer, text, add_special_tokens=False)


async def task_inputs(
    tokenizer: Any, texts: list[str], config: ServerConfig, *, offsets: bool = False
) -> list[TaskInput]:
    """Classify or NER inputs, tokenized once and checked against --max-input-tokens.

    Args:
        offsets: also record each token's character span (NER decodes entities with them).

    Raises:
        InvalidInputError: text that is not valid Unicode. InputTooLongError: an empty or too long input.
    """
    inputs = []
    for index, text in enumerate(texts):
        if offsets:
            check_unicode(text)
            enc = await _maybe_on_thread(text, tokenizer, text, return_offsets_mapping=True)
            item = TaskInput(text, list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]])
        else:
            item = TaskInput(text, await encode(tokenizer, text))
        check_length(item.ids, config, what=f"Input {index}")
        inputs.append(item)
    return inputs


async def score_inputs(tokenizer: Any, pairs: list[tuple[str, str]], config: ServerConfig) -> list[TaskInput]:
    """Reward inputs: each (prompt, response) rendered by the base's chat template, tokenized and checked.

    Raises:
        InvalidInputError: text that is not valid Unicode. InputTooLongError: an empty or too long input.
    """
    inputs = []
    for index, (prompt, response) in enumerate(pairs):
        check_unicode(prompt + response)
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        item = TaskInput(text, await encode(tokenizer, text, add_special_tokens=False))
        check_length(item.ids, config, what=f"Input {index}")
        inputs.append(item)
    return inputs


async def _maybe_on_thread(text: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)`, on a worker thread when `text` is long."""
    if len(text) <= _INLINE_CHARS:
        return fn(*args, **kwargs)
    return await asyncio.to_thread(fn, *args, **kwargs)


def check_token_ids(ids: Sequence[Any], vocab_size: int) -> list[int]:
    """Validate a client-supplied token-id prompt.

    Raises:
        InvalidInputError: ids that are not integers inside the vocabulary.
    """
    bad = [i for i in ids if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < vocab_size]
    if bad:
        raise InvalidInputError(
            f"Prompt token ids {bad[:5]} are outside the vocabulary (0..{vocab_size - 1}).",
            "Send text, or token ids produced by this base's tokenizer.",
        )
    return list(ids)


def check_length(ids: Sequence[int], config: ServerConfig, *, what: str = "Prompt") -> None:
    """Refuse inputs over --max-input-tokens (and empty ones).

    Raises:
        InputTooLongError: with the limit and the count.
    """
    if not ids:
        raise InputTooLongError(f"{what} is empty after tokenization.", "Send at least one token of input.")
    if len(ids) > config.max_input_tokens:
        raise InputTooLongError(
            f"{what} has {len(ids)} tokens; this server accepts at most {config.max_input_tokens}.",
            "Shorten the input, or start the server with a larger --max-input-tokens.",
        )


def check_max_tokens(requested: int | None, config: ServerConfig) -> int:
    """The number of tokens to generate: the request's, bounded by --max-new-tokens.

    Raises:
        InputTooLongError: when the request asks for more than the server allows.
    """
    if requested is None:
        return min(config.default_max_tokens, config.max_new_tokens)
    if requested > config.max_new_tokens:
        raise InputTooLongError(
            f"max_tokens={requested} exceeds this server's limit of {config.max_new_tokens}.",
            "Ask for fewer tokens, or start the server with a larger --max-new-tokens.",
        )
    return requested


def check_count(count: int, config: ServerConfig, *, what: str = "inputs") -> None:
    """Refuse requests with more than --max-inputs-per-request texts (or prompts x n).

    Raises:
        InputTooLongError: naming the limit.
    """
    if count > config.max_inputs_per_request:
        raise InputTooLongError(
            f"The request has {count} {what}; this server accepts at most {config.max_inputs_per_request}.",
            "Split it into several requests.",
        )
