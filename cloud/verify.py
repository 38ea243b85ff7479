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
needs room (a llama.cpp sequence or a transformers stream slot included).

A round runs on the model's engine (:mod:`tandem.cloud.engine`) as a sequence with γ + 1
positions in that step, beside the model's streams and other sessions; a new session's prompt
runs first, in prefill chunks. The table stays on the socket thread: it admits the request,
marks the session busy (one round at a time: another request for it is answered
``Overloaded`` with a retry hint; it is neither evicted nor expired meanwhile), and answers
once the engine posts the round's result back.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from tandem.cloud.config import VerifySessionLimits
from tandem.cloud.engine import Engine, Job
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
    cache holds all of it but the last token. ``busy`` while a round runs on the engine (the
    engine alone touches ``lease`` and ``sequence`` then)."""

    __slots__ = (
        "busy",
        "closing",
        "engine",
        "key",
        "lease",
        "limit",
        "model",
        "n_cached",
        "nbytes",
        "rng",
        "sequence",
        "used",
        "want",
    )

    def __init__(
        self, key: SessionKey, model: str, sequence: list[int], req: VerifyRequest
    ) -> None:
        self.key = key
        self.model = model
        self.lease: SessionLease | None = None  # opened by the first round, on the engine
        self.engine: Engine | None = None  # the engine that holds the lease (set as it opens)
        self.sequence = sequence
        self.n_cached = 0  # tokens its cache holds
        self.rng = verify_rng(req.params.seed, len(sequence))
        self.limit = len(sequence) + req.max_tokens  # the sequence's length when it is done
        self.used = time.monotonic()
        self.busy = False
        self.closing = False  # ended (or dropped) while busy: dropped when the round is back
        self.want = 0  # the context the lease is opened for
        self.nbytes = 0  # of KV cache the table counts for it (an estimate until it opens)


class VerifyRound(Job):
    """One verify request on the model's engine: opens the session's lease (a new session),
    rolls its cache back to what it keeps, runs the draft (a new session: its prompt first, in
    the engine's prefill chunks), and applies :func:`~tandem.runtime.speculative.verify`.
    ``done(result, error)`` runs on the socket thread, posted through ``post``."""

    def __init__(
        self,
        sess: Session,
        req: VerifyRequest,
        post: Callable[[Callable[[], None]], None],
        done: Callable[[dict[str, Any] | None, BaseException | None], None],
    ) -> None:
        self.sess = sess
        self.req = req
        self._post = post
        self._done = done
        self.todo: list[int] = []
        self.n_rows = len(req.draft) + 1
        self.prefill = len(req.tokens) + (len(sess.sequence) if sess.lease is None else 0)
        self.prefilled = len(req.tokens)  # tokens run besides the draft and the last one

    def start(self, backend: Any) -> None:
        sess = self.sess
        if sess.lease is None:
            sess.lease = backend.lease(sess.sequence, sess.want)
            sess.n_cached = shared_prefix(sess.lease.cached_tokens, sess.sequence[:-1])
            self.prefilled = len(sess.sequence) - sess.n_cached - 1
        sess.lease.truncate(sess.n_cached)
        # a state that cannot roll back part of the way (a recurrent model) was emptied
        sess.n_cached = min(sess.n_cached, len(sess.lease.cached_tokens))
        self.lease = sess.lease  # the session's: it stays open after the round
        self.todo = sess.sequence[sess.n_cached :] + self.req.draft
        self._eos = backend.eos_tokens

    def take(self, rows: np.ndarray) -> None:
        sess, req = self.sess, self.req
        seq, draft = sess.sequence, req.draft
        accepted, token = verify(rows, draft, req.q_ids, req.q_probs, req.params, sess.rng)
        accepted, token = cut_at_end(draft, accepted, token, self._eos)
        assert sess.lease is not None
        sess.lease.truncate(len(seq) + accepted)
        new = [*draft[:accepted], token]
        seq.extend(new)
        # every token but the last (the next round runs it first), or what a state that
        # cannot roll back still holds
        sess.n_cached = min(len(seq) - 1, len(sess.lease.cached_tokens))
        out = {
            "accepted": accepted,
            "token": token,
            "logprobs": [token_confidence(rows[i], t)[0] for i, t in enumerate(new)],
            "eos": token in self._eos,
            "pos": len(seq),
        }
        self.done = True
        self._post(lambda: self._done(out, None))

    def fail(self, exc: BaseException) -> None:
        self._post(lambda: self._done(None, exc))


def _check_ids(req: VerifyRequest, n_vocab: int) -> None:
    if any(not 0 <= t < n_vocab for t in req.draft) or any(
        not 0 <= t < n_vocab for t in req.tokens
    ):
        raise BadRequest(f"verify: token ids must be in 0..{n_vocab - 1}")
    if req.q_ids is not None and ((req.q_ids < 0) | (req.q_ids >= n_vocab)).any():
        raise BadRequest(f"verify: q_ids must be in 0..{n_vocab - 1}")


class VerifyTable:
    """The worker's sessions (see the module docstring). Used by the worker loop's thread
    only; each model's leases are opened, run and closed on its engine (``engines``)."""

    def __init__(
        self, limits: VerifySessionLimits, backends: dict[str, Any], engines: dict[str, Engine]
    ) -> None:
        self.limits = limits
        self.backends = backends
        self.engines = engines
        # least recently used first
        self.sessions: OrderedDict[SessionKey, Session] = OrderedDict()
        self.nbytes = 0
        self.counters: Counter[str] = Counter()
        self._digests: dict[str, str] = {}
        self._bytes_per_token: dict[str, float] = {}  # KV bytes per token of context, per model

    def __len__(self) -> int:
        return len(self.sessions)

    def begin(
        self,
        payload: Any,
        route: Sequence[bytes],
        post: Callable[[Callable[[], None]], None],
        done: Callable[[dict[str, Any] | None, BaseException | None], None],
    ) -> dict[str, Any] | None:
        """Take one ``verify`` payload from the peer at ``route`` (its routing frames: the
        sessions it may name are those it opened): the result payload now (an ``end``), or
        None once its round is on the model's engine — ``done(result, error)`` then runs on
        this thread (through ``post``) with the round's result payload or error. Raises a
        TandemError for a request that cannot run."""
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
        if sess is not None and sess.busy:
            raise OverloadedError(
                "a verify round of this session is still running: send the next one after its "
                "answer",
                retry_after_ms=5.0,
            )
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
        _check_ids(req, int(backend.n_vocab))
        if sess is None:
            sess = self._open(key, req, backend)
        else:
            if len(sess.sequence) + len(req.tokens) + len(req.draft) > sess.want:
                self._drop(sess)
                raise BadRequest(
                    f"verify: the session holds {len(sess.sequence)} tokens of the {sess.want} "
                    "it was opened for (its prompt + max_tokens): start a new one"
                )
            sess.sequence.extend(req.tokens)
            self.sessions.move_to_end(sess.key)
        sess.used = time.monotonic()
        new = sess.lease is None

        def finish(out: dict[str, Any] | None, error: BaseException | None) -> None:
            try:
                sess.busy = False
                sess.used = time.monotonic()
                if new and sess.lease is not None:  # its real size for the estimate
                    self.nbytes += sess.lease.nbytes - sess.nbytes
                    sess.nbytes = sess.lease.nbytes
                    self._bytes_per_token[req.model] = sess.nbytes / max(sess.want, 1)
                if error is not None or out is None:
                    self._drop(sess)  # its cache may hold anything now: never reuse it
                    done(None, error or RuntimeError("verify round ended without a result"))
                    return
                result = self._result(out, sess, req, round_.prefilled, t0, backend)
                if not result["done"] and not sess.closing:
                    self._fit_bytes(sess)
                if result["done"] or sess.closing or sess.key not in self.sessions:
                    result["done"] = True  # dropped: the edge goes on without it
                    self._drop(sess)
            except Exception as e:  # a bug of ours: still one answer
                log.exception("verify: finishing a round failed")
                self._drop(sess)
                done(None, e)
                return
            done(result, None)

        sess.busy = True
        round_ = VerifyRound(sess, req, post, finish)
        try:
            assert sess.engine is not None
            sess.engine.submit(round_)
        except BaseException:
            sess.busy = False
            self._drop(sess)
            raise
        return None

    def _result(
        self,
        out: dict[str, Any],
        sess: Session,
        req: VerifyRequest,
        prefilled: int,
        t0: float,
        backend: Any,
    ) -> dict[str, Any]:
        out["done"] = out["eos"] or len(sess.sequence) >= sess.limit
        self.counters["verify_rounds"] += 1
        self.counters["verify_drafted"] += len(req.draft)
        self.counters["verify_accepted"] += out["accepted"]
        out.update(
            prefilled=prefilled,
            compute_us=int((time.perf_counter() - t0) * 1e6),
            version=backend.version,
        )
        return out

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

    def _open(self, key: SessionKey, req: VerifyRequest, backend: Any) -> Session:
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
        # the KV cache it will hold, from the model's sessions so far (exact once it opens)
        nbytes = int(self._bytes_per_token.get(req.model, 0.0) * want)
        if nbytes > self.limits.max_session_bytes:
            raise OverloadedError(
                f"a session of {req.model!r} for {want} tokens needs about {nbytes} bytes of KV "
                f"cache, over speculative.max_session_bytes ({self.limits.max_session_bytes})"
            )
        while len(self.sessions) >= self.limits.max_sessions or (
            self.nbytes + nbytes > self.limits.max_session_bytes
        ):
            if not self._evict():
                raise OverloadedError(
                    "every speculative session is running a round; retry soon", retry_after_ms=5.0
                )
        self.engines[req.model].admits(len(req.tokens))  # before anyone gives its slot up
        self.make_room(req.model, backend)
        sess = Session(key, req.model, list(req.tokens), req)
        sess.engine = self.engines[req.model]
        sess.want = want
        sess.nbytes = nbytes
        self.nbytes += nbytes
        self.sessions[key] = sess
        self.counters["verify_sessions"] += 1
        return sess

    def _fit_bytes(self, keep: Session) -> None:
        """Evict the least recently used sessions while the table holds more KV cache than
        ``max_session_bytes`` (a new session's size is known once its lease is open)."""
        while self.nbytes > self.limits.max_session_bytes:
            victim = next((s for s in self.sessions.values() if not s.busy and s is not keep), None)
            if victim is None:
                if keep.key in self.sessions and self.nbytes > self.limits.max_session_bytes:
                    self._drop(keep)
                return
            self.counters["verify_evicted"] += 1
            self._drop(victim)

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
        """Drop the least recently used idle session (of ``model``, if given); False if
        none."""
        for sess in self.sessions.values():
            if not sess.busy and (model is None or sess.model == model):
                self.counters["verify_evicted"] += 1
                self._drop(sess)
                return True
        return False

    def _drop(self, sess: Session) -> None:
        """Forget a session and close its lease on its engine; a busy one is dropped when its
        round is back."""
        if sess.busy:
            sess.closing = True
            return
        if self.sessions.pop(sess.key, None) is None:
            return
        self.nbytes -= sess.nbytes
        lease, sess.lease = sess.lease, None
        if lease is not None and sess.engine is not None:
            sess.engine.call(lease.close)

    def expire(self, now: float) -> None:
        """Drop sessions idle for longer than ``ttl_s`` (the least recently used are first;
        one running a round is not idle)."""
        stale = []
        for sess in self.sessions.values():
            if now - sess.used < self.limits.ttl_s:
                break
            if not sess.busy:
                stale.append(sess)
        for sess in stale:
            self.counters["verify_expired"] += 1
            self._drop(sess)

    def forget_model(self, model: str) -> None:
        """``model`` was replaced or unloaded (the model admin, on this thread): its sessions
        end — an idle one now (its edge's next round gets :class:`SessionLost` and starts over
        on the new version), one running a round when the round is back (answered ``done``):
        a round never mixes two versions. What the table learned of the model goes too."""
        for sess in [s for s in self.sessions.values() if s.model == model]:
            self._drop(sess)
        self._digests.pop(model, None)
        self._bytes_per_token.pop(model, None)

    def close(self) -> None:
        for sess in list(self.sessions.values()):
            sess.busy = False
            self._drop(sess)

    def health(self) -> dict[str, Any]:
        return {"sessions": len(self.sessions), "session_bytes": self.nbytes, **self.counters}
