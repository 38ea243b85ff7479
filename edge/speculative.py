"""Speculative decoding on the edge (``mode: speculative``): the local model drafts, a worker
verifies (:mod:`tandem.cloud.speculation`), round after round, until the answer ends.

Each round: γ from the task's :class:`~tandem.runtime.speculative.GammaController`; the draft
(the local model's tokens, greedy or sampled from
:func:`~tandem.runtime.speculative.draft_distribution`, in a KV cache of its own that keeps
the shared prefix between rounds); one ``verify`` request; the accepted draft tokens and the
cloud's own token are the answer's next tokens, all of tier ``cloud``, those the edge drafted
marked in the chunk's ``drafted``. The tokens are the cloud model's answer: greedy, token for
token; sampling, in distribution.

When the controller says streaming is faster (a slow link), the rest of the answer is a plain
cloud stream (``generate``, continuing the text). When the cloud fails (unreachable, deadline,
a worker lost mid-answer), the edge finishes the answer from where it stands, marked
``edge-degraded``, as in the other modes.
"""

from __future__ import annotations

import codecs
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from tandem.runtime.chat import chat_tokens
from tandem.runtime.errors import (
    BadRequest,
    MalformedMessage,
    OverloadedError,
    SessionLost,
    TandemError,
)
from tandem.runtime.generation import SamplingParams, SessionLease, TokenStep, _StopFilter
from tandem.runtime.speculative import (
    STREAM,
    GammaController,
    backend_vocab_digest,
    draft_distribution,
    draft_rng,
    pack_draft_q,
)
from tandem.runtime.types import GenerationChunk, Tier
from tandem.runtime.wire import Envelope, Kind

if TYPE_CHECKING:
    from tandem.edge.generation import _Answer

log = logging.getLogger(__name__)


def controller_for(policy: Any) -> GammaController:
    """The controller a task's ``speculative`` settings ask for."""
    spec = policy.speculative
    return GammaController(
        gamma=None if spec.gamma == "auto" else spec.gamma,
        max_gamma=spec.max_gamma,
        prior_acceptance=spec.prior_acceptance,
        fallback=spec.fallback,
    )


def draft(
    lease: SessionLease,
    sequence: list[int],
    gamma: int,
    params: SamplingParams,
    rng: np.random.Generator | None,
    eos: frozenset[int],
    top_k: int,
) -> tuple[list[int], list[tuple[np.ndarray, np.ndarray]]]:
    """Up to ``gamma`` draft tokens continuing ``sequence`` (fewer if the model ends the
    answer), and the distribution each was drawn from."""
    if gamma <= 0:
        return [], []
    row = lease.prefill(sequence)  # keeps the prefix the cache shares with it
    tokens: list[int] = []
    qs: list[tuple[np.ndarray, np.ndarray]] = []
    for i in range(gamma):
        ids, probs = draft_distribution(row, params, top_k)
        tok = int(ids[0]) if rng is None else int(ids[rng.choice(len(ids), p=probs)])
        if tok in eos:
            break
        tokens.append(tok)
        qs.append((ids, probs))
        if i + 1 < gamma:
            row = lease.append(tok)
    return tokens, qs


@dataclass
class _Stats:
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    resyncs: int = 0
    gammas: list[int] = field(default_factory=list)
    fallback: bool = False
    fallback_reason: str | None = None

    def add(self, gamma: int, accepted: int) -> None:
        self.rounds += 1
        self.drafted += gamma
        self.accepted += accepted
        self.gammas.append(gamma)

    def as_dict(self, ctl: GammaController) -> dict[str, Any]:
        return {
            "rounds": self.rounds,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "acceptance": self.accepted / self.drafted if self.drafted else None,
            "gammas": self.gammas,
            "resyncs": self.resyncs,
            "fallback": self.fallback,
            "fallback_reason": self.fallback_reason,
            "estimates": ctl.snapshot(),
        }


