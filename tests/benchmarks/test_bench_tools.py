"""Fast checks of the serving benchmark's tools: workload sampling, prompt building, metrics parsing, reports.

No servers, no timings: the benchmark itself is run by `python -m benchmarks.serve_bench`.
"""

from __future__ import annotations

import collections
import json

import pytest

from benchmarks import bench_report, loadgen
from benchmarks.bench_probes import summarise_collapsed
from benchmarks.bench_servers import cache_delta, parse_prometheus
from benchmarks.serve_bench import scenario_label


def test_prompts_are_exactly_the_requested_length_of_ordinary_ids() -> None:
    prompts = loadgen.build_prompts(count=10, length=64, vocab_size=4096, seed=3)
    assert len(prompts) == 10
    assert all(len(p) == 64 for p in prompts)
    assert all(loadgen.FIRST_ORDINARY_ID <= t < 4096 for p in prompts for t in p)
    assert loadgen.build_prompts(10, 64, 4096, seed=3) == prompts  # deterministic
    assert len({tuple(p) for p in prompts}) == 10


def test_prompt_ids_are_ordinary_tokens_of_the_base(tiny_base) -> None:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tiny_base.path / "tokenizer.json"))
    vocab = json.loads((tiny_base.path / "config.json").read_text())["vocab_size"]
    assert tokenizer.get_vocab_size() == vocab
    (prompt,) = loadgen.build_prompts(1, 64, vocab, seed=0)
    specials = {tokenizer.token_to_id(t) for t in ("<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>")}
    assert len(prompt) == 64
    assert max(specials) < loadgen.FIRST_ORDINARY_ID and not specials & set(prompt)
    assert all(tokenizer.id_to_token(t) is not None for t in prompt)


def test_build_prompts_refuses_empty_vocabulary() -> None:
    with pytest.raises(ValueError):
        loadgen.build_prompts(1, 64, vocab_size=3)


def test_zipf_weights_follow_one_over_rank() -> None:
    w = loadgen.zipf_weights(4, s=1.0)
    assert sum(w) == pytest.approx(1.0)
    assert w[0] / w[1] == pytest.approx(2.0)
    assert w[0] / w[3] == pytest.approx(4.0)
    assert loadgen.zipf_weights(5, s=0.0) == pytest.approx([0.2] * 5)


def test_zipf_sampler_prefers_the_first_names_and_uniform_spreads() -> None:
    names = [f"a{i}" for i in range(8)]
    zipf = collections.Counter(loadgen.sample_adapters(names, 4000, "zipf", seed=1))
    # p(a0) = 1/H_8 = 0.368, p(a7) = 0.046
    assert 0.33 < zipf["a0"] / 4000 < 0.41
    assert zipf["a0"] > zipf["a1"] > zipf["a3"] > zipf["a7"] > 0
    uniform = collections.Counter(loadgen.sample_adapters(names, 4000, "uniform", seed=1))
    assert set(uniform) == set(names)
    assert max(uniform.values()) / min(uniform.values()) < 1.4
    assert loadgen.sample_adapters(names, 50, "zipf", seed=7) == loadgen.sample_adapters(
        names, 50, "zipf", seed=7
    )
    with pytest.raises(ValueError):
        loadgen.sample_adapters(names, 3, "pareto")


