"""The weighted-set grammar: `ref*w+ref*w`, its limits, its errors and its canonical key."""

from __future__ import annotations

import pytest

from hub.adapter_set import MAX_SET_PARTS, is_adapter_set, names_in, parse_adapter_set, set_key
from hub.errors import InvalidReferenceError
from hub.ref import AdapterRef


def test_parts_weights_and_defaults() -> None:
    parts = parse_adapter_set("tone@2*0.5+facts@1*0.5")
    assert [(str(p.ref), p.weight) for p in parts] == [("tone@2", 0.5), ("facts@1", 0.5)]
    parts = parse_adapter_set("team/tone@prod+facts*-1.5e-1+style*.25+x@v3*2.")
    assert [(p.ref, p.weight) for p in parts] == [
        (AdapterRef("team/tone", tag="prod"), 1.0),
        (AdapterRef("facts"), -0.15),
        (AdapterRef("style"), 0.25),
        (AdapterRef("x", version=3), 2.0),
    ]
    assert [p.weight for p in parse_adapter_set("tone*3")] == [3.0]  # one part with a weight is a set too


def test_what_reads_as_a_set() -> None:
    assert is_adapter_set("a+b") and is_adapter_set("a*0.5")
    assert not is_adapter_set("tone@2") and not is_adapter_set("team/tone@prod")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("tone+", "empty part"),
        ("+tone", "empty part"),
        ("tone*", "weight ''"),
        ("tone*0.5*2", "weight '0.5\\*2'"),
        ("tone*abc", "not a decimal number"),
        ("tone*nan", "not a decimal number"),
        ("tone*inf", "not a decimal number"),
        ("tone*1_000", "not a decimal number"),
        ("tone*0x10", "not a decimal number"),
        ("tone* 1", "not a decimal number"),
        ("tone*1e999", "too large to be finite"),
        ("tone@2+tone@2*3", "names tone@2 more than once"),
        ("Tone+facts", "Invalid adapter name"),
        ("../x+facts", "Invalid adapter name"),
        ("tone@+facts", "Invalid adapter reference"),
        ("+".join(f"a{i}" for i in range(MAX_SET_PARTS + 1)), f"at most {MAX_SET_PARTS}"),
    ],
)
def test_malformed_sets_are_refused_naming_the_problem(text: str, message: str) -> None:
    with pytest.raises(InvalidReferenceError, match=message):
        parse_adapter_set(text)


def test_eight_parts_are_allowed() -> None:
    assert len(parse_adapter_set("+".join(f"a{i}*{i}" for i in range(MAX_SET_PARTS)))) == MAX_SET_PARTS


def test_canonical_key_is_order_free_and_exact() -> None:
    key = set_key([("tone@2", 0.5), ("facts@1", 0.1)])
    assert key == "facts@1*0.1+tone@2*0.5" == set_key([("facts@1", 0.1), ("tone@2", 0.5)])
    assert set_key([("tone@2", 0.5)]) != set_key([("tone@2", 0.50000001)])


def test_names_in_a_resident_key() -> None:
    assert names_in("tone@2") == ["tone"]
    assert names_in("team/facts@1*0.1+tone@2*0.5") == ["team/facts", "tone"]
