"""``python -m llama_cpp.server`` on a free loopback port: the LLM benchmark's reference server
(its concurrency section), and a fixture tests use."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
import urllib.error
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from benchmarks.llm.harness import N_CTX, tail
from tandem.bench.ports import free_ports


def get_json(url: str) -> Any:
    """GET ``url`` and decode its JSON body (2 s timeout)."""
    import urllib.request

    with urllib.request.urlopen(url, timeout=2) as r:
        return json.loads(r.read())


@contextlib.contextmanager
def llama_server(
    model: Path,
    threads: int,
    log: Path,
    *,
    n_ctx: int = N_CTX,
    logits_all: bool = False,
    interrupt: bool = False,
    extra: Sequence[str] = (),
) -> Iterator[str]:
    """``python -m llama_cpp.server`` on a free loopback port, its output in ``log`` (a pipe
    nobody reads would fill up and block it); yields its ``/v1`` URL once it answers (any HTTP
    status: with ``--api_key`` an anonymous request gets 401). ``logits_all``: log-probs over
    HTTP; ``interrupt``: a new request interrupts the current stream (the server's default);
    ``extra``: more of the server's arguments."""
    (port,) = free_ports(1)
    cmd = [
        sys.executable, "-m", "llama_cpp.server", "--model", str(model),
        "--host", "127.0.0.1", "--port", str(port),
        "--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_ctx", str(n_ctx),
        "--interrupt_requests", str(interrupt).lower(), "--logits_all", str(logits_all).lower(),
        "--verbose", "false", *extra,
    ]  # fmt: skip
    with _serving(cmd, f"http://127.0.0.1:{port}/v1", log, "llama_cpp.server") as url:
        yield url


def llama_server_binary() -> Path | None:
    """llama.cpp's C++ ``llama-server`` built by ``benchmarks/llm/build_llama_server.sh`` (its
    default place, or ``$TANDEM_LLAMA_SERVER``), or None if it is not there."""
    import os

    import llama_cpp

    env = os.environ.get("TANDEM_LLAMA_SERVER")
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    path = (
        Path(env)
        if env
        else cache / "tandem/llama-server" / llama_cpp.__version__ / "bin/llama-server"
    )
    return path if path.is_file() else None


@contextlib.contextmanager
def cxx_llama_server(
    binary: Path, model: Path, threads: int, log: Path, *, parallel: int, n_ctx: int = N_CTX
) -> Iterator[str]:
    """llama.cpp's own C++ ``llama-server`` with ``-np parallel`` slots of ``n_ctx`` tokens each
    (continuous batching across them), on a free loopback port; yields its ``/v1`` URL."""
    (port,) = free_ports(1)
    cmd = [
        str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
        "-t", str(threads), "-tb", str(threads), "-np", str(parallel),
        "-c", str(n_ctx * parallel), "--no-warmup", "--log-disable",
    ]  # fmt: skip
    with _serving(cmd, f"http://127.0.0.1:{port}/v1", log, "llama-server") as url:
        yield url


@contextlib.contextmanager
def _serving(cmd: list[str], url: str, log: Path, name: str) -> Iterator[str]:
    """Run ``cmd`` (its output in ``log``: a pipe nobody reads would fill up and block it) and
    yield ``url`` once ``url/models`` answers; stop it after."""
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited: {tail(log)}")
            try:
                get_json(url + "/models")
                break
            except urllib.error.HTTPError as e:
                if e.code != 503:  # 503: llama-server is still loading
                    break  # it answers
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} not up after 120 s: {tail(log)}")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