class _Verifier:
    """The worker side of one answer: its session id, where it lives, what it holds."""

    def __init__(self, a: _Answer, digest: str) -> None:
        t = a.t
        assert t.client is not None and t.policy.cloud is not None
        self.a, self.client, self.model = a, t.client, t.policy.cloud.model
        self.session = os.urandom(16)
        self.digest = digest
        self.n_vocab = int(t.backend.n_vocab)
        self.pos = 0  # tokens the worker's session holds (0: none)
        self.prefer: int | None = None
        self.open = False
        self.deadline = time.monotonic() + a.deadline_ms / 1e3

    def round(
        self, sequence: list[int], tokens: list[int], qs: list, stats: _Stats
    ) -> tuple[dict[str, Any], float]:
        """One verify request (again with the whole sequence if the worker lost the
        session); the reply payload and its wall time."""
        p = self.a.params
        payload: dict[str, Any] = {
            "model": self.model,
            "session": self.session,
            "draft": tokens,
            "temperature": float(p.temperature),
            "top_p": float(p.top_p),
            "seed": p.seed,
            "max_tokens": max(p.max_tokens - len(self.a.tokens), 1),
        }
        if p.temperature > 0 and tokens:
            payload["q_ids"], payload["q_probs"] = pack_draft_q(qs)
        t0 = time.perf_counter()
        for attempt in range(2):
            if self.pos == 0 or attempt:
                payload.update(pos=0, tokens=list(sequence), vocab=self.digest)
            else:
                payload.update(pos=self.pos, tokens=sequence[self.pos :])
            left = self.deadline - time.monotonic()
            env = Envelope(
                kind=Kind.VERIFY,
                task=self.a.t.name,
                tags=tuple(sorted(self.a.tags)),
                payload=payload,
            )
            try:
                self.open = True
                reply, self.prefer = self.client.request_via(env, max(left, 1e-3), self.prefer)
            except SessionLost:
                stats.resyncs += 1
                if attempt:
                    raise
                continue
            out = _check_reply(reply.payload, len(tokens), len(sequence), self.n_vocab)
            self.pos = out["pos"]
            if out["done"]:
                self.open = False
            return out, time.perf_counter() - t0
        raise AssertionError("unreachable")

    def close(self) -> None:
        """Drop the worker's session if it may still hold one (without waiting)."""
        if self.open and self.prefer is not None:
            env = Envelope(
                kind=Kind.VERIFY,
                payload={"model": self.model, "session": self.session, "end": True},
            )
            self.client.notify(env, self.prefer)
        self.open = False


def _check_reply(p: Any, gamma: int, length: int, n_vocab: int) -> dict[str, Any]:
    """The reply to a round of ``gamma`` drafts after ``length`` tokens, checked before use."""
    if not (
        isinstance(p, dict)
        and type(p.get("accepted")) is int
        and 0 <= p["accepted"] <= gamma
        and type(p.get("token")) is int
        and 0 <= p["token"] < n_vocab
        and p.get("pos") == length + p["accepted"] + 1
        and isinstance(p.get("logprobs"), list)
        and len(p["logprobs"]) == p["accepted"] + 1
        and type(p.get("eos")) is bool
        and type(p.get("done")) is bool
    ):
        raise MalformedMessage(f"malformed verify reply: {p!r:.200}")
    return p


