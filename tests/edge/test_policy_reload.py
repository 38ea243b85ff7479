"""Reloading an edge runtime's policy without a restart: real ONNX Runtime sessions, real
policy files (atomic and in-place writes), a real model store, and under load a real worker
process answering escalations while bad and good policies are written."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from tandem.edge import EdgeRuntime
from tandem.edge.policy_reload import STABLE_S, PolicyWatcher, parse_policy_bytes
from tandem.reference.models import CLOUD, LABELS
from tandem.runtime.errors import ConfigError
from tandem.runtime.model_store import ModelStore
from tandem.runtime.types import Tier

WAIT_S = 30.0  # bound on waiting for a watcher (never reached unless something is broken)


def task(models: Path, threshold: float, endpoint: str | None = None, **kw) -> dict:
    t = {
        "local": {"path": str(models / "edge-int8.onnx"), "labels": LABELS},
        "gate": {"metric": "max_prob", "threshold": threshold},
        "deadline_ms": 10_000,
        **kw,
    }
    if endpoint:
        t["cloud"] = {"endpoint": endpoint, "model": CLOUD}
    return t


def policy_doc(tasks: dict, **top) -> dict:
    return {"version": 1, "tasks": tasks, **top}


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_in_place(path: Path, text: str) -> None:
    with path.open("r+" if path.exists() else "w") as f:
        f.truncate(0)
        f.write(text)


def dump(doc: dict) -> str:
    return yaml.safe_dump(doc, sort_keys=False)


def wait_for(cond, what: str) -> None:
    end = time.monotonic() + WAIT_S
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


@pytest.fixture
def x() -> np.ndarray:
    return np.random.default_rng(0).uniform(0, 1, 64).astype(np.float32)


def test_changed_tasks_are_rebuilt_unchanged_ones_kept(tmp_path, tiny_models, x) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(dump(policy_doc({"a": task(tiny_models, 1.0), "b": task(tiny_models, 0.0)})))
    with EdgeRuntime.from_policy(path) as rt:
        a0, b0 = rt._tasks["a"], rt._tasks["b"]
        assert rt.infer(x, "a").reason == "no-cloud-target"  # 1.0: the gate says escalate
        rt.infer(x, "a")
        digest = rt.stats()["policy"]["digest"]
        write_atomic(
            path, dump(policy_doc({"a": task(tiny_models, 0.0), "b": task(tiny_models, 0.0)}))
        )
        r = rt.reload_policy()
        assert r.tasks == {"a": "changed", "b": "unchanged"}
        assert [str(c) for c in r.changes] == ["tasks.a.gate.threshold: 1.0 -> 0.0"]
        assert rt._tasks["b"] is b0 and rt._tasks["a"] is not a0  # b kept its objects
        a1 = rt._tasks["a"]
        assert rt.infer(x, "a").reason == "confident"
        stats = rt.stats()
        assert stats["tasks"]["a"]["stages"]["edge"] == 3  # counters carried over
        assert stats["policy"]["digest"] == r.digest != digest
        assert stats["policy"]["reloads"] == {"applied": 1, "unchanged": 0, "refused": 0}
        # a comment changes nothing
        path.write_text("# reviewed\n" + path.read_text())
        assert not rt.reload_policy().changed
        assert rt._tasks["a"] is a1 and rt.stats()["policy"]["reloads"]["unchanged"] == 1
        # add c, remove b: the tables follow, b's requests now fail as an unknown task would
        _write(path, {"a": task(tiny_models, 0.0), "c": task(tiny_models, 0.0)})
        assert rt.reload_policy().tasks == {"a": "unchanged", "b": "removed", "c": "added"}
        assert sorted(rt.tasks) == ["a", "c"]
        assert rt.infer(x, "c").tier is Tier.EDGE
        with pytest.raises(Exception, match="unknown task 'b'"):
            rt.infer(x, "b")
        # one task left: it is the default again
        _write(path, {"c": task(tiny_models, 0.0)})
        rt.reload_policy()
        assert rt.infer(x).tier is Tier.EDGE


def _write(path: Path, tasks: dict) -> None:
    path.write_text(dump(policy_doc(tasks)))


def bad_policies(
    tmp_path: Path, models: Path, a: str = "a", endpoint: str | None = None
) -> dict[str, tuple[str, str]]:
    """name -> (text of a bad file for task ``a``, what the error must say)."""
    (tmp_path / "garbage.onnx").write_bytes(b"not an onnx model")
    good = task(models, 0.0, endpoint)
    bad_gate = {**good, "gate": {"threshold": 1.5}}
    return {
        "yaml": (f"tasks: {{{a}: [unclosed\n", "not valid YAML"),
        "schema": (dump(policy_doc({a: bad_gate})), f"tasks.{a}.gate.threshold"),
        "unknown key": (
            dump(policy_doc({a: {**good, "gate": {"treshold": 0.1}}})),
            "did you mean 'threshold'",
        ),
        "missing model": (
            dump(policy_doc({a: {**good, "local": {"path": "nope.onnx"}}})),
            f"tasks.{a}: cannot serve it",
        ),
        "broken model": (
            dump(policy_doc({a: {**good, "local": {"path": "garbage.onnx"}}})),
            "cannot load ONNX model",
        ),
        "labels": (
            dump(policy_doc({a: {**good, "local": {**good["local"], "labels": ["x"]}}})),
            "1 labels for a model with 10 classes",
        ),
        "escalation log": (
            dump(policy_doc({a: good}, escalation_log={"path": "other.sqlite"})),
            "restart the runtime",
        ),
        "empty": ("", "tasks: required key is missing"),
    }


def test_bad_policies_are_refused_and_the_old_one_serves(tmp_path, tiny_models, x) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(dump(policy_doc({"a": task(tiny_models, 1.0)})))
    bad = bad_policies(tmp_path, tiny_models)
    with EdgeRuntime.from_policy(path) as rt:
        a0, digest = rt._tasks["a"], rt.stats()["policy"]["digest"]
        for name, (text, says) in bad.items():
            path.write_text(text)
            with pytest.raises(ConfigError, match=says) as e:
                rt.reload_policy()
            assert str(path) in str(e.value), name
            assert rt._tasks["a"] is a0 and rt.infer(x).reason == "no-cloud-target", name
        stats = rt.stats()["policy"]
        assert stats["reloads"] == {"applied": 0, "unchanged": 0, "refused": len(bad)}
        assert stats["digest"] == digest and str(path) in stats["last_error"]


def test_store_version_survives_a_reload_that_keeps_the_model(tmp_path, tiny_models, x) -> None:
    store = ModelStore(tmp_path / "store")
    v1 = store.publish(tiny_models / "edge-int8.onnx").version
    path = tmp_path / "policy.yaml"
    local = {"store": "store", "watch_s": 30}
    doc = policy_doc({"a": task(tiny_models, 1.0)})
    doc["tasks"]["a"]["local"].update(local)
    path.write_text(dump(doc))
    with EdgeRuntime.from_policy(path) as rt:
        assert rt.stats()["tasks"]["a"]["serving"] == v1
        store.publish(tiny_models / "edge-fp32.onnx", make_current=False)  # v0002, not current
        doc["tasks"]["a"]["gate"]["threshold"] = 0.0
        path.write_text(dump(doc))
        assert rt.reload_policy().tasks == {"a": "changed"}
        assert rt.stats()["tasks"]["a"]["serving"] == v1
        assert rt.infer(x).reason == "confident"  # the new threshold, the same version
        store.set_current("v0002")  # the store watcher still works after the reload
        assert rt.reload_models() == {"a": "v0002"}
        store.set_current(v1)  # not reloaded: v0002 serves on
        doc["tasks"]["a"]["local"]["threads"] = 2  # the model section changed: the store's
        path.write_text(dump(doc))  # current version is opened, as at start
        rt.reload_policy()
        assert rt.stats()["tasks"]["a"]["serving"] == v1
        assert rt._swapper._watching == {"a": 30}


def test_watcher_applies_atomic_and_in_place_writes(tmp_path, tiny_models, x, caplog) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(dump(policy_doc({"a": task(tiny_models, 1.0)}, reload={"watch_s": 0.02})))
    with EdgeRuntime.from_policy(path) as rt:
        reloads = lambda: rt.stats()["policy"]["reloads"]  # noqa: E731
        assert rt.stats()["policy"]["watch_s"] == 0.02
        good = policy_doc({"a": task(tiny_models, 0.0)}, reload={"watch_s": 0.02})
        write_atomic(path, dump(good))
        wait_for(lambda: rt.infer(x).reason == "confident", "the atomic write")
        with caplog.at_level(logging.ERROR, logger="tandem.edge.policy_reload"):
            write_in_place(path, "tasks: {a: [half")  # a half-written file: refused
            wait_for(lambda: reloads()["refused"] == 1, "the refusal")
            time.sleep(0.2)  # ten more polls of the same bad content: nothing more
            os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))  # touched: tried again
            wait_for(lambda: reloads()["refused"] == 2, "the retry")
        assert len([r for r in caplog.records if "refused" in r.getMessage()]) == 1
        assert rt.infer(x).reason == "confident"
        good["tasks"]["a"]["gate"]["threshold"] = 1.0
        write_in_place(path, dump(good))
        wait_for(lambda: rt.infer(x).reason == "no-cloud-target", "the in-place write")
        assert reloads() == {"applied": 2, "unchanged": 0, "refused": 2}
        del good["reload"]  # the section removed: the watcher stops after applying it
        write_atomic(path, dump(good))
        wait_for(lambda: rt.stats()["policy"]["watch_s"] is None, "the watcher to stop")


def test_in_place_write_is_applied_only_once_stable(tmp_path, tiny_models, x, caplog) -> None:
    """A writer that pauses mid-file leaves a truncated file that is valid YAML (task b cut
    off): polled during the pause it is not applied; the complete file is applied once it has
    been seen unchanged a whole poll period later, and only once; an atomic replace is applied
    at the first poll. The watcher is polled here (its thread is not started)."""
    path = tmp_path / "policy.yaml"
    path.write_text(dump(policy_doc({"a": task(tiny_models, 1.0), "b": task(tiny_models, 1.0)})))
    full = dump(policy_doc({"a": task(tiny_models, 0.5), "b": task(tiny_models, 0.5)}))
    half = full[: full.index("  b:")]
    assert list(parse_policy_bytes(path, half.encode()).tasks) == ["a"]  # valid, truncated
    with EdgeRuntime.from_policy(path) as rt:
        w = PolicyWatcher(rt._policy_reloads, path, path.read_bytes(), 1.0)
        assert w.stable_s() == 1.0  # a whole poll period, at least STABLE_S
        assert PolicyWatcher(w.reloader, path, b"", 0.02).stable_s() == STABLE_S
        reloads = lambda: rt.stats()["policy"]["reloads"]  # noqa: E731
        with caplog.at_level(logging.INFO, logger="tandem.edge.policy_reload"):
            with path.open("r+") as f:
                f.truncate(0)
                f.write(half)
                f.flush()
                t0 = time.monotonic()
                polls = 0
                while polls < 5 or time.monotonic() - t0 < 0.1:  # the writer pauses
                    r = w.poll()
                    # (1.0 s after the first poll it would be applied: a pause that long)
                    assert r is None or time.monotonic() - t0 >= 1.0
                    polls += 1
                    time.sleep(0.01)
                assert sorted(rt.tasks) == ["a", "b"] and reloads()["applied"] == 0
                assert rt.infer(x, "b").reason == "no-cloud-target"  # threshold 1.0 serves
                f.write(full[len(half) :])  # the writer goes on
            t1 = time.monotonic()
            assert w.poll() is None and w.poll() is None  # changed: seen again from now
            end, r = time.monotonic() + WAIT_S, None
            while r is None and time.monotonic() < end:
                r = w.poll()
                time.sleep(0.02)
            assert r is not None and time.monotonic() - t1 >= 1.0
            assert r.tasks == {"a": "changed", "b": "changed"}
            assert [str(c) for c in r.changes] == [
                "tasks.a.gate.threshold: 1.0 -> 0.5",
                "tasks.b.gate.threshold: 1.0 -> 0.5",
            ]
            assert w.poll() is None and reloads() == {"applied": 1, "unchanged": 0, "refused": 0}
        changing = [m for m in caplog.messages if "still changing" in m]
        assert len(changing) == 1 and str(path) in changing[0]
        # an atomic replace (a new inode) is applied at the first poll that sees it
        write_atomic(path, dump(policy_doc({"a": task(tiny_models, 0.0)})))
        r = w.poll()
        assert r is not None and r.tasks == {"a": "changed", "b": "removed"}
        assert rt.infer(x, "a").reason == "confident" and reloads()["applied"] == 2


@pytest.mark.integration
@pytest.mark.slow
def test_reloads_under_load_drop_nothing(tmp_path, tiny_models, worker) -> None:
    """Four threads call infer through a real worker without pause while the policy file is
    rewritten: bad files (every kind, atomic and in place) are refused with no failed,
    degraded or lost request and the old threshold in force; good files flip the routing
    (1.0: every request escalates; 0.0: none does) and the time from the write to the first
    request that started after it and was routed under the new policy is printed (a request
    that started before may end later on the old one)."""
    path = tmp_path / "policy.yaml"
    doc = lambda th: policy_doc(  # noqa: E731
        {"digits": task(tiny_models, th, worker.endpoint)}, reload={"watch_s": 0.05}
    )
    path.write_text(dump(doc(1.0)))
    xs = np.random.default_rng(1).uniform(0, 1, (64, 64)).astype(np.float32)
    n_threads = 4
    stop = threading.Event()
    results: list[list[tuple[float, str]]] = [[] for _ in range(n_threads)]
    asked = [0] * n_threads
    errors: list[BaseException] = []

    with EdgeRuntime.from_policy(path) as rt:

        def run(k: int) -> None:
            try:
                while not stop.is_set():
                    asked[k] += 1
                    started = time.perf_counter()  # routed right after: the local model's µs
                    r = rt.infer(xs[asked[k] % 64])
                    results[k].append((started, r.tier.value))
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=run, args=(k,)) for k in range(n_threads)]
        for t in threads:
            t.start()
        try:
            wait_for(lambda: all(len(r) > 5 for r in results), "the load to start")
            refused = 0
            bad = bad_policies(tmp_path, tiny_models, "digits", worker.endpoint)
            for i, (name, (text, _)) in enumerate(bad.items()):
                (write_atomic if i % 2 else write_in_place)(path, text)
                refused += 1
                wait_for(lambda n=refused: rt.stats()["policy"]["reloads"]["refused"] >= n, name)
            before = sum(len(r) for r in results)
            assert {tier for r in results for _, tier in r} == {"cloud"}  # 1.0 still in force
            latencies = []
            for i, (th, tier) in enumerate([(0.0, "edge"), (1.0, "cloud")] * 10):
                t_write = time.perf_counter()
                (write_atomic if i % 2 else write_in_place)(path, dump(doc(th)))

                def seen(g: str = tier, t0: float = t_write) -> bool:
                    return any(t > t0 and v == g for r in results for t, v in r[-5:])

                wait_for(seen, f"threshold {th}")
                first = min(t for r in results for t, g in r if t > t_write and g == tier)
                latencies.append((first - t_write) * 1e3)
        finally:
            stop.set()
            for t in threads:
                t.join()
        stats = rt.stats()
    assert not errors
    assert sum(len(r) for r in results) == sum(asked)  # every request answered
    assert sum(len(r) for r in results) > before
    assert {tier for r in results for _, tier in r} == {"cloud", "edge"}  # never degraded
    assert stats["policy"]["reloads"] == {"applied": 20, "unchanged": 0, "refused": refused}
    assert stats["tasks"]["digits"]["stages"] == {
        "cloud": sum(g == "cloud" for r in results for _, g in r),
        "edge": sum(g == "edge" for r in results for _, g in r),
    }
    print(
        f"\nwrite -> first request under the new policy, ms (watch_s 0.05, {n_threads} threads): "
        + ", ".join(f"{v:.0f}" for v in latencies)
        + f"; p50 {np.median(latencies):.0f}, max {max(latencies):.0f}"
    )
