"""The model store: versions, the current pointer, rollback, pruning, several publishers at
once, and what it refuses to read."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest

from tandem.runtime.errors import ConfigError
from tandem.runtime.model_store import ModelStore


def _model(tmp_path: Path, text: str = "x") -> Path:
    f = tmp_path / f"m-{text}.onnx"
    f.write_text(text)
    return f


def test_publish_rollback_and_prune(tmp_path) -> None:
    store = ModelStore(tmp_path / "store")
    assert store.current() is None and store.versions() == []
    a = store.publish(_model(tmp_path, "a"), gate={"threshold": 0.5})
    b = store.publish(_model(tmp_path, "b"), calibration={"models": {"cloud": "c"}})
    assert (a.version, b.version) == ("v0001", "v0002")
    assert store.current_name() == "v0002" and store.history() == ["v0001", "v0002"]
    assert b.meta["calibration"]["models"] == {
        "cloud": "c",
        "edge": f"v0002:{b.meta['sha256'][:12]}",
    }
    assert store.rollback().version == "v0001" and store.current().gate == {"threshold": 0.5}
    with pytest.raises(ConfigError, match="no earlier version"):
        store.rollback()
    store.set_current("v0002")
    assert store.prune(1) == ["v0001"] and store.versions() == ["v0002"]


def _publish(root: str, src: str, n: int) -> None:
    store = ModelStore(root)
    for _ in range(n):
        store.publish(src)


def test_publishers_in_several_processes_take_turns(tmp_path) -> None:
    src = _model(tmp_path)
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=_publish, args=(str(tmp_path / "store"), str(src), 4)) for _ in range(3)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    store = ModelStore(tmp_path / "store")
    assert store.versions() == [f"v{i:04d}" for i in range(1, 13)]
    assert store.current_name() == "v0012" and len(store.history()) == 12


def test_a_meta_json_naming_a_file_outside_its_folder_is_refused(tmp_path) -> None:
    store = ModelStore(tmp_path / "store")
    v = store.publish(_model(tmp_path))
    meta_path = v.path.parent / "meta.json"
    for bad in ("../../m-x.onnx", "/etc/passwd", "", 3):
        meta = json.loads(meta_path.read_text())
        meta["file"] = bad
        meta_path.write_text(json.dumps(meta))
        with pytest.raises(ConfigError, match="'file' must name a file"):
            store.current()


def test_a_model_file_changed_after_publication_fails_verification(tmp_path) -> None:
    store = ModelStore(tmp_path / "store")
    v = store.publish(_model(tmp_path))
    v.verify()
    v.path.write_text("something else")
    with pytest.raises(ConfigError, match="sha256"):
        store.current().verify()


def test_a_corrupt_pointer_is_a_clear_error(tmp_path) -> None:
    store = ModelStore(tmp_path / "store")
    store.publish(_model(tmp_path))
    (tmp_path / "store" / "CURRENT.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"CURRENT\.json"):
        store.current_name()
