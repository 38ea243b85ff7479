"""``mode: speculative`` end to end: a tiny random Llama on the edge drafts (transformers, or
the same model as a GGUF on llama.cpp), a real worker process verifies with a different tiny
Llama, a Mixtral (transformers) or the Llama as a GGUF (llama.cpp).

Greedy answers must be the cloud model's own greedy answers token for token, whatever γ; the
stream and the result agree; the drafted tokens are marked; stop strings, max_tokens, the
fallback to a plain stream, a cloud that is down or killed mid-answer (degraded), and the
privacy rule behave as in the other modes."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tandem.cloud.config import WorkerConfig
from tandem.cloud.process import WorkerProcess
from tandem.edge import EdgeRuntime
from tandem.router.policy import policy_from_dict
from tandem.runtime.errors import ConfigError
from tandem.runtime.generation import SamplingParams
from tandem.runtime.manifest import Manifest, write_manifest
from tandem.runtime.speculative import STREAM
from tandem.runtime.types import GenerationResult, Tier
from tests.conftest import require
from tests.lm import CHARS, gguf_entry, lm_entry, tiny_lm

pytestmark = pytest.mark.integration

PROMPTS = ["sort:dcba=", "ab", "zz:q", "sort:qwerty=", "hello world"]
N = 20
ALWAYS = 0.999  # a token_min threshold these random models always fail: every answer escalates


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require("transformers")
    require("llama_cpp")
    require("gguf")
    out = tmp_path_factory.mktemp("spec")
    kw = {"hidden": 64, "layers": 2, "heads": 4, "initializer_range": 0.2}
    tiny_lm(out / "edge-lm", seed=3, **kw)
    tiny_lm(out / "cloud-lm", seed=6, **kw)
    tiny_lm(out / "cloud-moe", arch="mixtral", seed=7, **kw)
    entries = [lm_entry(out, n) for n in ("edge-lm", "cloud-lm", "cloud-moe")]
    entries += [gguf_entry(out, f"{name}-gguf", name) for name in ("edge-lm", "cloud-lm")]
    write_manifest(out, Manifest(models=entries))
    return out


@pytest.fixture(scope="module")
def worker(models: Path) -> Iterator[WorkerProcess]:
    cfg = WorkerConfig.model_validate(
        {
            "bind": "tcp://127.0.0.1:*",
            "models_dir": str(models),
            "models": ["cloud-lm", "cloud-moe", "cloud-lm-gguf"],
        }
    )
    with WorkerProcess(cfg) as w:
        yield w


@pytest.fixture(scope="module")
def own(models: Path):
    """Each model's own greedy answer, computed in this process."""
    from tandem.runtime.backends import open_backend

    cache: dict[tuple[str, str, int], str] = {}
    loaded: dict[str, Any] = {}

    def answer(model: str, prompt: str, n: int = N) -> str:
        if model not in loaded:
            gguf = model.endswith("-gguf")
            path = models / (f"{model[:-5]}.gguf" if gguf else model)
            loaded[model] = open_backend("gguf" if gguf else "transformers", path)
        key = (model, prompt, n)
        if key not in cache:
            steps = loaded[model].stream(prompt, SamplingParams(max_tokens=n))
            cache[key] = "".join(s.text for s in steps)
        return cache[key]

    return answer


def runtime(models: Path, endpoint: str, cloud: str = "cloud-lm", **task: Any) -> EdgeRuntime:
    local = task.pop("local", {"path": str(models / "edge-lm"), "format": "transformers"})
    spec: dict[str, Any] = {
        "kind": "generate",
        "local": local,
        "cloud": {"endpoint": endpoint, "model": cloud},
        "gate": {"metric": "token_min", "threshold": ALWAYS},
        "mode": "speculative",
        "probe_tokens": 2,
        "max_tokens": N,
        "rules": [{"tag": "private", "route": "local"}],
        "deadline_ms": 10_000,
        **task,
    }
    return EdgeRuntime(policy_from_dict({"tasks": {"t": spec}}))


def streamed(rt: EdgeRuntime, prompt: str, **kw: Any) -> GenerationResult:
    """Stream an answer; check the stream and the result agree, and the drafted flags."""
    text, tokens, drafted = "", [], []
    with rt.generate(prompt, stream=True, **kw) as s:
        for c in s:
            text += c.text
            tokens += c.tokens
            if c.tier is Tier.CLOUD:
                assert c.drafted is not None and len(c.drafted) == len(c.tokens)
                drafted += c.drafted
    r = s.result
    assert r is not None and (text, tokens) == (r.text, r.tokens)
    if r.speculation and not r.speculation["fallback"] and not r.degraded:
        assert sum(drafted) == r.speculation["accepted"]
    return r


