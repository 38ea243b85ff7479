"""The edge runtime's Prometheus metrics, scraped over real HTTP from its exporter (and from the
gateway), against real ONNX sessions and a real worker process on loopback."""

from __future__ import annotations

import collections
import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tandem.cloud.process import WorkerProcess
from tandem.edge import EdgeRuntime, EscalationLog, Tier
from tandem.edge.metrics import LATENCY_BUCKETS_S
from tandem.router.policy import load_policy
from tandem.runtime.errors import ConfigError
from tests.conftest import worker_config

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def scrape(url: str) -> Samples:
    """Every sample of ``url``/metrics, by (name, labels)."""
    status, body = get(f"{url}/metrics")
    assert status == 200
    out: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def matching(samples: Samples, name: str, **labels: str) -> dict[frozenset, float]:
    want = set(labels.items())
    return {k[1]: v for k, v in samples.items() if k[0] == name and want <= k[1]}


@pytest.mark.integration
def test_scraped_counts_per_stage_equal_what_the_results_said(
    make_policy, worker, digits_x
) -> None:
    policy = make_policy(
        worker.endpoint, threshold=1.0, budget={"escalations_per_s": 0.001, "burst": 3}
    )
    with EdgeRuntime.from_policy(policy) as rt:
        server = rt.serve_metrics("127.0.0.1:0")
        results = [rt.infer(x) for x in digits_x[:5]]  # 3 escalate, then the budget is spent
        results += [rt.infer(x, tags={"private"}) for x in digits_x[5:8]]
        results += [rt.infer(x, tags={"critical"}) for x in digits_x[8:10]]  # rules bypass it
        results += rt.infer_batch(digits_x[10:12], tags={"private"})
        assert rt.escalation_log is not None
        rt.escalation_log.flush()
        s = scrape(server.url)
        endpoint = worker.endpoint
        status, ready = get(f"{server.url}/ready")
        version = rt.stats()["tasks"]["digits"]["versions"]["edge"]

    want = collections.Counter((r.tier.value, r.stage, r.reason) for r in results)
    assert want[("edge", "edge", "budget-exhausted")] == 2  # the test means what it says
    got = matching(s, "tandem_edge_requests_total", task="digits")
    assert {(dict(k)["tier"], dict(k)["stage"], dict(k)["reason"]): v for k, v in got.items()} == {
        k: float(n) for k, n in want.items()
    }
    escalated = sum(r.tier is not Tier.EDGE for r in results)
    assert value(s, "tandem_edge_escalations_total", task="digits") == escalated == 5
    assert value(s, "tandem_edge_budget_exhausted_total", task="digits") == 2
    for tier in ("edge", "cloud"):
        n = sum(r.tier.value == tier for r in results)
        dur = "tandem_edge_request_duration_seconds"
        assert value(s, dur + "_count", task="digits", tier=tier) == n
        assert value(s, dur + "_bucket", task="digits", tier=tier, le="+Inf") == n
        total_s = sum(r.timings["total"] for r in results if r.tier.value == tier) / 1e3
        assert value(s, dur + "_sum", task="digits", tier=tier) == pytest.approx(total_s)
    steps = "tandem_edge_step_duration_seconds_count"
    assert value(s, steps, task="digits", step="local") == len(results)
    assert value(s, steps, task="digits", step="route") == len(results)
    assert value(s, steps, task="digits", step="cloud") == escalated
    assert value(s, steps, task="digits", step="cloud_compute") == escalated
    # cumulative buckets: never decreasing, ending at the count
    local = matching(s, "tandem_edge_step_duration_seconds_bucket", step="local")
    counts = [local[k] for k in sorted(local, key=lambda k: float(dict(k)["le"]))]
    assert counts == sorted(counts) and counts[-1] == len(results)
    assert len(counts) == len(LATENCY_BUCKETS_S) + 1
    # the escalation log: every escalated row written, none dropped, nothing waiting
    log = "tandem_edge_escalation_log_"
    assert value(s, log + "rows_written_total") == escalated
    assert value(s, log + "rows_dropped_total") == 0
    assert value(s, log + "queued_rows") == 0
    assert value(s, "tandem_edge_link_up", endpoint=endpoint) == 1
    assert value(s, "tandem_edge_model_info", task="digits", version=version) == 1
    assert value(s, "tandem_edge_model_swaps_total", task="digits", outcome="done") == 0
    assert status == 200 and b'"state": "ready"' in ready
    with pytest.raises(OSError):  # closed with the runtime
        urllib.request.urlopen(f"{server.url}/metrics", timeout=2)


