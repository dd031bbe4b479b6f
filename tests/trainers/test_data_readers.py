"""Readers: every supported form parses into records; bad data fails early naming file:line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainers.data.readers import read_classification, read_instruction, read_ner
from trainers.data.records import split_off_eval
from trainers.errors import DataError
from trainers.sample_data import sample_path

DATA = Path(__file__).resolve().parents[1] / "data" / "trainers"


def test_shipped_samples_parse_with_expected_sizes() -> None:
    texts = read_classification(sample_path("classification"))
    sentences = read_ner(sample_path("ner"))
    chats = read_instruction(sample_path("instruction"))
    assert len(texts) == 210 and {r.label for r in texts} == {"billing", "technical", "shipping"}
    assert len(sentences) == 150
    assert {t[2:] for s in sentences for t in s.tags if t != "O"} == {"PER", "ORG", "LOC"}
    assert len(chats) == 100 and all(c.messages[-1].role == "assistant" for c in chats)


@pytest.mark.parametrize("name", ["labels.csv", "labels.tsv"])
def test_csv_and_tsv_with_integer_labels(name: str) -> None:
    field = "sentence" if name.endswith("tsv") else "text"
    records = read_classification(DATA / name, text_field=field)
    assert [r.label for r in records] == ["1", "0"]
    assert records[0].origin.line == 2


def test_integer_labels_in_jsonl_become_strings(tmp_path: Path) -> None:
    path = tmp_path / "ints.jsonl"
    path.write_text('{"text": "a", "label": 2}\n{"text": "b", "label": 10}\n')
    assert [r.label for r in read_classification(path)] == ["2", "10"]


def test_missing_field_names_file_and_line() -> None:
    with pytest.raises(DataError) as info:
        read_classification(DATA / "missing_field.jsonl")
    assert "missing_field.jsonl:3" in str(info.value) and "'label'" in str(info.value)


def test_non_json_line_names_file_and_line() -> None:
    with pytest.raises(DataError, match=r"not_json\.jsonl:2: not a JSON line"):
        read_classification(DATA / "not_json.jsonl")


def test_empty_file_is_an_error() -> None:
    with pytest.raises(DataError, match="no records"):
        read_classification(DATA / "empty.jsonl")
    with pytest.raises(DataError, match="no such file"):
        read_instruction(DATA / "absent.jsonl")


def test_all_problems_reported_at_once(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok", "label": "a"}\n{"text": ""}\n[1]\n{"label": true, "text": "x"}\n')
    with pytest.raises(DataError) as info:
        read_classification(path)
    message = str(info.value)
    assert "3 data problems" in message
    assert all(f"bad.jsonl:{line}" in message for line in (2, 3, 4))


def test_conll_bioes_is_an_unknown_tag_scheme() -> None:
    with pytest.raises(DataError) as info:
        read_ner(DATA / "bioes.conll")
    assert "bioes.conll:1: unknown tag scheme" in str(info.value) and "BIOES" in str(info.value)


def test_conll_multi_column_and_docstart() -> None:
    records = read_ner(DATA / "iob1.conll")
    assert [r.tokens for r in records][0] == ("Anna", "Berg", "met", "Omar", "in", "Oslo", ".")
    assert records[0].tags[0] == "I-PER" and records[0].origin.line == 3
    assert records[1].tags == ("I-ORG", "I-ORG", "I-ORG")


def test_ner_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "ner.jsonl"
    rows = [{"tokens": ["Ann", "runs"], "tags": ["B-PER", "O"]}, {"tokens": ["x"], "tags": []}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"ner\.jsonl:2"):
        read_ner(path)


def test_alpaca_json_list_becomes_chat() -> None:
    records = read_instruction(DATA / "alpaca.json")
    assert records[0].messages[0].content == "Add the numbers.\n\n2 and 3"
    assert [m.role for m in records[1].messages] == ["user", "assistant"]
    assert records[1].origin.line == 7


def test_chat_rows_validate_roles(tmp_path: Path) -> None:
    path = tmp_path / "chat.jsonl"
    path.write_text(
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}\n'
        '{"messages": [{"role": "user", "content": "hi"}]}\n'
        '{"prompt": "hi"}\n'
    )
    with pytest.raises(DataError) as info:
        read_instruction(path)
    message = str(info.value)
    assert "chat.jsonl:1" in message and "'bot'" in message
    assert "chat.jsonl:2: no non-empty assistant turn" in message
    assert "chat.jsonl:3: missing field" in message


def test_stratified_split_is_deterministic_and_keeps_labels_in_train() -> None:
    records = read_classification(sample_path("classification"))
    train, held = split_off_eval(records, 0.2, seed=3, key=lambda r: r.label)
    again = split_off_eval(records, 0.2, seed=3, key=lambda r: r.label)
    assert (train, held) == again
    assert len(held) == 42 and len(train) + len(held) == len(records)
    assert {r.label for r in held} <= {r.label for r in train}
    assert split_off_eval(records, 0.2, seed=4, key=lambda r: r.label)[1] != held
