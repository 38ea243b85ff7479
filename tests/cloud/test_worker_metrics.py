"""The worker's /metrics, /health and /ready over real HTTP, from real worker processes with an
``http`` section, after real traffic: the counters and histograms say what was sent.

The language model here is served by an OpenAI-compatible HTTP server in this process
(:class:`SlowCompletionsServer`, the streaming ``/v1/completions`` protocol, tokens with
log-probs): the worker's ``openai`` backend warms up on it while loading, so the test holds
the worker in its loading state for as long as it likes and sees /ready answer 503
``loading`` meanwhile, and it streams an exact number of tokens per request."""

from __future__ import annotations

import http.server
import json
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq
from prometheus_client.parser import text_string_to_metric_families

from tandem.bench.ports import free_ports
from tandem.cloud.config import WorkerConfig, load_worker_config, with_http
from tandem.cloud.process import WorkerProcess
from tandem.cloud.worker import CloudWorker
from tandem.reference.models import CLOUD, EDGE
from tandem.runtime import errors
from tandem.runtime.client import CloudClient
from tandem.runtime.generation import SamplingParams
from tandem.runtime.manifest import Manifest, ModelEntry, load_manifest, write_manifest
from tests.conftest import worker_config

pytestmark = pytest.mark.integration

LM = "remote-lm"


# --- helpers ---------------------------------------------------------------------------------


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def get_json(url: str) -> tuple[int, Any]:
    status, body = get(url)
    return status, json.loads(body)


