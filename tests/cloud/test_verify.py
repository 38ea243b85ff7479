"""Speculative verification on the worker (:mod:`tandem.cloud.verify`), on real backends:
a tiny random Llama and Mixtral served with transformers and the Llama as a GGUF served with
llama.cpp, drafted by a different tiny Llama (so drafts are often rejected) and by the target
itself (so all are accepted).

* greedy: the speculative output equals the target's own greedy output, token for token, on
  many prompts, γ = 1..6, on every backend;
* sampling: the first two tokens are distributed as the target model's (chi-square at
  significance 0.001 against the target's own probabilities);
* sessions: resync after a lost session, eviction, TTL, explicit end, bad payloads;
* over the wire: a real worker process, the reply cache answering a retried request id."""

from __future__ import annotations

import os
import select
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq
from scipy import stats

from tandem.cloud.config import VerifySessionLimits, WorkerConfig
from tandem.cloud.engine import Engine, Mailbox
from tandem.cloud.process import WorkerProcess
from tandem.cloud.verify import VerifyTable
from tandem.edge.drafting import draft
from tandem.runtime.backends import LocalGenerationBackend
from tandem.runtime.client import CloudClient
from tandem.runtime.errors import BadRequest, OverloadedError, SessionLost, UnknownModel
from tandem.runtime.generation import SamplingParams, distribution
from tandem.runtime.manifest import Manifest, write_manifest
from tandem.runtime.speculative import backend_vocab_digest, draft_rng, pack_draft_q
from tandem.runtime.tokenizer import EOS
from tandem.runtime.wire import Envelope, Kind, WireCodec
from tests.conftest import require
from tests.lm import gguf_entry, lm_entry, tiny_lm
from tests.peers import raw_socket

PROMPTS = ["sort:dcba=", "ab", "zz:q", "sort:qwerty=", "hello world", "a=b"]
GREEDY = SamplingParams(max_tokens=16)
ALPHA = 0.001


class Table(VerifyTable):
    """A :class:`VerifyTable` with an engine per language model, answering each request as
    the worker's loop does — ``begin``, then the round's result posted back through the
    mailbox — but waiting for it (one request at a time)."""

    def __init__(self, limits: VerifySessionLimits, backends: dict[str, Any]) -> None:
        self.mailbox = Mailbox()
        engines = {
            n: Engine(n, b, step_tokens=512, prefill_chunk=256, max_queued_prefill=1 << 20)
            for n, b in backends.items()
            if isinstance(b, LocalGenerationBackend)
        }
        super().__init__(limits, backends, engines)

    def run(self, payload: Any, route: tuple[bytes, ...] = ()) -> dict[str, Any]:
        box: dict[str, Any] = {}
        out = self.begin(payload, route, self.mailbox.post, lambda r, e: box.update(r=r, e=e))
        if out is not None:
            return out
        deadline = time.monotonic() + 60
        while not box:
            assert time.monotonic() < deadline, "the round never came back"
            select.select([self.mailbox.fd], [], [], 0.1)
            self.mailbox.drain()
        if box["e"] is not None:
            raise box["e"]
        return box["r"]

    def settle(self) -> None:
        """Wait until each engine ran what was sent to it (a lease's close is one of them)."""
        for engine in self.engines.values():
            ran = threading.Event()
            engine.call(ran.set)
            assert ran.wait(30)

    def close(self) -> None:
        super().close()
        for engine in self.engines.values():
            engine.close()
        self.mailbox.drain()
        self.mailbox.close()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require("transformers")
    out = tmp_path_factory.mktemp("verify")
    kw = {"hidden": 64, "layers": 2, "heads": 4, "initializer_range": 0.2}
    tiny_lm(out / "draft", seed=3, **kw)
    tiny_lm(out / "cloud-llama", seed=6, **kw)
    tiny_lm(out / "cloud-moe", arch="mixtral", seed=7, **kw)
    entries = [lm_entry(out, n) for n in ("cloud-llama", "cloud-moe", "draft")]
    if _has("llama_cpp") and _has("gguf"):
        entries.append(gguf_entry(out, "cloud-gguf", "cloud-llama"))
    write_manifest(out, Manifest(models=entries))
    return out


