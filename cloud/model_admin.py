"""Loading, replacing and unloading a running worker's models: by SIGHUP or by ``admin`` message.
(Over 500 lines: why) one operation's whole life — the message, the loader thread, the switch on
the loop thread and the old version's retirement — is one state machine, kept in one place.

The worker's models directory (its ``manifest.json``) and its config's ``models`` subset (and
``experts``) say what the worker serves. Operations, one at a time:

==========  ==================================================================================
``list``    what is served (versions, formats), what is loading or retiring, the admin state
``load``    serve ``model``, a manifest entry not served yet
``replace`` read ``model``'s manifest entry again (a new version, file, digest) and serve it
``unload``  stop serving ``model``
``reload``  reconcile everything with the config file and the manifest as they are now: load
            what is new, replace what changed (version, digest, file, hosted experts), unload
            what is gone. Of the config, only ``models``, ``models_dir`` and ``experts`` take
            effect; a change to any other key is logged as needing a restart and ignored.
==========  ==================================================================================

**Admin message** (wire kind ``admin``): payload ``{"op": str, "model": str | nil}`` (``model``
for ``load``/``replace``/``unload`` only; nothing else allowed), answered once the operation is
done with a ``result`` ``{"op", "changes": [{"model", "action", "version", "previous"}],
"models": {name: version}}`` (``list``: :meth:`ModelAdmin.status`), or a typed error: the
load's own (``config`` for a bad digest or manifest, ``backend``, ``unknown_model``...),
``admin_busy`` while another operation runs, ``unauthorized`` unless the config says
``admin: {enabled: true}`` — and, with Curve on, the sender's key is in
``admin.allowed_clients``: whoever may send work must not be able to unload the models others
depend on. **SIGHUP** asks for a ``reload`` (one that arrives during an operation runs after
it); its outcome is logged.

**How a version changes.** The new version is opened, its digest checked and warmed up on a
loader thread (one at a time) while the loop keeps serving the old one; anything that fails
there refuses the whole operation (a ``reload`` is all or nothing) and the old versions keep
serving. The switch itself happens on the loop thread, which owns the tables: ``infer``
requests still queued for the model run on the old version first, then the one reference in
the backend table (and the model's engine, for a local language model) is replaced, so every
request admitted after it runs on the new version. What runs elsewhere keeps the object it
started with: an ``experts`` call on its offload thread, a stream on the old engine (or its
thread), a verify round; the model's idle speculative sessions end (the edge's next round gets
``session_lost`` and starts over on the new version). The old version is then *retired*, the
edge's word (:mod:`tandem.edge.model_swap`): closed once nothing uses it (its engine has no job
left and no stream holds it); ``health`` shows it as ``previous`` with its ``in_flight`` count
meanwhile, and a version being loaded as ``next``.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from tandem.cloud.config import WorkerConfig, load_worker_config
from tandem.cloud.engine import Engine
from tandem.cloud.idempotency import MAX_JOINED_ROUTES
from tandem.cloud.loading import manifest_entry, open_model
from tandem.runtime.backends import LocalGenerationBackend
from tandem.runtime.curve import ClientAllowList
from tandem.runtime.errors import (
    AdminBusy,
    BackendError,
    BadRequest,
    ShuttingDown,
    TandemError,
    Unauthorized,
    UnknownModel,
)
from tandem.runtime.manifest import ModelEntry, load_manifest
from tandem.runtime.wire import Envelope, Kind

log = logging.getLogger("tandem.cloud.worker")

OPS = ("list", "load", "replace", "unload", "reload")
_NAMED_OPS = frozenset({"load", "replace", "unload"})
RELOADABLE_KEYS = frozenset({"models", "models_dir", "experts"})
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")  # a manifest entry's name
_PAYLOAD = "admin payload: {op: list|load|replace|unload|reload, model: a model name or nil}"


@runtime_checkable
class Closeable(Protocol):
    """A backend that holds something to free (a llama.cpp context, an HTTP client)."""

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class AdminRequest:
    op: str
    model: str | None


def parse_admin(payload: Any) -> AdminRequest:
    """An ``admin`` payload, checked; :class:`BadRequest` saying what is expected."""
    if not isinstance(payload, dict) or not set(payload) <= {"op", "model"}:
        raise BadRequest(_PAYLOAD)
    op, model = payload.get("op"), payload.get("model")
    if type(op) is not str or op not in OPS:
        raise BadRequest(f"{_PAYLOAD}; got op {str(op)[:40]!r}")
    if op in _NAMED_OPS:
        if type(model) is not str or not _NAME.match(model):
            raise BadRequest(f"admin {op} needs a model name (letters, digits, ._+-)")
    elif model is not None:
        raise BadRequest(f"admin {op} takes no model")
    return AdminRequest(op, model)


def _identity(entry: ModelEntry, config: WorkerConfig) -> tuple[Any, ...]:
    """What makes a served version different from another (a ``reload`` replaces a model whose
    identity changed)."""
    hosted = (config.experts or {}).get(entry.name)
    return (entry.version, entry.sha256, entry.format, entry.file, entry.url, entry.model, hosted)


@dataclass(slots=True)
class Change:
    """One model's change, prepared on the loader thread."""

    model: str
    action: str  # "loaded" | "replaced" | "unloaded"
    backend: Any = None  # the new version, opened and warm (None: unloaded)
    identity: tuple[Any, ...] | None = None


