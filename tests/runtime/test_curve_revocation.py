"""Revoking a CurveZMQ client key takes effect within REVOCATION_CHECK_S, on connections that
are already open too, and a key file edited in place counts as a change. Real key pairs, a real
Curve worker process on loopback, clients that stay connected throughout."""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tandem.cloud.config import WorkerConfig
from tandem.cloud.process import WorkerProcess
from tandem.reference.models import CLOUD
from tandem.runtime.client import CloudClient
from tandem.runtime.curve import (
    REVOCATION_CHECK_S,
    ClientAllowList,
    generate_keypair,
    load_public_key,
)
from tandem.runtime.errors import DeadlineExceeded, Unauthorized, Unavailable

pytestmark = pytest.mark.integration

SLACK_S = 1.5  # scheduling on a loaded test machine, on top of the stated bound
X = np.ones((1, 64), np.float32)


class Keys:
    def __init__(self, root: Path) -> None:
        self.worker_public, self.worker_secret = generate_keypair(root / "worker", "worker")
        self.allowed = root / "allowed"
        self.allowed.mkdir()
        self.robot_public, self.robot_secret = generate_keypair(root / "robot", "robot")
        shutil.copy(self.robot_public, self.allowed / "robot.key")
        self.other_public, self.other_secret = generate_keypair(root / "other", "other")

    def robot(self) -> tuple[Path, Path]:
        return self.robot_secret, self.worker_public

    def other(self) -> tuple[Path, Path]:
        return self.other_secret, self.worker_public


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return Keys(tmp_path)


@pytest.fixture
def curve_worker(keys: Keys, tiny_models: Path) -> Iterator[WorkerProcess]:
    cfg = WorkerConfig.model_validate(
        {
            "bind": "tcp://127.0.0.1:*",
            "models_dir": str(tiny_models),
            "models": [CLOUD],
            "threads": 1,
            "curve": {"secret_key": str(keys.worker_secret), "allowed_clients": str(keys.allowed)},
        }
    )
    with WorkerProcess(cfg) as w:
        yield w


def refused_within(client: CloudClient, bound_s: float) -> float:
    """Seconds until ``client``'s requests (on its open connection) are refused."""
    t0 = time.monotonic()
    while True:
        try:
            client.infer(CLOUD, X, timeout_s=5)
        except Unauthorized:
            return time.monotonic() - t0
        elapsed = time.monotonic() - t0
        assert elapsed < bound_s, f"still served {elapsed:.1f} s after its key was revoked"
        time.sleep(0.05)


def test_a_revoked_key_is_refused_on_its_open_connection_within_the_bound(
    curve_worker: WorkerProcess, keys: Keys
) -> None:
    with CloudClient(curve_worker.endpoint, curve=keys.robot()) as robot:
        assert robot.infer(CLOUD, X, timeout_s=10)["outputs"].shape == (1, 10)
        (keys.allowed / "robot.key").unlink()  # revoke; the connection stays open
        took = refused_within(robot, REVOCATION_CHECK_S + SLACK_S)
        with pytest.raises(Unauthorized, match="no longer in the worker's allowed_clients"):
            robot.infer(CLOUD, X, timeout_s=5)  # and stays refused
    # a new connection with that key fails its handshake
    with (
        CloudClient(curve_worker.endpoint, curve=keys.robot()) as again,
        pytest.raises((Unavailable, DeadlineExceeded)),
    ):
        again.infer(CLOUD, X, timeout_s=1)
    # allowed again: served again, on a new connection
    shutil.copy(keys.robot_public, keys.allowed / "robot.key")
    with CloudClient(curve_worker.endpoint, curve=keys.robot()) as back:
        assert back.infer(CLOUD, X, timeout_s=10)["outputs"].shape == (1, 10)
    assert took <= REVOCATION_CHECK_S + SLACK_S


def test_a_key_file_edited_in_place_is_noticed(curve_worker: WorkerProcess, keys: Keys) -> None:
    """The allow-list's file is rewritten in place with another client's key (the directory's
    own mtime does not change): the new client is admitted at its handshake, and the old one
    is refused on its open connection within the bound."""
    allowed = keys.allowed / "robot.key"
    dir_mtime = keys.allowed.stat().st_mtime_ns
    with CloudClient(curve_worker.endpoint, curve=keys.robot()) as robot:
        assert robot.infer(CLOUD, X, timeout_s=10)["outputs"].shape == (1, 10)
        allowed.write_bytes(keys.other_public.read_bytes())  # same file, same inode
        assert keys.allowed.stat().st_mtime_ns == dir_mtime
        with CloudClient(curve_worker.endpoint, curve=keys.other()) as other:
            assert other.infer(CLOUD, X, timeout_s=10)["outputs"].shape == (1, 10)
        refused_within(robot, REVOCATION_CHECK_S + SLACK_S)


def test_a_file_that_is_not_a_key_does_not_keep_revoked_keys_alive(
    keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    """A bad file among the keys is skipped, not a reason to keep the keys last read."""
    log = logging.getLogger("test.curve")
    allow = ClientAllowList(keys.allowed, log, check_every_s=0.0)
    robot = load_public_key(keys.robot_public)
    assert allow.admits(robot, time.monotonic())
    (keys.allowed / "junk.key").write_text("not a key\n")
    (keys.allowed / "robot.key").unlink()
    with caplog.at_level(logging.ERROR, logger="test.curve"):
        assert not allow.admits(robot, time.monotonic())
    assert "junk.key" in caplog.text
