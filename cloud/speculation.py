"""The worker's speculative-decoding sessions: ``verify`` requests, each answered by one result.

A session is one answer being verified: the cloud model's KV cache for its sequence (prompt +
the answer so far), kept between the edge's rounds, so a round runs only the draft tokens. The
math is :func:`tandem.runtime.speculative.verify`.

Request payload (every field checked before use; unknown fields refused)::

    model       str
    session     16 bytes, chosen by the edge (random)
    pos         how many tokens of the sequence the edge believes this session holds (0: new)
    tokens      [int], the sequence from ``pos`` on (a new session: the whole prompt)
    draft       [int], γ draft tokens (at most 64; only the first speculative.max_gamma
                are verified)
    q_ids       int32 (γ, k) array    } the draft's distribution at each drafted position,
    q_probs     float64 (γ, k) array  } sparse (probability 0 pads); sampling only
    temperature, top_p, seed           the sampling parameters, as ``generate``'s
    max_tokens  answer tokens the session may still make (from ``tokens``' end): it is
                dropped once it has made them, and its cache is sized for them
    vocab       the edge's :func:`~tandem.runtime.speculative.vocab_digest` (a new session)
    end         true: drop the session now (no draft; answers {"closed": bool})

Result payload: ``accepted`` (draft tokens kept), ``token`` (the model's own next token),
``logprobs`` (of the ``accepted + 1`` tokens, under the model at temperature 1), ``eos`` (the
token ends the answer), ``done`` (the session is dropped: EOS, or ``max_tokens`` made), ``pos`` (the sequence length now: the edge's
next ``pos``), ``prefilled`` (tokens run besides the draft: the prompt of a new session),
``compute_us`` (this worker's time for the request) and ``version``.

A session whose ``pos`` does not match — never made here, expired, evicted, or a lost reply
left the edge behind — is answered :class:`SessionLost`; the edge sends the whole sequence
again with ``pos`` 0 (slower, never wrong). Sessions are bounded in number
(``speculative.max_sessions``) and memory (``max_session_bytes``; a backend session's KV
cache), expire after ``ttl_s`` idle, and the least recently used goes first when a new one
needs room (a llama.cpp context or a transformers stream slot included). A request runs on
the worker loop's thread, at once: a verify pass is one forward over γ+1 tokens.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from tandem.cloud.config import SpeculativeSpec
from tandem.runtime.errors import BadRequest, OverloadedError, SessionLost, UnknownModel
from tandem.runtime.generation import SamplingParams, SessionLease, token_confidence
from tandem.runtime.speculative import backend_vocab_digest, cut_at_end, verify, verify_rng

log = logging.getLogger(__name__)

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


@dataclass(slots=True)
class VerifyRequest:
    """A ``verify`` payload whose fields have the right types and sizes (token ranges are
    checked against the model)."""

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


def _int_list(p: dict, key: str, limit: int) -> list[int]:
    v = p.get(key, [])
    if type(v) is not list or len(v) > limit or any(type(t) is not int for t in v):
        raise BadRequest(f"verify: {key} must be a list of at most {limit} integers")
    return v


def _number(p: dict, key: str, default: float) -> float:
    v = p.get(key, default)
    if type(v) is not float and type(v) is not int:
        raise BadRequest(f"verify: {key} must be a number")
    return float(v)


def parse_verify(p: Any, spec: SpeculativeSpec) -> VerifyRequest:
    """Check every field of a ``verify`` payload; :class:`BadRequest` naming the bad one."""
    if type(p) is not dict:
        raise BadRequest("verify payload must be a map {model, session, pos, tokens, draft, ...}")
    unknown = p.keys() - VERIFY_FIELDS
    if unknown:
        raise BadRequest(f"verify: unknown field(s) {', '.join(sorted(map(repr, unknown))[:8])}")
    model, session = p.get("model"), p.get("session")
    if type(model) is not str:
        raise BadRequest("verify: model must be a string")
    if type(session) is not bytes or len(session) != SESSION_ID_BYTES:
        raise BadRequest(f"verify: session must be {SESSION_ID_BYTES} bytes")
    pos = p.get("pos", 0)
    if type(pos) is not int or not 0 <= pos <= spec.max_prompt_tokens + (1 << 16):
        raise BadRequest("verify: pos must be a non-negative integer")
    tokens = _int_list(p, "tokens", spec.max_prompt_tokens)
    draft = _int_list(p, "draft", MAX_DRAFT)
    max_tokens = p.get("max_tokens", 1)
    if type(max_tokens) is not int or not 1 <= max_tokens <= 1 << 16:
        raise BadRequest("verify: max_tokens must be an integer in 1..65536")
    seed = p.get("seed")
    if seed is not None and (type(seed) is not int or not 0 <= seed < 1 << 64):
        raise BadRequest("verify: seed must be nil or an integer in [0, 2**64)")
    vocab = p.get("vocab")
    if vocab is not None and (type(vocab) is not str or len(vocab) > 64):
        raise BadRequest("verify: vocab must be a digest string")
    end = p.get("end", False)
    if type(end) is not bool:
        raise BadRequest("verify: end must be a boolean")
    params = SamplingParams(  # checks the ranges
        max_tokens=max_tokens,
        temperature=_number(p, "temperature", 0.0),
        top_p=_number(p, "top_p", 1.0),
        seed=seed,
    )
    q_ids, q_probs = p.get("q_ids"), p.get("q_probs")
    if params.temperature > 0.0 and draft:
        _check_q(q_ids, q_probs, draft, spec.max_support)
    else:
        q_ids = q_probs = None
    if len(draft) > spec.max_gamma:  # verify a prefix: fewer accepted, never a wrong token
        draft = draft[: spec.max_gamma]
        if q_ids is not None and q_probs is not None:
            q_ids, q_probs = q_ids[: spec.max_gamma], q_probs[: spec.max_gamma]
    return VerifyRequest(
        model, session, pos, tokens, draft, q_ids, q_probs, params, max_tokens, vocab, end
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


def _shared_prefix(held: Any, tokens: list[int]) -> int:
    """How many leading ``tokens`` a reused cache (``held``) already holds."""
    n = min(len(held), len(tokens))
    differ = np.flatnonzero(np.asarray(held[:n]) != np.asarray(tokens[:n]))
    return int(differ[0]) if differ.size else n


class Session:
    """One answer's state: its sequence (every token so far) and the backend session whose KV
    cache holds all of it but the last token."""

    __slots__ = ("held", "id", "lease", "limit", "model", "rng", "sequence", "used")

    def __init__(
        self, sid: bytes, model: str, lease: SessionLease, sequence: list[int], req: VerifyRequest
    ) -> None:
        self.id = sid
        self.model = model
        self.lease = lease
        self.sequence = sequence
        self.held = _shared_prefix(lease.held, sequence[:-1])  # tokens its cache holds
        self.rng = verify_rng(req.params.seed, len(sequence))
        self.limit = len(sequence) + req.max_tokens  # the sequence's length when it is done
        self.used = time.monotonic()


class VerifyTable:
    """The worker's sessions (see the module docstring). Used by the worker loop's thread
    only."""

    def __init__(self, spec: SpeculativeSpec, backends: dict[str, Any]) -> None:
        self.spec = spec
        self.backends = backends
        self.sessions: OrderedDict[bytes, Session] = OrderedDict()  # least recently used first
        self.nbytes = 0
        self.counters: Counter[str] = Counter()
        self._digests: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self.sessions)

    def run(self, payload: Any) -> dict[str, Any]:
        """Answer one ``verify`` payload (the result payload), or raise a TandemError."""
        t0 = time.perf_counter()
        req = parse_verify(payload, self.spec)
        backend = self._backend(req.model)
        self.expire(time.monotonic())
        sess = self.sessions.get(req.session)
        if req.end:
            if sess is not None:
                self._drop(sess)
            return {"closed": sess is not None}
        if sess is not None and (
            sess.model != req.model or req.pos == 0 or len(sess.sequence) != req.pos
        ):
            self._drop(sess)  # out of step, or the edge starts over under the same id
            sess = None
        if sess is None and req.pos:
            self.counters["verify_lost"] += 1
            raise SessionLost(
                "no speculative session with that id holds the sequence up to pos "
                f"{req.pos} (expired, evicted or never made): send the whole sequence, pos 0"
            )
        prefilled = 0
        if sess is None:
            sess = self._open(req, backend)
            prefilled = len(sess.sequence) - sess.held - 1
        else:
            sess.sequence.extend(req.tokens)
            prefilled = len(req.tokens)
            self.sessions.move_to_end(sess.id)
        try:
            out = self._round(sess, req, backend)
        except Exception:
            self._drop(sess)  # its cache may hold anything now: never reuse it
            raise
        sess.used = time.monotonic()
        out["done"] = out["eos"] or len(sess.sequence) >= sess.limit
        if out["done"]:
            self._drop(sess)
        self.counters["verify_rounds"] += 1
        self.counters["verify_drafted"] += len(req.draft)
        self.counters["verify_accepted"] += out["accepted"]
        out.update(
            prefilled=prefilled,
            compute_us=int((time.perf_counter() - t0) * 1e6),
            version=backend.version,
        )
        return out

    def _round(self, sess: Session, req: VerifyRequest, backend: Any) -> dict[str, Any]:
        seq, draft = sess.sequence, req.draft
        n_vocab = int(backend.n_vocab)
        if any(not 0 <= t < n_vocab for t in draft) or any(
            not 0 <= t < n_vocab for t in req.tokens
        ):
            raise BadRequest(f"verify: token ids must be in 0..{n_vocab - 1}")
        if req.q_ids is not None and ((req.q_ids < 0) | (req.q_ids >= n_vocab)).any():
            raise BadRequest(f"verify: q_ids must be in 0..{n_vocab - 1}")
        lease = sess.lease
        lease.truncate(sess.held)
        rows = lease.extend(seq[sess.held :] + draft, len(draft) + 1)
        accepted, token = verify(rows, draft, req.q_ids, req.q_probs, req.params, sess.rng)
        eos = backend.eos_tokens
        accepted, token = cut_at_end(draft, accepted, token, eos)
        lease.truncate(len(seq) + accepted)
        new = [*draft[:accepted], token]
        seq.extend(new)
        sess.held = len(seq) - 1  # every token but the last: the next round runs it first
        return {
            "accepted": accepted,
            "token": token,
            "logprobs": [token_confidence(rows[i], t)[0] for i, t in enumerate(new)],
            "eos": token in eos,
            "pos": len(seq),
        }

    def _backend(self, model: str) -> Any:
        backend = self.backends.get(model)
        if backend is None:
            raise UnknownModel(f"no model {model!r} here; serving: {', '.join(self.backends)}")
        if not hasattr(backend, "lease"):
            raise BadRequest(f"model {model!r} cannot verify drafts (not a gguf/transformers LM)")
        return backend

    def _digest(self, model: str, backend: Any) -> str:
        if model not in self._digests:
            self._digests[model] = backend_vocab_digest(backend)
        return self._digests[model]

    def _open(self, req: VerifyRequest, backend: Any) -> Session:
        if not req.tokens:
            raise BadRequest("verify: a new session needs its prompt tokens (pos 0, tokens)")
        if req.vocab is None:
            raise BadRequest("verify: a new session (pos 0) needs vocab, the draft model's digest")
        if req.vocab != self._digest(req.model, backend):
            raise BadRequest(
                f"verify: the draft model's vocabulary differs from {req.model!r}'s (digest "
                f"{req.vocab!r}, expected {self._digest(req.model, backend)!r}): drafts are token "
                "ids, so both models need the same tokenizer"
            )
        n_ctx = int(getattr(backend, "n_ctx", 0)) or None
        want = len(req.tokens) + req.max_tokens + self.spec.max_gamma + 1
        if n_ctx is not None:
            want = min(want, n_ctx)
        while len(self.sessions) >= self.spec.max_sessions:
            self._evict()
        while True:
            try:
                lease = backend.lease(req.tokens, want)
                break
            except OverloadedError:
                if not self._evict(req.model):
                    raise
        if lease.nbytes > self.spec.max_session_bytes:
            lease.close()
            raise OverloadedError(
                f"a session of {req.model!r} needs {lease.nbytes} bytes of KV cache, over "
                f"speculative.max_session_bytes ({self.spec.max_session_bytes})"
            )
        while self.nbytes + lease.nbytes > self.spec.max_session_bytes:
            if not self._evict():  # the accounting is off: never loop on it
                lease.close()
                raise OverloadedError("no room for a speculative session")
        sess = Session(req.session, req.model, lease, list(req.tokens), req)
        self.sessions[sess.id] = sess
        self.nbytes += lease.nbytes
        self.counters["verify_sessions"] += 1
        return sess

    def make_room(self, model: str, backend: Any) -> None:
        """A stream of ``model`` is starting: if speculative sessions hold all of the model's
        slots (llama.cpp contexts, transformers streams), the least recently used gives its
        slot up (it resyncs; a stream could not)."""
        free = getattr(backend, "free_slots", None)
        if free is not None and free() == 0 and self._evict(model):
            self.counters["verify_yielded"] += 1

    def _evict(self, model: str | None = None) -> bool:
        """Drop the least recently used session (of ``model``, if given); False if none."""
        for sess in self.sessions.values():
            if model is None or sess.model == model:
                self.counters["verify_evicted"] += 1
                self._drop(sess)
                return True
        return False

    def _drop(self, sess: Session) -> None:
        if self.sessions.pop(sess.id, None) is not None:
            self.nbytes -= sess.lease.nbytes
            sess.lease.close()

    def expire(self, now: float) -> None:
        """Drop sessions idle for longer than ``ttl_s`` (the oldest are first)."""
        while self.sessions:
            sess = next(iter(self.sessions.values()))
            if now - sess.used < self.spec.ttl_s:
                return
            self.counters["verify_expired"] += 1
            self._drop(sess)

    def close(self) -> None:
        for sess in list(self.sessions.values()):
            self._drop(sess)

    def health(self) -> dict[str, Any]:
        return {"sessions": len(self.sessions), "session_bytes": self.nbytes, **self.counters}
