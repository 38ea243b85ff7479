"""The co-evolution experiment: its held-out figures on hand-made data, and (slow) a quick run
end to end — real worker, real log, `tandem evolve` in its own process, hot swap under load."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tandem.bench.coevolve import QUICK_DIGITS, main
from tandem.bench.coevolve_loop import Round, held_out_figures, summary


def test_held_out_figures_on_a_hand_made_stream() -> None:
    # 10 rows, scores ascending; the edge is right on the 5 most confident, the cloud on all
    scores = np.linspace(0.05, 0.95, 10)
    edge = np.arange(10) >= 5
    cloud = np.ones(10, bool)
    f = held_out_figures(scores, edge, cloud, threshold=0.5, target_accuracy=None)
    assert f["escalation_rate"] == pytest.approx(0.5)
    assert f["routed_accuracy"] == pytest.approx(1.0)
    assert f["edge_accuracy"] == pytest.approx(0.5)
    assert f["equal_accuracy_escalation"] == pytest.approx(0.5)  # fewer loses accuracy
    assert f["cpt80"] == pytest.approx(0.4)  # 4 of the 5 wrong rows recover 80% of the gap
    # a target 20 points lower is met escalating 3 rows (accuracy 0.8)
    g = held_out_figures(scores, edge, cloud, threshold=0.5, target_accuracy=0.805)
    assert g["equal_accuracy_escalation"] == pytest.approx(0.3)


def test_nan_scores_always_escalate() -> None:
    scores = np.array([np.nan, 0.9, 0.9, 0.9])
    f = held_out_figures(scores, np.array([0, 1, 1, 1], bool), np.ones(4, bool), 0.5, None)
    assert f["escalation_rate"] == pytest.approx(0.25)


def _round(i: int, eq: float, cpt: float) -> Round:
    return Round(i, f"v{i}", 0, 0, 0.5, 0.6, 0.8, 0.5, 0.4, 0.78, eq, cpt)


def test_summary_reports_the_goals_as_measured() -> None:
    met = summary("digits", [_round(0, 0.6, 0.5), _round(1, 0.3, 0.29)])
    assert met["escalation_at_equal_accuracy"]["reduction"] == pytest.approx(0.5)
    assert all(met["goals"].values())
    missed = summary("sort", [_round(0, 0.6, 0.7), _round(1, 0.5, 0.6)])
    assert not any(missed["goals"].values())


@pytest.mark.slow
def test_quick_digits_run_end_to_end(tmp_path) -> None:
    assert main(["--task", "digits", "--quick", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "coevolve.json").read_text())["digits"]
    assert len(doc["rounds"]) == QUICK_DIGITS.rounds + 1
    swap = doc["summary"]["hot_swap"]
    assert swap["failed"] == 0 and swap["sent"] == swap["answered"] > 0
    assert (tmp_path / "coevolve-digits.png").stat().st_size > 10_000
