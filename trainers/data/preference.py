"""Preference pairs and prompt sets: reading, validation and the train/eval split (reward, DPO, PPO).

Formats read (JSONL, optionally gzipped, or a JSON array):
- `prompt` + `chosen` + `rejected` as strings (a single user turn and single assistant replies);
- the same keys as chat `messages` lists (role/content); `messages` is accepted as the prompt's key;
  `chosen`/`rejected` may repeat the prompt (the full conversation), it is then stripped;
- `chosen`/`rejected` only, as full conversations: the Anthropic HH form (strings with
  "\\n\\nHuman:" / "\\n\\nAssistant:" turns, split on the last "\\n\\nAssistant:" the two share) or
  message lists (split after their longest shared prefix of messages).
Prompt sets for PPO: JSONL with `prompt` (string or messages) or `messages`, or plain text, one
prompt per line.

Every pair is normalised to chat messages: `prompt` (ends before the assistant's reply) and
`chosen`/`rejected` continuations that start with an assistant turn. Bad rows are collected and
raised together as one `trainers.errors.DataError` naming file:line; `chosen == rejected` rows are
logged, counted and skipped. Boundary: files in, records out; no tokenizer (rendering pairs and
prompts to ids is `trainers.data.tokenize`'s, padding them `trainers.data.collate`'s), no model.
"""

from __future__ import annotations

import gzip
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainers.data.readers import Problems, iter_json_rows, parse_messages
from trainers.data.records import (
    Message,
    Origin,
    PreferenceRecord,
    PromptRecord,
    split_off_eval,
)
from trainers.errors import DataError

logger = logging.getLogger(__name__)

HH_HUMAN = "\n\nHuman:"
HH_ASSISTANT = "\n\nAssistant:"
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_JSON_NAMES = (".jsonl", ".json", ".ndjson")


@dataclass
class PreferenceSet:
    """The usable pairs of a file and where each skipped `chosen == rejected` row was."""

    pairs: list[PreferenceRecord]
    skipped_identical: list[Origin] = field(default_factory=list)


class RowError(ValueError):
    """A problem with one row; the readers collect these into one DataError naming file:line."""


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def read_preference_pairs(path: str | Path) -> PreferenceSet:
    """Read and validate a preference file (formats in the module docstring).

    Raises:
        DataError: missing or empty file, or bad rows (all of them listed, each as file:line).
    """
    problems, pairs, skipped = Problems(), [], []
    for origin, row in iter_json_rows(path):
        try:
            pair = parse_pair(row, origin)
        except RowError as err:
            problems.add(origin, str(err))
            continue
        if pair.chosen == pair.rejected:
            skipped.append(origin)
        else:
            pairs.append(pair)
    problems.raise_if_any(
        "Each row needs `chosen` and `rejected` (strings or message lists) and a `prompt`, "
        "or HH dialogues ending in '\\n\\nAssistant:' turns."
    )
    if skipped:
        logger.warning(
            "%s: skipped %d row(s) whose chosen and rejected are identical (first: %s)",
            path, len(skipped), skipped[0],
        )  # fmt: skip
    if not pairs:
        raise DataError(f"{path}: no usable preference pairs (every chosen equals its rejected).")
    return PreferenceSet(pairs, skipped)


