"""Generation: what every language-model backend shares.

* :class:`SamplingParams` — max tokens, temperature, top-p, seed, stop strings.
* :class:`TokenStep` — one generated token: id, the text it adds, its log-probability under the
  model (temperature 1) and the entropy of the distribution it was drawn from (nats).
* :class:`GenerationBackend` — the Protocol: ``stream(prompt, params, cancel=)`` returns a
  :class:`BackendStream` (iterate for steps; afterwards ``finish_reason`` says why it ended).
* :class:`LogitsSession` and :func:`decode` — the decode loop for backends that expose each
  step's logits row (llama.cpp, transformers): sampling, token confidence from
  :func:`tandem.kernels.confidence_row`, EOS, stop strings (held back until they cannot be the
  start of a stop string, and never shown), cancellation between tokens.

Mid-stream hand-off works on text: a backend asked to continue an answer gets
``prompt + answer_so_far`` as its prompt, so any two backends can hand over whatever their
tokenizers.
"""

from __future__ import annotations

import codecs
import math
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from tandem.kernels.confidence import confidence_row
from tandem.runtime.errors import BadRequest

MAX_STOP_STRINGS = 8
MAX_STOP_CHARS = 64
MIN_TEMPERATURE = 1e-2  # below it, softmax(row / T) overflows to NaN in float64 for big logits


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to generate. ``temperature`` 0 is greedy (argmax); ``seed`` makes sampling
    repeatable; the ``stop`` strings end the answer and are not part of it."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 1 <= self.max_tokens <= 1 << 16:
            raise BadRequest(f"max_tokens: expected 1..65536, got {self.max_tokens}")
        t = self.temperature
        if not (math.isfinite(t) and (t == 0.0 or MIN_TEMPERATURE <= t <= 100.0)):
            raise BadRequest(f"temperature: expected 0 (greedy) or {MIN_TEMPERATURE}..100, got {t}")
        if not (math.isfinite(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise BadRequest(f"top_p: expected a number in (0, 1], got {self.top_p}")
        if len(self.stop) > MAX_STOP_STRINGS or any(
            not isinstance(s, str) or not 0 < len(s) <= MAX_STOP_CHARS or not is_utf8(s)
            for s in self.stop
        ):
            raise BadRequest(
                f"stop: expected at most {MAX_STOP_STRINGS} non-empty strings of at most "
                f"{MAX_STOP_CHARS} characters, got {self.stop!r}"
            )


@dataclass(slots=True)
class TokenStep:
    """One generated token. ``logprob`` is log p(token) under the model at temperature 1;
    ``entropy`` the entropy (nats) of that distribution, None where the backend cannot see it
    (an OpenAI-compatible server returns log-probs only)."""

    token: int
    text: str
    logprob: float
    entropy: float | None = None
    drafted: bool = False  # speculative decoding: the edge drafted it and the cloud accepted it


class FinishReason:
    STOP = "stop"  # EOS or a stop string
    LENGTH = "length"  # max_tokens reached
    CANCELLED = "cancelled"


class BackendStream:
    """An iterator of :class:`TokenStep`; once exhausted, ``finish_reason`` is set and
    ``prompt_tokens`` says how many tokens the prompt took. ``close()`` stops the generation
    (the backend's state is released at the next token boundary)."""

    def __init__(self, steps: Iterator[TokenStep], prompt_tokens: int = 0) -> None:
        self._steps = steps
        self.prompt_tokens = prompt_tokens
        self.finish_reason: str | None = None

    def __iter__(self) -> BackendStream:
        return self

    def __next__(self) -> TokenStep:
        try:
            return next(self._steps)
        except StopIteration as e:
            if self.finish_reason is None:
                self.finish_reason = e.value or FinishReason.STOP
            raise

    def close(self) -> None:
        close = getattr(self._steps, "close", None)
        if close is not None:
            close()
        if self.finish_reason is None:
            self.finish_reason = FinishReason.CANCELLED


@runtime_checkable
class GenerationBackend(Protocol):
    """A loaded language model that streams tokens."""

    name: str
    version: str

    def stream(
        self, prompt: str, params: SamplingParams, *, cancel: threading.Event | None = None
    ) -> BackendStream:
        """Generate a continuation of ``prompt``. Raises :class:`BadRequest` for a prompt the
        model cannot take (unknown characters, longer than its context)."""
        ...

    def warm_up(self) -> None: ...

    def close(self) -> None: ...


class LogitsSession(Protocol):
    """One sequence's state in a model that exposes its logits (a KV cache). Rows are float32
    (n_vocab,) arrays, valid until the next call."""

    def prefill(self, tokens: Sequence[int]) -> np.ndarray:
        """Forget everything, run ``tokens``; the logits row for the next token."""
        ...

    def append(self, token: int) -> np.ndarray:
        """Run one more token; the logits row for the one after it."""
        ...


class SessionLease(LogitsSession, Protocol):
    """A :class:`LogitsSession` a caller holds across requests (a speculative-decoding session
    on the worker, or the edge's draft): it scores several tokens in one pass, rolls back, and
    is handed back to its backend with ``close()``."""

    nbytes: int  # memory the session holds (its KV cache)

    @property
    def cached_tokens(self) -> Sequence[int]:
        """The tokens in the cache, in order."""
        ...

    def extend(self, tokens: Sequence[int], n_rows: int) -> np.ndarray:
        """Run ``tokens`` after those held; the logits (float32 copy) after each of the last
        ``n_rows`` of them, shape (n_rows, n_vocab). Token ids outside the vocabulary and a
        full context raise :class:`BadRequest`."""
        ...

    def truncate(self, n: int) -> None:
        """Keep only the first ``n`` held tokens."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class LocalGenerationBackend(GenerationBackend, Protocol):
    """A language model whose tokens and KV caches live in this process (``gguf``,
    ``transformers``): what speculative decoding needs on either side — the edge drafts on one,
    a worker verifies on one. An ``openai`` backend is a :class:`GenerationBackend` only.
    Callers ask ``isinstance(backend, LocalGenerationBackend)``, never ``hasattr``."""

    n_ctx: int  # the longest sequence (prompt + answer) it takes, in tokens
    n_vocab: int
    control_tokens: Mapping[int, str]  # id → text of the control tokens (in vocab digests)
    chat: Any  # its tandem.runtime.chat.ChatTemplate (chat_tokens renders with it)

    def stream_chat(
        self,
        messages: list[dict[str, str]],
        params: SamplingParams,
        *,
        prefix: str = "",
        cancel: threading.Event | None = None,
    ) -> BackendStream:
        """The assistant's answer to ``messages``, rendered by ``chat``, continuing after
        ``prefix``."""
        ...

    def tokenize(self, text: str, *, special: bool = False) -> list[int]:
        """Token ids of ``text``, BOS first where the model adds one; with ``special`` (a
        rendered chat template) control tokens are parsed. :class:`BadRequest` for text the
        vocabulary cannot take."""
        ...

    def piece(self, token: int) -> bytes:
        """The bytes ``token`` adds to the text (b"" for control tokens)."""
        ...

    @property
    def eos_tokens(self) -> frozenset[int]:
        """Tokens that end an answer."""
        ...

    def free_slots(self) -> int:
        """Sequences that can still start (streams and leases share them)."""
        ...

    def lease(self, prompt: Sequence[int] = (), n_ctx: int | None = None) -> SessionLease:
        """A sequence held until ``close()`` (its KV cache kept where it shares a prefix with
        ``prompt``). :class:`~tandem.runtime.errors.OverloadedError` when none is free."""
        ...


BatchItem = tuple[SessionLease, Sequence[int], int]
"""One sequence's share of a batched forward: (its lease, the tokens to append, how many
logits rows to return — those after each of the last ``n_rows`` tokens; 0 for a prefill chunk
whose logits nobody reads)."""


@runtime_checkable
class BatchedBackend(Protocol):
    """A :class:`LocalGenerationBackend` whose leases run together: one forward over several
    sequences, each at its own position (continuous batching, as vLLM and llama.cpp's server
    step every active sequence at once). The worker's engine (:mod:`tandem.cloud.engine`)
    steps streams and speculative sessions through it."""

    def run_batch(self, work: Sequence[BatchItem]) -> list[np.ndarray]:
        """For each ``(lease, tokens, n_rows)`` of ``work`` (leases of this backend, each at
        most once): append ``tokens`` to the lease's sequence and return the logits after each
        of the last ``n_rows`` of them, float32 ``(n_rows, n_vocab)``, a copy. Token ids outside
        the vocabulary or a sequence past its context raise :class:`BadRequest` before anything
        runs; on any failure no lease's ``cached_tokens`` changed."""
        ...


def run_one_by_one(work: Sequence[BatchItem]) -> list[np.ndarray]:
    """:meth:`BatchedBackend.run_batch` for leases that run one sequence at a time
    (``extend``): same contract — if one fails, the leases that ran before it are rolled back
    to what they held, so no lease's ``cached_tokens`` changed."""
    held = [len(lease.cached_tokens) for lease, _, _ in work]
    out: list[np.ndarray] = []
    try:
        for lease, tokens, n_rows in work:
            rows = lease.extend(tokens, max(n_rows, 1))
            out.append(rows[len(rows) - n_rows :])
    except BaseException:
        for (lease, _, _), n in zip(work[: len(out)], held, strict=False):
            lease.truncate(n)
        raise
    return out


def is_utf8(text: str) -> bool:
    """False for text that cannot be UTF-8 (lone surrogates, e.g. from a JSON ``\\ud800``)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def check_prompt(prompt: str) -> None:
    """:class:`BadRequest` unless ``prompt`` is a string that can travel as UTF-8."""
    if not isinstance(prompt, str) or not is_utf8(prompt):
        raise BadRequest("the prompt must be text that UTF-8 can encode (no lone surrogates)")


def check_fits(model: str, prompt_tokens: int, params: SamplingParams, n_ctx: int) -> None:
    """:class:`BadRequest` unless the prompt and ``max_tokens`` fit the model's context."""
    if prompt_tokens + params.max_tokens > n_ctx:
        raise BadRequest(
            f"model {model!r}: prompt ({prompt_tokens} tokens) + max_tokens "
            f"({params.max_tokens}) exceeds its context of {n_ctx} tokens"
        )


def distribution(row: np.ndarray, params: SamplingParams) -> np.ndarray:
    """The distribution the next token is drawn from (float64, sums to 1): softmax(row / T)
    restricted to the top-p nucleus and renormalised; at temperature 0, all mass on the argmax
    (lowest id on ties). Speculative decoding compares the draft's and the target's."""
    if params.temperature == 0.0:
        p = np.zeros(len(row), np.float64)
        p[int(np.argmax(row))] = 1.0
        return p
    z = row.astype(np.float64) / params.temperature
    z -= z.max()
    p = np.exp(z)
    p /= p.sum()
    if params.top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        keep = order[: int(np.searchsorted(np.cumsum(p[order]), params.top_p)) + 1]
        q = np.zeros_like(p)
        q[keep] = p[keep]
        p = q / q.sum()
    return p


def sample(row: np.ndarray, params: SamplingParams, rng: np.random.Generator | None) -> int:
    """The next token from a logits row: argmax at temperature 0 (lowest id on ties), else a
    draw from :func:`distribution`."""
    if params.temperature == 0.0 or rng is None:
        return int(np.argmax(row))
    p = distribution(row, params)
    return int(rng.choice(len(p), p=p))


def token_confidence(row: np.ndarray, token: int) -> tuple[float, float]:
    """``(log p(token), entropy)`` of ``softmax(row)``, from one pass of the confidence kernel:
    with m the max logit, log-sum-exp = m − log(max_prob), so log p(t) = row[t] − m +
    log(max_prob). NaN/inf rows give (−inf, nan)."""
    top1, max_prob, _, entropy = confidence_row(row)
    if top1 < 0 or max_prob <= 0.0:
        return -math.inf, math.nan
    return float(row[token] - row[top1]) + math.log(max_prob), entropy


class TokenText:
    """Tokens as an answer shows them — the one token post-processing path, for the decode loop
    (:func:`decode`) and the edge's speculative drafts alike: each token's bytes joined by an
    incremental UTF-8 decoder (a character split over tokens shows once complete), EOS ends the
    answer, and stop strings are held back while they could still begin and cut where they
    hit (never shown). After ``ended``, nothing more is taken."""

    def __init__(
        self, piece: Callable[[int], bytes], eos: frozenset[int], stops: Sequence[str] = ()
    ) -> None:
        self._piece, self._eos = piece, eos
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stops = StopFilter(tuple(stops)) if stops else None
        self.ended = False  # EOS or a stop string

    def push(
        self, token: int, logprob: float, entropy: float | None = None, *, drafted: bool = False
    ) -> list[TokenStep]:
        """The steps now safe to show after ``token`` (none once ``ended``)."""
        if self.ended:
            return []
        if token in self._eos:
            self.ended = True
            return self.flush()
        step = TokenStep(token, self._utf8.decode(self._piece(token)), logprob, entropy, drafted)
        if self.stops is None:
            return [step]
        ready, self.ended = self.stops.push(step)
        return ready

    def flush(self) -> list[TokenStep]:
        """What is held back, at the end of the answer (or of this tier's part of it)."""
        return [] if self.stops is None else self.stops.flush()


@dataclass(slots=True)
class StopFilter:
    """Holds generated text back while it could still be the start of a stop string."""

    stops: tuple[str, ...]
    pending: list[TokenStep] = field(default_factory=list)  # held back
    text: str = ""  # their text

    def push(self, step: TokenStep) -> tuple[list[TokenStep], bool]:
        """Steps now safe to emit, and whether a stop string was hit (then the steps are
        those before it, the last one's text cut where the stop string starts)."""
        self.pending.append(step)
        self.text += step.text
        hit = min((i for i in (self.text.find(s) for s in self.stops) if i >= 0), default=-1)
        if hit >= 0:
            return self.cut_at(hit), True
        keep = max((_overlap(self.text, s) for s in self.stops), default=0)
        return self._cut(len(self.text) - keep), False

    def cut_at(self, hit: int) -> list[TokenStep]:
        """The pending steps before character ``hit`` of their text (where a stop string
        starts), the last one cut there; nothing stays pending."""
        out = self._cut(hit)
        cut = hit - sum(len(s.text) for s in out)
        if self.pending and cut > 0:  # the token the stop string starts inside
            first = self.pending[0]
            out.append(
                TokenStep(
                    first.token, first.text[:cut], first.logprob, first.entropy, first.drafted
                )
            )
        self.pending, self.text = [], ""
        return out

    def straddles(self, more: str) -> int | None:
        """Where a stop string that begins in the pending text and goes on into ``more`` (text
        that follows it from elsewhere: the cloud taking over) starts, or None."""
        joined = self.text + more
        hits = [i for i in (joined.find(s) for s in self.stops) if 0 <= i < len(self.text)]
        return min(hits, default=None)

    def _cut(self, at: int) -> list[TokenStep]:
        """Emit the pending steps whose text ends at or before ``at``."""
        out: list[TokenStep] = []
        pos = 0
        while self.pending and pos + len(self.pending[0].text) <= at:
            step = self.pending.pop(0)
            pos += len(step.text)
            out.append(step)
        self.text = self.text[pos:]
        return out

    def flush(self) -> list[TokenStep]:
        out, self.pending, self.text = self.pending, [], ""
        return out


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``stop``."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0


def decode(
    session: LogitsSession,
    prompt: Sequence[int],
    params: SamplingParams,
    *,
    piece: Callable[[int], bytes],
    eos: frozenset[int],
    cancel: threading.Event | None = None,
) -> Iterator[TokenStep]:
    """The decode loop over a :class:`LogitsSession`: prefill, then sample → confidence →
    stop check → append, one token at a time. Returns (as the generator's value) the finish
    reason. ``piece(token)`` is the token's bytes (UTF-8 is decoded incrementally, so a
    character split over tokens is shown once complete)."""
    rng = np.random.default_rng(params.seed) if params.temperature > 0 else None
    text = TokenText(piece, eos, params.stop)
    row = session.prefill(prompt)
    for i in range(params.max_tokens):
        if cancel is not None and cancel.is_set():
            return FinishReason.CANCELLED
        token = sample(row, params, rng)
        yield from text.push(token, *token_confidence(row, token))
        if text.ended:
            return FinishReason.STOP
        if i + 1 < params.max_tokens:
            row = session.append(token)
    yield from text.flush()
    return FinishReason.LENGTH
