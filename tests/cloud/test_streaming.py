"""Streaming generation end to end: ``generate`` → ``chunk``... → ``end`` between a real client
and real workers on loopback, with a tiny random Llama served by the transformers backend.
A worker process where the test needs one (the shared one, a SIGKILL); a worker in a thread
where the test needs a backend that is slow or failing on purpose."""

from __future__ import annotations

import gc
import shutil
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tandem.cloud.config import GenerationSpec, WorkerConfig
from tandem.cloud.engine import Engine
from tandem.cloud.payloads import parse_generate
from tandem.cloud.process import WorkerProcess
from tandem.cloud.streams import BLOCKED, GONE, SENT, WorkerStreams
from tandem.reference.models import CLOUD
from tandem.runtime import errors
from tandem.runtime.backends.transformers_lm import TransformersBackend
from tandem.runtime.client import CloudClient, RemoteChunk, RemoteStream
from tandem.runtime.generation import BackendStream, SamplingParams, TokenStep
from tandem.runtime.manifest import Manifest, load_manifest, write_manifest
from tandem.runtime.wire import Envelope, Kind, WireCodec
from tests.lm import lm_entry, tiny_lm
from tests.peers import ThreadWorker, raw_socket

pytestmark = pytest.mark.integration

LM = "tiny-lm"
MAX_STREAMS = 3
MAX_PROMPT = 4096
LONG = SamplingParams(max_tokens=3000)  # ~3 s on the tiny model: long enough to cut short