def test_percentile_and_summary() -> None:
    assert loadgen.percentile([], 50) is None
    assert loadgen.percentile([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)
    assert loadgen.percentile([10.0], 95) == 10.0
    ok = [loadgen.RequestResult("m", True, 0.1, 1.0, 64, 64) for _ in range(3)]
    bad = loadgen.RequestResult("m", False, error="HTTP 404: unknown")
    summary = loadgen.summarise([*ok, bad], concurrency=4, wall_s=2.0)
    assert (summary.ok, summary.errors, summary.generated_tokens) == (3, 1, 192)
    assert summary.tokens_per_s == pytest.approx(96.0)
    assert summary.ttft_p50_ms == pytest.approx(100.0)
    assert summary.prompt_tokens_seen == [64]
    assert summary.first_errors == ["HTTP 404: unknown"]


def test_prometheus_parser_sums_label_sets_and_cache_delta() -> None:
    text = "\n".join(
        [
            "# HELP adapterdock_adapter_cache_hits_total x",
            "# TYPE adapterdock_adapter_cache_hits_total counter",
            "adapterdock_adapter_cache_hits_total 30.0",
            'adapterdock_requests_total{endpoint="/v1/completions",adapter="a@1",status="200"} 2.0',
            'adapterdock_requests_total{endpoint="/v1/completions",adapter="b@1",status="200"} 3.0',
            "adapterdock_adapter_cache_misses_total 10.0",
            "adapterdock_adapter_cache_coalesced_total 0.0",
            "adapterdock_adapter_cache_loads_total 10.0",
            "adapterdock_adapter_load_seconds_total 0.5",
            'adapterdock_adapter_load_latency_seconds_bucket{le="0.025"} 2.0',
            'adapterdock_adapter_load_latency_seconds_bucket{le="0.05"} 8.0',
            'adapterdock_adapter_load_latency_seconds_bucket{le="+Inf"} 10.0',
        ]
    )
    after = parse_prometheus(text)
    assert after["adapterdock_requests_total"] == 5.0
    before = {"adapterdock_adapter_cache_hits_total": 0.0}
    delta = cache_delta(before, after)
    assert delta["cache_hit_rate"] == 0.75
    assert delta["mean_load_ms"] == 50.0
    assert delta["median_load_ms"] == 37.5  # 5 of 10: half-way through the 25-50 ms bucket's 6
    assert cache_delta({}, {})["cache_hit_rate"] is None  # a peer without adapterdock's metrics


def _row(system: str, scenario: str, n: int, tps: float, c: int = 16) -> dict:
    return {
        "system": system,
        "scenario": scenario,
        "num_adapters": n,
        "concurrency": c,
        "ok": 4,
        "tokens_per_s": tps,
    }


def test_markdown_table_has_one_line_per_row_and_dashes_for_missing() -> None:
    rows = [_row("adapterdock-none", "base", 0, 1234.5), _row("naive|peft", "1 adapter", 1, 0.25)]
    table = bench_report.markdown_table(rows)
    lines = table.strip().splitlines()
    assert len(lines) == 2 + len(rows)
    assert lines[0].startswith("| system | scenario | C |")
    header_cells = lines[0].count("|")
    assert all(line.count("|") - line.count("\\|") == header_cells for line in lines)
    assert "1234.5" in lines[2] and "0.250" in lines[3] and "naive\\|peft" in lines[3]
    assert "| - |" in lines[2]  # no TTFT given


def test_targets_verdicts_from_results() -> None:
    runs = [
        _row("adapterdock-none", "base", 0, 1000.0),
        _row("adapterdock-none", "1 adapter", 1, 900.0),
        _row("adapterdock-none", "8 adapters", 8, 800.0),
        _row("naive-peft", "1 adapter", 1, 100.0),
        _row("vllm", "base", 0, 2000.0),
        _row("vllm", "8 adapters", 8, 1000.0),
    ]
    extras = {"cold_load": {"median_ms": 60.0}, "cycle": {"rss_growth": 0.02}}
    targets = {t["target"]: t for t in bench_report.evaluate_targets({"runs": runs, "extras": extras})}
    verdicts = [t["verdict"] for t in targets.values()]
    assert verdicts == ["met", "met", "met", "missed", "met", "missed", "met"]
    assert targets["8 mixed / 1 adapter >= 0.8 (C=16)"]["value"] == pytest.approx(0.889)
    empty = bench_report.evaluate_targets({"runs": [], "extras": {}})
    assert {t["verdict"] for t in empty} == {"not measured"}
    json.dumps(targets)  # the results file must serialise


def test_peer_targets_per_load_and_mix() -> None:
    runs = [
        _row("adapterdock-none", "base", 0, 120.0, c=8),
        _row("adapterdock-none", "4 adapters", 4, 110.0, c=8),
        _row("vllm", "base", 0, 100.0, c=8),
        _row("vllm", "4 adapters", 4, 40.0, c=8),
        _row("naive-peft", "8 adapters", 8, 10.0, c=8),
    ]
    targets = {t["target"]: t for t in bench_report.peer_targets(runs)}
    assert targets["base-only / vLLM base-only >= 1.2 (C=8)"] == {
        "target": "base-only / vLLM base-only >= 1.2 (C=8)",
        "value": 1.2,
        "verdict": "met",
    }
    assert targets["4 mixed / vLLM 4 mixed >= 2.5 (C=8)"]["value"] == pytest.approx(2.75)
    assert targets["4 mixed / our base-only >= 0.85 (C=8)"]["verdict"] == "met"
    assert targets["moonshot: 4 mixed / vLLM base-only >= 1 (C=8)"]["verdict"] == "met"
    assert targets["8 mixed / naive PEFT 8 mixed >= 6 (C=8)"]["verdict"] == "not measured"  # no 8-mix row
    assert not any("(C=16)" in name for name in targets)
    assert bench_report.peer_targets([]) == []


def test_aggregate_takes_medians_over_repeats_and_sums_counts() -> None:
    runs = [
        {**_row("s", "base", 0, 10.0), "repeat": 0, "ttft_p50_ms": 100.0, "peak_rss_mib": 500.0},
        {**_row("s", "8 adapters", 8, 7.0), "repeat": 0, "ttft_p50_ms": 120.0, "peak_rss_mib": 510.0},
        {**_row("s", "base", 0, 30.0), "repeat": 1, "ttft_p50_ms": 300.0, "peak_rss_mib": 520.0},
        {**_row("s", "base", 0, 20.0), "repeat": 2, "ttft_p50_ms": 200.0, "peak_rss_mib": 505.0},
        {**_row("s", "base", 0, 0.0, c=1), "ok": 0},
    ]
    summary = bench_report.aggregate(runs)
    assert [(r["scenario"], r["concurrency"]) for r in summary] == [
        ("base", 16),
        ("8 adapters", 16),
        ("base", 1),
    ]
    base = summary[0]
    assert base["tokens_per_s"] == 20.0 and base["ttft_p50_ms"] == 200.0
    assert base["tokens_per_s_all"] == [10.0, 30.0, 20.0] and base["repeats"] == 3
    assert base["ok"] == 12 and base["peak_rss_mib"] == 520.0
    assert "repeat" not in base
    assert summary[2]["ok"] == 0 and summary[2]["repeats"] == 1


def test_collapsed_stack_summary(tmp_path) -> None:
    raw = tmp_path / "p.txt"
    raw.write_text("thread1;run;forward;matmul 6\nthread1;run;forward;add_delta 3\nthread2;loop 1\n")
    summary = summarise_collapsed(raw)
    assert summary["samples"] == 10
    assert summary["self"][0] == ["matmul", 0.6]
    assert dict(map(tuple, summary["inclusive"]))["forward"] == 0.9
    assert dict(map(tuple, summary["threads"]))["thread2"] == 0.1


@pytest.mark.slow  # matplotlib's import takes seconds on a busy machine
def test_plot_writes_a_png(tmp_path) -> None:
    rows = [_row("a", "base", 0, 10.0), _row("a", "8 adapters", 8, 8.0), _row("b", "1 adapter", 1, 3.0)]
    out = bench_report.plot_throughput(rows, tmp_path / "p.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_scenario_labels() -> None:
    assert scenario_label(0, 16) == "base"
    assert scenario_label(1, 16) == "1 adapter"
    assert scenario_label(8, 16) == "8 adapters"
    assert scenario_label(64, 16) == "64 adapters (cache 16)"
