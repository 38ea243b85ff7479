"""What a ``generate`` or a ``verify`` asks of the worker: its payload, every field's type and
size checked before anything is built from it. A bad field raises
:class:`~tandem.runtime.errors.BadRequest` naming the request's kind and the field.

:class:`PayloadFields` is the one place for the checks both kinds share (a map of known fields,
the model's name, a seed, numbers, the sampling parameters); :func:`parse_generate` and
:func:`parse_verify` add their own fields. The worker acts only on what they return:
:class:`~tandem.cloud.streams.WorkerStreams` runs a :class:`GenerateRequest`,
:class:`~tandem.cloud.verify.VerifyTable` a :class:`VerifyRequest`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from tandem.cloud.config import VerifySessionLimits
from tandem.runtime.chat import ChatBackend, Message, check_messages
from tandem.runtime.errors import BadRequest
from tandem.runtime.generation import MAX_STOP_STRINGS, BackendStream, SamplingParams
from tandem.runtime.wire import MAX_BUDGET_US

GENERATE_FIELDS = frozenset(
    {
        "model",
        "prompt",
        "messages",
        "prefix",
        "max_tokens",
        "temperature",
        "top_p",
        "seed",
        "stop",
        "first_token_ms",
    }
)
VERIFY_FIELDS = frozenset(
    {
        "model",
        "session",
        "pos",
        "tokens",
        "draft",
        "q_ids",
        "q_probs",
        "temperature",
        "top_p",
        "seed",
        "max_tokens",
        "vocab",
        "end",
    }
)
SESSION_ID_BYTES = 16
MAX_DRAFT = 64  # draft tokens a request may carry; those past speculative.max_gamma are ignored
_Q_TOLERANCE = 1e-6  # how far a draft distribution's sum may be from 1
_DEFAULTS = SamplingParams()


class PayloadFields:
    """A request's payload, read one checked field at a time. Made only from a map whose keys
    are all in ``known``; errors start with ``kind`` (``"generate"``, ``"verify"``)."""

    __slots__ = ("kind", "p")

    def __init__(self, kind: str, payload: Any, known: frozenset[str], shape: str) -> None:
        if type(payload) is not dict:
            raise BadRequest(f"{kind} payload must be a map {shape}")
        unknown = payload.keys() - known
        if unknown:
            shown = sorted(repr(k) for k in unknown)[:8]
            raise BadRequest(f"{kind}: unknown field(s) {', '.join(shown)}")
        self.kind = kind
        self.p: dict[Any, Any] = payload

    def __contains__(self, key: str) -> bool:
        return key in self.p

    def bad(self, what: str) -> BadRequest:
        return BadRequest(f"{self.kind}: {what}")

    def string(self, key: str, default: str | None = None) -> str:
        v = self.p.get(key, default)
        if type(v) is not str:
            raise self.bad(f"{key} must be a string")
        return v

    def number(self, key: str, default: float) -> float:
        v = self.p.get(key, default)
        if type(v) is not float and type(v) is not int:
            raise self.bad(f"{key} must be a number, got {type(v).__name__}")
        return float(v)

    def int_list(self, key: str, limit: int) -> list[int]:
        v = self.p.get(key, [])
        if type(v) is not list or len(v) > limit or any(type(t) is not int for t in v):
            raise self.bad(f"{key} must be a list of at most {limit} integers")
        return v

    def sampling(
        self, max_tokens: int = _DEFAULTS.max_tokens, stop: tuple[str, ...] = ()
    ) -> SamplingParams:
        """``max_tokens``, ``temperature``, ``top_p`` and ``seed`` (absent: ``max_tokens``
        and :class:`SamplingParams`' defaults) as :class:`SamplingParams`, which checks their
        ranges and the ``stop`` strings."""
        n = self.p.get("max_tokens", max_tokens)
        if type(n) is not int:
            raise self.bad("max_tokens must be an integer")
        seed = self.p.get("seed")
        if seed is not None and (type(seed) is not int or not 0 <= seed < 1 << 64):
            raise self.bad("seed must be nil or an integer in [0, 2**64)")
        return SamplingParams(
            max_tokens=n,
            temperature=self.number("temperature", _DEFAULTS.temperature),
            top_p=self.number("top_p", _DEFAULTS.top_p),
            seed=seed,
            stop=stop,
        )


# ---------------------------------------------------------------------- generate
@dataclass(frozen=True, slots=True)
class GenerateRequest:
    """A validated ``generate`` payload: a raw ``prompt``, or chat ``messages`` that the
    model renders with its own template, continued after ``prefix`` (the assistant's text so
    far, when the edge hands an answer over)."""

    model: str
    prompt: str  # "" with messages
    params: SamplingParams
    first_token_ms: int | None = None
    messages: list[Message] | None = None
    prefix: str = ""  # with messages

    def start(self, backend: Any, cancel: threading.Event) -> BackendStream:
        """The backend's token stream for this request."""
        if self.messages is None:
            return backend.stream(self.prompt, self.params, cancel=cancel)
        if not isinstance(backend, ChatBackend):
            raise BadRequest(f"model {self.model!r} does not take chat messages; send a prompt")
        return backend.stream_chat(self.messages, self.params, prefix=self.prefix, cancel=cancel)


def parse_generate(payload: Any, max_prompt_bytes: int) -> GenerateRequest:
    """Check every field's type and size before building anything from it; a bad one raises
    :class:`BadRequest` naming the field. ``model`` and ``prompt`` are required; the sampling
    fields default to :class:`SamplingParams`' defaults."""
    f = PayloadFields("generate", payload, GENERATE_FIELDS, "{model, prompt, max_tokens, ...}")
    model = f.string("model")
    messages = None
    if "messages" in f:
        if "prompt" in f:
            raise f.bad("send a prompt or messages, not both")
        messages = check_messages(f.p["messages"])
        prompt, prefix = "", f.string("prefix", "")
        texts = [prefix, *(v for m in messages for v in m.values())]
    else:
        if "prefix" in f:
            raise f.bad("prefix goes with messages")
        prompt, prefix = f.string("prompt"), ""
        texts = [prompt]
    # a str of n characters is at least n bytes of UTF-8: the cheap check first
    if (
        sum(map(len, texts)) > max_prompt_bytes
        or sum(len(t.encode("utf-8", "surrogatepass")) for t in texts) > max_prompt_bytes
    ):
        raise f.bad(
            f"prompt over {max_prompt_bytes} bytes of UTF-8 (this worker's "
            "generation.max_prompt_bytes)"
        )
    stop = f.p.get("stop", [])
    if type(stop) is not list or len(stop) > MAX_STOP_STRINGS:
        raise f.bad(f"stop must be a list of at most {MAX_STOP_STRINGS} strings")
    first = f.p.get("first_token_ms")
    if first is not None and (type(first) is not int or not 0 <= first <= MAX_BUDGET_US // 1000):
        raise f.bad("first_token_ms must be nil or an integer of ms >= 0")
    params = f.sampling(stop=tuple(stop))
    return GenerateRequest(model, prompt, params, first, messages, prefix)


# ---------------------------------------------------------------------- verify
@dataclass(slots=True)
class VerifyRequest:
    """A ``verify`` payload whose fields have the right types and sizes (token ranges are
    checked against the model); :mod:`tandem.cloud.verify` says what each field means."""

    model: str
    session: bytes
    pos: int
    tokens: list[int]
    draft: list[int]
    q_ids: np.ndarray | None
    q_probs: np.ndarray | None
    params: SamplingParams
    max_tokens: int
    vocab: str | None
    end: bool


def parse_verify(payload: Any, limits: VerifySessionLimits) -> VerifyRequest:
    """Check every field of a ``verify`` payload; :class:`BadRequest` naming the bad one."""
    f = PayloadFields("verify", payload, VERIFY_FIELDS, "{model, session, pos, tokens, draft, ...}")
    model = f.string("model")
    session = f.p.get("session")
    if type(session) is not bytes or len(session) != SESSION_ID_BYTES:
        raise f.bad(f"session must be {SESSION_ID_BYTES} bytes")
    pos = f.p.get("pos", 0)
    if type(pos) is not int or not 0 <= pos <= limits.max_prompt_tokens + (1 << 16):
        raise f.bad("pos must be a non-negative integer")
    tokens = f.int_list("tokens", limits.max_prompt_tokens)
    draft = f.int_list("draft", MAX_DRAFT)
    vocab = f.p.get("vocab")
    if vocab is not None and (type(vocab) is not str or len(vocab) > 64):
        raise f.bad("vocab must be a digest string")
    end = f.p.get("end", False)
    if type(end) is not bool:
        raise f.bad("end must be a boolean")
    params = f.sampling(max_tokens=1)  # checks the ranges
    q_ids, q_probs = f.p.get("q_ids"), f.p.get("q_probs")
    if params.temperature > 0.0 and draft:
        _check_q(q_ids, q_probs, draft, limits.max_support)
    else:
        q_ids = q_probs = None
    if len(draft) > limits.max_gamma:  # verify a prefix: fewer accepted, never a wrong token
        draft = draft[: limits.max_gamma]
        if q_ids is not None and q_probs is not None:
            q_ids, q_probs = q_ids[: limits.max_gamma], q_probs[: limits.max_gamma]
    return VerifyRequest(
        model, session, pos, tokens, draft, q_ids, q_probs, params, params.max_tokens, vocab, end
    )


def _check_q(q_ids: Any, q_probs: Any, draft: list[int], max_support: int) -> None:
    """The draft distribution: (γ, k) arrays, probabilities that sum to 1 per row and give each
    draft token a positive probability (it was drawn from them)."""
    g = len(draft)
    if not (
        isinstance(q_ids, np.ndarray)
        and isinstance(q_probs, np.ndarray)
        and q_ids.dtype == np.int32
        and q_probs.dtype == np.float64
        and q_ids.ndim == 2
        and q_ids.shape == q_probs.shape
        and q_ids.shape[0] == g
        and 1 <= q_ids.shape[1] <= max_support
    ):
        raise BadRequest(
            f"verify: sampling needs q_ids (int32) and q_probs (float64) arrays shaped "
            f"({g}, k), 1 <= k <= {max_support}"
        )
    if not (np.isfinite(q_probs).all() and (q_probs >= 0).all()):
        raise BadRequest("verify: q_probs must be finite and non-negative")
    if (np.abs(q_probs.sum(axis=1) - 1.0) > _Q_TOLERANCE).any():
        raise BadRequest("verify: each row of q_probs must sum to 1")
    drafted = np.asarray(draft)[:, None]
    if not ((q_ids == drafted) & (q_probs > 0)).any(axis=1).all():
        raise BadRequest("verify: each draft token needs a positive probability in its q row")
