"""One answer on the edge, as a small explicit state machine (:class:`Answer`): a local language
model, a token-confidence gate, and the cloud taking over up front, after a probe, mid-stream,
or by verifying the edge's drafts. (Over 500 lines: the whole state machine is kept in one
module on purpose, so that every move of an answer can be read in one place.)

Phases (:class:`Phase`) and what moves an answer between them::

    ROUTE ─┬─ a rule: edge ─────────────────────► LOCAL ─────────────────────► DONE
           ├─ a rule: cloud ────────────────────► CLOUD or DRAFTING
           ├─ probe, upfront, speculative ──────► PROBE ─┬─ accepted ────────► LOCAL
           │                                             └─ escalated ───────► CLOUD or DRAFTING
           └─ midstream ────────────────────────► MIDSTREAM ── escalated ─────► CLOUD
    DRAFTING ── streaming is faster, or refused ─► CLOUD
    CLOUD or DRAFTING ── the cloud failed ──────► DEGRADED (the edge finishes) ► DONE

An answer records what it yields, so the caller's stream and the final
:class:`GenerationResult` are the same tokens — none duplicated, none lost, each marked with the
tier that produced it. Every tier's tokens go through one post-processing path
(:class:`tandem.runtime.generation.TokenText`: UTF-8, EOS, stop strings). Hand-offs work on
text (see :mod:`tandem.runtime.generation`): the next tier gets ``prompt + answer so far``. A
chat (``messages``) travels as messages: each tier renders them with its own model's chat
template (:mod:`tandem.runtime.chat`) and continues after the answer so far.

If the cloud fails before its first token, or is lost mid-stream (``StreamInterrupted``, a
deadline), the edge finishes the answer from where it stands, marked ``edge-degraded``.
"""

from __future__ import annotations

import enum
import itertools
import json
import logging
import math
import time
from collections.abc import Collection, Iterator
from dataclasses import replace
from typing import Any

import numpy as np

from tandem.edge.drafting import DraftRequest, observe_stream, speculate
from tandem.edge.escalation_rows import EscalationRecord
from tandem.edge.generate_task import GenerationTask
from tandem.router.policy import EscalationMode, Handoff
from tandem.router.routing import Decision
from tandem.runtime import tracing
from tandem.runtime.chat import chat_tokens
from tandem.runtime.errors import TandemError
from tandem.runtime.generation import (
    BackendStream,
    LocalGenerationBackend,
    SamplingParams,
    StopFilter,
    TokenStep,
    TokenText,
)
from tandem.runtime.types import AnswerChunk, GenerationResult, Tier

log = logging.getLogger(__name__)
NO_ROOM = Decision(False, "no-room-to-escalate")  # max_tokens reached before the decision


class Phase(enum.Enum):
    """Where an answer stands (see the module docstring for the moves between them)."""

    ROUTE = "route"  # before the first token: a rule or the gate decides
    PROBE = "probe"  # the edge's first tokens, scored by the gate
    MIDSTREAM = "midstream"  # the edge streams, the gate watches a window
    LOCAL = "local"  # the edge answers
    CLOUD = "cloud"  # a worker streams the answer
    DRAFTING = "drafting"  # the edge drafts, a worker verifies
    DEGRADED = "degraded"  # the cloud failed: the edge finishes
    DONE = "done"


