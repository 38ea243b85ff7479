"""EdgeRuntime against real ONNX sessions and a real worker process on loopback."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tandem.cloud.process import WorkerProcess
from tandem.edge import EdgeRuntime, EscalationLog, Tier
from tandem.reference.models import CLOUD
from tandem.runtime.backends.onnx import OnnxBackend
from tandem.runtime.client import CloudClient
from tandem.runtime.errors import BadRequest
from tests.peers import free_endpoint


def infer_count(endpoint: str) -> int:
    with CloudClient(endpoint) as c:
        return c.health()["counters"].get("infer", 0)


def test_edge_only_policy_answers_locally(make_policy, tiny_models: Path, digits_x) -> None:
    with EdgeRuntime.from_policy(make_policy(None, threshold=0.99, log=False)) as rt:
        r = rt.infer(digits_x[0])
        want = OnnxBackend(tiny_models / "edge-int8.onnx").predict(digits_x[:1])[0]
    np.testing.assert_array_equal(r.output, want)
    assert r.tier is Tier.EDGE and r.reason == "no-cloud-target"
    assert r.index == int(np.argmax(want)) and r.label == str(r.index)
    assert 0 < r.confidence <= 1 and set(r.timings) == {"local", "route", "total"}
    assert r.model_versions["edge"]


@pytest.mark.integration
def test_low_confidence_escalates_to_cloud(
    make_policy, worker, tiny_models: Path, digits_x
) -> None:
    with EdgeRuntime.from_policy(make_policy(worker.endpoint, threshold=1.0)) as rt:
        r = rt.infer(digits_x[0], "digits")
        log = rt.escalation_log
        assert log is not None
        [rec] = list(log.records())
    want = OnnxBackend(tiny_models / "cloud-fp32.onnx").predict(digits_x[:1])[0]
    np.testing.assert_allclose(r.output, want, rtol=1e-5, atol=1e-6)
    assert r.tier is Tier.CLOUD and r.reason == "low-confidence"
    assert r.model_versions["cloud"].startswith(f"{CLOUD}@t-")
    assert r.timings["cloud"] > 0 and r.request_id == rec.request_id
    np.testing.assert_array_equal(rec.input, digits_x[0:1].reshape(1, 64)[0])
    np.testing.assert_allclose(rec.cloud_output, r.output)
    assert rec.tier == "cloud" and rec.error is None and rec.input_digest


@pytest.mark.integration
def test_private_tag_never_reaches_the_worker(make_policy, worker, digits_x) -> None:
    with EdgeRuntime.from_policy(make_policy(worker.endpoint, threshold=1.0)) as rt:
        before = infer_count(worker.endpoint)
        results = [rt.infer(x, tags={"private", "critical"}) for x in digits_x]
        assert infer_count(worker.endpoint) == before  # counted on the worker's side
        assert all(r.tier is Tier.EDGE and r.reason == "rule:private" for r in results)
        rt.infer(digits_x[0])
        assert infer_count(worker.endpoint) == before + 1


@pytest.mark.integration
def test_critical_tag_escalates_even_when_confident(make_policy, worker, digits_x) -> None:
    with EdgeRuntime.from_policy(make_policy(worker.endpoint, threshold=0.0)) as rt:
        assert rt.infer(digits_x[0]).tier is Tier.EDGE
        r = rt.infer(digits_x[0], tags=("critical",))
    assert r.tier is Tier.CLOUD and r.reason == "rule:critical"


def test_worker_down_degrades_within_the_deadline(make_policy, digits_x) -> None:
    with EdgeRuntime.from_policy(make_policy(free_endpoint(), threshold=1.0, deadline_ms=50)) as rt:
        t0 = time.perf_counter()
        r = rt.infer(digits_x[0])
        elapsed_ms = (time.perf_counter() - t0) * 1e3
        [rec] = list(rt.escalation_log.records())
        t0 = time.perf_counter()
        r2 = rt.infer(digits_x[1])  # the link is now known to be down: no waiting
        elapsed2_ms = (time.perf_counter() - t0) * 1e3
        assert len(rt.escalation_log) == 2
    assert r.tier is Tier.EDGE_DEGRADED and "cloud-unavailable" in r.reason
    assert elapsed_ms < 50 + 40  # the deadline plus scheduling slack on a loaded machine
    assert r2.tier is Tier.EDGE_DEGRADED and elapsed2_ms < 25
    assert r.index >= 0 and r.label is not None  # the edge's own answer
    assert rec.tier == "edge-degraded" and rec.cloud_output is None and "unavailable" in rec.error


@pytest.mark.integration
def test_slow_cloud_degrades_and_late_reply_is_not_mistaken(
    make_policy, make_worker_config, digits_x
) -> None:
    cfg = make_worker_config(batching={"max_wait_us": 300_000})  # every request waits 300 ms
    with (
        WorkerProcess(cfg) as w,
        EdgeRuntime.from_policy(make_policy(w.endpoint, threshold=1.0)) as rt,
    ):
        t0 = time.perf_counter()
        r = rt.infer(digits_x[0], deadline_ms=60)
        assert (time.perf_counter() - t0) * 1e3 < 60 + 40
        assert r.tier is Tier.EDGE_DEGRADED and "deadline_exceeded" in r.reason
        time.sleep(0.35)  # the late answer for the first request is now waiting on the socket
        r2 = rt.infer(digits_x[1], deadline_ms=2000)
        assert r2.tier is Tier.CLOUD
        cloud = OnnxBackend(w.config.models_dir / "cloud-fp32.onnx").predict(digits_x[1:2])[0]
        np.testing.assert_allclose(r2.output, cloud, rtol=1e-5, atol=1e-6)


@pytest.mark.integration
def test_eight_threads_share_one_runtime(make_policy, worker, digits_x) -> None:
    n_threads, per_thread = 8, 25
    with EdgeRuntime.from_policy(make_policy(worker.endpoint, threshold=1.0)) as rt:
        results: dict[int, list] = {}
        errors: list[BaseException] = []

        def run(k: int) -> None:
            try:
                results[k] = [rt.infer(digits_x[(k + i) % 16]) for i in range(per_thread)]
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=run, args=(k,)) for k in range(n_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        ids = [r.request_id for rs in results.values() for r in rs]
        assert len(ids) == n_threads * per_thread == len(set(ids))
        assert all(r.tier is Tier.CLOUD for rs in results.values() for r in rs)
        assert len(rt.escalation_log) == n_threads * per_thread
        cloud = OnnxBackend(worker.config.models_dir / "cloud-fp32.onnx").predict(digits_x)
        for k, rs in results.items():  # every thread got its own answers, not another's
            for i, r in enumerate(rs):
                np.testing.assert_allclose(r.output, cloud[(k + i) % 16], rtol=1e-5, atol=1e-6)


@pytest.mark.integration
def test_ainfer(make_policy, worker, digits_x) -> None:
    with EdgeRuntime.from_policy(make_policy(worker.endpoint, threshold=1.0)) as rt:

        async def main():
            return await asyncio.gather(*(rt.ainfer(x) for x in digits_x[:6]))

        results = asyncio.run(main())
    assert [r.tier for r in results] == [Tier.CLOUD] * 6


@pytest.mark.integration
def test_infer_batch_escalates_only_unconfident_rows_in_one_request(
    make_policy, worker, tiny_models, digits_x
) -> None:
    edge = OnnxBackend(tiny_models / "edge-int8.onnx").predict(digits_x)
    p = np.exp(edge - edge.max(1, keepdims=True))
    maxp = (p / p.sum(1, keepdims=True)).max(1)
    threshold = float(np.median(maxp))
    with EdgeRuntime.from_policy(make_policy(worker.endpoint, threshold=threshold)) as rt:
        before = infer_count(worker.endpoint)
        results = rt.infer_batch(digits_x)
        assert infer_count(worker.endpoint) == before + 1
        assert len(rt.escalation_log) == int((maxp < threshold).sum())
    for r, mp in zip(results, maxp, strict=True):
        assert (r.tier is Tier.CLOUD) == (mp < threshold)
    assert rt_infer_batch_empty(make_policy(worker.endpoint)) == []


def rt_infer_batch_empty(policy: Path) -> list:
    with EdgeRuntime.from_policy(policy) as rt:
        return rt.infer_batch(np.zeros((0, 64), np.float32))


def test_bad_calls_are_refused(make_policy, digits_x) -> None:
    with EdgeRuntime.from_policy(make_policy(None, log=False)) as rt:
        with pytest.raises(BadRequest, match="unknown task"):
            rt.infer(digits_x[0], "nope")
        with pytest.raises(BadRequest, match="infer_batch"):
            rt.infer(digits_x[:2])
        with pytest.raises(BadRequest, match=r"\(N, 64\)"):
            rt.infer(np.zeros(63, np.float32))


def test_nan_input_is_refused_not_answered(make_policy, digits_x) -> None:
    # int8 dynamic quantization turns a NaN input into finite, confident-looking logits
    x = digits_x[:3].copy()
    x[1, 3] = np.nan
    with EdgeRuntime.from_policy(make_policy(None, log=False)) as rt:
        with pytest.raises(BadRequest, match=r"rows \[0\] hold NaN or inf"):
            rt.infer(x[1])
        with pytest.raises(BadRequest, match=r"rows \[1\] hold NaN or inf"):
            rt.infer_batch(x)


def test_nan_logits_escalate_and_are_never_a_confident_answer(tmp_path, digits_x) -> None:
    """A model that itself emits NaN: the row is invalid, escalates, and degrades with no label."""
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("Div", ["x", "zero"], ["y"])  # 0/0 = NaN
    g = helper.make_graph(
        [node, helper.make_node("Slice", ["y", "s", "e", "ax"], ["logits"])],
        "nan",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, 10])],
        [
            helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
            helper.make_tensor("s", TensorProto.INT64, [1], [0]),
            helper.make_tensor("e", TensorProto.INT64, [1], [10]),
            helper.make_tensor("ax", TensorProto.INT64, [1], [1]),
        ],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "nan.onnx")
    policy = tmp_path / "p.yaml"
    policy.write_text(
        f"tasks:\n  t:\n    local: {{path: nan.onnx}}\n    gate: {{threshold: 0.0}}\n"
        f"    cloud: {{endpoint: '{free_endpoint()}', model: m}}\n    deadline_ms: 30\n"
    )
    with EdgeRuntime.from_policy(policy) as rt:
        r = rt.infer(np.zeros(64, np.float32))
    assert r.tier is Tier.EDGE_DEGRADED and r.reason.startswith("invalid-edge-output")
    assert r.index == -1 and r.label is None


def test_escalation_log_survives_a_crash(tmp_path: Path) -> None:
    import subprocess
    import sys

    db = tmp_path / "esc.sqlite"
    code = f"""
