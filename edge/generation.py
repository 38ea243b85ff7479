"""Generation on the edge: a local language model, a token-confidence gate, and the cloud
taking over up front, after a probe, or mid-stream.

One answer is one :class:`_Answer`: a generator of :class:`GenerationChunk` that records what
it yields, so the caller's stream and the final :class:`GenerationResult` are the same tokens —
none duplicated, none lost, each marked with the tier that produced it. Hand-offs work on text
(see :mod:`tandem.runtime.generation`): the next tier gets ``prompt + answer so far``. A chat
(``messages``) travels as messages: each tier renders them with its own model's chat template
(:mod:`tandem.runtime.chat`) and continues after the answer so far.

If the cloud fails before its first token, or is lost mid-stream (``StreamInterrupted``, a
deadline), the edge finishes the answer from where it stands, marked ``edge-degraded``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Collection, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from tandem.edge.escalation_rows import EscalationRecord
from tandem.edge.speculative import controller_for, speculate
from tandem.router.policy import EscalationMode, GenerateTaskPolicy, Handoff, TokenGateMetric
from tandem.router.routing import Decision, TaskRouter, TokenGate
from tandem.runtime.backends import open_backend
from tandem.runtime.chat import chat_tokens
from tandem.runtime.client import CloudClient
from tandem.runtime.errors import ConfigError, TandemError
from tandem.runtime.generation import GenerationBackend, SamplingParams, TokenStep, TokenStream
from tandem.runtime.manifest import api_key_from_env
from tandem.runtime.speculative import GammaController
from tandem.runtime.types import GenerationChunk, GenerationResult, Tier

log = logging.getLogger(__name__)
NO_ROOM = Decision(False, "no-room-to-escalate")  # max_tokens reached before the decision


@dataclass
class GenerationTask:
    """A generation task's policy compiled into the objects that serve it."""

    name: str
    policy: GenerateTaskPolicy
    router: TaskRouter
    backend: GenerationBackend
    client: CloudClient | None
    n_vocab: int
    versions: dict[str, str]
    controller: GammaController | None = None  # mode speculative: γ, shared by the answers
    vocab: str | None = None  # mode speculative: the local model's vocabulary digest, once

    @property
    def gate(self) -> TokenGate:
        assert isinstance(self.router.gate, TokenGate)
        return self.router.gate


