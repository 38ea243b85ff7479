"""Hot-swapping edge models: a task serves its model store's current version and moves to a
new one while requests run (:class:`ModelSwapper`), for classification and generation tasks.

A swap builds a complete new task (load, check it against the serving one, warm up) off the
request path, then replaces the one reference in the runtime's task table. A request takes the
task object once at its start and uses it to the end, so requests in flight finish on the old
version, and no request mixes two. The old task is then *retired*: a generation task closes
its model once its last answer ends (:meth:`~tandem.edge.generate_task.GenerationTask.retire`);
a classification task's ONNX session is freed with the last request that holds it. A version
that fails to load or check is refused: logged, counted
(``stats()["tasks"][name]["swaps"]["refused"]``), never tried again, and the old version keeps
serving. Rollback is the store's (:meth:`~tandem.runtime.model_store.ModelStore.rollback`)
followed by a reload.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from pydantic import ValidationError

from tandem.router.policy import (
    CalibrationRecord,
    GenerateTaskPolicy,
    LearnedGateSpec,
    TaskPolicy,
)
from tandem.router.routing import RoutingStats
from tandem.runtime.errors import ConfigError
from tandem.runtime.model_store import ModelStore, ModelVersion

log = logging.getLogger(__name__)

AnyPolicy = TypeVar("AnyPolicy", TaskPolicy, GenerateTaskPolicy)


class SwappableTask(Protocol):
    name: str
    policy: Any  # the policy it serves (its model's file and version filled in)
    serving: str | None
    stats: RoutingStats
    versions: dict[str, str]


T = TypeVar("T", bound=SwappableTask)
BuildTask = Callable[[str, Any, str | None, RoutingStats], T]


class ModelSwapper(Generic[T]):
    """The model stores of a runtime's tasks of one kind, and the one place that replaces a
    task in ``tasks`` (the runtime's table). ``build(name, policy, serving, stats)`` opens a
    task (the runtime's clients, callbacks and seed); ``check(old, new)`` raises when the new
    one cannot take the old one's requests; ``retire(old)`` runs once it is replaced."""

    def __init__(
        self,
        tasks: dict[str, T],
        build: BuildTask,
        check: Callable[[T, T], None],
        retire: Callable[[T], None] = lambda _t: None,
    ) -> None:
        self.tasks = tasks
        self.build = build
        self.check = check
        self.retire = retire
        self.stores: dict[str, ModelStore] = {}
        self.policies: dict[str, Any] = {}  # each task's policy as the file says
        self._refused: dict[str, set[str]] = {}
        self._store_errors: dict[str, str] = {}  # task -> the store error last logged
        self._lock = threading.Lock()  # one swap at a time; requests never take it
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._watching: dict[str, float] = {}  # task -> seconds between polls of its store

    def open(self, name: str, tp: Any) -> T:
        """Open a task at start: the store's current version when ``local.store`` names a
        store that has one (unreadable: logged, ``local.path`` serves), else ``local.path``."""
        self.policies[name] = tp
        serving = None
        if tp.local.store is not None:
            store = self.stores[name] = ModelStore(tp.local.store)
            self._refused[name] = set()
            try:
                mv = store.current()
                if mv is not None:
                    tp, serving = policy_for_version(tp, mv), mv.version
            except ConfigError as e:
                log.error("task %s: model store refused, serving local.path: %s", name, e)
        return self.build(name, tp, serving, RoutingStats(len(getattr(tp, "tiers", ()))))

    def reload(self) -> dict[str, str]:
        """Swap each task whose store's current version changed; task -> what it serves."""
        for name, store in list(self.stores.items()):  # a policy reload may change them
            self._reload(name, store)
        return {name: t.serving or t.versions["edge"] for name, t in self.tasks.items()}

    def _reload(self, name: str, store: ModelStore) -> None:
        try:
            want = store.current_name()  # one small read: cheap enough to poll
        except ConfigError as e:
            if self._store_errors.get(name) != str(e):  # once per error, not once per poll
                log.error("task %s: cannot read the model store: %s", name, e)
            self._store_errors[name] = str(e)
            return
        self._store_errors.pop(name, None)
        serving = self.tasks.get(name)
        if serving is None or want is None or want == serving.serving:
            return
        if want in self._refused.get(name, ()):
            return
        with self._lock:
            old = self.tasks.get(name)
            if old is None or self.stores.get(name) is not store or want == old.serving:
                return  # a policy reload removed the task or changed its store meanwhile
            try:
                new = self.build(
                    name, policy_for_version(self.policies[name], store.get(want)), want, old.stats
                )
                self.check(old, new)
            except Exception as e:  # any failure to load: the old version keeps serving
                self._refused[name].add(want)
                old.stats.swaps_refused += 1
                log.error(
                    "task %s: model version %s refused, %s keeps serving: %s",
                    name,
                    want,
                    old.versions["edge"],
                    e,
                    extra={"task": name, "version": want},
                )
                return
            self._install(name, new)

    def swap(
        self, name: str, path: str | Path, gate: Mapping[str, Any] | None, version: str | None
    ) -> str:
        """Serve the model file at ``path`` for task ``name`` (see
        :meth:`tandem.edge.EdgeRuntime.swap_model`); raises, keeping the old model, when it
        does not load or fit."""
        with self._lock:
            old = self.tasks[name]
            try:
                tp = self.policies[name]
                local = tp.local.model_copy(update={"path": Path(path), "version": version})
                tp = with_gate(tp.model_copy(update={"local": local}), gate, where=str(path))
                new = self.build(name, tp, version, old.stats)
                self.check(old, new)
            except Exception:
                old.stats.swaps_refused += 1
                raise
            self._install(name, new)
            return new.versions["edge"]

    def _install(self, name: str, new: T) -> None:
        old = self.tasks[name]
        self.tasks[name] = new  # one reference: requests that took the old one finish on it
        new.stats.swaps += 1
        self.retire(old)
        log.info(
            "task %s: now serving %s (was %s)",
            name,
            new.versions["edge"],
            old.versions["edge"],
            extra={"task": name, "version": new.versions["edge"]},
        )

    def start(self) -> None:
        """Poll the stores of the tasks with ``local.watch_s`` on a daemon thread."""
        every = self._watching = {
            n: tp.local.watch_s
            for n, tp in self.policies.items()
            if n in self.stores and tp.local.watch_s is not None
        }
        if every:
            self._watcher = threading.Thread(
                target=self._watch, args=(every, self._stop), name="tandem-model-watch", daemon=True
            )
            self._watcher.start()

    def _watch(self, every_s: dict[str, float], stop: threading.Event) -> None:
        due = dict.fromkeys(every_s, 0.0)
        while not stop.wait(min(every_s.values())):
            now = time.monotonic()
            for name, period in every_s.items():
                store = self.stores.get(name)
                if now >= due[name] and store is not None:
                    due[name] = now + period
                    try:
                        self._reload(name, store)
                    except Exception:  # the watcher must outlive any one bad check
                        log.exception("task %s: model store check failed", name)

    def close(self) -> None:
        self._stop.set()
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join(timeout=10)

    # ------------------------------------------------------------ policy reloads
    # (tandem.edge.policy_reload: build every changed task, then commit them all at once)
    @property
    def lock(self) -> threading.Lock:
        """Held by a swap, and by a policy reload from its first build to its commit."""
        return self._lock

    def prepare(self, name: str, tp: Any) -> T:
        """Build task ``name`` for a reloaded policy ``tp`` off the request path (loaded,
        checked, warmed up), not installed; the caller holds :attr:`lock`. Its model: when
        ``tp.local`` is what the file said before, the one the task serves now (the same model
        store version, with that version's gate settings as at start, or ``swap_model``'s
        file); otherwise chosen as :meth:`open` chooses, except that a store it cannot read
        raises. Counters carry over. Raises when the task does not load."""
        old = self.tasks.get(name)
        serving = None
        if old is not None and name in self.policies and tp.local == self.policies[name].local:
            store = self.stores.get(name)
            if store is not None and old.serving is not None and old.serving in store.versions():
                tp, serving = policy_for_version(tp, store.get(old.serving)), old.serving
            else:
                tp, serving = tp.model_copy(update={"local": old.policy.local}), old.serving
        elif tp.local.store is not None:
            mv = ModelStore(tp.local.store).current()
            if mv is not None:
                tp, serving = policy_for_version(tp, mv), mv.version
        stats = old.stats if old is not None else RoutingStats(len(getattr(tp, "tiers", ())))
        return self.build(name, tp, serving, stats)

    def commit(self, built: dict[str, T], policies: dict[str, Any], removed: set[str]) -> None:
        """Serve ``built`` (from :meth:`prepare`) and stop serving ``removed``, in one update
        of the task table; ``policies``: each built task's policy as the file says. The tasks
        replaced or removed are retired. The caller holds :attr:`lock`; then calls
        :meth:`rewatch` without it."""
        olds = [self.tasks[n] for n in [*built, *removed] if n in self.tasks]
        self.tasks.update(built)  # one call: the new tasks take requests from here on
        for n in removed:
            self.tasks.pop(n, None)
            for table in (self.policies, self.stores, self._refused, self._store_errors):
                table.pop(n, None)
        for n, tp in policies.items():
            before = self.stores.get(n)
            if tp.local.store is None:
                self.stores.pop(n, None)
            elif before is None or before.root != ModelStore(tp.local.store).root:
                self.stores[n], self._refused[n] = ModelStore(tp.local.store), set()
            self.policies[n] = tp
            task = built[n]
            task.stats.n_tiers = len(getattr(tp, "tiers", ()))
        for old in olds:
            self.retire(old)

    def rewatch(self) -> None:
        """Poll the stores as the policies say now (after a policy reload): the watcher
        thread is restarted only when which stores it polls, or how often, changed."""
        every = {
            n: tp.local.watch_s
            for n, tp in self.policies.items()
            if n in self.stores and tp.local.watch_s is not None
        }
        if every == self._watching:
            return
        self.close()  # the old thread is given its own stop event, so it cannot outlive this
        self._stop = threading.Event()
        self.start()


def policy_for_version(tp: AnyPolicy, mv: ModelVersion) -> AnyPolicy:
    """``tp`` serving a model store version: its file, its version (``"v0003:<sha256[:12]>"``),
    its calibrated gate settings (:func:`with_gate`) and its calibration record (the drift
    alarm's baseline) — unless the policy's own ``calibration`` record names this version's
    model (``tandem calibrate --write`` on the version being served): then the policy's gate is
    the newer word and stays. Raises :class:`ConfigError` when the model file is not the one
    published (sha256) or the version's meta.json does not validate."""
    mv.verify()
    where = str(mv.path.parent / "meta.json")
    sha = str(mv.meta.get("sha256", ""))[:12]
    label = f"{mv.version}:{sha}"
    tp = tp.model_copy(
        update={"local": tp.local.model_copy(update={"path": mv.path, "version": label})}
    )
    if tp.calibration is not None and sha and sha in tp.calibration.models.get("edge", ""):
        return tp  # calibrated for exactly this model, after it was published
    tp = with_gate(tp, mv.gate, where=where)
    cal = mv.meta.get("calibration")
    if isinstance(cal, dict):
        try:
            tp = tp.model_copy(update={"calibration": CalibrationRecord.model_validate(cal)})
        except ValidationError as e:
            raise ConfigError(f"{where}: the version's calibration is not valid: {e}") from None
    return tp


def with_gate(tp: AnyPolicy, overrides: Mapping[str, Any] | None, *, where: str) -> AnyPolicy:
    """``tp`` with gate settings calibrated for a model (a confidence gate: ``threshold``,
    ``temperature``, ``metric``; a token gate: ``threshold``, ``metric``, ``quantile``; a
    learned gate only ``threshold``); other keys are ignored."""
    if not overrides:
        return tp
    spec_type = type(tp.gate)
    learned = isinstance(tp.gate, LearnedGateSpec)
    keys = {"threshold"} if learned else set(spec_type.model_fields) - {"type"}
    g = tp.gate.model_dump()
    g.update({k: v for k, v in overrides.items() if k in keys and v is not None})
    try:
        gate = spec_type.model_validate(g)
    except ValidationError as e:
        raise ConfigError(f"{where}: gate settings {dict(overrides)} are not valid: {e}") from None
    return tp.model_copy(update={"gate": gate})
