"""The load-generator overhead benchmark runs end to end against a real worker and writes what
it claims. The rates and their ratio are measured, not asserted (no timed assertions here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.serving import bench_overhead as overhead

pytestmark = pytest.mark.integration


def test_overhead_measures_bare_client_and_tool_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "overhead.json"
    overhead.main(
        [
            *("--seconds", "0.3", "--rounds", "1", "--warmup", "0.1"),
            *("--concurrency", "1", "--json", str(out)),
        ]
    )
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "overhead"
    assert {"cpu", "cores"} <= doc["machine"].keys()
    r = doc["results"]
    assert r["goal"] == overhead.GOAL and r["payload_bytes"] == 256
    lv = r["levels"]["1"]
    for side in overhead.SIDES:
        s = lv[side]
        assert s["rate"] > 0 and s["answers"] > 0 and s["seconds"] > 0
        assert s["errors"] == 0
        assert s["cpu_us_per_answer"] > 0
        assert len(s["round_rates"]) == 1
    assert lv["ratio"] == pytest.approx(lv["tool"]["rate"] / lv["bare"]["rate"])
    assert lv["ratio"] > 0 and lv["client_ratio"] > 0 and lv["tool_vs_client"] > 0
    assert len(lv["round_ratios"]) == 1 and lv["round_ratio_median"] > 0
    assert lv["generator_only"]["rate"] > 0
    assert isinstance(lv["meets_goal"], bool)