@pytest.mark.parametrize("cloud", ["cloud-lm", "cloud-moe", "cloud-lm-gguf"])
@pytest.mark.parametrize("gamma", [1, 4, "auto"])
def test_greedy_answers_are_the_cloud_models_own(models, worker, own, cloud, gamma) -> None:
    with runtime(models, worker.endpoint, cloud, speculative={"gamma": gamma}) as rt:
        for prompt in PROMPTS:
            r = streamed(rt, prompt)
            assert r.text == own(cloud, prompt), prompt
            assert set(r.token_tiers) <= {Tier.CLOUD} and r.escalated_at == 0
            spec = r.speculation
            assert spec is not None and (spec["rounds"] >= 1 or spec["fallback"])
            assert r.timings["gamma"] >= 0
            if gamma != "auto":
                assert max(spec["gammas"]) <= gamma


def test_a_gguf_edge_drafting_for_its_own_weights_is_always_accepted(models, worker, own) -> None:
    local = {"path": str(models / "cloud-lm.gguf"), "format": "gguf", "threads": 1}
    with runtime(models, worker.endpoint, "cloud-lm", local=local, speculative={"gamma": 4}) as rt:
        accepted = drafted = 0
        for prompt in PROMPTS:
            r = streamed(rt, prompt)
            assert r.text == own("cloud-lm", prompt)
            assert r.speculation is not None
            accepted += r.speculation["accepted"]
            drafted += r.speculation["drafted"]
    assert drafted > 0 and accepted / drafted > 0.95  # f32 both sides: ties aside, all agree


def test_stop_strings_max_tokens_and_seeded_sampling(models, worker, own) -> None:
    prompt = PROMPTS[0]
    full = own("cloud-lm", prompt)
    stop = full[7:9]
    with runtime(models, worker.endpoint, speculative={"gamma": 3}) as rt:
        r = streamed(rt, prompt, stop=[stop])
        assert r.text == full[: full.index(stop)] and r.finish_reason == "stop"
        r = streamed(rt, prompt, max_tokens=5)
        assert r.text == own("cloud-lm", prompt, 5) and len(r.tokens) == 5
        assert r.finish_reason == "length"
        a = streamed(rt, prompt, temperature=0.9, seed=11)
        b = streamed(rt, prompt, temperature=0.9, seed=11)
        assert a.text == b.text and len(a.tokens) > 0  # same seed, same answer


def test_the_controller_falls_back_to_a_plain_stream_on_a_slow_link(models, worker, own) -> None:
    with runtime(models, worker.endpoint) as rt:
        ctl = rt._generators["t"].controller  # teach it a slow link and a fast stream
        for g in (4, 2, 8):
            ctl.observe_round(g, 1, draft_s=g * 1e-3, wall_s=0.2, compute_s=1e-3, prefilled=0)
        ctl.observe_stream(0.2, 1e-3)
        assert ctl.choose(N) == STREAM
        r = streamed(rt, PROMPTS[1])
    assert r.text == own("cloud-lm", PROMPTS[1])
    assert r.speculation is not None and r.speculation["fallback"]
    assert r.speculation["rounds"] == 0 and set(r.token_tiers) == {Tier.CLOUD}
    assert r.phases == ["route", "probe", "drafting", "cloud", "done"]


def test_a_stop_string_across_the_hand_over_to_a_stream_still_ends_the_answer(
    models, worker, own
) -> None:
    """Drafting holds back text that may begin a stop string; when a plain stream takes over
    there, a stop string that begins in that text and ends in the stream's must still end the
    answer (the stream continues after the held text, and the edge checks the seam)."""
    prompt = PROMPTS[0]
    full = own("cloud-lm", prompt)
    with runtime(models, worker.endpoint, speculative={"gamma": 1}) as rt:
        ctl = rt._generators["t"].controller
        ctl.choose = lambda remaining, first=False: 1 if first else STREAM  # one round, then stream
        r = streamed(rt, prompt)
        assert r.text == full and r.speculation["rounds"] == 1 and r.speculation["fallback"]
        k = 1 + r.speculation["accepted"]  # tokens (one character each) drafting produced
        stop = full[k - 1 : k + 1]  # its last character, and the stream's first
        r = streamed(rt, prompt, stop=[stop])
    assert r.speculation["fallback"]
    assert r.text == full[: full.index(stop)] and r.finish_reason == "stop"


