"""Integration tests: a real worker process on a loopback port, real ZeroMQ sockets."""

from __future__ import annotations

import os
import signal
import struct
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch
import zmq

from tandem.cloud.process import WorkerProcess
from tandem.reference.models import CLOUD, MOE
from tandem.runtime import errors
from tandem.runtime.backends.onnx import OnnxBackend
from tandem.runtime.client import CloudClient
from tandem.runtime.manifest import load_manifest
from tandem.runtime.wire import Envelope, Kind, WireCodec
from tests.peers import raw_exchange, raw_socket

pytestmark = pytest.mark.integration


@pytest.fixture
def client(worker: WorkerProcess):
    with CloudClient(worker.endpoint) as c:
        yield c


def test_infer_matches_the_model_run_locally(
    client: CloudClient, tiny_models: Path, digits_x
) -> None:
    reply = client.infer(CLOUD, digits_x, timeout_s=10)
    local = OnnxBackend(tiny_models / "cloud-fp32.onnx").predict(digits_x)
    np.testing.assert_allclose(reply["outputs"], local, rtol=1e-5, atol=1e-6)
    assert reply["version"] == load_manifest(tiny_models).get(CLOUD).version


def test_moe_model_is_served_on_the_moe_kernels(
    client: CloudClient, tiny_models: Path, digits_x
) -> None:
    from tandem.runtime.moe import MoEClassifier

    reply = client.infer(MOE, digits_x, timeout_s=10)
    with torch.no_grad():
        local = MoEClassifier.load(tiny_models / "moe.npz")(torch.from_numpy(digits_x)).numpy()
    np.testing.assert_allclose(reply["outputs"], local, rtol=1e-5, atol=1e-5)


def test_health_reports_models_versions_and_queue(client: CloudClient) -> None:
    h = client.health()
    assert h["state"] == "serving"
    assert set(h["models"]) == {"digits-edge", CLOUD, MOE}
    assert h["models"][CLOUD]["input"]["shape"] == [None, 64]
    assert h["queue_depth"] == 0


def test_echo_large_array_round_trip(client: CloudClient) -> None:
    x = np.random.default_rng(0).normal(size=(512, 512)).astype(np.float32)  # 1 MiB: own frame
    np.testing.assert_array_equal(client.echo({"x": x})["x"], x)


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        ({"model": "nope", "inputs": np.zeros((1, 64), np.float32)}, errors.UnknownModel),
        ({"model": CLOUD, "inputs": np.zeros((1, 63), np.float32)}, errors.BadRequest),
        ({"model": CLOUD}, errors.BadRequest),
        ([1, 2, 3], errors.BadRequest),
    ],
)
def test_bad_requests_get_typed_errors(client: CloudClient, payload, error) -> None:
    with pytest.raises(error):
        client.request(Envelope(kind=Kind.INFER, payload=payload), timeout_s=5)


def test_expired_deadline_is_not_run(client: CloudClient) -> None:
    env = Envelope(
        kind=Kind.INFER,
        deadline=time.monotonic() - 0.01,  # no budget left on arrival
        payload={"model": CLOUD, "inputs": np.zeros((1, 64), np.float32)},
    )
    with pytest.raises(errors.DeadlineExceeded):
        client.request(env, timeout_s=5)


def msg(header: bytes, payload: bytes = b"\xc0") -> list[bytes]:
    return [struct.pack("<H", len(header)) + header + payload]


@pytest.mark.parametrize(
    ("frames", "code"),
    [
        ([os.urandom(64)], "wire.malformed"),
        ([b"\xff\xfe\x00", b"x"], "wire.malformed"),
        (msg(msgpack.packb([99, "infer", b"i" * 16, "", None, []])), "wire.version"),
        (msg(msgpack.packb([2, "explode", b"i" * 16, "", None, []])), "wire.kind"),
        (
            msg(
                msgpack.packb([2, "infer", b"i" * 16, "", None, []]),
                msgpack.packb(msgpack.ExtType(1, b"\x63\x01" + (2).to_bytes(8, "little"))),
            ),
            "wire.array",
        ),
    ],
)
def test_malformed_frames_get_typed_errors_and_worker_keeps_serving(worker, frames, code) -> None:
    reply = raw_exchange(worker.endpoint, frames)
    assert reply.kind is Kind.ERROR and reply.payload["code"] == code
    if frames[0][2:3] == b"\x96":  # a readable header: answered by its request id
        assert reply.id == b"i" * 16
    with CloudClient(worker.endpoint) as c:
        assert c.health()["state"] == "serving"