def read_prompts(path: str | Path) -> list[PromptRecord]:
    """Read a prompt set: JSONL/JSON rows with `prompt` or `messages`, or plain text lines.

    JSON is recognised by the file name (.jsonl/.json/.ndjson, optionally .gz) or a first line
    starting with "{". Trailing assistant turns of `messages` (SFT rows) are cut off.

    Raises:
        DataError: missing or empty file, or bad rows (all listed as file:line).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file.", "Check the --prompts path.")
    lines = _text_lines(path)
    first = next((line for line in lines if line.strip()), "")
    if path.name.removesuffix(".gz").endswith(_JSON_NAMES) or first.lstrip().startswith("{"):
        problems, records = Problems(), []
        for origin, row in iter_json_rows(path):
            try:
                records.append(PromptRecord(parse_prompt(row), origin))
            except RowError as err:
                problems.add(origin, str(err))
        problems.raise_if_any("Each row needs a `prompt` (string or messages) or `messages`.")
        return records
    records = [
        PromptRecord((Message("user", line.strip()),), Origin(str(path), number))
        for number, line in enumerate(lines, start=1)
        if line.strip()
    ]
    if not records:
        raise DataError(f"{path}: the file holds no prompts.", "Give one prompt per line.")
    return records


def _text_lines(path: Path) -> list[str]:
    if path.suffix == ".gz":
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            return handle.read().splitlines()
    return path.read_text(encoding="utf-8").splitlines()


# ---------------------------------------------------------------------------------------------
# Parsing one row
# ---------------------------------------------------------------------------------------------


def parse_pair(row: dict[str, Any], origin: Origin) -> PreferenceRecord:
    """Normalise one preference row to chat messages.

    Raises:
        RowError: what is wrong with the row.
    """
    missing = [key for key in ("chosen", "rejected") if key not in row]
    if missing:
        have = ", ".join(sorted(row)) or "none"
        raise RowError(f"missing field {', '.join(map(repr, missing))} (fields: {have})")
    prompt_value = row.get("prompt", row.get("messages"))
    if prompt_value is None:
        prompt, chosen, rejected = _split_conversations(row["chosen"], row["rejected"])
    else:
        prompt = _as_prompt(prompt_value)
        chosen = _as_reply(row["chosen"], "chosen", prompt)
        rejected = _as_reply(row["rejected"], "rejected", prompt)
    if not prompt or not any(m.content.strip() for m in prompt):
        raise RowError("the prompt is empty")
    if prompt[-1].role == "assistant":
        raise RowError("the prompt must end with a user (or system) turn, not an assistant one")
    for key, messages in (("chosen", chosen), ("rejected", rejected)):
        # An empty reply is allowed (HH has some: saying nothing can be preferred); it is EOS alone.
        if not messages or messages[0].role != "assistant":
            raise RowError(f"{key!r} must start with an assistant reply")
    return PreferenceRecord(prompt, chosen, rejected, origin)


def parse_prompt(row: dict[str, Any]) -> tuple[Message, ...]:
    """The prompt of a prompt-set row; raises RowError when there is none."""
    value = row.get("prompt", row.get("messages"))
    if value is None:
        have = ", ".join(sorted(row)) or "none"
        raise RowError(f"missing field 'prompt' or 'messages' (fields: {have})")
    messages = list(_as_prompt(value))
    while messages and messages[-1].role == "assistant":
        messages.pop()  # SFT rows: the policy samples a fresh reply instead
    if not messages or not any(m.content.strip() for m in messages):
        raise RowError("the prompt is empty")
    return tuple(messages)


def _messages(value: Any, key: str) -> tuple[Message, ...]:
    """Validate a message list with the instruction reader's rules; RowError names the field."""
    if not isinstance(value, list):
        raise RowError(f"{key!r} must be a string or a list of {{role, content}} messages")
    problems = Problems()
    messages = parse_messages(value, Origin(key), problems)
    if messages is None:
        raise RowError(problems.lines[0])
    return messages


def _as_prompt(value: Any) -> tuple[Message, ...]:
    if isinstance(value, str):
        if HH_HUMAN in value:  # an HH-style prompt string ending in "\n\nAssistant:"
            return _drop_open_assistant(parse_hh_dialogue(value))
        return (Message("user", value.strip()),)
    return _messages(value, "prompt")


def _as_reply(value: Any, key: str, prompt: tuple[Message, ...]) -> tuple[Message, ...]:
    if isinstance(value, str):
        return (Message("assistant", value.strip()),)
    messages = _messages(value, key)
    if len(messages) > len(prompt) and messages[: len(prompt)] == prompt:
        messages = messages[len(prompt) :]  # the full conversation: keep the continuation
    return messages


