"""Preference pairs and prompt sets: every accepted format, bad rows, skipping, tokenization."""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path
from typing import Any

import pytest

from trainers.data.collate import collate_pairs
from trainers.data.preference import read_preference_pairs, read_prompts
from trainers.data.records import Message
from trainers.data.tokenize import encode_pair, encode_prompt
from trainers.errors import DataError

SAMPLES = Path(__file__).resolve().parents[2] / "trainers" / "sample_data"


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def user(text: str) -> Message:
    return Message("user", text)


def bot(text: str) -> Message:
    return Message("assistant", text)


def test_string_and_message_forms(tmp_path: Path) -> None:
    conversation = [{"role": "user", "content": "Hi?"}]
    rows = [
        {"prompt": "How are you?", "chosen": " Fine, thanks. ", "rejected": "Go away."},
        {
            "prompt": conversation,
            "chosen": [{"role": "assistant", "content": "Hello!"}],
            # the full conversation form: the shared prompt is stripped from the reply
            "rejected": conversation + [{"role": "assistant", "content": "What."}],
        },
        {"messages": conversation, "chosen": "Hello!", "rejected": "No."},
        {  # no prompt: message lists split after the messages they share
            "chosen": conversation + [{"role": "assistant", "content": "Hey"}],
            "rejected": conversation + [{"role": "assistant", "content": "Bye"}],
        },
    ]
    pairs = read_preference_pairs(write_jsonl(tmp_path / "p.jsonl", rows)).pairs
    assert [p.prompt for p in pairs] == [(user("How are you?"),)] + [(user("Hi?"),)] * 3
    assert pairs[0].chosen == (bot("Fine, thanks."),)
    assert pairs[1].rejected == (bot("What."),)
    assert pairs[2].rejected == (bot("No."),)
    assert (pairs[3].chosen, pairs[3].rejected) == ((bot("Hey"),), (bot("Bye"),))
    assert str(pairs[1].origin).endswith("p.jsonl:2")


def test_hh_form_splits_on_last_shared_assistant_turn(tmp_path: Path) -> None:
    prefix = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Tell me a joke.\n\nAssistant:"
    rows = [
        {"chosen": prefix + " A pun about cats.", "rejected": prefix + " No."},
        # replies that go on for more turns; an empty preferred reply is allowed (EOS alone)
        {"chosen": prefix, "rejected": prefix + " Sure.\n\nHuman: And?\n\nAssistant: More."},
    ]
    pairs = read_preference_pairs(write_jsonl(tmp_path / "hh.jsonl", rows)).pairs
    assert pairs[0].prompt == (user("Hi"), bot("Hello."), user("Tell me a joke."))
    assert pairs[0].chosen == (bot("A pun about cats."),)
    assert pairs[0].rejected == (bot("No."),)
    assert pairs[1].chosen == (bot(""),)
    assert pairs[1].rejected == (bot("Sure."), user("And?"), bot("More."))


def test_json_array_and_gzip(tmp_path: Path) -> None:
    rows = [{"prompt": "Q", "chosen": "good", "rejected": "bad"}]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as handle:
        handle.write(json.dumps(rows[0]) + "\n")
    assert read_preference_pairs(tmp_path / "a.json").pairs[0].chosen == (bot("good"),)
    assert read_preference_pairs(tmp_path / "b.jsonl.gz").pairs[0].rejected == (bot("bad"),)


def test_identical_pairs_are_reported_and_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rows = [
        {"prompt": "Q", "chosen": "same", "rejected": "same"},
        {"prompt": "Q", "chosen": "good", "rejected": "bad"},
        {"chosen": "\n\nHuman: x\n\nAssistant: y", "rejected": "\n\nHuman: x\n\nAssistant: y"},
    ]
    with caplog.at_level(logging.WARNING, logger="trainers.data.preference"):
        result = read_preference_pairs(write_jsonl(tmp_path / "p.jsonl", rows))
    assert len(result.pairs) == 1
    assert [o.line for o in result.skipped_identical] == [1, 3]
    assert "skipped 2 row(s)" in caplog.text
    with pytest.raises(DataError, match="no usable preference pairs"):
        read_preference_pairs(write_jsonl(tmp_path / "q.jsonl", rows[:1]))


