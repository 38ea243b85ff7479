"""The network-emulation relay: real worker, real relay process, real client on loopback.

Fast by design: an echo-only worker process (no models) for round trips; for streams, a worker
in a thread with a scripted language model (tokens spelled from the prompt, a ms apart), and
the tiny random Llama in a worker process under ``-m slow``."""

from __future__ import annotations

import random
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from tandem.bench.link import PROFILES, LinkProfile, LinkSchedule, custom, profile
from tandem.bench.netem import start_relay
from tandem.bench.relay import Relay
from tandem.cloud.config import WorkerConfig
from tandem.cloud.process import WorkerProcess
from tandem.runtime import errors
from tandem.runtime.client import CloudClient
from tandem.runtime.generation import BackendStream, SamplingParams, TokenStep
from tandem.runtime.wire import Envelope, Kind, WireCodec
from tests.peers import ThreadWorker, raw_socket

pytestmark = pytest.mark.integration

ECHO_ONLY = {"bind": "tcp://127.0.0.1:*", "threads": 1}


@pytest.fixture(scope="module")
def worker() -> Iterator[WorkerProcess]:
    """A worker process with no models: it answers ``echo`` and ``health``."""
    with WorkerProcess(WorkerConfig.model_validate(ECHO_ONLY)) as w:
        yield w


@pytest.fixture
def in_thread(worker: WorkerProcess) -> Iterator[Any]:
    """``in_thread(link, **relay options)``: a :class:`Relay` serving in a thread of this
    process (its counters readable live); stopped and joined after the test."""
    started: list[tuple[Relay, threading.Thread]] = []

    def start(link: LinkProfile, **kw: Any) -> Relay:
        relay = Relay(worker.endpoint, link, **kw)
        ready = threading.Event()
        t = threading.Thread(target=relay.serve, args=(lambda _: ready.set(),), daemon=True)
        t.start()
        assert ready.wait(5), "relay did not bind"
        started.append((relay, t))
        return relay

    yield start
    for relay, t in started:
        relay.stop()
        t.join(5)
        assert not t.is_alive(), "relay thread did not stop"


def echo_frames(codec: WireCodec, payload: Any) -> list[bytes]:
    return [bytes(f) for f in codec.encode(Envelope(kind=Kind.ECHO, payload=payload))]


def recv_env(sock: zmq.Socket, codec: WireCodec, timeout_ms: int = 5000) -> Envelope:
    assert sock.poll(timeout_ms), "no reply through the relay"
    return codec.decode(sock.recv_multipart())


def rtts_ms(client: CloudClient, n: int, payload: Any = b"x") -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        assert client.echo(payload, timeout_s=5) == payload
        out.append((time.perf_counter() - t) * 1e3)
    return out


# ---------------------------------------------------------------------- the link model
def test_schedule_worked_example() -> None:
    s = LinkSchedule(custom(delay_ms=10, bandwidth=1000))
    assert s.release(0.0, 5) == pytest.approx(0.015)
    assert s.release(0.001, 5) == pytest.approx(0.020)  # waited for the wire
    assert s.release(1.0, 0) == pytest.approx(1.010)  # wire idle again


def test_jitter_spreads_delays_but_never_reorders() -> None:
    s = LinkSchedule(custom(delay_ms=5, jitter_ms=5), random.Random(0))
    draw = random.Random(1)
    arrivals = sorted(draw.uniform(0, 20) for _ in range(2000))
    releases = [s.release(a, 100) for a in arrivals]
    assert releases == sorted(releases)
    delays = [r - a for r, a in zip(releases, arrivals, strict=True)]
    assert min(delays) >= 0 and max(delays) <= 0.010 + 1e-9
    assert statistics.pstdev(delays) > 0.001  # it does jitter


