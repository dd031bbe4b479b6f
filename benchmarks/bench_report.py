"""Turning `serve_bench.py` results into the Markdown table, the target verdicts and the throughput plot;
and the JSON + Markdown pair every benchmark writes (`write_results`).

Boundary: functions over results dictionaries (as written to serve_bench.json) and the files they go to;
no servers, no HTTP.
"""

from __future__ import annotations

import datetime as dt
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TABLE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("system", "system"),
    ("scenario", "scenario"),
    ("concurrency", "C"),
    ("ok", "requests ok"),
    ("repeats", "runs"),
    ("tokens_per_s", "gen tok/s"),
    ("requests_per_s", "req/s"),
    ("ttft_p50_ms", "TTFT p50 ms"),
    ("ttft_p95_ms", "TTFT p95 ms"),
    ("latency_p50_ms", "latency p50 ms"),
    ("latency_p95_ms", "latency p95 ms"),
    ("peak_rss_mib", "peak RSS MiB"),
    ("cache_hit_rate", "cache hit rate"),
    ("mean_load_ms", "mean load ms"),
    ("median_load_ms", "median load ms"),
    ("errors", "errors"),
)


_MEDIAN_KEYS = (
    "tokens_per_s", "requests_per_s", "ttft_p50_ms", "ttft_p95_ms", "latency_p50_ms", "latency_p95_ms",
    "cache_hit_rate", "mean_load_ms", "median_load_ms", "wall_s",
)  # fmt: skip
_SUM_KEYS = ("requests", "ok", "errors", "generated_tokens")


