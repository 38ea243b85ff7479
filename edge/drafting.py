"""Speculative decoding on the edge (``mode: speculative``): the local model drafts, a worker
verifies (:mod:`tandem.cloud.verify`), round after round, until the answer ends.

Each round: γ from the task's :class:`~tandem.runtime.speculative.GammaController`; the draft
(the local model's tokens, greedy or sampled from
:func:`~tandem.runtime.speculative.draft_distribution`, in a KV cache of its own that keeps
the shared prefix between rounds); one ``verify`` request; the accepted draft tokens and the
cloud's own token are the answer's next tokens, all of tier ``cloud``, those the edge drafted
marked in the chunk's ``drafted``. The tokens are the cloud model's answer: greedy, token for
token; sampling, in distribution.

:func:`speculate` only drafts and verifies: it yields the answer's next tokens and returns
how it ended (:class:`Drafted`). The answer (:class:`tandem.edge.answer.Answer`) records the
tokens and, when drafting hands over, moves on: to a plain cloud stream when the controller
says streaming is faster (a slow link), or to the edge (``edge-degraded``) when the cloud
fails, as in the other modes.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Generator, Iterator
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
from tandem.runtime.generation import (
    LocalGenerationBackend,
    SamplingParams,
    SessionLease,
    TokenStep,
    TokenText,
)
from tandem.runtime.speculative import (
    STREAM,
    GammaController,
    backend_vocab_digest,
    draft_distribution,
    draft_rng,
    pack_draft_q,
)
from tandem.runtime.types import AnswerChunk, Tier
from tandem.runtime.wire import Envelope, Kind

if TYPE_CHECKING:
    from tandem.edge.generate_task import GenerationTask

log = logging.getLogger(__name__)


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
class DraftStats:
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


@dataclass(frozen=True)
class DraftRequest:
    """What drafting needs of the answer it continues (read-only)."""

    task: GenerationTask
    prompt: str
    messages: list[dict[str, str]] | None
    text: str  # the answer so far: drafting continues after it
    params: SamplingParams
    tags: tuple[str, ...]
    deadline_ms: float  # the cloud's part of the budget, counted from now
    n_tokens: int  # tokens the answer has so far


@dataclass
class Drafted:
    """How drafting ended: the answer's end (``finish_reason``), a hand-over to a plain cloud
    stream (``stream_instead``: why; ``learn``: whether the controller may time it), or a
    cloud failure (``error``: the edge finishes). ``pending`` holds back what may begin a
    stop string, for the stream that takes over."""

    finish_reason: str | None = None
    stream_instead: str | None = None
    learn: bool = True
    error: TandemError | None = None
    pending: TokenText | None = None
    began: bool = False  # the controller was told an answer began (it is told when it ends)
    local_ms: float = 0.0
    cloud_ms: float = 0.0
    stats: DraftStats = field(default_factory=DraftStats)


class RemoteVerifySession:
    """The worker's half of one speculative answer, seen from the edge: its session id, the
    endpoint that holds it, and how many tokens it holds."""

    def __init__(self, req: DraftRequest, digest: str) -> None:
        t = req.task
        assert t.client is not None and t.policy.cloud is not None
        self.req, self.model = req, t.policy.cloud.model
        # one socket set for the whole answer: the worker scopes the session to its peer
        self.conn = t.client.connection()
        self.session = os.urandom(16)
        self.digest = digest
        self.n_vocab = int(t.backend.n_vocab)
        self.pos = 0  # tokens the worker's session holds (0: none)
        self.prefer: int | None = None
        self.open = False
        self.deadline = time.monotonic() + req.deadline_ms / 1e3

    def round(
        self, sequence: list[int], tokens: list[int], qs: list, stats: DraftStats, left: int
    ) -> tuple[dict[str, Any], float]:
        """One verify request (again with the whole sequence if the worker lost the
        session), ``left`` tokens at most still to come; the reply payload and its wall
        time."""
        p = self.req.params
        payload: dict[str, Any] = {
            "model": self.model,
            "session": self.session,
            "draft": tokens,
            "temperature": float(p.temperature),
            "top_p": float(p.top_p),
            "seed": p.seed,
            "max_tokens": max(left, 1),
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
                kind=Kind.VERIFY, task=self.req.task.name, tags=self.req.tags, payload=payload
            )
            try:
                self.open = True
                reply, self.prefer = self.conn.request_via(env, max(left, 1e-3), self.prefer)
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
        """Drop the worker's session if it may still hold one (without waiting), and give
        the connection back. Idempotent."""
        if self.open and self.prefer is not None:
            env = Envelope(
                kind=Kind.VERIFY,
                payload={"model": self.model, "session": self.session, "end": True},
            )
            self.conn.notify(env, self.prefer)
        self.open = False
        self.conn.close()


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


def speculate(req: DraftRequest) -> Generator[list[TokenStep], None, Drafted]:
    """The cloud's answer to ``req.prompt + req.text``, drafted here and verified by a worker
    (see the module docstring): yields the answer's next steps (``drafted`` set on those the
    edge drafted), returns how it ended."""
    t = req.task
    backend, ctl = t.backend, t.controller
    assert ctl is not None and isinstance(backend, LocalGenerationBackend)
    out = Drafted()
    stats, params = out.stats, req.params
    rng = draft_rng(params.seed) if params.temperature > 0 else None
    text = out.pending = TokenText(backend.piece, backend.eos_tokens, params.stop)
    top_k = t.policy.speculative.draft_top_k
    n_ctx, produced = backend.n_ctx, req.n_tokens
    try:
        if req.messages is None:
            sequence = backend.tokenize(req.prompt + req.text)
        else:
            sequence = chat_tokens(backend, req.messages, req.text)
        lease = backend.lease(sequence)
    except OverloadedError:  # every local context drafting already: the cloud streams it
        out.stream_instead = "every local context is drafting"
        return out
    worker: RemoteVerifySession | None = None
    try:  # from here on the lease is held: every way out closes it
        if t.vocab is None:
            t.vocab = backend_vocab_digest(backend)
        worker = RemoteVerifySession(req, t.vocab)
        ctl.begin_answer()
        out.began = True
        while not text.ended:
            remaining = params.max_tokens - produced
            if remaining <= 0:
                out.finish_reason = "length"
                break
            gamma = ctl.choose(remaining, first=not stats.rounds)
            if gamma != STREAM:  # the draft must fit the local model's context too
                gamma = min(gamma, n_ctx - len(sequence) - 1)
            if gamma < 0:
                full = n_ctx <= len(sequence) + 1
                out.stream_instead = "local context full" if full else "faster (controller)"
                return out
            t0 = time.perf_counter()
            tokens, qs = draft(lease, sequence, gamma, params, rng, backend.eos_tokens, top_k)
            draft_s = time.perf_counter() - t0
            out.local_ms += draft_s * 1e3
            try:
                reply, wall = worker.round(sequence, tokens, qs, stats, remaining)
            except BadRequest as e:
                if stats.rounds:
                    raise
                # refused before anything was verified (a prompt over the worker's limit, a
                # different vocabulary): the cloud streams the answer instead
                log.warning("task %s: the worker refused to verify (%s); streaming", t.name, e)
                out.stream_instead, out.learn = f"refused: {e.message}", False
                return out
            out.cloud_ms += wall * 1e3
            n = reply["accepted"]
            stats.add(len(tokens), n)
            new = [*tokens[:n], reply["token"]][:remaining]
            sequence.extend(new)
            produced += len(new)
            steps: list[TokenStep] = []
            for i, tok in enumerate(new):
                steps += text.push(tok, float(reply["logprobs"][i]), drafted=i < n)
                if text.ended:
                    break
            ctl.observe_round(
                len(tokens),
                n,
                draft_s=draft_s,
                wall_s=wall,
                compute_s=max(int(reply.get("compute_us", 0)), 0) / 1e6,
                prefilled=int(reply.get("prefilled", 0)),
                round_s=time.perf_counter() - t0,
            )
            if steps:
                yield steps
        out.finish_reason = out.finish_reason or "stop"  # "stop": EOS or a stop string
        steps = text.flush()
        if steps:
            yield steps
    except TandemError as e:
        out.error = e
    finally:
        lease.close()
        if worker is not None:
            worker.close()
        out.pending = None if out.stream_instead is None else text
    return out


def observe_stream(
    ctl: GammaController, chunks: Iterator[AnswerChunk], t0: float
) -> Iterator[AnswerChunk]:
    """``chunks`` of a cloud stream that took over from drafting, timed for the controller
    (time to the first token, then per token)."""
    first = last = None
    n = 0
    for chunk in chunks:
        now = time.perf_counter()
        if chunk.tier is Tier.CLOUD and chunk.tokens:
            first = now if first is None else first
            last = now
            n += len(chunk.tokens)
        yield chunk
    if first is not None and last is not None:
        per_token = (last - first) / (n - 1) if n > 1 else float("nan")
        ctl.observe_stream(first - t0, per_token)
