"""A GGUF file served with llama.cpp (format ``gguf``), through llama-cpp-python's low-level
API: one model, one context whose KV cache holds ``parallel`` sequences
(:mod:`tandem.runtime.backends.llama_batch`: sequence slots, prefix reuse across sequences,
batches over many sequences, locking). A stream's step runs its token and reads the last
logits row (``llama_get_logits_ith(ctx, -1)``, n_vocab float32); sampling, confidence, stop
strings and cancellation are :func:`tandem.runtime.generation.decode`'s, as for every backend.

Why not ``create_completion``: its log-probs need ``logits_all=True`` (an n_ctx × n_vocab
float32 array) and a full sort in Python per token; here a token's log-prob and entropy come
from one pass of the confidence kernel over the row that sampling reads anyway. Why not
``llama_cpp.Llama`` at all: it makes a context of one sequence; ``parallel`` of them would
each hold their own KV cache and compute buffers, and could not run one batch together.

Concurrency: ``parallel`` sequences of ``n_ctx`` tokens each, in one context of
``parallel × n_ctx`` cells (the weights once; RSS measured by ``benchmarks/llm/gguf_memory.py``).
A stream or a lease (:meth:`LlamaCppBackend.lease`: a speculative-decoding session, a draft)
holds one sequence until it ends, is closed or cancelled, or raises; with none free it is
refused with :class:`OverloadedError`. A sequence keeps its tokens when it is returned, and a
new prompt starts with the longest prefix any sequence holds (its own, or copied from another
with ``llama_memory_seq_cp``): a hand-off's ``prompt + answer_so_far``, or a fleet's shared
system prompt, costs only the new tokens. Streams on several threads take turns on the
context, one decode at a time; the worker's engine batches every sequence's step into one
decode with :meth:`LlamaCppBackend.run_batch`.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import logging
import os
import threading
from collections.abc import Callable, Generator, Sequence
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
from llama_cpp._internals import LlamaModel

from tandem.runtime.backends.llama_batch import LlamaSequences, SequenceLease
from tandem.runtime.backends.local import LocalStreams
from tandem.runtime.chat import ChatTemplate
from tandem.runtime.errors import BackendError, BadRequest, ConfigError, OverloadedError
from tandem.runtime.generation import (
    BackendStream,
    BatchItem,
    SamplingParams,
    TokenStep,
    check_fits,
    decode,
    token_confidence,
)
from tandem.runtime.manifest import sha256_file

GGUF_MAGIC = b"GGUF"
_PIECE_BUF = 64  # bytes; longer pieces are fetched again with the size llama.cpp asks for


# options Tandem sets from the backend's own arguments (n_ctx, parallel, threads)
_OWNED = frozenset({"n_ctx", "n_seq_max", "n_threads", "n_threads_batch"})
_MMAP_MODES = {  # (use_mmap, use_mlock) → load mode, as llama_cpp.Llama maps them
    (True, False): llama_cpp.LLAMA_LOAD_MODE_MMAP,
    (True, True): llama_cpp.LLAMA_LOAD_MODE_MMAP_MLOCK,
    (False, True): llama_cpp.LLAMA_LOAD_MODE_MLOCK,
    (False, False): llama_cpp.LLAMA_LOAD_MODE_NONE,
}
_backend_ready = False


def llama_params(
    options: dict[str, Any], *, n_seq: int, threads: int
) -> tuple[llama_cpp.llama_model_params, llama_cpp.llama_context_params]:
    """llama.cpp's model and context parameters (``n_ctx`` and ``n_batch`` are set later,
    once the trained context is known). Defaults are ``llama_cpp.Llama``'s: weights mmapped,
    on the CPU; ``threads`` 0: half the cores for decode, all for prompts. ``options`` may set
    any field of ``llama_model_params`` or ``llama_context_params`` by name (``n_gpu_layers``,
    ``type_k``, ``type_v``, ``n_batch``, ``n_ubatch``, ``kv_unified``, ``swa_full`` …) and
    ``Llama``'s ``flash_attn``, ``use_mmap`` and ``use_mlock``; anything else is a
    :class:`ConfigError`."""
    model = llama_cpp.llama_model_default_params()
    model.n_gpu_layers = 0
    ctx = llama_cpp.llama_context_default_params()
    ctx.n_seq_max = n_seq
    ctx.n_batch = ctx.n_ubatch = 512  # Llama's
    ctx.kv_unified = True
    ctx.flash_attn_type = (
        llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        if n_seq > 1
        else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    )
    cores = os.cpu_count() or 1
    ctx.n_threads = threads or max(cores // 2, 1)
    ctx.n_threads_batch = threads or cores
    mmap = (bool(options.get("use_mmap", True)), bool(options.get("use_mlock", False)))
    model.load_mode = _MMAP_MODES[mmap]
    model_fields = {name for name, _ in model._fields_}
    ctx_fields = {name for name, _ in ctx._fields_}
    for name, value in options.items():
        try:
            if name in ("use_mmap", "use_mlock"):
                continue
            if name == "flash_attn":
                on = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
                ctx.flash_attn_type = on if value else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
            elif name == "n_gpu_layers":
                model.n_gpu_layers = 0x7FFFFFFF if value == -1 else value  # -1: every layer
            elif name in _OWNED:
                raise ConfigError(
                    f"gguf backend: option {name!r} is set from n_ctx, parallel and threads"
                )
            elif name in model_fields:
                setattr(model, name, value)
            elif name in ctx_fields:
                setattr(ctx, name, value)
            else:
                raise ConfigError(
                    f"gguf backend: unknown option {name!r}; expected a field of llama.cpp's "
                    "llama_model_params or llama_context_params, flash_attn, use_mmap or "
                    "use_mlock"
                )
        except TypeError as e:
            raise ConfigError(f"gguf backend: option {name}={value!r}: {e}") from None
    return model, ctx


def load_model(
    path: str, params: llama_cpp.llama_model_params, *, verbose: bool = False
) -> LlamaModel:
    """The weights at ``path`` (``ValueError`` if llama.cpp cannot load them). llama.cpp's
    log is quiet below errors unless ``verbose``, as with ``Llama(verbose=...)``."""
    global _backend_ready
    logging.getLogger("llama-cpp-python").setLevel(logging.DEBUG if verbose else logging.ERROR)
    if not _backend_ready:
        llama_cpp.llama_backend_init()
        _backend_ready = True
    return LlamaModel(path_model=path, params=params, verbose=verbose)


def llama_kwargs(n_ctx: int, threads: int, options: dict[str, Any]) -> dict[str, Any]:
    """``llama_cpp.Llama`` keyword arguments (a draft model, :attr:`LlamaCppBackend.raw`):
    ``n_ctx`` 0 for the trained context, ``threads`` 0 for llama.cpp's default, only the last
    row's logits kept by ``eval``; ``options`` win."""
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
        reason = _load_failure(
            path, lambda: llama_cpp.Llama(model_path=str(path), verbose=True, **kwargs)
        )
    raise BackendError(f"cannot load GGUF model {path}: {reason}")