def aggregate(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (system, scenario, concurrency): medians over repeats, sums of counts, max of peak RSS.

    Rows keep their first-seen order; `repeats` and `tokens_per_s_all` say what the median is over.
    """
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["system"], row["scenario"], row["concurrency"]), []).append(row)
    out = []
    for group in groups.values():
        merged = {k: v for k, v in group[0].items() if k != "repeat"}
        good = [r for r in group if r.get("ok")] or group
        for key in _MEDIAN_KEYS:
            values = [r[key] for r in good if r.get(key) is not None]
            merged[key] = round(statistics.median(values), 3) if values else None
        for key in _SUM_KEYS:
            merged[key] = sum(r.get(key) or 0 for r in group)
        merged["peak_rss_mib"] = max((r.get("peak_rss_mib") or 0) for r in group) or None
        merged["repeats"] = len(group)
        merged["tokens_per_s_all"] = [r["tokens_per_s"] for r in group]
        out.append(merged)
    return out


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1 else f"{value:.1f}"
    return str(value).replace("|", "\\|")


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]] = TABLE_COLUMNS) -> str:
    """A GitHub Markdown table of `rows`, one column per (key, header); missing keys show as `-`."""
    lines = [
        "| " + " | ".join(header for _, header in columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(key)) for key, _ in columns) + " |")
    return "\n".join(lines) + "\n"


def invocation(module: str, argv: Sequence[str] | None = None) -> dict[str, str]:
    """How a benchmark was run, for its results: the command line (`argv`, else this process's) and the
    UTC time."""
    args = list(sys.argv[1:] if argv is None else argv)
    return {
        "command": " ".join([f"python -m {module}", *args]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def write_results(stem: Path, payload: dict[str, Any], title: str, intro: str, table: list[dict]) -> str:
    """`stem`.json (the payload) and `stem`.md (title, intro, the table, its keys as headers); -> the md."""
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    text = f"# {title}\n\n{intro}\n\n" + markdown_table(table, [(key, key) for key in table[0]])
    stem.with_suffix(".md").write_text(text)
    return text


def find_row(rows: Sequence[dict[str, Any]], system: str, scenario: str, concurrency: int) -> dict | None:
    for row in rows:
        if row["system"] == system and row["scenario"] == scenario and row["concurrency"] == concurrency:
            return row
    return None


def _tps(rows: Sequence[dict[str, Any]], system: str, scenario: str, concurrency: int = 16) -> float | None:
    row = find_row(rows, system, scenario, concurrency)
    return row["tokens_per_s"] if row and row["ok"] else None


def _ratio(num: float | None, den: float | None) -> float | None:
    return round(num / den, 3) if num is not None and den else None


def _verdict(value: float | None, ok: bool) -> str:
    return "not measured" if value is None else ("met" if ok else "missed")


def evaluate_targets(results: dict[str, Any], system: str = "adapterdock-none") -> list[dict[str, Any]]:
    """Each target of issue 6 with the measured value and met / missed / not measured."""
    rows = results["runs"]
    mixed, one, base = (_tps(rows, system, s) for s in ("8 adapters", "1 adapter", "base"))
    naive_one = _tps(rows, "naive-peft", "1 adapter")
    v_mixed, v_base = _tps(rows, "vllm", "8 adapters"), _tps(rows, "vllm", "base")
    targets = []
    r = _ratio(mixed, one)
    targets.append(
        dict(target="8 mixed / 1 adapter >= 0.8 (C=16)", value=r, verdict=_verdict(r, (r or 0) >= 0.8))
    )
    r = _ratio(mixed, base)
    targets.append(
        dict(target="8 mixed / base-only >= 0.7 (C=16)", value=r, verdict=_verdict(r, (r or 0) >= 0.7))
    )
    r = _ratio(one, naive_one)
    targets.append(
        dict(target="1 adapter / naive PEFT >= 4 (C=16)", value=r, verdict=_verdict(r, (r or 0) >= 4))
    )
    r = _ratio(mixed, v_mixed)
    targets.append(
        dict(target="8 mixed / vLLM 8 mixed >= 1.0 (C=16)", value=r, verdict=_verdict(r, (r or 0) >= 1))
    )
    ours, theirs = _ratio(mixed, base), _ratio(v_mixed, v_base)
    value = None if ours is None or theirs is None else {"ours": ours, "vllm": theirs}
    ok = value is not None and ours > theirs
    targets.append(
        dict(
            target="our mixed/base ratio > vLLM's (smaller overhead)",
            value=value,
            verdict=_verdict(ours if theirs is not None else None, ok),
        )
    )
    cold = (results.get("extras") or {}).get("cold_load") or {}
    med = cold.get("median_ms")
    targets.append(
        dict(
            target="cold load of a rank-16 adapter < 50 ms (median)",
            value=med,
            verdict=_verdict(med, (med or 1e9) < 50),
        )
    )
    cycle = (results.get("extras") or {}).get("cycle") or {}
    growth = cycle.get("rss_growth")
    targets.append(
        dict(
            target=f"RSS after {cycle.get('adapters', 200)} adapters within 10% of after 16",
            value=growth,
            verdict=_verdict(growth, growth is not None and abs(growth) <= 0.10),
        )
    )
    return targets


def peer_targets(rows: Sequence[dict[str, Any]], system: str = "adapterdock-none") -> list[dict[str, Any]]:
    """Issue 17's targets against vLLM CPU and the naive PEFT server, for each C>1 and mix (4, 8) measured."""
    targets: list[dict[str, Any]] = []

    def add(target: str, value: float | None, floor: float) -> None:
        targets.append(dict(target=target, value=value, verdict=_verdict(value, (value or 0) >= floor)))

    loads = sorted({row["concurrency"] for row in rows if row["system"] == system and row["concurrency"] > 1})
    for c in loads:
        base, v_base = _tps(rows, system, "base", c), _tps(rows, "vllm", "base", c)
        add(f"base-only / vLLM base-only >= 1.2 (C={c})", _ratio(base, v_base), 1.2)
        for n in (4, 8):
            mixed, v_mixed = _tps(rows, system, f"{n} adapters", c), _tps(rows, "vllm", f"{n} adapters", c)
            if mixed is None:
                continue
            add(f"{n} mixed / vLLM {n} mixed >= 2.5 (C={c})", _ratio(mixed, v_mixed), 2.5)
            add(f"{n} mixed / our base-only >= 0.85 (C={c})", _ratio(mixed, base), 0.85)
            add(f"moonshot: {n} mixed / vLLM base-only >= 1 (C={c})", _ratio(mixed, v_base), 1.0)
    if loads:
        c = loads[-1]
        naive = _tps(rows, "naive-peft", "8 adapters", c)
        add(
            f"8 mixed / naive PEFT 8 mixed >= 6 (C={c})",
            _ratio(_tps(rows, system, "8 adapters", c), naive),
            6,
        )
    return targets


def targets_table(targets: Sequence[dict[str, Any]]) -> str:
    """The verdicts, ratios with 3 decimals (a 2.454 against a 2.5 target must not print as 2.5)."""
    rows = [
        {**t, "value": f"{t['value']:.3f}" if isinstance(t["value"], float) else t["value"]} for t in targets
    ]
    return markdown_table(rows, (("target", "target"), ("value", "measured"), ("verdict", "verdict")))


def plot_throughput(rows: Sequence[dict[str, Any]], out: Path, concurrency: int = 16) -> Path:
    """Generated tokens/s against the number of adapters (0 = base only), one line per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    systems = sorted({row["system"] for row in rows})
    for system in systems:
        points = sorted(
            (row["num_adapters"], row["tokens_per_s"])
            for row in rows
            if row["system"] == system and row["concurrency"] == concurrency and row["ok"]
        )
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot([max(x, 0.5) for x in xs], ys, marker="o", label=system)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("adapters in the mix (0 = base only, drawn at 0.5)")
    ax.set_ylabel("generated tokens / s")
    ax.set_title(f"Throughput vs number of adapters (C={concurrency}, 64 in / 64 out)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