@pytest.fixture(scope="session")
def lm_models(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models directory with a tiny random Llama (``tiny-lm``, char tokenizer, 4096 tokens
    of context) and the digits CNN (``digits-cloud``) beside it."""
    out = tmp_path_factory.mktemp("lm-models")
    # greedy output of this seed runs past 60 tokens without EOS
    tiny_lm(out / LM, seed=2, n_ctx=4096)
    lm = lm_entry(out, LM)
    cloud = load_manifest(tiny_models).get(CLOUD)
    shutil.copy(tiny_models / cloud.file, out / cloud.file)
    write_manifest(out, Manifest(models=[lm, cloud]))
    return out


def lm_config(models_dir: Path, **overrides: Any) -> WorkerConfig:
    base = {
        "bind": "tcp://127.0.0.1:*",
        "models_dir": str(models_dir),
        "models": [LM, CLOUD],
        "threads": 1,
        "generation": {"max_streams": MAX_STREAMS, "max_prompt_bytes": MAX_PROMPT},
    }
    return WorkerConfig.model_validate({**base, **overrides})


@pytest.fixture(scope="module")
def lm_worker(lm_models: Path) -> Iterator[WorkerProcess]:
    with WorkerProcess(lm_config(lm_models)) as w:
        yield w


@pytest.fixture
def client(lm_worker: WorkerProcess) -> Iterator[CloudClient]:
    with CloudClient(lm_worker.endpoint) as c:
        yield c
        wait_idle(c)  # no test leaves a stream behind


@pytest.fixture(scope="session")
def backend(lm_models: Path) -> TransformersBackend:
    """The same model in this process: the reference each stream is compared with."""
    return TransformersBackend(lm_models / LM, name=LM, max_streams=64)


def reference(backend: TransformersBackend, prompt: str, params: SamplingParams):
    ts = backend.stream(prompt, params)
    steps = list(ts)
    return steps, ts.finish_reason


def wait_idle(c: CloudClient, timeout_s: float = 5.0) -> dict[str, Any]:
    """The worker's stream counters once it has no stream left (fails after ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while True:
        s = c.health()["streams"]
        if s["active"] == 0:
            return s
        assert time.monotonic() < deadline, f"streams still active: {s}"
        time.sleep(0.02)


def read_all(call: RemoteStream, pause_s: float = 0.0) -> list[RemoteChunk]:
    chunks = []
    for chunk in call:
        chunks.append(chunk)
        if pause_s:
            time.sleep(pause_s)
    return chunks


def assert_contiguous(chunks: list[RemoteChunk]) -> None:
    seq = 0
    for c in chunks:
        assert c.seq == seq, f"chunk seq {c.seq}, expected {seq}"
        assert len(c.tokens) == len(c.logprobs) == len(c.entropies) > 0
        seq += len(c.tokens)


def assert_same_answer(chunks: list[RemoteChunk], steps: list[TokenStep]) -> None:
    assert_contiguous(chunks)
    assert [t for c in chunks for t in c.tokens] == [s.token for s in steps]
    assert "".join(c.text for c in chunks) == "".join(s.text for s in steps)
    got = [v for c in chunks for v in c.logprobs]
    np.testing.assert_allclose(got, [s.logprob for s in steps], rtol=1e-4, atol=1e-4)


def generate_env(payload: Any, **kw: Any) -> Envelope:
    return Envelope(kind=Kind.GENERATE, payload=payload, **kw)


def gen_payload(prompt: str = "abc", **kw: Any) -> dict[str, Any]:
    return {"model": LM, "prompt": prompt, "max_tokens": 20, **kw}


def recv(sock: zmq.Socket, timeout_ms: int = 5000) -> Envelope:
    assert sock.poll(timeout_ms), "worker did not answer"
    return WireCodec().decode(sock.recv_multipart())


# ---------------------------------------------------------------------- backends on purpose
class SlowLM:
    """Wraps a backend: the first token comes ``first_s`` late, each next one ``per_token_s``
    after the one before (waits end early on cancel, as a real backend's would)."""

    def __init__(self, inner: Any, first_s: float = 0.0, per_token_s: float = 0.0) -> None:
        self.inner, self.first_s, self.per_token_s = inner, first_s, per_token_s
        self.name, self.version = inner.name, inner.version

    def stream(self, prompt, params, *, cancel=None) -> BackendStream:
        ts = self.inner.stream(prompt, params, cancel=cancel)
        cancel = cancel or threading.Event()

        def steps():
            try:
                for i, step in enumerate(ts):
                    if cancel.wait(self.first_s if i == 0 else self.per_token_s):
                        return "cancelled"
                    yield step
                return ts.finish_reason
            finally:
                ts.close()

        return BackendStream(steps(), ts.prompt_tokens)

    def warm_up(self) -> None:
        pass

    def close(self) -> None:
        pass


class BrokenLM(SlowLM):
    """Raises RuntimeError after ``good`` tokens (or in ``stream()`` itself when ``good`` is
    None)."""

    def __init__(self, inner: Any, good: int | None) -> None:
        super().__init__(inner)
        self.good = good

    def stream(self, prompt, params, *, cancel=None) -> BackendStream:
        if self.good is None:
            raise RuntimeError("no GPU today")
        ts = self.inner.stream(prompt, params, cancel=cancel)

        def steps():
            try:
                for i, step in enumerate(ts):
                    if i == self.good:
                        raise RuntimeError("CUDA error: an illegal memory access")
                    yield step
            finally:
                ts.close()

        return BackendStream(steps(), ts.prompt_tokens)


def thread_config(**generation: Any) -> WorkerConfig:
    return WorkerConfig.model_validate(
        {"bind": "tcp://127.0.0.1:*", "generation": {"max_streams": 4, **generation}}
    )


# ---------------------------------------------------------------------- the answer
def test_stream_equals_the_in_process_greedy_output(client, backend) -> None:
    params = SamplingParams(max_tokens=60)
    steps, reason = reference(backend, "abc", params)
    assert len(steps) == 60  # the tiny model's greedy answer does not stop early
    with client.generate(LM, "abc", params, timeout_s=10) as call:
        chunks = read_all(call)
    assert_same_answer(chunks, steps)
    assert call.text == "".join(s.text for s in steps) and call.tokens == 60
    end = call.end
    assert end is not None and end["finish_reason"] == reason == "length"
    assert end["tokens"] == 60 and end["prompt_tokens"] == 4  # <bos> a b c
    assert end["model"] == LM and end["version"] == "t-tiny-lm"
    t = end["timings"]
    assert 0 <= t["queue_ms"] <= t["ttft_ms"] <= t["total_ms"]


def test_stop_strings_end_the_answer_before_them(client, backend) -> None:
    full = "".join(s.text for s in reference(backend, "abc", SamplingParams(max_tokens=60))[0])
    stop = full[20:23]
    params = SamplingParams(max_tokens=60, stop=(stop, "zzzz"))
    steps, reason = reference(backend, "abc", params)
    with client.generate(LM, "abc", params, timeout_s=10) as call:
        chunks = read_all(call)
    assert_same_answer(chunks, steps)
    assert call.text == full[: full.index(stop)] and stop not in call.text
    assert call.finish_reason == reason == "stop"


def test_sampling_with_a_seed_is_repeatable(client, backend) -> None:
    params = SamplingParams(max_tokens=40, temperature=0.8, top_p=0.9, seed=7)
    steps, _ = reference(backend, "hello world", params)
    with client.generate(LM, "hello world", params, timeout_s=10) as call:
        assert_same_answer(read_all(call), steps)


def test_a_slow_reader_gets_merged_chunks_with_the_same_text(client, backend) -> None:
    params = SamplingParams(max_tokens=300)
    steps, _ = reference(backend, "abc", params)
    with client.generate(LM, "abc", params, timeout_s=30) as call:
        chunks = read_all(call, pause_s=0.05)
    assert_same_answer(chunks, steps)
    assert max(len(c.tokens) for c in chunks) > 1
    assert len(chunks) < len(steps) / 2


def test_two_concurrent_streams_on_one_worker_both_complete(client, backend) -> None:
    prompts = ["abc", "hello world"]
    params = SamplingParams(max_tokens=150)
    got: dict[str, list[RemoteChunk]] = {}

    def run(prompt: str) -> None:
        with client.generate(LM, prompt, params, timeout_s=30) as call:
            got[prompt] = read_all(call)

    threads = [threading.Thread(target=run, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for p in prompts:
        assert_same_answer(got[p], reference(backend, p, params)[0])
    assert client.health()["streams"]["started"] >= 2


def test_infer_is_answered_promptly_while_a_long_stream_runs(client) -> None:
    x = np.ones((1, 64), np.float32)
    client.infer(CLOUD, x, timeout_s=5)
    stop, started = threading.Event(), threading.Event()

    def read() -> None:  # the call is read and closed by one thread: it is not thread-safe
        with client.generate(LM, "abc", LONG, timeout_s=30) as call:
            for _ in call:
                started.set()
                if stop.is_set():
                    break

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert started.wait(10)
    ms = []
    for _ in range(30):
        t0 = time.perf_counter()
        client.infer(CLOUD, x, timeout_s=5)
        ms.append((time.perf_counter() - t0) * 1e3)
    assert client.health()["streams"]["active"] == 1  # the stream was still running
    stop.set()
    reader.join(10)
    assert statistics.median(ms) < 50 and max(ms) < 500, ms


# ---------------------------------------------------------------------- ending early
def test_cancel_mid_stream_ends_it_cancelled_and_frees_it(lm_worker, client) -> None:
    before = client.health()["streams"]
    codec, s = WireCodec(), raw_socket(lm_worker.endpoint)
    env = generate_env(gen_payload(max_tokens=LONG.max_tokens))
    s.send_multipart(codec.encode(env))
    got = []
    while len(got) < 3:
        r = recv(s)
        assert r.kind is Kind.CHUNK and r.id == env.id
        got.append(r.payload)
    s.send_multipart(codec.encode(Envelope(kind=Kind.CANCEL, id=env.id)))
    while True:
        r = recv(s)
        if r.kind is not Kind.CHUNK:
            break
        got.append(r.payload)
    assert r.kind is Kind.END and r.payload["finish_reason"] == "cancelled"
    assert r.payload["tokens"] == sum(len(p["tokens"]) for p in got) < LONG.max_tokens
    assert [p["seq"] for p in got] == list(np.cumsum([0] + [len(p["tokens"]) for p in got[:-1]]))
    s.send_multipart(codec.encode(Envelope(kind=Kind.CANCEL, id=env.id)))  # over: no answer
    assert not s.poll(300)
    s.close()
    after = wait_idle(client)
    assert after["cancelled"] == before["cancelled"] + 1


@pytest.mark.parametrize("read_first", [True, False])
def test_closing_or_dropping_a_call_cancels_its_stream(client, read_first) -> None:
    before = client.health()["streams"]
    call = client.generate(LM, "abc", LONG, timeout_s=30)
    if read_first:
        next(iter(call))
        call.close()
    else:
        del call  # never read, never closed: garbage collection cancels it
        gc.collect()
    after = wait_idle(client)
    assert after["cancelled"] == before["cancelled"] + 1
    assert after["completed"] == before["completed"]


def test_a_reader_that_disconnects_without_cancel_frees_its_stream(lm_worker, client) -> None:
    before = client.health()["streams"]
    s = raw_socket(lm_worker.endpoint)
    s.send_multipart(WireCodec().encode(generate_env(gen_payload(max_tokens=LONG.max_tokens))))
    assert recv(s).kind is Kind.CHUNK
    s.close()  # gone: the next chunk is unroutable (ROUTER_MANDATORY)
    after = wait_idle(client)
    assert after["peer_gone"] == before["peer_gone"] + 1
    assert after["completed"] == before["completed"]


def test_a_total_deadline_raises_and_frees_the_stream(lm_worker, client) -> None:
    t0 = time.monotonic()
    with (
        pytest.raises(errors.DeadlineExceeded),
        client.generate(LM, "abc", LONG, timeout_s=0.3) as call,
    ):
        read_all(call)
    assert 0.29 <= time.monotonic() - t0 < 1.5
    assert 0 < call.tokens < LONG.max_tokens
    wait_idle(client)
    # the worker counts the budget itself: a reader that never cancels gets its error
    before = client.health()["streams"]
    s = raw_socket(lm_worker.endpoint)
    env = generate_env(gen_payload(max_tokens=LONG.max_tokens), deadline=time.monotonic() + 0.3)
    s.send_multipart(WireCodec().encode(env))
    while (r := recv(s)).kind is Kind.CHUNK:
        pass
    s.close()
    assert r.kind is Kind.ERROR and r.payload["code"] == "deadline_exceeded"
    assert wait_idle(client)["expired"] == before["expired"] + 1


def test_a_first_token_deadline_raises_and_frees_the_stream(backend) -> None:
    slow = SlowLM(backend, first_s=5.0)
    with ThreadWorker(thread_config(), {LM: slow}) as w, CloudClient(w.endpoint) as c:
        t0 = time.monotonic()
        with pytest.raises(errors.DeadlineExceeded, match="first token"):
            read_all(c.generate(LM, "abc", first_token_s=0.2, timeout_s=10))
        assert time.monotonic() - t0 < 1.0
        wait_idle(c)
        # and on the worker's clock (a raw request never cancels)
        t0 = time.monotonic()
        env = generate_env(gen_payload(first_token_ms=150))
        with pytest.raises(errors.DeadlineExceeded, match="first_token_ms"):
            c.request(env, timeout_s=10)
        assert time.monotonic() - t0 < 1.0
        assert wait_idle(c)["expired"] >= 1


# ---------------------------------------------------------------------- bounds
def test_one_stream_over_max_streams_is_overloaded_with_a_hint(client) -> None:
    calls = [client.generate(LM, "abc", LONG, timeout_s=30) for _ in range(MAX_STREAMS)]
    try:
        for call in calls:
            next(iter(call))  # running
        with pytest.raises(errors.OverloadedError) as e:
            next(iter(client.generate(LM, "abc", timeout_s=5)))
        assert e.value.retry_after_ms > 0
        assert client.health()["streams"]["active"] == MAX_STREAMS
    finally:
        for call in calls:
            call.close()
    wait_idle(client)
    with client.generate(LM, "abc", timeout_s=5) as call:  # a slot is free again
        assert read_all(call)


def test_the_backends_own_overloaded_is_passed_on(lm_models) -> None:
    one_slot = TransformersBackend(lm_models / LM, name=LM, max_streams=1)
    with ThreadWorker(thread_config(), {LM: one_slot}) as w, CloudClient(w.endpoint) as c:
        with c.generate(LM, "abc", LONG, timeout_s=30) as first:
            next(iter(first))
            with pytest.raises(errors.OverloadedError, match="all its 1 sequences in use") as e:
                read_all(c.generate(LM, "abc", timeout_s=5))
            assert e.value.retry_after_ms > 0
        wait_idle(c)
        assert read_all(c.generate(LM, "abc", timeout_s=5))  # the slot was given back


def test_overloaded_before_the_first_chunk_fails_over(backend) -> None:
    slow = SlowLM(backend, per_token_s=0.01)
    with (
        ThreadWorker(thread_config(max_streams=1), {LM: slow}) as a,
        ThreadWorker(thread_config(max_streams=1), {LM: backend}) as b,
        CloudClient(a.endpoint) as busy,
        CloudClient([a.endpoint, b.endpoint]) as c,
    ):
        with busy.generate(LM, "abc", LONG, timeout_s=30) as occupying:
            next(iter(occupying))
            for _ in range(4):  # ties rotate: some of these go to the busy worker first
                with c.generate(LM, "abc", SamplingParams(max_tokens=10), timeout_s=10) as call:
                    assert sum(len(ch.tokens) for ch in read_all(call)) == 10
                    assert call.endpoint == b.endpoint
        assert c.failovers >= 1


def test_bad_generate_payloads_get_typed_errors_and_the_worker_keeps_serving(client) -> None:
    bad: list[tuple[Any, type[errors.TandemError], str]] = [
        ([LM, "abc"], errors.BadRequest, "must be a map"),
        ({"model": LM}, errors.BadRequest, "prompt"),
        (gen_payload(prompt=5), errors.BadRequest, "prompt"),
        (gen_payload(max_tokens="5"), errors.BadRequest, "max_tokens"),
        (gen_payload(max_tokens=-1), errors.BadRequest, "max_tokens"),
        (gen_payload(max_tokens=True), errors.BadRequest, "max_tokens"),
        (gen_payload(temperature="hot"), errors.BadRequest, "temperature"),
        (gen_payload(temperature=float("nan")), errors.BadRequest, "temperature"),
        (gen_payload(top_p=0), errors.BadRequest, "top_p"),
        (gen_payload(seed=-1), errors.BadRequest, "seed"),
        (gen_payload(seed=1.5), errors.BadRequest, "seed"),
        (gen_payload(stop="abc"), errors.BadRequest, "stop"),
        (gen_payload(stop=["a"] * 100), errors.BadRequest, "stop"),
        (gen_payload(stop=[""]), errors.BadRequest, "stop"),
        (gen_payload(stop=[1]), errors.BadRequest, "stop"),
        (gen_payload(stop=["x" * 1000]), errors.BadRequest, "stop"),
        (gen_payload(first_token_ms=-5), errors.BadRequest, "first_token_ms"),
        (gen_payload(first_token_ms="soon"), errors.BadRequest, "first_token_ms"),
        (gen_payload(temprature=0.5), errors.BadRequest, "unknown field"),
        (gen_payload(prompt="a" * (MAX_PROMPT + 1)), errors.BadRequest, "max_prompt_bytes"),
        (gen_payload(prompt="é" * (MAX_PROMPT // 2 + 1)), errors.BadRequest, "max_prompt_bytes"),
        (gen_payload(prompt="a" * 1_000_000), errors.BadRequest, "max_prompt_bytes"),
        ({**gen_payload(), "model": "nope"}, errors.UnknownModel, "nope"),
        ({**gen_payload(), "model": 3}, errors.BadRequest, "model"),
        ({**gen_payload(), "model": CLOUD}, errors.BadRequest, "not a language model"),
        # found by the backend, on the stream's thread: still one typed error
        (gen_payload(prompt="ABC!"), errors.BadRequest, "vocabulary"),
        (gen_payload(prompt="a" * 4000, max_tokens=200), errors.BadRequest, "context"),
    ]
    for payload, cls, match in bad:
        with pytest.raises(cls, match=match):
            client.request(generate_env(payload), timeout_s=5)
    with pytest.raises(errors.BadRequest, match="language model"):
        client.infer(LM, np.ones((1, 64), np.float32), timeout_s=5)
    assert client.infer(CLOUD, np.ones((1, 64), np.float32), timeout_s=5)["outputs"].shape == (
        1,
        10,
    )
    h = client.health()
    assert h["state"] == "serving" and h["counters"].get("internal_errors", 0) == 0
    assert h["models"][LM]["kind"] == "generation" and "input" in h["models"][CLOUD]
    assert h["streams"]["active"] == 0


def test_a_second_generate_with_a_streaming_id_is_refused(lm_worker, client) -> None:
    codec = WireCodec()
    a, b = raw_socket(lm_worker.endpoint), raw_socket(lm_worker.endpoint)
    env = generate_env(gen_payload(max_tokens=LONG.max_tokens))
    a.send_multipart(codec.encode(env))
    assert recv(a).kind is Kind.CHUNK
    b.send_multipart(codec.encode(env))
    r = recv(b)
    assert r.kind is Kind.ERROR and r.payload["code"] == "bad_request"
    assert "already running" in r.payload["message"]
    b.send_multipart(codec.encode(Envelope(kind=Kind.CANCEL, id=env.id)))  # not b's stream
    assert not b.poll(200)
    a.send_multipart(codec.encode(Envelope(kind=Kind.CANCEL, id=env.id)))
    while (r := recv(a)).kind is Kind.CHUNK:
        pass
    assert r.kind is Kind.END and r.payload["finish_reason"] == "cancelled"
    a.close()
    b.close()


@st.composite
def generate_payloads(draw) -> Any:
    junk = (
        st.none()
        | st.booleans()
        | st.integers(-(2**63), 2**64 - 1)
        | st.floats()
        | st.text(max_size=8)
        | st.binary(max_size=8)
        | st.lists(st.integers(-5, 5), max_size=3)
    )
    fields = {
        "model": st.sampled_from([LM, CLOUD, "nope"]) | junk,
        "prompt": st.text(alphabet="abc :=Zé", max_size=40) | junk,
        "max_tokens": st.integers(-2, 12) | junk,
        "temperature": st.floats(-1, 3) | junk,
        "top_p": st.floats(-0.5, 1.5) | junk,
        "seed": st.integers(-5, 2**64 - 1) | junk,
        "stop": st.lists(st.text(max_size=3), max_size=10) | junk,
        "first_token_ms": st.integers(-5, 5000) | junk,
        "bogus": junk,
    }
    keys = draw(st.lists(st.sampled_from(sorted(fields)), unique=True))
    payload = {k: draw(fields[k]) for k in keys}
    return draw(st.sampled_from([payload, {**payload, "model": LM, "prompt": "abc"}]))


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(payload=generate_payloads())
def test_every_generate_payload_gets_a_stream_or_a_typed_error(lm_worker, payload) -> None:
    codec, s = WireCodec(), raw_socket(lm_worker.endpoint)
    try:
        env = generate_env(payload, deadline=time.monotonic() + 10)
        s.send_multipart(codec.encode(env))
        first = r = recv(s)
        while r.kind is Kind.CHUNK:
            r = recv(s)
        if r.kind is Kind.ERROR:
            err = errors.error_from_wire(r.payload)
            assert type(err) is not errors.TandemError, f"untyped error: {err}"
        else:
            assert r.kind is Kind.END, r.payload
            assert first.kind is Kind.CHUNK or r.payload["tokens"] == 0
    finally:
        s.close()


def test_the_worker_survives_the_payloads(client) -> None:
    h = client.health()
    assert h["state"] == "serving" and h["counters"].get("internal_errors", 0) == 0


# ---------------------------------------------------------------------- backends that fail
@pytest.mark.parametrize("good", [None, 3])
def test_a_backend_exception_is_a_typed_error_after_the_chunks(backend, good) -> None:
    with (
        ThreadWorker(thread_config(), {LM: BrokenLM(backend, good), "ok": backend}) as w,
        CloudClient(w.endpoint) as c,
    ):
        call = c.generate(LM, "abc", timeout_s=5)
        got: list[RemoteChunk] = []
        with pytest.raises(errors.BackendFailure) as e:
            for chunk in call:
                got.append(chunk)
        assert e.value.code == "backend.error" and e.value.exception == "RuntimeError"
        assert sum(len(ch.tokens) for ch in got) == (good or 0)
        assert read_all(c.generate("ok", "abc", timeout_s=5))  # still serving
        h = wait_idle(c)
        assert h["failed"] == 1 and h["completed"] == 1
        assert c.health()["counters"]["backend_errors"] == 1


# ---------------------------------------------------------------------- losing the worker
def test_a_draining_worker_interrupts_its_streams(backend) -> None:
    w = ThreadWorker(thread_config(), {LM: SlowLM(backend, per_token_s=0.005)})
    with w, CloudClient(w.endpoint) as c:
        call = c.generate(LM, "abc", LONG, timeout_s=30)
        next(iter(call))
        w.worker.stop()
        with pytest.raises(errors.StreamInterrupted, match="shutting down") as e:
            read_all(call)
        assert e.value.tokens == call.tokens > 0
        assert w.worker.streams is not None and w.worker.streams.counters["shut_down"] == 1


@pytest.mark.slow
def test_a_worker_killed_mid_stream_interrupts_it_quickly(lm_models) -> None:
    w = WorkerProcess(lm_config(lm_models)).start()
    try:
        with CloudClient(w.endpoint) as c, c.generate(LM, "abc", LONG, timeout_s=30) as call:
            stream = iter(call)
            next(stream)
            w.kill()  # SIGKILL: no drain, no goodbye
            t0 = time.monotonic()
            with pytest.raises(errors.StreamInterrupted) as e:
                for _ in stream:
                    pass
            waited = time.monotonic() - t0
    finally:
        w.kill()
    assert waited < 2.0, f"noticed after {waited:.2f} s"
    print(f"\nstream interrupted {waited * 1e3:.0f} ms after the SIGKILL, {call.tokens} tokens in")
    assert e.value.tokens == call.tokens > 0 and e.value.code == "stream.interrupted"
    assert errors.error_from_wire(e.value.to_wire()).tokens == call.tokens


# ---------------------------------------------------------------------- the stream table alone
class FakeRoute:
    """A ``send`` for a WorkerStreams: SENT (decoding what was sent), BLOCKED or GONE."""

    def __init__(self) -> None:
        self.state = SENT
        self.got: list[Envelope] = []

    def __call__(self, route: list[Any], frames: list[Any]) -> int:
        if self.state == SENT:
            self.got.append(WireCodec().decode([bytes(f) for f in frames]))
        return self.state


ENGINES: list[Engine] = []  # closed by the close_engines fixture


@pytest.fixture(autouse=True)
def close_engines():
    yield
    while ENGINES:
        ENGINES.pop().close()


def table_with(
    backend: Any, fake: FakeRoute, *, engine: bool = False, **spec: Any
) -> WorkerStreams:
    """A stream table as the worker makes it: each stream's producer on a thread of its own,
    or with ``engine`` on the model's engine."""

    def failure(model: str, e: Exception) -> errors.TandemError:
        return errors.BackendFailure(str(e), exception=type(e).__name__)

    engines = None
    if engine:
        ENGINES.append(
            Engine(LM, backend, step_tokens=512, prefill_chunk=256, max_queued_prefill=1 << 16)
        )
        engines = {LM: ENGINES[-1]}
    gen = GenerationSpec(**spec)
    return WorkerStreams(gen, {LM: backend}, WireCodec(), fake, failure, lambda: None, engines)


def pump_until(table: WorkerStreams, done, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline
        table.pump(time.monotonic())
        time.sleep(0.002)


@pytest.mark.parametrize("engine", [False, True], ids=["thread", "engine"])
def test_a_blocked_reader_applies_backpressure_and_gets_one_coalesced_chunk(
    backend, engine: bool
) -> None:
    fake = FakeRoute()
    table = table_with(backend, fake, engine=engine, buffer_tokens=8)
    try:
        fake.state = BLOCKED
        env = generate_env(gen_payload(max_tokens=50))
        table.start([b"peer"], env)
        stream = table._streams[env.id]
        pump_until(table, lambda: stream.produced == 8)
        time.sleep(0.1)
        table.pump(time.monotonic())
        assert stream.produced == 8 and stream.sent == 0  # the model waits for the reader
        fake.state = SENT
        table.pump(time.monotonic())
        first = fake.got[0]
        assert first.kind is Kind.CHUNK and first.payload["seq"] == 0
        assert len(first.payload["tokens"]) == 8  # everything buffered, in one chunk
        pump_until(table, lambda: table.active == 0)
        chunks = [e.payload for e in fake.got if e.kind is Kind.CHUNK]
        tokens = [t for p in chunks for t in p["tokens"]]
        steps, _ = reference(backend, "abc", SamplingParams(max_tokens=50))
        assert tokens == [s.token for s in steps]
        assert fake.got[-1].kind is Kind.END and fake.got[-1].payload["tokens"] == 50
    finally:
        table.close()


@pytest.mark.parametrize("engine", [False, True], ids=["thread", "engine"])
def test_a_stalled_or_gone_reader_frees_the_stream(backend, engine: bool) -> None:
    fake = FakeRoute()
    table = table_with(backend, fake, engine=engine, buffer_tokens=4, stall_timeout_ms=100)
    try:
        fake.state = BLOCKED
        table.start([b"stalled"], generate_env(gen_payload(max_tokens=500)))
        pump_until(table, lambda: table.active == 0)
        assert table.counters["stalled"] == 1 and table.counters["final_dropped"] == 1
        fake.state = GONE
        table.start([b"gone"], generate_env(gen_payload(max_tokens=500)))
        pump_until(table, lambda: table.active == 0)
        assert table.counters["peer_gone"] == 1
    finally:
        table.close()


def test_parse_generate_defaults_and_limits() -> None:
    req = parse_generate({"model": LM, "prompt": "hi"}, 10)
    assert req.params == SamplingParams() and req.first_token_ms is None
    req = parse_generate(gen_payload(temperature=1, stop=["x"], seed=3, first_token_ms=0), 10)
    assert req.params.temperature == 1.0 and req.params.stop == ("x",) and req.first_token_ms == 0
    with pytest.raises(errors.BadRequest, match="max_prompt_bytes"):
        parse_generate(gen_payload(prompt="ab"), 1)
