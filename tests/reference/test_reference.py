from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tandem.reference.digits import SEVERITIES, corrupt, load_workload
from tandem.reference.models import CLOUD, EDGE, build_reference_models
from tandem.runtime.manifest import load_manifest, sha256_file


def test_workload_is_deterministic_and_stratified() -> None:
    a, b = load_workload(0), load_workload(0)
    np.testing.assert_array_equal(a.test.x, b.test.x)
    np.testing.assert_array_equal(a.train.y, b.train.y)
    assert not np.array_equal(load_workload(1).test.x, a.test.x)
    assert a.test.x.shape[1] == 64 and a.test.x.dtype == np.float32
    assert set(np.unique(a.test.severity)) == set(SEVERITIES)
    assert abs(len(a.calib) - len(a.test)) <= len(
        SEVERITIES
    )  # every held-out image at every severity
    assert np.bincount(a.test.y).min() > 0


def test_corruption_grows_with_severity() -> None:
    rng = np.random.default_rng(0)
    img = np.zeros((50, 8, 8), np.float32)
    img[:, 2:6, 3:5] = 1.0
    dist = [float(np.abs(corrupt(img, np.full(50, s), rng) - img).mean()) for s in SEVERITIES]
    assert dist[0] == 0.0
    assert all(x < y for x, y in itertools.pairwise(dist))


@pytest.mark.slow
def test_full_build_is_deterministic_with_a_clear_gap(tmp_path: Path) -> None:
    a = build_reference_models(tmp_path / "a")
    m = load_manifest(a)
    edge, cloud = m.get(EDGE), m.get(CLOUD)
    assert cloud.metrics["test_accuracy"] - edge.metrics["test_accuracy"] >= 0.05
    assert edge.quantization == "int8-dynamic"
    b = build_reference_models(tmp_path / "b")
    for e in m.models:
        assert sha256_file(a / e.file) == sha256_file(b / e.file)
    assert build_reference_models(tmp_path / "a") == a  # cached: no rebuild


@pytest.mark.slow
@pytest.mark.timeout(600)  # builds every model from scratch: 90-100 s on 2 idle cores
def test_demo_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    env = {**os.environ, "TANDEM_CACHE_DIR": str(tmp_path / "cache")}
    run = subprocess.run(
        [sys.executable, "-m", "tandem.cli", "demo", "--json", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr
    assert "routed (Tandem)" in run.stdout and "CPT 80%" in run.stdout
    r = json.loads(out.read_text())
    assert r["edge_accuracy"] < r["routed_accuracy"] <= r["cloud_accuracy"] + 0.02
    assert 0 < r["escalation_rate"] < 1
    assert r["gap_recovered"] > 0.7
    assert r["tier_counts"]["edge-degraded"] == 0
