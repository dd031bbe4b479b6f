"""Aggregating human judgements: each pair's majority verdict, rater agreement, export rows, win rates.

A pair's verdict is the strict majority of its raters' choices; `export_rows` turns decided pairs into
`{"prompt", "chosen", "rejected", ...}` rows (what `adapterdock train dpo|reward` read) and counts every
pair it leaves out by reason. Boundary: pure functions over `server.feedback.records`; no database, no
printing (`server.feedback.cli` does both).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from server.feedback.records import Judgement, Pair


@dataclass(frozen=True)
class Verdict:
    """What the raters of one pair decided together."""

    pair: Pair
    votes: dict[str, int]
    """Judgements per choice (a, b, tie, both_bad)."""
    choice: str | None
    """The majority choice; None without a strict majority (or without judgements)."""
    agreement: float
    """Share of the pair's judgements that went to `choice` (0 when there is none)."""


@dataclass
class ExportReport:
    """How many pairs went where; every pair considered lands in exactly one count."""

    considered: int = 0
    exported: int = 0
    unjudged: int = 0
    ties: int = 0
    both_bad: int = 0
    no_majority: int = 0
    under_agreement: int = 0
    identical: int = 0
    agreement: dict[str, Any] = field(default_factory=dict)


def verdict(pair: Pair, judgements: Iterable[Judgement]) -> Verdict:
    """The majority verdict of `judgements` on `pair`."""
    votes = Counter(j.choice for j in judgements)
    total = sum(votes.values())
    ranked = votes.most_common()
    if not ranked or (len(ranked) > 1 and ranked[0][1] == ranked[1][1]):
        return Verdict(pair, dict(votes), None, 0.0)
    choice, count = ranked[0]
    return Verdict(pair, dict(votes), choice, count / total)


def rater_agreement(verdicts: Iterable[Verdict]) -> dict[str, Any]:
    """Agreement over pairs judged by at least two raters.

    `pairwise`: share of rater pairs (on the same answer pair) who made the same choice.
    `fleiss_kappa`: Fleiss' kappa over the four choices, with a varying number of raters per pair;
    None when it is undefined (no pair with two raters, or every judgement the same choice).
    """
    shared = [v for v in verdicts if sum(v.votes.values()) >= 2]
    if not shared:
        return {"pairs": 0, "pairwise": None, "fleiss_kappa": None}
    agreeing = total = 0
    per_item: list[float] = []
    overall: Counter[str] = Counter()
    for v in shared:
        n = sum(v.votes.values())
        same = sum(c * (c - 1) for c in v.votes.values())
        agreeing += same // 2
        total += n * (n - 1) // 2
        per_item.append(same / (n * (n - 1)))
        overall.update(v.votes)
    mean_item = sum(per_item) / len(per_item)
    votes = sum(overall.values())
    expected = sum((c / votes) ** 2 for c in overall.values())
    kappa = None if expected >= 1.0 else (mean_item - expected) / (1.0 - expected)
    return {"pairs": len(shared), "pairwise": agreeing / total, "fleiss_kappa": kappa}


def export_rows(verdicts: list[Verdict], min_agreement: float = 0.0) -> tuple[list[dict], ExportReport]:
    """Preference rows for the decided pairs, and the counts of what was left out (and why)."""
    report = ExportReport(considered=len(verdicts), agreement=rater_agreement(verdicts))
    rows = []
    for v in verdicts:
        if not v.votes:
            report.unjudged += 1
        elif v.choice is None:
            report.no_majority += 1
        elif v.choice == "tie":
            report.ties += 1
        elif v.choice == "both_bad":
            report.both_bad += 1
        elif v.agreement < min_agreement:
            report.under_agreement += 1
        elif v.pair.answer_a.strip() == v.pair.answer_b.strip():
            report.identical += 1
        else:
            rows.append(_row(v))
    report.exported = len(rows)
    return rows, report


def _row(v: Verdict) -> dict[str, Any]:
    pair = v.pair
    won_a = v.choice == "a"
    return {
        "prompt": pair.prompt,
        "chosen": pair.answer_a if won_a else pair.answer_b,
        "rejected": pair.answer_b if won_a else pair.answer_a,
        "pair_id": pair.pair_id,
        "chosen_model": pair.model_a if won_a else pair.model_b,
        "rejected_model": pair.model_b if won_a else pair.model_a,
        "votes": v.votes,
        "agreement": round(v.agreement, 4),
    }


def win_rates(verdicts: Iterable[Verdict]) -> dict[str, Any]:
    """Per model (`name@version`): wins, losses, ties, both_bad and win rate over judgements of
    pairs between two different models (ties count half; both_bad is left out of the rate), the
    head-to-head records, and how many judgements compared two samples of one model."""
    models: dict[str, Counter[str]] = {}
    heads: dict[tuple[str, str], Counter[str]] = {}
    same_model: Counter[str] = Counter()
    for v in verdicts:
        a, b = v.pair.model_a, v.pair.model_b
        if a == b:
            same_model[a] += sum(v.votes.values())
            continue
        first, second = sorted((a, b))
        head = heads.setdefault((first, second), Counter())
        for choice, count in v.votes.items():
            winner = {"a": a, "b": b}.get(choice)
            for model in (a, b):
                outcome = choice if winner is None else ("wins" if model == winner else "losses")
                models.setdefault(model, Counter())[outcome] += count
            head[choice if winner is None else f"{winner} wins"] += count
    table = {}
    for model, c in sorted(models.items()):
        decided = c["wins"] + c["losses"] + c["tie"]
        rate = (c["wins"] + 0.5 * c["tie"]) / decided if decided else None
        table[model] = {
            "wins": c["wins"], "losses": c["losses"], "ties": c["tie"], "both_bad": c["both_bad"],
            "win_rate": rate,
        }  # fmt: skip
    head_to_head = [
        {
            "models": [first, second],
            "wins": [c[f"{first} wins"], c[f"{second} wins"]],
            "ties": c["tie"],
            "both_bad": c["both_bad"],
        }
        for (first, second), c in sorted(heads.items())
    ]
    return {"models": table, "head_to_head": head_to_head, "same_model_judgements": dict(same_model)}
