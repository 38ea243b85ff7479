"""A small GGUF model as llama-cpp-python's draft model: speculative decoding on one host.

Why: ``Llama(model_path, draft_model=...)`` verifies draft tokens in the target (it evaluates
the last token plus the draft in one batch and keeps the drafted tokens that equal its own
picks), but llama-cpp-python ships only one draft model, :class:`LlamaPromptLookupDecoding`
(n-gram lookup in the prompt). A draft backed by a second, smaller GGUF model is an open
request there (abetlen/llama-cpp-python#1865). :class:`GGUFDraftModel` is that draft: a device
holding a small and a large model of one family (the same vocabulary) drafts with the small
one::

    draft = GGUFDraftModel("edge-q8_0.gguf", num_pred_tokens=4, threads=2)
    target = llama_cpp.Llama("cloud-f16.gguf", draft_model=draft, n_threads=2)
    target.create_completion(prompt, temperature=0, max_tokens=64)

The target's output does not change: greedy output with a draft is the greedy output without
one (the target accepts a drafted token only where it would have picked it). With a draft,
llama-cpp-python evaluates the target with ``logits_all=True``, which copies every evaluated
token's logits row into Python; that is the price of verification.

Each call greedily drafts up to ``num_pred_tokens`` tokens continuing ``input_ids`` in the
small model. Its KV cache is kept between calls (:class:`_EvalSession`, ``Llama.eval`` from
the longest prefix the cache shares): the target's next input is the previous input, the
accepted draft tokens and one token of its own, so a call evaluates only the tokens that are
new to the small model (plus the draft steps).
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
import numpy.typing as npt
from llama_cpp.llama_speculative import LlamaDraftModel

from tandem.runtime.backends.llamacpp import llama_kwargs, load_llama, usable_ctx
from tandem.runtime.errors import BackendError, ConfigError
from tandem.runtime.speculative import shared_prefix

__all__ = ["GGUFDraftModel"]

_EMPTY = np.empty(0, dtype=np.intc)


class _EvalSession:
    """A ``Llama``'s one sequence as a :class:`~tandem.runtime.generation.LogitsSession`:
    ``Llama.eval``, then the last logits row read in place (a view of llama.cpp's buffer,
    valid until the next ``eval``)."""

    def __init__(self, llm: llama_cpp.Llama) -> None:
        self.llm = llm
        self.n_vocab = llm.n_vocab()
        self._row: np.ndarray = np.empty(0, np.float32)
        self._addr: int | None = None
        self.rollback = not (
            llama_cpp.llama_model_is_recurrent(llm.model)
            or llama_cpp.llama_model_is_hybrid(llm.model)
        )

    def prefill(self, tokens: Sequence[int]) -> np.ndarray:
        """Run ``tokens``, reusing the longest prefix the context already evaluated (at least
        the last token is run again: its logits row is not kept)."""
        held = self.llm.input_ids[: self.llm.n_tokens]
        keep = min(shared_prefix(held, tokens), len(tokens) - 1)
        if not self.rollback and keep < self.llm.n_tokens:
            keep = 0  # a recurrent state cannot be rolled back part of the way
        self.llm.n_tokens = keep  # the next eval drops the cells past it
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


class GGUFDraftModel(LlamaDraftModel):
    """Drafts with the GGUF model at ``path``, which must share the target's vocabulary (the
    same token ids; compare ``n_vocab`` with the target's ``n_vocab()``).

    ``num_pred_tokens``: tokens drafted per call, at most (γ; an attribute, may be changed
    between calls). ``threads``: llama.cpp threads for prompt and decode (0: llama.cpp's
    default, half the cores). ``n_ctx``: tokens of context (0: the context the model was
    trained with; never more than that). Other keyword ``options`` go to ``Llama`` (e.g.
    ``n_gpu_layers``).

    One call at a time: it is the draft of one target ``Llama``.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        num_pred_tokens: int = 4,
        threads: int = 1,
        n_ctx: int = 0,
        **options: Any,
    ) -> None:
        if num_pred_tokens < 1 or n_ctx < 0 or n_ctx == 1 or threads < 0:
            raise ConfigError(
                f"GGUF draft model: expected num_pred_tokens >= 1, n_ctx 0 or >= 2, "
                f"threads >= 0; got {num_pred_tokens}, {n_ctx}, {threads}"
            )
        self.path = Path(path)
        self.num_pred_tokens = num_pred_tokens
        llm = load_llama(self.path, llama_kwargs(n_ctx, threads, options))
        self._llm: llama_cpp.Llama | None = llm
        self._session = _EvalSession(llm)
        self._vocab = llama_cpp.llama_model_get_vocab(llm.model)
        self.n_ctx = usable_ctx(llm, n_ctx)
        self.n_vocab = llm.n_vocab()

    @property
    def llm(self) -> llama_cpp.Llama:
        """The small model's ``Llama`` (its ``n_tokens`` are the tokens its KV cache holds)."""
        if self._llm is None:
            raise self._closed()
        return self._llm

    def _closed(self) -> BackendError:
        return BackendError(f"draft model {self.path.name!r} is closed")

    def __call__(self, input_ids: npt.NDArray[np.intc], /, **kwargs: Any) -> npt.NDArray[np.intc]:
        """Up to ``num_pred_tokens`` greedy tokens continuing ``input_ids``: fewer if the small
        model picks an end-of-generation token (not returned), or if the context has room
        for fewer (none when ``input_ids`` fill it); none for empty ``input_ids``.

        Example, γ = 4, a context of 8 tokens: ``[1, 5, 9]`` → ``[4, 4, 7, 3]`` (the small
        model's greedy picks; it evaluates 3 tokens, then 3 single draft steps). Then
        ``[1, 5, 9, 4, 4, 8]`` (two drafted tokens accepted, then the target's own 8) →
        ``[6, 0]``, two tokens as the context has room for two more; it evaluates only
        ``[8]`` and one draft step. Then ``[1, 5, 9, 4, 4, 8, 6, 0]`` → ``[]``, evaluating
        nothing: the input fills the context."""
        if self._llm is None:
            raise self._closed()
        n = len(input_ids)
        k = min(self.num_pred_tokens, self.n_ctx - n)
        if n == 0 or k <= 0:
            return _EMPTY
        row = self._session.prefill(np.asarray(input_ids).tolist())
        out: list[int] = []
        while True:
            token = int(row.argmax())  # llama.cpp's greedy pick: the first of equal maxima
            if llama_cpp.llama_vocab_is_eog(self._vocab, token):
                break
            out.append(token)
            if len(out) == k:
                break
            row = self._session.append(token)
        return np.array(out, dtype=np.intc)

    def close(self) -> None:
        """Free the small model's context and weights; later calls raise
        :class:`BackendError`."""
        llm, self._llm = self._llm, None
        if llm is not None:
            llm.close()

    def __enter__(self) -> GGUFDraftModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