def _split_conversations(chosen: Any, rejected: Any) -> tuple[tuple[Message, ...], ...]:
    """Prompt and continuations of two full conversations (no `prompt` field)."""
    if isinstance(chosen, str) and isinstance(rejected, str):
        return _split_hh(chosen, rejected)
    if isinstance(chosen, list) and isinstance(rejected, list):
        c, r = _messages(chosen, "chosen"), _messages(rejected, "rejected")
        shared = 0
        while shared < min(len(c), len(r)) and c[shared] == r[shared]:
            shared += 1
        while shared > 0 and c[shared - 1].role == "assistant":
            shared -= 1  # the prompt ends where the compared assistant reply begins
        return c[:shared], c[shared:], r[shared:]
    raise RowError(
        "no 'prompt' field: 'chosen' and 'rejected' must both be HH dialogues (strings) or both message lists"
    )


def _split_hh(chosen: str, rejected: str) -> tuple[tuple[Message, ...], ...]:
    """Split two HH dialogues on the last "\n\nAssistant:" of their shared prefix."""
    if HH_ASSISTANT not in chosen or HH_ASSISTANT not in rejected:
        raise RowError("no 'prompt' field, and no '\\n\\nAssistant:' turn to split 'chosen'/'rejected' on")
    shared, limit = 0, min(len(chosen), len(rejected))
    while shared < limit and chosen[shared] == rejected[shared]:
        shared += 1
    cut = chosen.rfind(HH_ASSISTANT, 0, shared)
    if cut < 0:
        raise RowError("'chosen' and 'rejected' share no prompt ending in '\\n\\nAssistant:'")
    prompt = _drop_open_assistant(parse_hh_dialogue(chosen[: cut + len(HH_ASSISTANT)]))
    return prompt, parse_hh_dialogue(chosen[cut:]), parse_hh_dialogue(rejected[cut:])


def parse_hh_dialogue(text: str) -> tuple[Message, ...]:
    """Parse "\n\nHuman: a\n\nAssistant: b ..." into user/assistant messages (stripped).

    Raises:
        RowError: text before the first turn marker.
    """
    parts = _HH_TURN.split(text)
    if parts[0].strip():
        raise RowError("an HH dialogue must start with '\\n\\nHuman:'")
    roles = {"Human": "user", "Assistant": "assistant"}
    return tuple(
        Message(roles[speaker], content.strip())
        for speaker, content in zip(parts[1::2], parts[2::2], strict=True)
    )


def _drop_open_assistant(messages: tuple[Message, ...]) -> tuple[Message, ...]:
    if messages and messages[-1].role == "assistant" and not messages[-1].content:
        return messages[:-1]
    return messages


# ---------------------------------------------------------------------------------------------
# Train / eval split
# ---------------------------------------------------------------------------------------------


@dataclass
class PreferenceSplit:
    """Train and eval pairs, and how they were obtained (for the manifest and card)."""

    train: list[PreferenceRecord]
    eval: list[PreferenceRecord]
    info: dict[str, Any]


def load_preference_split(
    data: str | Path, eval_path: str | Path | None, eval_fraction: float, seed: int
) -> PreferenceSplit:
    """Read `data` (and `eval_path`), or hold out a seeded `eval_fraction` of `data` for eval.

    Raises:
        DataError: bad files, or too few pairs to hold any out.
    """
    train = read_preference_pairs(data)
    skipped = len(train.skipped_identical)
    if eval_path:
        held = read_preference_pairs(eval_path)
        skipped += len(held.skipped_identical)
        train_pairs, eval_pairs = train.pairs, held.pairs
    else:
        if len(train.pairs) < 2:
            raise DataError(
                f"{data}: one pair is too few to hold any out for eval.",
                "Add pairs or pass --eval FILE.",
            )
        train_pairs, eval_pairs = split_off_eval(train.pairs, eval_fraction, seed)
    info = {
        "train": str(data),
        "eval": str(eval_path) if eval_path else f"{eval_fraction:g} of train (seed {seed})",
        "train_pairs": len(train_pairs),
        "eval_pairs": len(eval_pairs),
        "skipped_identical": skipped,
    }
    return PreferenceSplit(train_pairs, eval_pairs, info)
