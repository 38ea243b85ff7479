"""Loading, replacing and unloading a running worker's models (tandem.cloud.model_admin): by
admin message and by SIGHUP, on real worker processes, under load."""

from __future__ import annotations

import re
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tandem.cloud.model_admin import parse_admin
from tandem.cloud.process import WorkerProcess
from tandem.cloud.worker import CloudWorker
from tandem.reference.models import CLOUD, EDGE, _cnn, export_onnx, manifest_entry
from tandem.runtime.client import CloudClient
from tandem.runtime.curve import generate_keypair
from tandem.runtime.errors import (
    AdminBusy,
    BackendError,
    BadRequest,
    ConfigError,
    TandemError,
    Unauthorized,
    UnknownModel,
)
from tandem.runtime.manifest import load_manifest, manifest_lock, write_manifest
from tandem.runtime.wire import Envelope, Kind
from tests.conftest import worker_config

N_VERSIONS = 3  # cloud-v1..v3.onnx beside the fixture's own (v0)
X = np.random.default_rng(0).uniform(0, 1, size=(2, 64)).astype(np.float32)


@pytest.fixture(scope="module")
def version_files(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny models plus new versions of the cloud model (other seeds), not in the
    manifest yet."""
    out = tmp_path_factory.mktemp("versions")
    for i in range(1, N_VERSIONS + 1):
        torch.manual_seed(100 + i)
        export_onnx(_cnn().eval(), out / f"cloud-v{i}.onnx")
    return out


@pytest.fixture
def models_dir(tiny_models: Path, version_files: Path, tmp_path: Path) -> Path:
    """A models directory of this test's own: the tiny models and the new version files."""
    out = tmp_path / "models"
    shutil.copytree(tiny_models, out)
    for f in version_files.glob("*.onnx"):
        shutil.copy(f, out / f.name)
    return out


def publish(models_dir: Path, i: int) -> str:
    """Point the manifest's cloud entry at version ``i``'s file; its version string."""
    with manifest_lock(models_dir):
        manifest = load_manifest(models_dir)
        entry = manifest_entry(models_dir, CLOUD, f"cloud-v{i}.onnx", version_prefix=f"v{i}")
        models = [entry if m.name == CLOUD else m for m in manifest.models]
        write_manifest(models_dir, manifest.model_copy(update={"models": models}))
    return entry.version


def admin_config(models_dir: Path, **overrides):
    return worker_config(models_dir, admin={"enabled": True}, **overrides)


def wait_for(check, timeout_s: float = 30.0):
    """Poll ``check()`` until it returns something truthy (a wait, not a timed assert)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        out = check()
        if out:
            return out
        time.sleep(0.02)
    raise AssertionError(f"not true within {timeout_s} s: {check}")


# ---------------------------------------------------------------------------- the payload
@pytest.mark.parametrize(
    "payload",
    [
        None,
        [],
        {"op": "list", "extra": 1},
        {"op": "LOAD", "model": "x"},
        {"op": 3},
        {"op": "load"},
        {"op": "load", "model": "../etc"},
        {"op": "load", "model": "a" * 200},
        {"op": "replace", "model": 7},
        {"op": "reload", "model": "x"},
    ],
)
def test_bad_admin_payloads_are_refused(payload) -> None:
    with pytest.raises(BadRequest):
        parse_admin(payload)


def test_admin_payloads() -> None:
    assert parse_admin({"op": "list"}).op == "list"
    req = parse_admin({"op": "replace", "model": CLOUD})
    assert (req.op, req.model) == ("replace", CLOUD)
    assert parse_admin({"op": "reload", "model": None}).model is None


# ---------------------------------------------------------------------------- in process
def test_health_shows_both_versions_and_a_second_op_is_busy(models_dir: Path) -> None:
    """One worker object, no socket: a SIGHUP's reload loads the new version on the loader
    thread (health: ``next``) while a second operation is refused; the loop's turn switches
    (health: ``previous``) and the next turn retires the old version."""
    worker = CloudWorker(admin_config(models_dir))
    try:
        old = worker.backends[CLOUD].version
        new = publish(models_dir, 1)
        worker.admin.signal_reload()
        worker.admin.turn()  # starts the reload on the loader thread
        with pytest.raises(AdminBusy, match="reload"):
            env = Envelope(kind=Kind.ADMIN, payload={"op": "replace", "model": CLOUD})
            worker.admin.on_message([b"peer"], env, None)
        for t in threading.enumerate():
            if t.name == "tandem-model-admin":
                t.join(30)
        models = worker.health()["models"]  # loaded, not switched: the loop has not run it
        assert models[CLOUD]["version"] == old
        assert models[CLOUD]["next"] == {"version": new, "state": "loading"}
        assert worker.health()["admin"]["state"] == "reload"
        worker.mailbox.drain()  # the loop's turn: the switch
        health = worker.health()
        assert health["models"][CLOUD]["version"] == new
        assert health["models"][CLOUD]["previous"] == {"version": old, "in_flight": 0}
        assert health["admin"]["last"]["ok"] is True
        worker.admin.turn()  # nothing uses the old version: retired
        assert "previous" not in worker.health()["models"][CLOUD]
        assert worker.admin.due is False
    finally:
        worker._close_compute()


# ---------------------------------------------------------------------------- processes
@pytest.mark.integration
@pytest.mark.slow
def test_replacement_under_load_drops_no_request(models_dir: Path) -> None:
    """Client threads send infer requests in a loop while the cloud model is replaced three
    times (admin message, SIGHUP after editing the manifest, admin message): every request is
    answered with a result, and each thread sees the versions in order, never going back."""
    cfg = admin_config(models_dir, batching={"max_batch": 8, "max_wait_us": 2000})
    with WorkerProcess(cfg) as w, CloudClient(w.endpoint) as client:
        order = [client.health()["models"][CLOUD]["version"]]
        stop = threading.Event()
        seen: list[list[str]] = [[] for _ in range(4)]
        failures: list[BaseException] = []

        def load(i: int) -> None:
            while not stop.is_set():
                try:
                    out = client.infer(CLOUD, X, timeout_s=30)
                except BaseException as e:  # every one counts: none may fail
                    failures.append(e)
                    return
                seen[i].append(out["version"])

        threads = [threading.Thread(target=load, args=(i,)) for i in range(len(seen))]
        for t in threads:
            t.start()

        def progress(n: int = 40) -> None:
            start = sum(map(len, seen))
            wait_for(lambda: failures or sum(map(len, seen)) >= start + n)

        try:
            progress()
            order.append(publish(models_dir, 1))
            result = client.admin("replace", CLOUD, timeout_s=60)
            assert result["changes"] == [
                {"model": CLOUD, "action": "replaced", "version": order[1], "previous": order[0]}
            ]
            progress()
            order.append(publish(models_dir, 2))
            w.signal(signal.SIGHUP)
            wait_for(lambda: client.health()["models"][CLOUD]["version"] == order[2])
            progress()
            order.append(publish(models_dir, 3))
            assert client.admin("replace", CLOUD, timeout_s=60)["models"][CLOUD] == order[3]
            progress()
        finally:
            stop.set()
            for t in threads:
                t.join(60)
        health = client.health()
    assert failures == []
    for versions in seen:
        rank = [order.index(v) for v in versions]  # a version not in order: ValueError
        assert rank == sorted(rank), "a thread saw an older version after a newer one"
        assert rank[-1] == len(order) - 1
    assert set().union(*map(set, seen)) >= {order[0], order[-1]}
    assert health["counters"].get("internal_errors", 0) == 0
    assert health["admin"]["last"]["ok"] is True


@pytest.mark.integration
def test_admin_is_refused_unless_enabled(models_dir: Path) -> None:
    with WorkerProcess(worker_config(models_dir)) as w, CloudClient(w.endpoint) as client:
        for op, model in (("list", None), ("unload", CLOUD), ("reload", None)):
            with pytest.raises(Unauthorized, match=re.escape("admin: {enabled: true}")):
                client.admin(op, model, timeout_s=5)
        assert set(client.health()["models"]) == {EDGE, CLOUD}
        assert client.infer(CLOUD, X, timeout_s=5)["outputs"].shape == (2, 10)


@pytest.mark.integration
def test_with_curve_only_admin_keys_may_change_models(models_dir: Path, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    generate_keypair(keys / "server", "worker")
    generate_keypair(keys / "clients", "robot")
    generate_keypair(keys / "clients", "operator")
    (keys / "admins").mkdir()
    shutil.copy(keys / "clients" / "operator.key", keys / "admins" / "operator.key")
    curve = {
        "secret_key": str(keys / "server" / "worker.key_secret"),
        "allowed_clients": str(keys / "clients"),
    }
    cfg = worker_config(
        models_dir, curve=curve, admin={"enabled": True, "allowed_clients": str(keys / "admins")}
    )
    server_key = keys / "server" / "worker.key"
    with WorkerProcess(cfg) as w:
        robot = (keys / "clients" / "robot.key_secret", server_key)
        operator = (keys / "clients" / "operator.key_secret", server_key)
        with CloudClient(w.endpoint, curve=robot) as client:
            with pytest.raises(Unauthorized, match=r"admin\.allowed_clients"):
                client.admin("unload", CLOUD, timeout_s=5)
            assert client.infer(CLOUD, X, timeout_s=5)["outputs"].shape == (2, 10)
        with CloudClient(w.endpoint, curve=operator) as client:
            assert client.admin("unload", CLOUD, timeout_s=10)["models"] == {
                EDGE: client.health()["models"][EDGE]["version"]
            }


@pytest.mark.integration
def test_a_bad_version_is_refused_and_the_old_one_serves(models_dir: Path) -> None:
    with WorkerProcess(admin_config(models_dir)) as w, CloudClient(w.endpoint) as client:
        old = client.infer(CLOUD, X, timeout_s=5)["version"]
        # not an ONNX model, but its manifest entry matches it: the backend refuses it
        (models_dir / "cloud-v1.onnx").write_bytes(b"not a model" * 100)
        bad = publish(models_dir, 1)
        with pytest.raises(BackendError, match=f"{CLOUD}.*{bad} refused"):
            client.admin("replace", CLOUD, timeout_s=30)
        assert client.infer(CLOUD, X, timeout_s=5)["version"] == old
        # a file that is not the one published: its digest is refused
        publish(models_dir, 2)
        with (models_dir / "cloud-v2.onnx").open("ab") as f:
            f.write(b"\0")
        with pytest.raises(ConfigError, match="sha256"):
            client.admin("replace", CLOUD, timeout_s=30)
        health = client.health()
        assert health["models"][CLOUD]["version"] == old
        assert health["admin"]["last"]["ok"] is False
        assert client.infer(CLOUD, X, timeout_s=5)["version"] == old


@pytest.mark.integration
def test_unload_load_and_unknown_names(models_dir: Path) -> None:
    with WorkerProcess(admin_config(models_dir)) as w, CloudClient(w.endpoint) as client:
        version = client.infer(CLOUD, X, timeout_s=5)["version"]
        out = client.admin("unload", CLOUD, timeout_s=10)
        assert out["changes"] == [
            {"model": CLOUD, "action": "unloaded", "version": None, "previous": version}
        ]
        with pytest.raises(UnknownModel):
            client.infer(CLOUD, X, timeout_s=5)
        with pytest.raises(UnknownModel, match="not served"):
            client.admin("replace", CLOUD, timeout_s=5)
        with pytest.raises(UnknownModel, match="not in"):
            client.admin("load", "no-such-model", timeout_s=10)
        assert client.admin("load", CLOUD, timeout_s=30)["models"][CLOUD] == version
        assert client.infer(CLOUD, X, timeout_s=5)["version"] == version
        with pytest.raises(BadRequest, match="served already"):
            client.admin("load", CLOUD, timeout_s=5)
        listed = client.admin("list", timeout_s=5)
        assert listed["models"][CLOUD]["version"] == version
        assert listed["admin"]["state"] == "idle"


@pytest.mark.integration
def test_sighup_with_a_broken_manifest_changes_nothing(models_dir: Path, tmp_path: Path) -> None:
    log_path = tmp_path / "worker.log"
    with (
        log_path.open("wb") as log_file,
        WorkerProcess(admin_config(models_dir), stderr=log_file) as w,
        CloudClient(w.endpoint) as client,
    ):
        before = client.health()["models"]
        (models_dir / "manifest.json").write_text('{"models": [')
        w.signal(signal.SIGHUP)
        last = wait_for(lambda: client.health()["admin"]["last"])
        assert last["ok"] is False and "manifest.json" in last["error"]
        assert client.health()["models"] == before
        assert client.infer(CLOUD, X, timeout_s=5)["version"] == before[CLOUD]["version"]
    assert "reload refused, nothing changed" in log_path.read_text()


@pytest.mark.integration
def test_sighup_reads_the_config_file_again(models_dir: Path, tmp_path: Path) -> None:
    """``models`` takes effect; a key that needs a restart is logged and ignored."""
    log_path = tmp_path / "worker.log"
    with (
        log_path.open("wb") as log_file,
        WorkerProcess(admin_config(models_dir), stderr=log_file) as w,
        CloudClient(w.endpoint) as client,
    ):
        cfg = yaml.safe_load(w.config_path.read_text())
        cfg["models"] = [CLOUD]
        cfg["threads"] = 2
        w.config_path.write_text(yaml.safe_dump(cfg))
        w.signal(signal.SIGHUP)
        wait_for(lambda: set(client.health()["models"]) == {CLOUD})
        with pytest.raises(UnknownModel):
            client.infer(EDGE, X, timeout_s=5)
        cfg["models"] = [EDGE, CLOUD]  # and back: reload from the file again
        w.config_path.write_text(yaml.safe_dump(cfg))
        result = client.admin("reload", timeout_s=30)
        assert [c["model"] for c in result["changes"]] == [EDGE]
        assert client.infer(EDGE, X, timeout_s=5)["outputs"].shape == (2, 10)
    assert "threads changed; that needs a restart" in log_path.read_text()


def test_tandem_errors_are_typed() -> None:
    assert issubclass(AdminBusy, TandemError) and AdminBusy.code == "admin_busy"


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(600)  # two transformers models built and loaded: slow on a busy machine
def test_a_language_model_is_replaced_while_it_streams(tmp_path: Path) -> None:
    """A stream started before the replacement finishes on the old version (its engine);
    the next one runs on the new version's engine."""
    from tandem.runtime.generation import SamplingParams
    from tandem.runtime.manifest import Manifest
    from tests.lm import lm_entry, tiny_lm

    lm = "tiny-lm"
    models = tmp_path / "lm-models"
    tiny_lm(models / lm, seed=2, n_ctx=4096)
    tiny_lm(models / "tiny-lm-v2", seed=3, n_ctx=4096)
    write_manifest(models, Manifest(models=[lm_entry(models, lm)]))
    cfg = worker_config(models, models=[lm], admin={"enabled": True})
    params = SamplingParams(max_tokens=3000)
    with WorkerProcess(cfg) as w, CloudClient(w.endpoint) as client:
        old = client.health()["models"][lm]["version"]
        with client.generate(lm, "abc", params, timeout_s=120) as call:
            first = next(iter(call))
            assert first.tokens
            entry = lm_entry(models, "tiny-lm-v2").model_copy(
                update={"name": lm, "version": "t-v2"}
            )
            write_manifest(models, Manifest(models=[entry]))
            assert client.admin("replace", lm, timeout_s=120)["models"] == {lm: "t-v2"}
            for _ in call:
                pass
        assert call.end is not None and call.end["finish_reason"] == "length"
        assert call.end["version"] == old
        with client.generate(lm, "abc", SamplingParams(max_tokens=8), timeout_s=60) as call:
            for _ in call:
                pass
        assert call.end is not None and call.end["version"] == "t-v2"
        health = wait_for(
            lambda: (h := client.health()) and "previous" not in h["models"][lm] and h
        )
        assert health["streams"]["failed"] == 0
        assert set(health["engines"]) == {lm}
