"""``tandem bench``: scenarios, the load generator, and whole runs on real worker processes
and a real netem relay."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from hdrh.histogram import HdrHistogram

from tandem.bench.load import run_level
from tandem.bench.report import level_json
from tandem.bench.runner import run_scenario
from tandem.bench.scenario import (
    bundled_scenarios,
    find_scenario,
    load_scenario,
    scenario_from_dict,
)
from tandem.bench.stats import Outcome, record_ms
from tandem.bench.sweeps import knee, mixture_quantile, pareto
from tandem.runtime.errors import ConfigError
from tests.conftest import write_policy


# ---------------------------------------------------------------------- scenarios
def _bad(data: dict, tmp_path: Path) -> str:
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as e:
        load_scenario(f)
    assert str(f) in e.value.message
    return e.value.message


def test_scenario_errors_name_file_key_and_expectation(tmp_path: Path) -> None:
    digits = {"task": {"source": "digits"}}
    assert "task.source" in _bad({"task": {"source": "mnist"}}, tmp_path)
    msg = _bad({**digits, "load": {"concurency": 2}}, tmp_path)
    assert "load.concurency" in msg and "concurrency" in msg  # the typo's suggestion
    assert "rate" in _bad({**digits, "load": {"mode": "open"}}, tmp_path)
    assert "network" in _bad({**digits, "network": {"profile": "5g"}}, tmp_path)
    assert "start < end" in _bad({**digits, "network": {"outages": [[3, 1]]}}, tmp_path)
    assert "policy.path" in _bad({"task": {"source": "npy", "inputs": "x.npy"}}, tmp_path)
    curve = {"server_key": "w.key", "client_key": "c.key_secret"}
    msg = _bad({**digits, "cloud": curve, "network": {"profile": "lte"}}, tmp_path)
    assert "CurveZMQ" in msg


def test_bundled_scenarios_load() -> None:
    found = bundled_scenarios()
    assert {"digits-lan", "digits-lte", "sort-lan"} <= set(found)
    for name, path in found.items():
        sc = load_scenario(path)
        assert sc.name == name and sc.description
    assert find_scenario("digits-lan") == found["digits-lan"]
    with pytest.raises(ConfigError, match="no bundled scenario"):
        find_scenario("no-such-scenario")


# ---------------------------------------------------------------------- load generation
def _sleeper(ms_of_call) -> callable:
    n = [0]

    def call(i: int) -> Outcome:
        n[0] += 1
        time.sleep(ms_of_call(n[0]) / 1e3)
        return Outcome(tier="edge", correct=i % 2 == 0)

    return call


def test_stability_stops_early_on_a_steady_system() -> None:
    run = run_level(
        _sleeper(lambda n: 2.0), 10, mode="closed", point=1, warmup_s=0.2, window_s=0.4,
        min_windows=3, max_windows=12, stability_pct=25,
    )  # fmt: skip
    assert run.stable
    assert len(run.windows) < 12
    assert run.used == list(range(len(run.windows) - 3, len(run.windows)))
    lv = level_json(run, label="x")
    assert lv["stable"] and lv["accuracy"] == pytest.approx(0.5, abs=0.1)
    assert lv["all"]["latency_ms"]["p50"] == pytest.approx(2.0, rel=0.6)


def test_stability_reports_not_stable_on_a_drifting_system() -> None:
    start = time.perf_counter()
    # latency grows with time: 1 ms at the start, +10 ms per second
    run = run_level(
        _sleeper(lambda n: 1 + 10 * (time.perf_counter() - start)), 10, mode="closed",
        point=1, warmup_s=0.1, window_s=0.4, min_windows=3, max_windows=6, stability_pct=10,
    )  # fmt: skip
    assert not run.stable
    assert len(run.windows) == 6
    assert run.used == list(range(6))
    assert level_json(run, label="x")["stable"] is False


def test_open_loop_rate_matches_and_latency_counts_from_intended_send() -> None:
    rate = 200.0
    run = run_level(
        _sleeper(lambda n: 0.5), 10, mode="open", point=rate, warmup_s=0.3, window_s=1.0,
        min_windows=3, max_windows=3, max_in_flight=16,
    )  # fmt: skip
    sent_rate = run.stats.sent / run.stats.span_s
    assert sent_rate == pytest.approx(rate, rel=0.10)
    assert run.stats.throughput() == pytest.approx(rate, rel=0.10)
    # Offered 100/s to a system that serves 50/s (one 20 ms call at a time): the queue grows,
    # and latency from the intended send time shows it (a closed loop would report ~20 ms).
    slow = run_level(
        _sleeper(lambda n: 20.0), 10, mode="open", point=100.0, warmup_s=0.0, window_s=1.0,
        min_windows=2, max_windows=2, max_in_flight=1,
    )  # fmt: skip
    p99 = slow.stats.p99_ms()
    assert p99 is not None and p99 > 200.0


def test_every_answer_is_counted_once_in_the_window_it_finished_in() -> None:
    """Thousands of answers a second: warm-up answers stay out of window 1, nothing is lost or
    counted twice (warm-up + windows + drained = calls made)."""
    calls = itertools.count()

    def call(i: int) -> Outcome:
        next(calls)
        time.sleep(0.0001)  # a call waits on something (a socket), as real ones do
        return Outcome(tier="edge")

    run = run_level(call, 5, mode="closed", point=2, warmup_s=0.3, window_s=0.3,
                    min_windows=3, max_windows=3)  # fmt: skip
    made = next(calls)
    counted = sum(w.stats.answers for w in run.windows)
    assert run.warmup_answers + counted + run.drained == made
    rates = [w.stats.throughput() for w in run.windows]
    assert max(rates) < 1.6 * min(rates), rates  # window 1 holds no warm-up answers
    spans = [w.stats.span_s for w in run.windows]
    assert max(spans) < 0.3 * 1.5  # the drain keeps up: windows end on time


def test_failed_calls_are_counted_by_type() -> None:
    def call(i: int) -> Outcome:
        if i % 3 == 0:
            raise TimeoutError("slow")
        return Outcome(tier="cloud", escalated=True)

    run = run_level(call, 7, mode="closed", point=2, warmup_s=0.0, window_s=0.2,
                    min_windows=1, max_windows=2, max_requests=300)  # fmt: skip
    lv = level_json(run, label="x")
    assert lv["errors"].get("TimeoutError", 0) > 0
    assert lv["error_examples"]["TimeoutError"] == "slow"  # what went wrong, not just its type
    assert lv["escalation_rate"] == 1.0
    assert lv["requests"] <= 300


def test_mixture_quantile_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.uniform(1, 2, 4000), rng.uniform(50, 60, 4000)
    ha, hb = HdrHistogram(1, 600_000_000, 3), HdrHistogram(1, 600_000_000, 3)
    for v in a:
        record_ms(ha, v)
    for v in b:
        record_ms(hb, v)
    for w in (0.0, 0.03, 0.3, 1.0):
        k = int(w * 4000)
        mix = np.concatenate([a[: 4000 - k], b[:k]])
        for q in (0.5, 0.95, 0.99):
            got = mixture_quantile([(1 - w, ha), (w, hb)], q)
            assert got == pytest.approx(np.quantile(mix, q), rel=0.02), (w, q)
    assert mixture_quantile([(0.5, ha), (0.5, HdrHistogram(1, 600_000_000, 3))], 0.5) is None


def test_pareto_and_knee() -> None:
    pts = [
        {"accuracy": 0.80, "escalation_rate": 0.0, "p95_ms": 1.0},
        {"accuracy": 0.90, "escalation_rate": 0.3, "p95_ms": 5.0},
        {"accuracy": 0.85, "escalation_rate": 0.4, "p95_ms": 6.0},  # dominated by the one above
        {"accuracy": 0.95, "escalation_rate": 0.6, "p95_ms": 9.0},
    ]
    assert pareto(pts) == [0, 1, 3]
    load = [
        {"throughput": 100, "p99_ms": 2.0},
        {"throughput": 195, "p99_ms": 2.2},
        {"throughput": 380, "p99_ms": 3.0},
        {"throughput": 400, "p99_ms": 30.0},
    ]
    assert knee(load) == 2
    assert knee(load[:3]) is None


# ---------------------------------------------------------------------- whole runs
@pytest.fixture
def user_scenario(tmp_path: Path, tiny_models: Path):
    """A scenario on the tiny models: random rows with labels, the user's own policy (threshold
    at the median edge confidence: half escalate) and a worker started from a config file."""
    from tandem.kernels.confidence import confidence
    from tandem.runtime.backends.onnx import OnnxBackend

    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, size=(200, 64)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", rng.integers(0, 10, 200))
    scores = confidence(OnnxBackend(tiny_models / "edge-int8.onnx").predict(x)).max_prob
    write_policy(
        tmp_path / "policy.yaml", tiny_models, "tcp://127.0.0.1:1",
        threshold=float(np.median(scores)), deadline_ms=300, log=False,
    )  # fmt: skip
    (tmp_path / "worker.yaml").write_text(
        yaml.safe_dump(
            {
                "bind": "tcp://127.0.0.1:*",
                "models_dir": str(tiny_models),
                "models": ["digits-cloud"],
                "threads": 1,
            }
        )
    )

    def make(**over) -> object:
        data = {
            "task": {"source": "npy", "inputs": "x.npy", "labels": "y.npy"},
            "policy": {"path": "policy.yaml"},
            "cloud": {"worker": "worker.yaml"},
            "load": {"mode": "closed", "concurrency": 1, "warmup_s": 0.5, "window_s": 0.6,
                     "min_windows": 3, "max_windows": 3},
        }  # fmt: skip
        for k, v in over.items():
            data[k] = v
        return scenario_from_dict(data, base_dir=tmp_path, source=str(tmp_path / "s.yaml"))

    return make


@pytest.mark.integration
def test_delay_shows_in_cloud_tier_not_edge(user_scenario, tmp_path: Path) -> None:
    link = {"name": "far", "delay_ms": 50.0}
    sc = user_scenario(
        network={"profile": link},
        load={"mode": "closed", "concurrency": 2, "warmup_s": 0.5, "window_s": 1.0,
              "min_windows": 2, "max_windows": 2, "stable_windows": 2},
    )  # fmt: skip
    r = run_scenario(sc, tmp_path / "out")
    lv = r["levels"][0]
    assert lv["network"]["rtt_ms"] == 100.0
    cloud, edge = lv["tiers"]["cloud"], lv["tiers"]["edge"]
    assert cloud["count"] > 0 and edge["count"] > 0
    assert cloud["latency_ms"]["p50"] >= 100.0
    assert edge["latency_ms"]["p50"] < 20.0
    split = lv["split_ms"]
    assert split["network"]["p50"] >= 95.0  # the delay is the network's, not the worker's
    assert split["cloud_compute"]["p50"] < 50.0
    assert lv["accuracy"] is not None
    json.dumps(r, allow_nan=False)  # valid JSON: no NaN


@pytest.mark.integration
def test_outage_answers_edge_degraded_within_deadline(user_scenario, tmp_path: Path) -> None:
    sc = user_scenario(
        network={"profile": {"delay_ms": 5.0}, "outages": [[1.0, 2.5]]},
        load={"mode": "closed", "concurrency": 1, "warmup_s": 0.5, "window_s": 1.0,
              "min_windows": 3, "max_windows": 3},
    )  # fmt: skip
    lv = run_scenario(sc, tmp_path / "out")["levels"][0]
    deg = lv["tiers"]["edge-degraded"]
    assert deg["count"] > 0
    assert deg["latency_ms"]["max"] <= 300 + 60  # the deadline, plus scheduling slack
    assert lv["tiers"]["cloud"]["count"] > 0  # before and after the outage
    assert not lv["errors"]  # degraded answers are answers, not errors


@pytest.mark.integration
def test_open_loop_on_real_processes_keeps_the_requested_rate(user_scenario, tmp_path) -> None:
    sc = user_scenario(
        network={"profile": "lan"},
        load={"mode": "open", "rate": 150, "warmup_s": 0.5, "window_s": 1.0,
              "min_windows": 3, "max_windows": 3},
    )  # fmt: skip
    lv = run_scenario(sc, tmp_path / "out")["levels"][0]
    assert lv["load"]["achieved_rate"] == pytest.approx(150, rel=0.10)
    assert lv["throughput"] == pytest.approx(150, rel=0.10)
    assert lv["send_lag_ms"]["p50"] is not None
    assert not lv["errors"]


@pytest.mark.integration
def test_report_holds_its_plots(user_scenario, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from tandem.bench.html_report import write_html
    from tandem.bench.plots import write_plots

    sc = user_scenario(
        network={"sweep": ["lan", {"name": "slow", "delay_ms": 10.0}]},
        sweep={"threshold": {"steps": 11}, "target": {"escalation_rate": 0.5}, "items": 100},
    )
    out = tmp_path / "out"
    r = run_scenario(sc, out)
    assert r["threshold_sweep"] is not None and r["rtt_sweep"] is not None
    pngs = write_plots(r, out)
    assert {"latency_cdf", "accuracy_escalation", "latency_vs_rtt"} <= {
        Path(p).stem for p in pngs.values()
    }
    html = write_html(r, pngs, out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(pngs)
    assert 'src="http' not in html


@pytest.mark.integration
def test_cli_runs_a_scenario_file(user_scenario, tmp_path: Path) -> None:
    sc = user_scenario(description="arm [/] [bold]test")  # rich markup: printed as it is
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(sc.model_dump(mode="json", by_alias=True, exclude_none=True)))
    out = tmp_path / "cli-out"
    p = subprocess.run(
        [sys.executable, "-m", "tandem.cli", "bench", "run", str(f), "--out", str(out),
         "--no-plots", "--json", str(tmp_path / "r.json")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert "answers/s" in p.stdout and "arm [/] [bold]test" in p.stdout
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["schema"] == "tandem-bench/1" and r["machine"]["cores"] >= 1
    assert (out / "results.json").exists()
    bad = tmp_path / "bad.yaml"
    bad.write_text("description: 'arm [/] test'\ntask: {source: digits}\nload: {concurrency: 0}\n")
    p = subprocess.run(
        [sys.executable, "-m", "tandem.cli", "bench", "run", str(bad)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert p.returncode == 1 and "load" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.integration
def test_curve_worker_is_measured_with_the_scenarios_keys(user_scenario, tmp_path, tiny_models):
    from tandem.runtime.curve import generate_keypair

    worker_public, worker_secret = generate_keypair(tmp_path / "keys", "worker")
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    robot_public, robot_secret = generate_keypair(tmp_path / "keys", "robot")
    (allowed / robot_public.name).write_bytes(robot_public.read_bytes())
    (tmp_path / "curve-worker.yaml").write_text(
        yaml.safe_dump(
            {"bind": "tcp://127.0.0.1:*", "models_dir": str(tiny_models),
             "models": ["digits-cloud"], "threads": 1,
             "curve": {"secret_key": str(worker_secret), "allowed_clients": str(allowed)}}
        )
    )  # fmt: skip
    cloud = {"worker": "curve-worker.yaml", "server_key": str(worker_public),
             "client_key": str(robot_secret)}  # fmt: skip
    lv = run_scenario(user_scenario(cloud=cloud), tmp_path / "out")["levels"][0]
    assert lv["tiers"]["cloud"]["count"] > 0
    assert "edge-degraded" not in lv["tiers"] and not lv["errors"]
    with pytest.raises(ConfigError, match="CurveZMQ"):
        user_scenario(cloud=cloud, network={"profile": "lan"})


@pytest.mark.integration
def test_broken_set_ups_fail_clearly_instead_of_measuring(user_scenario, tmp_path) -> None:
    from tandem.runtime.errors import TandemError

    t0 = time.perf_counter()
    with pytest.raises(TandemError, match="did not answer a health check"):
        run_scenario(user_scenario(cloud={"endpoint": "tcp://127.0.0.1:9"}), tmp_path / "a")
    assert time.perf_counter() - t0 < 30
    np.save(tmp_path / "x.npy", np.zeros((20, 63), np.float32))  # the model takes 64 inputs
    np.save(tmp_path / "y.npy", np.zeros(20, np.int64))
    with pytest.raises(TandemError, match="first request failed"):
        run_scenario(user_scenario(), tmp_path / "b")
    (tmp_path / "bad.jsonl").write_bytes(b'{"input": [1, 2]}\n\xff\xfe\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl:2: not a UTF-8 JSON object"):
        run_scenario(
            user_scenario(task={"source": "jsonl", "path": "bad.jsonl", "limit": 5}),
            tmp_path / "c",
        )


@pytest.mark.integration
def test_the_robots_escalation_log_is_not_written(user_scenario, tmp_path, tiny_models) -> None:

    policy = yaml.safe_load((tmp_path / "policy.yaml").read_text())
    policy["escalation_log"] = {"path": str(tmp_path / "robot.sqlite"), "synchronous": "normal"}
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(policy))
    run_scenario(user_scenario(), tmp_path / "out")
    assert not (tmp_path / "robot.sqlite").exists()
    assert (tmp_path / "out" / "escalations.sqlite").exists()


@pytest.mark.integration
def test_metrics_are_scraped_from_the_edge_and_the_worker(user_scenario, tmp_path: Path) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    sc = user_scenario(output={"metrics": True})
    r = run_scenario(sc, tmp_path / "out")
    lv = r["levels"][0]

    def samples(name: str) -> dict[str, float]:
        text = (tmp_path / "out" / "metrics" / name).read_text()
        out: dict[str, float] = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                out[s.name] = out.get(s.name, 0.0) + s.value
        return out

    edge, worker = samples("edge.prom"), samples("worker-0.prom")
    # the scrape follows the whole level (warm-up included): at least what the windows counted
    assert edge["tandem_edge_requests_total"] >= lv["all"]["count"] > 0
    assert edge["tandem_edge_escalations_total"] >= lv["tiers"]["cloud"]["count"] > 0
    assert edge["tandem_edge_link_up"] == 1.0
    # every escalation the edge counted was answered by the worker (plus the first request)
    assert worker["tandem_worker_requests_total"] >= edge["tandem_edge_escalations_total"]
    for name in (
        "tandem_edge_request_duration_seconds_count",
        "tandem_edge_step_duration_seconds_count",
        "tandem_edge_model_info",
        "tandem_worker_queue_seconds_count",
        "tandem_worker_compute_seconds_count",
        "tandem_worker_batch_rows_count",
        "tandem_worker_model_ready",
    ):
        assert name in edge or name in worker, name
