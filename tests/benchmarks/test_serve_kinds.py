"""The adapter-kind serving benchmark runs end to end on the tiny base (a real server on 127.0.0.1)."""

from __future__ import annotations

import json

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.network]


def test_serve_kinds_serves_every_kind_and_compares_it_with_lora(tiny_base, tmp_path) -> None:
    from benchmarks import serve_kinds

    argv = ["--base", "tiny", "--adapters", "2", "--requests", "2", "--repeats", "1", "--concurrency", "2",
            "--new-tokens", "4", "--out", str(tmp_path)]  # fmt: skip
    serve_kinds.main(argv)
    result = json.loads((tmp_path / "serve_kinds_tiny.json").read_text())
    kinds = {row["kind"]: row for row in result["summary"]}
    assert set(kinds) == set(serve_kinds.KINDS)
    assert all(row["errors"] == 0 and row["tok_s"] > 0 for row in kinds.values())
    assert kinds["lora"]["throughput_vs_lora"] == 1.0
    assert {row["kind"] for row in result["runs"]} == set(serve_kinds.KINDS)


def test_sets_pair_neighbouring_loras() -> None:
    from benchmarks.serve_kinds import scenario_models

    models = scenario_models(3)
    assert models["set"] == ["a000*0.5+a001*0.5", "a001*0.5+a002*0.5", "a002*0.5+a000*0.5"]
    assert models["dora"] == ["d000", "d001", "d002"]