class _Answer:
    """One generation request, run as a generator of chunks (see the module docstring)."""

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
        self._first: TokenStream | None = None
        self.edge_text = ""  # what the edge produced before any hand-off (for the log)
        self.edge_logprobs: list[float] = []
        self.cloud_error: TandemError | None = None
        self.versions = dict(t.versions)
        self.ms = {"local": 0.0, "cloud": 0.0}
        self.t0 = time.perf_counter()
        self.result: GenerationResult | None = None
        self.speculation: dict | None = None

    # ------------------------------------------------------------------ the routing
    def run(self) -> Iterator[GenerationChunk]:
        t = self.t
        rule = t.router.pre_route(self.tags)
        if rule is not None:
            self.reason = rule.reason
            if rule.escalate:
                yield from self._escalate()
            else:
                yield from self._local_rest(self._local(""), [], Tier.EDGE)
        else:
            yield from self._gated()
        self._finish()

    def _gated(self) -> Iterator[GenerationChunk]:
        t, mode = self.t, self.t.policy.mode
        steps = self._local("")
        held: list[TokenStep] = []
        n_probe = 1 if mode is EscalationMode.UPFRONT else t.policy.probe_tokens
        if mode is EscalationMode.MIDSTREAM:
            yield from self._midstream(steps)
            return
        for step in self._timed(steps):
            held.append(step)
            if len(held) >= n_probe:
                break
        score = self._score(held, steps)
        keeps = t.policy.handoff is Handoff.CONTINUE and mode is EscalationMode.PROBE
        if mode is EscalationMode.SPECULATIVE:  # the cloud's answer from the start, drafted
            keeps = False
        if keeps and len(held) >= self.params.max_tokens:  # the probe is the whole answer
            decision = NO_ROOM
        else:
            decision = t.router.decide(score, not math.isnan(score))
        self.confidence, self.reason = score, decision.reason
        if not decision.escalate:
            yield from self._local_rest(steps, held, Tier.EDGE)
            return
        steps.close()
        self.edge_text = "".join(s.text for s in held)
        self.edge_logprobs = [s.logprob for s in held]
        if keeps and held:
            yield self._emit(held, Tier.EDGE)
        yield from self._escalate()

    def _escalate(self) -> Iterator[GenerationChunk]:
        """The cloud answers from where the answer stands: drafted and verified in mode
        speculative, else streamed."""
        if self.t.policy.mode is EscalationMode.SPECULATIVE:
            yield from speculate(self)
        else:
            yield from self.cloud_stream(self.text)

    def _midstream(self, steps) -> Iterator[GenerationChunk]:
        t = self.t
        window, watching = t.policy.window, True
        try:
            for step in self._timed(steps):
                yield self._emit([step], Tier.EDGE)
                if not watching:
                    continue
                score = t.gate.score(self.logprobs[-window:])
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
                yield from self.cloud_stream("" if restart else self.text, restart)
                return
            self.finish_reason = steps.finish_reason or "stop"
            if self.confidence is None:
                self.confidence = t.gate.score(self.logprobs)
        finally:
            steps.close()

    def _score(self, held: list[TokenStep], steps) -> float:
        gate = self.t.gate
        if gate.metric is TokenGateMetric.FIRST_ENTROPY:
            first = held[0].entropy if held else None
            return gate.score([], first, self.t.n_vocab)
        if not held:  # the model ended at once (EOS): nothing to doubt
            return 1.0
        return gate.score([s.logprob for s in held])

    # ------------------------------------------------------------------ the tiers
    def _room(self, prefix: str) -> int:
        """Tokens the answer may still grow by: what is left of max_tokens and, once it has
        begun, of the edge model's context (a long cloud answer handed back can leave less)."""
        left = self.params.max_tokens - len(self.tokens)
        backend = self.t.backend
        n_ctx, tokenize = getattr(backend, "n_ctx", 0), getattr(backend, "tokenize", None)
        if self.tokens and n_ctx and tokenize is not None:
            if self.messages is None:
                left = min(left, n_ctx - len(tokenize(self.prompt + prefix)))
            else:
                left = min(left, n_ctx - len(chat_tokens(backend, self.messages, prefix)))
        return left

    def _local(self, prefix: str):
        """The edge model's stream, continuing after ``prefix`` (the answer so far)."""
        params = replace(self.params, max_tokens=max(self._room(prefix), 1))
        if self.messages is None:
            steps = self.t.backend.stream(self.prompt + prefix, params)
        else:
            steps = self.t.backend.stream_chat(self.messages, params, prefix=prefix)
        if self._first is None:
            self._first = steps
        return steps

    def _timed(self, steps) -> Iterator[TokenStep]:
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

    def _local_rest(self, steps, held: list[TokenStep], tier: Tier) -> Iterator[GenerationChunk]:
        try:
            if held:
                yield self._emit(held, tier)
            for step in self._timed(steps):
                yield self._emit([step], tier)
            self.finish_reason = steps.finish_reason or "stop"
        finally:
            steps.close()

    def cloud_stream(self, prefix: str, restart: bool = False) -> Iterator[GenerationChunk]:
        """The cloud answers, continuing after ``prefix`` (the answer so far, or "" with
        ``restart``: then its first chunk withdraws what was streamed). A chat goes as its
        messages, rendered by the cloud model's own template."""
        t = self.t
        assert t.client is not None and t.policy.cloud is not None
        kept = 0 if restart else len(self.tokens)
        if self.escalated_at is None:  # a speculative answer falling back keeps its own
            self.escalated_at = kept
        left_ms = self.deadline_ms  # the cloud's part: counted from when it is asked
        t0 = time.perf_counter()
        first = True
        try:
            params = replace(self.params, max_tokens=self.params.max_tokens - kept)
            fts = t.policy.first_token_ms
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
            with call:
                for c in call:
                    chunk = GenerationChunk(c.text, list(c.tokens), Tier.CLOUD, list(c.logprobs))
                    chunk.restart = restart and first
                    first = False
                    yield self._record(chunk)
                end = call.end or {}
            self.finish_reason = end.get("finish_reason", "stop")
            self.versions["cloud"] = f"{end.get('model', t.policy.cloud.model)}@" + str(
                end.get("version", "?")
            )
        except TandemError as e:
            self.cloud_failed(e)
        finally:
            self.ms["cloud"] += (time.perf_counter() - t0) * 1e3
        if self.cloud_error is not None:
            yield from self.degrade()

    def cloud_failed(self, e: TandemError) -> None:
        self.cloud_error = e
        self.reason += f"; cloud-{e.code}"
        log.info("task %s: cloud failed (%s): the edge finishes the answer", self.t.name, e.code)

    def degrade(self) -> Iterator[GenerationChunk]:
        """After a cloud failure the edge finishes from where the answer stands (if nothing
        came from the cloud after a restart, the edge's own text still stands: nothing was
        withdrawn)."""
        if self._room(self.text) <= 0:
            self.finish_reason = "length"
            return
        yield from self._local_rest(self._local(self.text), [], Tier.EDGE_DEGRADED)

    # ------------------------------------------------------------------ bookkeeping
    def _emit(self, steps: list[TokenStep], tier: Tier) -> GenerationChunk:
        texts = [s.text for s in steps]
        return self._record(
            GenerationChunk(
                "".join(texts),
                [s.token for s in steps],
                tier,
                [s.logprob for s in steps],
                token_texts=texts,
            )
        )

    def _record(self, chunk: GenerationChunk) -> GenerationChunk:
        now = time.perf_counter()
        if chunk.restart:
            self._clear()
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
        )


