"""A Hugging Face causal language model directory served with transformers (format
``transformers``): any ``AutoModelForCausalLM`` directory with its own tokenizer
(``tokenizer.json`` / SentencePiece, loaded offline; or a Tandem char tokenizer). The experts
of an MoE model (Mixtral, Qwen2-MoE, Qwen3-MoE: any whose transformers experts module takes
an experts implementation) run on Tandem's kernels (``experts_implementation="tandem"``).

Weights run in float32 on the CPU: a bf16/fp16 checkpoint is converted when it loads (CPU
half-precision matmuls are slower than float32 and round differently).

Each stream has its own KV cache, so concurrent streams share the weights and nothing else.
Llama, Mistral, Qwen2 and Mixtral models decode on :mod:`tandem.runtime.backends.fast_decode`
(plain torch over the model's weights, a static KV cache, the experts on Tandem's kernels)
unless ``decode="transformers"``; other architectures run transformers' forward with a
``DynamicCache``. The decode loop is :func:`tandem.runtime.generation.decode`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from tandem.runtime.backends.local import LocalStreams
from tandem.runtime.chat import ChatTemplate
from tandem.runtime.errors import BackendError, BadRequest, ConfigError, OverloadedError
from tandem.runtime.generation import (
    BackendStream,
    BatchItem,
    SamplingParams,
    SessionLease,
    check_fits,
    decode,
    run_one_by_one,
)
from tandem.runtime.tokenizer import load_tokenizer

if TYPE_CHECKING:
    from tandem.runtime.backends.fast_decode import FastDecoder

log = logging.getLogger(__name__)
DECODE_PATHS = ("fast", "transformers")


class _Session:
    """One sequence's KV cache in a transformers model (its own forward, a DynamicCache)."""

    def __init__(self, model: torch.nn.Module, n_ctx: int) -> None:
        self.model = model
        self.cache = None
        self.cached_tokens: list[int] = []
        cfg = model.config
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        kv = (getattr(cfg, "num_key_value_heads", None) or heads) * head_dim
        # what its DynamicCache holds when full (float32 keys and values, every layer)
        self.nbytes = n_ctx * cfg.num_hidden_layers * 2 * kv * 4
        self.release: Callable[[], None] | None = None

    @torch.inference_mode()
    def _run(self, ids: Sequence[int], n_rows: int = 1) -> np.ndarray:
        if self.cache is None:
            from transformers import DynamicCache

            self.cache = DynamicCache(config=self.model.config)
        out = self.model(
            input_ids=torch.tensor([list(ids)], dtype=torch.long),
            cache=self.cache,
            use_cache=True,
        )
        self.cache = out.cache
        self.cached_tokens.extend(int(t) for t in ids)
        return out.logits[0, -n_rows:].float().numpy()

    def prefill(self, tokens: Sequence[int]) -> np.ndarray:
        self.cache, self.cached_tokens = None, []
        return self._run(tokens)[0]

    def append(self, token: int) -> np.ndarray:
        return self._run((token,))[0]

    def extend(self, tokens: Sequence[int], n_rows: int) -> np.ndarray:
        n_vocab = self.model.config.vocab_size
        if any(not 0 <= int(t) < n_vocab for t in tokens):
            raise BadRequest(f"token ids must be in 0..{n_vocab - 1}")
        if not 1 <= n_rows <= len(tokens):
            raise BadRequest(f"asked for {n_rows} logits rows of {len(tokens)} new tokens")
        return self._run(tokens, n_rows).copy()

    def truncate(self, n: int) -> None:
        drop = len(self.cached_tokens) - n
        if drop > 0 and self.cache is not None:
            # a negative count removes that many tokens, in every transformers 5 (from 5.2x a
            # positive one is refused; before, it meant the length to keep)
            self.cache.crop(-drop)
        del self.cached_tokens[n:]

    def close(self) -> None:
        release, self.release = self.release, None
        if release is not None:
            release()


