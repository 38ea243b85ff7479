"""CurveZMQ: key files, the worker's allow-list, and what a man in the middle sees. Real worker
processes on loopback, real Curve handshakes, a real TCP relay."""

from __future__ import annotations

import contextlib
import shutil
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from tandem.cli import app
from tandem.cloud.config import WorkerConfig
from tandem.cloud.process import WorkerProcess
from tandem.cloud.worker import CloudWorker
from tandem.edge import EdgeRuntime, Tier
from tandem.reference.models import CLOUD
from tandem.router.policy import load_policy
from tandem.runtime.backends.onnx import OnnxBackend
from tandem.runtime.client import CloudClient
from tandem.runtime.curve import (
    ClientKeys,
    generate_keypair,
    is_loopback,
    load_public_key,
    load_secret_key,
)
from tandem.runtime.errors import ConfigError, DeadlineExceeded, Unavailable

REFUSED = (Unavailable, DeadlineExceeded)  # a failed handshake looks like no connection
PAYLOAD = np.full(64, 1234.5678, np.float32)


class Keys:
    def __init__(self, root: Path) -> None:
        self.worker_public, self.worker_secret = generate_keypair(root / "worker", "worker")
        self.allowed = root / "allowed"
        self.allowed.mkdir()
        robot_public, self.robot_secret = generate_keypair(root / "robot", "robot")
        shutil.copy(robot_public, self.allowed)
        self.stranger_public, self.stranger_secret = generate_keypair(root / "stranger", "x")

    def curve(self) -> dict[str, str]:
        return {"secret_key": str(self.worker_secret), "allowed_clients": str(self.allowed)}

    def robot(self) -> tuple[Path, Path]:
        return self.robot_secret, self.worker_public


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return Keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def curve_worker(
    keys: Keys, tiny_models: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[WorkerProcess, Path]]:
    """A Curve worker serving digits-cloud; its stderr (WARNING and up) goes to a file."""
    log_path = tmp_path_factory.mktemp("log") / "worker.log"
    cfg = WorkerConfig.model_validate(
        {
            "bind": "tcp://127.0.0.1:*",
            "models_dir": str(tiny_models),
            "models": [CLOUD],
            "threads": 1,
            "curve": keys.curve(),
        }
    )
    with log_path.open("w") as err, WorkerProcess(cfg, stderr=err) as w:
        yield w, log_path


class Relay:
    """A TCP relay on a free loopback port that forwards to ``target`` and records every byte
    it carries, both ways: the view of anyone on the path."""

    def __init__(self, target: str) -> None:
        host, port = target.removeprefix("tcp://").rsplit(":", 1)
        self._target = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        self.endpoint = f"tcp://127.0.0.1:{self._listener.getsockname()[1]}"
        self._seen = bytearray()
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    @property
    def seen(self) -> bytes:
        with self._lock:
            return bytes(self._seen)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                a, _ = self._listener.accept()
            except TimeoutError:
                continue
            b = socket.create_connection(self._target)
            self._conns += [a, b]
            for src, dst in ((a, b), (b, a)):
                t = threading.Thread(target=self._pipe, args=(src, dst), daemon=True)
                t.start()
                self._threads.append(t)

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            if not data:
                for s in (src, dst):
                    with contextlib.suppress(OSError):
                        s.shutdown(socket.SHUT_RDWR)
                return
            with self._lock:
                self._seen += data
            try:
                dst.sendall(data)
            except OSError:
                return

    def close(self) -> None:
        self._stop.set()
        self._threads[0].join()
        self._listener.close()
        for c in self._conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()
        for t in self._threads[1:]:
            t.join(5)


# ------------------------------------------------------------------ keys


def test_generate_keypair_writes_a_loadable_pair_with_a_private_secret(tmp_path: Path) -> None:
    public, secret = generate_keypair(tmp_path / "new", "robot")
    assert (public.name, secret.name) == ("robot.key", "robot.key_secret")
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    pub, sec = load_secret_key(secret)
    assert load_public_key(public) == pub and len(pub) == len(sec) == 40

    with pytest.raises(ConfigError, match="already exist"):
        generate_keypair(tmp_path / "new", "robot")
    assert load_public_key(public) == pub  # untouched
    secret.chmod(0o644)
    public2, secret2 = generate_keypair(tmp_path / "new", "robot", force=True)
    assert load_public_key(public2) != pub
    assert stat.S_IMODE(secret2.stat().st_mode) == 0o600
    with pytest.raises(ConfigError, match="plain file name"):
        generate_keypair(tmp_path, "../escape")


