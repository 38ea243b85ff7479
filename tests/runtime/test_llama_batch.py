"""The gguf backend's one llama.cpp context holding several sequences: ``run_batch`` over
sequences at different positions gives what each sequence gives alone, a prefix is copied
from another sequence instead of run again, a bad batch changes nothing, and streams on
several threads take turns on the context."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from tandem.runtime.errors import BackendError, BadRequest, OverloadedError
from tandem.runtime.generation import BatchedBackend, LocalGenerationBackend, SamplingParams
from tests.conftest import require
from tests.lm import tiny_lm

CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 .,+="
GREEDY = SamplingParams(max_tokens=16)
# With parallel > 1 llama.cpp runs flash attention, which accumulates the values in f16 (the
# cache's type): a row moves with the layout of the cells it reads (measured up to 5e-3 on
# this model, |logit| up to ~6; 1e-6 without flash attention). 2e-2 is above that noise and
# far below the gap between a top pick and the next (std-0.2 weights: no near-ties).
ATOL = 2e-2


@pytest.fixture(scope="module")
def gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer Llama (hidden 64, trained context 128) with a char vocabulary, f32."""
    require("llama_cpp")
    require("gguf")
    require("transformers")
    from tandem.runtime.gguf import export_gguf

    hf = tiny_lm(
        tmp_path_factory.mktemp("batch"),
        chars=CHARS,
        hidden=64,
        layers=2,
        heads=4,
        n_ctx=128,
        initializer_range=0.2,
    )
    return export_gguf(hf, hf / "model-f32.gguf", qtype="f32")


def _backend(gguf: Path, **kw):
    from tandem.runtime.backends.llamacpp import LlamaCppBackend

    return LlamaCppBackend(gguf, threads=2, **kw)


@pytest.fixture(scope="module")
def llama(gguf: Path):
    backend = _backend(gguf, parallel=4)
    yield backend
    backend.close()


@pytest.fixture
def decoded(monkeypatch) -> list[int]:
    """Tokens each ``llama_decode`` call runs, in order."""
    import llama_cpp

    calls: list[int] = []
    real = llama_cpp.llama_decode

    def counted(ctx, batch):
        calls.append(batch.n_tokens)
        return real(ctx, batch)

    monkeypatch.setattr(llama_cpp, "llama_decode", counted)
    return calls


def _alone(backend, prompt: list[int], tokens: list[int], n_rows: int) -> np.ndarray:
    """The rows ``tokens`` give after ``prompt`` in a sequence of its own, nothing else in the
    batch (the lease starts empty: no prefix reused)."""
    lease = backend.lease()
    try:
        lease.truncate(0)
        if prompt:
            backend.run_batch([(lease, prompt, 0)])
        return backend.run_batch([(lease, tokens, n_rows)])[0]
    finally:
        lease.close()


def test_is_a_batched_backend(llama):
    assert isinstance(llama, BatchedBackend) and isinstance(llama, LocalGenerationBackend)
    assert llama.run_batch([]) == []
    lease = llama.lease()
    try:
        (rows,) = llama.run_batch([(lease, [], 0)])
        assert rows.shape == (0, llama.n_vocab) and rows.dtype == np.float32
    finally:
        lease.close()


def test_mixed_batch_matches_each_sequence_alone(llama):
    ids = {p: llama.tokenize(p) for p in ("hello world", "1+2=", "ab", "the quick brown fox")}
    p_dec, p_ver, p_pre, p_last = ids.values()
    verify = llama.tokenize("abc")[1:]  # γ + 1 = 3 tokens, a row after each
    want = [
        _alone(llama, p_dec, [7], 1),  # a decode row
        _alone(llama, p_ver, verify, len(verify)),  # a verify round
        _alone(llama, [], p_pre, 0),  # a prefill chunk nobody reads
        _alone(llama, [], p_last, 1),  # a prefill chunk and its last row
    ]
    leases = [llama.lease() for _ in range(4)]
    try:
        for lease in leases:
            lease.truncate(0)
        llama.run_batch([(leases[0], p_dec, 0), (leases[1], p_ver, 0)])
        got = llama.run_batch(
            [
                (leases[0], [7], 1),
                (leases[1], verify, len(verify)),
                (leases[2], p_pre, 0),
                (leases[3], p_last, 1),
            ]
        )
        for g, w in zip(got, want, strict=True):
            assert g.shape == w.shape and g.dtype == np.float32
            np.testing.assert_allclose(g, w, atol=ATOL)
        assert got[1].flags.c_contiguous
        held = [list(lease.cached_tokens) for lease in leases]
        assert held == [[*p_dec, 7], [*p_ver, *verify], p_pre, p_last]
    finally:
        for lease in leases:
            lease.close()