def test_profiles_and_validation() -> None:
    assert set(PROFILES) == {"lan", "wifi", "lte", "congested", "offline"}
    assert (profile("lan").delay_ms, profile("lan").bandwidth) == (0.25, None)
    lte = profile("lte")
    assert (lte.delay_ms, lte.jitter_ms, lte.bandwidth) == (25.0, 5.0, 2.5e6)
    assert profile("congested").bandwidth == 250e3 and profile("offline").down
    assert custom(delay_ms=3, jitter_ms=1, bandwidth=1e6) == LinkProfile("custom", 3, 1, 1e6)
    for bad in ({"delay_ms": -1}, {"jitter_ms": float("nan")}, {"bandwidth": 0}):
        with pytest.raises(ValueError):
            custom(**bad)
    with pytest.raises(ValueError, match="built in: lan"):
        profile("5g")
    with pytest.raises(ValueError, match="outage"):
        Relay("tcp://127.0.0.1:1", custom(), outages=[(2.0, 1.0)])


# ---------------------------------------------------------------------- through the relay
def test_echo_through_10ms_each_way_takes_20ms_plus_little(worker: WorkerProcess) -> None:
    with start_relay(worker.endpoint, custom(delay_ms=10)) as relay:
        with CloudClient(relay.endpoint) as c:
            rtts = rtts_ms(c, 10)
        stats = relay.stop()
    assert min(rtts) >= 20.0, rtts
    assert statistics.median(rtts) < 20.0 + 10.0, rtts
    assert stats["up_messages"] == stats["down_messages"] == 10
    assert relay.proc.returncode == 0


def test_zero_delay_overhead_is_small(worker: WorkerProcess) -> None:
    """The relay's own cost: echo round trips through it at 0 ms against direct ones,
    interleaved so that machine load hits both alike."""
    with (
        start_relay(worker.endpoint, custom()) as relay,
        CloudClient(worker.endpoint) as direct,
        CloudClient(relay.endpoint) as relayed,
    ):
        rtts_ms(direct, 20)  # warm
        rtts_ms(relayed, 20)
        d, r = [], []
        for _ in range(300):
            d += rtts_ms(direct, 1)
            r += rtts_ms(relayed, 1)
    overhead = statistics.median(r) - statistics.median(d)
    print(
        f"echo rtt median: direct {statistics.median(d) * 1e3:.0f} us, "
        f"relay {statistics.median(r) * 1e3:.0f} us (+{overhead * 1e3:.0f} us)"
    )
    assert overhead < 1.0  # ms: generous, for a loaded 2-core machine