def test_a_drafted_answer_keeps_its_peer_while_other_calls_take_sockets(models, worker) -> None:
    """Between two verify rounds of one answer, other calls of the same client take socket
    sets from its pool (here: one held outright). The answer's rounds still reach the worker
    as the peer that opened the session: no resync."""
    from tandem.edge.drafting import DraftRequest, DraftStats, RemoteVerifySession
    from tandem.runtime.speculative import backend_vocab_digest

    with runtime(models, worker.endpoint) as rt:
        task = rt._generators["t"]
        req = DraftRequest(task, PROMPTS[0], None, "", SamplingParams(max_tokens=N), (), 10_000, 0)
        session = RemoteVerifySession(req, backend_vocab_digest(task.backend))
        stats = DraftStats()
        sequence = task.backend.tokenize(PROMPTS[0])
        try:
            out, _ = session.round(sequence, [], [], stats, N)
            sequence.append(out["token"])
            other = task.client.pool.checkout()  # another call in flight meanwhile
            try:
                session.round(sequence, [], [], stats, N - 1)
            finally:
                task.client.pool.checkin(other)
        finally:
            session.close()
    assert stats.resyncs == 0


def test_drafted_flags_survive_a_stop_string_cut() -> None:
    """A drafted token cut by a stop string is still marked drafted (the flag rides on the
    step, not on the identity of an object that the cut replaces)."""
    from tandem.runtime.generation import TokenText

    pieces = {1: b"ab", 2: b"cd", 3: b"xy"}
    text = TokenText(pieces.__getitem__, frozenset({0}), stops=["c"])
    out = text.push(1, -0.1, drafted=True) + text.push(2, -0.2, drafted=True)
    assert text.ended and [(s.text, s.drafted) for s in out] == [("ab", True)]
    text = TokenText(pieces.__getitem__, frozenset({0}), stops=["bc"])
    out = text.push(1, -0.1, drafted=True) + text.push(2, -0.2)
    assert text.ended and [(s.text, s.drafted) for s in out] == [("a", True)]


def test_a_draft_model_with_another_vocabulary_streams_instead(models, worker, own) -> None:
    """Drafts are token ids: the worker refuses a different vocabulary, the edge streams."""
    other = tiny_lm(models.parent / "reversed-vocab", seed=3, chars=CHARS[::-1])
    local = {"path": str(other), "format": "transformers"}
    with runtime(models, worker.endpoint, local=local) as rt:
        r = streamed(rt, PROMPTS[0])
    assert r.text == own("cloud-lm", PROMPTS[0]) and not r.degraded
    assert r.speculation is not None and r.speculation["fallback"]
    assert r.speculation["rounds"] == 0 and r.speculation["fallback_reason"].startswith("refused")


def test_private_stays_local_and_a_dead_cloud_degrades(models, own) -> None:
    dead = "tcp://127.0.0.1:9"
    with runtime(models, dead, deadline_ms=300) as rt:
        r = streamed(rt, PROMPTS[0], tags={"private"})
        assert r.tiers == [Tier.EDGE] and r.text == own("edge-lm", PROMPTS[0])
        r = streamed(rt, PROMPTS[0])
        assert r.tiers == [Tier.EDGE_DEGRADED] and r.text == own("edge-lm", PROMPTS[0])
        assert "cloud-" in r.reason


def test_worker_killed_mid_answer_the_edge_finishes(models, own) -> None:
    cfg = WorkerConfig.model_validate(
        {"bind": "tcp://127.0.0.1:*", "models_dir": str(models), "models": ["cloud-lm"]}
    )
    n = 300
    with (
        WorkerProcess(cfg) as w,
        runtime(models, w.endpoint, max_tokens=n, speculative={"gamma": 2}, deadline_ms=3000) as rt,
    ):
        stream = rt.generate(PROMPTS[0], stream=True)
        text = {Tier.CLOUD: "", Tier.EDGE_DEGRADED: ""}
        for c in stream:
            text[c.tier] += c.text
            if c.tier is Tier.CLOUD and len(text[Tier.CLOUD]) >= 10 and w.proc.poll() is None:
                os.kill(w.proc.pid, signal.SIGKILL)
        r = stream.result
    assert r is not None and r.tiers[0] is Tier.CLOUD and "cloud-" in r.reason
    assert r.text == text[Tier.CLOUD] + text[Tier.EDGE_DEGRADED]
    n_cloud = r.token_tiers.count(Tier.CLOUD)
    assert text[Tier.CLOUD] == own("cloud-lm", PROMPTS[0], n_cloud)
    # the edge picks up exactly where the cloud's text stops (its own answer: maybe EOS at once)
    assert text[Tier.EDGE_DEGRADED] == own("edge-lm", PROMPTS[0] + text[Tier.CLOUD], n - n_cloud)


def test_policy_errors_name_the_key(models) -> None:
    with pytest.raises(ConfigError, match=r"speculative\.gamma"):
        runtime(models, "tcp://127.0.0.1:9", speculative={"gamma": 0})
    with pytest.raises(ConfigError, match=r"speculative\.max_gamma"):
        runtime(models, "tcp://127.0.0.1:9", speculative={"max_gamma": 99})
