"""The decode loop every logits backend shares: stop strings, finish reasons, sampling and token
confidence, checked with a scripted session (no model)."""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tandem.runtime.generation import (
    BackendStream,
    FinishReason,
    SamplingParams,
    StopFilter,
    TokenStep,
    decode,
    sample,
    token_confidence,
)

EOS = 0


class Scripted:
    """A LogitsSession that makes greedy decoding produce ``script``, then EOS."""

    def __init__(self, script: Sequence[int], n_vocab: int) -> None:
        self.script = list(script)
        self.n_vocab = n_vocab
        self.fed: list[int] = []
        self.prompt: list[int] | None = None

    def _row(self) -> np.ndarray:
        i = len(self.fed)
        row = np.zeros(self.n_vocab, np.float32)
        row[self.script[i] if i < len(self.script) else EOS] = 10.0
        return row

    def prefill(self, tokens: Sequence[int]) -> np.ndarray:
        self.prompt, self.fed = list(tokens), []
        return self._row()

    def append(self, token: int) -> np.ndarray:
        self.fed.append(token)
        return self._row()


def run(
    pieces: Sequence[bytes | str],
    stop: tuple[str, ...] = (),
    max_tokens: int | None = None,
    cancel: threading.Event | None = None,
) -> tuple[list[TokenStep], str | None, Scripted]:
    """Greedy-decode a script whose i-th token (id i + 1) has piece ``pieces[i]``."""
    table = [b""] + [p.encode() if isinstance(p, str) else p for p in pieces]
    session = Scripted(range(1, len(table)), len(table))
    params = SamplingParams(max_tokens=max_tokens or len(pieces) + 1, stop=stop)
    stream = BackendStream(
        decode(session, [5], params, piece=table.__getitem__, eos=frozenset({EOS}), cancel=cancel)
    )
    steps = list(stream)
    return steps, stream.finish_reason, session


def text(steps: list[TokenStep]) -> str:
    return "".join(s.text for s in steps)


# --- stop strings and finish reasons -------------------------------------------------------


def test_eos_ends_with_stop_and_length_with_length():
    steps, reason, session = run(["a", "b"])
    assert (text(steps), reason) == ("ab", FinishReason.STOP)
    assert [s.token for s in steps] == [1, 2] and session.prompt == [5]
    steps, reason, session = run(["a", "b", "c"], max_tokens=2)
    assert (text(steps), reason) == ("ab", FinishReason.LENGTH)
    assert session.fed == [1]  # the last token is not run: nothing would read its row


def test_stop_string_across_token_boundaries_is_not_emitted():
    steps, reason, _ = run(["ab", "c|", "de", "f"], stop=("c|d",))
    assert (text(steps), reason) == ("ab", FinishReason.STOP)
    assert [s.token for s in steps] == [1]


def test_stop_string_inside_one_token_cuts_that_token():
    steps, reason, _ = run(["xy", "zSTOPw", "q"], stop=("STOP",))
    assert (text(steps), reason) == ("xyz", FinishReason.STOP)
    assert [s.token for s in steps] == [1, 2]
    assert steps[1].logprob == pytest.approx(token_confidence(_onehot(4, 2), 2)[0])


def test_held_prefix_is_released_when_it_is_no_stop():
    table = [b"", b"a", b"b", b"d", b"e"]
    params = SamplingParams(max_tokens=4, stop=("abc",))
    gen = decode(Scripted([1, 2, 3, 4], 5), [5], params, piece=table.__getitem__, eos=frozenset())
    seen = [s.text for s in gen]
    assert seen == ["a", "b", "d", "e"]


def test_stop_held_back_until_safe():
    f = StopFilter(("abc",))
    assert f.push(TokenStep(1, "xa", 0.0)) == ([], False)  # "a" might start "abc"
    out, hit = f.push(TokenStep(2, "bq", 0.0))
    assert [s.text for s in out] == ["xa", "bq"] and not hit
    out, hit = f.push(TokenStep(3, "ab", 0.0))
    assert out == [] and not hit
    out, hit = f.push(TokenStep(4, "cd", 0.0))
    assert out == [] and hit  # the stop starts at the held token's first character
    assert f.flush() == []


def test_earliest_of_several_stops_wins():
    steps, reason, _ = run(["12", "34", "56"], stop=("45", "23"))
    assert (text(steps), reason) == ("1", FinishReason.STOP)


@settings(max_examples=300, deadline=None)
@given(
    pieces=st.lists(st.text("ab|", max_size=3), min_size=1, max_size=12),
    stops=st.lists(st.text("ab|", min_size=1, max_size=3), min_size=1, max_size=3),
)
def test_stop_filter_matches_a_plain_reference(pieces, stops):
    steps, reason, _ = run(pieces, stop=tuple(stops), max_tokens=len(pieces))
    full, want, want_reason, end = "".join(pieces), None, FinishReason.LENGTH, 0
    for p in pieces:  # the answer ends at the first token after which a stop string is seen
        end += len(p)
        hits = [i for i in (full[:end].find(s) for s in stops) if i >= 0]
        if hits:
            want, want_reason = full[: min(hits)], FinishReason.STOP
            break
    assert (text(steps), reason) == (full if want is None else want, want_reason)
    assert not any(s in text(steps) for s in stops)
    for i, s in enumerate(steps):  # whole tokens in order, the last one possibly cut
        assert s.token == i + 1
        assert s.text == pieces[i] or (i == len(steps) - 1 and pieces[i].startswith(s.text))


