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
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited: {tail(log)}")
            try:
                get_json(url + "/models")
                break
            except urllib.error.HTTPError:
                break  # it answers
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"llama_cpp.server not up after 120 s: {tail(log)}")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
