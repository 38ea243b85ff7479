"""The worker's engines: streams and speculative sessions of one model stepped together, long
prompts in chunks, nothing heavy on the socket thread — with real models, a real worker on a
loopback socket, and a real client."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tandem.cloud.config import WorkerConfig
from tandem.runtime.backends.transformers_lm import TransformersBackend
from tandem.runtime.client import CloudClient
from tandem.runtime.errors import OverloadedError
from tandem.runtime.generation import SamplingParams
from tandem.runtime.manifest import TensorSpec
from tandem.runtime.speculative import backend_vocab_digest
from tandem.runtime.wire import Envelope, Kind
from tests.lm import tiny_lm
from tests.peers import ThreadWorker

LM = "tiny-lm"
CHUNK_S = 0.1  # what the slow backend below adds to each forward of a long chunk


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory) -> Path:
    return tiny_lm(tmp_path_factory.mktemp("engine") / LM, n_ctx=4096, initializer_range=0.2)


class SlowPrefill(TransformersBackend):
    """A real backend whose forwards that hold a prompt chunk (over 100 tokens) take
    :data:`CHUNK_S` longer (a stand-in for a model where a long prefill costs what it
    costs); it records each step's sizes."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.steps: list[list[int]] = []

    def run_batch(self, work):
        self.steps.append([len(t) for _, t, _ in work])
        if any(len(t) > 100 for _, t, _ in work):
            time.sleep(CHUNK_S)
        return super().run_batch(work)


class GatedExperts:
    """An experts backend that holds each call until the test opens the gate."""

    name = "moe"
    version = "gated-1"
    n_experts = 2
    hidden = 4
    input_spec = output_spec = TensorSpec(name="rows", shape=[None, 4])

    def __init__(self) -> None:
        self.hosted = [0, 1]
        self.gate = threading.Event()
        self.entered = threading.Event()

    def run_experts(self, experts, counts, rows):
        self.entered.set()
        assert self.gate.wait(30)
        return rows * 2

    def run(self, x):  # pragma: no cover - not an infer model
        raise NotImplementedError

    predict = run

    def check_batch(self, x):  # pragma: no cover
        return x

    def warm_up(self) -> None:
        pass

    def close(self) -> None:
        pass


def config(**generation: Any) -> WorkerConfig:
    return WorkerConfig.model_validate(
        {"bind": "tcp://127.0.0.1:*", "generation": {"max_streams": 8, **generation}}
    )


def concurrent_answers(c: CloudClient, prompts: list[str], params: SamplingParams) -> list:
    """Each prompt's streamed tokens, all streams at once (a thread each)."""
    got: list[list[int] | None] = [None] * len(prompts)

    def run(i: int) -> None:
        with c.generate(LM, prompts[i], params, timeout_s=30) as s:
            got[i] = [t for chunk in s for t in chunk.tokens]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return got


def verify_payload(backend: Any, tokens: list[int], draft: list[int]) -> dict[str, Any]:
    return {
        "model": LM,
        "session": b"v" * 16,
        "pos": 0,
        "tokens": tokens,
        "draft": draft,
        "max_tokens": 8,
        "vocab": backend_vocab_digest(backend),
    }


def test_health_and_a_stream_answer_while_a_long_prefill_and_an_experts_call_run(lm_dir):
    lm = SlowPrefill(lm_dir, name=LM)
    experts = GatedExperts()
    prompt = [int(t) for t in np.random.default_rng(0).integers(3, lm.n_vocab, 2048)]
    done: dict[str, float] = {}
    with ThreadWorker(config(), {LM: lm, "moe": experts}) as w, CloudClient(w.endpoint) as c:

        def verify() -> None:
            env = Envelope(kind=Kind.VERIFY, payload=verify_payload(lm, prompt, [5, 6]))
            reply = c.request(env, 30.0)
            assert reply.payload["prefilled"] == 2047
            done["verify"] = time.monotonic()

        def expert_call() -> None:
            rows = np.ones((3, 4), np.float32)
            env = Envelope(
                kind=Kind.EXPERTS,
                payload={"model": "moe", "experts": [0, 1], "counts": [1, 2], "rows": rows},
            )
            assert np.array_equal(c.request(env, 30.0).payload["rows"], rows * 2)
            done["experts"] = time.monotonic()

        threads = [threading.Thread(target=f) for f in (verify, expert_call)]
        for t in threads:
            t.start()
        try:
            assert experts.entered.wait(10)  # the experts call is running, and holds its thread
            while not any(max(s) > 100 for s in lm.steps):  # the prefill is running
                time.sleep(0.001)
            healths = [c.health(timeout_s=5)["state"] for _ in range(20)]
            with c.generate(LM, "abc", SamplingParams(max_tokens=1), timeout_s=10) as stream:
                assert len([t for chunk in stream for t in chunk.tokens]) == 1
        finally:
            experts.gate.set()
        assert healths == ["serving"] * 20
        assert "verify" not in done and "experts" not in done  # both were still running
        for t in threads:
            t.join(30)
        assert set(done) == {"verify", "experts"}
        health = c.health()
    # the prompt ran in chunks of prefill_chunk, and the stream's steps came between them
    chunks = [s for s in lm.steps if max(s) > 100]
    assert len(chunks) >= 2048 // 256 and all(max(s) <= 256 for s in chunks)
    assert any(len(s) > 1 for s in lm.steps)  # the stream's step shared a forward
    assert health["engines"][LM]["steps"] >= len(lm.steps) - 1


