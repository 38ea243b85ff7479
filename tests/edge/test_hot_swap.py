"""Hot-swapping the edge model from a model store: real ONNX Runtime sessions, a real store
folder, requests from several threads while versions change under them."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tandem.edge import EdgeRuntime
from tandem.router.policy import policy_from_dict
from tandem.runtime.errors import BackendError, ConfigError
from tandem.runtime.model_store import ModelStore

N_IN, N_CLASSES = 8, 4


def linear_model(path: Path, mark: int, n_classes: int = N_CLASSES) -> Path:
    """logits = x @ W + 50 * onehot(mark): every answer names the model that gave it (class
    ``mark``), and the row itself can be checked against that model's weights."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = weights(n_classes)
    b = np.zeros(n_classes, np.float32)
    b[mark] = 50.0
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])],
        "lin",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, N_IN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n_classes])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, path)
    return path


def weights(n_classes: int = N_CLASSES) -> np.ndarray:
    return np.random.default_rng(7).normal(size=(N_IN, n_classes)).astype(np.float32)


def expected(x: np.ndarray, mark: int) -> np.ndarray:
    b = np.zeros(N_CLASSES, np.float32)
    b[mark] = 50.0
    return x @ weights() + b


@pytest.fixture
def models(tmp_path: Path) -> dict[int, Path]:
    return {k: linear_model(tmp_path / f"m{k}.onnx", k) for k in (0, 1, 2)}


def runtime(tmp_path: Path, models: dict[int, Path], **local) -> EdgeRuntime:
    task = {
        "local": {"path": str(models[0]), "store": str(tmp_path / "store"), **local},
        "gate": {"threshold": 0.5},
    }
    return EdgeRuntime(policy_from_dict({"version": 1, "tasks": {"t": task}}))


def mark_of(version: str, marks: dict[str, int]) -> int:
    return marks[version.split(":")[0]]


def test_start_serves_the_store_version_with_its_gate(tmp_path, models) -> None:
    store = ModelStore(tmp_path / "store")
    mv = store.publish(models[1], gate={"threshold": 0.9, "temperature": 40.0, "note": "x"})
    x = np.random.default_rng(0).normal(size=N_IN).astype(np.float32)
    with runtime(tmp_path, models) as rt:
        r = rt.infer(x)
        assert r.model_versions["edge"] == f"v0001:{mv.meta['sha256'][:12]}"
        assert r.index == 1
        z = expected(x, 1) / 40.0  # the version's temperature scales the score
        p = np.exp(z - z.max())
        assert r.confidence == pytest.approx(float((p / p.sum()).max()), rel=1e-5)
        assert r.confidence < 0.9 and r.reason == "no-cloud-target"  # its threshold, not 0.5
        assert rt.stats()["tasks"]["t"]["serving"] == "v0001"


def test_empty_store_serves_local_path(tmp_path, models) -> None:
    with runtime(tmp_path, models) as rt:
        assert rt.infer(np.ones(N_IN, np.float32)).index == 0
        assert rt.reload_models()["t"] == rt.stats()["tasks"]["t"]["versions"]["edge"]


