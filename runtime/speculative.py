"""Speculative decoding: what the drafting edge and the verifying worker share.

The edge's model **drafts** γ tokens; the cloud's model scores them all in one forward pass and
keeps the longest prefix it agrees with, plus one token of its own (the correction at the
first rejected position, or a bonus token after the last draft token). The answer is the cloud
model's answer, made with fewer cloud passes and fewer round trips.

* :func:`verify` — the acceptance rule, given the cloud's γ+1 logits rows. Greedy: accept while
  the draft token is the cloud's argmax. Sampling: the standard rejection rule (Leviathan et
  al. 2023, Chen et al. 2023): accept draft token d with probability min(1, p(d)/q(d)); at the
  first rejection, draw from the normalised max(0, p − q). The output is then distributed
  exactly as the cloud model's own samples, for any draft distribution q.
* :func:`draft_distribution` — the q the edge samples a draft token from and sends with it:
  the edge model's sampling distribution, cut to its ``top_k`` most likely tokens (so a message
  stays small with a large vocabulary; the rule above is exact for any q).
* :class:`GammaController` — picks γ for the next round from the measured acceptance rate,
  round-trip time, draft time and the cloud's verification time, or says that streaming the
  rest from the cloud (no drafting) is faster.
* :func:`vocab_digest` — drafts are token ids, so both models must share a vocabulary; the
  edge sends this digest with a session's first request and the worker refuses a mismatch.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tandem.runtime.errors import BackendError
from tandem.runtime.generation import SamplingParams, distribution

MAX_GAMMA = 16  # draft tokens per verify request
EXPLORE = (4, 2, 8)  # the adaptive controller's first rounds: three verify sizes to fit a line
STREAM = -1  # GammaController.choose: stream the rest from the cloud, no drafting


def verify(
    rows: np.ndarray,
    draft: Sequence[int],
    q_ids: np.ndarray | None,
    q_probs: np.ndarray | None,
    params: SamplingParams,
    rng: np.random.Generator,
) -> tuple[int, int]:
    """``(accepted, token)``: how many leading ``draft`` tokens stand, and the token after
    them. ``rows`` (γ+1, n_vocab) are the target's logits after the committed prefix and after
    each draft token; ``q_ids``/``q_probs`` (γ, k) the draft's distribution at each drafted
    position (sparse; probability 0 pads), needed when sampling."""
    g = len(draft)
    if rows.shape[0] != g + 1:
        raise ValueError(f"verify needs {g + 1} logits rows, got {rows.shape[0]}")
    if not np.isfinite(rows).all():
        raise BackendError("the model produced non-finite logits")
    if params.temperature == 0.0:
        picks = rows.argmax(axis=1)  # lowest id on ties, as sample() picks
        for i in range(g):
            if picks[i] != draft[i]:
                return i, int(picks[i])
        return g, int(picks[g])
    assert not g or (q_ids is not None and q_probs is not None)
    n_vocab = rows.shape[1]
    for i, d in enumerate(draft):
        p = distribution(rows[i], params)
        assert q_ids is not None and q_probs is not None
        qd = float(q_probs[i][q_ids[i] == d].sum())
        if rng.random() * qd < p[d]:  # accept with probability min(1, p(d) / q(d))
            continue
        q = np.zeros(n_vocab)
        np.add.at(q, q_ids[i], q_probs[i])
        residual = np.maximum(p - q, 0.0)
        total = residual.sum()
        if total <= 0.0:  # p == q to rounding: a rejection has probability ~0; p is exact
            residual, total = p, 1.0
        return i, int(rng.choice(n_vocab, p=residual / total))
    p = distribution(rows[g], params)
    return g, int(rng.choice(n_vocab, p=p))


def cut_at_end(
    draft: Sequence[int], accepted: int, token: int, eos: frozenset[int]
) -> tuple[int, int]:
    """``(accepted, token)`` with the answer ended at the first accepted draft token that is an
    end token (the edge never drafts one, but a request may)."""
    for i, t in enumerate(draft[:accepted]):
        if t in eos:
            return i, t
    return accepted, token


def shared_prefix(a: Sequence[int] | np.ndarray, b: Sequence[int] | np.ndarray) -> int:
    """How many leading tokens ``a`` and ``b`` have in common: how much of a KV cache that
    holds ``a`` a sequence ``b`` can keep. ``shared_prefix([1, 5, 6, 9], [1, 5, 7]) == 2``;
    ``shared_prefix([1, 5], [1, 5, 7]) == 2``; ``shared_prefix([], [3]) == 0``."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(differ[0]) if differ.size else n