def test_key_loading_errors_say_what_is_wrong(tmp_path: Path, keys: Keys) -> None:
    with pytest.raises(ConfigError, match=r"no such key file.*tandem keys generate"):
        load_secret_key(tmp_path / "missing.key_secret")
    junk = tmp_path / "junk.key"
    junk.write_text("hello\n")
    with pytest.raises(ConfigError, match="not a ZeroMQ key file"):
        load_public_key(junk)
    bad = tmp_path / "bad.key"
    bad.write_text('curve\n    public-key = "tooshort"\n')
    with pytest.raises(ConfigError, match="not a ZeroMQ key file"):
        load_public_key(bad)
    with pytest.raises(ConfigError, match=r"holds only a public key.*key_secret"):
        load_secret_key(keys.worker_public)
    with pytest.raises(ConfigError, match="holds only a public key"):
        ClientKeys.load(keys.worker_public, keys.worker_public)


def test_worker_with_bad_curve_config_refuses_before_loading_models(
    tmp_path: Path, keys: Keys
) -> None:
    def worker(**curve: str) -> None:
        CloudWorker(WorkerConfig.model_validate({"curve": {**keys.curve(), **curve}}), {})

    with pytest.raises(ConfigError, match="holds only a public key"):
        worker(secret_key=str(keys.worker_public))
    with pytest.raises(ConfigError, match="no such key file"):
        worker(secret_key=str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="is not a directory"):
        worker(allowed_clients=str(tmp_path / "nope"))


def test_config_paths_are_relative_to_the_file_and_come_in_pairs(tmp_path: Path) -> None:
    from tandem.cloud.config import load_worker_config

    (tmp_path / "w.yaml").write_text(
        "curve: {secret_key: k/worker.key_secret, allowed_clients: clients}\n"
    )
    curve = load_worker_config(tmp_path / "w.yaml").curve
    assert curve is not None and curve.allowed_clients == tmp_path / "clients"
    (tmp_path / "half.yaml").write_text("curve: {secret_key: k/worker.key_secret}\n")
    with pytest.raises(ConfigError, match=r"curve\.allowed_clients: required"):
        load_worker_config(tmp_path / "half.yaml")

    task = {
        "local": {"path": "edge.onnx"},
        "gate": {"threshold": 0.5},
        "cloud": {"endpoint": "tcp://10.0.0.2:5555", "model": "m", "server_key": "w.key"},
    }
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({"version": 1, "tasks": {"t": task}}))
    with pytest.raises(ConfigError, match="both 'server_key' and 'client_key'"):
        load_policy(tmp_path / "p.yaml")
    task["cloud"]["client_key"] = "robot.key_secret"
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({"version": 1, "tasks": {"t": task}}))
    cloud = load_policy(tmp_path / "p.yaml").tasks["t"].cloud
    assert cloud is not None
    assert cloud.curve_keys == (tmp_path / "robot.key_secret", tmp_path / "w.key")


def test_cli_keys_generate(tmp_path: Path) -> None:
    runner = CliRunner()
    ok = runner.invoke(app, ["keys", "generate", str(tmp_path / "k"), "--name", "robot"])
    assert ok.exit_code == 0, ok.output
    assert "robot.key_secret" in ok.stdout and "allowed_clients" in ok.stdout
    load_secret_key(tmp_path / "k" / "robot.key_secret")
    again = runner.invoke(app, ["keys", "generate", str(tmp_path / "k"), "--name", "robot"])
    assert again.exit_code == 1 and "already exist" in again.stderr
    forced = runner.invoke(
        app, ["keys", "generate", str(tmp_path / "k"), "--name", "robot", "--force"]
    )
    assert forced.exit_code == 0, forced.output


# ------------------------------------------------------------------ exposure


@pytest.mark.parametrize(
    ("endpoint", "local"),
    [
        ("tcp://127.0.0.1:*", True),
        ("tcp://localhost:5555", True),
        ("tcp://[::1]:5555", True),
        ("ipc:///tmp/tandem.sock", True),
        ("inproc://w", True),
        ("tcp://0.0.0.0:*", False),
        ("tcp://*:5555", False),
        ("tcp://[::]:5555", False),
        ("tcp://eth0:5555", False),
        ("tcp://192.168.1.10:5555", False),
    ],
)
def test_is_loopback(endpoint: str, local: bool) -> None:
    assert is_loopback(endpoint) is local


