"""One llama.cpp context whose KV cache holds ``n_seq`` sequences, and the leases on them: the
engine of the ``gguf`` backend (:class:`~tandem.runtime.backends.llamacpp.LlamaCppBackend`)
with ``parallel: N``.

One model and one context with ``n_seq_max = N``; sequence ids ``0..N-1`` are the slots that
streams and leases take (:class:`SequenceLease`). Every sequence may hold ``n_ctx`` tokens
at once: the context has ``N × n_ctx`` cells, and Tandem refuses a step past a lease's
``n_ctx`` (:class:`BadRequest`, "context full"), so llama.cpp never runs out of cells.

**Unified KV cache** (``kv_unified``; llama.cpp's server does the same when it picks the slot
count itself). Why: a batch mixing sequences of different lengths (decode rows, a verify
round, a prefill chunk) runs as one ubatch, where per-sequence buffers make llama.cpp split
it into ubatches of equal length per sequence; and ``llama_memory_seq_cp`` of a prefix only
tags cells, so a prefix taken from another sequence costs no copy and no memory (per-sequence
buffers copy a whole buffer, and only whole). The price: attention spans every cell in use.
So flash attention is on for ``N > 1``: its kernel skips masked blocks, and it never holds
the ``n_ubatch × N·n_ctx`` scores (the compute buffer for 8 × 1024 cells: 20 MiB, 151 MiB
without). It accumulates in the cache's type (f16): a row moves by ~1e-3 relative with the
layout of the cells it reads. Measured on a 25M-param Llama, 1 thread, AMD EPYC (a busy
machine): 5+1+1+1 tokens over 4 sequences 13.5 ms (split per sequence: 20 ms); one decode
step beside 3 sequences of 100 tokens 3.4 ms (6.1 ms without flash attention, 3.5 ms with
per-sequence buffers). ``N = 1`` keeps the settings of a plain ``llama_cpp.Llama`` (no flash
attention). The options ``kv_unified: false`` and ``flash_attn: false`` override this.

**Prefix reuse.** A lease takes the free sequence whose tokens share the longest prefix with
its prompt, and keeps them; when another sequence, in use or free, shares a longer one
(robots of a fleet share a system prompt), that prefix is copied (``llama_memory_seq_cp``)
into the free sequence that shares least, the least recently freed of those. Only the rest
of the prompt runs. Recurrent and hybrid models cannot roll a state back part of the way:
they keep a sequence's own state only where it is a prefix of the new prompt, never copy,
and are emptied where a cut or a failed decode would need part of a state.

**Locking.** One lock guards the context and the table of sequences: each ``llama_decode``
(a stream's step, a prefill chunk, a whole :meth:`LlamaSequences.run_batch`), each memory
call, each lease taken or returned. Streams on several threads interleave step by step
(correct, not batched); the worker's engine batches through ``run_batch``. With ``N = 1`` a
step's logits row is a view of llama.cpp's buffer (no copy: no other sequence can decode
before the caller reads it); with ``N > 1`` it is copied into the lease's own row while the
lock is held. A failed decode removes the cells it wrote past each sequence's tokens.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Sequence

import llama_cpp
import numpy as np
from llama_cpp._internals import LlamaContext, LlamaModel

from tandem.runtime.errors import BackendError, BadRequest, OverloadedError
from tandem.runtime.generation import BatchItem
from tandem.runtime.speculative import shared_prefix


class _Batch:
    """A ``llama_batch`` over numpy arrays of ``n`` rows, one sequence id a row: a batch is
    filled with slice assignments, not a ctypes store per field and token."""

    def __init__(self, n: int) -> None:
        self.token = np.zeros(n, np.int32)
        self.pos = np.zeros(n, np.int32)
        self.seq = np.zeros(n, np.int32)
        self.logits = np.zeros(n, np.int8)
        self._n_seq_id = np.ones(n, np.int32)
        seq_p = ctypes.POINTER(llama_cpp.llama_seq_id)
        base = self.seq.ctypes.data
        self._seq_ids = (seq_p * n)(*(ctypes.cast(base + 4 * i, seq_p) for i in range(n)))
        self.c = llama_cpp.llama_batch(
            n_tokens=0,
            token=self.token.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token)),
            embd=None,
            pos=self.pos.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_pos)),
            n_seq_id=self._n_seq_id.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)),
            seq_id=self._seq_ids,
            logits=self.logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8)),
        )


class SequenceLease:
    """One sequence of a :class:`LlamaSequences`, held until :meth:`close` (a
    :class:`~tandem.runtime.generation.SessionLease`): a stream's, a speculative-decoding
    session's or a draft's. ``limit``: the tokens it may hold; ``nbytes``: its share of the KV
    cache (``limit`` cells). Rows from ``prefill``/``append`` are valid until its next call;
    ``extend`` copies its rows out. Used by one thread at a time."""

    __slots__ = ("closed", "limit", "nbytes", "owner", "row", "seq")

    def __init__(self, owner: LlamaSequences, seq: int, limit: int) -> None:
        self.owner = owner
        self.seq = seq
        self.limit = limit
        self.nbytes = limit * owner.cell_bytes
        self.closed = False
        self.row = np.empty(owner.n_vocab, np.float32) if owner.n_seq > 1 else None

    @property
    def cached_tokens(self) -> np.ndarray:
        return self.owner.held(self.seq)

    def prefill(self, tokens: Sequence[int]) -> np.ndarray:
        """Run ``tokens``, keeping the longest prefix the sequence holds (at least the last
        token runs again: its logits row is not kept)."""
        return self.owner.prefill(self, tokens)

    def append(self, token: int) -> np.ndarray:
        return self.owner.step(self, (token,))

    def extend(self, tokens: Sequence[int], n_rows: int) -> np.ndarray:
        """Run ``tokens``; the rows after each of the last ``n_rows``, copies, from one
        batch."""
        if n_rows < 1:
            raise BadRequest(f"asked for {n_rows} logits rows of {len(tokens)} new tokens")
        if not self.owner.rollback:
            raise BackendError("this model's state cannot be rolled back (recurrent)")
        return self.owner.run_batch([(self, tokens, n_rows)])[0]

    def truncate(self, n: int) -> None:
        self.owner.truncate(self, n)

    def close(self) -> None:
        self.owner.release(self)


class LlamaSequences:
    """``n_seq`` sequences of up to ``n_ctx`` tokens in one context of ``model`` (see the
    module docstring). Owns ``model``: the last of :meth:`close` and the release of the last
    lease frees the context and the weights."""

    def __init__(
        self,
        model: LlamaModel,
        params: llama_cpp.llama_context_params,
        *,
        n_seq: int,
        n_ctx: int,
        name: str,
    ) -> None:
        params.n_ctx = n_seq * n_ctx
        params.n_batch = min(params.n_batch, n_seq * n_ctx)
        params.n_ubatch = min(params.n_ubatch, params.n_batch)
        self._model = model
        logger = logging.getLogger("llama-cpp-python")
        level = logger.level
        logger.setLevel(logging.CRITICAL)  # llama.cpp warns of n_ctx_seq > n_ctx_train
        try:  # (N × n_ctx cells in one unified sequence; Tandem keeps each to n_ctx)
            self._ctx = LlamaContext(model=model, params=params, verbose=False)
        finally:
            logger.setLevel(level)
        self.ctx = self._ctx.ctx
        if llama_cpp.llama_n_ctx_seq(self.ctx) < n_ctx:
            raise ValueError(f"{llama_cpp.llama_n_ctx_seq(self.ctx)} cells a sequence")
        self.mem = llama_cpp.llama_get_memory(self.ctx)
        self.name = name
        self.n_seq, self.n_ctx = n_seq, n_ctx
        self.n_batch = llama_cpp.llama_n_batch(self.ctx)
        self.n_vocab = model.n_vocab()
        self.unified = bool(params.kv_unified)
        self.rollback = not (
            llama_cpp.llama_model_is_recurrent(model.model)
            or llama_cpp.llama_model_is_hybrid(model.model)
        )
        self.cell_bytes = _cell_bytes(model.model, params)
        self.lock = threading.Lock()
        self.closed = False
        self._batch = _Batch(self.n_batch)
        self._tokens = np.zeros((n_seq, n_ctx), np.int32)
        self._len = [0] * n_seq
        self._free = list(range(n_seq))  # least recently freed first
        self._view: np.ndarray = np.empty(0, np.float32)
        self._addr: int | None = None

    def held(self, seq: int) -> np.ndarray:
        """The tokens sequence ``seq`` holds, in order (a view: it changes as they do)."""
        return self._tokens[seq, : self._len[seq]]

    def free_slots(self) -> int:
        """Without the lock (a list's length is read atomically): a worker's socket thread asks
        this and must not wait out an engine step's decode."""
        return len(self._free)

    # --- leases -------------------------------------------------------------------------

    def lease(self, prompt: Sequence[int], limit: int) -> SequenceLease:
        """A free sequence starting with the longest prefix of ``prompt`` found in the cache
        (its own, or copied from another sequence); at most ``limit`` tokens.
        :class:`OverloadedError` when every sequence is held."""
        prompt = np.asarray(prompt, np.int64)  # once, not once a sequence compared
        with self.lock:
            if self.closed:
                raise BackendError(f"model {self.name!r} is closed")
            if not self._free:
                raise OverloadedError(
                    f"model {self.name!r} has all its {self.n_seq} sequences in use by streams "
                    f"and speculative sessions (parallel={self.n_seq})"
                )
            own = {s: shared_prefix(self.held(s), prompt) for s in self._free}
            seq = max(self._free, key=own.__getitem__)  # ties: the least recently freed
            if not self.rollback and own[seq] < self._len[seq]:
                self._drop(seq, 0)
            elif self.rollback and len(prompt) > own[seq]:
                shared = [shared_prefix(self.held(s), prompt) for s in range(self.n_seq)]
                src = int(np.argmax(shared))
                if shared[src] > own[seq]:
                    seq = min(self._free, key=own.__getitem__)
                    self._copy(src, seq, min(shared[src], limit))
            if self._len[seq] > limit:
                self._drop(seq, limit)
            self._free.remove(seq)
        return SequenceLease(self, seq, limit)

    def release(self, lease: SequenceLease) -> None:
        """Return ``lease``'s sequence (its tokens stay for the next prompt that shares
        them)."""
        with self.lock:
            if lease.closed:
                return
            lease.closed = True
            self._free.append(lease.seq)
            if self.closed and len(self._free) == self.n_seq:
                self._model.close()  # the context first, then the weights

    def close(self) -> None:
        """Free the context and the weights now, or when the last held sequence is
        returned."""
        with self.lock:
            self.closed = True
            if len(self._free) == self.n_seq:
                self._model.close()

    def truncate(self, lease: SequenceLease, n: int) -> None:
        """Keep only the first ``n`` tokens of ``lease``'s sequence (a recurrent state cannot
        keep part of itself: it is emptied)."""
        with self.lock:
            self._check(lease)
            if n < self._len[lease.seq]:
                self._drop(lease.seq, max(n, 0))

    # --- one sequence: prefill and append ----------------------------------------------

    def prefill(self, lease: SequenceLease, tokens: Sequence[int]) -> np.ndarray:
        if len(tokens) == 0:
            raise BadRequest("nothing to prefill: no tokens")
        with self.lock:
            self._check(lease)
            seq = lease.seq
            keep = min(shared_prefix(self.held(seq), tokens), len(tokens) - 1)
            if not self.rollback and keep < self._len[seq]:
                keep = 0  # a recurrent state cannot be rolled back part of the way
            if keep < self._len[seq]:
                self._drop(seq, keep)
        return self.step(lease, tokens[keep:])

    def step(self, lease: SequenceLease, tokens: Sequence[int]) -> np.ndarray:
        """Run ``tokens`` after those ``lease`` holds (in ``n_batch`` chunks, one decode each,
        the lock held for each); the logits row after the last."""
        seq, n_new = lease.seq, len(tokens)
        if self._len[seq] + n_new > lease.limit:
            raise BadRequest(f"the context of {lease.limit} tokens is full")
        batch = self._batch
        if n_new == 1:  # a decode step: no arrays to build
            token = int(tokens[0])
            if not 0 <= token < self.n_vocab:
                raise BadRequest(f"token ids must be integers in 0..{self.n_vocab - 1}")
            with self.lock:
                self._check(lease)
                n = self._len[seq]
                batch.token[0], batch.pos[0], batch.seq[0], batch.logits[0] = token, n, seq, 1
                self._decode(1, (seq,))
                self._tokens[seq, n] = token
                self._len[seq] = n + 1
                return self._last_row(lease)
        ids = _token_ids(tokens, self.n_vocab)
        for start in range(0, n_new, self.n_batch):
            k = min(self.n_batch, n_new - start)
            with self.lock:
                self._check(lease)
                n = self._len[seq]
                batch.token[:k] = ids[start : start + k]
                batch.pos[:k] = np.arange(n, n + k, dtype=np.int32)
                batch.seq[:k] = seq
                batch.logits[:k] = 0
                batch.logits[k - 1] = 1
                self._decode(k, (seq,))
                self._tokens[seq, n : n + k] = batch.token[:k]
                self._len[seq] = n + k
                if start + k == n_new:
                    return self._last_row(lease)
        raise AssertionError("unreachable: tokens is not empty")

    def _last_row(self, lease: SequenceLease) -> np.ndarray:
        ptr = llama_cpp.llama_get_logits_ith(self.ctx, -1)
        addr = ctypes.cast(ptr, ctypes.c_void_p).value
        if not addr:
            raise BackendError("llama.cpp returned no logits for the last token")
        if addr != self._addr:  # a view costs ~10 µs; the buffer rarely moves
            self._view, self._addr = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)), addr
        if lease.row is None:
            return self._view
        np.copyto(lease.row, self._view)
        return lease.row

    # --- many sequences: one batch -----------------------------------------------------

    def run_batch(self, work: Sequence[BatchItem]) -> list[np.ndarray]:
        """See :meth:`tandem.runtime.generation.BatchedBackend.run_batch`: every item's
        tokens in one llama.cpp batch (one ``llama_decode`` per ``n_batch`` tokens, split in
        order, each decode's rows copied out before the next); rows of one float32 array."""
        if not work:
            return []
        plan: list[tuple[SequenceLease, np.ndarray, int]] = []
        seen: set[int] = set()
        for lease, tokens, n_rows in work:
            if not isinstance(lease, SequenceLease) or lease.owner is not self:
                raise BadRequest(f"run_batch: a lease that is not one of {self.name!r}'s")
            if lease.seq in seen:
                raise BadRequest(f"run_batch: sequence {lease.seq} appears twice")
            seen.add(lease.seq)
            ids = _token_ids(tokens, self.n_vocab)
            if not 0 <= n_rows <= len(ids):
                raise BadRequest(f"asked for {n_rows} logits rows of {len(ids)} new tokens")
            plan.append((lease, ids, int(n_rows)))
        with self.lock:
            for lease, ids, _ in plan:
                self._check(lease)
                if self._len[lease.seq] + len(ids) > lease.limit:
                    raise BadRequest(
                        f"sequence {lease.seq}: the context of {lease.limit} tokens is full"
                    )
            out = self._run_plan(plan)
        return np.split(out, np.cumsum([n_rows for _, _, n_rows in plan], dtype=np.intp)[:-1])

    def _run_plan(self, plan: list[tuple[SequenceLease, np.ndarray, int]]) -> np.ndarray:
        """Decode ``plan`` (checked; the lock held) and commit its tokens; the logits rows
        asked for, in order."""
        seqs = [lease.seq for lease, _, _ in plan]
        lens = [len(ids) for _, ids, _ in plan]
        total = sum(lens)
        out = np.empty((sum(n for _, _, n in plan), self.n_vocab), np.float32)
        if total == 0:
            return out
        token = np.concatenate([ids for _, ids, _ in plan])
        seq = np.repeat(np.asarray(seqs, np.int32), lens)
        pos = np.concatenate(
            [np.arange(self._len[s], self._len[s] + n) for s, n in zip(seqs, lens, strict=True)]
        )
        want = np.zeros(total, np.int8)
        end = 0
        for _, ids, n_rows in plan:
            end += len(ids)
            want[end - n_rows : end] = 1
        batch, row = self._batch, 0
        for start in range(0, total, self.n_batch):
            k = min(self.n_batch, total - start)
            batch.token[:k] = token[start : start + k]
            batch.pos[:k] = pos[start : start + k]
            batch.seq[:k] = seq[start : start + k]
            batch.logits[:k] = want[start : start + k]
            self._decode(k, seqs)
            n_out = int(batch.logits[:k].sum())
            if n_out:
                ptr = llama_cpp.llama_get_logits(self.ctx)
                if not ctypes.cast(ptr, ctypes.c_void_p).value:
                    raise BackendError("llama.cpp returned no logits")
                # rows with logits, in batch order
                out[row : row + n_out] = np.ctypeslib.as_array(ptr, shape=(n_out, self.n_vocab))
                row += n_out
        for lease, ids, _ in plan:
            n = self._len[lease.seq]
            self._tokens[lease.seq, n : n + len(ids)] = ids
            self._len[lease.seq] = n + len(ids)
        return out

    # --- llama.cpp calls (the lock held) -----------------------------------------------

    def _decode(self, k: int, seqs: Sequence[int]) -> None:
        """``llama_decode`` the batch's first ``k`` rows; on failure the cells past each of
        ``seqs``' committed tokens are removed and :class:`BackendError` raised."""
        self._batch.c.n_tokens = k
        rc = llama_cpp.llama_decode(self.ctx, self._batch.c)
        if rc != 0:
            for s in seqs:
                self._drop(s, self._len[s])
            raise BackendError(f"llama.cpp decode failed (llama_decode returned {rc})")

    def _drop(self, seq: int, n: int) -> None:
        """Keep the first ``n`` cells of ``seq`` (all of them go where the memory cannot keep
        part: a recurrent state)."""
        if not llama_cpp.llama_memory_seq_rm(self.mem, seq, n, -1):
            llama_cpp.llama_memory_seq_rm(self.mem, seq, -1, -1)
            n = 0
        self._len[seq] = min(n, self._len[seq])

    def _copy(self, src: int, dst: int, n: int) -> None:
        """Make ``dst`` hold ``src``'s first ``n`` tokens: shared cells in a unified cache;
        a whole-buffer copy, then a cut, in per-sequence buffers."""
        self._drop(dst, 0)
        if self.unified:
            llama_cpp.llama_memory_seq_cp(self.mem, src, dst, 0, n)
        else:
            llama_cpp.llama_memory_seq_cp(self.mem, src, dst, -1, -1)
            llama_cpp.llama_memory_seq_rm(self.mem, dst, n, -1)
        self._tokens[dst, :n] = self._tokens[src, :n]
        self._len[dst] = n

    def _check(self, lease: SequenceLease) -> None:
        if lease.closed:
            raise BackendError(f"model {self.name!r}: the lease on sequence {lease.seq} is closed")


def _token_ids(tokens: Sequence[int] | np.ndarray, n_vocab: int) -> np.ndarray:
    """``tokens`` as int32, or :class:`BadRequest` for ids outside the vocabulary (llama.cpp
    would refuse the whole batch)."""
    ids = np.asarray(tokens)
    if ids.size == 0:
        return np.zeros(0, np.int32)
    if ids.ndim != 1 or ids.dtype.kind not in "iu" or ids.min() < 0 or ids.max() >= n_vocab:
        raise BadRequest(f"token ids must be integers in 0..{n_vocab - 1}")
    return ids.astype(np.int32, copy=False)


def _cell_bytes(model: llama_cpp.llama_model_p, params: llama_cpp.llama_context_params) -> int:
    """KV cache bytes per token: keys and values of every layer (f16 unless ``type_k`` or
    ``type_v`` is f32)."""
    heads = max(llama_cpp.llama_model_n_head(model), 1)
    kv_width = llama_cpp.llama_model_n_embd(model) * llama_cpp.llama_model_n_head_kv(model) // heads
    size = {llama_cpp.GGML_TYPE_F32: 4}
    per = size.get(params.type_k, 2) + size.get(params.type_v, 2)
    return llama_cpp.llama_model_n_layer(model) * kv_width * per
