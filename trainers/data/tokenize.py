"""Records to token ids: the one place that knows chat templates, prompt masking and NER alignment.

Boundary: `trainers.data.records` + a Hugging Face fast tokenizer in, plain Python dicts of lists
(or `EncodedPair`s) out; padding into tensors happens in `collate`, label sets in `labels`.

- Chat: rendered with the tokenizer's chat template; `labels` are -100 everywhere except the
  assistant's tokens (from the template's `{% generation %}` markers, or, for templates without
  them, from the character spans of each assistant turn found by rendering prefixes).
- NER: words are joined by single spaces (what a served model sees), and each word's label goes on
  its FIRST sub-word token; the other sub-words and special tokens get -100.
- Preference pairs (reward, DPO) and prompts (PPO): the prompt rendered with the generation
  prompt, each reply as the template renders it after that prompt, cut to fit `max_length`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from trainers.data.labels import normalize_tags
from trainers.data.records import ChatRecord, Message, PreferenceRecord, TextRecord, TokensRecord
from trainers.errors import DataError

IGNORE_INDEX = -100
logger = logging.getLogger(__name__)

Example = dict[str, Any]


# ---- classification ------------------------------------------------------------------------------


def tokenize_classification(
    records: Sequence[TextRecord], tokenizer: Any, label2id: dict[str, int], max_length: int
) -> list[Example]:
    """Token ids of each text (truncated to `max_length`) with its integer class label."""
    encoded = tokenizer([r.text for r in records], truncation=True, max_length=max_length)
    return [
        {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": label2id[r.label]}
        for ids, r in zip(encoded["input_ids"], records, strict=True)
    ]


# ---- NER -----------------------------------------------------------------------------------------


def word_spans(words: Sequence[str]) -> tuple[str, list[tuple[int, int]]]:
    """The text a sentence is served as (words joined by one space) and each word's char span."""
    spans, position = [], 0
    for word in words:
        spans.append((position, position + len(word)))
        position += len(word) + 1
    return " ".join(words), spans


def first_subword_labels(
    offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]], word_labels: Sequence[int]
) -> list[int]:
    """Label the first token overlapping each word's span; every other token gets IGNORE_INDEX."""
    labels, word, previous_word = [], 0, -1
    for start, end in offsets:
        while word < len(spans) and spans[word][1] <= start:
            word += 1
        inside = start < end and word < len(spans) and end > spans[word][0]
        if inside and word != previous_word:
            labels.append(word_labels[word])
            previous_word = word
        else:
            labels.append(IGNORE_INDEX)
    return labels


def tokenize_ner(
    records: Sequence[TokensRecord], tokenizer: Any, label2id: dict[str, int], max_length: int
) -> list[Example]:
    """Token ids of each sentence with first-sub-word labels (tags normalised to BIO)."""
    examples = []
    for record in records:
        text, spans = word_spans(record.tokens)
        encoded = tokenizer(text, truncation=True, max_length=max_length, return_offsets_mapping=True)
        word_labels = [label2id[tag] for tag in normalize_tags(record.tags)]
        labels = first_subword_labels(encoded["offset_mapping"], spans, word_labels)
        examples.append(
            {
                "input_ids": encoded["input_ids"],
                "attention_mask": [1] * len(encoded["input_ids"]),
                "labels": labels,
            }
        )
    return examples


# ---- chat ----------------------------------------------------------------------------------------