def test_non_loopback_bind_without_curve_refuses_to_start(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--insecure"):
        CloudWorker(WorkerConfig(bind="tcp://0.0.0.0:*"), {})
    cfg = tmp_path / "w.yaml"
    cfg.write_text("bind: tcp://127.0.0.1:*\n")
    r = CliRunner().invoke(app, ["cloud", "serve", "--config", str(cfg), "--bind", "tcp://*:0"])
    assert r.exit_code == 1 and "curve is off" in r.stderr


@pytest.mark.integration
def test_non_loopback_bind_starts_with_insecure() -> None:
    with WorkerProcess(WorkerConfig(bind="tcp://0.0.0.0:*", insecure=True)) as w:
        assert w.endpoint is not None
        port = w.endpoint.rsplit(":", 1)[1]
        with CloudClient(f"tcp://127.0.0.1:{port}") as c:
            assert c.echo("hi") == "hi"


# ------------------------------------------------------------------ served or refused


@pytest.mark.integration
def test_allowed_client_is_served(curve_worker, keys: Keys, tiny_models: Path, digits_x) -> None:
    w, _ = curve_worker
    with CloudClient(w.endpoint, curve=keys.robot()) as c:
        reply = c.infer(CLOUD, digits_x, timeout_s=10)
        assert c.health()["state"] == "serving"
    want = OnnxBackend(tiny_models / "cloud-fp32.onnx").predict(digits_x)
    np.testing.assert_allclose(reply["outputs"], want, rtol=1e-5, atol=1e-6)


@pytest.mark.integration
def test_unknown_client_is_refused_and_its_key_logged(curve_worker, keys: Keys) -> None:
    w, log_path = curve_worker
    client_keys = ClientKeys.load(keys.stranger_secret, keys.worker_public)
    with CloudClient(w.endpoint, curve=client_keys) as c, pytest.raises(REFUSED):
        c.infer(CLOUD, PAYLOAD[None], timeout_s=1.0)
    key = client_keys.public_key.decode()
    deadline = time.monotonic() + 5
    while key not in log_path.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    [line, *_] = [ln for ln in log_path.read_text().splitlines() if key in ln]
    assert "WARNING" in line and "refused" in line


@pytest.mark.integration
def test_client_without_curve_is_refused(curve_worker) -> None:
    w, _ = curve_worker
    with CloudClient(w.endpoint) as c, pytest.raises(REFUSED):
        c.echo("hi", timeout_s=1.0)


@pytest.mark.integration
def test_client_expecting_another_server_key_is_refused(curve_worker, keys: Keys) -> None:
    w, _ = curve_worker  # an impostor worker cannot answer for the key the client expects
    curve = (keys.robot_secret, keys.stranger_public)
    with CloudClient(w.endpoint, curve=curve) as c, pytest.raises(REFUSED):
        c.echo("hi", timeout_s=1.0)


@pytest.mark.integration
def test_cli_health_with_curve_keys(curve_worker, keys: Keys) -> None:
    w, _ = curve_worker
    args = ["cloud", "health", w.endpoint, "--client-key", str(keys.robot_secret)]
    r = CliRunner().invoke(app, [*args, "--server-key", str(keys.worker_public)])
    assert r.exit_code == 0, r.output
    assert '"state": "serving"' in r.stdout
    half = CliRunner().invoke(app, args)
    assert half.exit_code == 1 and "both --client-key and --server-key" in half.stderr


@pytest.mark.integration
def test_edge_runtime_escalates_over_curve(curve_worker, keys: Keys, make_policy, digits_x) -> None:
    w, _ = curve_worker
    cloud = {
        "endpoint": w.endpoint,
        "model": CLOUD,
        "server_key": str(keys.worker_public),
        "client_key": str(keys.robot_secret),
    }
    policy = make_policy(None, threshold=1.0, log=False, cloud=cloud)
    with EdgeRuntime.from_policy(policy) as rt:
        r = rt.infer(digits_x[0], "digits")
    assert r.tier is Tier.CLOUD, r.reason


# ------------------------------------------------------------------ on the wire


@pytest.mark.integration
@pytest.mark.parametrize("curve", [False, True], ids=["curve-off", "curve-on"])
def test_relay_sees_the_payload_only_without_curve(keys: Keys, curve: bool) -> None:
    cfg = WorkerConfig.model_validate(
        {"bind": "tcp://127.0.0.1:*", **({"curve": keys.curve()} if curve else {})}
    )
    with WorkerProcess(cfg) as w:
        assert w.endpoint is not None
        relay = Relay(w.endpoint)
        try:
            with CloudClient(relay.endpoint, curve=keys.robot() if curve else None) as c:
                for _ in range(3):
                    np.testing.assert_array_equal(c.echo(PAYLOAD, timeout_s=5), PAYLOAD)
        finally:
            relay.close()
    seen = relay.seen
    assert len(seen) > 3 * 2 * PAYLOAD.nbytes  # the traffic did go through the relay
    assert (PAYLOAD.tobytes() in seen) is not curve
