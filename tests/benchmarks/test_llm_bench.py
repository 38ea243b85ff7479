"""``python -m benchmarks.llm --quick`` runs every section end to end on a tiny-budget build of
the reference language models and writes finite figures for each. Slow: it builds models,
starts a worker and a llama_cpp.server. The figures themselves are not asserted."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require

pytestmark = pytest.mark.slow


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


@pytest.mark.timeout(900)
def test_quick_run_writes_every_section_with_finite_numbers(tmp_path: Path) -> None:
    for module in ("llama_cpp", "gguf", "openai", "transformers"):
        require(module)
    from benchmarks.llm import end_to_end as llm
    from benchmarks.llm.cascade import GATES
    from tandem.reference.lm_models import build_llm_models

    models = tmp_path / "models"
    # a few steps more than nothing: the models then answer at full length instead of EOS
    build_llm_models(models, edge_steps=25, cloud_steps=10, eval_n=2)
    out = tmp_path / "llm.json"
    argv = ["--quick", "--models-dir", str(models), "--cache-dir", str(tmp_path / "cache")]
    assert llm.main([*argv, "--json", str(out)]) == 0

    doc = json.loads(out.read_text())
    r = doc["results"]
    assert set(r) == set(llm.SECTIONS)
    assert all("error" not in r[s] for s in llm.SECTIONS), {s: r[s].get("error") for s in r}
    assert doc["machine"]["cores"] >= 1

    assert len(r["edge"]["models"]) == 2
    for model in r["edge"]["models"].values():
        assert _finite(model["reference_tokens_per_s"])
        assert len(model["rows"]) == 6
        for row in model["rows"].values():
            assert _finite(row["tokens_per_s"]) and row["tokens_per_s"] > 0
            assert _finite(row["vs_create_completion"])
        assert model["rows"]["EdgeRuntime.generate(stream=True), probe"]["goal"] in (
            "met",
            "NOT met",
        )

    names = [row["name"] for row in r["moe"]["rows"]]
    assert "llama.cpp create_completion, q8_0" in names and "transformers eager" in names
    assert all(_finite(row["tokens_per_s"]) for row in r["moe"]["rows"])
    assert _finite(r["moe"]["tandem_over_llama_cpp_q8_0"])

    assert set(r["concurrency"]["levels"]) == {"1", "8", "32"}
    for level in r["concurrency"]["levels"].values():
        for side in ("engine", "threads", "gguf", "llama.cpp"):
            s = level[side]
            assert s["errors"] == 0, s["first_error"]
            assert s["tokens"] > 0
            for k in ("tokens_per_s", "itl_p50_ms", "itl_p99_ms", "ttft_p50_ms"):
                assert _finite(s[k]), (side, k)
    goals = r["concurrency"]["goals"]
    assert {(g["streams"], g["side"]) for g in goals} == {
        (n, side) for n in (8, 32) for side in ("engine", "gguf")
    }
    assert all(isinstance(g["met"], bool) and _finite(g["value"]) for g in goals)

    c = r["cascade"]
    assert set(c["modes"]) == {"edge only", "cloud only", *GATES}
    gap = c["cloud_accuracy"] > c["edge_accuracy"]
    for name, m in c["modes"].items():
        for k in ("accuracy", "escalation_rate", "latency_p50_ms", "latency_p95_ms"):
            assert _finite(m[k]), (name, k)
        if name in GATES:
            assert 0.0 <= m["threshold"] <= 1.0
            assert _finite(m["cpt80"]) if gap else m["cpt80"] is None
            # the offline sweep and the live run agree at the calibrated threshold
            assert m["offline_escalation_rate"] == pytest.approx(m["escalation_rate"])
            assert m["offline_accuracy"] == pytest.approx(m["accuracy"])
    assert c["modes"]["cloud only"]["escalation_rate"] == 1.0
    assert c["modes"]["edge only"]["escalation_rate"] == 0.0

    s = r["streaming"]
    for k in ("ratio_p50", "ratio_mean"):
        assert _finite(s[k])
    assert s["goal_met"] in (True, False)