def test_two_clients_each_get_their_own_replies(worker: WorkerProcess) -> None:
    failures: list[BaseException] = []

    def run(k: int, c: CloudClient) -> None:
        try:
            for i in range(15):
                payload = {"client": k, "i": i, "pad": bytes([k]) * (100 * k)}
                assert c.echo(payload, timeout_s=5) == payload
        except BaseException as e:  # reported by the main thread
            failures.append(e)

    with start_relay(worker.endpoint, custom(delay_ms=2, jitter_ms=1), seed=0) as relay:
        with CloudClient(relay.endpoint) as a, CloudClient(relay.endpoint) as b:
            threads = [threading.Thread(target=run, args=(k, c)) for k, c in ((1, a), (2, b))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(10)
        stats = relay.stop()
    assert not failures, failures
    assert stats["clients_opened"] == 2  # the worker saw one peer per client
    assert stats["up_messages"] == stats["down_messages"] == 30


def test_order_is_kept_under_jitter(worker: WorkerProcess) -> None:
    codec = WireCodec()
    with start_relay(worker.endpoint, custom(delay_ms=5, jitter_ms=5), seed=1) as relay:
        s = raw_socket(relay.endpoint)
        try:
            for i in range(200):
                s.send_multipart(echo_frames(codec, i))
            got = [recv_env(s, codec).payload for _ in range(200)]
        finally:
            s.close()
    assert got == list(range(200))


def test_bandwidth_limit_adds_serialisation_delay(worker: WorkerProcess) -> None:
    payload = bytes(50_000)
    with (
        start_relay(worker.endpoint, custom(bandwidth=1e6)) as relay,
        CloudClient(relay.endpoint) as c,
    ):
        (rtt,) = rtts_ms(c, 1, payload)
    assert 100.0 <= rtt < 100.0 + 100.0  # 50 kB at 1 MB/s each way


def test_an_outage_loses_requests_and_the_link_comes_back(worker: WorkerProcess) -> None:
    with start_relay(worker.endpoint, custom(delay_ms=1), outages=[(0.0, 0.5)]) as relay:
        start = time.monotonic()  # a few ms after the relay's own start: the window ends sooner
        with CloudClient(relay.endpoint) as c:
            with pytest.raises((errors.DeadlineExceeded, errors.Unavailable)):
                c.echo(b"lost", timeout_s=0.2)
            time.sleep(max(0.0, start + 0.55 - time.monotonic()))
            assert c.echo(b"after", timeout_s=2) == b"after"
        stats = relay.stop()
    assert stats["dropped_outage"] >= 1
    assert stats["up_messages"] == stats["down_messages"] == 1


def test_offline_forwards_nothing(worker: WorkerProcess) -> None:
    with start_relay(worker.endpoint, "offline") as relay:
        with CloudClient(relay.endpoint) as c, pytest.raises(errors.DeadlineExceeded):
            c.echo(b"x", timeout_s=0.2)
        stats = relay.stop()
    assert stats["dropped_outage"] == 1 and stats["up_messages"] == 0


def test_stop_is_prompt_with_messages_still_queued(worker: WorkerProcess) -> None:
    codec = WireCodec()
    relay = start_relay(worker.endpoint, custom(delay_ms=2000))
    s = raw_socket(relay.endpoint)
    try:
        s.send_multipart(echo_frames(codec, "held"))
        time.sleep(0.3)  # read by the relay, queued for 2 s
        t = time.monotonic()
        stats = relay.stop()
        assert time.monotonic() - t < 1.0
    finally:
        s.close()
    assert relay.proc.returncode == 0
    assert stats["up_queue"] == 1 and stats["up_messages"] == 0


def test_cli_logs_a_stats_line_per_interval(worker: WorkerProcess, tmp_path: Path) -> None:
    log_path = tmp_path / "relay.log"
    with log_path.open("w") as log_file:
        relay = start_relay(worker.endpoint, "lan", stats_every_s=0.1, stderr=log_file)
        with relay, CloudClient(relay.endpoint) as c:
            rtts_ms(c, 3)
            time.sleep(0.3)
    lines = [ln for ln in log_path.read_text().splitlines() if "msg" in ln and "queues" in ln]
    assert len(lines) >= 2, log_path.read_text()
    assert "up 3 msg" in "\n".join(lines)


# ---------------------------------------------------------------------- bounds, in a thread
def test_a_full_queue_stops_reading_and_loses_nothing(in_thread) -> None:
    relay = in_thread(custom(delay_ms=20), max_queue_messages=4)
    codec = WireCodec()
    deepest = [0]
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            deepest[0] = max(deepest[0], len(relay.up.queue), len(relay.down.queue))
            time.sleep(0.0005)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    s = raw_socket(relay.endpoint)
    try:
        for i in range(40):
            s.send_multipart(echo_frames(codec, i))
        got = [recv_env(s, codec).payload for _ in range(40)]
    finally:
        done.set()
        s.close()
    assert got == list(range(40))
    assert 1 <= deepest[0] <= 4
    assert relay.dropped == {"outage": 0, "unroutable": 0}


def test_the_client_table_is_bounded_least_recently_used_first(in_thread) -> None:
    relay = in_thread(custom(), max_clients=2)
    codec = WireCodec()
    socks = [raw_socket(relay.endpoint) for _ in range(3)]
    try:
        for k, s in enumerate(socks):
            s.send_multipart(echo_frames(codec, k))
            assert recv_env(s, codec).payload == k
        assert relay.stats()["clients"] == 2 and relay.clients_closed == 1
        socks[0].send_multipart(echo_frames(codec, "back"))  # the one closed, again
        assert recv_env(socks[0], codec).payload == "back"
        assert relay.clients_opened == 4 and relay.clients_closed == 2
    finally:
        for s in socks:
            s.close()


def test_idle_clients_are_closed(in_thread) -> None:
    relay = in_thread(custom(), idle_s=0.2)
    codec = WireCodec()
    s = raw_socket(relay.endpoint)
    try:
        s.send_multipart(echo_frames(codec, 1))
        assert recv_env(s, codec).payload == 1
        deadline = time.monotonic() + 3
        while relay.stats()["clients"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert relay.stats()["clients"] == 0 and relay.clients_closed == 1
        s.send_multipart(echo_frames(codec, 2))  # back after a pause: a new DEALER
        assert recv_env(s, codec).payload == 2
    finally:
        s.close()


# ---------------------------------------------------------------------- streams
class SpellingLM:
    """A generation backend that spells the prompt backwards, a token every ms: a stream of
    several chunks with known content, without loading a model."""

    name, version = "spell", "t-1"

    def stream(self, prompt: str, params: SamplingParams, *, cancel=None) -> BackendStream:
        cancel = cancel or threading.Event()
        text = (prompt[::-1] * params.max_tokens)[: params.max_tokens]

        def steps():
            for i, ch in enumerate(text):
                if cancel.wait(0.001):
                    return "cancelled"
                yield TokenStep(token=ord(ch), text=ch, logprob=-0.01 * i, entropy=0.5)
            return "length"

        return BackendStream(steps(), len(prompt))

    def warm_up(self) -> None:
        pass

    def close(self) -> None:
        pass


def read_stream(c: CloudClient, model: str, prompt: str, n: int) -> tuple[list, str, dict]:
    with c.generate(model, prompt, SamplingParams(max_tokens=n), timeout_s=10) as call:
        chunks = list(call)
    steps = [
        (t, lp, h)
        for ch in chunks
        for t, lp, h in zip(ch.tokens, ch.logprobs, ch.entropies, strict=True)
    ]
    end = {k: v for k, v in call.end.items() if k != "timings"}
    return steps, call.text, end


def test_a_stream_passes_through_unchanged() -> None:
    cfg = WorkerConfig.model_validate({"bind": "tcp://127.0.0.1:*"})
    with (
        ThreadWorker(cfg, {"spell": SpellingLM()}) as w,
        start_relay(w.endpoint, custom(delay_ms=2, jitter_ms=1), seed=0) as relay,
    ):
        with CloudClient(w.endpoint) as direct, CloudClient(relay.endpoint) as relayed:
            want = read_stream(direct, "spell", "abc", 60)
            got = read_stream(relayed, "spell", "abc", 60)
        stats = relay.stop()
    assert want[1] == ("cba" * 20) and want[2]["tokens"] == 60
    assert got == want
    assert stats["down_messages"] >= 2  # chunks, then the end


@pytest.mark.slow
def test_a_language_model_stream_passes_through_unchanged(tmp_path: Path) -> None:
    from tests.lm import lm_models_dir

    models = lm_models_dir(tmp_path, {"tiny-lm": {"seed": 2}})
    cfg = WorkerConfig.model_validate(
        {"bind": "tcp://127.0.0.1:*", "models_dir": str(models), "threads": 1}
    )
    with (
        WorkerProcess(cfg) as w,
        start_relay(w.endpoint, "wifi", seed=0) as relay,
        CloudClient(w.endpoint) as direct,
        CloudClient(relay.endpoint) as relayed,
    ):
        want = read_stream(direct, "tiny-lm", "abc", 60)
        got = read_stream(relayed, "tiny-lm", "abc", 60)
    assert want[2]["tokens"] == 60 and got == want
