"""The compute-dtype A/B benchmark runs end to end on the tiny base and reports each engine against fp32."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_engine_dtype_ab_reports_every_engine_against_fp32(tiny_base, tmp_path) -> None:
    from benchmarks import engine_dtype_ab

    engine_dtype_ab.main(
        ["--base", "tiny", "--blocks", "1", "--steps", "2", "--batch", "2", "--out", str(tmp_path)]
    )
    result = json.loads((tmp_path / "engine_dtype_ab_tiny.json").read_text())
    rows = {row["engine"]: row for row in result["table"]}
    assert set(rows) == {"none/fp32", "none/bf16"}
    assert rows["none/fp32"]["decode_speed_vs_fp32_base"] == 1.0
    assert rows["none/bf16"]["decode_ms_mixed"] > 0 and rows["none/bf16"]["prefill_ms_base"] > 0
    assert (tmp_path / "engine_dtype_ab_tiny.md").read_text().startswith("# Engine cost by compute dtype")