def test_bad_rows_are_all_listed_with_file_and_line(tmp_path: Path) -> None:
    rows = [
        {"prompt": "Q", "chosen": "good", "rejected": "bad"},
        {"prompt": "Q", "chosen": "good"},
        {"prompt": "Q", "chosen": [{"role": "robot", "content": "x"}], "rejected": "bad"},
        {"chosen": "no turns here", "rejected": "none here"},
        {"prompt": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
         "chosen": "x", "rejected": "y"},
        {"prompt": "Q", "chosen": 3, "rejected": "y"},
        {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": [{"role": "user", "content": "a"}]},
    ]  # fmt: skip
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as info:
        read_preference_pairs(path)
    message = str(info.value)
    assert "6 data problems" in message
    assert f"{path}:2: missing field 'rejected'" in message
    assert f"{path}:3: chosen: message 0 has role 'robot'" in message
    assert f"{path}:4: no 'prompt' field" in message
    assert f"{path}:5: the prompt must end with a user" in message
    assert f"{path}:6: 'chosen' must be a string or a list" in message
    assert f"{path}:7: no 'prompt' field: 'chosen' and 'rejected' must both be" in message
    assert isinstance(info.value, ValueError)


def test_unreadable_and_missing_files(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", ['{"prompt": "Q", "chosen": "a", "rejected": "b"}', "{oops"])
    with pytest.raises(DataError, match=r"p.jsonl:2: not a JSON line"):
        read_preference_pairs(path)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no records"):
        read_preference_pairs(tmp_path / "empty.jsonl")
    with pytest.raises(DataError, match="no such file"):
        read_preference_pairs(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="no such file"):
        read_prompts(tmp_path / "missing.txt")


def test_prompt_sets(tmp_path: Path) -> None:
    rows = [
        {"prompt": "Tell me a story."},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "SFT"}]},
        {"prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Q"}]},
    ]
    prompts = read_prompts(write_jsonl(tmp_path / "p.jsonl", rows))
    assert [p.prompt for p in prompts] == [
        (user("Tell me a story."),),
        (user("Hi"),),  # the recorded assistant reply is cut: the policy samples its own
        (Message("system", "Be kind."), user("Q")),
    ]
    (tmp_path / "p.txt").write_text("First prompt\n\n  Second prompt  \n")
    plain = read_prompts(tmp_path / "p.txt")
    assert [(p.prompt, p.origin.line) for p in plain] == [
        ((user("First prompt"),), 1),
        ((user("Second prompt"),), 3),
    ]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "x"}, {"prompt": ""}])
    with pytest.raises(DataError) as info:
        read_prompts(bad)
    assert f"{bad}:1: missing field 'prompt' or 'messages'" in str(info.value)
    assert f"{bad}:2: the prompt is empty" in str(info.value)


def test_shipped_samples_are_valid() -> None:
    pairs = read_preference_pairs(SAMPLES / "preference_pairs.jsonl")
    assert len(pairs.pairs) == 100 and not pairs.skipped_identical
    assert len(read_prompts(SAMPLES / "prompts.jsonl")) == 40


def test_encode_and_collate_pairs(tiny_base: Any) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_base.path)
    pair = read_preference_pairs(SAMPLES / "preference_pairs.jsonl").pairs[0]
    encoded = encode_pair(tokenizer, pair, max_length=512)
    assert tokenizer.decode(encoded.prompt_ids).endswith("<|im_start|>assistant\n")
    assert encoded.chosen_ids[-1] == encoded.rejected_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(encoded.chosen_ids[:-1]) == pair.chosen[0].content
    assert encoded.prompt_ids == encode_prompt(tokenizer, pair.prompt, 512)

    short = encode_pair(tokenizer, pair, max_length=24)
    assert len(short.prompt_ids) + max(len(short.chosen_ids), len(short.rejected_ids)) <= 24
    assert short.prompt_ids == encoded.prompt_ids[-len(short.prompt_ids) :]  # cut on the left
    assert short.chosen_ids == encoded.chosen_ids[: len(short.chosen_ids)]  # cut on the right

    batch = collate_pairs([encoded, short], pad_id=tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 4  # chosen rows first, then rejected rows
    row = batch["labels"][2]  # rejected of the first pair
    scored = row[row != -100].tolist()
    assert scored == encoded.rejected_ids
    assert batch["attention_mask"][2].sum() == len(encoded.prompt_ids) + len(scored)
