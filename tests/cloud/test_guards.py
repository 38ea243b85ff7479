"""The worker's deadline guards, held by what a client and the model see: a request whose budget
is spent — on arrival (``infer``, ``experts``, ``generate``) or while it waits in the queue — is
answered ``DeadlineExceeded`` and never reaches model code, and no late result follows. A worker
in a thread of this test, on a real loopback socket, with backends that record every call."""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import pytest
import zmq

from tandem.cloud.config import WorkerConfig
from tandem.runtime.backends import ExpertsBackend
from tandem.runtime.generation import BackendStream, FinishReason, SamplingParams, TokenStep
from tandem.runtime.manifest import TensorSpec
from tandem.runtime.wire import Envelope, Kind, WireCodec
from tests.peers import ThreadWorker, raw_socket

pytestmark = pytest.mark.integration

ROWS = "rows"  # an array model
MOE = "moe"  # an MoE model serving its experts
LM = "lm"  # a language model
SPENT = -1.0  # a deadline this far in the past: encoded as a budget of 0 µs


class Recorder:
    """Every call into model code, by name, with the rows or prompt it got."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.lock = threading.Lock()

    def record(self, what: str, arg: Any) -> None:
        with self.lock:
            self.calls.append((what, arg))

    def seen(self) -> list[str]:
        with self.lock:
            return [what for what, _ in self.calls]


class RowsBackend:
    """``y = 2x``; ``run`` takes ``run_s`` (a slow model keeps the loop busy)."""

    version = "1"
    input_spec = TensorSpec(name="x", dtype="float32", shape=[None, 4])
    output_spec = TensorSpec(name="y", dtype="float32", shape=[None, 4])

    def __init__(self, rec: Recorder, name: str = ROWS, run_s: float = 0.0) -> None:
        self.rec, self.name, self.run_s = rec, name, run_s

    def check_batch(self, batch: np.ndarray) -> np.ndarray:
        self.rec.record("check_batch", batch.copy())
        return np.asarray(batch, np.float32)

    def warm_up(self) -> None:
        pass

    def predict(self, batch: np.ndarray) -> np.ndarray:
        return self.run(self.check_batch(batch))

    def run(self, batch: np.ndarray) -> np.ndarray:
        self.rec.record("run", batch.copy())
        time.sleep(self.run_s)
        return batch * 2


class ExpertsRowsBackend(RowsBackend):
    """:class:`RowsBackend` that also serves its 4 experts (expert ``e`` adds ``e``)."""

    n_experts = 4
    hidden = 4

    def __init__(self, rec: Recorder) -> None:
        super().__init__(rec)
        self.hosted = [0, 1, 2, 3]

    def run_experts(self, experts: list[int], counts: list[int], rows: np.ndarray) -> np.ndarray:
        self.rec.record("run_experts", rows.copy())
        return rows + np.repeat(np.array(experts, np.float32), counts)[:, None]


class RecordingLM:
    """A language model that answers "ok"."""

    name, version = LM, "1"

    def __init__(self, rec: Recorder) -> None:
        self.rec = rec

    def stream(
        self, prompt: str, params: SamplingParams, *, cancel: threading.Event | None = None
    ) -> BackendStream:
        self.rec.record("stream", prompt)

        def steps():
            yield TokenStep(token=1, text="ok", logprob=-0.1)
            return FinishReason.STOP

        return BackendStream(steps(), prompt_tokens=len(prompt))

    def warm_up(self) -> None:
        pass

    def close(self) -> None:
        pass


def config(**overrides: Any) -> WorkerConfig:
    return WorkerConfig.model_validate({"bind": "tcp://127.0.0.1:*", **overrides})


def infer_env(x: np.ndarray, deadline: float | None = None, model: str = ROWS) -> Envelope:
    return Envelope(kind=Kind.INFER, deadline=deadline, payload={"model": model, "inputs": x})


def replies_to(sock: zmq.Socket, n: int, timeout_s: float = 10.0) -> list[Envelope]:
    """The next ``n`` replies; then checks that nothing more comes for a moment."""
    codec, out = WireCodec(), []
    end = time.monotonic() + timeout_s
    while len(out) < n:
        assert sock.poll(max(1, int((end - time.monotonic()) * 1e3))), f"{len(out)}/{n} replies"
        out.append(codec.decode(sock.recv_multipart()))
    assert not sock.poll(300), "a reply more than expected"
    return out


def test_the_recording_backends_fit_the_protocols() -> None:
    from tandem.cloud.streams import is_generation_backend

    rec = Recorder()
    assert isinstance(ExpertsRowsBackend(rec), ExpertsBackend)
    assert not isinstance(RowsBackend(rec), ExpertsBackend)
    assert is_generation_backend(RecordingLM(rec))


# ---------------------------------------------------------------------- on arrival
@pytest.mark.parametrize("kind", [Kind.INFER, Kind.EXPERTS])
def test_work_that_arrives_with_no_budget_is_refused_and_never_reaches_the_model(kind) -> None:
    rec = Recorder()
    x = np.ones((2, 4), np.float32)
    if kind is Kind.INFER:
        spent = infer_env(x, deadline=time.monotonic() + SPENT)
        fresh = infer_env(x, deadline=time.monotonic() + 30)
    else:
        payload = {"model": ROWS, "experts": [1, 3], "counts": [1, 1], "rows": x}
        spent = Envelope(kind=kind, deadline=time.monotonic() + SPENT, payload=payload)
        fresh = Envelope(kind=kind, deadline=time.monotonic() + 30, payload=payload)
    with ThreadWorker(config(), {ROWS: ExpertsRowsBackend(rec)}) as w:
        s, codec = raw_socket(w.endpoint), WireCodec()
        try:
            s.send_multipart(codec.encode(spent), copy=False)
            (r,) = replies_to(s, 1)
            assert rec.seen() == []  # not checked, not queued, not run
            s.send_multipart(codec.encode(fresh), copy=False)  # the same, with time left
            (ok,) = replies_to(s, 1)
        finally:
            s.close()
        counters = w.worker.health()["counters"]
    assert r.id == spent.id and r.kind is Kind.ERROR
    assert r.payload["code"] == "deadline_exceeded"
    assert "reached the worker" in r.payload["message"]
    assert "expired" not in counters  # refused on arrival, not after queueing
    assert ok.kind is Kind.RESULT and rec.seen()  # the model was there all along


def test_generate_that_arrives_with_no_budget_is_refused_and_starts_no_stream() -> None:
    rec = Recorder()
    payload = {"model": LM, "prompt": "abc", "max_tokens": 4}
    spent = Envelope(kind=Kind.GENERATE, deadline=time.monotonic() + SPENT, payload=payload)
    fresh = Envelope(kind=Kind.GENERATE, deadline=time.monotonic() + 30, payload=payload)
    with ThreadWorker(config(), {LM: RecordingLM(rec)}) as w:
        s, codec = raw_socket(w.endpoint), WireCodec()
        try:
            s.send_multipart(codec.encode(spent), copy=False)
            (r,) = replies_to(s, 1)  # one error: no chunk before it, no end after it
            streams = w.worker.health()["streams"]
            assert rec.seen() == []
            s.send_multipart(codec.encode(fresh), copy=False)
            codec_replies = []
            while not codec_replies or codec_replies[-1].kind is Kind.CHUNK:
                assert s.poll(10_000)
                codec_replies.append(codec.decode(s.recv_multipart()))
        finally:
            s.close()
    assert r.id == spent.id and r.kind is Kind.ERROR
    assert r.payload["code"] == "deadline_exceeded"
    assert "reached the worker" in r.payload["message"]
    assert streams.get("started", 0) == 0 and streams["active"] == 0
    assert codec_replies[-1].kind is Kind.END and rec.seen() == ["stream"]


# ---------------------------------------------------------------------- while queued
def test_a_request_whose_budget_runs_out_while_queued_is_not_run_and_gets_no_late_answer() -> None:
    """A slow batch holds the loop; meanwhile a second slow request and a short-budget one for
    another model arrive. The loop reads both in one turn and queues them; the slow batch runs
    first (0.6 s), so the short budget (0.1 s) runs out in the queue: that request is answered
    ``DeadlineExceeded`` when its turn comes, its rows never reach the model, and nothing else
    is sent for it (no late result)."""
    rec = Recorder()
    slow, fast = RowsBackend(rec, "slow", run_s=0.6), RowsBackend(rec, ROWS)
    with ThreadWorker(config(), {"slow": slow, ROWS: fast}) as w:
        s, codec = raw_socket(w.endpoint), WireCodec()
        try:
            busy = infer_env(np.full((1, 4), 1, np.float32), model="slow")
            s.send_multipart(codec.encode(busy), copy=False)
            t0 = time.monotonic()
            while "run" not in rec.seen():  # the slow batch has started: the loop is busy
                assert time.monotonic() - t0 < 10
                time.sleep(0.002)
            behind = infer_env(np.full((1, 4), 2, np.float32), model="slow")
            short = infer_env(np.full((1, 4), 3, np.float32), deadline=time.monotonic() + 0.1)
            s.send_multipart(codec.encode(behind), copy=False)
            s.send_multipart(codec.encode(short), copy=False)
            replies = {r.id: r for r in replies_to(s, 3)}
        finally:
            s.close()
        counters = w.worker.health()["counters"]
    assert replies[busy.id].kind is Kind.RESULT and replies[behind.id].kind is Kind.RESULT
    r = replies[short.id]
    assert r.kind is Kind.ERROR and r.payload["code"] == "deadline_exceeded", r.payload
    assert "while queued" in r.payload["message"]
    ran = [arg for what, arg in rec.calls if what == "run"]
    assert len(ran) == 2 and not any((rows == 3).any() for rows in ran)  # never run
    assert counters["expired"] == 1