def _has(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def backends(models: Path) -> Iterator[dict[str, Any]]:
    import torch

    from tandem.runtime.backends.transformers_lm import TransformersBackend

    # one thread: these tiny models gain nothing from two, and a busy machine makes a second
    # thread's barrier cost a scheduler time slice per op
    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    out: dict[str, Any] = {
        "cloud-llama": TransformersBackend(models / "cloud-llama", max_streams=4),
        "cloud-moe": TransformersBackend(models / "cloud-moe", max_streams=4),
        "draft": TransformersBackend(models / "draft", max_streams=4),
    }
    require("llama_cpp")
    from tandem.runtime.backends.llamacpp import LlamaCppBackend

    out["cloud-gguf"] = LlamaCppBackend(models / "cloud-llama.gguf", threads=1, parallel=2)
    yield out
    torch.set_num_threads(threads)


def digest(backend: Any) -> str:
    return backend_vocab_digest(backend)


def spec_decode(
    table: VerifyTable,
    model: str,
    drafter: Any,
    prompt: str,
    params: SamplingParams,
    gamma: int,
    rng: np.random.Generator | None = None,
) -> list[int]:
    """An answer drafted by ``drafter`` and verified by ``table``, as the edge runs it; the
    tokens up to ``params.max_tokens``, EOS not included."""
    seq = drafter.tokenize(prompt)
    sid, pos, out = os.urandom(16), 0, []
    lease = drafter.lease(seq)
    try:
        while len(out) < params.max_tokens:
            g = min(gamma, params.max_tokens - len(out) - 1)
            toks, qs = draft(lease, seq, g, params, rng, drafter.eos_tokens, 64)
            payload: dict[str, Any] = {
                "model": model,
                "session": sid,
                "pos": pos,
                "tokens": seq[pos:],
                "draft": toks,
                "temperature": params.temperature,
                "top_p": params.top_p,
                "seed": params.seed,
                "max_tokens": params.max_tokens,
                "vocab": digest(drafter),
            }
            if params.temperature > 0 and toks:
                payload["q_ids"], payload["q_probs"] = pack_draft_q(qs)
            r = table.run(payload)
            new = [*toks[: r["accepted"]], r["token"]]
            assert len(r["logprobs"]) == len(new) and r["pos"] == len(seq) + len(new)
            seq += new
            pos = r["pos"]
            if r["eos"]:
                return out + new[:-1]
            out += new
    finally:
        lease.close()
    return out[: params.max_tokens]


def own_greedy(backend: Any, prompt: str, n: int) -> list[int]:
    return [s.token for s in backend.stream(prompt, SamplingParams(max_tokens=n))]


CLOUDS = ["cloud-llama", "cloud-moe", "cloud-gguf"]


@pytest.mark.parametrize("model", CLOUDS)
def test_greedy_is_the_targets_own_output(backends, model) -> None:
    table = Table(VerifySessionLimits(), backends)
    target = backends[model]
    for i, prompt in enumerate(PROMPTS):
        want = own_greedy(target, prompt, GREEDY.max_tokens)
        for drafter in ("draft", model if model != "cloud-gguf" else "cloud-llama"):
            got = spec_decode(table, model, backends[drafter], prompt, GREEDY, 1 + i % 6)
            assert got == want, (prompt, drafter)
    drafted, accepted = table.counters["verify_drafted"], table.counters["verify_accepted"]
    assert 0 < accepted < drafted  # some drafts rejected, some accepted
    table.close()


def test_the_gguf_and_transformers_vocabularies_agree(backends) -> None:
    assert (
        digest(backends["cloud-gguf"])
        == digest(backends["cloud-llama"])
        == digest(backends["draft"])
    )


@pytest.mark.parametrize(
    ("model", "params", "seeded"),
    [
        ("cloud-moe", SamplingParams(max_tokens=2, temperature=1.0), False),
        ("cloud-gguf", SamplingParams(max_tokens=2, temperature=0.8, top_p=0.9), False),
        ("cloud-gguf", SamplingParams(max_tokens=2, temperature=1.0), True),
    ],
)
def test_sampling_matches_the_targets_distribution(backends, model, params, seeded) -> None:
    """Two-token answers drafted (γ = 1) by another model: the first token's frequencies match
    the target's distribution after the prompt, and the second's match its distribution
    after the most frequent first token. ``seeded``: each answer has its own seed, and the
    edge and the worker draw from it as they do (separate streams)."""
    table = Table(VerifySessionLimits(), backends)
    target, prompt, n = backends[model], "sort:ab=", 2000
    rng = np.random.default_rng(5)
    answers = []  # an answer shorter than 2 tokens ended with EOS
    for i in range(n):
        if seeded:
            params = SamplingParams(max_tokens=2, temperature=params.temperature, seed=i)
            rng = draft_rng(i)
        a = spec_decode(table, model, backends["draft"], prompt, params, 1, rng)
        answers.append((*a, EOS) if len(a) < 2 else tuple(a))
    ids = target.tokenize(prompt)
    lease = target.lease(ids)
    lease.truncate(0)  # a llama.cpp context comes with what it last held
    try:
        p1 = distribution(lease.extend(ids, 1)[0], params)
        top = int(np.argmax(np.bincount([a[0] for a in answers], minlength=len(p1))))
        lease.truncate(0)
        p2 = distribution(lease.extend([*ids, top], 1)[0], params)
    finally:
        lease.close()
    _fits(np.bincount([a[0] for a in answers], minlength=len(p1)), p1)
    second = [a[1] for a in answers if a[0] == top]
    assert len(second) > 100
    _fits(np.bincount(second, minlength=len(p2)), p2)


def _fits(counts: np.ndarray, p: np.ndarray) -> None:
    n = counts.sum()
    assert counts[p == 0].sum() == 0
    big = p * n >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(p[big] * n, p[~big].sum() * n)
    keep = exp > 0
    assert stats.chisquare(obs[keep], exp[keep]).pvalue > ALPHA


def _payload(**kw: Any) -> dict[str, Any]:
    base = {
        "model": "cloud-llama",
        "session": b"s" * 16,
        "pos": 0,
        "tokens": [1, 5, 6],
        "max_tokens": 32,
    }
    return {**base, "draft": [7], "vocab": kw.pop("vocab", None), **kw}


def test_sessions_lost_evicted_expired_and_ended(backends) -> None:
    d = digest(backends["cloud-llama"])
    table = Table(VerifySessionLimits(max_sessions=2, ttl_s=0.3), backends)
    r = table.run(_payload(vocab=d))
    assert r["prefilled"] == 2 and r["pos"] == 3 + r["accepted"] + 1
    again = table.run(_payload(pos=r["pos"], tokens=[], draft=[5, 6]))
    assert again["prefilled"] == 0 and again["pos"] == r["pos"] + again["accepted"] + 1
    with pytest.raises(SessionLost):  # behind what the worker holds
        table.run(_payload(pos=r["pos"], tokens=[], draft=[5]))
    with pytest.raises(SessionLost):  # the failed request dropped it
        table.run(_payload(pos=again["pos"], tokens=[], draft=[5]))
    for i in range(3):  # the third evicts the first (max_sessions 2)
        table.run(_payload(session=bytes([i]) * 16, vocab=d))
    assert len(table) == 2 and table.counters["verify_evicted"] == 1
    with pytest.raises(SessionLost):
        table.run(_payload(session=bytes([0]) * 16, pos=5, tokens=[], draft=[]))
    time.sleep(0.35)
    table.expire(time.monotonic())
    assert len(table) == 0 and table.counters["verify_expired"] == 2
    table.run(_payload(vocab=d))
    assert table.run({"model": "cloud-llama", "session": b"s" * 16, "end": True}) == {
        "closed": True
    }
    assert len(table) == 0
    last = table.run(_payload(vocab=d, max_tokens=1, draft=[]))
    assert last["done"] and last["pos"] == 4 and len(table) == 0  # it made max_tokens


@pytest.mark.parametrize("model", ["cloud-llama", "cloud-gguf"])
def test_starting_over_under_one_id_never_leaks_a_slot(backends, model) -> None:
    d = digest(backends[model])
    table = Table(VerifySessionLimits(), backends)
    free = backends[model].free_slots()
    for _ in range(12):  # pos 0 again and again: one session, its old slot given back
        table.run(_payload(model=model, vocab=d))
    assert len(table) == 1 and table.nbytes == next(iter(table.sessions.values())).lease.nbytes
    assert backends[model].free_slots() == free - 1
    table.close()
    assert backends[model].free_slots() == free and table.nbytes == 0


def test_a_draft_longer_than_max_gamma_is_verified_in_part_and_q_ids_are_checked(backends):
    d = digest(backends["cloud-llama"])
    table = Table(VerifySessionLimits(max_gamma=2), backends)
    r = table.run(_payload(vocab=d, draft=[7, 8, 9, 10, 11]))
    assert r["accepted"] <= 2 and r["pos"] == 3 + r["accepted"] + 1
    bad = np.array([[7, -1]], np.int32)
    with pytest.raises(BadRequest, match="q_ids"):
        table.run(_payload(vocab=d, temperature=1.0, q_ids=bad, q_probs=np.array([[0.5, 0.5]])))
    with pytest.raises(BadRequest, match="needs vocab"):
        table.run(_payload(session=b"n" * 16))


def test_a_stream_takes_a_context_from_an_idle_session(backends) -> None:
    gguf = backends["cloud-gguf"]
    table = Table(VerifySessionLimits(), backends)
    for i in range(2):  # parallel=2: both contexts held by sessions
        table.run(_payload(model="cloud-gguf", session=bytes([i]) * 16, vocab=digest(gguf)))
    assert gguf.free_slots() == 0
    table.make_room("cloud-gguf", gguf)
    table.settle()  # the engine closes the lease
    assert gguf.free_slots() == 1 and len(table) == 1
    assert len(list(gguf.stream("ab", SamplingParams(max_tokens=3)))) <= 3
    table.close()


def test_a_llama_cpp_session_takes_a_context_and_gives_it_back(backends) -> None:
    d = digest(backends["cloud-gguf"])
    table = Table(VerifySessionLimits(), backends)
    for i in range(5):  # parallel=2 contexts: older sessions are evicted for newer ones
        table.run(_payload(model="cloud-gguf", session=bytes([i]) * 16, vocab=d))
    assert len(table) == 2 and table.counters["verify_evicted"] == 3
    table.close()
    leases = [backends["cloud-gguf"].lease(), backends["cloud-gguf"].lease()]
    with pytest.raises(OverloadedError):
        backends["cloud-gguf"].lease()
    for lease in leases:
        lease.close()


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"extra": 1}, "unknown field"),
        ({"session": b"short"}, "16 bytes"),
        ({"tokens": "abc"}, "tokens must be a list"),
        ({"draft": list(range(65))}, "at most 64"),
        ({"draft": [10_000]}, "token ids must be in"),
        ({"tokens": [1, -3]}, "token ids must be in"),
        ({"temperature": 1.0}, "q_ids"),
        ({"temperature": -1.0}, "temperature"),
        ({"vocab": "nope"}, "vocabulary differs"),
        ({"tokens": []}, "needs its prompt"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"end": 1}, "boolean"),
        ({"model": "draft2"}, "no model"),
    ],
)
def test_bad_payloads_are_refused(backends, change, match) -> None:
    table = Table(VerifySessionLimits(), backends)
    payload = {**_payload(vocab=digest(backends["cloud-llama"])), **change}
    with pytest.raises((BadRequest, UnknownModel), match=match):
        table.run(payload)
    assert len(table) == 0