@pytest.mark.integration
def test_a_stopped_worker_turns_its_link_gauge_to_zero(tiny_models: Path, make_policy, digits_x):
    with WorkerProcess(worker_config(tiny_models)) as w:
        assert w.endpoint is not None
        rt = EdgeRuntime.from_policy(make_policy(w.endpoint, threshold=1.0, deadline_ms=300))
        with rt:
            server = rt.serve_metrics("127.0.0.1:0")
            assert rt.infer(digits_x[0]).tier is Tier.CLOUD
            assert value(scrape(server.url), "tandem_edge_link_up", endpoint=w.endpoint) == 1
            w.stop()
            r = rt.infer(digits_x[1])
            assert r.tier is Tier.EDGE_DEGRADED
            s = scrape(server.url)
            assert value(s, "tandem_edge_link_up", endpoint=w.endpoint) == 0
            degraded = matching(s, "tandem_edge_requests_total", tier="edge-degraded")
            assert list(degraded.values()) == [1.0]
            assert dict(next(iter(degraded)))["reason"] == r.reason
            assert value(s, "tandem_edge_escalations_total", task="digits") == 2


def test_a_hot_swap_changes_the_model_info(make_policy, tiny_models: Path, digits_x) -> None:
    with EdgeRuntime.from_policy(make_policy(None, log=False)) as rt:
        server = rt.serve_metrics("127.0.0.1:0")
        old = rt.stats()["tasks"]["digits"]["versions"]["edge"]
        rt.infer(digits_x[0])
        before = matching(scrape(server.url), "tandem_edge_model_info", task="digits")
        new = rt.swap_model("digits", tiny_models / "edge-fp32.onnx", version="fp32-v2")
        s = scrape(server.url)
    assert new != old and [dict(k)["version"] for k in before] == [old]
    assert [dict(k)["version"] for k in matching(s, "tandem_edge_model_info")] == [new]
    assert value(s, "tandem_edge_model_swaps_total", task="digits", outcome="done") == 1
    # counts recorded before the swap are kept (one series per task, not per model)
    assert value(s, "tandem_edge_requests_total", task="digits", tier="edge", stage="edge",
                 reason="no-cloud-target") == 1  # fmt: skip


@pytest.mark.integration
def test_escalation_log_rows_over_its_queue_are_counted_dropped(
    make_policy, worker, tmp_path: Path, digits_x
) -> None:
    log = EscalationLog(tmp_path / "esc.sqlite", synchronous="normal", queue_rows=1)
    policy = load_policy(make_policy(worker.endpoint, threshold=1.0, log=False))
    with EdgeRuntime(policy, escalation_log=log, metrics=True) as rt:
        server = rt.serve_metrics("127.0.0.1:0")
        results = rt.infer_batch(digits_x)  # 16 rows queued at once: 1 fits, 15 are dropped
        assert all(r.tier is Tier.CLOUD for r in results)
        log.flush()
        s = scrape(server.url)
    p = "tandem_edge_escalation_log_"
    assert value(s, p + "rows_written_total") == 1
    assert value(s, p + "rows_dropped_total") == 15
    assert value(s, p + "queued_rows") == 0 and value(s, p + "rows_failed_total") == 0