class Answer:
    """One generation request, run as a generator of chunks (see the module docstring).
    ``phases``: the phases it went through, in order."""

    def __init__(
        self,
        t: GenerationTask,
        prompt: str,
        params: SamplingParams,
        tags: Collection[str],
        deadline_ms: float,
        request_id: bytes,
        messages: list[dict[str, str]] | None = None,
    ) -> None:
        self.t, self.prompt, self.params, self.tags = t, prompt, params, tags
        self.messages = messages  # a chat: prompt is then "" and each tier renders these
        self.deadline_ms = deadline_ms
        self.request_id = request_id
        self.phases = [Phase.ROUTE]
        self.text = ""
        self.tokens: list[int] = []
        self.tiers: list[Tier] = []
        self.logprobs: list[float] = []
        self.used: list[Tier] = []
        self.arrivals: list[float] = []  # perf_counter per token, as yielded
        self.confidence: float | None = None
        self.reason = "confident"
        self.finish_reason = "stop"
        self.escalated_at: int | None = None
        self.cloud_text = ""
        # the edge's first stream: its prompt size is the answer's (read at the end: a server,
        # format openai, reports it once its stream ends)
        self._first: BackendStream | None = None
        self.edge_text = ""  # what the edge produced before any hand-off (for the log)
        self.edge_logprobs: list[float] = []
        self.cloud_error: TandemError | None = None
        self.versions = dict(t.versions)
        self.ms = {"local": 0.0, "cloud": 0.0}
        self.t0 = time.perf_counter()
        self.result: GenerationResult | None = None
        self.speculation: dict | None = None
        self.shadow_escalate: bool | None = None  # the shadow gate's verdict, if there is one
        self.span: Any = None  # its tandem.generate span while traced (tandem.runtime.tracing)

    @property
    def phase(self) -> Phase:
        return self.phases[-1]

    def _to(self, phase: Phase) -> None:
        self.phases.append(phase)

    # ------------------------------------------------------------------ the routing
    def run(self) -> Iterator[AnswerChunk]:
        rule = self.t.router.pre_route(self.tags)
        if rule is not None:
            self.reason = rule.reason
            if rule.escalate:
                yield from self._escalate()
            else:
                yield from self._local_rest(self._local(""), [], Tier.EDGE)
        elif self.t.policy.mode is EscalationMode.MIDSTREAM:
            yield from self._midstream(self._local(""))
        else:
            yield from self._probe()
        self._finish()

    def cancel(self, why: str = "cancelled") -> None:
        """The caller stopped reading (``cancelled``), or the answer raised (``error``): it
        ends here."""
        if self.result is None:
            self.finish_reason = why
            self._finish()

    def _probe(self) -> Iterator[AnswerChunk]:
        t, mode = self.t, self.t.policy.mode
        self._to(Phase.PROBE)
        steps = self._local("")
        probe: list[TokenStep] = []
        n_probe = 1 if mode is EscalationMode.UPFRONT else t.policy.probe_tokens
        for step in self._timed(steps):
            probe.append(step)
            if len(probe) >= n_probe:
                break
        score = self._score(probe)
        if (shadow := t.router.shadow) is not None:
            first = probe[0].entropy if probe else None
            ss = shadow.probe_score([s.logprob for s in probe], first, t.n_vocab)
            self.shadow_escalate = not shadow.accepts(ss)
        # mode speculative: the cloud's answer from the start, drafted
        keeps = t.policy.handoff is Handoff.CONTINUE and mode is EscalationMode.PROBE
        if keeps and len(probe) >= self.params.max_tokens:  # the probe is the whole answer
            decision = NO_ROOM
        else:
            decision = t.router.decide(score, not math.isnan(score))
        self.confidence, self.reason = score, decision.reason
        if not decision.escalate:
            yield from self._local_rest(steps, probe, Tier.EDGE)
            return
        steps.close()
        self.edge_text = "".join(s.text for s in probe)
        self.edge_logprobs = [s.logprob for s in probe]
        if keeps and probe:
            yield self._emit(probe, Tier.EDGE)
        yield from self._escalate()

    def _escalate(self) -> Iterator[AnswerChunk]:
        """The cloud answers from where the answer stands: drafted and verified in mode
        speculative, else streamed."""
        if self.t.policy.mode is EscalationMode.SPECULATIVE:
            yield from self._drafting()
        else:
            yield from self._cloud(self.text)

    def _midstream(self, steps: BackendStream) -> Iterator[AnswerChunk]:
        t = self.t
        self._to(Phase.MIDSTREAM)
        window, watching = t.policy.window, True
        shadow = t.router.shadow
        if shadow is not None:
            self.shadow_escalate = False
        try:
            for step in self._timed(steps):
                yield self._emit([step], Tier.EDGE)
                if shadow is not None and not self.shadow_escalate:
                    ss = shadow.window_score(self.logprobs, window)
                    self.shadow_escalate = not shadow.accepts(ss)
                if not watching:
                    continue
                score = t.gate.window_score(self.logprobs, window)
                if t.gate.accepts(score) or len(self.tokens) >= self.params.max_tokens:
                    continue
                decision = t.router.decide(score, not math.isnan(score))
                self.confidence, self.reason = score, decision.reason
                if not decision.escalate:  # over budget, or no cloud: the edge finishes
                    watching = False
                    continue
                steps.close()
                self.edge_text, self.edge_logprobs = self.text, list(self.logprobs)
                restart = t.policy.handoff is Handoff.RESTART
                yield from self._cloud("" if restart else self.text, restart)
                return
            self.finish_reason = steps.finish_reason or "stop"
            if self.confidence is None:
                self.confidence = t.gate.score(self.logprobs)
        finally:
            steps.close()

    def _score(self, probe: list[TokenStep]) -> float:
        first = probe[0].entropy if probe else None
        return self.t.gate.probe_score([s.logprob for s in probe], first, self.t.n_vocab)

    # ------------------------------------------------------------------ the edge
    def _room(self, prefix: str) -> int:
        """Tokens the answer may still grow by: what is left of max_tokens and, once it has
        begun, of the edge model's context (a long cloud answer handed back can leave less;
        a server's context is its own to enforce)."""
        left = self.params.max_tokens - len(self.tokens)
        backend = self.t.backend
        if self.tokens and isinstance(backend, LocalGenerationBackend):
            if self.messages is None:
                used = len(backend.tokenize(self.prompt + prefix))
            else:
                used = len(chat_tokens(backend, self.messages, prefix))
            left = min(left, backend.n_ctx - used)
        return left

    def _local(self, prefix: str) -> BackendStream:
        """The edge model's stream, continuing after ``prefix`` (the answer so far)."""
        params = replace(self.params, max_tokens=max(self._room(prefix), 1))
        if self.messages is None:
            steps = self.t.backend.stream(self.prompt + prefix, params)
        else:
            steps = self.t.backend.stream_chat(self.messages, params, prefix=prefix)
        if self._first is None:
            self._first = steps
        return steps

    def _timed(self, steps: BackendStream) -> Iterator[TokenStep]:
        """``steps``, with the time spent in the local model counted."""
        while True:
            t0 = time.perf_counter()
            try:
                step = next(steps)
            except StopIteration:
                self.ms["local"] += (time.perf_counter() - t0) * 1e3
                return
            self.ms["local"] += (time.perf_counter() - t0) * 1e3
            yield step

    def _local_rest(
        self, steps: BackendStream, probe: list[TokenStep], tier: Tier
    ) -> Iterator[AnswerChunk]:
        self._to(Phase.DEGRADED if tier is Tier.EDGE_DEGRADED else Phase.LOCAL)
        try:
            if probe:
                yield self._emit(probe, tier)
            for step in self._timed(steps):
                yield self._emit([step], tier)
            self.finish_reason = steps.finish_reason or "stop"
        finally:
            steps.close()

    def _degrade(self) -> Iterator[AnswerChunk]:
        """After a cloud failure the edge finishes from where the answer stands (if nothing
        came from the cloud after a restart, the edge's own text still stands: nothing was
        withdrawn)."""
        if self._room(self.text) <= 0:
            self._to(Phase.DEGRADED)
            self.finish_reason = "length"
            return
        yield from self._local_rest(self._local(self.text), [], Tier.EDGE_DEGRADED)

    # ------------------------------------------------------------------ the cloud
    def _cloud(
        self, prefix: str, restart: bool = False, pending: TokenText | None = None
    ) -> Iterator[AnswerChunk]:
        """The cloud streams the answer, continuing after ``prefix`` (the answer so far, or ""
        with ``restart``: then its first chunk withdraws what was streamed). A chat goes as
        its messages, rendered by the cloud model's own template. ``pending``: steps held back
        by the tier before (drafting) while they may begin a stop string; the cloud continues
        after them, and a stop string that begins there and ends in the cloud's text still
        ends the answer."""
        t = self.t
        assert t.client is not None and t.policy.cloud is not None
        self._to(Phase.CLOUD)
        # text held back across the hand-over: the cloud continues after it
        stops = pending.stops if pending is not None else None
        if stops is not None and not stops.pending:
            stops = None
        prefix += stops.text if stops is not None else ""
        kept = 0 if restart else len(self.tokens) + (len(stops.pending) if stops else 0)
        if self.escalated_at is None:  # a drafted answer handing over keeps its own
            self.escalated_at = kept
        left_ms = self.deadline_ms  # the cloud's part: counted from when it is asked
        t0 = time.perf_counter()
        first = True
        try:
            params = replace(self.params, max_tokens=max(self.params.max_tokens - kept, 1))
            fts = t.policy.first_token_ms
            # traced: the stream's client spans are children of this answer's span
            attached = None if self.span is None else tracing.attach(self.span)
            try:
                call = t.client.generate(
                    t.policy.cloud.model,
                    prefix if self.messages is not None else self.prompt + prefix,
                    params,
                    messages=self.messages,
                    task=t.name,
                    tags=tuple(sorted(self.tags)),
                    timeout_s=left_ms / 1e3,
                    first_token_s=None if fts is None else fts / 1e3,
                    request_id=self.request_id,
                )
            finally:
                if attached is not None:
                    tracing.detach(attached)
            with call:
                waiting: list[AnswerChunk] = []  # the cloud's text while a stop may straddle
                for c in call:
                    chunk = AnswerChunk(c.text, list(c.tokens), Tier.CLOUD, list(c.logprobs))
                    chunk.restart = restart and first
                    first = False
                    if stops is None:
                        yield self._record(chunk)
                        continue
                    waiting.append(chunk)
                    more = "".join(w.text for w in waiting)
                    at = stops.straddles(more)
                    if at is not None:  # a stop string across the hand-over: the answer ends
                        if cut := stops.cut_at(at):
                            yield self._emit(cut, Tier.CLOUD)
                        self.finish_reason = "stop"
                        return
                    if len(more) >= max(map(len, stops.stops)):  # no stop can straddle now
                        yield from self._release(stops, waiting)
                        stops = None
                if stops is not None:
                    yield from self._release(stops, waiting)
                end = call.end or {}
            self.finish_reason = end.get("finish_reason", "stop")
            self.versions["cloud"] = f"{end.get('model', t.policy.cloud.model)}@" + str(
                end.get("version", "?")
            )
        except TandemError as e:
            self._cloud_failed(e)
        finally:
            self.ms["cloud"] += (time.perf_counter() - t0) * 1e3
        if self.cloud_error is not None:
            yield from self._degrade()

    def _release(self, stops: StopFilter, waiting: list[AnswerChunk]) -> Iterator[AnswerChunk]:
        """What was held back across a hand-over, then the cloud's chunks that waited on it."""
        if flushed := stops.flush():
            yield self._emit(flushed, Tier.CLOUD)
        for w in waiting:
            yield self._record(w)
        waiting.clear()

    def _drafting(self) -> Iterator[AnswerChunk]:
        """The cloud's answer, drafted here and verified by a worker
        (:func:`tandem.edge.drafting.speculate`); then, as drafting ends, the answer ends,
        a plain cloud stream takes over, or the edge finishes (the cloud failed)."""
        t, ctl = self.t, self.t.controller
        assert ctl is not None
        self._to(Phase.DRAFTING)
        self.escalated_at = len(self.tokens)
        req = DraftRequest(
            t,
            self.prompt,
            self.messages,
            self.text,
            self.params,
            tuple(sorted(self.tags)),
            self.deadline_ms,
            len(self.tokens),
        )
        run = speculate(req)
        try:
            while True:
                try:
                    steps = next(run)
                except StopIteration as stop:
                    out = stop.value
                    break
                yield self._emit(steps, Tier.CLOUD)
        finally:
            run.close()  # the caller stopped reading: the lease and the session go now
        stats = out.stats
        self.ms["local"] += out.local_ms
        self.ms["cloud"] += out.cloud_ms
        self.ms["gamma"] = float(np.mean(stats.gammas)) if stats.gammas else 0.0
        if out.stream_instead is not None:
            stats.fallback, stats.fallback_reason = True, out.stream_instead
            chunks = self._cloud(self.text, pending=out.pending)
            if out.learn:
                chunks = observe_stream(ctl, chunks, time.perf_counter())
            yield from chunks
        elif out.error is None:
            self.finish_reason = out.finish_reason or "stop"
        if out.began:
            ctl.observe_answer(len(self.tokens) - self.escalated_at)
        self.speculation = stats.as_dict(ctl)
        if out.error is not None:
            self._cloud_failed(out.error)
            yield from self._degrade()

    def _cloud_failed(self, e: TandemError) -> None:
        self.cloud_error = e
        self.reason += f"; cloud-{e.code}"
        log.info("task %s: cloud failed (%s): the edge finishes the answer", self.t.name, e.code)

    # ------------------------------------------------------------------ bookkeeping
    def _emit(self, steps: list[TokenStep], tier: Tier) -> AnswerChunk:
        texts = [s.text for s in steps]
        drafting = tier is Tier.CLOUD and self.speculative
        return self._record(
            AnswerChunk(
                "".join(texts),
                [s.token for s in steps],
                tier,
                [s.logprob for s in steps],
                token_texts=texts,
                drafted=[s.drafted for s in steps] if drafting else None,
            )
        )

    @property
    def speculative(self) -> bool:
        """Mode speculative: each cloud token says whether the edge drafted it."""
        return self.t.policy.mode is EscalationMode.SPECULATIVE

    def _record(self, chunk: AnswerChunk) -> AnswerChunk:
        now = time.perf_counter()
        if chunk.restart:
            self._clear()
        if chunk.tier is Tier.CLOUD and chunk.drafted is None and self.speculative:
            chunk.drafted = [False] * len(chunk.tokens)  # streamed after drafting handed over
        self.text += chunk.text
        if chunk.tier is Tier.CLOUD:
            self.cloud_text += chunk.text
        self.tokens += chunk.tokens
        self.tiers += [chunk.tier] * len(chunk.tokens)
        self.logprobs += chunk.logprobs
        self.arrivals += [now] * len(chunk.tokens)
        if chunk.tier not in self.used:
            self.used.append(chunk.tier)
        return chunk

    def _clear(self) -> None:
        self.text, self.tokens, self.tiers, self.logprobs = "", [], [], []
        self.arrivals = []

    def _finish(self) -> None:
        self._to(Phase.DONE)
        end = time.perf_counter()
        a = self.arrivals
        timings = {
            "ttft": (a[0] - self.t0) * 1e3 if a else math.nan,
            "total": (end - self.t0) * 1e3,
            **self.ms,
        }
        self.result = GenerationResult(
            text=self.text,
            tokens=self.tokens,
            token_tiers=self.tiers,
            logprobs=self.logprobs,
            tiers=self.used,
            confidence=self.confidence,
            reason=self.reason,
            finish_reason=self.finish_reason,
            timings=timings,
            inter_token_ms=[(b - x) * 1e3 for x, b in itertools.pairwise(a)],
            model_versions=self.versions,
            escalated_at=self.escalated_at,
            prompt_tokens=None if self._first is None else self._first.prompt_tokens,
            request_id=self.request_id.hex() if self.escalated_at is not None else None,
            speculation=self.speculation,
            phases=[p.value for p in self.phases],
            shadow_escalate=self.shadow_escalate,
        )


