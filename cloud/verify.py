"""The worker's speculative-decoding sessions: ``verify`` requests, each answered by one result.

A session is one answer being verified: the cloud model's KV cache for its sequence (prompt +
the answer so far), kept between the edge's rounds, so a round runs only the draft tokens. The
math is :func:`tandem.runtime.speculative.verify`.

Request payload (every field checked before use, by
:func:`~tandem.cloud.payloads.parse_verify`; unknown fields refused)::

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
token ends the answer), ``done`` (the session is dropped: EOS, or ``max_tokens`` made), ``pos``
(the sequence length now: the edge's next ``pos``), ``prefilled`` (tokens run besides the
draft: the prompt of a new session), ``compute_us`` (this worker's time for the request) and
``version``.

A session belongs to the peer that opened it (its routing identity, as a stream's ``cancel``
is checked against the stream's): a session id names a session only together with the peer
that sends it, so another peer naming it is answered as for an id never made here, and can
neither advance it nor end it (``pos`` 0 opens a session of its own).

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
from collections.abc import Sequence
from typing import Any

from tandem.cloud.config import VerifySessionLimits
from tandem.cloud.payloads import VerifyRequest, parse_verify
from tandem.runtime.backends import LocalGenerationBackend
from tandem.runtime.errors import BadRequest, OverloadedError, SessionLost, UnknownModel
from tandem.runtime.generation import SessionLease, token_confidence
from tandem.runtime.speculative import (
    backend_vocab_digest,
    cut_at_end,
    shared_prefix,
    verify,
    verify_rng,
)

log = logging.getLogger(__name__)

SessionKey = tuple[tuple[bytes, ...], bytes]  # (the opening peer's route, the session id)


class Session:
    """One answer's state: its sequence (every token so far) and the backend session whose KV
    cache holds all of it but the last token."""

    __slots__ = ("key", "lease", "limit", "model", "n_cached", "rng", "sequence", "used")

    def __init__(
        self,
        key: SessionKey,
        model: str,
        lease: SessionLease,
        sequence: list[int],
        req: VerifyRequest,
    ) -> None:
        self.key = key
        self.model = model
        self.lease = lease
        self.sequence = sequence
        self.n_cached = shared_prefix(lease.cached_tokens, sequence[:-1])  # tokens its cache holds
        self.rng = verify_rng(req.params.seed, len(sequence))
        self.limit = len(sequence) + req.max_tokens  # the sequence's length when it is done
        self.used = time.monotonic()


class VerifyTable:
    """The worker's sessions (see the module docstring). Used by the worker loop's thread
    only."""

    def __init__(self, limits: VerifySessionLimits, backends: dict[str, Any]) -> None:
        self.limits = limits
        self.backends = backends
        # least recently used first
        self.sessions: OrderedDict[SessionKey, Session] = OrderedDict()
        self.nbytes = 0
        self.counters: Counter[str] = Counter()
        self._digests: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self.sessions)

    def run(self, payload: Any, route: Sequence[bytes] = ()) -> dict[str, Any]:
        """Answer one ``verify`` payload from the peer at ``route`` (its routing frames: the
        sessions it may name are those it opened) with the result payload, or raise a
        TandemError."""
        t0 = time.perf_counter()
        req = parse_verify(payload, self.limits)
        backend = self._backend(req.model)
        self.expire(time.monotonic())
        key = (tuple(route), req.session)
        sess = self.sessions.get(key)
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
            sess = self._open(key, req, backend)
            prefilled = len(sess.sequence) - sess.n_cached - 1
        else:
            sess.sequence.extend(req.tokens)
            prefilled = len(req.tokens)
            self.sessions.move_to_end(sess.key)
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

    def _round(
        self, sess: Session, req: VerifyRequest, backend: LocalGenerationBackend
    ) -> dict[str, Any]:
        seq, draft = sess.sequence, req.draft
        n_vocab = int(backend.n_vocab)
        if any(not 0 <= t < n_vocab for t in draft) or any(
            not 0 <= t < n_vocab for t in req.tokens
        ):
            raise BadRequest(f"verify: token ids must be in 0..{n_vocab - 1}")
        if req.q_ids is not None and ((req.q_ids < 0) | (req.q_ids >= n_vocab)).any():
            raise BadRequest(f"verify: q_ids must be in 0..{n_vocab - 1}")
        lease = sess.lease
        lease.truncate(sess.n_cached)
        rows = lease.extend(seq[sess.n_cached :] + draft, len(draft) + 1)
        accepted, token = verify(rows, draft, req.q_ids, req.q_probs, req.params, sess.rng)
        eos = backend.eos_tokens
        accepted, token = cut_at_end(draft, accepted, token, eos)
        lease.truncate(len(seq) + accepted)
        new = [*draft[:accepted], token]
        seq.extend(new)
        sess.n_cached = len(seq) - 1  # every token but the last: the next round runs it first
        return {
            "accepted": accepted,
            "token": token,
            "logprobs": [token_confidence(rows[i], t)[0] for i, t in enumerate(new)],
            "eos": token in eos,
            "pos": len(seq),
        }

    def _backend(self, model: str) -> LocalGenerationBackend:
        backend = self.backends.get(model)
        if backend is None:
            raise UnknownModel(f"no model {model!r} here; serving: {', '.join(self.backends)}")
        if not isinstance(backend, LocalGenerationBackend):
            raise BadRequest(f"model {model!r} cannot verify drafts (not a gguf/transformers LM)")
        return backend

    def _digest(self, model: str, backend: LocalGenerationBackend) -> str:
        if model not in self._digests:
            self._digests[model] = backend_vocab_digest(backend)
        return self._digests[model]

    def _open(
        self, key: SessionKey, req: VerifyRequest, backend: LocalGenerationBackend
    ) -> Session:
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
        want = len(req.tokens) + req.max_tokens + self.limits.max_gamma + 1
        if backend.n_ctx:
            want = min(want, int(backend.n_ctx))
        while len(self.sessions) >= self.limits.max_sessions:
            self._evict()
        while True:
            try:
                lease = backend.lease(req.tokens, want)
                break
            except OverloadedError:
                if not self._evict(req.model):
                    raise
        if lease.nbytes > self.limits.max_session_bytes:
            lease.close()
            raise OverloadedError(
                f"a session of {req.model!r} needs {lease.nbytes} bytes of KV cache, over "
                f"speculative.max_session_bytes ({self.limits.max_session_bytes})"
            )
        while self.nbytes + lease.nbytes > self.limits.max_session_bytes:
            if not self._evict():  # the accounting is off: never loop on it
                lease.close()
                raise OverloadedError("no room for a speculative session")
        sess = Session(key, req.model, lease, list(req.tokens), req)
        self.sessions[key] = sess
        self.nbytes += lease.nbytes
        self.counters["verify_sessions"] += 1
        return sess

    def make_room(self, model: str, backend: Any) -> None:
        """A stream of ``model`` is starting: if speculative sessions hold all of the model's
        slots (llama.cpp contexts, transformers streams), the least recently used gives its
        slot up (it resyncs; a stream could not)."""
        if (
            isinstance(backend, LocalGenerationBackend)
            and backend.free_slots() == 0
            and self._evict(model)
        ):
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
        if self.sessions.pop(sess.key, None) is not None:
            self.nbytes -= sess.lease.nbytes
            sess.lease.close()

    def expire(self, now: float) -> None:
        """Drop sessions idle for longer than ``ttl_s`` (the oldest are first)."""
        while self.sessions:
            sess = next(iter(self.sessions.values()))
            if now - sess.used < self.limits.ttl_s:
                return
            self.counters["verify_expired"] += 1
            self._drop(sess)

    def close(self) -> None:
        for sess in list(self.sessions.values()):
            self._drop(sess)

    def health(self) -> dict[str, Any]:
        return {"sessions": len(self.sessions), "session_bytes": self.nbytes, **self.counters}
