"""The edge SDK: local model + router + cloud client + escalation log. (Over 500 lines: one
class, the SDK's whole public surface — infer, generate, chat, their batch and asyncio forms,
hot swap, stats — whose parts live in the modules it imports.)

.. code-block:: python

    from tandem.edge import EdgeRuntime

    rt = EdgeRuntime.from_policy("policy.yaml")
    r = rt.infer(x, task="digits", tags={"private"}, deadline_ms=50)
    r.label, r.tier, r.confidence, r.timings

``infer`` is safe to call from many threads at once; ``ainfer`` is its asyncio form.

A task whose policy names a model store (``local.store``) serves the store's current version
and hot-swaps to a new one (:meth:`EdgeRuntime.reload_models`, or every ``local.watch_s``
seconds on a watcher thread): the new model is loaded, checked and warmed up off the request
path, then the task's reference is replaced; each request takes the task once at its start, so
requests in flight finish on the old version and no request mixes two. Generation tasks too: a
replaced language model is closed when the last answer running on it ends.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict, Unpack

import numpy as np

from tandem.edge.answer import Answer, log_record
from tandem.edge.answer_streams import AnswerStream, AsyncAnswerStream
from tandem.edge.classify_task import ClassifyTask, check_same_shape, open_classify_task
from tandem.edge.escalation_log import EscalationLog
from tandem.edge.generate_task import (
    GenerationTask,
    check_same_vocabulary,
    open_generation_task,
)
from tandem.edge.metrics import EdgeMetrics
from tandem.edge.model_swap import ModelSwapper
from tandem.edge.policy_reload import PolicyReload, PolicyReloader, read_policy_file
from tandem.router.drift import AlarmDispatcher, DriftAlarm
from tandem.router.policy import (
    CloudTargetSpec,
    GenerateTaskPolicy,
    Policy,
    TaskPolicy,
)
from tandem.router.routing import RoutingStats
from tandem.runtime import tracing
from tandem.runtime.chat import check_messages
from tandem.runtime.client import CloudClient
from tandem.runtime.errors import BadRequest
from tandem.runtime.generation import SamplingParams, check_prompt
from tandem.runtime.types import GenerationResult, Result, Tier
from tandem.runtime.wire import new_request_id

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from tandem.runtime.ops_http import OpsHttpServer

log = logging.getLogger(__name__)

Tags = Collection[str]
_NO_TAGS: frozenset[str] = frozenset()
MAX_ASYNC_STREAMS = 64  # threads that pull agenerate/achat streams; more streams wait for one


class GenerateOptions(TypedDict, total=False):
    """The options :meth:`EdgeRuntime.generate` and :meth:`EdgeRuntime.chat` take."""

    max_tokens: int | None  # default: the task's
    temperature: float  # 0 (default): greedy
    top_p: float
    seed: int | None
    stop: Sequence[str] | None  # default: the task's
    tags: Tags  # routing tags for the policy's rules
    deadline_ms: float | None  # the cloud's part of the answer; default: the task's


class EdgeRuntime:
    """Answers on the device when the local model is confident, escalates otherwise."""

    def __init__(
        self,
        policy: Policy,
        *,
        escalation_log: EscalationLog | None = None,
        on_drift: Callable[[DriftAlarm], None] | None = None,
        seed: int | None = None,
        metrics: bool = False,
    ) -> None:
        """``on_drift(alarm)``: see :meth:`on_drift`; ``seed``: audit sampling's (None: OS);
        ``metrics``: record Prometheus metrics from the start (see :attr:`metrics_registry`;
        the policy's ``metrics`` section also turns them on and serves them)."""
        self.policy = policy
        self._policy_reloads = PolicyReloader(self)  # reload_policy and the file's watcher
        # tracing (the policy's `tracing` section): each infer is a root span; off, the
        # class's infer runs untouched (nothing on the path)
        self._traced = tracing.configure(policy.tracing, "tandem-edge")
        if self._traced:
            self.infer = tracing.traced_infer(  # type: ignore[method-assign]
                self.infer, lambda: self._default_task
            )
        self._metrics: EdgeMetrics | None = None  # None: metrics off, nothing on the path
        self._exporters: list[OpsHttpServer] = []
        self._closed = False
        self._clients: list[CloudClient] = []
        self._client_by: dict[tuple[Any, ...], CloudClient] = {}  # (endpoints, keys) -> client
        self._client_lock = threading.Lock()
        self._tasks: dict[str, ClassifyTask] = {}
        self._generators: dict[str, GenerationTask] = {}
        self._swapper = ModelSwapper(self._tasks, self._build, check_same_shape)
        self._retired: list[GenerationTask] = []  # replaced, their model maybe still in use
        self._gen_swapper = ModelSwapper(
            self._generators, self._build_generator, check_same_vocabulary, self._retire
        )
        self._drift_hooks: list[Callable[[DriftAlarm], None]] = [on_drift] if on_drift else []
        self._alarms = AlarmDispatcher(self._call_drift_hooks)
        self._seed = seed
        # threads that pull agenerate/achat streams: made on first use, at most MAX_ASYNC_STREAMS
        self._streams = ThreadPoolExecutor(MAX_ASYNC_STREAMS, thread_name_prefix="tandem-stream")
        self.escalation_log = escalation_log
        try:
            self._open(policy)
        except BaseException:  # a task failed to load: free what the others opened
            self.close()
            raise
        self._default_task = next(iter(self._tasks)) if len(self._tasks) == 1 else None
        self._default_generator = (
            next(iter(self._generators)) if len(self._generators) == 1 else None
        )
        self._swapper.start()
        self._gen_swapper.start()
        try:
            if metrics or policy.metrics is not None:
                self._enable_metrics()
            if policy.metrics is not None:
                self.serve_metrics(policy.metrics.bind)
        except BaseException:  # the exporter's port is taken: free what was opened
            self.close()
            raise

    def _open(self, policy: Policy) -> None:
        if self.escalation_log is None and policy.escalation_log is not None:
            spec = policy.escalation_log
            self.escalation_log = EscalationLog(
                spec.path,
                synchronous=spec.synchronous,
                store_inputs=spec.store_inputs,
                queue_rows=spec.queue_rows,
                queue_bytes=spec.queue_bytes,
                max_rows=spec.max_rows,
                max_age_s=spec.max_age_s,
            )
        for name, tp in policy.tasks.items():
            if isinstance(tp, GenerateTaskPolicy):
                self._generators[name] = self._gen_swapper.open(name, tp)
                continue
            self._tasks[name] = self._swapper.open(name, tp)

    def _client_for(self, cloud: CloudTargetSpec) -> CloudClient:
        """One client per set of workers (endpoints and keys), shared by the tasks and tiers
        that name it."""
        key = (tuple(cloud.all_endpoints), cloud.curve_keys)
        with self._client_lock:  # swaps (the watcher's thread, the caller's) build tasks too
            if key not in self._client_by:
                self._client_by[key] = CloudClient(key[0], curve=key[1])
                self._clients.append(self._client_by[key])
            return self._client_by[key]

    def _build(
        self, name: str, tp: TaskPolicy, serving: str | None, stats: RoutingStats
    ) -> ClassifyTask:
        return open_classify_task(
            name,
            tp,
            None if tp.cloud is None else self._client_for(tp.cloud),
            tier_clients=[self._client_for(tier.cloud) for tier in tp.tiers],
            stats=stats,
            on_drift=self._drift_alarm,
            seed=self._seed,
            serving=serving,
        )

    def _build_generator(
        self, name: str, tp: GenerateTaskPolicy, serving: str | None, stats: RoutingStats
    ) -> GenerationTask:
        return open_generation_task(
            name,
            tp,
            None if tp.cloud is None else self._client_for(tp.cloud),
            on_drift=self._drift_alarm,
            seed=self._seed,
            stats=stats,
            serving=serving,
        )

    def _retire(self, old: GenerationTask) -> None:
        self._retired = [t for t in self._retired if not t.closed]
        self._retired.append(old)
        old.retire()

    # ------------------------------------------------------------------ hot swap
    def reload_models(self) -> dict[str, str]:
        """Swap each task whose model store's current version changed (see
        :mod:`tandem.edge.model_swap`: a version that fails is refused, the old one serves on).
        Returns task -> what it serves now: the store's version name, or the edge version."""
        return {**self._swapper.reload(), **self._gen_swapper.reload()}

    def swap_model(
        self,
        task: str,
        path: str | Path,
        gate: Mapping[str, Any] | None = None,
        version: str | None = None,
    ) -> str:
        """Serve the model at ``path`` for ``task`` from now on: a classification task's ONNX
        model (same inputs, same classes) or a generation task's model (same format, same
        vocabulary), with ``gate`` overrides (``threshold``, ``temperature``, ``metric``)
        applied to the policy's gate; ``version`` names it (default: its sha256). Returns the
        edge version it serves. Raises, and keeps the old model, when the new one does not
        load or fit. Requests in flight finish on the old model. A task with a model store
        goes back to the store's current version at the next reload (or ``watch_s`` poll): the
        store is the source of truth there; publish to it instead."""
        if task in self._generators:
            return self._gen_swapper.swap(task, path, gate, version)
        return self._swapper.swap(self._task(task).name, path, gate, version)

    def on_drift(self, callback: Callable[[DriftAlarm], None]) -> None:
        """Call ``callback(alarm)`` on every drift alarm, on the runtime's one thread for
        alarms (never on a request's: a slow callback delays only later alarms, and past 64
        waiting they are dropped and logged); an exception from it is logged, never raised."""
        self._drift_hooks.append(callback)

    def _drift_alarm(self, alarm: DriftAlarm) -> None:
        self._alarms.post(alarm)

    def _call_drift_hooks(self, alarm: DriftAlarm) -> None:
        for cb in list(self._drift_hooks):
            try:
                cb(alarm)
            except Exception:  # a monitoring hook must not break a request
                log.exception("task %s: a drift callback raised", alarm.task)

    @classmethod
    def from_policy(
        cls, path: str | Path, *, watch_s: float | None = None, **kwargs: Any
    ) -> EdgeRuntime:
        """A runtime serving the policy file at ``path`` (``kwargs``: as the constructor).
        The file is watched and reloaded when it changes (:meth:`reload_policy`) every
        ``watch_s`` seconds, or as its ``reload: {watch_s: ...}`` section says; neither: not
        watched (:meth:`reload_policy` with no argument still re-reads it). An atomic replace
        is applied at the first check, an in-place write once it has stayed unchanged for
        max(``watch_s``, 0.25) s (:class:`~tandem.edge.policy_reload.PolicyWatcher`)."""
        p = Path(path)
        policy, content = read_policy_file(p)
        rt = cls(policy, **kwargs)
        try:
            rt._policy_reloads.watch(p, content, watch_s)
        except BaseException:
            rt.close()
            raise
        return rt

    def reload_policy(self, source: str | Path | Policy | None = None) -> PolicyReload:
        """Serve a new policy without a restart (see :mod:`tandem.edge.policy_reload`):
        ``source`` is a policy file or a :class:`Policy` (default: the file this runtime was
        started from). It is validated and every task it adds or changes is built and warmed
        up before all of them take requests at once; unchanged tasks keep their objects.
        Returns what changed. Raises :class:`~tandem.runtime.errors.ConfigError` (the file,
        the key, what was expected) and keeps the old policy serving when anything fails, or
        when the change needs a restart (``escalation_log``, ``metrics``, ``tracing``)."""
        return self._policy_reloads.reload(source)

    @property
    def tasks(self) -> list[str]:
        return [*self._tasks, *self._generators]

    def _task(self, task: str | None) -> ClassifyTask:
        name = task if task is not None else self._default_task
        t = self._tasks.get(name) if name is not None else None
        if t is None:
            raise BadRequest(self._unknown(task, "classify", self._tasks))
        return t

    def _unknown(self, task: str | None, kind: str, known: Collection[str]) -> str:
        if task is None:
            return f"name the task: the policy has {len(known)} {kind} tasks ({', '.join(known)})"
        return f"unknown task {task!r}; the policy's {kind} tasks: {', '.join(known) or 'none'}"

    # ------------------------------------------------------------------ generation
    def generate(
        self,
        prompt: str,
        task: str | None = None,
        *,
        stream: bool = False,
        **options: Unpack[GenerateOptions],
    ) -> GenerationResult | AnswerStream:
        """Generate a continuation of ``prompt`` under the task's policy: locally, or by the
        cloud when the local model's token confidence is too low (up front, after a probe or
        mid-stream, as the policy's ``mode`` says).

        ``stream=False``: the whole :class:`GenerationResult`. ``stream=True``: a
        :class:`AnswerStream` of :class:`AnswerChunk` (text, token ids, tier,
        log-probs) whose ``result`` is set once it is exhausted. Options: ``max_tokens``,
        ``temperature`` (0: greedy), ``top_p``, ``seed``, ``stop``, ``tags``, ``deadline_ms``.
        ``max_tokens`` and ``stop`` default to the task's; ``deadline_ms`` (default: the task's) bounds the cloud's part of
        the answer, counted from when the cloud is asked (its first token is bounded by the
        task's ``first_token_ms``).
        """
        check_prompt(prompt)
        return self._generate(prompt, None, task, stream=stream, **options)

    def chat(
        self,
        messages: Sequence[Mapping[str, str]],
        task: str | None = None,
        *,
        stream: bool = False,
        **options: Unpack[GenerateOptions],
    ) -> GenerationResult | AnswerStream:
        """The assistant's next message in a chat, under the task's policy, as :meth:`generate`
        (same options, same result). ``messages``: ``[{"role": "user", "content": "Hi"}, ...]``.

        Each tier renders the messages with its own model's chat template (the GGUF's
        ``tokenizer.chat_template``, the Hugging Face tokenizer's, or the policy's
        ``local.chat_template``); the cloud gets the messages, not the edge's rendering, so the
        two models may be of different families. ``result.prompt_tokens`` counts the edge
        model's rendering. A model without a template gets the contents concatenated."""
        if isinstance(messages, list | tuple):  # any mappings, as check_messages' plain dicts
            messages = [dict(m) if isinstance(m, Mapping) else m for m in messages]
        return self._generate("", check_messages(messages), task, stream=stream, **options)

    def _generate(
        self,
        prompt: str,
        messages: list[dict[str, str]] | None,
        task: str | None,
        *,
        max_tokens: int | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] | None = None,
        tags: Tags = _NO_TAGS,
        deadline_ms: float | None = None,
        stream: bool = False,
    ) -> GenerationResult | AnswerStream:
        name = task if task is not None else self._default_generator
        while True:  # the task serving now; a swap that retires it between the two: again
            t = self._generators.get(name) if name is not None else None
            if t is None:
                raise BadRequest(self._unknown(task, "generate", self._generators))
            if t.enter():  # a swap closes this model only after the answer ends
                break
        try:
            params = SamplingParams(
                max_tokens=t.policy.max_tokens if max_tokens is None else max_tokens,
                temperature=temperature,
                top_p=top_p,
                seed=seed,
                stop=tuple(t.policy.stop if stop is None else stop),
            )
            budget = t.policy.deadline_ms if deadline_ms is None else deadline_ms
            answer = Answer(t, prompt, params, frozenset(tags), budget, new_request_id(), messages)
            if tracing.TRACER is not None:  # ended with the answer (_log_generation)
                answer.span = tracing.start_generate_span(t.name, answer.request_id)
            chunks = AnswerStream(answer, self._log_generation)
        except BaseException:
            t.leave()
            raise
        if stream:
            return chunks
        with chunks:
            for _ in chunks:
                pass
        assert chunks.result is not None
        return chunks.result

    def agenerate(self, prompt: str, task: str | None = None, **kwargs: Any) -> AsyncAnswerStream:
        """:meth:`generate` for asyncio code: ``await rt.agenerate(...)`` gives the
        :class:`GenerationResult`; ``async for chunk in rt.agenerate(...)`` streams. The
        generation runs on the runtime's own threads for streams (at most
        :data:`MAX_ASYNC_STREAMS` at once; more wait), not on asyncio's default executor."""
        kwargs.pop("stream", None)
        start = lambda: self.generate(prompt, task, stream=True, **kwargs)  # noqa: E731
        return AsyncAnswerStream(start, self._stream_threads())

    def achat(
        self, messages: Sequence[Mapping[str, str]], task: str | None = None, **kwargs: Any
    ) -> AsyncAnswerStream:
        """:meth:`chat` for asyncio code, as :meth:`agenerate`."""
        kwargs.pop("stream", None)
        start = lambda: self.chat(messages, task, stream=True, **kwargs)  # noqa: E731
        return AsyncAnswerStream(start, self._stream_threads())

    def _stream_threads(self) -> ThreadPoolExecutor:
        return self._streams

    # ------------------------------------------------------------------ one request
    def infer(
        self,
        x: np.ndarray,
        task: str | None = None,
        *,
        tags: Tags = _NO_TAGS,
        deadline_ms: float | None = None,
    ) -> Result:
        """Answer one input (shaped like one row of the model's input, or (1, ...)).

        ``deadline_ms`` (default: the task's) bounds the whole call: if the cloud has not
        answered by then the edge's own answer comes back as ``edge-degraded``.
        """
        t0 = time.perf_counter()
        t = self._tasks.get(task if task is not None else self._default_task)  # type: ignore[arg-type]
        if t is None:
            t = self._task(task)  # raises, naming the tasks there are
        if type(x) is not np.ndarray:
            x = np.asarray(x)
        batch = x[None] if x.ndim == t.row_ndim else x
        if len(batch) != 1:
            raise BadRequest(f"infer takes one input, got a batch of {len(batch)}; use infer_batch")
        logits = t.local(batch)[0]
        t1 = time.perf_counter()
        router = t.router
        top1, score = router.gate.evaluate_row(logits, t.n_classes)
        accepted = top1 >= 0 and router.gate.accepts(score)
        decision = (tags and router.pre_route(tags)) or router.decide(score, top1 >= 0)
        shadow = None
        if router.shadow is not None:
            s_top1, s_score = router.shadow.evaluate_row(logits, t.n_classes)
            shadow = not (s_top1 >= 0 and router.shadow.accepts(s_score))
        t2 = time.perf_counter()
        if not decision.escalate:
            timings = {"local": (t1 - t0) * 1e3, "route": (t2 - t1) * 1e3, "total": (t2 - t0) * 1e3}
            t.observe("edge", score, not accepted, shadow)
            r = t.edge_result(logits, top1, score, decision.reason, timings, shadow)
            if self._metrics is not None:
                self._metrics.observe(t.name, r)
            return r
        budget_ms = t.policy.deadline_ms if deadline_ms is None else deadline_ms
        r = t.escalate(
            batch,
            logits[None],
            [top1],
            [score],
            [decision],
            tags,
            t0,
            t1,
            t2,
            budget_ms,
            self.escalation_log,
            None if shadow is None else [shadow],
        )[0]
        t.observe(r.stage, score, not accepted, shadow)
        if self._metrics is not None:
            self._metrics.observe(t.name, r)
        return r

    async def ainfer(
        self,
        x: np.ndarray,
        task: str | None = None,
        *,
        tags: Tags = _NO_TAGS,
        deadline_ms: float | None = None,
    ) -> Result:
        """:meth:`infer` for asyncio code: runs in a worker thread (with its own socket)."""
        return await asyncio.to_thread(self.infer, x, task, tags=tags, deadline_ms=deadline_ms)

    # ------------------------------------------------------------------ a batch
    def infer_batch(
        self,
        xs: np.ndarray,
        task: str | None = None,
        *,
        tags: Tags = _NO_TAGS,
        deadline_ms: float | None = None,
    ) -> list[Result]:
        """Answer a batch (N, ...): one local call, one confidence pass, and the rows that
        escalate go to the cloud together: one request per ``cloud.max_rows`` rows (the
        worker's per-request row limit), one after the other within the deadline."""
        t0 = time.perf_counter()
        t = self._task(task)
        batch = np.asarray(xs)
        if batch.ndim != t.row_ndim + 1:
            raise BadRequest(f"infer_batch takes (N, ...) inputs, got shape {batch.shape}")
        if len(batch) == 0:
            return []
        logits = t.local(batch)
        t1 = time.perf_counter()
        router = t.router
        top1s, score_arr = router.gate.evaluate_batch(logits)
        top1_list, scores = top1s.tolist(), score_arr.tolist()
        accepted = [
            i >= 0 and router.gate.accepts(s) for i, s in zip(top1_list, scores, strict=True)
        ]
        rule = router.pre_route(tags)
        decisions = [
            rule or router.decide(s, i >= 0) for s, i in zip(scores, top1_list, strict=True)
        ]
        shadows: list[bool | None] = [None] * len(batch)
        if router.shadow is not None:
            s_top1, s_scores = router.shadow.evaluate_batch(logits)
            shadows = [
                not (i >= 0 and router.shadow.accepts(s))
                for i, s in zip(s_top1.tolist(), s_scores.tolist(), strict=True)
            ]
        t2 = time.perf_counter()
        results: list[Result | None] = [None] * len(batch)
        escalated = [i for i, d in enumerate(decisions) if d.escalate]
        budget_ms = t.policy.deadline_ms if deadline_ms is None else deadline_ms
        step = t.policy.cloud.max_rows if t.policy.cloud is not None else 1
        for k in range(0, len(escalated), step):  # requests the worker's row limit accepts
            esc = escalated[k : k + step]
            answers = t.escalate(
                batch[esc],
                logits[esc],
                [top1_list[i] for i in esc],
                [scores[i] for i in esc],
                [decisions[i] for i in esc],
                tags,
                t0,
                t1,
                t2,
                budget_ms,
                self.escalation_log,
                None if router.shadow is None else [shadows[i] for i in esc],
            )
            for i, r in zip(esc, answers, strict=True):
                results[i] = r
        total = (time.perf_counter() - t0) * 1e3
        for i, d in enumerate(decisions):
            if results[i] is None:
                timings = {"local": (t1 - t0) * 1e3, "route": (t2 - t1) * 1e3, "total": total}
                results[i] = t.edge_result(
                    logits[i], top1_list[i], scores[i], d.reason, timings, shadows[i]
                )
        m = self._metrics
        for i, r in enumerate(results):
            assert r is not None
            t.observe(r.stage, scores[i], not accepted[i], shadows[i])
            if m is not None:
                m.observe(t.name, r)
        return results  # type: ignore[return-value]

    def _log_generation(self, answer: Answer) -> None:
        """An answer ended (once, however it ended): count it, log it, release its model."""
        try:
            self._answer_done(answer)
        finally:
            answer.t.leave()
            if answer.span is not None:
                tracing.end_generate_span(answer.span, answer.result)

    def _answer_done(self, answer: Answer) -> None:
        r = answer.result
        if r is not None:
            gate_decided = r.confidence is not None and not r.reason.startswith("rule:")
            stage = "cloud" if Tier.CLOUD in r.tiers else "edge"
            answer.t.observe(stage, r.confidence if gate_decided else None, r.shadow_escalate)
            if self._metrics is not None:
                self._metrics.observe_generation(answer.t.name, r)
        if self.escalation_log is None:
            return
        try:  # only queues the row; a robot must not stall on a log
            record = log_record(answer, self.escalation_log.store_inputs)
            if record is not None:
                self.escalation_log.append(record)
        except Exception:
            log.exception("task %s: escalation log append failed", answer.t.name)

    def stats(self) -> dict[str, Any]:
        """Counters for monitoring: ``escalation_log`` is the log's
        :meth:`~tandem.edge.escalation_log.EscalationLog.stats` (None without a log);
        ``tasks[name]``: ``stages`` (answers by where they stopped), ``shadow`` (the active
        and shadow gates' verdicts), ``cascade`` (with tiers), ``swaps`` (done, refused),
        ``serving`` (the version it serves) and ``drift`` (None without a drift alarm)."""
        tasks: dict[str, Any] = {}
        for name, t in [*self._tasks.items(), *self._generators.items()]:
            out = t.stats.snapshot()
            out["serving"] = t.serving
            out["versions"] = dict(t.versions)
            out["drift"] = None if t.drift is None else t.drift.stats()
            tasks[name] = out
        links: dict[str, bool] = {}
        for c in list(self._clients):
            for endpoint, up in c.pool.links().items():
                links[endpoint] = links.get(endpoint, True) and up  # two clients: down wins
        return {
            "escalation_log": None if self.escalation_log is None else self.escalation_log.stats(),
            "tasks": tasks,
            # digest, source, watch_s, reloads {applied, unchanged, refused}, last_error
            "policy": self._policy_reloads.stats(),
            "links": links,
        }

    # ------------------------------------------------------------------ operations
    def ready(self) -> tuple[bool, dict[str, Any]]:
        """Readiness (``/ready``): every task of the policy has its model loaded and warmed
        (a task is built warm, so it is ready once it is in the runtime's tables; a generation
        model closed under it is not), and the runtime is not closed. Returns ``(ready,
        {"state": "ready" | "loading" | "closed", "tasks": {name: {"ready", "version"}}})``."""
        if self._closed:
            return False, {"state": "closed", "tasks": {}}
        tasks: dict[str, dict[str, Any]] = {}
        for name in self.policy.tasks:
            t: ClassifyTask | GenerationTask | None = self._tasks.get(name)
            if t is None:
                t = self._generators.get(name)
            ok = t is not None and not (isinstance(t, GenerationTask) and t.closed)
            tasks[name] = {"ready": ok, "version": None if t is None else t.versions["edge"]}
        ok = all(v["ready"] for v in tasks.values())
        return ok, {"state": "ready" if ok else "loading", "tasks": tasks}

    def _enable_metrics(self) -> EdgeMetrics:
        if self._metrics is None:
            self._metrics = EdgeMetrics(self.stats)
        return self._metrics

    @property
    def metrics_registry(self) -> CollectorRegistry:
        """The runtime's Prometheus registry (its own, not prometheus-client's global one),
        for an exporter of the user's (``prometheus_client.start_http_server(port,
        registry=rt.metrics_registry)``). Reading it turns metrics on: answers are recorded
        from then on (the ``tandem_edge_…`` names are in :mod:`tandem.edge.metrics`)."""
        return self._enable_metrics().registry

    def serve_metrics(self, bind: str = "127.0.0.1:9101") -> OpsHttpServer:
        """Serve ``GET /metrics`` (this runtime's registry), ``/health`` (live) and ``/ready``
        (:meth:`ready`: 503 until every task is loaded and warmed) on ``bind`` (``HOST:PORT``;
        port 0: any free one, see the returned server's ``url``), on a thread of its own,
        until :meth:`close`. Turns metrics on. Raises :class:`ConfigError` if ``bind`` is
        malformed or taken."""
        from tandem.runtime.ops_http import OpsHttpServer

        server = OpsHttpServer(bind, registry=self.metrics_registry, ready=self.ready)
        server.start()
        self._exporters.append(server)
        return server

    def close(self) -> None:
        """Close the local models, the cloud clients and the escalation log (it writes what
        it has queued first), and the metrics exporters. Safe on a runtime that failed
        half-way through loading."""
        self._closed = True
        for server in self._exporters:
            server.close()
        self._policy_reloads.close()  # no reload from here on
        self._swapper.close()
        self._gen_swapper.close()
        self._alarms.close()
        for g in [*self._generators.values(), *self._retired]:
            g.close_model()
        for c in self._clients:
            c.close()
        self._streams.shutdown(wait=False, cancel_futures=True)
        if self.escalation_log is not None:
            self.escalation_log.close()
        if self._traced:  # flushes the spans still queued
            self._traced = False
            tracing.shutdown()

    def __enter__(self) -> EdgeRuntime:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
