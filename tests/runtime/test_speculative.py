"""The speculative-decoding math: the greedy and rejection-sampling acceptance rules, the draft
distribution, the expected tokens per round and the γ controller.

The sampling test is statistical: a toy target and a toy draft "model" (logits tables indexed
by the prefix) decoded speculatively many times must give the target's distribution over whole
3-token sequences (a chi-square goodness-of-fit test at significance 0.001: it fails wrongly
once in a thousand runs; the seeds are fixed, so a run is repeatable)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats

from tandem.runtime.errors import BackendError
from tandem.runtime.generation import SamplingParams, distribution
from tandem.runtime.speculative import (
    STREAM,
    GammaController,
    cut_at_end,
    draft_distribution,
    expected_tokens,
    pack_draft_q,
    shared_prefix,
    verify,
    vocab_digest,
)

GREEDY = SamplingParams()
ALPHA = 0.001  # significance of the goodness-of-fit tests


def test_greedy_accepts_the_prefix_that_matches_the_argmax() -> None:
    rows = np.zeros((4, 5), np.float32)
    rows[0, 1] = rows[1, 2] = rows[2, 4] = rows[3, 3] = 1.0
    rng = np.random.default_rng(0)
    assert verify(rows, [1, 2, 4], None, None, GREEDY, rng) == (3, 3)  # all + bonus
    assert verify(rows, [1, 2, 0], None, None, GREEDY, rng) == (2, 4)  # corrected
    assert verify(rows, [0, 2, 4], None, None, GREEDY, rng) == (0, 1)
    assert verify(rows[:1], [], None, None, GREEDY, rng) == (0, 1)  # γ = 0: one token


def test_greedy_ties_go_to_the_lowest_id_as_in_plain_decoding() -> None:
    rows = np.ones((2, 4), np.float32)
    assert verify(rows, [0], None, None, GREEDY, np.random.default_rng(0)) == (1, 0)
    assert verify(rows, [3], None, None, GREEDY, np.random.default_rng(0)) == (0, 0)


def test_an_accepted_end_token_ends_the_answer() -> None:
    eos = frozenset({2})
    assert cut_at_end([5, 2, 7], 3, 9, eos) == (1, 2)  # the end token is the last one
    assert cut_at_end([5, 2, 7], 1, 9, eos) == (1, 9)  # not accepted: nothing changes
    assert cut_at_end([5, 6], 2, 2, eos) == (2, 2)


def test_shared_prefix_counts_the_leading_tokens_in_common() -> None:
    assert shared_prefix([1, 5, 6, 9], [1, 5, 7]) == 2
    assert shared_prefix([1, 5], [1, 5, 7]) == shared_prefix([1, 5, 7], [1, 5]) == 2
    assert shared_prefix([], [3]) == shared_prefix([3], []) == shared_prefix([], []) == 0
    assert shared_prefix([4, 2], [3, 2]) == 0
    # a llama.cpp context's evaluated tokens (intc) against a prompt's ids (Python ints)
    held = np.array([1, 5, 6, 2**31 - 1], np.intc)
    assert shared_prefix(held, [1, 5, 6, 2**31 - 1, 8]) == 4
    assert shared_prefix(held, [1, 5, 6, 2**40]) == 3  # an id past int32 is no match


def test_non_finite_logits_are_a_backend_error() -> None:
    rows = np.zeros((2, 4), np.float32)
    rows[1, 2] = np.nan
    with pytest.raises(BackendError, match="non-finite"):
        verify(rows, [0], None, None, GREEDY, np.random.default_rng(0))
    with pytest.raises(ValueError, match="2 logits rows"):
        verify(rows[:1], [0], None, None, GREEDY, np.random.default_rng(0))


def test_draft_distribution() -> None:
    row = np.array([0.0, 3.0, 1.0, 2.0, -1.0], np.float32)
    ids, probs = draft_distribution(row, GREEDY, 3)
    assert ids.tolist() == [1] and probs.tolist() == [1.0]
    ids, probs = draft_distribution(row, SamplingParams(temperature=1.0), 3)
    assert sorted(ids.tolist()) == [1, 2, 3] and ids.dtype == np.int32
    full = distribution(row, SamplingParams(temperature=1.0))
    np.testing.assert_allclose(probs, full[ids] / full[ids].sum())
    ids, probs = draft_distribution(row, SamplingParams(temperature=1.0, top_p=0.5), 10)
    assert ids.tolist() == [1] and probs.sum() == pytest.approx(1.0)  # the nucleus is one
    packed_ids, packed = pack_draft_q(
        [(np.array([1, 2], np.int32), np.array([0.5, 0.5])), (ids, probs)]
    )
    assert packed_ids.shape == packed.shape == (2, 2) and packed[1].tolist() == [1.0, 0.0]


class ToyModel:
    """Logits for each prefix (a tuple of token ids) drawn once from a seeded generator."""

    def __init__(self, n_vocab: int, seed: int, scale: float) -> None:
        self.n_vocab, self.seed, self.scale = n_vocab, seed, scale

    def logits(self, prefix: tuple[int, ...]) -> np.ndarray:
        h = hash((self.seed, prefix)) & 0xFFFFFFFF
        return (np.random.default_rng(h).normal(size=self.n_vocab) * self.scale).astype(np.float32)


def speculative_sample(
    target: ToyModel,
    drafter: ToyModel,
    params: SamplingParams,
    gamma: int,
    length: int,
    rng: np.random.Generator,
    top_k: int,
) -> tuple[int, ...]:
    """One answer of ``length`` tokens, drafted by ``drafter`` and verified against
    ``target``, as the edge and the worker run it."""
    seq: list[int] = []
    while len(seq) < length:
        draft, qs = [], []
        for _ in range(gamma):
            ids, probs = draft_distribution(drafter.logits(tuple(seq + draft)), params, top_k)
            draft.append(int(ids[rng.choice(len(ids), p=probs)]))
            qs.append((ids, probs))
        rows = np.stack([target.logits(tuple(seq + draft[:i])) for i in range(gamma + 1)])
        q_ids, q_probs = pack_draft_q(qs)
        n, token = verify(rows, draft, q_ids, q_probs, params, rng)
        seq += [*draft[:n], token]
    return tuple(seq[:length])


def target_sequence_probs(target: ToyModel, params: SamplingParams, length: int) -> dict:
    out = {}
    for seq in itertools.product(range(target.n_vocab), repeat=length):
        p = 1.0
        for i in range(length):
            p *= distribution(target.logits(seq[:i]), params)[seq[i]]
        out[seq] = p
    return out


@pytest.mark.parametrize(
    ("params", "gamma", "top_k"),
    [
        (SamplingParams(temperature=1.0), 2, 64),
        (SamplingParams(temperature=0.7, top_p=0.9), 3, 64),
        (SamplingParams(temperature=1.0), 1, 2),  # a truncated draft: p has mass q lacks
    ],
)
def test_rejection_sampling_gives_the_targets_distribution(params, gamma, top_k) -> None:
    target, drafter = ToyModel(4, 1, 1.5), ToyModel(4, 2, 1.5)
    length, n = 3, 6000
    rng = np.random.default_rng(123)
    counts: dict[tuple[int, ...], int] = {}
    for _ in range(n):
        s = speculative_sample(target, drafter, params, gamma, length, rng, top_k)
        counts[s] = counts.get(s, 0) + 1
    expected = target_sequence_probs(target, params, length)
    cells = [s for s, p in expected.items() if p * n >= 5]  # chi-square needs >= 5 expected
    obs = np.array([counts.get(s, 0) for s in cells] + [n - sum(counts.get(s, 0) for s in cells)])
    exp = np.array([expected[s] * n for s in cells] + [n - sum(expected[s] * n for s in cells)])
    assert sum(counts.get(s, 0) for s in expected if expected[s] == 0) == 0  # impossible never
    keep = exp > 0
    p_value = stats.chisquare(obs[keep], exp[keep] * obs[keep].sum() / exp[keep].sum()).pvalue
    assert p_value > ALPHA, f"speculative samples differ from the target's (p = {p_value:.2e})"


def test_a_wrong_rule_is_caught_by_the_same_test() -> None:
    """The statistical test can fail: accepting every draft token (the draft's distribution,
    not the target's) is rejected by it."""
    target, drafter = ToyModel(4, 1, 1.5), ToyModel(4, 2, 1.5)
    params, n = SamplingParams(temperature=1.0), 4000
    rng = np.random.default_rng(7)
    counts = np.zeros(4)
    for _ in range(n):
        ids, probs = draft_distribution(drafter.logits(()), params, 64)
        counts[int(ids[rng.choice(len(ids), p=probs)])] += 1
    p = distribution(target.logits(()), params)
    assert stats.chisquare(counts, p * n).pvalue < ALPHA


def test_expected_tokens() -> None:
    assert expected_tokens(0.0, 4) == 1.0
    assert expected_tokens(1.0, 4) == 5.0
    assert expected_tokens(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)


def test_controller_fixed_and_exploring() -> None:
    fixed = GammaController(gamma=5)
    assert fixed.choose(100) == 5 and fixed.choose(3) == 2 and fixed.choose(1) == 0
    auto = GammaController()
    assert [auto.choose(100) for _ in range(1)] == [4]
    with pytest.raises(ValueError, match="gamma"):
        GammaController(gamma=0)


def _train(ctl: GammaController, accept: float, rtt: float, draft: float, verify_base: float):
    """Feed rounds where a fraction ``accept`` of draft tokens is kept (geometric), verify
    time = base * (1 + 0.05 * rows)."""
    rng = np.random.default_rng(0)
    for g in (4, 2, 8, 4, 6, 3):
        n = 0
        while n < g and rng.random() < accept:
            n += 1
        compute = verify_base * (1 + 0.05 * (g + 1))
        ctl.observe_round(
            g, n, draft_s=g * draft, wall_s=rtt + compute, compute_s=compute, prefilled=0
        )


def test_controller_drafts_more_when_acceptance_is_high_and_streams_on_a_slow_link() -> None:
    good = GammaController(max_gamma=8)
    _train(good, 0.95, rtt=0.002, draft=0.0002, verify_base=0.004)
    assert good.acceptance > 0.8
    g_good = good.choose(100)
    poor = GammaController(max_gamma=8)
    _train(poor, 0.3, rtt=0.002, draft=0.0002, verify_base=0.004)
    assert poor.acceptance < 0.5
    assert 1 <= poor.choose(100) < g_good
    slow = GammaController(max_gamma=8)
    _train(slow, 0.6, rtt=0.05, draft=0.001, verify_base=0.001)
    slow.observe_stream(0.05, 0.001)  # streaming: 1 ms per token after the first
    assert slow.choose(100) == STREAM
    no_fallback = GammaController(max_gamma=8, fallback=False)
    _train(no_fallback, 0.6, rtt=0.05, draft=0.001, verify_base=0.001)
    assert no_fallback.choose(100) >= 1
    snap = good.snapshot()
    assert snap["rtt_ms"] == pytest.approx(2.0) and math.isfinite(snap["verify1_ms"])


def test_controller_reprobes_a_fallback_every_n_answers_for_one_round() -> None:
    ctl = GammaController(max_gamma=8, reprobe_every=4)
    _train(ctl, 0.6, rtt=0.05, draft=0.001, verify_base=0.001)
    ctl.observe_stream(0.05, 0.001)
    choices = []
    for _ in range(8):
        ctl.begin_answer()
        choices.append(ctl.choose(100, first=True))
        assert ctl.choose(90) == STREAM  # a probe is one round: then it decides again
    assert choices.count(STREAM) == 6 and all(c >= 1 for c in choices if c != STREAM)


def test_controller_measures_a_stream_once_before_it_compares() -> None:
    ctl = GammaController(max_gamma=8)
    _train(ctl, 0.9, rtt=0.001, draft=0.0002, verify_base=0.001)
    assert ctl.choose(100) >= 1  # mid-answer: it keeps drafting
    assert ctl.choose(100, first=True) == STREAM  # a new answer: one stream, to measure it
    ctl.observe_stream(0.01, 0.01)  # a slow stream: 10 ms per token
    assert ctl.choose(100, first=True) >= 1


def test_vocab_digest() -> None:
    ctl = {0: "<s>"}
    a = vocab_digest([b"", b"a", b"b"], ctl)
    assert a == vocab_digest(iter([b"", b"a", b"b"]), ctl)
    assert a == vocab_digest([b"", b"a", b"b", b"", b""], ctl)  # padding past the tokenizer
    assert a != vocab_digest([b"", b"b", b"a"], ctl)
    assert a != vocab_digest([b"a", b"", b"b"], ctl)
    assert a != vocab_digest([b"", b"ab"], ctl)
    assert a != vocab_digest([b"", b"a", b"b"], {0: "<|im_end|>"})  # which control token
    assert a != vocab_digest([b"", b"a", b"b"], {})