def log_record(answer: Answer, store_inputs: bool) -> EscalationRecord | None:
    """The escalation-log row of a generation that went to the cloud (or meant to: degraded),
    None for one the edge answered. Without ``store_inputs`` the prompt is not kept."""
    r = answer.result
    if r is None or answer.escalated_at is None:
        return None
    asked = answer.prompt if answer.messages is None else json.dumps(answer.messages)
    prompt = np.frombuffer(asked.encode(), np.uint8)  # a chat: its messages, as JSON
    cloud = [i for i, tier in enumerate(r.token_tiers) if tier is Tier.CLOUD]
    err = answer.cloud_error
    return EscalationRecord(
        ts_ms=time.time_ns() // 1_000_000,  # wall clock: a log timestamp, not a deadline
        request_id=answer.request_id.hex(),
        task=answer.t.name,
        tier=(Tier.CLOUD if cloud else Tier.EDGE_DEGRADED).value,
        reason=r.reason,
        tags=sorted(answer.tags),
        input=prompt,
        input_digest="",
        edge_output=np.asarray(answer.edge_logprobs, np.float32),
        edge_label=None,
        edge_confidence=r.confidence,
        cloud_output=np.asarray([r.logprobs[i] for i in cloud], np.float32) if cloud else None,
        cloud_label=None,
        error=f"{err.code}: {err.message}" if err else None,
        timings_ms=r.timings,
        model_versions=r.model_versions
        if r.shadow_escalate is None
        else {**r.model_versions, "shadow": "escalate" if r.shadow_escalate else "accept"},
        generation={
            "prompt": answer.prompt if store_inputs else None,
            "messages": answer.messages if store_inputs else None,
            "edge": answer.edge_text,
            "cloud": answer.cloud_text if cloud else None,
            "answer": r.text,
            "escalated_at": answer.escalated_at,
        },
    )