class GenerationStream:
    """What ``EdgeRuntime.generate(..., stream=True)`` returns: iterate for
    :class:`GenerationChunk`; ``result`` is the :class:`GenerationResult` once the stream is
    exhausted. ``close()`` (or leaving a ``with`` block) stops the generation on every tier."""

    def __init__(self, answer: _Answer, on_done) -> None:
        self._answer = answer
        self._chunks = answer.run()
        self._on_done = on_done
        self._done = False

    def __iter__(self) -> GenerationStream:
        return self

    def __next__(self) -> GenerationChunk:
        try:
            return next(self._chunks)
        except StopIteration:
            self._complete()
            raise

    @property
    def result(self) -> GenerationResult | None:
        return self._answer.result

    def _complete(self) -> None:
        if not self._done:
            self._done = True
            self._on_done(self._answer)

    def close(self) -> None:
        self._chunks.close()
        if self._answer.result is None:
            self._answer.finish_reason = "cancelled"
            self._answer._finish()
        self._complete()

    def __enter__(self) -> GenerationStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncGeneration:
    """What ``EdgeRuntime.agenerate`` returns: ``await`` it for the result, or ``async for``
    over it for the chunks. The blocking stream runs in a worker thread; breaking out of the
    ``async for`` closes it."""

    def __init__(self, start: Callable[[], GenerationStream]) -> None:
        self._start = start

    def __await__(self):
        return asyncio.to_thread(self._collect).__await__()

    def _collect(self) -> GenerationResult:
        with self._start() as s:
            for _ in s:
                pass
        assert s.result is not None
        return s.result

    async def __aiter__(self) -> AsyncIterator[GenerationChunk]:
        s = await asyncio.to_thread(self._start)
        done = object()
        pending: asyncio.Future | None = None
        try:
            while True:
                pending = asyncio.ensure_future(asyncio.to_thread(next, s, done))
                chunk = await asyncio.shield(pending)
                if chunk is done:
                    break
                yield chunk  # type: ignore[misc]
        finally:
            if pending is not None and not pending.done():  # cancelled while next() ran
                with contextlib.suppress(BaseException):
                    await asyncio.wait([pending])
            await asyncio.to_thread(s.close)


def open_generation_task(
    name: str, tp: GenerateTaskPolicy, client: CloudClient | None
) -> GenerationTask:
    """Load a generation task's local model (through the backend registry) and warm it up.
    A local OpenAI-compatible server (``format: openai``) gets its API key from the
    environment variable ``api_key_env`` names (unset: no key, with a warning)."""
    local = tp.local
    options: dict = {"version": local.version, "threads": local.threads}
    source = local.path
    if local.format == "openai":
        if tp.mode is EscalationMode.SPECULATIVE:
            raise ConfigError(
                f"tasks.{name}: mode 'speculative' drafts on the local model's logits; "
                "local.format 'openai' (a server) has none: use a gguf or transformers model"
            )
        key = api_key_from_env(local.api_key_env, where=f"tasks.{name}.local.api_key_env")
        options.update(model=local.model, api_key=key)
        source = local.url
    elif local.format == "gguf":
        options.update(n_ctx=local.n_ctx, parallel=local.parallel)
    else:
        options["max_streams"] = local.parallel
    if local.chat_template is not None:
        options["chat_template"] = _read_template(name, local.format, local.chat_template)
    backend = open_backend(local.format, source, **options)
    backend.warm_up()
    speculative = tp.mode is EscalationMode.SPECULATIVE
    return GenerationTask(
        name=name,
        policy=tp,
        router=TaskRouter(tp),
        backend=backend,
        client=client,
        n_vocab=int(getattr(backend, "n_vocab", 0)),
        versions={"edge": backend.version},
        controller=controller_for(tp) if speculative else None,
    )


def _read_template(task: str, fmt: str, path: Path) -> str:
    key = f"tasks.{task}.local.chat_template"
    if fmt == "openai":
        raise ConfigError(f"{key}: a server renders chats with its own template; remove it")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(
            f"{key}: cannot read {path}: {getattr(e, 'strerror', None) or e}"
        ) from None


def log_record(answer: _Answer, store_inputs: bool) -> EscalationRecord | None:
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
        model_versions=r.model_versions,
        generation={
            "prompt": answer.prompt if store_inputs else None,
            "messages": answer.messages if store_inputs else None,
            "edge": answer.edge_text,
            "cloud": answer.cloud_text if cloud else None,
            "answer": r.text,
            "escalated_at": answer.escalated_at,
        },
    )
