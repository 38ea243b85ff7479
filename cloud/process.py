"""Run a cloud worker in a child process: what ``tandem demo``, the benchmarks and the
integration tests use to get a real worker on a free loopback port."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

import yaml

from tandem.cloud.config import WorkerConfig
from tandem.runtime.errors import TandemError

log = logging.getLogger(__name__)


class WorkerProcess:
    """``tandem cloud serve`` in a child process. Use as a context manager; ``endpoint`` is set
    once the worker has bound its socket and loaded its models."""

    def __init__(
        self,
        config: WorkerConfig,
        *,
        startup_timeout_s: float = 60.0,
        stderr: IO[Any] | int | None = None,
    ) -> None:
        self.config = config
        self.startup_timeout_s = startup_timeout_s
        self._stderr = stderr
        self._tmp = tempfile.TemporaryDirectory(prefix="tandem-worker-")
        self.proc: subprocess.Popen[bytes] | None = None
        self.endpoint: str | None = None

    def start(self) -> WorkerProcess:
        tmp = Path(self._tmp.name)
        cfg = tmp / "worker.yaml"
        cfg.write_text(yaml.safe_dump(self.config.model_dump(mode="json")))
        ready = tmp / "ready"
        cmd = [sys.executable, "-m", "tandem.cli", "cloud", "serve", "--config", str(cfg)]
        self.proc = subprocess.Popen(
            [*cmd, "--ready-file", str(ready), "--quiet"],
            stdout=subprocess.DEVNULL,
            stderr=self._stderr,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        deadline = time.monotonic() + self.startup_timeout_s
        while not ready.exists():
            if self.proc.poll() is not None:
                raise TandemError(f"worker exited with code {self.proc.returncode} during start-up")
            if time.monotonic() > deadline:
                self.kill()
                raise TandemError(f"worker not ready after {self.startup_timeout_s:.0f} s")
            time.sleep(0.02)
        self.endpoint = ready.read_text().strip()
        return self

    @property
    def config_path(self) -> Path:
        """The config file the worker runs with (edit it, then SIGHUP: a model reload)."""
        return Path(self._tmp.name) / "worker.yaml"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout_s: float = 15.0) -> int:
        """SIGTERM, wait for the drain, return the exit code (kills it past the timeout)."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.proc.wait()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> WorkerProcess:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        try:
            rc = self.stop()
            if rc != 0:
                log.warning("worker %d exited with code %d", self.pid, rc)
        finally:
            self._tmp.cleanup()
