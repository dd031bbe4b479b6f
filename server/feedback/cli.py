"""`adapterdock feedback`: turn collected human judgements into training data, and summarise them.

    adapterdock feedback export --out pairs.jsonl [--registry DIR | --db FILE] [--adapter REF]
                                [--since DATE] [--min-agreement X]
    adapterdock feedback stats [--registry DIR | --db FILE] [--adapter REF] [--since DATE] [--json]

`export` writes one JSONL row per decided pair, `{"prompt", "chosen", "rejected", ...}` with
provenance fields beside them (pair_id, chosen_model, rejected_model, votes, agreement); that is the
format `adapterdock train dpo` and `adapterdock train reward` read as is (they ignore extra fields).
With several raters a pair's verdict is the majority choice (no strict majority: left out); ties,
both-bad verdicts, majorities under --min-agreement and identical answers are left out and counted.
`stats` prints pairs, judgements, raters, rater agreement and the win rate of each adapter against
the others (ties count half); the counting is `server.feedback.aggregate`. Boundary: reads the feedback
database only; no server, no model.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hub.durable import write_atomic
from hub.errors import AdapterDockError
from hub.ref import AdapterRef
from hub.store import LocalStore
from server.feedback.aggregate import Verdict, export_rows, rater_agreement, verdict, win_rates
from server.feedback.records import Judgement, Pair
from server.feedback.store import FeedbackStore, default_db_path

EPILOG = """\
examples:
  adapterdock feedback stats --registry adapters
  adapterdock feedback export --registry adapters --out pairs.jsonl --min-agreement 0.6
  adapterdock train dpo --base tiny --data pairs.jsonl --name chat-dpo --from chat@prod

docs/feedback.md walks through the whole loop."""


class FeedbackCliError(AdapterDockError, ValueError):
    """A bad `adapterdock feedback` option value."""

    default_remedy = "See `adapterdock feedback export --help`."


def echo(text: str = "", *, err: bool = False) -> None:
    """The command's output (stdout, or stderr for errors and warnings)."""
    print(text, file=sys.stderr if err else sys.stdout)  # noqa: T201 - a CLI module


# ---- selection --------------------------------------------------------------------------------
def parse_since(text: str) -> str:
    """An ISO date or date-time (naive means UTC) as the database's timestamp format.

    Raises:
        FeedbackCliError: text that is not an ISO date.
    """
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError as exc:
        raise FeedbackCliError(
            f"--since {text!r} is not an ISO date (e.g. 2026-11-27 or 2026-11-27T09:30)."
        ) from exc
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def adapter_filter(text: str, registry: Path | None) -> tuple[str, int | None]:
    """(name, version or None for any) of `--adapter`; a tag is resolved in the registry."""
    ref = AdapterRef.parse(text)
    if ref.tag is not None:
        ref = LocalStore(registry).resolve(ref)
    return ref.name, ref.version


def select(store: FeedbackStore, args: argparse.Namespace) -> list[Verdict]:
    """Verdicts of the pairs the options select (oldest first)."""
    since = parse_since(args.since) if args.since else None
    wanted = adapter_filter(args.adapter, args.registry) if args.adapter else None
    by_pair: dict[str, list[Judgement]] = {}
    for judgement in store.judgements():
        by_pair.setdefault(judgement.pair_id, []).append(judgement)
    verdicts = []
    for pair in store.pairs(since=since):
        if wanted is not None and not _involves(pair, *wanted):
            continue
        verdicts.append(verdict(pair, by_pair.get(pair.pair_id, [])))
    return verdicts


def _involves(pair: Pair, name: str, version: int | None) -> bool:
    sides = ((pair.adapter_a, pair.version_a), (pair.adapter_b, pair.version_b))
    return any(n == name and (version is None or v == version) for n, v in sides)


# ---- commands ---------------------------------------------------------------------------------
def open_database(args: argparse.Namespace) -> FeedbackStore:
    path = args.db if args.db is not None else default_db_path(args.registry)
    return FeedbackStore(path, create=False)


def run_export(args: argparse.Namespace) -> int:
    if not 0.0 <= args.min_agreement <= 1.0:
        raise FeedbackCliError(f"--min-agreement {args.min_agreement} is not between 0 and 1.")
    store = open_database(args)
    rows, report = export_rows(select(store, args), args.min_agreement)
    write_jsonl(args.out, rows)
    echo(f"exported {report.exported} of {report.considered} pairs to {args.out}")
    left_out = {
        "unjudged": report.unjudged,
        "ties": report.ties,
        "both_bad": report.both_bad,
        "no majority": report.no_majority,
        f"agreement under {args.min_agreement:g}": report.under_agreement,
        "identical answers": report.identical,
    }
    echo("left out: " + ", ".join(f"{name} {count}" for name, count in left_out.items()))
    echo("rater agreement: " + _agreement_text(report.agreement))
    if not rows:
        echo("warning: nothing to train on yet; collect more judgements first.", err=True)
    return 0


