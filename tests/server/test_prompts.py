"""Tokenizing requests once, and the server's size limits on exactly the ids the model sees."""

from __future__ import annotations

import asyncio

import pytest

from server.config import ServerConfig
from server.errors import InputTooLongError, InvalidInputError
from server.prompts import (
    chat_ids,
    check_count,
    check_length,
    check_max_tokens,
    check_token_ids,
    check_unicode,
    encode,
    score_inputs,
    task_inputs,
)
from tests.server.fakes import FakeTokenizer

CONFIG = ServerConfig(max_input_tokens=32, max_new_tokens=64, default_max_tokens=16, max_inputs_per_request=3)
TOKENIZER = FakeTokenizer()


def ids(text: str) -> list[int]:
    return TOKENIZER.encode(text)


def test_long_texts_are_encoded_on_a_thread_to_the_same_ids():
    short, long = "héllo", "x" * 5000
    assert asyncio.run(encode(TOKENIZER, short)) == ids(short)
    assert asyncio.run(encode(TOKENIZER, long)) == ids(long)


def test_a_lone_surrogate_is_refused_with_its_position():
    check_unicode("fine 🙂")
    with pytest.raises(InvalidInputError, match=r"U\+D800\) at character 3"):
        check_unicode("abc\ud800")
    with pytest.raises(InvalidInputError):
        asyncio.run(encode(TOKENIZER, "\udfff"))


def test_chat_ids_render_the_template_with_the_assistant_turn_open():
    messages = [{"role": "user", "content": "hi"}]
    assert asyncio.run(chat_ids(TOKENIZER, messages)) == ids("<user>hi\n<assistant>")


def test_token_id_prompts_must_be_ints_in_the_vocabulary():
    assert check_token_ids([5, 6, 260], len(TOKENIZER)) == [5, 6, 260]
    for bad in ([261], [-1], [True], [1.5]):
        with pytest.raises(InvalidInputError, match="outside the vocabulary"):
            check_token_ids(bad, len(TOKENIZER))


def test_lengths_counts_and_max_tokens():
    check_length([1] * 32, CONFIG)
    with pytest.raises(InputTooLongError, match="Prompt has 33 tokens; .* at most 32"):
        check_length([1] * 33, CONFIG)
    with pytest.raises(InputTooLongError, match="Input 2 is empty"):
        check_length([], CONFIG, what="Input 2")
    assert check_max_tokens(None, CONFIG) == 16 and check_max_tokens(64, CONFIG) == 64
    with pytest.raises(InputTooLongError, match="max_tokens=65 exceeds"):
        check_max_tokens(65, CONFIG)
    check_count(3, CONFIG)
    with pytest.raises(InputTooLongError, match="4 inputs; .* at most 3"):
        check_count(4, CONFIG)


def test_task_inputs_are_tokenized_once_with_offsets_for_ner():
    plain = asyncio.run(task_inputs(TOKENIZER, ["ab", "é"], CONFIG))
    assert [(i.text, i.ids, i.offsets) for i in plain] == [("ab", ids("ab"), None), ("é", ids("é"), None)]
    (ner,) = asyncio.run(task_inputs(TOKENIZER, ["Ann é"], CONFIG, offsets=True))
    assert ner.ids == ids("Ann é") and ner.offsets == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (4, 5)]
    with pytest.raises(InputTooLongError, match="Input 1 has 33 tokens"):
        asyncio.run(task_inputs(TOKENIZER, ["ok", "x" * 33], CONFIG))
    with pytest.raises(InvalidInputError):
        asyncio.run(task_inputs(TOKENIZER, ["\ud800"], CONFIG, offsets=True))


def test_score_inputs_are_the_rendered_pair_and_its_length_counts_the_template():
    (item,) = asyncio.run(score_inputs(TOKENIZER, [("Q", "A")], CONFIG))
    assert item.text == "<user>Q\n<assistant>A\n" and item.ids == ids(item.text)
    with pytest.raises(InputTooLongError, match="Input 0 has 39 tokens"):  # 20 characters + 19 of template
        asyncio.run(score_inputs(TOKENIZER, [("p" * 10, "r" * 10)], CONFIG))
    with pytest.raises(InvalidInputError, match="at character 1"):
        asyncio.run(score_inputs(TOKENIZER, [("p", "\ud800")], CONFIG))
