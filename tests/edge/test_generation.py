"""EdgeRuntime.generate end to end: a tiny random Llama on the edge (transformers backend), a
different one served by a real worker process, and every routing path — rules, the three
escalation modes, both hand-offs, the cloud down or killed mid-stream, the escalation log.

Each answer is checked token for token against the models run in this process: the edge's
tokens are the edge model's greedy output, the cloud's are the cloud model's greedy
continuation of ``prompt + the edge's text``, and nothing is duplicated or lost."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tandem.cloud.config import WorkerConfig
from tandem.cloud.process import WorkerProcess
from tandem.edge import EdgeRuntime, EscalationLog
from tandem.router.policy import policy_from_dict
from tandem.runtime.backends.transformers_lm import TransformersBackend
from tandem.runtime.errors import BadRequest
from tandem.runtime.generation import SamplingParams
from tandem.runtime.types import GenerationResult, Tier
from tests.lm import lm_models_dir

pytestmark = pytest.mark.integration

PROMPT = "sort:dcba="
N = 16  # max_tokens
ALWAYS = 0.999  # a token_min threshold that every answer of these random models fails


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # seeds whose greedy answers to PROMPT run past N tokens without EOS, and differ
    return lm_models_dir(
        tmp_path_factory.mktemp("gen"),
        {"edge-lm": {"seed": 3}, "cloud-lm": {"seed": 6, "n_ctx": 4096}},
    )


@pytest.fixture(scope="module")
def worker(models: Path) -> Iterator[WorkerProcess]:
    cfg = WorkerConfig.model_validate(
        {"bind": "tcp://127.0.0.1:*", "models_dir": str(models), "models": ["cloud-lm"]}
    )
    with WorkerProcess(cfg) as w:
        yield w


@pytest.fixture(scope="module")
def edge_lm(models: Path) -> TransformersBackend:
    return TransformersBackend(models / "edge-lm", max_streams=64)


@pytest.fixture(scope="module")
def cloud_lm(models: Path) -> TransformersBackend:
    return TransformersBackend(models / "cloud-lm", max_streams=64)


def greedy(backend: TransformersBackend, prompt: str, n: int) -> str:
    return "".join(s.text for s in backend.stream(prompt, SamplingParams(max_tokens=n)))


def runtime(models: Path, endpoint: str | None, log: Path | None = None, **task: Any):
    spec: dict[str, Any] = {
        "kind": "generate",
        "local": {"path": str(models / "edge-lm"), "format": "transformers"},
        "gate": {"metric": "token_min", "threshold": ALWAYS},
        "max_tokens": N,
        "rules": [{"tag": "private", "route": "local"}],
        "deadline_ms": 10_000,
        **task,
    }
    if endpoint is not None:
        spec["cloud"] = {"endpoint": endpoint, "model": "cloud-lm"}
        spec["rules"] = [*spec["rules"], {"tag": "critical", "route": "cloud"}]
    policy: dict[str, Any] = {"tasks": {"sort": spec}}
    if log is not None:
        policy["escalation_log"] = {"path": str(log), "synchronous": "normal"}
    return EdgeRuntime(policy_from_dict(policy))


def streamed(rt: EdgeRuntime, prompt: str = PROMPT, **kw: Any) -> tuple[str, GenerationResult]:
    """The caller's view of a stream (a restart chunk withdraws what came before), and the
    result; asserts they agree token for token."""
    text, tokens, tiers = "", [], []
    with rt.generate(prompt, stream=True, **kw) as s:
        for c in s:
            if c.restart:
                text, tokens, tiers = "", [], []
            text += c.text
            tokens += c.tokens
            tiers += [c.tier] * len(c.tokens)
    r = s.result
    assert r is not None
    assert (text, tokens, tiers) == (r.text, r.tokens, r.token_tiers)
    assert len(r.logprobs) == len(r.tokens)
    return text, r


def test_local_only_is_the_edge_models_own_answer(models, edge_lm) -> None:
    with runtime(models, None) as rt:
        text, r = streamed(rt)
    assert text == greedy(edge_lm, PROMPT, N)
    assert r.tiers == [Tier.EDGE] and r.reason == "no-cloud-target"
    assert r.escalated_at is None and r.request_id is None
    assert r.timings["ttft"] > 0 and len(r.inter_token_ms) == len(r.tokens) - 1
    assert r.prompt_tokens == len(PROMPT) + 1  # BOS


def test_rules_private_stays_and_critical_goes(models, worker, edge_lm, cloud_lm) -> None:
    with runtime(models, worker.endpoint) as rt:
        text, r = streamed(rt, tags={"private"})
        assert text == greedy(edge_lm, PROMPT, N) and r.tiers == [Tier.EDGE]
        assert r.reason == "rule:private" and r.phases == ["route", "local", "done"]
        text, r = streamed(rt, tags={"critical"})
    assert text == greedy(cloud_lm, PROMPT, N) and r.tiers == [Tier.CLOUD]
    assert r.phases == ["route", "cloud", "done"]
    assert r.escalated_at == 0 and r.model_versions["cloud"].startswith("cloud-lm@")


def test_probe_then_continue(models, worker, edge_lm, cloud_lm) -> None:
    with runtime(models, worker.endpoint, mode="probe", probe_tokens=4) as rt:
        text, r = streamed(rt)
    prefix = greedy(edge_lm, PROMPT, 4)
    assert r.escalated_at == 4 and r.tiers == [Tier.EDGE, Tier.CLOUD]
    assert r.token_tiers[:4] == [Tier.EDGE] * 4
    assert text == prefix + greedy(cloud_lm, PROMPT + prefix, N - 4)
    assert r.confidence is not None and r.confidence < ALWAYS
    assert r.phases == ["route", "probe", "cloud", "done"]


def test_probe_then_restart_and_upfront(models, worker, cloud_lm) -> None:
    want = greedy(cloud_lm, PROMPT, N)
    with runtime(models, worker.endpoint, mode="probe", handoff="restart") as rt:
        text, r = streamed(rt)
    assert text == want and r.tiers == [Tier.CLOUD]
    gate = {"metric": "first_entropy", "threshold": 0.0}
    with runtime(models, worker.endpoint, mode="upfront", gate=gate) as rt:
        text, r = streamed(rt)
    assert text == want and r.tiers == [Tier.CLOUD] and r.reason == "low-confidence"


def test_no_escalation_when_the_probe_is_the_whole_answer(models, worker, edge_lm) -> None:
    with runtime(models, worker.endpoint, mode="probe", probe_tokens=4, max_tokens=4) as rt:
        text, r = streamed(rt)
    assert text == greedy(edge_lm, PROMPT, 4) and r.tiers == [Tier.EDGE]
    assert r.reason == "no-room-to-escalate" and r.request_id is None


def test_a_confident_probe_finishes_on_the_edge(models, worker, edge_lm) -> None:
    gate = {"metric": "token_min", "threshold": 0.0}
    with runtime(models, worker.endpoint, mode="probe", gate=gate) as rt:
        text, r = streamed(rt)
    assert text == greedy(edge_lm, PROMPT, N) and r.tiers == [Tier.EDGE]


def test_midstream_continue_and_restart(models, worker, edge_lm, cloud_lm) -> None:
    with runtime(models, worker.endpoint, mode="midstream", window=2) as rt:
        text, r = streamed(rt)
    # the first token already fails the gate: the cloud continues after it
    prefix = greedy(edge_lm, PROMPT, 1)
    assert r.escalated_at == 1 and r.tiers == [Tier.EDGE, Tier.CLOUD]
    assert text == prefix + greedy(cloud_lm, PROMPT + prefix, N - 1)
    assert r.phases == ["route", "midstream", "cloud", "done"]
    with runtime(models, worker.endpoint, mode="midstream", handoff="restart") as rt:
        chunks = list(rt.generate(PROMPT, stream=True))
        text, r = streamed(rt)
    assert chunks[0].tier is Tier.EDGE and any(c.restart for c in chunks)
    assert text == greedy(cloud_lm, PROMPT, N) and r.escalated_at == 0


def test_cloud_down_the_edge_finishes_degraded(models, edge_lm, tmp_path) -> None:
    dead = "tcp://127.0.0.1:9"  # discard port: nothing answers
    with runtime(models, dead, mode="probe", probe_tokens=3, first_token_ms=300) as rt:
        text, r = streamed(rt)
    assert text == greedy(edge_lm, PROMPT, N)  # the same model picks up where it stood
    assert r.tiers == [Tier.EDGE, Tier.EDGE_DEGRADED] and r.degraded
    assert r.token_tiers[3:] == [Tier.EDGE_DEGRADED] * (N - 3)
    assert "cloud-" in r.reason
    assert r.phases == ["route", "probe", "cloud", "degraded", "done"]


def test_cloud_killed_mid_stream(models, edge_lm, tmp_path) -> None:
    cfg = WorkerConfig.model_validate(
        {"bind": "tcp://127.0.0.1:*", "models_dir": str(models), "models": ["cloud-lm"]}
    )
    n = 400  # long enough on the tiny cloud model to be killed half way
    texts = {Tier.CLOUD: "", Tier.EDGE_DEGRADED: ""}
    with WorkerProcess(cfg) as w, runtime(models, w.endpoint, max_tokens=n) as rt:
        stream = rt.generate(PROMPT, stream=True, tags={"critical"})
        seen = 0
        for c in stream:
            texts[c.tier] += c.text
            seen += len(c.tokens)
            if c.tier is Tier.CLOUD and seen >= 20 and w.proc.poll() is None:
                os.kill(w.proc.pid, signal.SIGKILL)
        r = stream.result
    assert r is not None and r.tiers == [Tier.CLOUD, Tier.EDGE_DEGRADED]
    assert r.text == texts[Tier.CLOUD] + texts[Tier.EDGE_DEGRADED]
    assert 20 <= r.token_tiers.index(Tier.EDGE_DEGRADED) < n
    # the edge picks up exactly where the cloud's text stops, and finishes the answer (how
    # far the cloud got depends on when the kill lands: the edge may then reach EOS early)
    n_cloud = r.token_tiers.count(Tier.CLOUD)
    assert texts[Tier.EDGE_DEGRADED] == greedy(edge_lm, PROMPT + texts[Tier.CLOUD], n - n_cloud)
    assert "stream.interrupted" in r.reason


def test_escalations_are_logged_with_both_answers(models, worker, tmp_path) -> None:
    log = tmp_path / "esc.sqlite"
    with runtime(models, worker.endpoint, log=log, mode="probe", probe_tokens=4) as rt:
        r = rt.generate(PROMPT)
        rt.generate(PROMPT, tags={"private"})  # not escalated: not logged
    with EscalationLog(log) as esc:
        rows = list(esc.records())
    assert len(rows) == 1
    row = rows[0]
    assert row.request_id == r.request_id and row.tier == "cloud"
    gen = row.generation
    assert gen is not None
    assert gen["prompt"] == PROMPT and gen["answer"] == r.text
    assert gen["edge"] + gen["cloud"] == r.text and gen["escalated_at"] == 4
    assert len(row.edge_output) == 4 and len(row.cloud_output) == N - 4
    assert bytes(row.input) == PROMPT.encode()


def test_budget_limits_escalations(models, worker) -> None:
    budget = {"escalations_per_s": 0.001, "burst": 1}
    with runtime(models, worker.endpoint, budget=budget) as rt:
        first, second = rt.generate(PROMPT), rt.generate(PROMPT)
    assert first.tiers == [Tier.EDGE, Tier.CLOUD]
    assert second.tiers == [Tier.EDGE] and second.reason == "budget-exhausted"


def test_agenerate(models, edge_lm) -> None:
    async def both(rt: EdgeRuntime) -> tuple[str, str]:
        r = await rt.agenerate(PROMPT)
        chunks = [c async for c in rt.agenerate(PROMPT)]
        return r.text, "".join(c.text for c in chunks)

    with runtime(models, None) as rt:
        a, b = asyncio.run(both(rt))
    assert a == b == greedy(edge_lm, PROMPT, N)


def test_agenerate_does_not_wait_on_asyncios_default_executor(models, edge_lm) -> None:
    """Streams are pulled on the runtime's own threads: a default executor busy with other work
    (``ainfer`` calls, the application's own ``to_thread``) does not hold a stream back."""

    async def run(rt: EdgeRuntime) -> str:
        loop = asyncio.get_running_loop()
        release = threading.Event()
        busy = [loop.run_in_executor(None, release.wait) for _ in range(64)]  # > its threads
        try:
            chunks = [c async for c in rt.agenerate(PROMPT)]
        finally:
            release.set()
            await asyncio.gather(*busy)
        return "".join(c.text for c in chunks)

    with runtime(models, None) as rt:
        text = asyncio.run(asyncio.wait_for(run(rt), 30))
    assert text == greedy(edge_lm, PROMPT, N)


def test_cancelling_an_async_stream_does_not_wait_for_the_token_in_flight(models) -> None:
    """A task iterating a stream is cancelled while the stream waits for its next token (here:
    a cloud that is not there, for up to 5 s): the cancellation takes effect at once, and the
    stream is closed once that wait ends."""
    dead = "tcp://127.0.0.1:9"

    async def run(rt: EdgeRuntime) -> float:
        async def read() -> None:
            async for _ in rt.agenerate(PROMPT, tags={"critical"}, deadline_ms=5_000):
                pass

        task = asyncio.create_task(read())
        await asyncio.sleep(0.3)  # inside the first next(): waiting for the cloud
        t0 = time.perf_counter()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return time.perf_counter() - t0

    with runtime(models, dead, deadline_ms=5_000) as rt:
        waited = asyncio.run(run(rt))
    assert waited < 2.0, f"the cancellation waited {waited:.1f} s for the token in flight"


def test_cancelling_an_awaited_generation_closes_it(models) -> None:
    """``await rt.agenerate(...)`` cancelled: the generation is closed as soon as the call in
    flight returns (here the wait for a cloud that is not there), not run to its end."""
    from tandem.edge.answer_streams import AsyncAnswerStream

    dead = "tcp://127.0.0.1:9"
    with runtime(models, dead, deadline_ms=1_000) as rt:
        started = []

        def start():
            started.append(rt.generate(PROMPT, stream=True, tags={"critical"}))
            return started[-1]

        async def answer() -> None:
            await AsyncAnswerStream(start, rt._stream_threads())

        async def run() -> None:
            task = asyncio.create_task(answer())
            await asyncio.sleep(0.3)  # inside the first next(): waiting for the cloud
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.sleep(2.0)  # the cloud's wait ends (1 s), the close follows

        asyncio.run(run())
        r = started[0].result
    assert r is not None and r.finish_reason == "cancelled", r and r.finish_reason
    assert len(r.tokens) < N


def test_bad_requests(models) -> None:
    with runtime(models, None) as rt:
        with pytest.raises(BadRequest, match="unknown task"):
            rt.generate(PROMPT, task="nope")
        with pytest.raises(BadRequest, match="not in the model's vocabulary"):
            rt.generate("SORT!")
        with pytest.raises(BadRequest, match="max_tokens"):
            rt.generate(PROMPT, max_tokens=0)
        with pytest.raises(BadRequest, match="UTF-8"):
            rt.generate("sort:\ud800=")  # a lone surrogate (JSON can carry one)
        with pytest.raises(BadRequest, match="stop"):
            rt.generate(PROMPT, stop=["\udfff"])
        with pytest.raises(BadRequest, match="classify"):
            rt.infer([0.0], task="sort")