def run_stats(args: argparse.Namespace) -> int:
    store = open_database(args)
    verdicts = select(store, args)
    choices: Counter[str] = Counter()
    for v in verdicts:
        choices.update(v.votes)
    selected = {v.pair.pair_id for v in verdicts}
    raters = {j.rater for j in store.judgements() if j.pair_id in selected}
    summary = {
        "database": str(store.path),
        "pairs": len(verdicts),
        "judged_pairs": sum(1 for v in verdicts if v.votes),
        "judgements": sum(choices.values()),
        "raters": len(raters),
        "choices": {c: choices[c] for c in ("a", "b", "tie", "both_bad")},
        "agreement": rater_agreement(verdicts),
        **win_rates(verdicts),
    }
    if args.json:
        echo(json.dumps(summary, indent=2))
        return 0
    echo(f"feedback database {summary['database']}")
    echo(
        f"pairs {summary['pairs']} ({summary['judged_pairs']} judged), judgements {summary['judgements']}, "
        f"raters {summary['raters']}"
    )
    echo("choices: " + ", ".join(f"{c} {n}" for c, n in summary["choices"].items()))
    echo("rater agreement: " + _agreement_text(summary["agreement"]))
    _print_models(summary)
    return 0


def _print_models(summary: dict[str, Any]) -> None:
    models = summary["models"]
    if models:
        echo("\nwin rate per model (pairs of two different models; a tie counts half, both_bad not at all):")
        width = max(len(m) for m in models) + 2
        echo(f"  {'model':<{width}}{'wins':>6}{'losses':>8}{'ties':>6}{'both_bad':>10}{'win rate':>10}")
        for model, row in sorted(models.items(), key=lambda item: -(item[1]["win_rate"] or 0)):
            rate = "-" if row["win_rate"] is None else f"{row['win_rate']:.3f}"
            echo(
                f"  {model:<{width}}{row['wins']:>6}{row['losses']:>8}{row['ties']:>6}"
                f"{row['both_bad']:>10}{rate:>10}"
            )
        echo("\nhead to head:")
        for head in summary["head_to_head"]:
            (m1, m2), (w1, w2) = head["models"], head["wins"]
            echo(f"  {m1} vs {m2}: {w1}-{w2}, ties {head['ties']}, both bad {head['both_bad']}")
    for model, count in sorted(summary["same_model_judgements"].items()):
        echo(f"two samples of {model}: {count} judgements (no win rate)")


def _agreement_text(agreement: dict[str, Any]) -> str:
    if not agreement.get("pairs"):
        return "n/a (no pair has two raters)"
    kappa = agreement["fleiss_kappa"]
    kappa_text = "undefined" if kappa is None else f"{kappa:.3f}"
    return (
        f"{agreement['pairwise']:.3f} pairwise over {agreement['pairs']} pairs with two or more raters "
        f"(Fleiss' kappa {kappa_text})"
    )


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write `rows` atomically (`hub.durable.write_atomic`): readers never see a half-written export."""
    write_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adapterdock feedback",
        description="Export and summarise the human judgements collected by `adapterdock serve`.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{export,stats}")
    export = commands.add_parser("export", help="write prompt/chosen/rejected JSONL for train dpo/reward")
    stats = commands.add_parser("stats", help="pairs, judgements, raters, agreement, win rate per model")
    for sub in (export, stats):
        where = sub.add_mutually_exclusive_group()
        where.add_argument(
            "--registry",
            type=Path,
            default=None,
            help="registry whose feedback.sqlite to read ($ADAPTERDOCK_REGISTRY or ./adapters)",
        )
        where.add_argument("--db", type=Path, default=None, help="the feedback database file itself")
        sub.add_argument(
            "--adapter",
            metavar="REF",
            default=None,
            help="only pairs with this model on one side: NAME, NAME@VERSION or NAME@TAG",
        )
        sub.add_argument(
            "--since",
            metavar="DATE",
            default=None,
            help="only pairs made at or after this ISO date/time (UTC unless it says)",
        )
    export.add_argument("--out", type=Path, required=True, help="the JSONL file to write")
    export.add_argument(
        "--min-agreement",
        type=float,
        default=0.0,
        metavar="X",
        help="drop pairs whose majority holds less than this share of votes (0-1; default 0)",
    )
    stats.add_argument("--json", action="store_true", help="print the summary as JSON")
    export.set_defaults(handler=run_export)
    stats.set_defaults(handler=run_stats)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `adapterdock feedback`; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (AdapterDockError, OSError) as exc:
        echo(f"error: {exc}", err=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
