"""``python -m benchmarks.llm.spec_network --quick`` end to end on a tiny-budget build of the
speculative-decoding models: a worker, a relay for the 20 ms row, every row's answers checked
identical to cloud only by the benchmark itself, the same-host table. Slow: it trains models.
The figures themselves are not asserted."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.conftest import require

pytestmark = pytest.mark.slow


@pytest.mark.timeout(900)
def test_quick_run_writes_every_row(tmp_path: Path) -> None:
    for module in ("llama_cpp", "gguf", "transformers"):
        require(module)
    from benchmarks.llm import spec_network as speculative
    from tandem.reference.spec_models import build_spec_models

    models = tmp_path / "models"
    kw = dict(edge_steps=10, cloud_steps=5, distill_steps=3, distill_prompts=64)
    build_spec_models(models, **kw, eval_n=2, agree_n=4, say=lambda _: None)
    out = tmp_path / "spec.json"
    speculative.main(["--quick", "--models-dir", str(models), "--json", str(out)])

    doc = json.loads(out.read_text())
    rows = doc["network"]
    names = [name for name, _, _ in speculative.configs("e", "d")]
    assert {(r["rtt_ms"], r["row"]) for r in rows} == {(t, n) for t in (0.0, 20.0) for n in names}
    for r in rows:
        assert r["identical"] and r["tokens"] > 0
        assert math.isfinite(r["tok_s"]) and r["tok_s"] > 0 and math.isfinite(r["ratio"])
        if r["row"] == speculative.CLOUD_ONLY:
            assert r["acceptance"] is None and r["fallbacks"] == 0
        elif r["acceptance"] is not None:  # something was drafted (not every answer streamed)
            assert 0.0 <= r["acceptance"] <= 1.0 and r["gamma_mean"] >= 0
    assert len(doc["goals"]) == 2
    assert doc["same_host"] and all(r["identical"] for r in doc["same_host"])