class TransformersBackend(LocalStreams):
    """``path`` is a directory written by ``save_pretrained``, with its tokenizer.

    ``experts``: transformers' experts implementation for MoE models (``"tandem"``: Tandem's
    dispatch/combine kernels; ``"eager"``, ``"grouped_mm"``: transformers' own).
    ``max_streams``: concurrent streams (each holds a KV cache); one more is refused with
    :class:`OverloadedError`.
    ``decode``: ``"fast"`` (default) runs Llama/Mixtral models on
    :class:`~tandem.runtime.backends.fast_decode.FastDecoder` — same logits, several times
    fewer Python operations per token; other architectures fall back to ``"transformers"``
    (the model's own forward with a ``DynamicCache``). ``self.decode`` says which is in use.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        name: str | None = None,
        version: str | None = None,
        threads: int = 0,
        experts: str = "tandem",
        max_streams: int = 8,
        decode: str = "fast",
        chat_template: str | None = None,
    ) -> None:
        from transformers import AutoModelForCausalLM

        import tandem.runtime.moe  # noqa: F401 - registers the "tandem" experts implementation

        self.path = Path(path)
        self.name = name or self.path.name
        self.tokenizer = load_tokenizer(self.path)
        if threads:
            torch.set_num_threads(threads)
        try:
            model = AutoModelForCausalLM.from_pretrained(self.path, dtype=torch.float32)
        except (OSError, ValueError) as e:
            raise BackendError(f"cannot load transformers model {self.path}: {e}") from None
        cfg = model.config
        if getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None):
            model.set_experts_implementation(experts)  # Mixtral, Qwen2-MoE, Qwen3-MoE...
        self.model = model.eval()
        # the embedding may be padded past the tokenizer's ids (Qwen2: 151,936 vs 151,665)
        self.n_vocab = int(model.config.vocab_size)
        if self.tokenizer.n_vocab > self.n_vocab:
            raise BackendError(
                f"{self.path}: the tokenizer has {self.tokenizer.n_vocab} tokens, the model's "
                f"vocab_size is {self.n_vocab}"
            )
        self.version = version or _dir_version(self.path)
        self.n_ctx = int(getattr(model.config, "max_position_embeddings", 2048))
        self._fast = self._fast_decoder(decode)
        self.decode = "fast" if self._fast is not None else "transformers"
        self._pieces = [self.tokenizer.piece(t) for t in range(self.n_vocab)]
        self._eos = self.tokenizer.eos_tokens
        self.control_tokens = self.tokenizer.control_tokens
        self.chat = ChatTemplate(
            chat_template or self.tokenizer.chat_template,
            self.tokenizer.special_tokens,
            control_texts=self.control_tokens.values(),
            source=f"model {self.name!r}" + (" (chat_template option)" if chat_template else ""),
        )
        self._slots = threading.BoundedSemaphore(max_streams)
        self.max_streams = max_streams

    def _fast_decoder(self, decode: str) -> FastDecoder | None:
        if decode not in DECODE_PATHS:
            raise ConfigError(f"decode: expected one of {DECODE_PATHS}, got {decode!r}")
        if decode == "transformers":
            return None
        from tandem.runtime.backends.fast_decode import FastDecoder, unsupported_reason

        reason = unsupported_reason(self.model)
        if reason is not None:
            log.info(
                "model %s decodes with transformers' forward: %s",
                self.name,
                reason,
                extra={"model": self.name, "reason": reason},
            )
            return None
        decoder = FastDecoder(self.model)
        self.n_ctx = decoder.n_ctx
        return decoder

    def session(self, n_ctx: int | None = None) -> SessionLease:
        """A new sequence's state: a static-cache :class:`FastSession` for ``n_ctx`` tokens
        (default the model's context), or transformers' forward with a DynamicCache."""
        if self._fast is not None:
            return self._fast.session(n_ctx)
        return _Session(self.model, min(n_ctx or self.n_ctx, self.n_ctx))

    def tokenize(self, text: str, *, special: bool = False) -> list[int]:
        """Token ids of ``text`` (see :meth:`tandem.runtime.tokenizer.Tokenizer.encode`)."""
        ids = self.tokenizer.encode(text, special=special)
        return self._non_empty(ids)

    def free_slots(self) -> int:
        """Sequences that can still start (streams and leases share ``max_streams``)."""
        return self._slots._value  # a BoundedSemaphore keeps no public count

    def lease(self, prompt: Sequence[int] = (), n_ctx: int | None = None) -> SessionLease:
        """A new sequence (a KV cache for ``n_ctx`` tokens, default the model's context) held
        until ``close()``, one of ``max_streams``: a speculative-decoding session or a draft.
        :class:`OverloadedError` when all are in use."""
        if not self._slots.acquire(blocking=False):
            raise OverloadedError(
                f"model {self.name!r} has all its {self.max_streams} sequences in use by streams "
                "and speculative sessions (max_streams)"
            )
        try:
            session = self.session(n_ctx)
        except BaseException:
            self._slots.release()
            raise
        session.release = self._slots.release
        return session

    def run_batch(self, work: Sequence[BatchItem]) -> list[np.ndarray]:
        """:class:`~tandem.runtime.generation.BatchedBackend`: the fast path runs every
        sequence in one pass (:func:`~tandem.runtime.backends.fast_decode.run_sessions`);
        transformers' forward runs them one after another."""
        if self._fast is not None:
            from tandem.runtime.backends.fast_decode import run_sessions

            return run_sessions(self._fast, work)  # type: ignore[arg-type]
        return run_one_by_one(work)

    def _stream_ids(
        self, ids: list[int], params: SamplingParams, cancel: threading.Event | None
    ) -> BackendStream:
        check_fits(self.name, len(ids), params, self.n_ctx)
        if not self._slots.acquire(blocking=False):
            raise OverloadedError(
                f"model {self.name!r} is serving {self.max_streams} streams already"
            )
        steps = self._steps(ids, params, cancel)
        next(steps)  # started, so close() or garbage collection runs its `finally`
        return BackendStream(steps, prompt_tokens=len(ids))

    def _steps(self, ids, params, cancel):
        try:
            yield None  # the priming step stream() takes
            return (
                yield from decode(
                    self.session(len(ids) + params.max_tokens),
                    ids,
                    params,
                    piece=self._pieces.__getitem__,
                    eos=self._eos,
                    cancel=cancel,
                )
            )
        finally:
            self._slots.release()

    def warm_up(self) -> None:
        """Tune the fast path's products for every batch a worker's engine steps (a decode
        row per stream, up to a prompt chunk), then run a token."""
        if self._fast is not None:
            self._fast.tune([*range(1, 65), 256])
        first = next((t for t in range(self.n_vocab) if self._pieces[t].strip()), 0)
        for _ in self._stream_ids([first], SamplingParams(max_tokens=2), None):
            pass

    def close(self) -> None:
        pass


def _dir_version(path: Path) -> str:
    from tandem.runtime.manifest import sha256_file

    weights = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    if not weights:
        raise BackendError(f"{path}: no *.safetensors weights")
    return sha256_file(weights[0])[:12]
