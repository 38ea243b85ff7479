"""**streaming** — inter-token gaps of the same model (``sort-cloud``), prompt and greedy decode
through a worker (``CloudClient.generate`` on loopback) vs ``backend.stream`` in this process,
requests alternating. Goal: worker ≤ 1.2× in-process, on the median gap and on the mean gap
(each request's mean gap, the median over requests: robust to one stall, unlike a mean over
all gaps, and blind to chunk merging, unlike the median gap). An
extra row (info) runs ``backend.stream`` in this process on a new thread per request, as the
worker runs each stream on a thread of its own: it separates what the wire costs from what
running on another thread costs. It runs after the other two (a thread's OpenMP team slows the
main thread's next parallel region down, which would blur the reference).
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any

import numpy as np

from benchmarks.llm.harness import Bench, percentile, ratio
from tandem.reference import lm_task
from tandem.reference.lm_models import CLOUD

GOAL_STREAM = 1.2  # worker inter-token gap / in-process
COLUMNS = [
    "path",
    "ITL p50 ms",
    "ITL p99 ms",
    "ITL mean ms",
    "TTFT p50 ms",
    "ratio p50 / mean",
    "goal",
]


def run(b: Bench) -> tuple[dict[str, Any], list[list[Any]]]:
    """Inter-token gaps: in this process (main thread, and a fresh thread per request as the
    worker runs each stream), and through the worker."""
    from tandem.runtime.backends.transformers_lm import TransformersBackend
    from tandem.runtime.client import CloudClient
    from tandem.runtime.generation import SamplingParams

    w = b.worker()
    item = lm_task.held_out(lm_task.MAX_LEN, 1)[0]
    params = SamplingParams(max_tokens=item.difficulty + 1)
    backend = TransformersBackend(b.cloud_hf, name=CLOUD, threads=b.threads)
    backend.warm_up()  # in this (main) thread, as the worker warms its models up

    def local() -> list[float]:
        return [time.perf_counter() for _ in backend.stream(item.prompt, params)]

    def local_thread() -> list[float]:
        out: list[list[float]] = []
        th = threading.Thread(target=lambda: out.append(local()))
        th.start()
        th.join()
        return out[0]

    with CloudClient(w.endpoint) as client:

        def remote() -> list[float]:
            times: list[float] = []
            with client.generate(CLOUD, item.prompt, params, timeout_s=60) as call:
                for chunk in call:
                    times += [time.perf_counter()] * len(chunk.tokens)
            return times

        fns = {
            "in-process backend.stream": local,
            "  same, in a new thread per request (info)": local_thread,
            "worker (CloudClient.generate)": remote,
        }
        gaps: dict[str, list[float]] = {k: [] for k in fns}
        per_token: dict[str, list[float]] = {k: [] for k in fns}  # each request's mean gap
        ttft: dict[str, list[float]] = {k: [] for k in fns}
        tokens: dict[str, set[int]] = {k: set() for k in fns}
        for k in ("in-process backend.stream", "worker (CloudClient.generate)"):
            fns[k]()  # warm-up (the thread row runs last: see below)
        # in-process and worker alternate; the thread row runs after them: a thread's OpenMP
        # team slows the main thread's next parallel region (its first token) down
        plan = [k for k in fns if "thread" not in k] * b.sizes.stream_requests
        plan += [k for k in fns if "thread" in k] * b.sizes.stream_requests
        for k in plan:
            t0 = time.perf_counter()
            times = fns[k]()
            tokens[k].add(len(times))
            ttft[k].append(times[0] - t0 if times else math.nan)
            gaps[k] += list(np.diff(times))
            if len(times) > 1:
                per_token[k].append((times[-1] - times[0]) / (len(times) - 1))
    stats = {
        k: {
            "itl_p50_ms": percentile(v, 50) * 1e3,
            "itl_p99_ms": percentile(v, 99) * 1e3,
            "itl_mean_ms": percentile(per_token[k], 50) * 1e3,  # median over requests
            "ttft_p50_ms": percentile(ttft[k], 50) * 1e3,
            "tokens_per_request": sorted(tokens[k]),
            "gaps": len(v),
        }
        for k, v in gaps.items()
    }
    ref = stats["in-process backend.stream"]
    rows = []
    for k, s in stats.items():
        p50 = ratio(s["itl_p50_ms"], ref["itl_p50_ms"])
        mean = ratio(s["itl_mean_ms"], ref["itl_mean_ms"])
        s["ratio_p50"], s["ratio_mean"] = p50, mean
        goal = ""
        if k.startswith("worker"):
            goal = "met" if p50 <= GOAL_STREAM and mean <= GOAL_STREAM else "NOT met"
        rows.append(
            [
                k,
                f"{s['itl_p50_ms']:.3f}",
                f"{s['itl_p99_ms']:.3f}",
                f"{s['itl_mean_ms']:.3f}",
                f"{s['ttft_p50_ms']:.2f}",
                f"{p50:.2f}× / {mean:.2f}×",
                goal,
            ]
        )
    worker = stats["worker (CloudClient.generate)"]
    data = {
        "model": CLOUD,
        "prompt": item.prompt,
        "requests_per_side": b.sizes.stream_requests,
        "threads": b.threads,
        "paths": stats,
        "ratio_p50": worker["ratio_p50"],
        "ratio_mean": worker["ratio_mean"],
        "goal_ratio": GOAL_STREAM,
        "goal_met": worker["ratio_p50"] <= GOAL_STREAM and worker["ratio_mean"] <= GOAL_STREAM,
    }
    return data, rows


def title(b: Bench, data: dict[str, Any]) -> tuple[str, str]:
    """The table's title and its note."""
    z, t = b.sizes, b.threads
    return (
        f"inter-token latency, sort-cloud, one {len(data['prompt'])}-character prompt, "
        f"{z.stream_requests} requests per side, {t} threads",
        f"goal: worker ≤ {GOAL_STREAM}× in-process (p50 and mean)",
    )