def test_a_bad_draft_distribution_is_refused(backends) -> None:
    table = Table(VerifySessionLimits(), backends)
    good = _payload(vocab=digest(backends["cloud-llama"]), temperature=1.0)
    ids = np.array([[7, 8]], np.int32)
    for probs, match in [
        (np.array([[0.5, 0.6]]), "sum to 1"),
        (np.array([[0.0, 1.0]]), "positive probability"),
        (np.array([[np.nan, 1.0]]), "finite"),
        (np.array([[0.5, 0.5]], np.float32), "float64"),
    ]:
        with pytest.raises(BadRequest, match=match):
            table.run({**good, "q_ids": ids, "q_probs": probs})
    r = table.run({**good, "q_ids": ids, "q_probs": np.array([[0.5, 0.5]])})
    assert 0 <= r["accepted"] <= 1


@pytest.fixture(scope="module")
def worker(models: Path):
    cfg = WorkerConfig.model_validate(
        {
            "bind": "tcp://127.0.0.1:*",
            "models_dir": str(models),
            "models": ["cloud-llama"],
            "speculative": {"max_sessions": 4},
        }
    )
    with WorkerProcess(cfg) as w:
        yield w


def test_over_the_wire_retries_replay_and_the_worker_stays_up(worker, backends) -> None:
    d = digest(backends["cloud-llama"])
    with CloudClient(worker.endpoint) as client, client.connection() as conn:
        env = Envelope(kind=Kind.VERIFY, payload=_payload(vocab=d))
        first, i = conn.request_via(env, 5.0)
        assert i == 0 and first.kind is Kind.RESULT
        retry = Envelope(kind=Kind.VERIFY, payload=_payload(vocab=d))
        retry.id = env.id
        again, _ = conn.request_via(retry, 5.0)
        assert again.payload == first.payload  # answered from the reply cache, not run again
        nxt = Envelope(
            kind=Kind.VERIFY, payload=_payload(pos=first.payload["pos"], tokens=[], draft=[])
        )
        assert conn.request_via(nxt, 5.0)[0].payload["pos"] == first.payload["pos"] + 1
        for bad in ({"model": 3}, "junk", {"model": "cloud-llama", "session": 5}):
            with pytest.raises(BadRequest):
                client.request(Envelope(kind=Kind.VERIFY, payload=bad), 5.0)
        health = client.health()
        assert health["speculative"]["sessions"] == 1
        assert health["speculative"]["verify_rounds"] == 2
        end = Envelope(
            kind=Kind.VERIFY, payload={"model": "cloud-llama", "session": b"s" * 16, "end": True}
        )
        assert conn.notify(end, 0)
        deadline = time.monotonic() + 5
        while client.health()["speculative"]["sessions"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert client.health()["speculative"]["sessions"] == 0


# ---------------------------------------------------------------------- peers and streams
def _exchange(sock: zmq.Socket, kind: Kind, payload: Any) -> Envelope:
    """Send one request on a bare DEALER socket (one peer) and read its answer."""
    sock.send_multipart(WireCodec().encode(Envelope(kind=kind, payload=payload)))
    assert sock.poll(10_000), "worker did not answer"
    return WireCodec().decode(sock.recv_multipart())


def test_a_session_belongs_to_the_peer_that_opened_it(worker, backends) -> None:
    """Another peer naming a session id it did not open is answered exactly as for an id never
    made, and can neither advance nor end the session; its pos 0 opens a session of its own."""
    d, sid = digest(backends["cloud-llama"]), b"p" * 16
    owner, other = raw_socket(worker.endpoint), raw_socket(worker.endpoint)
    try:
        opened = _exchange(owner, Kind.VERIFY, _payload(session=sid, vocab=d))
        assert opened.kind is Kind.RESULT
        pos = opened.payload["pos"]
        step = _payload(session=sid, pos=pos, tokens=[], draft=[])
        unknown = _exchange(other, Kind.VERIFY, {**step, "session": b"u" * 16})
        assert unknown.kind is Kind.ERROR and unknown.payload["code"] == "session_lost"
        assert _exchange(other, Kind.VERIFY, step).payload == unknown.payload
        end = {"model": "cloud-llama", "session": sid, "end": True}
        assert _exchange(other, Kind.VERIFY, end).payload == {"closed": False}
        own = _exchange(other, Kind.VERIFY, _payload(session=sid, vocab=d, draft=[]))
        assert own.kind is Kind.RESULT and own.payload["pos"] == 4  # its own, from its prompt
        assert _exchange(other, Kind.VERIFY, end).payload == {"closed": True}
        after = _exchange(owner, Kind.VERIFY, step)  # the owner's session, untouched
        assert after.kind is Kind.RESULT and after.payload["pos"] == pos + 1
        assert _exchange(owner, Kind.VERIFY, end).payload == {"closed": True}
    finally:
        owner.close()
        other.close()


@pytest.fixture(scope="module")
def gguf_worker(models: Path) -> Iterator[WorkerProcess]:
    """A worker with one llama.cpp context (generation.parallel 1): a verify session holding
    it leaves none for a stream."""
    require("llama_cpp")
    cfg = WorkerConfig.model_validate(
        {
            "bind": "tcp://127.0.0.1:*",
            "models_dir": str(models),
            "models": ["cloud-gguf"],
            "threads": 1,
            "generation": {"parallel": 1},
        }
    )
    with WorkerProcess(cfg) as w:
        yield w


def test_only_a_stream_that_starts_takes_a_sessions_context(gguf_worker, backends) -> None:
    """A ``generate`` that is refused (a bad payload) leaves the verify session holding the
    model's only context alone; one that starts takes the context (the session resyncs)."""
    sock = raw_socket(gguf_worker.endpoint)
    try:
        opened = _exchange(
            sock, Kind.VERIFY, _payload(model="cloud-gguf", vocab=digest(backends["cloud-gguf"]))
        )
        assert opened.kind is Kind.RESULT
        pos = opened.payload["pos"]
        for bad in (
            {"model": "cloud-gguf", "prompt": 5},
            {"model": "cloud-gguf", "prompt": "ab", "temprature": 1.0},
            {"model": "cloud-gguf", "prompt": "ab", "max_tokens": 0},
            {"model": "cloud-gguf", "prompt": "ab", "stop": ["x"] * 100},
        ):
            r = _exchange(sock, Kind.GENERATE, bad)
            assert r.kind is Kind.ERROR and r.payload["code"] == "bad_request", bad
        step = _payload(model="cloud-gguf", pos=pos, tokens=[], draft=[])
        kept = _exchange(sock, Kind.VERIFY, step)
        assert kept.kind is Kind.RESULT, kept.payload  # the session kept its context
        stream = _exchange(sock, Kind.GENERATE, {"model": "cloud-gguf", "prompt": "ab"})
        while stream.kind is Kind.CHUNK:
            assert sock.poll(10_000), "worker did not answer"
            stream = WireCodec().decode(sock.recv_multipart())
        assert stream.kind is Kind.END
        step = {**step, "pos": kept.payload["pos"]}
        lost = _exchange(sock, Kind.VERIFY, step)  # the stream took its context
        assert lost.kind is Kind.ERROR and lost.payload["code"] == "session_lost"
        health = _exchange(sock, Kind.HEALTH, None).payload
        assert health["speculative"]["verify_yielded"] == 1
    finally:
        sock.close()


def test_a_busy_stale_session_is_not_expired_and_expiry_ends(backends) -> None:
    d = digest(backends["cloud-llama"])
    table = Table(VerifySessionLimits(ttl_s=0.2), backends)
    table.run(_payload(vocab=d))
    (sess,) = table.sessions.values()
    sess.busy = True  # a round running past ttl_s
    time.sleep(0.3)
    table.expire(time.monotonic())  # returns (it looped forever once) and keeps it
    assert len(table) == 1
    sess.busy = False
    table.expire(time.monotonic())
    assert len(table) == 0 and table.counters["verify_expired"] == 1
    table.close()


def test_a_session_over_max_session_bytes_is_refused_before_it_runs(backends) -> None:
    d = digest(backends["cloud-llama"])
    table = Table(VerifySessionLimits(), backends)
    r = table.run(_payload(vocab=d, max_tokens=8))  # the model's KV bytes per token, learned
    per_token = table.nbytes / table.sessions[((), b"s" * 16)].want
    table.limits = VerifySessionLimits(max_session_bytes=int(per_token * 100))
    rounds = table.counters["verify_rounds"]
    with pytest.raises(OverloadedError, match="max_session_bytes"):
        table.run(_payload(session=b"t" * 16, vocab=d, max_tokens=400))
    assert table.counters["verify_rounds"] == rounds and r["pos"] > 3  # nothing ran
    table.close()