def scrape(base: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics: (sample name, sorted labels) → value."""
    status, body = get(base + "/metrics")
    assert status == 200
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def sample(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def wait_for(check: Any, timeout_s: float = 60.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            got = check()
        except OSError:  # not listening yet
            got = None
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def http_config(base: WorkerConfig) -> tuple[WorkerConfig, str]:
    (port,) = free_ports(1)
    return with_http(base, f"127.0.0.1:{port}"), f"http://127.0.0.1:{port}"


class SlowCompletionsServer:
    """An OpenAI-compatible completions server whose answers wait for ``gate``: streams
    ``max_tokens`` one-character tokens (``a``), each with a log-prob, then the usage."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        gate = self.gate

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                gate.wait(120)
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Connection", "close")
                self.end_headers()
                n = int(body.get("max_tokens") or 16)
                for i in range(n):
                    choice = {
                        "index": 0,
                        "text": "a",
                        "logprobs": {
                            "tokens": ["a"],
                            "token_logprobs": [-0.5],
                            "top_logprobs": None,
                            "text_offset": [i],
                        },
                        "finish_reason": "length" if i == n - 1 else None,
                    }
                    self._event({"choices": [choice]})
                usage = {"prompt_tokens": 3, "completion_tokens": n, "total_tokens": n + 3}
                self._event({"choices": [], "usage": usage})
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
                self.close_connection = True

            def _event(self, data: dict[str, Any]) -> None:
                chunk = {"id": "c", "object": "text_completion", "created": 0, "model": "m"}
                self.wfile.write(b"data: " + json.dumps({**chunk, **data}).encode() + b"\n\n")
                self.wfile.flush()

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.gate.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def completions() -> Iterator[SlowCompletionsServer]:
    s = SlowCompletionsServer()
    yield s
    s.close()


@pytest.fixture
def lm_models(tmp_path: Path, completions: SlowCompletionsServer, tiny_models: Path) -> Path:
    """A models directory with the completions server (``remote-lm``) and the digits CNN."""
    out = tmp_path / "models"
    out.mkdir()
    cloud = load_manifest(tiny_models).get(CLOUD)
    (out / str(cloud.file)).write_bytes((tiny_models / str(cloud.file)).read_bytes())
    lm = ModelEntry(name=LM, version="r-1", format="openai", url=completions.url, model="m")
    write_manifest(out, Manifest(models=[lm, cloud]))
    return out


def lm_worker_config(models_dir: Path, **overrides: Any) -> WorkerConfig:
    base = {"bind": "tcp://127.0.0.1:*", "models_dir": str(models_dir), "threads": 1}
    return WorkerConfig.model_validate({**base, **overrides})


# --- config ----------------------------------------------------------------------------------


def test_http_section_is_validated(tmp_path: Path) -> None:
    path = tmp_path / "worker.yaml"
    path.write_text("http: {bind: 'nowhere'}\n")
    with pytest.raises(errors.ConfigError, match=r"worker\.yaml.*http\.bind.*HOST:PORT"):
        load_worker_config(path)
    path.write_text("http: {bind: '127.0.0.1:9100'}\n")
    assert load_worker_config(path).http.bind == "127.0.0.1:9100"  # type: ignore[union-attr]
    assert WorkerConfig().http is None  # default: no server, no metrics
    with pytest.raises(errors.ConfigError, match="http bind"):
        with_http(WorkerConfig(), "9100")


def test_metrics_off_means_no_metric_objects(make_worker_config: Any) -> None:
    w = CloudWorker(make_worker_config(models=[CLOUD]))
    assert w.metrics is None and w.ops is None and w.requests.metrics is None
    assert w.readiness() == (
        False,
        {
            "state": "starting",
            "models": {
                CLOUD: {"ready": True, "version": w.backends[CLOUD].version, "kind": "array"}
            },
        },
    )


# --- readiness -------------------------------------------------------------------------------


@pytest.mark.slow
def test_ready_is_503_while_loading_then_200_then_503_draining(
    lm_models: Path, completions: SlowCompletionsServer
) -> None:
    cfg, base = http_config(lm_worker_config(lm_models, drain={"grace_ms": 3000}))
    w = WorkerProcess(cfg)
    started: list[BaseException | None] = []

    def start() -> None:
        try:
            w.start()
            started.append(None)
        except BaseException as e:
            started.append(e)

    t = threading.Thread(target=start)
    t.start()
    try:
        # the model's warm-up waits on the gate: the worker is loading
        status, body = wait_for(lambda: get_json(base + "/health"), what="/health")
        assert (status, body) == (200, {"status": "ok"})
        assert get_json(base + "/ready") == (503, {"state": "loading", "models": {}})
        assert not started  # no ready file: still loading
        samples = scrape(base)  # the process metrics only, until the models are in
        assert ("process_cpu_seconds_total", ()) in samples
        assert ("tandem_worker_ready", ()) not in samples

        completions.gate.set()
        t.join(60)
        assert started == [None]
        status, body = get_json(base + "/ready")
        assert status == 200
        assert body == {
            "state": "serving",
            "models": {
                LM: {"ready": True, "version": "r-1", "kind": "generation"},
                CLOUD: {
                    "ready": True,
                    "version": body["models"][CLOUD]["version"],
                    "kind": "array",
                },
            },
        }
        samples = scrape(base)
        assert sample(samples, "tandem_worker_ready") == 1
        assert sample(samples, "tandem_worker_model_ready", model=LM) == 1
        assert (
            sample(samples, "tandem_worker_model_info", model=LM, version="r-1", kind="generation")
            == 1
        )

        w.signal(signal.SIGTERM)  # drains for grace_ms: not ready, still live
        wait_for(
            lambda: get_json(base + "/ready") == (503, {**body, "state": "draining"}),
            10,
            "draining",
        )
        assert get(base + "/health")[0] == 200
        assert w.stop() == 0
    finally:
        completions.gate.set()
        t.join(60)
        w.kill()
        w._tmp.cleanup()


# --- metrics after traffic -------------------------------------------------------------------


@pytest.fixture(scope="module")
def metrics_worker(tiny_models: Path) -> Iterator[tuple[WorkerProcess, str]]:
    cfg, base = http_config(worker_config(tiny_models, models=[EDGE, CLOUD]))
    with WorkerProcess(cfg) as w:
        yield w, base


def test_infer_traffic_is_counted(metrics_worker: tuple[WorkerProcess, str]) -> None:
    w, base = metrics_worker
    before = scrape(base)
    rng = np.random.default_rng(0)
    n, rows = 23, 0
    with CloudClient(w.endpoint) as c:
        for i in range(n):
            x = rng.uniform(0, 1, size=(1 + i % 3, 64)).astype(np.float32)
            rows += len(x)
            c.infer(CLOUD, x, timeout_s=10)
        with pytest.raises(errors.UnknownModel):
            c.infer("no-such-model", np.zeros((1, 64), np.float32), timeout_s=10)
        with pytest.raises(errors.BadRequest):
            c.infer(CLOUD, np.zeros((1, 63), np.float32), timeout_s=10)
        c.health()
    after = scrape(base)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    ok = dict(model=CLOUD, kind="infer", outcome="ok")
    assert delta("tandem_worker_requests_total", **ok) == n
    assert (
        delta("tandem_worker_requests_total", model="", kind="infer", outcome="unknown_model") == 1
    )
    assert (
        delta("tandem_worker_requests_total", model=CLOUD, kind="infer", outcome="bad_request") == 1
    )
    # a request waits in the queue once; rows: every row of every batch
    assert delta("tandem_worker_queue_seconds_count", model=CLOUD) == n
    assert delta("tandem_worker_batch_rows_sum", model=CLOUD) == rows
    batches = delta("tandem_worker_events_total", event="batches")
    assert 1 <= batches <= n
    assert delta("tandem_worker_batch_rows_count", model=CLOUD) == batches
    assert delta("tandem_worker_compute_seconds_count", model=CLOUD) == batches
    assert delta("tandem_worker_compute_seconds_sum", model=CLOUD) > 0
    inf = sample(after, "tandem_worker_queue_seconds_bucket", model=CLOUD, le="+Inf")
    assert inf == sample(after, "tandem_worker_queue_seconds_count", model=CLOUD)
    # the health counters, as they are
    assert delta("tandem_worker_events_total", event="infer") == n + 2
    assert delta("tandem_worker_events_total", event="health") == 1
    assert delta("tandem_worker_events_total", event="rows") == rows
    # idle now: nothing queued
    assert sample(after, "tandem_worker_queue_requests", model=CLOUD) == 0
    assert sample(after, "tandem_worker_queue_bytes", model=CLOUD) == 0
    for model in (EDGE, CLOUD):
        assert sample(after, "tandem_worker_model_ready", model=model) == 1


def test_wire_errors_and_retries_are_events(metrics_worker: tuple[WorkerProcess, str]) -> None:
    w, base = metrics_worker
    before = scrape(base)
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(w.endpoint)
    try:
        for _ in range(3):
            s.send_multipart([b"\x00\x01garbage"])
            assert s.poll(5000)
            s.recv_multipart()
    finally:
        s.close()
    x = np.zeros((2, 64), np.float32)
    rid = bytes(range(16))
    with CloudClient(w.endpoint) as c:
        c.infer(CLOUD, x, timeout_s=10, request_id=rid)
        c.infer(CLOUD, x, timeout_s=10, request_id=rid)  # answered from the reply cache
    after = scrape(base)
    key = ("tandem_worker_events_total", (("event", "wire_errors"),))
    assert after[key] - before.get(key, 0) == 3
    key = ("tandem_worker_events_total", (("event", "replayed"),))
    assert after[key] - before.get(key, 0) == 1
    ok = ("tandem_worker_requests_total", (("kind", "infer"), ("model", CLOUD), ("outcome", "ok")))
    assert after[ok] - before[ok] == 1  # the replay ran nothing


@pytest.mark.slow
def test_generation_traffic_is_counted(lm_models: Path, completions: SlowCompletionsServer) -> None:
    completions.gate.set()
    cfg, base = http_config(lm_worker_config(lm_models))
    lengths = [5, 9, 1, 12]
    with WorkerProcess(cfg) as w, CloudClient(w.endpoint) as c:
        for n in lengths:
            with c.generate(LM, "hi", SamplingParams(max_tokens=n), timeout_s=30) as call:
                assert "".join(ch.text for ch in call) == "a" * n
        with pytest.raises(errors.BadRequest):  # not a language model
            list(c.generate(CLOUD, "hi", timeout_s=30))
        # the end goes out before the stream leaves the table; wait until it has
        wait_for(lambda: c.health()["streams"]["active"] == 0, 10, "streams to end")
        samples = scrape(base)
    ok = sample(samples, "tandem_worker_requests_total", model=LM, kind="generate", outcome="ok")
    assert ok == len(lengths)
    bad = dict(model=CLOUD, kind="generate", outcome="bad_request")
    assert sample(samples, "tandem_worker_requests_total", **bad) == 1
    assert sample(samples, "tandem_worker_generation_tokens_total", model=LM) == sum(lengths)
    assert sample(samples, "tandem_worker_prompt_tokens_total", model=LM) == 3 * len(lengths)
    assert sample(samples, "tandem_worker_time_to_first_token_seconds_count", model=LM) == len(
        lengths
    )
    assert sample(samples, "tandem_worker_time_to_first_token_seconds_sum", model=LM) > 0
    gaps = sum(n - 1 for n in lengths)
    assert sample(samples, "tandem_worker_inter_token_latency_seconds_count", model=LM) == gaps
    assert sample(samples, "tandem_worker_streams_started_total") == len(lengths)
    assert sample(samples, "tandem_worker_streams_ended_total", reason="completed") == len(lengths)
    assert sample(samples, "tandem_worker_streams_ended_total", reason="cancelled") == 0
    assert sample(samples, "tandem_worker_streams_active") == 0
    assert sample(samples, "tandem_worker_speculative_sessions") == 0
    assert sample(samples, "tandem_worker_speculative_draft_tokens_total") == 0


@pytest.mark.slow
def test_cli_http_flag_overrides_the_config(tiny_models: Path, tmp_path: Path) -> None:
    """``tandem cloud serve --http`` starts the ops server on the given port."""
    import subprocess
    import sys

    import yaml

    (port,) = free_ports(1)
    cfg = tmp_path / "worker.yaml"
    cfg.write_text(
        yaml.safe_dump(worker_config(tiny_models, models=[CLOUD]).model_dump(mode="json"))
    )
    ready = tmp_path / "ready"
    cmd = [sys.executable, "-m", "tandem.cli", "cloud", "serve", "--config", str(cfg)]
    cmd += ["--ready-file", str(ready), "--quiet", "--http", f"127.0.0.1:{port}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    try:
        wait_for(ready.exists, 60, "the worker")
        status, body = get_json(f"http://127.0.0.1:{port}/ready")
        assert status == 200 and body["state"] == "serving" and list(body["models"]) == [CLOUD]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


# --- liveness: a stalled loop ----------------------------------------------------------------

# A worker process whose CLOUD model's ``run`` does not return until a line comes on stdin: a
# backend call that hangs (a stuck GPU, a deadlocked library) holds the loop as a real one would.
_STALLING_WORKER = """
import sys, threading
from tandem.cloud.config import load_worker_config
from tandem.cloud.loading import load_backends
from tandem.cloud.worker import CloudWorker

cfg = load_worker_config(sys.argv[1])
backends = load_backends(cfg)
backend = backends[sys.argv[2]]
release = threading.Event()
threading.Thread(target=lambda: (sys.stdin.readline(), release.set()), daemon=True).start()
real_run = backend.run

def run(batch):
    release.wait()
    return real_run(batch)

backend.run = run
CloudWorker(cfg, backends).serve(lambda endpoint: print(endpoint, flush=True))
"""


@pytest.mark.slow
def test_health_is_503_while_the_loop_is_stalled(tiny_models: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    import yaml

    cfg, base = http_config(worker_config(tiny_models, models=[CLOUD]))
    assert cfg.http is not None
    cfg = cfg.model_copy(update={"http": cfg.http.model_copy(update={"stall_s": 0.5})})
    path = tmp_path / "worker.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    cmd = [sys.executable, "-c", _STALLING_WORKER, str(path), CLOUD]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        endpoint = proc.stdout.readline().decode().strip()
        assert endpoint.startswith("tcp://")
        # idle, the loop turns every 50 ms: live and ready however long nothing comes
        time.sleep(1.0)
        assert get_json(base + "/health") == (200, {"status": "ok"})
        assert get_json(base + "/ready")[0] == 200
        assert sample(scrape(base), "tandem_worker_loop_idle_seconds") < 0.5
        with CloudClient(endpoint) as c:
            call = threading.Thread(
                target=lambda: c.infer(CLOUD, np.zeros((1, 64), np.float32), timeout_s=60)
            )
            call.start()
            status, body = wait_for(
                lambda: (r := get_json(base + "/health"))[0] == 503 and r, 30, "/health 503"
            )
            assert body["status"] == "stalled" and body["loop_idle_s"] > 0.5
            status, ready = get_json(base + "/ready")
            assert status == 503 and ready["stalled"] is True and ready["state"] == "serving"
            samples = scrape(base)
            assert sample(samples, "tandem_worker_ready") == 0
            assert sample(samples, "tandem_worker_loop_idle_seconds") > 0.5
            proc.stdin.write(b"go\n")  # the backend returns: the loop turns again
            proc.stdin.flush()
            call.join(60)
            wait_for(lambda: get_json(base + "/health")[0] == 200, 30, "/health 200 again")
            assert get_json(base + "/ready")[0] == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        finally:
            proc.kill()


def test_stall_s_is_validated(tmp_path: Path) -> None:
    path = tmp_path / "worker.yaml"
    path.write_text("http: {bind: '127.0.0.1:9100', stall_s: 0}\n")
    with pytest.raises(errors.ConfigError, match=r"worker\.yaml.*http\.stall_s"):
        load_worker_config(path)
    assert WorkerConfig.model_validate({"http": {}}).http.stall_s == 60.0  # type: ignore[union-attr]