import os, numpy as np
from tandem.edge import EscalationLog, EscalationRecord
log = EscalationLog({str(db)!r})
for i in range(5):
    log.append(EscalationRecord(ts_ms=i, request_id=str(i), task="t", tier="cloud", reason="r",
        tags=["a"], input=np.full(3, i, np.float32), input_digest="", edge_output=np.zeros(2),
        edge_label=0, edge_confidence=0.5, cloud_output=np.ones(2), cloud_label=1, error=None,
        timings_ms={{"total": 1.0}}, model_versions={{"edge": "v"}}))
assert log.flush()  # committed rows survive a crash; rows still queued would not
os._exit(1)  # no close: a crash
"""
    assert subprocess.run([sys.executable, "-c", code]).returncode == 1
    with EscalationLog(db) as log:
        recs = list(log.records())
    assert [r.request_id for r in recs] == ["0", "1", "2", "3", "4"]
    np.testing.assert_array_equal(recs[4].input, np.full(3, 4, np.float32))
    assert recs[4].tags == ["a"] and recs[4].model_versions == {"edge": "v"}


def test_bring_your_own_model_with_probability_outputs(tmp_path: Path) -> None:
    """Any ONNX classifier works: here a hand-built Gemm + Softmax emitting probabilities."""
    import onnx
    from onnx import TensorProto, helper

    w = np.zeros((4, 3), np.float32)
    w[0, 2] = 5.0  # feature 0 votes for class 2
    g = helper.make_graph(
        [
            helper.make_node("Gemm", ["x", "w"], ["z"]),
            helper.make_node("Softmax", ["z"], ["p"], axis=1),
        ],
        "byo",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("p", TensorProto.FLOAT, [None, 3])],
        [helper.make_tensor("w", TensorProto.FLOAT, [4, 3], w.ravel())],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "byo.onnx")
    (tmp_path / "p.yaml").write_text(
        "tasks:\n  sort:\n    local: {path: byo.onnx, output: probabilities, labels: [a, b, c]}\n"
        "    gate: {metric: margin, threshold: 0.5}\n"
    )
    with EdgeRuntime.from_policy(tmp_path / "p.yaml") as rt:
        sure = rt.infer(np.array([1.0, 0, 0, 0], np.float32))
        unsure = rt.infer(np.zeros(4, np.float32))
    assert sure.label == "c" and sure.tier is Tier.EDGE and sure.reason == "confident"
    assert sure.confidence > 0.9  # the margin, computed from log-probabilities
    np.testing.assert_allclose(unsure.confidence, 0.0, atol=1e-6)  # uniform: zero margin
    assert unsure.reason == "no-cloud-target"


def _dynamic_classes_model(path: Path, w: np.ndarray) -> Path:
    """``x @ w`` with its output declared (N, ?) and reshaped to its own shape at run time, so
    ONNX Runtime reports the class axis as dynamic."""
    import onnx
    from onnx import TensorProto, helper

    g = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["y"]),
            helper.make_node("Shape", ["y"], ["s"]),
            helper.make_node("Reshape", ["y", "s"], ["logits"]),
        ],
        "dynamic-classes",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", w.shape[0]])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", "C"])],
        [helper.make_tensor("w", TensorProto.FLOAT, list(w.shape), w.ravel())],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def test_dynamic_class_axis_escalates_on_the_entropy_gate(tmp_path: Path) -> None:
    w = np.zeros((4, 3), np.float32)
    w[0, 1] = 20.0  # feature 0 votes for class 1; a zero input gives uniform logits
    model = _dynamic_classes_model(tmp_path / "dyn.onnx", w)
    assert OnnxBackend(model).output_spec.shape == [None, None]
    (tmp_path / "p.yaml").write_text(
        "tasks:\n  t:\n    local: {path: dyn.onnx, labels: [a, b, c]}\n"
        "    gate: {metric: entropy, threshold: 0.5}\n"
        f"    cloud: {{endpoint: '{free_endpoint()}', model: m}}\n"
        "    deadline_ms: 50\n"
    )
    with EdgeRuntime.from_policy(tmp_path / "p.yaml") as rt:
        sure = rt.infer(np.array([1.0, 0, 0, 0], np.float32))
        unsure = rt.infer(np.zeros(4, np.float32))
    assert sure.tier is Tier.EDGE and sure.reason == "confident" and sure.label == "b"
    assert unsure.confidence == pytest.approx(1.0)  # uniform over 3 classes: entropy / log 3
    assert unsure.reason.startswith("low-confidence") and unsure.tier is Tier.EDGE_DEGRADED


def test_labels_and_entropy_gate_checked_against_a_dynamic_class_axis(tmp_path: Path) -> None:
    from tandem.runtime.errors import ConfigError, TandemError

    _dynamic_classes_model(tmp_path / "three.onnx", np.ones((4, 3), np.float32))
    _dynamic_classes_model(tmp_path / "one.onnx", np.ones((4, 1), np.float32))
    (tmp_path / "labels.yaml").write_text(
        "tasks:\n  t:\n    local: {path: three.onnx, labels: [a, b]}\n"
        "    gate: {metric: max_prob, threshold: 0.5}\n"
    )
    with pytest.raises(TandemError, match="2 labels for a model with 3 classes"):
        EdgeRuntime.from_policy(tmp_path / "labels.yaml")
    (tmp_path / "one.yaml").write_text(
        "tasks:\n  t:\n    local: {path: one.onnx}\n    gate: {metric: entropy, threshold: 0.5}\n"
    )
    with pytest.raises(ConfigError, match=r"'entropy' .* at least 2 classes, this one has 1"):
        EdgeRuntime.from_policy(tmp_path / "one.yaml")


def test_a_task_that_fails_to_load_leaves_nothing_running(tmp_path: Path) -> None:
    """Opening task b fails after task a and the escalation log are open: the runtime closes
    what it opened (the log's writer thread would otherwise run for the life of the process)."""
    from tandem.runtime.errors import TandemError

    _dynamic_classes_model(tmp_path / "three.onnx", np.ones((4, 3), np.float32))
    (tmp_path / "p.yaml").write_text(
        "escalation_log: {path: esc.sqlite}\n"
        "tasks:\n"
        "  a:\n    local: {path: three.onnx}\n    gate: {metric: max_prob, threshold: 0.5}\n"
        "  b:\n    local: {path: three.onnx, labels: [x, y]}\n"
        "    gate: {metric: max_prob, threshold: 0.5}\n"
    )
    with pytest.raises(TandemError, match="2 labels"):
        EdgeRuntime.from_policy(tmp_path / "p.yaml")
    writers = [t for t in threading.enumerate() if t.name.startswith("tandem-escalation-log")]
    assert not writers, f"left running: {writers}"


@pytest.mark.integration
def test_infer_batch_splits_escalations_to_the_cloud_row_limit(make_policy, worker) -> None:
    x = np.random.default_rng(1).uniform(0, 1, (25, 64)).astype(np.float32)
    policy = make_policy(
        None,
        threshold=1.0,
        log=False,
        cloud={"endpoint": worker.endpoint, "model": CLOUD, "max_rows": 10},
    )
    before = infer_count(worker.endpoint)
    with EdgeRuntime.from_policy(policy) as rt:
        results = rt.infer_batch(x)
    assert [r.tier for r in results] == [Tier.CLOUD] * 25
    assert infer_count(worker.endpoint) - before == 3  # 10 + 10 + 5 rows