def test_swap_under_load_from_eight_threads(tmp_path, models) -> None:
    """8 threads send requests while the main thread swaps versions back and forth 12 times:
    every request answered exactly once, by exactly the version it names."""
    store = ModelStore(tmp_path / "store")
    marks = {store.publish(models[k]).version: k for k in (1, 2)}  # v0001 -> 1, v0002 -> 2
    xs = np.random.default_rng(1).normal(size=(32, N_IN)).astype(np.float32)
    n_threads, n_swaps = 8, 12
    results: dict[int, list] = {k: [] for k in range(n_threads)}
    asked = dict.fromkeys(range(n_threads), 0)
    errors: list[BaseException] = []
    done = threading.Event()
    with runtime(tmp_path, models) as rt:
        assert rt.reload_models() == {"t": "v0002"}

        def run(k: int) -> None:
            try:
                while not done.is_set():
                    asked[k] += 1
                    results[k].append(rt.infer(xs[asked[k] % 32]))
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=run, args=(k,)) for k in range(n_threads)]
        for t in threads:
            t.start()
        for i in range(n_swaps):
            time.sleep(0.01)  # let requests run on this version
            store.set_current("v0001" if i % 2 == 0 else "v0002")
            rt.reload_models()
        done.set()
        for t in threads:
            t.join()
        stats = rt.stats()["tasks"]["t"]
    assert not errors
    assert stats["swaps"] == {"done": n_swaps, "refused": 0}
    total = sum(len(v) for v in results.values())
    assert total == sum(asked.values()) and total >= n_threads * n_swaps
    seen = set()
    for rs in results.values():
        for i, r in enumerate(rs, 1):
            mark = mark_of(r.model_versions["edge"], marks)
            seen.add(mark)
            assert r.index == mark  # the output came from the version the result names
            np.testing.assert_allclose(r.output, expected(xs[i % 32], mark), rtol=1e-5)
    assert seen == {1, 2}  # both versions served during the run
    assert stats["stages"]["edge"] == total


def test_rollback_restores_the_previous_version(tmp_path, models) -> None:
    store = ModelStore(tmp_path / "store")
    store.publish(models[1])
    x = np.ones(N_IN, np.float32)
    with runtime(tmp_path, models) as rt:
        before = rt.infer(x)
        store.publish(models[2])
        assert rt.reload_models() == {"t": "v0002"} and rt.infer(x).index == 2
        store.rollback()
        assert rt.reload_models() == {"t": "v0001"}
        after = rt.infer(x)
    np.testing.assert_array_equal(after.output, before.output)
    assert after.model_versions == before.model_versions and after.index == 1


def test_a_broken_version_is_refused_and_the_old_keeps_serving(tmp_path, models, caplog) -> None:
    store = ModelStore(tmp_path / "store")
    store.publish(models[1])
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    wrong = linear_model(tmp_path / "wide.onnx", 0, n_classes=N_CLASSES + 1)
    x = np.ones(N_IN, np.float32)
    with runtime(tmp_path, models) as rt:
        store.publish(junk)
        assert rt.reload_models() == {"t": "v0001"}
        assert "v0002 refused" in caplog.text
        assert rt.infer(x).index == 1
        rt.reload_models()  # not tried again
        store.publish(wrong)  # loads, but has another class count
        assert rt.reload_models() == {"t": "v0001"}
        assert rt.infer(x).model_versions["edge"].startswith("v0001:")
        assert rt.stats()["tasks"]["t"]["swaps"] == {"done": 0, "refused": 2}
        with pytest.raises(BackendError):
            rt.swap_model("t", junk)
        assert rt.stats()["tasks"]["t"]["swaps"]["refused"] == 3


def test_watcher_swaps_on_its_own(tmp_path, models) -> None:
    store = ModelStore(tmp_path / "store")
    store.publish(models[1])
    x = np.ones(N_IN, np.float32)
    with runtime(tmp_path, models, watch_s=0.02) as rt:
        assert rt.infer(x).index == 1
        store.publish(models[2])
        deadline = time.monotonic() + 5
        while rt.infer(x).index != 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert rt.infer(x).model_versions["edge"].startswith("v0002:")


def test_swap_model_for_sdk_users(tmp_path, models) -> None:
    x = np.ones(N_IN, np.float32)
    with runtime(tmp_path, models) as rt:
        assert rt.swap_model("t", models[2], gate={"threshold": 0.1}, version="mine") == "mine"
        r = rt.infer(x)
        assert r.index == 2 and r.model_versions["edge"] == "mine"
        assert rt.reload_models() == {"t": "mine"}
        with pytest.raises(ConfigError, match="gate settings"):
            rt.swap_model("t", models[1], gate={"threshold": 3.0})
        assert rt.infer(x).index == 2
