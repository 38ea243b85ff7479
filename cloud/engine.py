"""One engine per local language model: a thread that steps every active sequence together.

The worker's socket thread only reads, admits, routes and sends; the model's compute happens
here. An :class:`Engine` holds the model's *jobs* — generation streams
(:class:`~tandem.cloud.engine_stream.StreamJob`), speculative verify rounds
(:class:`~tandem.cloud.verify.VerifyRound`) — and each turn of its loop is one **step**: every
job that can run gives one :data:`~tandem.runtime.generation.BatchItem` (a decode row: one
token; a verify round: the draft's γ + 1 tokens; a prefill: a chunk of its prompt), and the
backend runs them in one forward (:meth:`~tandem.runtime.generation.BatchedBackend.run_batch`:
each weight streamed once for all of them, as vLLM and llama.cpp's server batch). New jobs join
at step boundaries and finished ones leave (continuous batching).

**Fairness.** Every step holds every decode row and verify round that can run (never split:
a round's rows come from one forward), then prompt chunks of at most
``generation.prefill_chunk`` tokens in what is left of ``generation.step_tokens``, one chunk at
least. So a 2,048-token prompt never stalls the others' decoding by more than one chunk's
time, and prompts always progress.

**Bounds.** Prompts not yet run (jobs waiting for their first step, counted in UTF-8 bytes
before the tokenizer runs, and the rest of prefills under way) hold at most
``generation.max_queued_prefill`` tokens (over it: :class:`OverloadedError` with a retry hint); sequences are bounded by
the backend's slots (``max_streams`` / ``parallel``) and by the stream and session tables.

**Threads.** Jobs are submitted from the socket thread (:meth:`Engine.submit`) into an inbox
and run only on the engine's thread, which also makes every call on the model (``lease``,
``truncate``, ``close`` included: a llama.cpp context is one object shared by its sequences).
Results go back to the socket thread through the :class:`Mailbox`. A job that fails on its own
gets its error; a batch that fails is re-run one job at a time so only the failing job gets it
(a backend commits a sequence's tokens only when its forward succeeded).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from tandem.runtime.errors import OverloadedError, ShuttingDown
from tandem.runtime.generation import BatchedBackend, BatchItem, SessionLease, run_one_by_one

log = logging.getLogger(__name__)

_IDLE_WAIT_S = 0.05  # the longest the engine sleeps before it looks at its jobs again
_DECODE_MAX = 64  # tokens: a job with more to run (than this and its rows) is a prefill
_MIN_CHUNK = 16  # tokens: a prompt's chunk when the step is already full


COMPUTE_NICE = 5  # the compute threads' niceness above the socket thread's (Linux)


def yield_cpu() -> None:
    """Lower the calling (compute) thread's CPU priority by :data:`COMPUTE_NICE`, so the socket
    thread, woken by a message, gets a core before it: on a machine whose cores the compute
    keeps busy, a ``health`` check then waits for the GIL, not for a time slice. Per thread
    on Linux; elsewhere (or when the OS refuses) nothing changes."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + COMPUTE_NICE)
    except (AttributeError, OSError):
        pass


class Mailbox:
    """Callables posted by other threads, run by the socket thread when it wakes: a wake pipe
    beside the socket in the worker's poll. ``post`` and ``wake`` are safe from any thread."""

    def __init__(self) -> None:
        self._posted: deque[Callable[[], None]] = deque()
        self._lock = threading.Lock()  # a poster never writes to a closed (reused) fd
        self._woken = False
        self._closed = False
        self._rfd, self._wfd = os.pipe()
        os.set_blocking(self._rfd, False)
        os.set_blocking(self._wfd, False)

    @property
    def fd(self) -> int:
        """Readable when something was posted (or a wake): poll it beside the socket."""
        return self._rfd

    def post(self, fn: Callable[[], None]) -> None:
        self._posted.append(fn)  # deque.append is atomic
        self.wake()

    def wake(self) -> None:
        if self._woken:
            return
        self._woken = True
        with self._lock, contextlib.suppress(BlockingIOError):  # full: the loop is awake
            if not self._closed:
                os.write(self._wfd, b"\0")

    def drain(self) -> None:
        """Empty the pipe, then run what was posted (the socket thread). A post after the
        pipe was emptied wakes the loop again."""
        self._woken = False
        try:
            while os.read(self._rfd, 4096):
                pass
        except BlockingIOError:
            pass
        while self._posted:
            fn = self._posted.popleft()
            try:
                fn()
            except Exception:  # a bug of ours: the loop keeps serving
                log.exception("a posted completion failed")

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            os.close(self._rfd)
            os.close(self._wfd)