def draft_distribution(
    row: np.ndarray, params: SamplingParams, top_k: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(ids int32, probs float64)``: the distribution to draw a draft token from — the
    sampling distribution of ``row`` under ``params`` restricted to its ``top_k`` most likely
    tokens and renormalised (greedy: the argmax with probability 1)."""
    if params.temperature == 0.0:
        return np.array([int(np.argmax(row))], np.int32), np.ones(1)
    p = distribution(row, params)
    ids = np.flatnonzero(p)
    if len(ids) > top_k:
        ids = ids[np.argsort(-p[ids], kind="stable")[:top_k]]
    probs = p[ids]
    return ids.astype(np.int32), probs / probs.sum()


def pack_draft_q(qs: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Per-position sparse distributions as two (γ, k) arrays, padded with probability 0."""
    k = max((len(ids) for ids, _ in qs), default=1)
    ids = np.zeros((len(qs), k), np.int32)
    probs = np.zeros((len(qs), k), np.float64)
    for i, (a, b) in enumerate(qs):
        ids[i, : len(a)], probs[i, : len(b)] = a, b
    return ids, probs


def draft_rng(seed: int | None) -> np.random.Generator:
    """The edge's generator for drawing draft tokens. With a seed, its stream is independent of
    :func:`verify_rng`'s (the same uniforms on both sides would correlate a draft with its own
    acceptance test and bias the output)."""
    return np.random.default_rng(None if seed is None else [seed, 1])


def verify_rng(seed: int | None, position: int) -> np.random.Generator:
    """The worker's generator for a session that starts at ``position`` tokens (a resync after
    an eviction starts a new stream, not the old one again)."""
    return np.random.default_rng(None if seed is None else [seed, 2, position])


def expected_tokens(alpha: float, gamma: int) -> float:
    """Tokens one verify round yields on average (accepted drafts + the cloud's own token)
    when each draft token is accepted with probability ``alpha``: (1 − α^(γ+1)) / (1 − α)."""
    if alpha >= 1.0:
        return gamma + 1.0
    return (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)


def backend_vocab_digest(backend: Any) -> str:
    """:func:`vocab_digest` of a loaded language model's vocabulary."""
    pieces = (backend.piece(t) for t in range(int(backend.n_vocab)))
    return vocab_digest(pieces, backend.control_tokens)


def vocab_digest(pieces: Iterable[bytes], control: Mapping[int, str]) -> str:
    """A digest of a vocabulary: each token's bytes in id order (control tokens empty), with
    trailing empty ids dropped, then the control tokens' ids and texts (an embedding padded past the tokenizer, as Qwen2's 151,936 rows
    for 151,665 tokens, or a GGUF's unused padding tokens). Equal digests mean equal token ids
    for equal text. llama.cpp's ``token_to_piece`` and a Hugging Face tokenizer's own decoder
    (:class:`~tandem.runtime.hf_tokenizer.HFTokenizer`) give the same bytes for the same
    vocabulary, so a GGUF edge model and a transformers cloud model of one family match."""
    table = list(pieces)
    while table and not table[-1]:
        table.pop()
    h = hashlib.sha256()
    for piece in table:
        h.update(len(piece).to_bytes(4, "little"))
        h.update(piece)
    h.update(f"|{len(table)}|".encode())
    for token, text in sorted(control.items()):
        h.update(f"{token}:{len(text)}:".encode() + text.encode())
    return h.hexdigest()[:16]


def _ewma(old: float | None, new: float, weight: float = 0.3) -> float:
    return new if old is None else old + weight * (new - old)


@dataclass
class GammaController:
    """Chooses γ for each verify round of a task's answers (shared by them: what it learns about
    the link and the models carries over from one answer to the next). Thread-safe.

    It keeps moving averages of: the acceptance rate α (per draft token, estimated from the
    accepted count and whether the round ended on a rejection), the edge's draft time per
    token, the round trip (wall time of a verify request minus the worker's own compute time,
    which the reply carries: no two clocks compared), the worker's verify time per number of
    rows, the edge's own time per round besides those (bookkeeping, emitting the tokens), and
    a plain cloud stream's time per token and to its first token. Its choice maximises tokens
    per second:

        rate(γ) = E[tokens | α, γ] / (γ · t_draft + t_rtt + t_verify(γ + 1) + t_edge)

    With ``fallback`` it returns :data:`STREAM` (stream the rest from the cloud) when a stream
    is expected to finish the L tokens left sooner (L: the answer's tokens left, at most the
    average answer): L · t_stream (+ t_first mid-answer, where a stream means a new prompt) <
    L / rate(γ*). Its first rounds try γ = 4, 2, 8 (to fit the verify times), then one answer
    is streamed to measure t_stream; while it prefers streaming, every ``reprobe_every``-th
    answer drafts one round, so a link or a draft model that got better is noticed. ``gamma``
    fixes γ (no adaptation, no fallback).
    """

    gamma: int | None = None
    max_gamma: int = 8
    prior_acceptance: float = 0.7
    fallback: bool = True
    reprobe_every: int = 32
    _hits: float = field(default=0.0, init=False)
    _trials: float = field(default=0.0, init=False)
    _rounds: int = field(default=0, init=False)
    _draft_s: float | None = field(default=None, init=False)
    _rtt_s: float | None = field(default=None, init=False)
    _edge_s: float = field(default=0.0, init=False)
    _verify_s: dict[int, float] = field(default_factory=dict, init=False)
    _stream_s: float | None = field(default=None, init=False)
    _first_s: float | None = field(default=None, init=False)
    _length: float | None = field(default=None, init=False)
    _answers: int = field(default=0, init=False)
    _probed: int = field(default=-1, init=False)  # the answer whose re-probe round was given
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.gamma is not None and not 1 <= self.gamma <= MAX_GAMMA:
            raise ValueError(f"gamma: expected 1..{MAX_GAMMA}, got {self.gamma}")
        if not 1 <= self.max_gamma <= MAX_GAMMA:
            raise ValueError(f"max_gamma: expected 1..{MAX_GAMMA}, got {self.max_gamma}")

    # ------------------------------------------------------------------ estimates
    @property
    def acceptance(self) -> float:
        prior = 4.0  # pseudo-trials behind the prior
        return (self._hits + prior * self.prior_acceptance) / (self._trials + prior)

    def verify_time(self, rows: int) -> float | None:
        """The worker's expected compute time for ``rows`` verify rows: the average measured
        for that many, else a least-squares line through the sizes measured (or, with one
        size known, that time)."""
        v = self._verify_s
        if rows in v:
            return v[rows]
        if not v:
            return None
        if len(v) == 1:
            return next(iter(v.values()))
        xs = np.array(list(v), float)
        ys = np.array(list(v.values()))
        slope, icpt = np.polyfit(xs, ys, 1)
        return max(float(icpt + max(slope, 0.0) * rows), 1e-6)

    def rate(self, gamma: int) -> float | None:
        """Expected tokens per second of drafting with ``gamma`` (None: not measured yet)."""
        tv = self.verify_time(gamma + 1)
        if tv is None or self._rtt_s is None or self._draft_s is None:
            return None
        cost = gamma * self._draft_s + self._rtt_s + tv + self._edge_s
        return expected_tokens(self.acceptance, gamma) / cost

    def snapshot(self) -> dict[str, float | None]:
        """The estimates, for results and logs (ms, and the acceptance rate)."""
        ms = lambda s: None if s is None else round(s * 1e3, 3)  # noqa: E731
        return {
            "acceptance": round(self.acceptance, 4),
            "rtt_ms": ms(self._rtt_s),
            "draft_ms": ms(self._draft_s),
            "verify1_ms": ms(self.verify_time(1)),
            "edge_ms": ms(self._edge_s),
            "stream_ms": ms(self._stream_s),
        }

    # ------------------------------------------------------------------ choosing
    def begin_answer(self) -> None:
        with self._lock:
            self._answers += 1

    def choose(self, remaining: int, first: bool = False) -> int:
        """γ for the next round (at most ``remaining`` − 1: the cloud adds one token; 0 with one
        token left), or :data:`STREAM`: stream the rest without drafting. ``first``: the
        answer's first round (a stream then costs no extra prompt)."""
        cap = min(self.max_gamma, remaining - 1)
        if cap < 1:
            return 0
        if self.gamma is not None:
            return min(self.gamma, cap)
        with self._lock:
            if self._rounds < len(EXPLORE):
                return min(EXPLORE[self._rounds], cap)
            if self.fallback and self._stream_s is None and first:
                return STREAM  # measure a stream once
            rates = {g: self.rate(g) or 0.0 for g in range(1, cap + 1)}
            best = max(rates, key=rates.__getitem__)
            if not self.fallback or rates[best] <= 0.0 or self._stream_s is None:
                return best
            length = min(float(remaining), self._length or float(remaining))
            stream = length * self._stream_s + (0.0 if first else self._first_s or 0.0)
            if stream >= length / rates[best]:
                return best
            n = self._answers
            if first and self.reprobe_every and n % self.reprobe_every == 0 and n != self._probed:
                self._probed = n  # one round of drafting, then decide again
                return best
            return STREAM

    # ------------------------------------------------------------------ measuring
    def observe_round(
        self,
        gamma: int,
        accepted: int,
        *,
        draft_s: float,
        wall_s: float,
        compute_s: float,
        prefilled: int,
        round_s: float | None = None,
    ) -> None:
        """One verify round: γ drafted, ``accepted`` kept; ``draft_s`` the edge's drafting
        time, ``wall_s`` the request's round trip as the edge timed it, ``compute_s`` the
        worker's time for it, ``prefilled`` the prompt tokens it had to run first (a new or
        evicted session: its compute time is not a verify time); ``round_s`` the whole round
        on the edge (the rest is the edge's own overhead)."""
        with self._lock:
            if round_s is not None:
                self._edge_s = _ewma(self._edge_s, max(round_s - draft_s - wall_s, 0.0))
            self._rounds += 1
            if gamma:
                self._hits += accepted
                self._trials += accepted + (1 if accepted < gamma else 0)
                self._draft_s = _ewma(self._draft_s, draft_s / gamma)
            self._rtt_s = _ewma(self._rtt_s, max(wall_s - compute_s, 0.0))
            if not prefilled:
                rows = gamma + 1
                self._verify_s[rows] = _ewma(self._verify_s.get(rows), compute_s)

    def observe_stream(self, first_s: float, per_token_s: float) -> None:
        """A plain cloud stream's first-token time and time per later token."""
        with self._lock:
            self._first_s = _ewma(self._first_s, first_s)
            if math.isfinite(per_token_s) and per_token_s > 0:
                self._stream_s = _ewma(self._stream_s, per_token_s)

    def observe_answer(self, tokens: int) -> None:
        with self._lock:
            self._length = _ewma(self._length, float(tokens))