def test_utf8_split_over_tokens_is_shown_once_complete():
    steps, _, _ = run([b"caf", b"\xc3", b"\xa9!"])
    assert [s.text for s in steps] == ["caf", "", "é!"]
    steps, reason, _ = run([b"\xc3", b"\xa9X", b"Y"], stop=("éX",))
    assert (text(steps), reason) == ("", FinishReason.STOP)


def test_cancel_before_and_during():
    cancel = threading.Event()
    cancel.set()
    steps, reason, _ = run(["a", "b"], cancel=cancel)
    assert (steps, reason) == ([], FinishReason.CANCELLED)

    cancel = threading.Event()
    table = [b"", b"a", b"b", b"c"]
    stream = BackendStream(
        decode(
            Scripted([1, 2, 3], 4),
            [5],
            SamplingParams(max_tokens=3),
            piece=table.__getitem__,
            eos=frozenset({EOS}),
            cancel=cancel,
        )
    )
    assert next(stream).text == "a"
    cancel.set()
    assert list(stream) == []
    assert stream.finish_reason == FinishReason.CANCELLED


def test_close_marks_cancelled():
    table = [b"", b"a", b"b"]
    stream = BackendStream(
        decode(Scripted([1, 2], 3), [5], SamplingParams(), piece=table.__getitem__, eos=frozenset())
    )
    next(stream)
    stream.close()
    assert stream.finish_reason == FinishReason.CANCELLED
    assert list(stream) == []


# --- sampling ----------------------------------------------------------------------------


def test_greedy_ties_pick_the_lowest_id():
    row = np.array([1.0, 3.0, 3.0, 0.0, 3.0], np.float32)
    assert sample(row, SamplingParams(), None) == 1
    assert sample(row, SamplingParams(temperature=0.0, seed=3), np.random.default_rng(3)) == 1


def test_seeded_sampling_repeats():
    row = np.random.default_rng(0).normal(size=50).astype(np.float32)
    params = SamplingParams(temperature=1.0, seed=7)

    def draws(seed: int) -> list[int]:
        rng = np.random.default_rng(seed)
        return [sample(row, params, rng) for _ in range(40)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)
    assert len(set(draws(7))) > 5  # it does sample


def test_sampling_follows_softmax_over_temperature():
    row = np.log(np.array([0.6, 0.3, 0.1])).astype(np.float32)
    rng = np.random.default_rng(1)
    params = SamplingParams(temperature=0.5)
    counts = np.bincount([sample(row, params, rng) for _ in range(4000)], minlength=3)
    want = np.array([0.6, 0.3, 0.1]) ** 2
    want /= want.sum()
    np.testing.assert_allclose(counts / 4000, want, atol=0.03)


@pytest.mark.parametrize(("top_p", "support"), [(0.4, {0}), (0.7, {0, 1}), (0.9, {0, 1, 2})])
def test_top_p_restricts_the_support(top_p, support):
    row = np.log(np.array([0.5, 0.3, 0.15, 0.05])).astype(np.float32)
    rng = np.random.default_rng(2)
    params = SamplingParams(temperature=1.0, top_p=top_p)
    assert {sample(row, params, rng) for _ in range(2000)} == support


# --- token confidence --------------------------------------------------------------------


def _onehot(n: int, t: int) -> np.ndarray:
    row = np.zeros(n, np.float32)
    row[t] = 10.0
    return row


def _log_softmax(row: np.ndarray) -> np.ndarray:
    x = row.astype(np.float64)
    z = x - x.max()
    return z - np.log(np.exp(z).sum())


@pytest.mark.parametrize("n", [2, 17, 513, 1500, 32000])
@pytest.mark.parametrize("scale", [0.1, 3.0, 30.0])
def test_token_confidence_matches_numpy(n, scale):
    rng = np.random.default_rng(n)
    for _ in range(5):
        row = (rng.normal(size=n) * scale).astype(np.float32)
        ref = _log_softmax(row)
        entropy_ref = -(np.exp(ref) * ref).sum()
        for t in (int(row.argmax()), int(row.argmin()), int(rng.integers(n))):
            logprob, entropy = token_confidence(row, t)
            assert logprob == pytest.approx(ref[t], abs=2e-5, rel=1e-5)
            assert entropy == pytest.approx(entropy_ref, abs=2e-5, rel=1e-5)


def test_token_confidence_with_masked_logits():
    row = np.array([2.0, -np.inf, 1.0, -np.inf], np.float32)
    logprob, entropy = token_confidence(row, 0)
    ref = _log_softmax(np.array([2.0, 1.0]))
    assert logprob == pytest.approx(ref[0])
    assert entropy == pytest.approx(-(np.exp(ref) * ref).sum())
    assert token_confidence(row, 1)[0] == -math.inf


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_token_confidence_of_a_bad_row(bad):
    row = np.array([1.0, bad, 0.5], np.float32)
    logprob, entropy = token_confidence(row, 0)
    assert logprob == -math.inf and math.isnan(entropy)
    allneg = np.full(4, -np.inf, np.float32)
    logprob, entropy = token_confidence(allneg, 2)
    assert logprob == -math.inf and math.isnan(entropy)
