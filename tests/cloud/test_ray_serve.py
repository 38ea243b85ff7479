"""Tandem on Ray Serve, on a local Ray cluster: the worker's integration checks run against a
real worker process and against the Ray ingress in front of real Serve deployments (same
assertions, one parametrized fixture), then what only the Ray path has: expert shards as
deployments, the ingress's in-flight bound, a replica killed under load, the CLI.

Ray starts once per module (``ray.init(num_cpus=2)``, about 10 s here, and about 10 s more for
the deployments); replicas reserve 0.1 CPU each and run ONNX Runtime on one thread."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
import zmq

from tandem.cloud.process import WorkerProcess
from tandem.reference.models import CLOUD, EDGE, MOE
from tandem.runtime import errors
from tandem.runtime.backends.onnx import OnnxBackend
from tandem.runtime.client import CloudClient
from tandem.runtime.manifest import load_manifest
from tandem.runtime.wire import Envelope, Kind, WireCodec
from tests.conftest import require, worker_config
from tests.peers import raw_exchange, raw_socket

ray = require("ray")
from ray import serve  # noqa: E402

from tandem.cloud.ray_config import RayServeConfig, load_ray_config  # noqa: E402
from tandem.cloud.ray_ingress import RayIngress  # noqa: E402
from tandem.cloud.ray_serve import deploy, start_ray, undeploy  # noqa: E402

# Ray and replica start-up under a loaded machine: minutes, not the default 120 s
pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SMALL = {"num_cpus": 0.1}  # a replica's CPU reservation: many fit on the 2 test CPUs


def ray_config(models_dir: Path, deployments: list[dict[str, Any]], **overrides) -> RayServeConfig:
    base = {
        "models_dir": str(models_dir),
        "threads": 1,
        "deployments": deployments,
        "ingress": {"bind": "tcp://127.0.0.1:*"},
    }
    return RayServeConfig.model_validate({**base, **overrides})


class IngressThread:
    """A :class:`RayIngress` serving in a thread of the test process (the Ray driver)."""

    def __init__(self, config: RayServeConfig, routes: dict[str, Any]) -> None:
        self.ingress = RayIngress(config, routes, context=zmq.Context())
        self.endpoint = ""
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="test-ingress", daemon=True)

    def _serve(self) -> None:
        def ready(endpoint: str) -> None:
            self.endpoint = endpoint
            self._ready.set()

        self.ingress.serve(ready)

    def __enter__(self) -> IngressThread:
        self._thread.start()
        assert self._ready.wait(10), "ingress thread did not start"
        return self

    def __exit__(self, *exc: Any) -> None:
        self.ingress.stop()
        self._thread.join(15)
        assert not self._thread.is_alive(), "ingress thread did not stop"


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def ray_models(ray_cluster, tiny_models: Path) -> Iterator[tuple[RayServeConfig, dict]]:
    """The tiny models as deployments: digits-cloud on two replicas (the kill test), the
    edge model autoscaled between one and two, the MoE model whole."""
    cfg = ray_config(
        tiny_models,
        [
            {"model": EDGE, "autoscaling": {"min_replicas": 1, "max_replicas": 2}, **SMALL},
            {"model": CLOUD, "num_replicas": 2, "max_ongoing_requests": 16, **SMALL},
            {"model": MOE, **SMALL},
        ],
    )
    start_ray(cfg)
    routes = deploy(cfg)
    try:
        yield cfg, routes
    finally:
        undeploy(cfg)


@dataclass
class Server:
    kind: str  # "worker" or "ray"
    endpoint: str
    ingress: RayIngress | None = None


@pytest.fixture(scope="module", params=["worker", "ray"])
def server(request, tiny_models: Path) -> Iterator[Server]:
    """The same models behind a worker process, or behind the Ray ingress."""
    if request.param == "worker":
        with WorkerProcess(worker_config(tiny_models, models=[EDGE, CLOUD, MOE])) as w:
            yield Server("worker", w.endpoint or "")
    else:
        cfg, routes = request.getfixturevalue("ray_models")
        with IngressThread(cfg, routes) as t:
            yield Server("ray", t.endpoint, t.ingress)


@pytest.fixture
def make_server(request, tiny_models: Path):
    """``make_server(kind, **overrides)``: a context manager serving the tiny models with
    config overrides (the worker's keys; for Ray the ingress's)."""

    def make(kind: str, **overrides):
        if kind == "worker":
            return WorkerProcess(worker_config(tiny_models, **overrides))
        cfg, routes = request.getfixturevalue("ray_models")
        return IngressThread(
            RayServeConfig.model_validate({**cfg.model_dump(), **overrides}), routes
        )

    return make


@pytest.fixture
def client(server: Server) -> Iterator[CloudClient]:
    with CloudClient(server.endpoint) as c:
        yield c


# ---------------------------------------------------------------------- the worker's checks
def test_infer_matches_the_model_run_locally(client, tiny_models: Path, digits_x) -> None:
    reply = client.infer(CLOUD, digits_x, timeout_s=10)
    local = OnnxBackend(tiny_models / "cloud-fp32.onnx").predict(digits_x)
    np.testing.assert_allclose(reply["outputs"], local, rtol=1e-5, atol=1e-6)
    assert reply["version"] == load_manifest(tiny_models).get(CLOUD).version


def test_moe_model_answers_as_run_locally(client, tiny_models: Path, digits_x) -> None:
    import torch

    from tandem.runtime.moe import MoEClassifier

    reply = client.infer(MOE, digits_x, timeout_s=20)
    with torch.no_grad():
        local = MoEClassifier.load(tiny_models / "moe.npz")(torch.from_numpy(digits_x)).numpy()
    np.testing.assert_allclose(reply["outputs"], local, rtol=1e-5, atol=1e-5)


def test_health_reports_models_versions_and_queue(client) -> None:
    h = client.health()
    assert h["state"] == "serving"
    assert set(h["models"]) == {EDGE, CLOUD, MOE}
    assert h["models"][CLOUD]["input"]["shape"] == [None, 64]
    assert h["queue_depth"] == 0


def test_echo_large_array_round_trip(client) -> None:
    x = np.random.default_rng(0).normal(size=(512, 512)).astype(np.float32)  # 1 MiB: own frame
    np.testing.assert_array_equal(client.echo({"x": x})["x"], x)


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        ({"model": "nope", "inputs": np.zeros((1, 64), np.float32)}, errors.UnknownModel),
        ({"model": CLOUD, "inputs": np.zeros((1, 63), np.float32)}, errors.BadRequest),
        ({"model": CLOUD, "inputs": np.zeros((1025, 64), np.float32)}, errors.BadRequest),
        ({"model": CLOUD, "inputs": np.full((1, 64), np.nan, np.float32)}, errors.BadRequest),
        ({"model": CLOUD}, errors.BadRequest),
        ([1, 2, 3], errors.BadRequest),
    ],
)
def test_bad_requests_get_typed_errors(client, payload, error) -> None:
    with pytest.raises(error):
        client.request(Envelope(kind=Kind.INFER, payload=payload), timeout_s=10)


def test_expired_deadline_is_not_run(client) -> None:
    env = Envelope(
        kind=Kind.INFER,
        deadline=time.monotonic() - 0.01,  # no budget left on arrival
        payload={"model": CLOUD, "inputs": np.zeros((1, 64), np.float32)},
    )
    with pytest.raises(errors.DeadlineExceeded):
        client.request(env, timeout_s=5)


@pytest.mark.parametrize(
    ("frames", "code"),
    [
        ([os.urandom(64)], "wire.malformed"),
        ([b"\xff\xfe\x00", b"x"], "wire.malformed"),
    ],
)
def test_malformed_frames_get_typed_errors_and_server_keeps_serving(server, frames, code):
    reply = raw_exchange(server.endpoint, frames)
    assert reply.kind is Kind.ERROR and reply.payload["code"] == code
    with CloudClient(server.endpoint) as c:
        assert c.health()["state"] == "serving"


def test_req_socket_peers_are_answered_too(server) -> None:
    env = Envelope(kind=Kind.ECHO, payload="hi")
    reply = raw_exchange(server.endpoint, [bytes(f) for f in WireCodec().encode(env)], zmq.REQ)
    assert reply.id == env.id and reply.payload == "hi"


def test_a_retried_request_id_is_answered_once_per_try_with_one_result(server, digits_x):
    """The same request sent three times (a client failing over, a reconnect): each try is
    answered, all with the one result; a different request under that id is refused."""
    codec = WireCodec()
    env = Envelope(kind=Kind.INFER, payload={"model": CLOUD, "inputs": digits_x[:4]})
    s = raw_socket(server.endpoint)
    try:
        for _ in range(3):
            s.send_multipart(codec.encode(env), copy=False)
        replies = []
        for _ in range(3):
            assert s.poll(10_000)
            replies.append(codec.decode(s.recv_multipart()))
        assert not s.poll(300)  # and nothing more
        assert {r.id for r in replies} == {env.id} and all(r.kind is Kind.RESULT for r in replies)
        for r in replies[1:]:
            np.testing.assert_array_equal(r.payload["outputs"], replies[0].payload["outputs"])
        other = Envelope(kind=Kind.INFER, id=env.id, payload={"model": CLOUD, "inputs": digits_x})
        s.send_multipart(codec.encode(other), copy=False)
        assert s.poll(10_000)
        assert codec.decode(s.recv_multipart()).payload["code"] == "bad_request"
    finally:
        s.close()
    with CloudClient(server.endpoint) as c:
        counters = c.health()["counters"]
    assert counters.get("replayed", 0) + counters.get("joined", 0) >= 2


@pytest.mark.parametrize("kind", ["worker", "ray"])
def test_frame_over_maxmsgsize_drops_only_that_peer(make_server, kind) -> None:
    with make_server(kind, limits={"max_message_bytes": 4096}) as w:
        s = raw_socket(w.endpoint)
        s.send_multipart([b"x" * 10_000, b"y"])
        assert not s.poll(300)  # ZeroMQ cut the connection; nothing to answer
        s.close()
        # frames each under the limit but together over it: a typed reply, by request id
        env = Envelope(kind=Kind.ECHO, payload=b"h" * 3000)
        frames = [bytes(f) for f in WireCodec().encode(env)]
        reply = raw_exchange(w.endpoint, [*frames, b"p" * 3000])
        assert reply.payload["code"] == "wire.limit" and reply.id == env.id
        with CloudClient(w.endpoint) as c:
            assert c.health()["state"] == "serving"


def test_an_edge_runtime_escalates_to_it_unchanged(server, make_policy, digits_x) -> None:
    from tandem.edge import EdgeRuntime, Tier

    with EdgeRuntime.from_policy(make_policy(server.endpoint, threshold=1.0, log=False)) as rt:
        results = [rt.infer(x) for x in digits_x[:8]]
    assert all(r.tier is Tier.CLOUD for r in results)


# ---------------------------------------------------------------------- the Ray path only
@pytest.mark.slow  # two more deployments, each importing torch: 20-60 s
def test_expert_shards_as_deployments_answer_as_the_whole_model(
    ray_models, tiny_models: Path
) -> None:
    """Two deployments, each one half of the MoE's experts: one ``experts`` request over all
    of them is split by the ingress and joined again in order, as the whole model answers."""
    from tandem.runtime.backends.moe_classifier import MoEBackend

    cfg = ray_config(
        tiny_models,
        [
            {"model": MOE, "experts": [0, 1, 2, 3], **SMALL},
            {"model": MOE, "experts": [4, 5, 6, 7], **SMALL},
        ],
    )
    routes = deploy(cfg)
    try:
        rng = np.random.default_rng(1)
        experts, counts = [6, 0, 3, 5], [2, 3, 1, 4]
        rows = rng.normal(size=(sum(counts), 128)).astype(np.float32)
        whole = MoEBackend(tiny_models / "moe.npz")
        with IngressThread(cfg, routes) as t, CloudClient(t.endpoint) as c:
            env = Envelope(
                kind=Kind.EXPERTS,
                payload={"model": MOE, "experts": experts, "counts": counts, "rows": rows},
            )
            got = c.request(env, timeout_s=20).payload["rows"]
            h = c.health()
            with pytest.raises(errors.BadRequest, match="expert shards"):
                c.infer(MOE, rows[:, :64], timeout_s=10)
        want = whole.run_experts(experts, counts, rows)  # fp32: summation order differs
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        assert h["models"][MOE]["shards"] == {
            f"{MOE}-shard0": [0, 1, 2, 3],
            f"{MOE}-shard1": [4, 5, 6, 7],
        }
    finally:
        undeploy(cfg)


def test_over_max_inflight_is_overloaded_with_a_hint_and_all_are_answered(
    make_server, digits_x
) -> None:
    codec = WireCodec()
    with make_server("ray", ingress={"bind": "tcp://127.0.0.1:*", "max_inflight": 1}) as t:
        s = raw_socket(t.endpoint)
        envs = [
            Envelope(kind=Kind.INFER, payload={"model": CLOUD, "inputs": digits_x})
            for _ in range(20)
        ]
        for e in envs:
            s.send_multipart(codec.encode(e), copy=False)
        replies = {}
        while len(replies) < len(envs):
            assert s.poll(10_000)
            r = codec.decode(s.recv_multipart())
            assert r.id not in replies
            replies[r.id] = r
        s.close()
    kinds = Counter(r.payload["code"] if r.kind is Kind.ERROR else "ok" for r in replies.values())
    assert kinds["ok"] >= 1 and kinds["overloaded"] >= 1 and set(kinds) == {"ok", "overloaded"}
    assert all(r.payload["retry_after_ms"] > 0 for r in replies.values() if r.kind is Kind.ERROR)


def test_generation_is_refused_with_where_to_go(client, server) -> None:
    if server.kind != "ray":
        pytest.skip("a worker serves generate")
    with pytest.raises(errors.BadRequest, match="openai backend"):
        client.request(Envelope(kind=Kind.GENERATE, payload={"model": CLOUD}), timeout_s=5)


def _replicas(app: str) -> set[str]:
    return {
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(f"SERVE_REPLICA::{app}#")
    }


@pytest.mark.slow
def test_killing_one_of_two_replicas_under_load_every_request_is_answered(
    ray_models, digits_x
) -> None:
    """Four client threads send continuously; one of digits-cloud's two replica actors is
    killed (``ray.kill``, no restart by Ray: Serve replaces it). Every request gets its result:
    the ingress sends the ones that died with the replica again, inside their deadline."""
    cfg, routes = ray_models
    before = _replicas(CLOUD)
    assert len(before) == 2
    n_threads, per_thread = 4, 150
    outcomes: Counter[str] = Counter()
    ids: Counter[bytes] = Counter()
    lock = threading.Lock()
    with IngressThread(cfg, routes) as t:
        started = threading.Barrier(n_threads + 1)

        def send(k: int) -> None:
            with CloudClient(t.endpoint) as c:
                started.wait()
                for j in range(per_thread):
                    env = Envelope(
                        kind=Kind.INFER,
                        deadline=time.monotonic() + 10.0,
                        payload={"model": CLOUD, "inputs": digits_x[j % 16 : j % 16 + 1]},
                    )
                    try:
                        r = c.request(env, timeout_s=10.0)
                        outcome = "ok" if r.payload["outputs"].shape == (1, 10) else "wrong"
                    except errors.TandemError as e:
                        outcome = type(e).__name__
                    with lock:
                        outcomes[outcome] += 1
                        ids[env.id] += 1

        threads = [threading.Thread(target=send, args=(k,)) for k in range(n_threads)]
        for th in threads:
            th.start()
        started.wait()
        time.sleep(1.0)
        # a burst of big requests first, so that the victim surely dies with work in hand
        codec, burst = WireCodec(), raw_socket(t.endpoint)
        big = np.random.default_rng(2).uniform(0, 1, (1024, 64)).astype(np.float32)
        sent = [
            Envelope(
                kind=Kind.INFER,
                deadline=time.monotonic() + 30.0,
                payload={"model": CLOUD, "inputs": big},
            )
            for _ in range(64)
        ]
        for e in sent:
            burst.send_multipart(codec.encode(e), copy=False)
        burst_replies = {}
        assert burst.poll(30_000)  # the replicas are at work: each holds up to 16 of them
        r = codec.decode(burst.recv_multipart())
        burst_replies[r.id] = r.kind
        victim = sorted(before)[0]
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        killed_at = time.monotonic()
        while len(burst_replies) < len(sent) and burst.poll(30_000):
            r = codec.decode(burst.recv_multipart())
            burst_replies[r.id] = r.kind
        burst.close()
        for th in threads:
            th.join(120)
        counters = t.ingress.counters.copy()
        deadline = time.monotonic() + 60
        while True:  # Serve starts a replacement
            after = _replicas(CLOUD)
            if len(after) == 2 and victim not in after:
                break
            assert time.monotonic() < deadline, f"no replacement replica: {after}"
            time.sleep(0.5)
        with CloudClient(t.endpoint) as c:
            assert c.infer(CLOUD, digits_x, timeout_s=10)["outputs"].shape == (16, 10)
    total = n_threads * per_thread
    print(
        f"\nreplica kill: {total} sent, {outcomes['ok']} answered, "
        f"burst {len(sent)} sent, {sum(k is Kind.RESULT for k in burst_replies.values())} "
        "answered; "
        f"{total - outcomes['ok']} failed ({dict(outcomes)}); the ingress sent "
        f"{counters['replica_retries']} again after {counters['replica_lost']} losses; "
        f"replacement up {time.monotonic() - killed_at:.1f} s after the kill"
    )
    assert outcomes == {"ok": total}
    assert len(ids) == total and max(ids.values()) == 1
    assert burst_replies == {e.id: Kind.RESULT for e in sent}
    assert counters["replica_lost"] >= 1  # the kill did catch requests in flight


@pytest.mark.slow
def test_cli_serves_a_config_on_an_existing_cluster_and_exits_zero(
    ray_models, tiny_models: Path, tmp_path: Path
) -> None:
    """``tandem cloud ray-serve --config`` as its own process, joining the test's Ray cluster
    (``ray_address``), deploying under its own names, answering, draining on SIGTERM."""
    address = ray.get_runtime_context().gcs_address
    cfg = {
        "ray_address": address,
        "models_dir": str(tiny_models),
        "threads": 1,
        "deployments": [{"model": EDGE, "name": "cli-edge", **SMALL}],
        "ingress": {"bind": "tcp://127.0.0.1:*"},
    }
    path = tmp_path / "ray.yaml"
    path.write_text(yaml.safe_dump(cfg))
    ready = tmp_path / "ready"
    cmd = [sys.executable, "-m", "tandem.cli", "cloud", "ray-serve", "--config", str(path)]
    proc = subprocess.Popen([*cmd, "--ready-file", str(ready), "--quiet"])
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert proc.poll() is None, f"ray-serve exited with {proc.returncode}"
            assert time.monotonic() < deadline, "ray-serve not ready"
            time.sleep(0.1)
        with CloudClient(ready.read_text().strip()) as c:
            assert c.infer(EDGE, np.zeros((2, 64), np.float32), timeout_s=20)["model"] == EDGE
            assert set(c.health()["models"]) == {EDGE}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert "cli-edge" not in serve.status().applications  # its deployment was deleted
    finally:
        if proc.poll() is None:
            proc.kill()


# ---------------------------------------------------------------------- the config
def test_config_errors_name_the_key(tmp_path: Path) -> None:
    p = tmp_path / "ray.yaml"
    p.write_text(
        "models_dir: m\ndeployments:\n"
        "  - {model: a, autoscaling: {min_replicas: 3, max_replicas: 2}}\n"
    )
    with pytest.raises(errors.ConfigError, match=r"ray.yaml: deployments.0.autoscaling: "):
        load_ray_config(p)
    p.write_text("models_dir: m\ndeployments: [{model: a, num_replica: 2}]\n")
    with pytest.raises(errors.ConfigError, match=r"did you mean 'num_replicas'"):
        load_ray_config(p)
    p.write_text("models_dir: m\ndeployments: [{model: a}, {model: a, experts: [1]}]\n")
    with pytest.raises(errors.ConfigError, match="expert shards"):
        load_ray_config(p)


def test_example_config_validates() -> None:
    cfg = load_ray_config(EXAMPLES / "ray" / "ray.yaml")
    assert cfg.models_dir.resolve() == EXAMPLES / "models"
    assert {d.model for d in cfg.deployments} == {EDGE, CLOUD, MOE}
