"""The DoRA / weighted-set cost benchmark runs end to end on the tiny base and reports every kind."""

from __future__ import annotations

import json
import sys

import pytest


@pytest.mark.slow
def test_adapter_kinds_cost_reports_each_kind_against_lora(tiny_base, tmp_path, monkeypatch) -> None:
    from benchmarks import adapter_kinds_cost

    out = tmp_path / "cost.json"
    argv = ["adapter_kinds_cost", "--base", "tiny", "--blocks", "1", "--steps", "2", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    adapter_kinds_cost.main()
    result = json.loads(out.read_text())
    for shape in ("solo", "mixed"):
        kinds = result["shapes"][shape]["kinds"]
        assert set(kinds) == set(adapter_kinds_cost.KINDS)
        assert kinds["lora"]["decode_ratio_vs_lora"] == 1.0 and kinds["dora"]["decode_ms"] > 0
    assert "overhead_ratio_vs_lora" in result["shapes"]["solo"]["kinds"]["set"]
