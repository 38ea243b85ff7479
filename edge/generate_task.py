"""A generation task on the edge: its policy compiled into a local model, a router and a cloud
client (:class:`GenerationTask`), and what callers hold while an answer streams
(:class:`AnswerStream`, :class:`AsyncAnswerStream`). The answer itself is
:class:`tandem.edge.answer.Answer`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tandem.edge.drafting import controller_for
from tandem.router.policy import EscalationMode, GenerateTaskPolicy
from tandem.router.routing import TaskRouter, TokenGate
from tandem.runtime.backends import open_backend
from tandem.runtime.client import CloudClient
from tandem.runtime.errors import ConfigError
from tandem.runtime.generation import GenerationBackend, LocalGenerationBackend
from tandem.runtime.manifest import api_key_from_env
from tandem.runtime.speculative import GammaController
from tandem.runtime.types import AnswerChunk, GenerationResult

if TYPE_CHECKING:
    from tandem.edge.answer import Answer


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


class AnswerStream:
    """What ``EdgeRuntime.generate(..., stream=True)`` returns: iterate for
    :class:`AnswerChunk`; ``result`` is the :class:`GenerationResult` once the stream is
    exhausted. ``close()`` (or leaving a ``with`` block) stops the generation on every tier."""

    def __init__(self, answer: Answer, on_done: Callable[[Answer], None]) -> None:
        self._answer = answer
        self._chunks = answer.run()
        self._on_done = on_done
        self._done = False

    def __iter__(self) -> AnswerStream:
        return self

    def __next__(self) -> AnswerChunk:
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
        self._answer.cancel()
        self._complete()

    def __enter__(self) -> AnswerStream:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class AsyncAnswerStream:
    """What ``EdgeRuntime.agenerate`` returns: ``await`` it for the result, or ``async for``
    over it for the chunks. The blocking stream runs on ``executor`` (the runtime's own pool
    for streams, not asyncio's default executor that ``ainfer`` uses, so long streams cannot
    starve short calls); breaking out of the ``async for`` closes it, and cancelling the task
    that iterates closes it too and is never swallowed."""

    def __init__(self, start: Callable[[], AnswerStream], executor: Executor) -> None:
        self._start = start
        self._executor = executor

    def _run(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future:
        return asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def __await__(self):
        return self._run(self._collect).__await__()

    def _collect(self) -> GenerationResult:
        with self._start() as s:
            for _ in s:
                pass
        assert s.result is not None
        return s.result

    async def __aiter__(self) -> AsyncIterator[AnswerChunk]:
        s = await self._run(self._start)
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
        n_vocab=backend.n_vocab if isinstance(backend, LocalGenerationBackend) else 0,
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