def trained_ctx(model: llama_cpp.llama_model_p, n_ctx: int) -> int:
    """The context a sequence may use: ``n_ctx`` (0: the trained one), never past the trained
    context (past it the output is garbage)."""
    trained = llama_cpp.llama_model_n_ctx_train(model)
    return min(n_ctx or trained, trained) if trained > 0 else n_ctx or 512


def usable_ctx(llm: llama_cpp.Llama, n_ctx: int) -> int:
    """:func:`trained_ctx`, and never past ``llm``'s own context (llama.cpp rounds it up to
    256s)."""
    return min(trained_ctx(llm.model, n_ctx), llm.n_ctx())


class LlamaCppBackend(LocalStreams):
    """``path`` is a GGUF file. ``threads``: llama.cpp threads for prompt and decode (0:
    llama.cpp's default, half the cores for decode); ``n_ctx``: tokens of context per
    sequence (prompt + ``max_tokens`` must fit; 0: the context the model was trained with);
    ``parallel``: sequences in the one context, i.e. concurrent streams and leases;
    ``chat_template``: a Jinja template to use instead of the file's
    ``tokenizer.chat_template``. Other keyword ``options`` set llama.cpp's model and context
    parameters (:func:`llama_params`: e.g. ``n_gpu_layers``, ``type_k``, ``flash_attn``,
    ``kv_unified``)."""

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
        most = llama_cpp.llama_max_parallel_sequences()
        if not 1 <= parallel <= most or n_ctx < 0 or n_ctx == 1 or threads < 0:
            raise ConfigError(
                f"gguf backend: expected parallel 1..{most}, n_ctx 0 or >= 2, threads >= 0; "
                f"got {parallel}, {n_ctx}, {threads}"
            )
        self.path = Path(path)
        self.name = name or self.path.stem
        self._threads, self._options = threads, dict(options)
        model_params, ctx_params = llama_params(self._options, n_seq=parallel, threads=threads)
        try:
            model = load_model(str(self.path), model_params)
        except ValueError:
            reason = _load_failure(
                self.path, lambda: load_model(str(self.path), model_params, verbose=True)
            )
            raise BackendError(f"cannot load GGUF model {self.path}: {reason}") from None
        self.n_ctx = trained_ctx(model.model, n_ctx)
        try:
            self._seqs = LlamaSequences(
                model, ctx_params, n_seq=parallel, n_ctx=self.n_ctx, name=self.name
            )
        except ValueError as e:
            model.close()
            raise BackendError(
                f"cannot make a llama.cpp context of {parallel} × {self.n_ctx} tokens for "
                f"{self.path} (out of memory?): {e}"
            ) from None
        self._model = model
        self._lock = threading.Lock()  # guards _raw and _closed
        self._raw: llama_cpp.Llama | None = None
        self._closed = False
        self.version = version or sha256_file(self.path)[:12]
        self.parallel = parallel
        self.n_vocab = model.n_vocab()
        vocab = model.vocab
        self._pieces = [_token_piece(vocab, t) for t in range(self.n_vocab)]
        self._eos = frozenset(t for t in (model.token_eos(), model.token_eot()) if t >= 0)
        # id -> text of the control tokens (their pieces are empty: token_to_piece leaves them out)
        self.control_tokens = {
            t: _token_text(vocab, t)
            for t in range(self.n_vocab)
            if not self._pieces[t] and llama_cpp.llama_vocab_is_control(vocab, t)
        }
        specials = {"bos_token": model.token_bos(), "eos_token": model.token_eos()}
        self.chat = ChatTemplate(
            chat_template or model.metadata().get("tokenizer.chat_template"),
            {k: _token_text(vocab, t) for k, t in specials.items() if t >= 0},
            control_texts=self.control_tokens.values(),
            source=f"model {self.name!r}" + (" (chat_template option)" if chat_template else ""),
        )

    @property
    def raw(self) -> llama_cpp.Llama:
        """A plain ``llama_cpp.Llama`` over the same file, for references such as
        ``create_completion``: its own context of ``n_ctx`` tokens, loaded on first use (the
        weights mapped a second time) and closed with the backend. Streams and leases never
        touch it, nor it them."""
        with self._lock:
            if self._closed:
                raise BackendError(f"model {self.name!r} is closed")
            if self._raw is None:
                kwargs = llama_kwargs(self.n_ctx, self._threads, self._options)
                self._raw = load_llama(self.path, kwargs)
            return self._raw

    def tokenize(self, text: str, *, special: bool = False) -> list[int]:
        """llama.cpp's tokens for ``text``, BOS first if the model adds one; with ``special``
        (a rendered chat template) control tokens are parsed and no BOS is added (the template
        writes its own), as llama-cpp-python's ``create_chat_completion`` tokenizes.
        :class:`BadRequest` if characters of ``text`` have no token (llama.cpp would drop them
        silently)."""
        if self._closed:
            raise BackendError(f"model {self.name!r} is closed")
        ids = self._model.tokenize(text.encode(), add_bos=not special, special=special)
        if special:
            back = self._model.detokenize(ids, special=True).decode(errors="replace")
        else:
            back = b"".join(self._pieces[t] for t in ids).decode(errors="replace")
        if back != text and (lost := [c for c in dict.fromkeys(text) if c not in back]):
            raise BadRequest(
                f"model {self.name!r}: characters {''.join(lost)!r} are not in its vocabulary"
            )
        return self._non_empty(ids)

    def free_slots(self) -> int:
        """Sequences not in use (by a stream or a lease)."""
        return self._seqs.free_slots()

    def lease(self, prompt: Sequence[int] = (), n_ctx: int | None = None) -> SequenceLease:
        """A sequence held until ``close()``, starting with the longest prefix of ``prompt``
        that any sequence holds: a speculative-decoding session or a draft. ``n_ctx``: the
        tokens it may hold (default and at most the backend's). :class:`OverloadedError` when
        every sequence is in use."""
        return self._seqs.lease(prompt, min(n_ctx or self.n_ctx, self.n_ctx))

    def run_batch(self, work: Sequence[BatchItem]) -> list[np.ndarray]:
        """One llama.cpp batch over several leases (see
        :meth:`tandem.runtime.generation.BatchedBackend.run_batch`)."""
        return self._seqs.run_batch(work)

    def _stream_ids(
        self, ids: list[int], params: SamplingParams, cancel: threading.Event | None
    ) -> BackendStream:
        check_fits(self.name, len(ids), params, self.n_ctx)
        lease = self._seqs.lease(ids, self.n_ctx)
        steps = self._steps(lease, ids, params, cancel)
        next(steps)  # started, so close() or garbage collection runs its `finally`
        return BackendStream(steps, prompt_tokens=len(ids))  # type: ignore[arg-type]

    def _steps(
        self,
        lease: SequenceLease,
        ids: list[int],
        params: SamplingParams,
        cancel: threading.Event | None,
    ) -> Generator[TokenStep | None, None, str]:
        try:
            yield None  # the priming step stream() takes
            return (
                yield from decode(
                    lease,
                    ids,
                    params,
                    piece=self._pieces.__getitem__,
                    eos=self._eos,
                    cancel=cancel,
                )
            )
        finally:
            lease.close()

    def warm_up(self) -> None:
        """Run a BOS token on every empty free sequence, in one batch (first-call allocations,
        weight pages; later prompts keep it), and the confidence kernel once (its first call
        loads compiled code: ~0.3 s)."""
        leases: list[SequenceLease] = []
        try:
            with contextlib.suppress(OverloadedError):
                while len(leases) < self.parallel:
                    leases.append(self.lease())
            bos = self._model.token_bos()
            work = [(s, [max(bos, 0)], 1) for s in leases if not len(s.cached_tokens)]
            self.run_batch(work)
        finally:
            for lease in leases:
                lease.close()
        token_confidence(np.zeros(self.n_vocab, np.float32), 0)

    def close(self) -> None:
        """Free the context and the weights; if streams or leases hold sequences, when the
        last of them is returned."""
        with self._lock:
            self._closed = True
            raw, self._raw = self._raw, None
        if raw is not None:
            raw.close()
        self._seqs.close()


def _token_piece(vocab: llama_cpp.llama_vocab_p, token: int) -> bytes:
    """The bytes ``token`` adds to the text (b"" for control tokens); may be part of a UTF-8
    character, which the decode loop's incremental decoder completes. Read once per token at
    load: the table outlives the context, which a ``close()`` may free mid-stream."""
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


def _load_failure(path: Path, retry: Callable[[], Any]) -> str:
    """Why llama.cpp could not load ``path``: checked here, or from llama.cpp's own log (the
    load run again by ``retry`` with its log on; llama-cpp-python writes it to
    ``sys.stderr``)."""
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
            retry().close()
    except ValueError as e:
        lines = [ln.strip() for ln in log.getvalue().splitlines()]
        why = [ln for ln in lines if "error" in ln.lower() or "fail" in ln.lower()]
        return "; ".join(why[-3:]) or str(e)
    finally:
        logger.setLevel(level)
    return "loading failed once, then succeeded (out of memory?)"