def test_streams_of_one_model_share_each_step_and_each_gets_its_own_answer(lm_dir):
    lm = SlowPrefill(lm_dir, name=LM)
    prompts = ["abc", "hello world", "z", "the quick brown fox", "aaa", "b", "cd", "xyz"]
    params = SamplingParams(max_tokens=24)
    want = [[s.token for s in lm.stream(p, params)] for p in prompts]
    with ThreadWorker(config(), {LM: lm}) as w, CloudClient(w.endpoint) as c:
        lm.steps.clear()
        got = concurrent_answers(c, prompts, params)
        engine = c.health()["engines"][LM]
    assert got == want  # batching changes nothing in the answers (greedy)
    assert max(len(s) for s in lm.steps) >= 4 and engine["max_batch"] >= 4


def test_sampled_streams_are_reproducible_by_seed_whatever_the_batch(lm_dir):
    lm = TransformersBackend(lm_dir, name=LM)
    params = SamplingParams(max_tokens=16, temperature=1.0, seed=7)
    want = [s.token for s in lm.stream("abc", params)]
    with ThreadWorker(config(), {LM: lm}) as w, CloudClient(w.endpoint) as c:
        got = concurrent_answers(c, ["abc"] * 4, params)
    assert got == [want] * 4


def test_queued_prompts_are_bounded(lm_dir):
    lm = SlowPrefill(lm_dir, name=LM)
    with (
        ThreadWorker(
            config(max_queued_prefill=3000, max_prompt_bytes=3000, prefill_chunk=128), {LM: lm}
        ) as w,
        CloudClient(w.endpoint) as c,
    ):
        long = "ab " * 700  # 2,100 bytes
        with c.generate(LM, long, SamplingParams(max_tokens=1), timeout_s=30) as first:
            with (
                pytest.raises(OverloadedError, match="max_queued_prefill"),
                c.generate(LM, long, SamplingParams(max_tokens=1), timeout_s=30) as second,
            ):
                list(second)
            assert len([t for chunk in first for t in chunk.tokens]) == 1


def test_a_gguf_models_streams_share_one_context_and_each_gets_its_own_answer(lm_dir):
    from tandem.runtime.backends.llamacpp import LlamaCppBackend
    from tandem.runtime.gguf import export_gguf

    path = export_gguf(lm_dir, lm_dir.parent / "tiny.gguf", qtype="f32")
    single = LlamaCppBackend(path, name=LM, threads=1, n_ctx=256)
    prompts = ["abc", "hello world", "z", "the quick brown fox"]
    params = SamplingParams(max_tokens=16)
    want = [[s.token for s in single.stream(p, params)] for p in prompts]
    single.close()
    gguf = LlamaCppBackend(path, name=LM, threads=1, n_ctx=256, parallel=4)
    with ThreadWorker(config(parallel=4), {LM: gguf}) as w, CloudClient(w.endpoint) as c:
        got = concurrent_answers(c, prompts, params)
        engine = c.health()["engines"][LM]
    gguf.close()
    assert got == want
    assert engine["max_batch"] >= 2  # sequences of one context shared steps


def test_a_job_whose_rows_are_all_its_tokens_is_never_split() -> None:
    from tandem.cloud.engine import _chunk

    assert _chunk(65, 65, 10) == 65  # a verify round of γ = 64 with a nearly full step
    assert _chunk(300, 3, 256) == 256 and _chunk(258, 3, 256) == 255  # leaves its 3 rows
    assert _chunk(10, 1, 256) == 10


def test_one_by_one_rolls_back_the_leases_that_ran_when_one_fails(lm_dir) -> None:
    from tandem.runtime.errors import BadRequest
    from tandem.runtime.generation import run_one_by_one

    lm = TransformersBackend(lm_dir, name=LM, decode="transformers")
    a, b = lm.lease([3, 4], 16), lm.lease([3, 4], 16)
    a.extend([3, 4], 1)
    b.extend([3, 4], 1)
    with pytest.raises(BadRequest):
        run_one_by_one([(a, [5], 1), (b, [lm.n_vocab + 7], 1)])  # b's token is out of range
    assert list(a.cached_tokens) == [3, 4] and list(b.cached_tokens) == [3, 4]
    assert [len(r) for r in run_one_by_one([(a, [5], 1), (b, [6, 7], 2)])] == [1, 2]
    a.close()
    b.close()