def render_chat(tokenizer: Any, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
    """Render messages with the tokenizer's chat template (the prompt a served model receives)."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            "The base's tokenizer has no chat template, so conversations cannot be rendered.",
            "Use a base with a chat template (the built-in bases have one) or add `chat_template` "
            "to its tokenizer_config.json.",
        )
    return tokenizer.apply_chat_template(
        [m.to_dict() for m in messages], tokenize=False, add_generation_prompt=add_generation_prompt
    )


def assistant_char_spans(tokenizer: Any, messages: Sequence[Message]) -> list[tuple[int, int]]:
    """Character spans of each assistant turn (content and end-of-turn marker) in the rendering.

    Found by rendering prefixes: the turn starts where `messages[:i]` + generation prompt ends and
    stops where `messages[:i+1]` ends. Works for any template whose renderings extend each other.
    """
    spans = []
    for index, message in enumerate(messages):
        if message.role != "assistant":
            continue
        start = len(render_chat(tokenizer, messages[:index], add_generation_prompt=True))
        end = len(render_chat(tokenizer, messages[: index + 1]))
        spans.append((start, end))
    return spans


def tokenize_chat(tokenizer: Any, messages: Sequence[Message], max_length: int) -> Example:
    """Token ids of a conversation with labels on the assistant's tokens only (-100 elsewhere)."""
    if "{% generation %}" in (getattr(tokenizer, "chat_template", None) or ""):
        encoded = tokenizer.apply_chat_template(
            [m.to_dict() for m in messages], tokenize=True, return_dict=True,
            return_assistant_tokens_mask=True,
        )  # fmt: skip
        ids, mask = encoded["input_ids"][:max_length], encoded["assistant_masks"][:max_length]
    else:
        text = render_chat(tokenizer, messages)
        encoded = tokenizer(
            text, add_special_tokens=False, truncation=True, max_length=max_length,
            return_offsets_mapping=True,
        )  # fmt: skip
        spans = assistant_char_spans(tokenizer, messages)
        ids = encoded["input_ids"]
        mask = [
            any(start < span_end and end > span_start for span_start, span_end in spans)
            for start, end in encoded["offset_mapping"]
        ]
    labels = [token if keep else IGNORE_INDEX for token, keep in zip(ids, mask, strict=True)]
    return {"input_ids": list(ids), "attention_mask": [1] * len(ids), "labels": labels}


def tokenize_instruction(records: Sequence[ChatRecord], tokenizer: Any, max_length: int) -> list[Example]:
    """Tokenize conversations; drops (and logs) those whose assistant turns fall past `max_length`.

    Raises:
        DataError: when no conversation keeps any assistant token within `max_length`.
    """
    examples, dropped = [], []
    for record in records:
        example = tokenize_chat(tokenizer, record.messages, max_length)
        if all(label == IGNORE_INDEX for label in example["labels"]):
            dropped.append(str(record.origin))
            continue
        examples.append(example)
    if dropped:
        logger.warning(
            "%d conversation(s) have no assistant token within max_length=%d and were skipped "
            "(first: %s)", len(dropped), max_length, dropped[0],
        )  # fmt: skip
    if records and not examples:
        raise DataError(
            f"No conversation keeps an assistant token within max_length={max_length} (first: {dropped[0]}).",
            "Raise --max-length or shorten the prompts.",
        )
    return examples


# ---- preference pairs and prompts ----------------------------------------------------------------


@dataclass(frozen=True)
class EncodedPair:
    """Token ids of a pair: the shared prompt and both responses (ending with EOS if it fit)."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def render_prompt_ids(tokenizer: Any, prompt: Sequence[Message]) -> list[int]:
    """Ids of the prompt rendered with the chat template plus the generation prompt.

    Raises:
        DataError: the tokenizer has no chat template.
    """
    return _ids(tokenizer, render_chat(tokenizer, prompt, add_generation_prompt=True))


def render_response_ids(tokenizer: Any, prompt: Sequence[Message], reply: Sequence[Message]) -> list[int]:
    """Ids of `reply` as the template renders it after `prompt`, ending at its last EOS.

    Taken as the conversation's ids minus the prompt's when the prompt's ids are a prefix of them
    (the usual case), else by tokenizing the reply's rendered text alone.
    """
    prompt_text = render_chat(tokenizer, prompt, add_generation_prompt=True)
    full_text = render_chat(tokenizer, list(prompt) + list(reply))
    prompt_ids, full_ids = _ids(tokenizer, prompt_text), _ids(tokenizer, full_text)
    if full_ids[: len(prompt_ids)] == prompt_ids:
        response = full_ids[len(prompt_ids) :]
    else:
        response = _ids(tokenizer, full_text[len(prompt_text) :])
    eos = tokenizer.eos_token_id
    if eos is not None and eos in response:
        last = len(response) - 1 - response[::-1].index(eos)
        response = response[: last + 1]  # the template's newline after EOS is not generated
    elif eos is not None:
        response.append(eos)
    return response


def encode_pair(tokenizer: Any, pair: PreferenceRecord, max_length: int) -> EncodedPair:
    """Tokenize a pair so that prompt + each response fits `max_length`.

    The prompt is cut from the left (its end, next to the reply, matters most) to leave the longer
    response room, keeping at least half of `max_length`; responses are then cut on the right.
    """
    prompt_ids = render_prompt_ids(tokenizer, pair.prompt)
    chosen = render_response_ids(tokenizer, pair.prompt, pair.chosen)
    rejected = render_response_ids(tokenizer, pair.prompt, pair.rejected)
    longest = max(len(chosen), len(rejected))
    prompt_ids = prompt_ids[-max(max_length - longest, max_length // 2) :]
    room = max_length - len(prompt_ids)
    return EncodedPair(prompt_ids, chosen[:room], rejected[:room])


def encode_prompt(tokenizer: Any, prompt: Sequence[Message], max_length: int) -> list[int]:
    """Prompt ids with the generation prompt, cut from the left to `max_length`."""
    return render_prompt_ids(tokenizer, prompt)[-max_length:]