def speculate(a: _Answer) -> Iterator[GenerationChunk]:
    """The cloud's answer to ``a.prompt + a.text``, by drafting and verifying (see the module
    docstring); records into ``a`` as every tier does."""
    t = a.t
    backend, ctl = t.backend, t.controller
    assert ctl is not None
    a.escalated_at = len(a.tokens)
    stats = _Stats()
    eos = backend.eos_tokens
    params = a.params
    rng = draft_rng(params.seed) if params.temperature > 0 else None
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    stops = _StopFilter(params.stop) if params.stop else None
    top_k = t.policy.speculative.draft_top_k
    n_ctx = int(getattr(backend, "n_ctx", 0)) or 1 << 30
    try:
        if a.messages is None:
            sequence = backend.tokenize(a.prompt + a.text)
        else:
            sequence = chat_tokens(backend, a.messages, a.text)
        lease = backend.lease(sequence)
    except OverloadedError:  # every local context drafting already: the cloud streams it
        yield from _stream_rest(a, ctl, stats, "every local context is drafting")
        a.speculation = stats.as_dict(ctl)
        return
    if t.vocab is None:
        t.vocab = backend_vocab_digest(backend)
    worker = _Verifier(a, t.vocab)
    ctl.begin_answer()
    ended = False  # EOS or a stop string
    try:
        while not ended:
            remaining = params.max_tokens - len(a.tokens)
            if remaining <= 0:
                a.finish_reason = "length"
                break
            gamma = ctl.choose(remaining, first=not stats.rounds)
            if gamma != STREAM:  # the draft must fit the local model's context too
                gamma = min(gamma, n_ctx - len(sequence) - 1)
            if gamma < 0:
                worker.close()
                if stops is not None and (held := stops.flush()):
                    yield _chunk(a, held, set())
                why = "faster (controller)" if n_ctx > len(sequence) + 1 else "local context full"
                yield from _stream_rest(a, ctl, stats, why)
                return
            t0 = time.perf_counter()
            tokens, qs = draft(lease, sequence, gamma, params, rng, eos, top_k)
            draft_s = time.perf_counter() - t0
            a.ms["local"] += draft_s * 1e3
            try:
                out, wall = worker.round(sequence, tokens, qs, stats)
            except BadRequest as e:
                if stats.rounds:
                    raise
                # refused before anything was verified (a prompt over the worker's limit, a
                # different vocabulary): the cloud streams the answer instead
                log.warning("task %s: the worker refused to verify (%s); streaming", t.name, e)
                worker.close()
                yield from _stream_rest(a, ctl, stats, f"refused: {e.message}", learn=False)
                return
            a.ms["cloud"] += wall * 1e3
            n = out["accepted"]
            stats.add(len(tokens), n)
            new = [*tokens[:n], out["token"]][:remaining]
            sequence.extend(new)
            steps: list[TokenStep] = []
            drafted: set[int] = set()
            for i, tok in enumerate(new):
                if tok in eos:
                    ended = True
                    break
                step = TokenStep(tok, utf8.decode(backend.piece(tok)), float(out["logprobs"][i]))
                if i < n:
                    drafted.add(id(step))
                if stops is None:
                    steps.append(step)
                    continue
                ready, hit = stops.push(step)
                steps += ready
                if hit:
                    ended = True
                    stops = None  # what it held is cut off
                    break
            ctl.observe_round(
                len(tokens),
                n,
                draft_s=draft_s,
                wall_s=wall,
                compute_s=max(int(out.get("compute_us", 0)), 0) / 1e6,
                prefilled=int(out.get("prefilled", 0)),
                round_s=time.perf_counter() - t0,
            )
            if steps:
                yield _chunk(a, steps, drafted)
        if stops is not None and (held := stops.flush()):
            yield _chunk(a, held, set())
    except TandemError as e:
        a.cloud_failed(e)
    finally:
        lease.close()
        worker.close()
        a.speculation = stats.as_dict(ctl)
        a.ms["gamma"] = float(np.mean(stats.gammas)) if stats.gammas else 0.0
        ctl.observe_answer(len(a.tokens) - (a.escalated_at or 0))
    if a.cloud_error is not None:
        yield from a.degrade()


def _chunk(a: _Answer, steps: list[TokenStep], drafted: set[int]) -> GenerationChunk:
    texts = [s.text for s in steps]
    chunk = GenerationChunk(
        "".join(texts),
        [s.token for s in steps],
        Tier.CLOUD,
        [s.logprob for s in steps],
        token_texts=texts,
        drafted=[id(s) in drafted for s in steps],
    )
    return a._record(chunk)


def _stream_rest(
    a: _Answer, ctl: GammaController, stats: _Stats, why: str, learn: bool = True
) -> Iterator[GenerationChunk]:
    """The rest of the answer as a plain cloud stream, timed for the controller (``learn``)."""
    stats.fallback, stats.fallback_reason = True, why
    t0 = time.perf_counter()
    first = last = None
    n = 0
    for chunk in a.cloud_stream(a.text):
        now = time.perf_counter()
        if chunk.tier is Tier.CLOUD:
            chunk.drafted = [False] * len(chunk.tokens)
            if chunk.tokens:
                first = now if first is None else first
                last = now
                n += len(chunk.tokens)
        yield chunk
    if learn and first is not None and last is not None:
        per_token = (last - first) / (n - 1) if n > 1 else float("nan")
        ctl.observe_stream(first - t0, per_token)