class Job:
    """What an engine steps. Every method runs on the engine thread.

    ``todo`` holds the tokens still to run and ``n_rows`` the logits rows wanted after the
    last of them; :meth:`take` gets those rows and sets what runs next (or ``done``)."""

    lease: SessionLease | None = None
    todo: list[int]
    n_rows: int = 1
    done: bool = False
    prefill: int = 0  # prompt tokens this job holds while queued (the engine's bound)

    def start(self, backend: Any) -> None:
        """The first time the engine sees the job (before any step): open its lease."""

    def runnable(self) -> bool:
        """Whether it has work for the next step (a stream whose reader lags waits)."""
        return True

    def cancelled(self) -> bool:
        """Whether it should end before its next step (its stream was cancelled)."""
        return False

    def cancel(self) -> None:
        """End it now, without running (``done`` is set after)."""

    def take(self, rows: np.ndarray) -> None:
        """The rows after the last ``n_rows`` tokens of ``todo``, which ran."""
        raise NotImplementedError

    def fail(self, exc: BaseException) -> None:
        """It cannot go on: report ``exc`` (``done`` is set after)."""
        raise NotImplementedError

    def close(self) -> None:
        """It left the engine (done, or the engine stopped): free what it holds."""


class Engine:
    """One model's engine (see the module docstring). ``mailbox``: where results go back to
    the socket thread."""

    def __init__(
        self,
        model: str,
        backend: Any,
        *,
        step_tokens: int,
        prefill_chunk: int,
        max_queued_prefill: int,
    ) -> None:
        self.model = model
        self.backend = backend
        self.step_tokens = step_tokens
        self.prefill_chunk = prefill_chunk
        self.max_queued_prefill = max_queued_prefill
        self._batched = isinstance(backend, BatchedBackend)
        self._inbox: deque[Job | Callable[[], None]] = deque()
        self._jobs: list[Job] = []
        self._cond = threading.Condition(threading.Lock())
        self._queued_prefill = 0  # prompt tokens of jobs submitted, not yet started
        self._closed = False
        self.steps = 0
        self.rows = 0  # sequences stepped, over all steps
        self.max_batch = 0
        self._thread = threading.Thread(
            target=self._run, name=f"tandem-engine-{model}", daemon=True
        )
        self._thread.start()

    # ------------------------------------------------------------------ other threads
    def admits(self, prefill: int) -> None:
        """:class:`OverloadedError` unless a job with ``prefill`` prompt tokens would be taken
        now (what :meth:`submit` checks; ask first when making room for it costs something)."""
        with self._cond:
            self._check(prefill)

    def submit(self, job: Job) -> None:
        """Queue a job for the next step boundary. :class:`OverloadedError` when the prompt
        tokens waiting would pass ``max_queued_prefill``; then nothing was queued."""
        with self._cond:
            self._check(job.prefill)
            self._queued_prefill += job.prefill
            self._inbox.append(job)
            self._cond.notify()

    def _check(self, prefill: int) -> None:
        if self._closed:
            raise ShuttingDown(f"model {self.model!r} is shutting down")
        if not prefill:
            return
        waiting = self._queued_prefill + sum(
            len(j.todo) for j in self._jobs if len(j.todo) > max(_DECODE_MAX, j.n_rows)
        )
        if waiting + prefill > self.max_queued_prefill:
            raise OverloadedError(
                f"model {self.model!r} has {waiting} prompt tokens waiting to run "
                f"(generation.max_queued_prefill {self.max_queued_prefill}); retry soon",
                retry_after_ms=50.0,
            )

    def call(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the engine thread at the next step boundary, in order with the jobs
        submitted (e.g. a lease's ``close``: only the engine touches the model)."""
        with self._cond:
            if self._closed:
                fn()  # the thread is gone or going: nothing else touches the model
                return
            self._inbox.append(fn)
            self._cond.notify()

    def poke(self) -> None:
        """A job that was not runnable may be now (its reader took tokens, or it was
        cancelled)."""
        with self._cond:
            self._cond.notify()

    def pending(self) -> int:
        """Jobs it holds (running, or submitted and not started) and calls not yet run: an
        engine whose model version was replaced is closed once this is 0."""
        with self._cond:
            return len(self._jobs) + len(self._inbox)

    def health(self) -> dict[str, Any]:
        return {
            "jobs": len(self._jobs),
            "steps": self.steps,
            "mean_batch": round(self.rows / self.steps, 2) if self.steps else 0.0,
            "max_batch": self.max_batch,
            "queued_prefill_tokens": self._queued_prefill,
        }

    def close(self) -> None:
        """Stop after the current step; jobs still there fail (the worker answered them)."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=10)

    # ------------------------------------------------------------------ the engine thread
    def _run(self) -> None:
        yield_cpu()
        while True:
            with self._cond:
                while not self._closed and not self._inbox and not self._any_runnable():
                    self._cond.wait(_IDLE_WAIT_S)
                if self._closed:
                    break
                inbox, self._inbox = self._inbox, deque()
            for item in inbox:
                if isinstance(item, Job):
                    self._admit(item)
                else:
                    self._guarded(item)
            try:
                self._step()
            except Exception as e:  # a bug of ours: fail the jobs rather than spin on it
                log.exception("engine of model %r: step failed", self.model)
                for job in self._jobs:
                    if not job.done:
                        self._fail(job, e)
            self._reap()
        self._jobs.extend(j for j in self._inbox if isinstance(j, Job))
        for job in self._jobs:
            if not job.done:
                self._fail(job, ShuttingDown(f"model {self.model!r} is shutting down"))
        self._reap(all_jobs=True)
        for fn in [f for f in self._inbox if not isinstance(f, Job)]:
            self._guarded(fn)

    def _any_runnable(self) -> bool:
        return any(j.done or j.cancelled() or j.runnable() for j in self._jobs)

    def _admit(self, job: Job) -> None:
        try:
            job.start(self.backend)
        except Exception as e:
            self._fail(job, e)
        with self._cond:  # its prompt now counts among the jobs' (submit's bound)
            self._jobs.append(job)
            self._queued_prefill -= job.prefill

    def _step(self) -> None:
        for job in self._jobs:
            if not job.done and job.cancelled():
                self._guarded(job.cancel)
                job.done = True
        live = [j for j in self._jobs if not j.done and j.runnable()]
        small = [j for j in live if len(j.todo) <= max(_DECODE_MAX, j.n_rows)]
        large = [j for j in live if len(j.todo) > max(_DECODE_MAX, j.n_rows)]
        budget = self.step_tokens - sum(len(j.todo) for j in small)
        items: list[BatchItem] = []
        owners: list[Job] = []
        for job in small:  # decode rows and verify rounds: whole, every step
            items.append((job.lease, job.todo, job.n_rows))  # type: ignore[arg-type]
            owners.append(job)
        for i, job in enumerate(large):  # prompts: chunks in what is left, one at least
            if i and budget <= 0:
                break
            n = _chunk(len(job.todo), job.n_rows, min(self.prefill_chunk, max(budget, _MIN_CHUNK)))
            rows = job.n_rows if n == len(job.todo) else 0
            items.append((job.lease, job.todo[:n], rows))  # type: ignore[arg-type]
            owners.append(job)
            budget -= n
        if not items:
            return
        try:
            outs = self._forward(items)
        except Exception as e:
            if len(items) == 1:
                self._fail(owners[0], e)
                return
            for item, job in zip(items, owners, strict=True):  # only the failing one fails
                try:
                    self._finish_item(job, item, self._forward([item])[0])
                except Exception as e1:
                    self._fail(job, e1)
            return
        self.steps += 1
        self.rows += len(items)
        self.max_batch = max(self.max_batch, len(items))
        for item, job, rows in zip(items, owners, outs, strict=True):
            try:
                self._finish_item(job, item, rows)
            except Exception as e:
                self._fail(job, e)

    def _forward(self, items: Sequence[BatchItem]) -> list[np.ndarray]:
        if self._batched:
            return self.backend.run_batch(items)
        return run_one_by_one(items)  # a backend without batched steps

    def _finish_item(self, job: Job, item: BatchItem, rows: np.ndarray) -> None:
        n = len(item[1])
        if n < len(job.todo):  # a prefill chunk: more to run
            del job.todo[:n]
            return
        job.take(rows)

    def _fail(self, job: Job, exc: BaseException) -> None:
        try:
            job.fail(exc)
        except Exception:
            log.exception("engine of model %r: a job failed to report its error", self.model)
        job.done = True

    def _reap(self, *, all_jobs: bool = False) -> None:
        keep = []
        for job in self._jobs:
            if job.done or all_jobs:
                self._guarded(job.close)
            else:
                keep.append(job)
        self._jobs = keep

    def _guarded(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception:
            log.exception("engine of model %r: a call failed", self.model)


_Done = Callable[[Any, BaseException | None], None]  # (result, error), on the socket thread


class Offload:
    """A thread that runs one model's one-shot calls (``experts`` requests) off the socket
    thread, in arrival order, at most ``max_queued`` waiting. Each call's ``done(result,
    error)`` is posted to the socket thread's :class:`Mailbox`."""

    def __init__(self, model: str, mailbox: Mailbox, max_queued: int, max_bytes: int) -> None:
        self.model = model
        self.mailbox = mailbox
        self.max_queued = max_queued
        self.max_bytes = max_bytes
        self.nbytes = 0  # of the calls waiting or running
        self._queue: deque[tuple[Callable[[], Any], _Done, int]] = deque()
        self._cond = threading.Condition(threading.Lock())
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"tandem-calls-{model}", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], Any], done: _Done, nbytes: int = 0) -> None:
        """Queue ``fn`` (holding ``nbytes`` of request data); :class:`OverloadedError` when
        ``max_queued`` calls or ``max_bytes`` wait already."""
        with self._cond:
            if self._closed:
                raise ShuttingDown(f"model {self.model!r} is shutting down")
            if len(self._queue) >= self.max_queued or self.nbytes + nbytes > self.max_bytes:
                raise OverloadedError(
                    f"model {self.model!r} has {len(self._queue)} calls ({self.nbytes} bytes) "
                    "waiting (queue.max_requests_per_model, max_bytes_per_model); retry soon",
                    retry_after_ms=10.0,
                )
            self.nbytes += nbytes
            self._queue.append((fn, done, nbytes))
            self._cond.notify()

    def _run(self) -> None:
        yield_cpu()
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                fn, done, nbytes = self._queue.popleft()
            try:
                result, error = fn(), None
            except Exception as e:
                result, error = None, e
            with self._cond:
                self.nbytes -= nbytes
            self.mailbox.post(lambda d=done, r=result, e=error: d(r, e))

    def close(self) -> None:
        """Run what is queued, then stop."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=10)


def _chunk(todo: int, n_rows: int, budget: int) -> int:
    """How many of ``todo`` tokens to run now: all if they fit ``budget``, else a chunk that
    leaves at least ``n_rows`` tokens for the last one (the rows come from one forward)."""
    if todo <= budget or todo <= n_rows:
        return todo
    return max(1, min(budget, todo - n_rows))