def test_metrics_off_records_nothing_and_the_policy_key_serves_them(
    make_policy, tmp_path: Path, digits_x
) -> None:
    with EdgeRuntime.from_policy(make_policy(None, log=False)) as rt:
        rt.infer(digits_x[0])
        assert rt._metrics is None  # off: nothing on the request path
        registry = rt.metrics_registry  # reading it turns them on, from now
        rt.infer(digits_x[1])
        from prometheus_client import generate_latest

        text = generate_latest(registry).decode()
    assert 'tandem_edge_requests_total{reason="no-cloud-target",stage="edge"' in text
    assert "} 1.0" in text.split("tandem_edge_requests_total{")[1].split("\n")[0]

    path = make_policy(None, log=False)
    data = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**data, "metrics": {"bind": "127.0.0.1:0"}}))
    with EdgeRuntime.from_policy(path) as rt:
        [server] = rt._exporters
        assert get(f"{server.url}/health")[0] == 200
        assert get(f"{server.url}/ready")[0] == 200
        rt.infer(digits_x[0])
        assert value(scrape(server.url), "tandem_edge_escalations_total", task="digits") == 0
    path.write_text(yaml.safe_dump({**data, "metrics": {"bind": "localhost:http"}}))
    with pytest.raises(ConfigError, match=r"policy\.yaml: metrics\.bind: .*HOST:PORT"):
        load_policy(path)


def test_ready_is_false_once_closed(make_policy, digits_x) -> None:
    rt = EdgeRuntime.from_policy(make_policy(None, log=False))
    ok, body = rt.ready()
    assert ok and body["tasks"]["digits"]["ready"] is True
    rt.close()
    assert rt.ready() == (False, {"state": "closed", "tasks": {}})


# ---------------------------------------------------------------------------------- gateway
@pytest.mark.integration
@pytest.mark.slow
def test_gateway_serves_metrics_health_and_ready(tmp_path_factory) -> None:
    gw_tests: Any = pytest.importorskip("tests.edge.test_gateway")  # starlette, uvicorn, openai
    from tandem.edge.gateway import create_app
    from tandem.router.policy import policy_from_dict

    model_dir = gw_tests.tiny_lm(tmp_path_factory.mktemp("tiny-llama"))
    rt = EdgeRuntime(policy_from_dict(gw_tests._policy(model_dir)), metrics=True)
    with rt, gw_tests.running(create_app(rt)) as url:
        req = {"model": "sort", "prompt": gw_tests.PROMPT, "max_tokens": 4}
        bodies = [gw_tests._raw(url, "POST", "/v1/completions", req) for _ in range(2)]
        assert [b[0] for b in bodies] == [200, 200]
        assert gw_tests._raw(url, "GET", "/v1/models/nope")[0] == 404
        assert gw_tests._raw(url, "GET", "/nowhere")[0] == 404
        assert gw_tests._raw(url, "GET", "/health")[0] == 200
        status, _, ready = gw_tests._raw(url, "GET", "/ready")
        s = scrape(url)
        rt.close()
        closed = gw_tests._raw(url, "GET", "/ready")
    assert status == 200 and b'"state":"ready"' in ready
    assert closed[0] == 503 and b"closed" in closed[2]
    http = "tandem_gateway_http_requests_total"
    assert value(s, http, route="/v1/completions", status="200") == 2
    assert value(s, http, route="/v1/models/{model}", status="404") == 1
    assert value(s, http, route="other", status="404") == 1
    assert value(s, http, route="/ready", status="200") == 1
    assert value(s, "tandem_gateway_http_requests_in_flight") == 1  # this scrape
    assert value(s, "tandem_gateway_answers_total", outcome="served") == 2
    assert value(s, "tandem_gateway_generations_active") == 0
    # the runtime's own metrics in the same scrape
    sort = matching(s, "tandem_edge_requests_total", task="sort")
    assert sum(sort.values()) == 2
    tokens = sum(json.loads(b[2])["usage"]["completion_tokens"] for b in bodies)
    assert value(s, "tandem_edge_generated_tokens_total", task="sort", tier="edge") == tokens > 0
    assert value(s, "tandem_edge_time_to_first_token_seconds_count", task="sort") == 2
    assert value(s, "tandem_edge_link_up", endpoint=rt.policy.tasks["down"].cloud.endpoint) == 1
