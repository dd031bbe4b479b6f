"""`adapterdock feedback export|stats` over a hand-made database with known votes and known answers."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from hub.store import LocalStore
from server.feedback.cli import main
from server.feedback.records import Pair
from server.feedback.store import FeedbackStore
from tests.server.fakes import register
from trainers.data.preference import read_preference_pairs

MESSAGES = [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Sky colour?"}]


@dataclass
class Collected:
    registry: LocalStore
    store: FeedbackStore
    pairs: dict[str, Pair]


@pytest.fixture(scope="module")
def collected(tmp_path_factory: pytest.TempPathFactory) -> Collected:
    """Eight pairs; the comment after each says which votes it got and what export does with it."""
    registry = LocalStore(tmp_path_factory.mktemp("feedback-cli") / "registry")
    register(registry, "chat", tags=("prod",))  # chat@1, tagged prod
    register(registry, "chat")  # chat@2
    store = FeedbackStore(registry.root / "feedback.sqlite")
    plan = {
        "p1": ("q1", "chat", 2, "tiny", ["a", "a", "b"]),  # majority a, 2/3
        "p2": (MESSAGES, "chat", 2, "tiny", ["b", "b"]),  # b, unanimous
        "p3": ("q3", "chat", 1, "chat", ["tie"]),  # two samples of chat@1, a tie
        "p4": ("q4", "chat", 2, "tiny", ["both_bad"]),
        "p5": ("q5", "chat", 2, "tiny", ["a", "b"]),  # no majority
        "p6": ("q6", "chat", 2, "tiny", []),  # unjudged
        "p7": ("q7", "chat", 2, "tiny", ["a"]),  # identical answers
        "p8": ("q8", "chat", 2, "tiny", ["a"]),
    }
    pairs = {}
    for key, (prompt, adapter_a, version_a, adapter_b, votes) in plan.items():
        answers = ("same", "same") if key == "p7" else (f"{key} answer A", f"{key} answer B")
        pair = store.add_pair(
            prompt, *answers, adapter_a=adapter_a, version_a=version_a,
            adapter_b=adapter_b, version_b=None if adapter_b == "tiny" else version_a,
        )  # fmt: skip
        for rater, choice in zip(("r1", "r2", "r3"), votes, strict=False):
            store.judge(pair.pair_id, rater, choice)
        pairs[key] = pair
    return Collected(registry, store, pairs)


def export(collected: Collected, tmp_path: Path, capsys, *args: str) -> tuple[list[dict], str]:
    out = tmp_path / "out" / "pairs.jsonl"
    assert main(["export", "--registry", str(collected.registry.root), "--out", str(out), *args]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    return rows, capsys.readouterr().out


def test_export_writes_majority_verdicts_that_the_trainers_read(collected: Collected, tmp_path, capsys):
    rows, printed = export(collected, tmp_path, capsys)
    p = collected.pairs
    assert [r["pair_id"] for r in rows] == [p["p1"].pair_id, p["p2"].pair_id, p["p8"].pair_id]
    first, second, _ = rows
    assert (first["prompt"], first["chosen"], first["rejected"]) == ("q1", "p1 answer A", "p1 answer B")
    assert (first["chosen_model"], first["rejected_model"]) == ("chat@2", "tiny")
    assert first["votes"] == {"a": 2, "b": 1} and first["agreement"] == pytest.approx(2 / 3, abs=1e-4)
    assert (second["prompt"], second["chosen"], second["chosen_model"]) == (MESSAGES, "p2 answer B", "tiny")
    assert "exported 3 of 8 pairs" in printed
    left_out = "unjudged 1, ties 1, both_bad 1, no majority 1, agreement under 0 0, identical answers 1"
    assert f"left out: {left_out}" in printed
    # pairwise: p1 1 of 3 rater pairs agree, p2 1 of 1, p5 0 of 1; Fleiss: (4/9 - 25/49) / (24/49)
    assert "0.400 pairwise over 3 pairs with two or more raters (Fleiss' kappa -0.134)" in printed

    read = read_preference_pairs(tmp_path / "out" / "pairs.jsonl")  # what `train dpo/reward --data` reads
    assert len(read.pairs) == 3 and read.skipped_identical == []
    assert [m.content for m in read.pairs[1].prompt] == ["Answer in one word.", "Sky colour?"]
    assert (read.pairs[0].chosen[0].role, read.pairs[0].chosen[0].content) == ("assistant", "p1 answer A")
    assert read.pairs[0].rejected[0].content == "p1 answer B"


def test_min_agreement_drops_weak_majorities(collected: Collected, tmp_path, capsys):
    rows, printed = export(collected, tmp_path, capsys, "--min-agreement", "0.7")
    assert [r["pair_id"] for r in rows] == [collected.pairs["p2"].pair_id, collected.pairs["p8"].pair_id]
    assert "agreement under 0.7 1" in printed


@pytest.mark.parametrize(
    ("ref", "keys"),
    [
        ("chat@1", ["p3"]),
        ("chat@prod", ["p3"]),  # the tag resolves in the registry
        ("chat", ["p1", "p2", "p3", "p4", "p5", "p6", "p7", "p8"]),
        ("tiny", ["p1", "p2", "p4", "p5", "p6", "p7", "p8"]),
        ("other", []),
    ],
)
def test_adapter_filter(collected: Collected, tmp_path, capsys, ref: str, keys: list[str]):
    rows, printed = export(collected, tmp_path, capsys, "--adapter", ref)
    assert f"of {len(keys)} pairs" in printed
    assert {r["pair_id"] for r in rows} <= {collected.pairs[k].pair_id for k in keys}


def test_since_filter(collected: Collected, tmp_path, capsys):
    _, printed = export(collected, tmp_path, capsys, "--since", collected.pairs["p2"].created_at)
    assert "exported 2 of 7 pairs" in printed
    _, printed = export(collected, tmp_path, capsys, "--since", "2000-01-01")
    assert "of 8 pairs" in printed
    _, printed = export(collected, tmp_path, capsys, "--since", "2999-01-01T00:00:00+02:00")
    assert "exported 0 of 0 pairs" in printed


def test_stats_counts_and_win_rates(collected: Collected, capsys):
    assert main(["stats", "--db", str(collected.store.path), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert (stats["pairs"], stats["judged_pairs"], stats["judgements"], stats["raters"]) == (8, 7, 11, 3)
    assert stats["choices"] == {"a": 5, "b": 4, "tie": 1, "both_bad": 1}
    assert stats["models"]["chat@2"] == {"wins": 5, "losses": 4, "ties": 0, "both_bad": 1, "win_rate": 5 / 9}
    assert stats["models"]["tiny"]["win_rate"] == pytest.approx(4 / 9)
    assert stats["head_to_head"] == [{"models": ["chat@2", "tiny"], "wins": [5, 4], "ties": 0, "both_bad": 1}]
    assert stats["same_model_judgements"] == {"chat@1": 1}
    assert stats["agreement"]["pairwise"] == pytest.approx(0.4)

    assert main(["stats", "--registry", str(collected.registry.root)]) == 0
    text = capsys.readouterr().out
    assert "pairs 8 (7 judged), judgements 11, raters 3" in text
    assert "chat@2 vs tiny: 5-4, ties 0, both bad 1" in text
    assert "two samples of chat@1: 1 judgements" in text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["stats", "--db", "{tmp}/missing.sqlite"], "No feedback database"),
        (
            ["export", "--db", "{db}", "--out", "{tmp}/x.jsonl", "--min-agreement", "1.5"],
            "not between 0 and 1",
        ),
        (["export", "--db", "{db}", "--out", "{tmp}/x.jsonl", "--since", "yesterday"], "not an ISO date"),
        (["stats", "--db", "{db}", "--adapter", "../etc"], "Names use lowercase"),
    ],
)
def test_errors_are_reported(collected: Collected, tmp_path, capsys, args: list[str], message: str):
    filled = [a.format(tmp=tmp_path, db=collected.store.path) for a in args]
    assert main(filled) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.jsonl").exists()


def test_registry_and_db_are_exclusive(capsys):
    with pytest.raises(SystemExit):
        main(["stats", "--db", "a", "--registry", "b"])
    assert "not allowed with" in capsys.readouterr().err
