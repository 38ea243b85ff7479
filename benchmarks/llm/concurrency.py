"""**concurrency** — 1, 8 and 32 client threads, each streaming one request after another
(closed loop) for a fixed time, against each side of :data:`SIDES`: a Tandem worker process
serving ``sort-cloud`` (transformers, fast decode; one shared ``CloudClient``) with its engine
(continuous batching) and without it (``generation.engine: false``: a thread per stream, what
the worker did before engines); a worker serving the same weights as an f32 GGUF (``gguf``,
``parallel`` = the highest level: one llama.cpp context holding that many sequences); and
``python -m llama_cpp.server`` on that GGUF, ``--n_threads T --n_threads_batch T --n_ctx 512
--interrupt_requests false`` (requests queue instead of cutting each other off; it serves one
at a time) ``--logits_all false``, with one ``openai`` client per thread sending
``extra_body={"repeat_penalty": 1.0}``. Prompts: held-out sorting items of the three longest
lengths (answers of that many tokens, then EOS; greedy, so every side does the same work).
Aggregate tokens/s, inter-token gaps as the client sees them (tokens that arrive in one
message count 0 after the first), time to first token, and the issue's goals (:func:`goals`).

The closed loop is ``tandem bench``'s own (:func:`tandem.bench.load.run_closed`); the tokens,
gaps and TTFT of each answer are this module's (a :class:`~tandem.bench.stats.GenSample`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import time
from collections.abc import Callable
from typing import Any

from benchmarks.llm.harness import Bench, percentile, ratio, say, sha
from benchmarks.llm.llama_server import (
    cxx_llama_server,
    get_json,
    llama_server,
    llama_server_binary,
)
from tandem.bench.load import run_closed
from tandem.bench.stats import GenSample, Outcome
from tandem.reference import lm_task
from tandem.reference.lm_models import CLOUD

COLUMNS = ["streams", "side", "tok/s", "ITL p50 ms", "ITL p99 ms", "TTFT p50 ms", "errors"]
_ERROR_PAUSE_S = 0.05  # a client whose request failed waits this long before its next

Request = Callable[[str], GenSample]
"""One streamed request: its answer's tokens, the gaps between them as the client sees them
(ms; tokens that arrive in one message count 0 after the first) and its time to first token."""


def drive(clients: int, seconds: float, prompts: list[str], request: Request) -> dict[str, Any]:
    """``clients`` threads, each sending one request after another until ``seconds`` pass (the
    prompts in turn); aggregate tokens/s over the wall time until the last answer, gaps and
    TTFT percentiles over every answer, errors."""

    def call(i: int) -> Outcome:
        try:
            return Outcome(tier="cloud", gen=request(prompts[i % len(prompts)]))
        except Exception:  # counted (the driver's outcome), shown in the JSON
            time.sleep(_ERROR_PAUSE_S)
            raise

    entries, wall = run_closed(call, clients, seconds)
    answers = [o.gen for _, o, _, _ in entries if o.gen is not None]
    errors = [f"{o.error}: {o.detail}" for _, o, _, _ in entries if o.error]
    tokens = sum(g.tokens for g in answers)
    gaps = [x for g in answers for x in g.itl_ms]
    ttft = [g.ttft_ms for g in answers if g.ttft_ms is not None]
    return {
        "clients": clients,
        "tokens_per_s": tokens / wall,
        "requests": len(answers),
        "tokens": tokens,
        "itl_p50_ms": percentile(gaps, 50),
        "itl_p99_ms": percentile(gaps, 99),
        "ttft_p50_ms": percentile(ttft, 50),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
    }


def tandem_request(client: Any, max_tokens: int) -> Request:
    """A streamed ``CloudClient.generate`` of ``sort-cloud``."""
    from tandem.runtime.generation import SamplingParams

    params = SamplingParams(max_tokens=max_tokens)

    def request(prompt: str) -> GenSample:
        gaps: list[float] = []
        ttft, tokens = None, 0
        t0 = last = time.perf_counter()
        with client.generate(CLOUD, prompt, params, timeout_s=120) as call:
            for chunk in call:
                now = time.perf_counter()
                if ttft is None:
                    ttft = (now - t0) * 1e3
                else:
                    gaps.append((now - last) * 1e3)
                gaps.extend([0.0] * (len(chunk.tokens) - 1))
                last = now
                tokens += len(chunk.tokens)
        return GenSample(ttft, gaps, tokens, (time.perf_counter() - t0) * 1e3)

    return request


def openai_request(url: str, model: str, max_tokens: int) -> Request:
    """A streamed completion from an OpenAI-compatible server, one ``openai`` client per
    thread."""
    import openai

    local = threading.local()

    def request(prompt: str) -> GenSample:
        if not hasattr(local, "client"):
            local.client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=300)
        gaps: list[float] = []
        ttft, tokens = None, 0
        t0 = last = time.perf_counter()
        stream = local.client.completions.create(
            model=model,
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=0.0,
            stream=True,
            extra_body={"repeat_penalty": 1.0},
        )
        with stream:
            for chunk in stream:
                if not chunk.choices or chunk.choices[0].finish_reason is not None:
                    continue
                now = time.perf_counter()
                if ttft is None:
                    ttft = (now - t0) * 1e3
                else:
                    gaps.append((now - last) * 1e3)
                last = now
                tokens += 1
        return GenSample(ttft, gaps, tokens, (time.perf_counter() - t0) * 1e3)

    return request


SIDES = {
    "engine": "Tandem worker, sort-cloud (transformers f32), engine: continuous batching",
    "threads": "Tandem worker, sort-cloud, engine: false (a thread per stream: before engines)",
    "gguf": "Tandem worker, the same weights as an f32 GGUF (gguf, parallel = max level)",
    "llama.cpp": "llama_cpp.server on the f32 GGUF (serves one request at a time)",
    "llama-server": "llama.cpp's C++ llama-server on the f32 GGUF, -np = max level "
    "(continuous batching; only if built: benchmarks/llm/build_llama_server.sh)",
}


def run(b: Bench) -> tuple[dict[str, Any], list[list[Any]]]:
    """Each level of concurrent streams against each side in turn (:data:`SIDES`). Returns
    the JSON and the table's rows."""
    from tandem.runtime.client import CloudClient
    from tandem.runtime.gguf import export_gguf
    from tandem.runtime.manifest import Manifest, ModelEntry, sha256_file, write_manifest

    z = b.sizes
    longest = lm_task.MAX_LEN  # long answers: the work is mostly decode
    lengths = (longest - 8, longest - 4, longest)
    prompts = [lm_task.held_out(d, 8)[i].prompt for i in range(8) for d in lengths]
    f32 = b.cache / f"cloud-{sha(next(b.cloud_hf.glob('*.safetensors')))[:12]}-f32.gguf"
    if not f32.exists():
        export_gguf(b.cloud_hf, f32, qtype="f32")
    gguf_dir = b.tmp / "gguf-models"
    gguf_dir.mkdir(exist_ok=True)
    if not (gguf_dir / f32.name).exists():  # a models directory holds its files (no symlinks)
        try:
            os.link(f32, gguf_dir / f32.name)
        except OSError:
            shutil.copyfile(f32, gguf_dir / f32.name)
    entry = ModelEntry(
        name=CLOUD,
        version=f"gguf-{sha(f32)[:12]}",
        file=f32.name,
        sha256=sha256_file(f32),
        size_bytes=f32.stat().st_size,
        format="gguf",
    )
    write_manifest(gguf_dir, Manifest(models=[entry]))
    top = max(z.conc_levels)
    workers = {
        "engine": b.worker("engine", generation={"max_streams": top}),
        "threads": b.worker("threads", generation={"max_streams": top, "engine": False}),
        "gguf": b.worker(
            "gguf", models_dir=gguf_dir, generation={"max_streams": top, "parallel": top}
        ),
    }
    say("concurrency: starting llama_cpp.server on the same weights (f32 GGUF)")
    data: dict[str, Any] = {
        "sides": SIDES,
        "threads": b.threads,
        "max_tokens": z.conc_max_tokens,
        "seconds": z.conc_seconds,
        "repeat": z.conc_repeat,
        "levels": {},
    }
    rows = []
    with contextlib.ExitStack() as stack:
        clients = {k: stack.enter_context(CloudClient(w.endpoint)) for k, w in workers.items()}
        url = stack.enter_context(llama_server(f32, b.threads, b.tmp / "llama_server.log"))
        model_id = get_json(url + "/models")["data"][0]["id"]
        sides: dict[str, Request] = {
            k: tandem_request(c, z.conc_max_tokens) for k, c in clients.items()
        }
        sides["llama.cpp"] = openai_request(url, model_id, z.conc_max_tokens)
        binary = llama_server_binary()
        if binary is None:
            say("concurrency: no C++ llama-server built (benchmarks/llm/build_llama_server.sh)")
        else:
            cxx = stack.enter_context(
                cxx_llama_server(binary, f32, b.threads, b.tmp / "llama-server.log", parallel=top)
            )
            cxx_id = get_json(cxx + "/models")["data"][0]["id"]
            sides["llama-server"] = openai_request(cxx, cxx_id, z.conc_max_tokens)
        for req in sides.values():  # warm-up: connections, first-call allocations
            for p in prompts[:2]:
                req(p)
        for level in z.conc_levels:
            say(f"concurrency: {level} streams")
            got: dict[str, list[dict[str, Any]]] = {k: [] for k in sides}
            for _ in range(z.conc_repeat):
                for k, req in sides.items():
                    got[k].append(drive(level, z.conc_seconds, prompts, req))
            med = {
                k: sorted(v, key=lambda r: r["tokens_per_s"])[len(v) // 2] for k, v in got.items()
            }
            data["levels"][str(level)] = {**med, "runs": got}
            for k in sides:
                m = med[k]
                rows.append(
                    [
                        level,
                        k,
                        f"{m['tokens_per_s']:.0f}",
                        f"{m['itl_p50_ms']:.2f}",
                        f"{m['itl_p99_ms']:.2f}",
                        f"{m['ttft_p50_ms']:.1f}",
                        m["errors"],
                    ]
                )
    data["goals"] = goals(data)
    return data, rows


def goals(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's goals at each level above one stream, from the medians: total tokens/s ≥
    3× one stream's and ≥ 2× llama_cpp.server's; inter-token p99 ≤ 2× Tandem's own at one
    stream."""
    levels = data["levels"]
    one = levels.get("1", {})
    out = []
    for level, med in levels.items():
        if level == "1":
            continue
        for side in ("engine", "gguf"):
            if side not in med or side not in one:
                continue
            m, single = med[side], one[side]
            checks = {
                "tokens/s vs one stream (≥ 3×)": (
                    ratio(m["tokens_per_s"], single["tokens_per_s"]),
                    3.0,
                    True,
                ),
                "tokens/s vs llama_cpp.server (≥ 2×)": (
                    ratio(m["tokens_per_s"], med["llama.cpp"]["tokens_per_s"]),
                    2.0,
                    True,
                ),
                "inter-token p99 vs own one-stream p99 (≤ 2×)": (
                    ratio(m["itl_p99_ms"], single["itl_p99_ms"]),
                    2.0,
                    False,
                ),
            }
            if side == "gguf" and "llama-server" in med:
                checks["tokens/s vs C++ llama-server -np (≥ 0.8×)"] = (
                    ratio(m["tokens_per_s"], med["llama-server"]["tokens_per_s"]),
                    0.8,
                    True,
                )
            for name, (value, bound, at_least) in checks.items():
                met = value >= bound if at_least else value <= bound
                out.append(
                    {
                        "streams": int(level),
                        "side": side,
                        "goal": name,
                        "value": round(value, 2),
                        "met": bool(met),
                    }
                )
                say(
                    f"goal at {level} streams, {side}: {name}: {value:.2f}× — "
                    f"{'met' if met else 'NOT met'}"
                )
    return out


def title(b: Bench, data: dict[str, Any]) -> tuple[str, str]:
    """The table's title and its note."""
    z, t = b.sizes, b.threads
    return (
        f"concurrent streams through one worker: engine vs a thread per stream vs the gguf "
        f"backend vs llama_cpp.server (same weights), {t} threads each, ≤ {z.conc_max_tokens} "
        f"tokens per request, {z.conc_seconds:g} s per point, median of {z.conc_repeat}",
        "goals (issue 17): at 8 and 32 streams, tokens/s ≥ 3× one stream and ≥ 2× "
        "llama_cpp.server, inter-token p99 ≤ 2× one stream's; ITL: gaps between tokens as the "
        "client receives them",
    )
