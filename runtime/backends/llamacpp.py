"""A GGUF file served with llama.cpp (format ``gguf``), through llama-cpp-python's low-level
loop: ``Llama.eval(tokens)``, then the last logits row read in place with
``llama_get_logits_ith(ctx, -1)`` (n_vocab float32, no copy). Sampling, confidence, stop
strings and cancellation are :func:`tandem.runtime.generation.decode`'s, as for every backend.

Why not ``create_completion``: its log-probs need ``logits_all=True`` (an n_ctx × n_vocab
float32 array) and a full sort in Python per token; here a token's log-prob and entropy come
from one pass of the confidence kernel over the row that sampling reads anyway.

Concurrency: ``parallel`` llama.cpp contexts (``Llama`` objects) in a pool. llama.cpp mmaps
the weights, so the contexts share them through the page cache; each holds its own KV cache
(about ``n_ctx`` × layers × 2 × kv width × 2 bytes). A stream checks a context out and returns
it when it ends, is closed or cancelled, or raises; with none free the stream is refused with
:class:`OverloadedError`. A context keeps its KV cache between streams, and a new prompt that
starts with the tokens a context already holds reuses them (llama.cpp drops the cells past
``n_tokens`` at the next ``eval``): a hand-off's ``prompt + answer_so_far`` costs only the new
tokens.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import logging
import threading
from collections.abc import Callable, Generator, Sequence
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np

from tandem.runtime.backends.local import LocalStreams
from tandem.runtime.chat import ChatTemplate
from tandem.runtime.errors import BackendError, BadRequest, ConfigError, OverloadedError
from tandem.runtime.generation import (
    BackendStream,
    SamplingParams,
    TokenStep,
    check_fits,
    decode,
    token_confidence,
)
from tandem.runtime.manifest import sha256_file
from tandem.runtime.speculative import shared_prefix

GGUF_MAGIC = b"GGUF"
_PIECE_BUF = 64  # bytes; longer pieces are fetched again with the size llama.cpp asks for


class _Session:
    """One llama.cpp context as a :class:`~tandem.runtime.generation.SessionLease`. Rows from
    ``prefill``/``append`` are views of llama.cpp's logits buffer, valid until the next
    ``eval``; ``extend`` copies its rows out."""

    def __init__(self, llm: llama_cpp.Llama, release: Callable[[], None] | None = None) -> None:
        self.llm = llm
        self.n_vocab = llm.n_vocab()
        self._row: np.ndarray = np.empty(0, np.float32)
        self._addr: int | None = None
        self.rollback = not (
            llama_cpp.llama_model_is_recurrent(llm.model)
            or llama_cpp.llama_model_is_hybrid(llm.model)
        )
        self.release = release
        self.nbytes = _kv_bytes(llm)

    @property
    def cached_tokens(self) -> np.ndarray:
        return _evaluated(self.llm)

    def extend(self, tokens: Sequence[int], n_rows: int) -> np.ndarray:
        """Run ``tokens``; the rows after each of the last ``n_rows``, from one llama.cpp batch
        whose last ``n_rows`` tokens ask for logits (the tokens before them run first, as
        ``eval`` runs a prompt)."""
        llm, tokens = self.llm, [int(t) for t in tokens]
        if not 1 <= n_rows <= min(len(tokens), llm.n_batch):
            raise BadRequest(f"asked for {n_rows} logits rows of {len(tokens)} new tokens")
        if any(not 0 <= t < self.n_vocab for t in tokens):  # llama.cpp aborts on a bad id
            raise BadRequest(f"token ids must be in 0..{self.n_vocab - 1}")
        if llm.n_tokens + len(tokens) > llm.n_ctx():
            raise BadRequest(f"the context of {llm.n_ctx()} tokens is full")
        if not self.rollback:
            raise BackendError("this model's state cannot be rolled back (recurrent)")
        head, tail = tokens[: len(tokens) - n_rows], tokens[len(tokens) - n_rows :]
        try:
            if head:
                llm.eval(head)
            # Llama.eval asks for the last row only: the same steps, with every row asked for
            # (llama-cpp-python's own batch and context objects, as eval uses them)
            llm._ctx.kv_cache_seq_rm(-1, llm.n_tokens, -1)
            n_past = llm.n_tokens
            llm._batch.set_batch(batch=tail, n_past=n_past, logits_all=True)
            llm._ctx.decode(llm._batch)
        except RuntimeError as e:
            raise BackendError(f"llama.cpp decode failed: {e}") from None
        llm.input_ids[n_past : n_past + n_rows] = tail
        llm.n_tokens = n_past + n_rows
        rows = np.empty((n_rows, self.n_vocab), np.float32)
        for j in range(n_rows):
            ptr = llama_cpp.llama_get_logits_ith(llm.ctx, j)
            if not ctypes.cast(ptr, ctypes.c_void_p).value:
                raise BackendError(f"llama.cpp returned no logits for batch row {j}")
            rows[j] = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))
        return rows

    def truncate(self, n: int) -> None:
        self.llm.n_tokens = min(n, self.llm.n_tokens)  # the next eval drops the cells past it

    def close(self) -> None:
        release, self.release = self.release, None
        if release is not None:
            release()

    def prefill(self, tokens: Sequence[int]) -> np.ndarray:
        """Run ``tokens``, reusing the longest prefix this context already evaluated (at least
        the last token is run again: its logits row is not kept)."""
        keep = min(shared_prefix(self.cached_tokens, tokens), len(tokens) - 1)
        if not self.rollback and keep < self.llm.n_tokens:
            keep = 0  # a recurrent state cannot be rolled back part of the way
        self.llm.n_tokens = keep
        return self._eval(tokens[keep:])

    def append(self, token: int) -> np.ndarray:
        return self._eval((token,))

    def _eval(self, tokens: Sequence[int]) -> np.ndarray:
        try:
            self.llm.eval(tokens)
        except RuntimeError as e:
            raise BackendError(f"llama.cpp decode failed: {e}") from None
        ptr = llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        addr = ctypes.cast(ptr, ctypes.c_void_p).value
        if not addr:
            raise BackendError("llama.cpp returned no logits for the last token")
        if addr != self._addr:  # a view costs ~10 µs; the buffer rarely moves
            self._row, self._addr = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)), addr
        return self._row


def llama_kwargs(n_ctx: int, threads: int, options: dict[str, Any]) -> dict[str, Any]:
    """``Llama`` keyword arguments: ``n_ctx`` 0 for the trained context, ``threads`` 0 for
    llama.cpp's default, only the last row's logits kept by ``eval``; ``options`` win."""
    return {
        "n_ctx": n_ctx,
        "n_batch": min(n_ctx or 512, 512),
        "n_threads": threads or None,
        "n_threads_batch": threads or None,
        "logits_all": False,
        **options,
    }


def load_llama(path: Path, kwargs: dict[str, Any]) -> llama_cpp.Llama:
    """A ``Llama`` for ``path``, or :class:`BackendError` saying why it cannot load."""
    try:
        return llama_cpp.Llama(model_path=str(path), verbose=False, **kwargs)
    except ValueError:
        reason = _load_failure(path, kwargs)
    raise BackendError(f"cannot load GGUF model {path}: {reason}")


def usable_ctx(llm: llama_cpp.Llama, n_ctx: int) -> int:
    """The context a stream may use: ``n_ctx`` (0: the trained one), never past the trained
    context (llama.cpp rounds its own up to 256s; past the trained one the output is
    garbage)."""
    trained = llama_cpp.llama_model_n_ctx_train(llm.model) or llm.n_ctx()
    return min(n_ctx or trained, llm.n_ctx(), trained)


def _kv_bytes(llm: llama_cpp.Llama) -> int:
    """The KV cache a context holds (f16 keys and values for every layer and position)."""
    model = llm.model
    heads = max(llama_cpp.llama_model_n_head(model), 1)
    kv_width = llama_cpp.llama_model_n_embd(model) * llama_cpp.llama_model_n_head_kv(model) // heads
    return llm.n_ctx() * llama_cpp.llama_model_n_layer(model) * 2 * kv_width * 2


def _evaluated(llm: llama_cpp.Llama) -> np.ndarray:
    """The tokens ``llm`` has evaluated, in order (its KV cache holds them)."""
    return llm.input_ids[: llm.n_tokens]


class LlamaCppBackend(LocalStreams):
    """``path`` is a GGUF file. ``threads``: llama.cpp threads per context for prompt and
    decode (0: llama.cpp's default, half the cores); ``n_ctx``: tokens of context per stream
    (prompt + ``max_tokens`` must fit; 0: the context the model was trained with);
    ``parallel``: contexts in the pool, i.e. concurrent streams; ``chat_template``: a Jinja
    template to use instead of the file's ``tokenizer.chat_template``. Other keyword
    ``options`` go to ``Llama`` (e.g. ``n_gpu_layers``)."""

    def __init__(
        self,
        path: str | Path,
        *,
        name: str | None = None,
        version: str | None = None,
        threads: int = 1,
        n_ctx: int = 0,
        parallel: int = 1,
        chat_template: str | None = None,
        **options: object,
    ) -> None:
        if parallel < 1 or n_ctx < 0 or n_ctx == 1 or threads < 0:
            raise ConfigError(
                f"gguf backend: expected parallel >= 1, n_ctx 0 or >= 2, threads >= 0; "
                f"got {parallel}, {n_ctx}, {threads}"
            )
        self.path = Path(path)
        self.name = name or self.path.stem
        kwargs = llama_kwargs(n_ctx, threads, options)
        self._contexts = [load_llama(self.path, kwargs) for _ in range(parallel)]
        self._free = list(self._contexts)
        self._lock = threading.Lock()
        self._closed = False
        first = self._contexts[0]
        self.version = version or sha256_file(self.path)[:12]
        self.n_ctx = usable_ctx(first, n_ctx)
        self.parallel = parallel
        self.n_vocab = first.n_vocab()
        vocab = llama_cpp.llama_model_get_vocab(first.model)
        self._pieces = [_token_piece(vocab, t) for t in range(self.n_vocab)]
        self._eos = frozenset(
            t for t in (first.token_eos(), llama_cpp.llama_vocab_eot(vocab)) if t >= 0
        )
        # id -> text of the control tokens (their pieces are empty: token_to_piece leaves them out)
        self.control_tokens = {
            t: _token_text(vocab, t)
            for t in range(self.n_vocab)
            if not self._pieces[t] and llama_cpp.llama_vocab_is_control(vocab, t)
        }
        specials = {"bos_token": first.token_bos(), "eos_token": first.token_eos()}
        self.chat = ChatTemplate(
            chat_template or first.metadata.get("tokenizer.chat_template"),
            {k: _token_text(vocab, t) for k, t in specials.items() if t >= 0},
            control_texts=self.control_tokens.values(),
            source=f"model {self.name!r}" + (" (chat_template option)" if chat_template else ""),
        )

    @property
    def raw(self) -> llama_cpp.Llama:
        """The pool's first ``Llama``, for references such as ``create_completion``. Do not use
        it while a stream runs; streams notice the tokens it evaluated and reuse or drop
        them."""
        return self._contexts[0]

    def tokenize(self, text: str, *, special: bool = False) -> list[int]:
        """llama.cpp's tokens for ``text``, BOS first if the model adds one; with ``special``
        (a rendered chat template) control tokens are parsed and no BOS is added (the template
        writes its own), as llama-cpp-python's ``create_chat_completion`` tokenizes.
        :class:`BadRequest` if characters of ``text`` have no token (llama.cpp would drop them
        silently)."""
        if self._closed:
            raise BackendError(f"model {self.name!r} is closed")
        llm = self._contexts[0]
        ids = llm.tokenize(text.encode(), add_bos=not special, special=special)
        if special:
            back = llm.detokenize(ids, special=True).decode(errors="replace")
        else:
            back = b"".join(self._pieces[t] for t in ids).decode(errors="replace")
        if back != text and (lost := [c for c in dict.fromkeys(text) if c not in back]):
            raise BadRequest(
                f"model {self.name!r}: characters {''.join(lost)!r} are not in its vocabulary"
            )
        return self._non_empty(ids)

    def free_slots(self) -> int:
        """Contexts not in use (by a stream or a lease)."""
        with self._lock:
            return len(self._free)

    def lease(self, prompt: Sequence[int] = (), n_ctx: int | None = None) -> _Session:
        """A context of the pool held until ``close()`` (the free one sharing the longest
        prefix with ``prompt``; its cache is kept): a speculative-decoding session or a draft.
        ``n_ctx`` is ignored (contexts are made at load). :class:`OverloadedError` when every
        context is in use."""
        llm = self._checkout(prompt)
        return _Session(llm, lambda: self._checkin(llm))

    def _stream_ids(
        self, ids: list[int], params: SamplingParams, cancel: threading.Event | None
    ) -> BackendStream:
        check_fits(self.name, len(ids), params, self.n_ctx)
        llm = self._checkout(ids)
        steps = self._steps(llm, ids, params, cancel)
        next(steps)  # started, so close() or garbage collection runs its `finally`
        return BackendStream(steps, prompt_tokens=len(ids))  # type: ignore[arg-type]

    def _checkout(self, ids: Sequence[int]) -> llama_cpp.Llama:
        """The free context sharing the longest prefix with ``ids``."""
        with self._lock:
            if self._closed:
                raise BackendError(f"model {self.name!r} is closed")
            if not self._free:
                raise OverloadedError(
                    f"model {self.name!r} has all its {self.parallel} contexts in use by streams "
                    f"and speculative sessions (parallel={self.parallel})"
                )
            best = max(
                range(len(self._free)), key=lambda i: shared_prefix(_evaluated(self._free[i]), ids)
            )
            return self._free.pop(best)

    def _checkin(self, llm: llama_cpp.Llama) -> None:
        with self._lock:
            if self._closed:
                llm.close()
            else:
                self._free.append(llm)

    def _steps(
        self,
        llm: llama_cpp.Llama,
        ids: list[int],
        params: SamplingParams,
        cancel: threading.Event | None,
    ) -> Generator[TokenStep | None, None, str]:
        try:
            yield None  # the priming step stream() takes
            return (
                yield from decode(
                    _Session(llm),
                    ids,
                    params,
                    piece=self._pieces.__getitem__,
                    eos=self._eos,
                    cancel=cancel,
                )
            )
        finally:
            self._checkin(llm)

    def warm_up(self) -> None:
        """Run one token on every free context (first-call allocations, weight pages), and the
        confidence kernel once (its first call loads compiled code: ~0.3 s)."""
        with self._lock:
            free, self._free = self._free, []
        try:
            for llm in free:
                bos = llm.token_bos()
                llm.n_tokens = 0
                row = _Session(llm).prefill([bos if bos >= 0 else 0])
                token_confidence(row, 0)
        finally:
            for llm in free:
                self._checkin(llm)

    def close(self) -> None:
        """Free the contexts; those streams hold are freed when their stream ends."""
        with self._lock:
            self._closed = True
            free, self._free = self._free, []
        for llm in free:
            llm.close()


def _token_piece(vocab: llama_cpp.llama_vocab_p, token: int) -> bytes:
    """The bytes ``token`` adds to the text (b"" for control tokens); may be part of a UTF-8
    character, which the decode loop's incremental decoder completes. Read once per token at
    load: the table outlives the contexts, which a ``close()`` may free mid-stream."""
    buf = ctypes.create_string_buffer(_PIECE_BUF)
    n = llama_cpp.llama_token_to_piece(vocab, token, buf, _PIECE_BUF, 0, False)
    if n < 0:
        buf = ctypes.create_string_buffer(-n)
        n = llama_cpp.llama_token_to_piece(vocab, token, buf, -n, 0, False)
    return buf.raw[: max(n, 0)]


def _token_text(vocab: llama_cpp.llama_vocab_p, token: int) -> str:
    """A token's text as a template writes it (control tokens included)."""
    text = llama_cpp.llama_vocab_get_text(vocab, token)
    return text.decode(errors="replace") if text else ""


def _load_failure(path: Path, kwargs: dict) -> str:
    """Why ``Llama`` could not load ``path``: checked here, or from llama.cpp's own log (a load
    run again with ``verbose=True``; llama-cpp-python writes the log to ``sys.stderr``)."""
    if not path.exists():
        return "file missing"
    if not path.is_file():
        return "not a file"
    with open(path, "rb") as f:
        head = f.read(4)
    if head != GGUF_MAGIC:
        return f"not a GGUF file (starts with {head!r}, expected {GGUF_MAGIC!r})"
    logger = logging.getLogger("llama-cpp-python")
    level, log = logger.level, io.StringIO()
    try:
        with contextlib.redirect_stderr(log):
            llama_cpp.Llama(model_path=str(path), verbose=True, **kwargs).close()
    except ValueError as e:
        lines = [ln.strip() for ln in log.getvalue().splitlines()]
        why = [ln for ln in lines if "error" in ln.lower() or "fail" in ln.lower()]
        return "; ".join(why[-3:]) or str(e)
    finally:
        logger.setLevel(level)
    return "loading failed once, then succeeded (out of memory?)"
