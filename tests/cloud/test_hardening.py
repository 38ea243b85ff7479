"""What no client may do to a worker: crash it, stall it, grow it without bound, or get a
request answered twice. Real worker processes on loopback, raw sockets where a misbehaving
client would use them."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tandem.cloud.process import WorkerProcess
from tandem.reference.models import CLOUD, EDGE, MOE
from tandem.runtime import errors
from tandem.runtime.client import CloudClient
from tandem.runtime.wire import WIRE_DTYPES, Envelope, Kind, WireCodec
from tests.peers import raw_socket

pytestmark = pytest.mark.integration


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def infer_env(model: str, x: np.ndarray, **kw) -> Envelope:
    return Envelope(kind=Kind.INFER, payload={"model": model, "inputs": x}, **kw)


@pytest.fixture
def client(worker: WorkerProcess):
    with CloudClient(worker.endpoint) as c:
        yield c


def test_overflowing_moe_input_is_a_typed_error_and_the_worker_keeps_serving(client) -> None:
    x = np.full((3, 64), 3e38, np.float32)  # finite, but the gate logits overflow
    with pytest.raises(errors.BackendFailure) as e:
        client.infer(MOE, x, timeout_s=10)
    assert e.value.code == "backend.error" and e.value.exception == "ValueError"
    assert client.infer(MOE, np.zeros((2, 64), np.float32), timeout_s=10)["outputs"].shape == (
        2,
        10,
    )
    h = client.health()
    assert h["state"] == "serving" and h["counters"]["backend_errors"] >= 1


def test_a_failing_request_does_not_fail_the_others_in_its_batch(make_worker_config) -> None:
    cfg = make_worker_config(models=[MOE], batching={"max_batch": 64, "max_wait_us": 300_000})
    with WorkerProcess(cfg) as w:
        codec, s = WireCodec(), raw_socket(w.endpoint)
        good = [infer_env(MOE, np.ones((1, 64), np.float32)) for _ in range(3)]
        bad = infer_env(MOE, np.full((1, 64), 3e38, np.float32))
        for e in [good[0], bad, *good[1:]]:  # one batch (300 ms wait)
            s.send_multipart(codec.encode(e), copy=False)
        replies = {}
        while len(replies) < 4:
            assert s.poll(5000)
            r = codec.decode(s.recv_multipart())
            replies[r.id] = r
        s.close()
    assert replies[bad.id].payload["code"] == "backend.error"
    assert all(replies[e.id].kind is Kind.RESULT for e in good)


def test_request_over_row_and_byte_limits_is_refused_before_any_work(make_worker_config) -> None:
    cfg = make_worker_config(models=[CLOUD], limits={"max_rows": 100, "max_request_bytes": 32768})
    with WorkerProcess(cfg) as w, CloudClient(w.endpoint) as c:
        with pytest.raises(errors.BadRequest, match="at most 100 rows"):
            c.infer(CLOUD, np.zeros((101, 64), np.float32), timeout_s=5)
        with pytest.raises(errors.BadRequest, match="32768 bytes"):
            c.infer(CLOUD, np.zeros((80, 64), np.float64), timeout_s=5)  # 40 KiB
        with pytest.raises(errors.BadRequest, match="at least one row"):
            c.infer(CLOUD, np.zeros((0, 64), np.float32), timeout_s=5)
        assert c.infer(CLOUD, np.zeros((100, 64), np.float32), timeout_s=5)["outputs"].shape == (
            100,
            10,
        )
        assert c.health()["counters"].get("batches") == 1  # the refused ones never ran


def _edge_values(dtype: np.dtype) -> list:
    if dtype.kind == "f":
        fi = np.finfo(dtype)
        return [0.0, -0.0, fi.max, -fi.max, fi.tiny, fi.smallest_subnormal, -fi.smallest_subnormal,
                fi.eps, np.nan, np.inf, -np.inf, 1.0]  # fmt: skip
    if dtype.kind == "b":
        return [False, True]
    ii = np.iinfo(dtype)
    return [ii.min, ii.max, 0, 1, -1 if ii.min < 0 else 2]


@st.composite
def hostile_inputs(draw) -> np.ndarray:
    dtype = draw(st.sampled_from(WIRE_DTYPES))
    rows = draw(st.integers(0, 5))
    shape = draw(
        st.sampled_from([(rows, 64), (rows, 64), (rows, 63), (rows,), (rows, 8, 8), (), (rows, 65)])
    )
    n = int(np.prod(shape))
    values = draw(st.lists(st.sampled_from(_edge_values(dtype)), min_size=n, max_size=n))
    with np.errstate(all="ignore"):
        return np.array(values, dtype=np.dtype(dtype).newbyteorder("=")).reshape(shape)


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(model=st.sampled_from([EDGE, CLOUD, MOE]), x=hostile_inputs())
def test_every_hostile_input_gets_an_answer_or_a_typed_error(client, model, x) -> None:
    try:
        out = client.infer(model, x, timeout_s=10)["outputs"]
    except errors.DeadlineExceeded:
        pytest.fail("the worker did not answer")
    except errors.TandemError as e:
        assert type(e) is not errors.TandemError, f"untyped error: {e}"
        return
    assert out.shape == (len(x), 10)
    assert x.ndim == 2 and x.shape[1] == 64 and len(x) > 0


def test_worker_survives_the_hostile_inputs(worker) -> None:
    with CloudClient(worker.endpoint) as c:
        h = c.health()
    assert h["state"] == "serving" and h["counters"].get("internal_errors", 0) == 0


def test_flood_is_bounded_and_every_request_is_answered_or_overloaded(make_worker_config) -> None:
    n_socks, per_sock = 4, 5000
    cfg = make_worker_config(
        models=[CLOUD], queue={"max_requests": 256, "max_requests_per_model": 256}
    )
    bound = 64 * 1024 * 1024  # stated in the README: queue bounds keep growth under this
    with WorkerProcess(cfg) as w:
        codec = WireCodec()
        base = rss_bytes(w.pid)
        socks = [raw_socket(w.endpoint) for _ in range(n_socks)]
        x = np.ones((1, 64), np.float32)
        sent: dict[bytes, int] = {}
        got: dict[bytes, list[str]] = {}
        peak = base

        def drain(timeout_ms: int = 0) -> None:
            for s in socks:
                while s.poll(timeout_ms):
                    r = codec.decode(s.recv_multipart())
                    got.setdefault(r.id, []).append(
                        "result" if r.kind is Kind.RESULT else r.payload["code"]
                    )

        for _ in range(0, per_sock, 250):
            for s in socks:
                for _ in range(250):
                    e = infer_env(CLOUD, x)
                    sent[e.id] = 1
                    s.send_multipart(codec.encode(e), copy=False)
            drain()
            peak = max(peak, rss_bytes(w.pid))
        deadline = time.monotonic() + 60
        while len(got) < len(sent) and time.monotonic() < deadline:
            drain(50)
            peak = max(peak, rss_bytes(w.pid))
        for s in socks:
            s.close()
        with CloudClient(w.endpoint) as c:
            counters = c.health()["counters"]
    assert len(sent) == n_socks * per_sock
    assert set(got) == set(sent), f"{len(sent) - len(got)} requests never answered"
    assert all(len(v) == 1 for v in got.values()), "a request was answered twice"
    kinds = {k for v in got.values() for k in v}
    assert kinds <= {"result", "overloaded"}, kinds
    assert "overloaded" in kinds and "result" in kinds  # the bound was reached, work went on
    assert peak - base < bound, f"RSS grew {(peak - base) / 2**20:.0f} MiB"
    assert counters.get("replies_dropped", 0) == 0


def test_overloaded_carries_a_retry_hint(make_worker_config) -> None:
    cfg = make_worker_config(models=[CLOUD], queue={"max_requests": 1})
    with WorkerProcess(cfg) as w:
        codec, s = WireCodec(), raw_socket(w.endpoint)
        envs = [infer_env(CLOUD, np.ones((1000, 64), np.float32)) for _ in range(20)]
        for e in envs:
            s.send_multipart(codec.encode(e), copy=False)
        replies = []
        while len(replies) < len(envs):
            assert s.poll(5000)
            replies.append(codec.decode(s.recv_multipart()))
        s.close()
    over = [r for r in replies if r.kind is Kind.ERROR]
    assert over and all(r.payload["code"] == "overloaded" for r in over)
    err = errors.error_from_wire(over[0].payload)
    assert isinstance(err, errors.OverloadedError) and err.retry_after_ms > 0


def test_a_retried_request_id_is_answered_from_the_cache_not_run_again(client) -> None:
    env = infer_env(CLOUD, np.ones((2, 64), np.float32))
    first = client.request(env, timeout_s=5)
    before = client.health()["counters"]
    again = client.request(env, timeout_s=5)  # the same request, the same id: a retry
    after = client.health()["counters"]
    np.testing.assert_array_equal(again.payload["outputs"], first.payload["outputs"])
    assert after["replayed"] == before.get("replayed", 0) + 1
    assert after.get("rows") == before.get("rows")  # not run again
    # another request under that id (another model, other rows) gets no one's reply
    other = infer_env(MOE, np.zeros((3, 64), np.float32), id=env.id)
    with pytest.raises(errors.BadRequest, match="used for a different request"):
        client.request(other, timeout_s=5)


def test_a_retry_of_a_queued_request_joins_it(make_worker_config) -> None:
    cfg = make_worker_config(models=[CLOUD], batching={"max_wait_us": 300_000})
    with WorkerProcess(cfg) as w:
        codec = WireCodec()
        a, b = raw_socket(w.endpoint), raw_socket(w.endpoint)  # the retry comes from elsewhere
        env = infer_env(CLOUD, np.ones((1, 64), np.float32))
        a.send_multipart(codec.encode(env), copy=False)
        time.sleep(0.05)
        b.send_multipart(codec.encode(env), copy=False)
        ra, rb = (codec.decode(s.recv_multipart()) for s in (a, b) if s.poll(5000))
        a.close()
        b.close()
        with CloudClient(w.endpoint) as c:
            counters = c.health()["counters"]
    assert ra.id == rb.id == env.id and ra.kind is rb.kind is Kind.RESULT
    assert counters["joined"] == 1 and counters["rows"] == 1


def test_retries_of_a_queued_request_join_it_only_up_to_a_bound(make_worker_config) -> None:
    """Resending an id while it waits in the queue cannot grow the worker: past
    MAX_JOINED_ROUTES routes, a retry is refused at once (each message still gets exactly one
    answer) and the request runs once."""
    from tandem.cloud.idempotency import MAX_JOINED_ROUTES

    extra = 2 * MAX_JOINED_ROUTES
    cfg = make_worker_config(models=[CLOUD], batching={"max_wait_us": 2_000_000})
    with WorkerProcess(cfg) as w:
        codec, s = WireCodec(), raw_socket(w.endpoint)
        env = infer_env(CLOUD, np.ones((1, 64), np.float32))
        for _ in range(1 + extra):  # one request, then its retries while it waits 2 s
            s.send_multipart(codec.encode(env), copy=False)
        replies = []
        while len(replies) < 1 + extra:
            assert s.poll(10_000)
            replies.append(codec.decode(s.recv_multipart()))
        assert not s.poll(300)  # nothing more
        s.close()
        with CloudClient(w.endpoint) as c:
            counters = c.health()["counters"]
    assert all(r.id == env.id for r in replies)
    results = [r for r in replies if r.kind is Kind.RESULT]
    refused = [r for r in replies if r.kind is Kind.ERROR]
    assert len(results) == MAX_JOINED_ROUTES and len(refused) == 1 + extra - MAX_JOINED_ROUTES
    assert all(r.payload["code"] == "bad_request" for r in refused)
    assert all(r.kind is Kind.ERROR for r in replies[: len(refused)])  # at once, before the run
    assert counters["joined"] == MAX_JOINED_ROUTES - 1
    assert counters["joins_refused"] == len(refused) and counters["rows"] == 1


@pytest.mark.parametrize("shift_s", [-3600.0, 3600.0])
def test_a_client_whose_wall_clock_is_off_by_an_hour_is_served(client, monkeypatch, shift_s):
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + shift_s)
    monkeypatch.setattr(time, "time_ns", lambda: int((real() + shift_s) * 1e9))
    for _ in range(20):
        assert client.infer(CLOUD, np.ones((1, 64), np.float32), timeout_s=0.5)["outputs"].shape
    assert client.health()["counters"].get("expired", 0) == 0


def test_replies_to_a_peer_that_never_reads_do_not_stall_the_worker(make_worker_config) -> None:
    cfg = make_worker_config(models=[CLOUD], socket={"sndhwm": 10})
    with WorkerProcess(cfg) as w:
        codec, lazy = WireCodec(), raw_socket(w.endpoint)
        lazy.setsockopt(zmq.RCVHWM, 10)
        big = np.ones((1000, 64), np.float32)
        for _ in range(200):  # replies pile up: it never reads
            lazy.send_multipart(codec.encode(infer_env(CLOUD, big)), copy=False)
        with CloudClient(w.endpoint) as c:
            t0 = time.monotonic()
            while c.health()["counters"].get("rows", 0) < 200 * 1000:  # all ran
                assert time.monotonic() - t0 < 60
                time.sleep(0.05)
            assert c.infer(CLOUD, np.ones((1, 64), np.float32), timeout_s=5)["outputs"].shape
            assert c.health()["counters"]["replies_dropped"] > 0  # counted, not waited for
        lazy.close()


def test_a_message_of_thousands_of_frames_is_refused_without_keeping_them(worker) -> None:
    s = raw_socket(worker.endpoint)
    env = Envelope(kind=Kind.ECHO, payload=None)
    s.send_multipart([bytes(f) for f in WireCodec().encode(env)] + [b"x" * 1000] * 20_000)
    assert s.poll(10_000)
    reply = WireCodec().decode(s.recv_multipart())
    s.close()
    assert reply.kind is Kind.ERROR and reply.payload["code"] == "wire.limit"
    assert reply.id == env.id and "more than 64 frames" in reply.payload["message"]
    with CloudClient(worker.endpoint) as c:
        assert c.health()["state"] == "serving"


def test_an_experts_request_with_millions_of_ids_is_refused_before_any_loop(worker) -> None:
    n = 1_000_000
    env = Envelope(
        kind=Kind.EXPERTS,
        payload={
            "model": MOE,
            "experts": [0] * n,
            "counts": [0] * (n - 1) + [1],
            "rows": np.zeros((1, 32), np.float32),
        },
    )
    with CloudClient(worker.endpoint) as c:
        with pytest.raises(errors.BadRequest, match="at most 8"):  # checked before any loop
            c.request(env, timeout_s=10)
        assert c.health()["state"] == "serving"
