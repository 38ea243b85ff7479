"""Sequence models (a dynamic length axis, ``(N, L)``) on a worker, and the worker's failure
boundary: requests of different lengths in one batch are never joined, and nothing a backend
raises or returns ends the worker or reaches a request it does not concern."""

from __future__ import annotations

import multiprocessing
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

from tandem.cloud.config import WorkerConfig
from tandem.cloud.process import WorkerProcess
from tandem.runtime import errors
from tandem.runtime.backends.onnx import OnnxBackend
from tandem.runtime.client import CloudClient
from tandem.runtime.manifest import TensorSpec
from tandem.runtime.registry import add_onnx_model
from tandem.runtime.wire import Envelope, Kind, WireCodec
from tests.peers import ThreadWorker, raw_socket

SEQ = "seq-classifier"
VOCAB, DIM, CLASSES = 50, 8, 4
ROWS = 8  # per request
LENGTHS = (3, 7)  # the sequence length of a request: uniform in [3, 7]


def seq_onnx(path: Path) -> Path:
    """A bag-of-embeddings text classifier: token ids ``(N, L)`` int64, both axes dynamic →
    mean of their embeddings → a linear layer → logits ``(N, 4)``. A token id outside the
    vocabulary makes ONNX Runtime's Gather fail, which is how a request fails on its own."""
    # here, not at the top: the client processes import this module, and onnx takes 2 s
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(7)
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["emb", "tokens"], ["e"]),
            helper.make_node("ReduceMean", ["e"], ["m"], axes=[1], keepdims=0),
            helper.make_node("MatMul", ["m", "w"], ["logits"]),
        ],
        "seq",
        [helper.make_tensor_value_info("tokens", TensorProto.INT64, ["N", "L"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])],
        [
            numpy_helper.from_array(rng.normal(size=(VOCAB, DIM)).astype(np.float32), "emb"),
            numpy_helper.from_array(rng.normal(size=(DIM, CLASSES)).astype(np.float32), "w"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def seq_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models directory with the sequence classifier registered as ``tandem models add``
    does it (the registry must accept a dynamic non-batch axis)."""
    src = seq_onnx(tmp_path_factory.mktemp("seq-src") / "seq.onnx")
    root = tmp_path_factory.mktemp("seq-models")
    added = add_onnx_model(root, src, name=SEQ)
    assert added.entry.input.shape == [None, None] and added.n_classes == CLASSES
    return root


def thread_config(**overrides: Any) -> WorkerConfig:
    """A worker that holds a batch for 300 ms: requests sent together run as one batch."""
    base = {
        "bind": "tcp://127.0.0.1:*",
        "batching": {"max_batch": 64, "max_wait_us": 300_000},
    }
    return WorkerConfig.model_validate({**base, **overrides})


Replies = dict[bytes, list[Envelope]]


def receive(sock: zmq.Socket, ids: set[bytes], replies: Replies, settle_s: float) -> Replies:
    """Add every reply that comes to ``replies``, by request id (a list each, so a second
    answer to one request shows), until each of ``ids`` has one (10 s at most) and then
    ``settle_s`` more without any."""
    codec = WireCodec()
    while sock.poll(10_000 if ids - replies.keys() else int(settle_s * 1e3)):
        r = codec.decode(sock.recv_multipart())
        replies.setdefault(r.id, []).append(r)
    return replies


def exchange(endpoint: str, envs: list[Envelope], settle_s: float = 0.2) -> Replies:
    """Send ``envs`` back to back on one socket (so they reach the worker together) and
    gather the replies."""
    codec, sock = WireCodec(), raw_socket(endpoint)
    try:
        for e in envs:
            sock.send_multipart(codec.encode(e), copy=False)
        return receive(sock, {e.id for e in envs}, {}, settle_s)
    finally:
        sock.close()


def infer_env(model: str, x: np.ndarray) -> Envelope:
    return Envelope(kind=Kind.INFER, payload={"model": model, "inputs": x})


def tokens(rng: np.random.Generator, length: int, rows: int = ROWS) -> np.ndarray:
    return rng.integers(0, VOCAB, size=(rows, length), dtype=np.int64)


# ---------------------------------------------------------------------- in one batch
def test_two_lengths_in_one_batch_each_run_alone_and_get_their_own_rows(seq_models: Path) -> None:
    backend = OnnxBackend(seq_models / "seq.onnx", name=SEQ)
    rng = np.random.default_rng(0)
    xs = [tokens(rng, 3), tokens(rng, 5), tokens(rng, 3, rows=2)]
    envs = [infer_env(SEQ, x) for x in xs]
    with ThreadWorker(thread_config(), {SEQ: backend}) as w:
        replies = exchange(w.endpoint, envs)
        counters = w.worker.health()["counters"]
    assert set(replies) == {e.id for e in envs}
    for e, x in zip(envs, xs, strict=True):
        (r,) = replies[e.id]
        assert r.kind is Kind.RESULT, r.payload
        np.testing.assert_allclose(r.payload["outputs"], backend.predict(x), rtol=1e-6)
    # one batch of two lengths: the two L=3 requests joined (10 rows), the L=5 one alone
    assert sorted(replies[e.id][0].payload["batch_rows"] for e in envs) == [8, 10, 10]
    assert counters["mixed_batches"] == 1 and counters["batches"] == 2
    assert "internal_errors" not in counters and "backend_errors" not in counters


class HostileBackend:
    """An honest model (``y = [sum(x), max(x)]`` per row) on rows whose first value is not
    negative, that misbehaves one way (``mode``) on a batch holding a row whose first value
    is negative: the request that brought that row is the one concerned."""

    name, version = "hostile", "1"
    input_spec = TensorSpec(name="x", dtype="float32", shape=[None, None])
    output_spec = TensorSpec(name="y", dtype="float32", shape=[None, 2])

    def __init__(self, mode: str) -> None:
        self.mode = mode

    @staticmethod
    def honest(batch: np.ndarray) -> np.ndarray:
        return np.stack([batch.sum(axis=1), batch.max(axis=1)], axis=1).astype(np.float32)

    def check_batch(self, batch: np.ndarray) -> Any:
        if (batch[:, 0] < 0).any():
            if self.mode == "check_returns_list":
                return batch.tolist()
            if self.mode == "check_drops_a_row":
                return batch[1:]
        return batch

    def warm_up(self) -> None:
        pass

    def predict(self, batch: np.ndarray) -> Any:
        return self.run(self.check_batch(batch))

    def run(self, batch: np.ndarray) -> Any:
        good = self.honest(batch)
        poisoned = batch[:, 0] < 0
        if not poisoned.any():
            return good
        mode = self.mode
        if mode == "raises":
            raise ZeroDivisionError("boom")
        if mode == "raises_a_huge_message":
            raise RuntimeError("x" * 50_000_000)
        if mode == "nan" or mode == "inf":
            good[poisoned] = np.nan if mode == "nan" else np.inf
            return good
        bad = {
            "returns_none": None,
            "returns_a_list": good.tolist(),
            "returns_two_outputs": (good, good),
            "returns_a_scalar": np.float32(1.0),
            "returns_a_row_too_few": good[:-1],
            "returns_a_row_too_many": np.concatenate([good, good[:1]]),
            "returns_objects": good.astype(object),
            "returns_complex": good.astype(np.complex64),
            "returns_strings": good.astype(str),
            "returns_too_many_dims": good.reshape(len(good), 2, *[1] * 40),  # numpy >= 2
            "returns_too_much": np.zeros((len(batch), 40_000), np.float32),  # > 64 KiB a row
        }
        return bad[mode]


_MODES = [
    "raises",
    "raises_a_huge_message",
    "nan",
    "inf",
    "returns_none",
    "returns_a_list",
    "returns_two_outputs",
    "returns_a_scalar",
    "returns_a_row_too_few",
    "returns_a_row_too_many",
    "returns_objects",
    "returns_complex",
    "returns_strings",
    "returns_too_many_dims",
    "returns_too_much",
    "check_returns_list",
    "check_drops_a_row",
]


@pytest.mark.parametrize("mode", _MODES)
def test_nothing_a_backend_does_escapes_the_worker_or_reaches_other_requests(mode: str) -> None:
    rng = np.random.default_rng(1)
    xs = [rng.uniform(0, 1, size=(2, n)).astype(np.float32) for n in (3, 3, 5, 3)]
    xs[1][1, 0] = -1.0  # the poisoned request, in a batch with one of its length and others
    envs = [infer_env("hostile", x) for x in xs]
    cfg = thread_config(limits={"max_message_bytes": 65_536})
    with ThreadWorker(cfg, {"hostile": HostileBackend(mode)}) as w:
        replies = exchange(w.endpoint, envs)
        after = exchange(w.endpoint, [infer_env("hostile", xs[0])])  # still serving
        health = w.worker.health()
    assert {k: len(v) for k, v in replies.items()} == {e.id: 1 for e in envs}  # each once
    for i, (e, x) in enumerate(zip(envs, xs, strict=True)):
        r = replies[e.id][0]
        if i == 1:
            assert r.kind is Kind.ERROR, r.payload
            assert r.payload["code"] == "backend.error"
            want = {"raises": "ZeroDivisionError", "raises_a_huge_message": "RuntimeError"}
            assert r.payload["exception"] == want.get(mode, "BadOutput")
            assert len(r.payload["message"]) < 3000
        else:
            assert r.kind is Kind.RESULT, r.payload
            np.testing.assert_array_equal(r.payload["outputs"], HostileBackend.honest(x))
    ((r,),) = after.values()
    assert r.kind is Kind.RESULT
    assert health["state"] == "serving" and "internal_errors" not in health["counters"]
    assert health["queue_depth"] == 0


def test_a_bug_of_ours_in_a_batch_is_answered_once_per_request_and_the_loop_goes_on() -> None:
    """The last resort in ``_run_batch``: past the backend, worker code that raises (here the
    batcher's bookkeeping) answers each request of the batch once, as an internal error."""
    rng = np.random.default_rng(2)
    xs = [rng.uniform(0, 1, size=(2, n)).astype(np.float32) for n in (3, 5, 3)]
    envs = [infer_env("hostile", x) for x in xs]
    with ThreadWorker(thread_config(), {"hostile": HostileBackend("honest")}) as w:
        record_run = w.worker.batcher.record_run

        def broken(*args: Any) -> None:
            raise KeyError("a bug")

        w.worker.batcher.record_run = broken  # type: ignore[method-assign]
        replies = exchange(w.endpoint, envs)
        w.worker.batcher.record_run = record_run  # type: ignore[method-assign]
        after = exchange(w.endpoint, [infer_env("hostile", xs[0])])
        health = w.worker.health()
    assert {k: len(v) for k, v in replies.items()} == {e.id: 1 for e in envs}
    assert all(v[0].payload["code"] == "internal" for v in replies.values())
    assert all(v[0].kind is Kind.RESULT for v in after.values())
    assert health["counters"]["internal_errors"] == 1 and health["queue_depth"] == 0


def test_requests_of_one_shape_but_two_dtypes_are_not_joined() -> None:
    """A backend whose ``check_batch`` keeps the dtype it was sent: float32 and float64 rows
    of one shape run as two calls, each in its own dtype."""
    seen: list[np.dtype] = []

    class KeepsDtype(HostileBackend):
        def run(self, batch: np.ndarray) -> np.ndarray:
            seen.append(batch.dtype)
            return self.honest(batch)

    x32, x64 = np.ones((2, 3), np.float32), np.full((2, 3), 2.0)
    envs = [infer_env("hostile", x32), infer_env("hostile", x64)]
    with ThreadWorker(thread_config(), {"hostile": KeepsDtype("honest")}) as w:
        replies = exchange(w.endpoint, envs)
    assert all(replies[e.id][0].kind is Kind.RESULT for e in envs)
    assert sorted(map(str, seen)) == ["float32", "float64"]


# ---------------------------------------------------------------------- under load
_PROCS, _THREADS, _REQUESTS, _BURST = 3, 2, 30, 3
_BAD_EVERY = 10  # about one request in 10 holds a token id outside the vocabulary


def _client_thread(endpoint: str, seed: int, out: list[dict[str, Any]]) -> None:
    """``_REQUESTS`` requests of ``ROWS`` rows and random lengths on one socket, ``_BURST``
    at a time; every reply recorded (a late second answer, or one to an id never sent,
    included)."""
    rng = np.random.default_rng(seed)
    codec, sock = WireCodec(), raw_socket(endpoint)
    sent: dict[bytes, np.ndarray] = {}
    replies: Replies = {}
    try:
        for _ in range(_REQUESTS // _BURST):
            burst = []
            for _ in range(_BURST):
                x = tokens(rng, int(rng.integers(LENGTHS[0], LENGTHS[1] + 1)))
                if rng.integers(_BAD_EVERY) == 0:
                    x[int(rng.integers(ROWS)), 0] = VOCAB
                burst.append(infer_env(SEQ, x))
                sent[burst[-1].id] = x
            for e in burst:
                sock.send_multipart(codec.encode(e), copy=False)
            receive(sock, {e.id for e in burst}, replies, settle_s=0.0)
        receive(sock, set(), replies, settle_s=0.3)
    finally:
        sock.close()
    out.extend({"id": k, "stray": len(v)} for k, v in replies.items() if k not in sent)
    out.extend(
        {
            "id": k,
            "inputs": x,
            "kinds": [r.kind.value for r in replies.get(k, [])],
            "payloads": [r.payload for r in replies.get(k, [])],
        }
        for k, x in sent.items()
    )


def _client_process(args: tuple[str, int]) -> list[dict[str, Any]]:
    endpoint, seed = args
    out: list[dict[str, Any]] = []
    threads = [
        threading.Thread(target=_client_thread, args=(endpoint, seed * 100 + t, out))
        for t in range(_THREADS)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


@pytest.mark.integration
def test_sequence_model_under_concurrent_load_from_several_processes(seq_models: Path) -> None:
    import onnxruntime as ort

    cfg = WorkerConfig.model_validate(
        {
            "bind": "tcp://127.0.0.1:*",
            "models_dir": str(seq_models),
            "threads": 1,
            "batching": {"max_batch": 64, "max_wait_us": 2_000},
        }
    )
    with WorkerProcess(cfg) as w:
        assert w.endpoint is not None
        with multiprocessing.get_context("spawn").Pool(_PROCS) as pool:
            per_proc = pool.map(_client_process, [(w.endpoint, p) for p in range(_PROCS)])
        with CloudClient(w.endpoint) as c:
            health = c.health(timeout_s=5)
        assert w.proc is not None and w.proc.poll() is None  # still alive
    records = [r for proc in per_proc for r in proc]
    assert not [r for r in records if "stray" in r]  # no reply to a request never sent
    assert len(records) == _PROCS * _THREADS * _REQUESTS
    assert len({r["id"] for r in records}) == len(records)
    assert all(len(r["kinds"]) == 1 for r in records)  # none lost, none answered twice
    session = ort.InferenceSession(str(seq_models / "seq.onnx"), providers=["CPUExecutionProvider"])
    n_bad = 0
    for r in records:
        x, kind, payload = r["inputs"], r["kinds"][0], r["payloads"][0]
        if (x >= VOCAB).any():
            n_bad += 1
            assert kind == Kind.ERROR.value, payload  # ONNX Runtime's Gather refused it
            assert issubclass(errors.error_class(payload["code"]), errors.BackendError), payload
        else:
            assert kind == Kind.RESULT.value, payload
            assert payload["outputs"].shape == (ROWS, CLASSES)
            alone = session.run(None, {"tokens": x})[0]
            np.testing.assert_allclose(payload["outputs"], alone, rtol=1e-5, atol=1e-6)
    assert 0 < n_bad < len(records)
    counters = health["counters"]
    assert health["state"] == "serving" and health["queue_depth"] == 0
    assert counters["infer"] == len(records) and counters["backend_errors"] >= n_bad
    assert counters["mixed_batches"] >= 1  # batches of several lengths did happen
    assert "internal_errors" not in counters and "replies_dropped" not in counters