@dataclass(slots=True)
class Operation:
    """The admin operation running (at most one). ``routes``: who to answer (none: SIGHUP)."""

    req: AdminRequest
    env: Envelope | None
    routes: list[list[Any]]
    started: float
    loading: dict[str, str] = field(default_factory=dict)  # model → the version being opened


@dataclass(slots=True)
class Retiring:
    """A replaced or unloaded version, closed once nothing uses it."""

    model: str
    version: str
    backend: Any
    engine: Engine | None


class ModelAdmin:
    """The worker's model admin (see the module docstring). Everything but the loading runs on
    the worker loop's thread. ``config_path``: the file the worker's config came from (a
    ``reload`` reads it again; None: only the manifest is read again)."""

    # worker: the CloudWorker (not imported: it imports this module)
    def __init__(self, worker: Any, config_path: str | Path | None = None) -> None:
        self.worker = worker
        self.config_path = Path(config_path) if config_path is not None else None
        self._file_config = self._read_file() if self.config_path is not None else None
        self.running: Operation | None = None
        self.working = False  # the loader runs: the loop polls its mailbox
        self.due = False  # the loop calls turn(): a SIGHUP to serve, or versions to retire
        self._signalled = False
        self.retiring: list[Retiring] = []
        self.last: dict[str, Any] | None = None  # the last operation's outcome
        self._identities: dict[str, tuple[Any, ...] | None] = self._served_identities()
        spec, curve = worker.config.admin, worker.config.curve
        self._allow: ClientAllowList | None = None
        if spec.enabled and curve is not None and spec.allowed_clients is not None:
            self._allow = ClientAllowList(spec.allowed_clients, log)
        elif spec.enabled and curve is None:
            log.warning("admin messages are on and curve is off: any client can change models")

    # ------------------------------------------------------------------ the loop's side
    def signal_reload(self) -> None:
        """SIGHUP: a ``reload`` at the loop's next turn. Safe from a signal handler."""
        self._signalled = True
        self.due = True

    def turn(self) -> None:
        """The loop's call while ``due``: start a signalled reload, retire what is unused."""
        if self._signalled and self.running is None and not self.worker.draining:
            self._signalled = False
            log.info("SIGHUP: reloading the models from the config and the manifest")
            self._start(AdminRequest("reload", None), None, [])
        if self.retiring:
            self._reap()
        self.due = self._signalled or bool(self.retiring)

    def on_message(self, route: list[Any], env: Envelope, user_id: bytes | None) -> Envelope | None:
        """An ``admin`` message: the reply now (``list``, or an error raised), or None when it
        is answered once its operation is done."""
        self._authorize(user_id)
        req = parse_admin(env.payload)
        if req.op == "list":
            return env.reply(Kind.RESULT, self.status())
        if self.worker.draining:
            raise ShuttingDown("worker is draining; its models no longer change")
        running = self.running
        if running is not None:
            if running.env is not None and running.env.id == env.id:  # a resend: one answer
                if running.req != req:
                    raise BadRequest(
                        "this request id is running here as another admin operation "
                        f"({running.req.op} {running.req.model or ''}): use a new id"
                    )
                if len(running.routes) >= MAX_JOINED_ROUTES:
                    raise BadRequest(
                        f"this admin operation is running with {len(running.routes)} tries "
                        "waiting for its answer; wait for it instead of sending it again"
                    )
                running.routes.append(route)
                return None
            what = running.req.op + (f" {running.req.model}" if running.req.model else "")
            raise AdminBusy(
                f"this worker is busy with `{what}` (for {time.monotonic() - running.started:.1f}"
                " s); one admin operation at a time: send this one once that one is answered"
            )
        backends = self.worker.backends
        if req.op == "load" and req.model in backends:
            raise BadRequest(f"model {req.model!r} is served already; to change it: replace")
        if req.op in ("replace", "unload") and req.model not in backends:
            raise UnknownModel(
                f"model {req.model!r} is not served here (serving: {', '.join(backends)})"
                + ("; to serve it: load" if req.op == "replace" else "")
            )
        self._start(req, env, [route])
        return None

    def _authorize(self, user_id: bytes | None) -> None:
        spec = self.worker.config.admin
        if not spec.enabled:
            self.worker.counters["admin_refused"] += 1
            raise Unauthorized(
                "admin messages are off on this worker: its config needs `admin: {enabled: "
                "true}` (and, with curve, the sender's key in admin.allowed_clients); nothing "
                "was changed"
            )
        if user_id is not None and (
            self._allow is None or not self._allow.admits(user_id, time.monotonic())
        ):
            self.worker.counters["admin_refused"] += 1
            raise Unauthorized(
                "this client's Curve key is not in the worker's admin.allowed_clients: it may "
                "send work but not change models; nothing was changed"
            )

    def _start(self, req: AdminRequest, env: Envelope | None, routes: list[list[Any]]) -> None:
        op = self.running = Operation(req, env, routes, time.monotonic())
        if req.op == "unload":  # nothing to load: done now, on this thread
            self._finish(op, [Change(str(req.model), "unloaded")], None, (self.worker.config, None))
            return
        config = self.worker.config
        served = dict(self._identities)
        self.working = True
        thread = threading.Thread(
            target=self._prepare, args=(op, config, served), name="tandem-model-admin", daemon=True
        )
        try:
            thread.start()
        except BaseException:
            self.running, self.working = None, False
            raise

    # ------------------------------------------------------------------ the loader thread
    def _prepare(
        self, op: Operation, config: WorkerConfig, served: dict[str, tuple[Any, ...] | None]
    ) -> None:
        """Open (check, warm up) what ``op`` needs; post the outcome to the loop thread."""
        changes: list[Change] = []
        file_config = None
        error: BaseException | None = None
        try:
            if op.req.op == "reload":
                config, file_config = self._reread(config)
                changes = self._reconcile(config, served)
            else:
                changes = [
                    Change(str(op.req.model), "loaded" if op.req.op == "load" else "replaced")
                ]
            if changes and config.models_dir is None:
                raise UnknownModel("this worker has no models_dir: nothing to load from")
            manifest = load_manifest(config.models_dir) if changes else None
            for ch in changes:
                if ch.action == "unloaded":
                    continue
                assert manifest is not None
                entry = manifest_entry(config, manifest, ch.model)
                op.loading = {**op.loading, ch.model: entry.version}  # health shows it
                try:
                    ch.backend = open_model(config, manifest, ch.model)
                except TandemError as e:
                    raise type(e)(f"model {ch.model!r} {entry.version} refused: {e.message}") from e
                except Exception as e:  # the backend's own (a corrupt file...)
                    raise BackendError(
                        f"model {ch.model!r} {entry.version} refused: {type(e).__name__}: {e}"
                    ) from e
                ch.identity = _identity(entry, config)
        except BaseException as e:  # what was opened is closed by _finish
            error = e
        self.worker.mailbox.post(lambda: self._finish(op, changes, error, (config, file_config)))

    def _reread(self, current: WorkerConfig) -> tuple[WorkerConfig, WorkerConfig | None]:
        """The worker's config with the reloadable keys as the config file says now (and the
        file's config, the baseline of the next reload's comparison)."""
        if self.config_path is None:
            return current, None
        new = self._read_file()
        old = self._file_config or new
        ignored = sorted(
            k
            for k in WorkerConfig.model_fields
            if k not in RELOADABLE_KEYS and getattr(new, k) != getattr(old, k)
        )
        if ignored:
            log.warning(
                "%s: %s changed; that needs a restart (ignored until then). Only models, "
                "models_dir and experts are reloaded",
                self.config_path,
                ", ".join(ignored),
            )
        update = {k: getattr(new, k) for k in RELOADABLE_KEYS}
        return current.model_copy(update=update), new

    def _read_file(self) -> WorkerConfig:
        assert self.config_path is not None
        return load_worker_config(self.config_path)

    def _reconcile(
        self, config: WorkerConfig, served: dict[str, tuple[Any, ...] | None]
    ) -> list[Change]:
        """What makes the served models what ``config`` and its manifest say."""
        if config.models_dir is None:
            return [Change(n, "unloaded") for n in served]
        manifest = load_manifest(config.models_dir)
        names = config.models if config.models is not None else [m.name for m in manifest.models]
        changes = []
        for name in names:
            entry = manifest_entry(config, manifest, name)
            if name not in served:
                changes.append(Change(name, "loaded"))
            elif served[name] != _identity(entry, config):
                changes.append(Change(name, "replaced"))
        changes += [Change(n, "unloaded") for n in served if n not in names]
        return changes

    # ------------------------------------------------------------------ the switch
    def _finish(
        self,
        op: Operation,
        changes: list[Change],
        error: BaseException | None,
        configs: tuple[WorkerConfig, WorkerConfig | None] | None,
    ) -> None:
        """On the loop thread: apply the prepared changes (or refuse them), answer, log."""
        self.running, self.working = None, False
        what = op.req.op + (f" {op.req.model}" if op.req.model else "")
        took = round(time.monotonic() - op.started, 3)
        if error is None and self.worker.draining:
            error = ShuttingDown("worker is draining; its models no longer change")
        if error is not None:
            for ch in changes:
                if ch.backend is not None:
                    _close(ch.backend)
            err = error if isinstance(error, TandemError) else _internal(error)
            log.error("model admin: %s refused, nothing changed: %s", what, err.message)
            self.last = {"op": what, "ok": False, "error": err.message, "took_s": took}
            self.worker.counters["admin_failed"] += 1
            self._answer(op, op.env.error_reply(err) if op.env is not None else None)
            self.due = self.due or self._signalled
            return
        done = []
        for ch in changes:
            done.append(self._apply(ch))
        if configs is not None:
            config, file_config = configs
            self._set_config(op, config, file_config)
        self.worker.counters["admin_changes"] += len(done)
        log.info("model admin: %s done in %.3f s: %s", what, took, done or "nothing to change")
        self.last = {"op": what, "ok": True, "changes": done, "took_s": took}
        result = {"op": op.req.op, "changes": done, "models": self._versions()}
        self._answer(op, op.env.reply(Kind.RESULT, result) if op.env is not None else None)
        self.due = self.due or self._signalled or bool(self.retiring)

    def _set_config(
        self, op: Operation, config: WorkerConfig, file_config: WorkerConfig | None
    ) -> None:
        """Keep the config in step with what is served: a reload takes the file's reloadable
        keys; load and unload add or drop their model in ``models`` (until the next reload)."""
        models = config.models
        if op.req.op == "load" and models is not None and op.req.model not in models:
            models = [*models, str(op.req.model)]
        if op.req.op == "unload" and models is not None:
            models = [m for m in models if m != op.req.model]
        self.worker.config = config.model_copy(update={"models": models})
        if file_config is not None:
            self._file_config = file_config

    def _apply(self, ch: Change) -> dict[str, Any]:
        """Switch one model to its new version (or unload it): queued requests of the old one
        run first; the old one retires."""
        w, name = self.worker, ch.model
        old = w.backends.get(name)
        if old is not None:
            w.requests.run_queued(name)  # admitted for the old version: run on it
        if ch.backend is None:
            w.backends.pop(name, None)
            self._identities.pop(name, None)
        else:
            w.backends[name] = ch.backend
            self._identities[name] = ch.identity
        offload = w.requests.model_changed(name)
        if offload is not None:
            _in_background(offload.close, f"tandem-retire-{name}")
        w.verifier.forget_model(name)
        old_engine = w.engines.pop(name, None)
        if isinstance(ch.backend, LocalGenerationBackend):
            gen = w.config.generation
            w.engines[name] = Engine(
                name,
                ch.backend,
                step_tokens=gen.step_tokens,
                prefill_chunk=gen.prefill_chunk,
                max_queued_prefill=gen.max_queued_prefill,
            )
        if old is not None:
            self.retiring.append(Retiring(name, str(old.version), old, old_engine))
            self.due = True
        return {
            "model": name,
            "action": ch.action,
            "version": None if ch.backend is None else str(ch.backend.version),
            "previous": None if old is None else str(old.version),
        }

    def _in_flight(self, r: Retiring) -> int:
        w = self.worker
        n = w.streams.using(r.backend) if w.streams is not None else 0
        if r.engine is not None:
            n += r.engine.pending()
            n += sum(1 for s in w.verifier.sessions.values() if s.engine is r.engine)
        return n

    def _reap(self) -> None:
        """Close the retired versions nothing uses any more (off this thread)."""
        keep = []
        for r in self.retiring:
            if self._in_flight(r):
                keep.append(r)
                continue
            log.info("model %s: version %s retired", r.model, r.version)
            _in_background(lambda r=r: _retire(r), f"tandem-retire-{r.model}")
        self.retiring = keep

    def _answer(self, op: Operation, reply: Envelope | None) -> None:
        if reply is None:
            return
        frames = self.worker.codec.encode(reply)
        for route in op.routes:
            self.worker._send(route, frames)

    # ------------------------------------------------------------------ reporting
    def _versions(self) -> dict[str, str]:
        return {name: str(b.version) for name, b in self.worker.backends.items()}

    def annotate(self, models: dict[str, dict[str, Any]], *, in_flight: bool = True) -> None:
        """Add to ``health``'s (or ``/ready``'s) models what changes: a version loading
        (``next``; a model not served yet appears with ``state: loading``, ``ready: false``) and
        versions retiring (``previous``, with their requests ``in_flight`` if asked: the loop
        thread only). Safe from any thread without ``in_flight``."""
        op, retiring = self.running, list(self.retiring)
        for name, version in (dict(op.loading) if op is not None else {}).items():
            entry = models.get(name)
            if entry is None:
                models[name] = {
                    "version": None,
                    "state": "loading",
                    "ready": False,
                    "next": {"version": version},
                }
            else:
                entry["state"] = "replacing"
                entry["next"] = {"version": version, "state": "loading"}
        for r in retiring:
            entry = models.get(r.model)
            if entry is None:
                entry = models[r.model] = {"version": None, "state": "unloading", "ready": False}
            entry["previous"] = {"version": r.version}
            if in_flight:
                entry["previous"]["in_flight"] = self._in_flight(r)

    def health(self) -> dict[str, Any]:
        op = self.running
        return {
            "enabled": self.worker.config.admin.enabled,
            "state": "idle" if op is None else op.req.op,
            "model": None if op is None else op.req.model,
            "loading": {} if op is None else dict(op.loading),
            "retiring": [{"model": r.model, "version": r.version} for r in self.retiring],
            "last": self.last,
        }

    def status(self) -> dict[str, Any]:
        """The ``list`` answer: what is served, loading and retiring, and the admin state."""
        models: dict[str, dict[str, Any]] = {}
        for name, b in self.worker.backends.items():
            ident = self._identities.get(name)
            models[name] = {
                "version": str(b.version),
                "sha256": ident[1] if ident is not None else None,
                "format": ident[2] if ident is not None else None,
            }
        self.annotate(models)
        return {"op": "list", "models": models, "admin": self.health()}

    def close(self) -> None:
        """The worker stops: close the retiring versions' engines (their jobs get
        ShuttingDown) and what they hold."""
        for r in self.retiring:
            _retire(r)
        self.retiring = []

    def _served_identities(self) -> dict[str, tuple[Any, ...] | None]:
        """What the manifest says of each served model as the worker starts (None where it
        cannot say: then the next reload replaces it)."""
        w = self.worker
        out: dict[str, tuple[Any, ...] | None] = dict.fromkeys(w.backends)
        if w.config.models_dir is None or not w.backends:
            return out
        try:
            manifest = load_manifest(w.config.models_dir)
        except TandemError:
            return out
        for name, b in w.backends.items():
            try:
                entry = manifest.get(name)
            except KeyError:
                continue
            if entry.version == str(b.version):
                out[name] = _identity(entry, w.config)
        return out


def _retire(r: Retiring) -> None:
    if r.engine is not None:
        r.engine.close()
    _close(r.backend)


def _close(backend: Any) -> None:
    if isinstance(backend, Closeable):
        try:
            backend.close()
        except Exception:
            log.exception("closing a model version failed")


def _in_background(fn: Callable[[], None], name: str) -> None:
    threading.Thread(target=fn, name=name, daemon=True).start()


def _internal(e: BaseException) -> TandemError:
    return TandemError(f"internal error: {type(e).__name__}: {e}")