def test_req_socket_peers_are_answered_too(worker) -> None:
    codec = WireCodec()
    env = Envelope(kind=Kind.ECHO, payload="hi")
    reply = raw_exchange(worker.endpoint, [bytes(f) for f in codec.encode(env)], zmq.REQ)
    assert reply.id == env.id and reply.payload == "hi"


def test_frame_over_maxmsgsize_drops_only_that_peer(make_worker_config) -> None:
    cfg = make_worker_config(limits={"max_message_bytes": 4096})
    with WorkerProcess(cfg) as w:
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


def test_requests_are_micro_batched(make_worker_config) -> None:
    cfg = make_worker_config(batching={"max_batch": 64, "max_wait_us": 200_000})
    with WorkerProcess(cfg) as w:
        codec = WireCodec()
        s = raw_socket(w.endpoint)
        envs = [
            Envelope(
                kind=Kind.INFER, payload={"model": CLOUD, "inputs": np.full((2, 64), i, np.float32)}
            )
            for i in range(6)
        ]
        for e in envs:
            s.send_multipart(codec.encode(e), copy=False)
        replies = {}
        while len(replies) < len(envs):
            assert s.poll(5000)
            r = codec.decode(s.recv_multipart())
            replies[r.id] = r
        s.close()
    assert set(replies) == {e.id for e in envs}  # each answered once
    assert max(r.payload["batch_rows"] for r in replies.values()) > 2
    for e in envs:  # each got its own rows back
        assert replies[e.id].payload["outputs"].shape == (2, 10)


def test_sigterm_drains_queued_work_then_refuses_and_exits_zero(make_worker_config) -> None:
    cfg = make_worker_config(batching={"max_wait_us": 3_000_000}, drain={"grace_ms": 3000})
    w = WorkerProcess(cfg).start()
    try:
        codec = WireCodec()
        s = raw_socket(w.endpoint)
        queued = [
            Envelope(
                kind=Kind.INFER, payload={"model": CLOUD, "inputs": np.ones((1, 64), np.float32)}
            )
            for _ in range(3)
        ]
        for e in queued:
            s.send_multipart(codec.encode(e), copy=False)
        with CloudClient(w.endpoint) as c:
            deadline = time.monotonic() + 5
            while c.health()["queue_depth"] < 3:  # they sit in the batcher (3 s wait)
                assert time.monotonic() < deadline
                time.sleep(0.01)
            w.signal(signal.SIGTERM)
            answered = [codec.decode(s.recv_multipart()) for _ in queued if s.poll(2000)]
            assert sorted(r.id for r in answered) == sorted(e.id for e in queued)
            assert all(r.kind is Kind.RESULT for r in answered)  # finished, not dropped
            assert c.health()["state"] == "draining"
            with pytest.raises(errors.ShuttingDown):
                c.infer(CLOUD, np.ones((1, 64), np.float32), timeout_s=2)
        s.close()
        assert w.proc.wait(10) == 0
    finally:
        w.kill()


def test_worker_config_errors_name_the_key(tmp_path: Path) -> None:
    from tandem.cloud.config import load_worker_config

    p = tmp_path / "worker.yaml"
    p.write_text("models_dir: m\nbatching: {max_batch: 0}\n")
    with pytest.raises(
        errors.ConfigError,
        match=r"worker.yaml: batching.max_batch: must be greater than or equal to 1, got 0",
    ):
        load_worker_config(p)


def test_client_fails_fast_while_down_and_recovers_when_worker_appears(make_worker_config) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"tcp://127.0.0.1:{port}"
    with CloudClient(endpoint, down_backoff_s=0.5) as c:
        t0 = time.monotonic()
        with pytest.raises(errors.Unavailable):
            c.health(timeout_s=0.1)
        assert time.monotonic() - t0 >= 0.09  # waited for a connection that never came
        t0 = time.monotonic()
        with pytest.raises(errors.Unavailable, match="link down"):
            c.health(timeout_s=2.0)
        assert time.monotonic() - t0 < 0.05  # known down: no waiting
        with WorkerProcess(make_worker_config(bind=endpoint)):
            deadline = time.monotonic() + 10
            while True:
                try:
                    assert c.health(timeout_s=1.0)["state"] == "serving"
                    break
                except errors.Unavailable:
                    assert time.monotonic() < deadline, "client never reconnected"
                    time.sleep(0.05)