def test_greedy_steps_in_one_batch_match_streams_alone(gguf, llama):
    """Four sequences decoding greedily together, a step per batch, pick the tokens each
    picks alone in a one-sequence backend (which runs without flash attention)."""
    prompts = ["hello world", "1+2=", "ab", "zz top"]
    single = _backend(gguf, parallel=1)
    want = [[s.token for s in single.stream(p, GREEDY)] for p in prompts]
    single.close()
    leases = [llama.lease() for _ in prompts]
    try:
        for lease in leases:
            lease.truncate(0)
        rows = llama.run_batch(
            [(s, llama.tokenize(p), 1) for s, p in zip(leases, prompts, strict=True)]
        )
        got: list[list[int]] = [[] for _ in prompts]
        for _ in range(GREEDY.max_tokens):
            picks = [int(r[-1].argmax()) for r in rows]
            for out, t in zip(got, picks, strict=True):
                out.append(t)
            rows = llama.run_batch([(s, [t], 1) for s, t in zip(leases, picks, strict=True)])
    finally:
        for lease in leases:
            lease.close()
    for g, w in zip(got, want, strict=True):  # a stream stops at EOS (not shown); the loop not
        assert g[: len(w)] == w
        assert len(w) == GREEDY.max_tokens or g[len(w)] in llama.eos_tokens
    assert sum(map(len, want)) > 2 * GREEDY.max_tokens


def test_split_over_n_batch_keeps_every_row(gguf):
    """A batch longer than ``n_batch`` runs as several decodes; every row asked for is kept,
    in order, the same as alone."""
    backend = _backend(gguf, parallel=3, n_batch=8)
    try:
        a, b, c = (backend.tokenize(p) for p in ("hello world", "the end", "1+2=3"))
        want = [_alone(backend, [], a, 5), _alone(backend, [], b, 2), _alone(backend, [], c, 4)]
        leases = [backend.lease() for _ in range(3)]
        for lease in leases:
            lease.truncate(0)
        got = backend.run_batch(
            [(leases[0], a, 5), (leases[1], b, 2), (leases[2], c, 4)]  # 12 + 8 + 6 tokens
        )
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w, atol=ATOL)
        for lease in leases:
            lease.close()
    finally:
        backend.close()


def test_prefix_copied_from_another_sequence(llama, decoded):
    system = llama.tokenize("you are robot 7. answer in short words. ")
    first = system + llama.tokenize("go left")[1:]
    second = system + llama.tokenize("stop now")[1:]
    holder = llama.lease()
    holder.truncate(0)
    holder.prefill(first)  # held, in use: its prefix is copied, not taken
    decoded.clear()
    lease = llama.lease(second)
    try:
        assert list(lease.cached_tokens) == second[: len(system)]
        assert decoded == []  # a copy: nothing ran
        row = lease.prefill(second).copy()
        assert sum(decoded) == len(second) - len(system)
        decoded.clear()
        fresh = llama.lease()
        fresh.truncate(0)
        want = fresh.prefill(second).copy()
        fresh.close()
        assert sum(decoded) == len(second)
        np.testing.assert_allclose(row, want, atol=ATOL)
        # the copy's own tail, then the holder's, go on independently
        np.testing.assert_allclose(lease.append(5), _alone(llama, second, [5], 1)[0], atol=ATOL)
        assert list(holder.cached_tokens) == first
    finally:
        lease.close()
        holder.close()
    decoded.clear()
    again = llama.lease(first)  # the free sequence that holds all of it: nothing to copy
    assert list(again.cached_tokens) == first and decoded == []
    again.close()


