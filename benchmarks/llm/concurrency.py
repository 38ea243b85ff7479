"""**concurrency** — 1, 4 and 8 client threads, each streaming one request after another (closed
loop) for a fixed time, against (a) one Tandem worker process serving ``sort-cloud``
(transformers, fast decode; one shared ``CloudClient``) and (b) ``python -m llama_cpp.server``
serving **the same weights** exported to GGUF **f32** (same precision), ``--n_threads T
--n_threads_batch T --n_ctx 512 --interrupt_requests false`` (requests queue instead of cutting
each other off; it serves one at a time) ``--logits_all false``, with one ``openai`` client per
thread sending ``extra_body={"repeat_penalty": 1.0}``. Why not the GGUF in the worker: a worker
opens a ``gguf`` model with ``parallel=1`` (no manifest or config key sets it), so a second
concurrent stream is refused ``Overloaded``. Prompts: held-out sorting items of the three
longest lengths (answers of that many tokens, then EOS; greedy, so both sides do the same
work). Aggregate tokens/s, inter-token gaps as the client sees them (tokens that arrive in one
message count 0 after the first), time to first token. No goal.

The closed loop is ``tandem bench``'s own (:func:`tandem.bench.load.run_closed`); the tokens,
gaps and TTFT of each answer are this module's (a :class:`~tandem.bench.stats.GenSample`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from benchmarks.llm.harness import Bench, percentile, ratio, say, sha
from benchmarks.llm.llama_server import get_json, llama_server
from tandem.bench.load import run_closed
from tandem.bench.stats import GenSample, Outcome
from tandem.reference import lm_task
from tandem.reference.lm_models import CLOUD

COLUMNS = [
    "streams",
    "Tandem tok/s",
    "ITL p50 ms",
    "ITL p99 ms",
    "TTFT p50 ms",
    "llama.cpp tok/s",
    "ITL p50 ms",
    "ITL p99 ms",
    "TTFT p50 ms",
    "Tandem/llama.cpp",
    "errors",
]
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


def run(b: Bench) -> tuple[dict[str, Any], list[list[Any]]]:
    """Each level of concurrent streams, Tandem's worker and ``llama_cpp.server`` in turn.
    Returns the JSON and the table's rows."""
    from tandem.runtime.client import CloudClient
    from tandem.runtime.gguf import export_gguf

    z = b.sizes
    longest = lm_task.MAX_LEN  # long answers: the work is mostly decode
    lengths = (longest - 8, longest - 4, longest)
    prompts = [lm_task.held_out(d, 8)[i].prompt for i in range(8) for d in lengths]
    f32 = b.cache / f"cloud-{sha(next(b.cloud_hf.glob('*.safetensors')))[:12]}-f32.gguf"
    if not f32.exists():
        export_gguf(b.cloud_hf, f32, qtype="f32")
    w = b.worker()
    say("concurrency: starting llama_cpp.server on the same weights (f32 GGUF)")
    data: dict[str, Any] = {
        "tandem": "worker process serving sort-cloud (transformers, fast decode, f32)",
        "reference": f"llama_cpp.server, {f32.name} (the same weights, f32), one request at a time",
        "threads": b.threads,
        "max_tokens": z.conc_max_tokens,
        "seconds": z.conc_seconds,
        "repeat": z.conc_repeat,
        "levels": {},
    }
    rows = []
    with (
        CloudClient(w.endpoint) as client,
        llama_server(f32, b.threads, b.tmp / "llama_server.log") as url,
    ):
        model_id = get_json(url + "/models")["data"][0]["id"]
        sides = {
            "tandem": tandem_request(client, z.conc_max_tokens),
            "llama.cpp": openai_request(url, model_id, z.conc_max_tokens),
        }
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
            tan, ref = med["tandem"], med["llama.cpp"]
            rows.append(
                [
                    level,
                    f"{tan['tokens_per_s']:.0f}",
                    f"{tan['itl_p50_ms']:.2f}",
                    f"{tan['itl_p99_ms']:.2f}",
                    f"{tan['ttft_p50_ms']:.1f}",
                    f"{ref['tokens_per_s']:.0f}",
                    f"{ref['itl_p50_ms']:.2f}",
                    f"{ref['itl_p99_ms']:.2f}",
                    f"{ref['ttft_p50_ms']:.1f}",
                    f"{ratio(tan['tokens_per_s'], ref['tokens_per_s']):.2f}×",
                    tan["errors"] + ref["errors"],
                ]
            )
            data["levels"][str(level)]["tokens_per_s_ratio"] = ratio(
                tan["tokens_per_s"], ref["tokens_per_s"]
            )
    return data, rows


def title(b: Bench, data: dict[str, Any]) -> tuple[str, str]:
    """The table's title and its note."""
    z, t = b.sizes, b.threads
    return (
        f"concurrent streams: Tandem worker (sort-cloud, transformers f32) vs llama_cpp.server "
        f"(same weights, f32 GGUF), {t} threads each, ≤ {z.conc_max_tokens} tokens per "
        f"request, {z.conc_seconds:g} s per point, median of {z.conc_repeat}",
        "no goal; ITL: gaps between tokens as the client receives them",
    )
