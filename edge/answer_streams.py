"""What callers hold while an answer streams: :class:`AnswerStream` (``EdgeRuntime.generate(...,
stream=True)``) and :class:`AsyncAnswerStream` (``agenerate``/``achat``)."""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from typing import Any

from tandem.edge.answer import Answer
from tandem.runtime.types import AnswerChunk, GenerationResult


class AnswerStream:
    """What ``EdgeRuntime.generate(..., stream=True)`` returns: iterate for
    :class:`AnswerChunk`; ``result`` is the :class:`GenerationResult` once the stream is
    exhausted. ``close()`` (or leaving a ``with`` block) stops the generation on every tier."""

    def __init__(self, answer: Answer, on_done: Callable[[Answer], None]) -> None:
        self._answer = answer
        self._chunks = answer.run()
        self._on_done = on_done
        self._done = [False]  # shared with the finalizer below
        self._failed = False  # the answer raised: closing it ends it as an error
        # a stream dropped without being exhausted or closed still ends its answer (counted,
        # logged, its model released for a hot swap) when it is garbage-collected
        weakref.finalize(self, _abandoned, self._chunks, answer, on_done, self._done)

    def __iter__(self) -> AnswerStream:
        return self

    def __next__(self) -> AnswerChunk:
        try:
            return next(self._chunks)
        except StopIteration:
            self._complete()
            raise
        except BaseException:
            self._failed = True
            raise

    @property
    def result(self) -> GenerationResult | None:
        return self._answer.result

    def _complete(self) -> None:
        if not self._done[0]:
            self._done[0] = True
            self._on_done(self._answer)

    def close(self) -> None:
        self._chunks.close()
        self._answer.cancel("error" if self._failed else "cancelled")
        self._complete()

    def __enter__(self) -> AnswerStream:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _abandoned(
    chunks: Any, answer: Answer, on_done: Callable[[Answer], None], done: list[bool]
) -> None:
    if done[0]:
        return
    done[0] = True
    with contextlib.suppress(Exception):
        chunks.close()
        answer.cancel("cancelled")
    on_done(answer)


class AsyncAnswerStream:
    """What ``EdgeRuntime.agenerate`` returns: ``await`` it for the result, or ``async for``
    over it for the chunks. The blocking stream runs on ``executor`` (the runtime's own pool
    for streams, not asyncio's default executor that ``ainfer`` uses, so long streams cannot
    starve short calls); breaking out of the ``async for`` closes it, and cancelling the task
    that iterates closes it too and is never swallowed."""

    def __init__(self, start: Callable[[], AnswerStream], executor: Executor) -> None:
        self._start = start
        self._executor = executor
        self._stream: AnswerStream | None = None

    def _run(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future:
        return asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def __await__(self):
        return self._result().__await__()

    async def _result(self) -> GenerationResult:
        async for _ in self._pull():  # cancelling the awaiting task closes the stream too
            pass
        assert self._stream is not None and self._stream.result is not None
        return self._stream.result

    def __aiter__(self) -> AsyncIterator[AnswerChunk]:
        return self._pull()

    async def _pull(self) -> AsyncIterator[AnswerChunk]:
        s = self._stream = await self._run(self._start)
        done = object()
        pending: asyncio.Future | None = None
        try:
            while True:
                pending = self._run(next, s, done)
                chunk = await asyncio.shield(pending)
                if chunk is done:
                    break
                yield chunk  # type: ignore[misc]
        finally:
            if pending is not None and not pending.done():
                # cancelled while next() ran: close the stream once that call returns (a
                # stream is not thread-safe), without waiting here — the cancellation goes on
                pending.add_done_callback(lambda _f: self._executor.submit(s.close))
            else:
                with contextlib.suppress(RuntimeError):  # the executor shut down
                    await self._run(s.close)