def test_bad_batches_change_nothing(llama, monkeypatch):
    import llama_cpp

    prompts = [llama.tokenize("hello world"), llama.tokenize("ab")]
    leases = [llama.lease(n_ctx=16) for _ in prompts]
    try:
        for lease, ids in zip(leases, prompts, strict=True):
            lease.truncate(0)
            llama.run_batch([(lease, ids, 0)])
        before = [list(lease.cached_tokens) for lease in leases]
        row = llama.run_batch([(leases[1], [5], 1)])[0]
        leases[1].truncate(len(before[1]))
        bad = [
            ([(leases[0], [3], 1), (leases[1], [4, llama.n_vocab], 1)], "token ids"),
            ([(leases[0], [3], 1), (leases[1], [-1], 1)], "token ids"),
            ([(leases[0], [3] * 5, 1), (leases[1], [4], 1)], "16 tokens is full"),
            ([(leases[0], [3], 2)], "2 logits rows of 1"),
            ([(leases[0], [3], 1), (leases[0], [4], 1)], "twice"),
        ]
        for work, match in bad:
            with pytest.raises(BadRequest, match=match):
                llama.run_batch(work)
            assert [list(lease.cached_tokens) for lease in leases] == before
        with pytest.raises(BadRequest, match="full"):
            leases[0].extend([3] * 5, 1)
        other = _backend(llama.path, parallel=1)
        foreign = other.lease()
        with pytest.raises(BadRequest, match="not one of"):
            llama.run_batch([(leases[0], [3], 1), (foreign, [3], 1)])
        foreign.close()
        other.close()

        real = llama_cpp.llama_decode  # a decode that fails after writing its cells

        def failing(ctx, batch):
            real(ctx, batch)
            return -3

        monkeypatch.setattr(llama_cpp, "llama_decode", failing)
        with pytest.raises(BackendError, match="returned -3"):
            llama.run_batch([(leases[0], [3, 4], 1), (leases[1], [5], 1)])
        monkeypatch.setattr(llama_cpp, "llama_decode", real)
        assert [list(lease.cached_tokens) for lease in leases] == before
        # the cells written were removed: the next step runs where the committed ones end
        np.testing.assert_allclose(llama.run_batch([(leases[1], [5], 1)])[0], row, atol=ATOL)
    finally:
        for lease in leases:
            lease.close()


def test_leases_run_out_and_close_frees_one(gguf):
    backend = _backend(gguf, parallel=2)
    try:
        assert backend.free_slots() == 2
        a, b = backend.lease(), backend.stream("ab", GREEDY)
        assert backend.free_slots() == 0
        with pytest.raises(OverloadedError, match="parallel=2"):
            backend.lease()
        with pytest.raises(OverloadedError):
            backend.stream("ab", GREEDY)
        a.close()
        a.close()  # twice is once
        assert backend.free_slots() == 1
        with pytest.raises(BackendError, match="closed"):
            a.append(3)
        with pytest.raises(BackendError, match="closed"):
            backend.run_batch([(a, [3], 1)])
        c = backend.lease()
        b.close()
        assert backend.free_slots() == 1
        c.close()
        assert backend.free_slots() == 2
    finally:
        backend.close()


def test_streams_on_two_threads_match_one_at_a_time(gguf):
    backend = _backend(gguf, parallel=2)
    prompts = ["hello world", "1+2="]
    try:
        want = {p: [s.token for s in backend.stream(p, GREEDY)] for p in prompts}
        got: dict[str, list[list[int]]] = {p: [] for p in prompts}

        def run(p: str) -> None:
            for _ in range(3):
                got[p].append([s.token for s in backend.stream(p, GREEDY)])

        threads = [threading.Thread(target=run, args=(p,)) for p in prompts]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert got == {p: [want[p]] * 3 for p in prompts}
    finally:
        backend.close()


def test_one_sequence_reads_the_row_in_place(gguf):
    """``parallel: 1``: a step's row is llama.cpp's own buffer (no copy), as before; a
    batch's rows are copies that later steps leave alone."""
    backend = _backend(gguf, parallel=1)
    try:
        lease = backend.lease()
        assert not lease.prefill(backend.tokenize("hello")).flags.owndata
        (rows,) = backend.run_batch([(lease, [5], 1)])
        kept = rows.copy()
        assert not lease.append(6).flags.owndata
        np.testing.assert_array_equal(rows, kept)
        lease.close()
    finally:
        backend.close()
