"""Changing a running edge runtime's policy without a restart: :meth:`EdgeRuntime.reload_policy`
and a watcher on the policy file (``EdgeRuntime.from_policy(path, watch_s=...)``, or the
file's own ``reload: {watch_s: 1}``).

A reload is all or nothing:

1. the new policy is read and fully validated (:func:`parse_policy_bytes`, as ``load_policy``);
2. every task it adds or changes is built off the request path, as a model swap builds one
   (:meth:`~tandem.edge.model_swap.ModelSwapper.prepare`: model loaded, labels and gates
   checked, warmed up); a task whose ``local`` section did not change keeps serving the same
   model (the same model store version);
3. only then are all of them installed at once (one update of each task table, under the
   swappers' locks) and removed tasks dropped. A request takes its task once at its start, so
   requests in flight finish on the old task objects, and no request mixes two policies.
   Tasks the new file does not change keep their objects (no model reload); changed tasks keep
   their counters (``stats()``) and, when the budget is the same, their escalation budget. A
   replaced generation task closes its model when its last answer ends.

Any failure before step 3 (YAML or schema error, a model file missing or failing to load, a
gate that does not fit the model, a model store that cannot be read) refuses the whole file:
the error names the file and the key, is logged, counted and raised by
:meth:`~EdgeRuntime.reload_policy`, and the old policy keeps serving. A change to the
``escalation_log``, ``metrics`` or ``tracing`` section is refused too: they are set up once, at
start (restart to apply).

The watcher (:class:`PolicyWatcher`, a daemon thread) polls the file: a ``stat`` every
``watch_s`` seconds, and only when it changed a read, a sha256 of the bytes and a reload of
new content. A half-written file can be valid YAML (a task cut off, ``threshold: 0.5`` cut to
``threshold: 0``), so when it is applied depends on how it was written:

* an atomic replace (a temporary file renamed over the policy: the path names a new inode) is
  applied at the first poll that sees it, i.e. within ``watch_s`` (plus the build);
* an in-place write (the same inode: an editor saving in place, ``scp``, ``cat >``, NFS) is
  applied only once the same content (size, mtime and sha256) has been seen on two polls at
  least :func:`max(watch_s, STABLE_S) <PolicyWatcher.stable_s>` apart: it has to stay
  unchanged for a whole poll period, and at least 0.25 s. That costs one more poll period (at
  least 0.25 s) per in-place write; a writer that pauses longer than that mid-file still gets
  its partial file applied, so write atomically. That the file is still changing is logged
  once per content (INFO).

:meth:`~EdgeRuntime.reload_policy` called explicitly reads the file at once: the caller says
when it is complete. A refused content is logged once; the file is tried again when it changes
(``touch`` it to retry after fixing what it points to, e.g. a model file that was missing).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tandem.router.policy import GenerateTaskPolicy, Policy
from tandem.router.policy_diff import (
    Change,
    TaskChangeKind,
    policy_changes,
    policy_digest,
    task_changes,
)
from tandem.runtime.config import validate_config
from tandem.runtime.errors import ConfigError

log = logging.getLogger(__name__)

MAX_POLICY_BYTES = 1 << 20  # a policy file larger than this is refused unread
# an in-place write is applied once unchanged on two polls max(watch_s, STABLE_S) s apart
STABLE_S = 0.25
SETTLE_S = 0.02  # a new inode is read once its stat has not changed for this long
# sections the runtime sets up once (a log file, an HTTP port, an exporter): a reload that
# changes them is refused with a message saying a restart applies it
RESTART_SECTIONS = ("escalation_log", "metrics", "tracing")
REFUSED_REMEMBERED = 64  # refused contents logged once each (the oldest forgotten first)
CHANGING_REMEMBERED = 64  # contents logged once each as "still changing"

Signature = tuple[int, int, int]  # (mtime ns, size, inode): _signature


@dataclass(frozen=True)
class PolicyReload:
    """What one applied reload changed. ``tasks``: each task of either policy, ``added``,
    ``removed``, ``changed`` (rebuilt) or ``unchanged`` (its objects kept); ``changes``: every
    key path that differs (:func:`tandem.router.policy_diff.policy_changes`)."""

    source: str
    digest: str  # the policy now serving (policy_digest)
    previous_digest: str
    tasks: dict[str, TaskChangeKind]
    changes: list[Change]
    elapsed_ms: float  # read + validate + build + install

    @property
    def changed(self) -> bool:
        return bool(self.changes)

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "digest": self.digest,
            "previous_digest": self.previous_digest,
            "tasks": dict(self.tasks),
            "changes": [c.as_dict() for c in self.changes],
            "elapsed_ms": self.elapsed_ms,
        }


def read_policy_file(path: str | Path) -> tuple[Policy, bytes]:
    """The policy in the file at ``path`` and the bytes it was read from (one read)."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            data = f.read(MAX_POLICY_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"{p}: cannot read: {e.strerror or e}") from None
    return parse_policy_bytes(p, data), data


def parse_policy_bytes(path: Path, data: bytes) -> Policy:
    if len(data) > MAX_POLICY_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_POLICY_BYTES} bytes; not a policy file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        doc = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        kind = "JSON" if path.suffix == ".json" else "YAML"
        raise ConfigError(f"{path}: not valid {kind}: {e}") from None
    return validate_config(doc, Policy, source=str(path), base_dir=path.parent)


@dataclass
class ReloadCounters:
    applied: int = 0  # reloads that changed something
    unchanged: int = 0  # valid reloads that changed nothing (a comment, a touch)
    refused: int = 0  # reloads refused; the old policy kept serving
    last_error: str | None = None
    last_applied: dict[str, Any] | None = field(default=None)  # PolicyReload.as_dict()


class PolicyReloader:
    """A runtime's policy reloads (:meth:`EdgeRuntime.reload_policy`) and its file watcher;
    one reload at a time."""

    def __init__(self, runtime: Any) -> None:  # an EdgeRuntime (it imports this module)
        self._rt = runtime
        self.path: Path | None = None  # the file the runtime was started from
        self.digest = policy_digest(runtime.policy)
        self.counters = ReloadCounters()
        self._lock = threading.Lock()
        self._watcher: PolicyWatcher | None = None

    # ------------------------------------------------------------------ reloads
    def reload(self, source: str | Path | Policy | None = None) -> PolicyReload:
        """Apply ``source`` (a file, a validated :class:`Policy`; default: the file the
        runtime was started from); raises :class:`ConfigError` when it is refused."""
        if isinstance(source, Policy):
            return self._reload("<policy>", lambda: source)
        path = Path(source) if source is not None else self.path
        if path is None:
            raise ConfigError(
                "reload_policy(): this runtime was not started from a file "
                "(EdgeRuntime.from_policy); give the policy file or a Policy"
            )
        return self._reload(str(path), lambda: read_policy_file(path)[0])

    def reload_bytes(self, path: Path, data: bytes, *, quiet: bool = False) -> PolicyReload:
        """Apply the policy file ``path`` whose content is ``data`` (the watcher's read);
        ``quiet``: this content was refused before, do not log it again."""
        return self._reload(str(path), lambda: parse_policy_bytes(path, data), quiet=quiet)

    def _reload(self, where: str, load: Any, *, quiet: bool = False) -> PolicyReload:
        t0 = time.perf_counter()
        with self._lock:
            try:
                result = self._apply(load(), where, t0)
            except Exception as e:
                msg = e.message if isinstance(e, ConfigError) else f"{where}: {e}"
                self.counters.refused += 1
                self.counters.last_error = msg
                if not quiet:
                    log.error(
                        "policy reload refused, policy %s keeps serving: %s",
                        self.digest,
                        msg,
                        extra={"policy_source": where, "policy_digest": self.digest},
                    )
                raise ConfigError(msg) from None
        if result.changed:
            self.counters.applied += 1
            self.counters.last_applied = result.as_dict()
            log.info(
                "policy reloaded from %s in %.1f ms: %s (was %s); %s",
                where,
                result.elapsed_ms,
                result.digest,
                result.previous_digest,
                ", ".join(f"{n} {k}" for n, k in result.tasks.items() if k != "unchanged")
                or "no task changed",
                extra={"policy_source": where, "policy_digest": result.digest},
            )
        else:
            self.counters.unchanged += 1
        return result

    def _apply(self, new: Policy, where: str, t0: float) -> PolicyReload:
        rt = self._rt
        old = rt.policy
        changes = policy_changes(old, new)
        kinds = task_changes(old, new)
        fixed = [c for c in changes if c.path.split(".")[0] in RESTART_SECTIONS]
        if fixed:
            raise ConfigError(
                f"{where}: {'; '.join(map(str, fixed))}: "
                f"{', '.join(sorted({c.path.split('.')[0] for c in fixed}))} is set up once, at "
                "start; restart the runtime to apply this change"
            )
        build = [n for n, k in kinds.items() if k in ("added", "changed")]
        removed = {n for n, k in kinds.items() if k == "removed"}
        cls, gen = rt._swapper, rt._gen_swapper
        if build or removed:
            with cls.lock, gen.lock:  # no model swap while the new tasks are built
                self._swap_tasks(new, build, removed, where)
        rt.policy = new
        cls.rewatch()
        gen.rewatch()
        previous, self.digest = self.digest, policy_digest(new)
        return PolicyReload(
            source=where,
            digest=self.digest,
            previous_digest=previous,
            tasks=kinds,
            changes=changes,
            elapsed_ms=(time.perf_counter() - t0) * 1e3,
        )

    def _swap_tasks(self, new: Policy, build: list[str], removed: set[str], where: str) -> None:
        rt = self._rt
        cls, gen = rt._swapper, rt._gen_swapper
        built_c: dict[str, Any] = {}
        built_g: dict[str, Any] = {}
        name = ""
        try:
            for name in build:
                tp = new.tasks[name]
                if isinstance(tp, GenerateTaskPolicy):
                    built_g[name] = gen.prepare(name, tp)
                else:
                    built_c[name] = cls.prepare(name, tp)
        except Exception as e:
            for t in built_g.values():  # never served: nobody else would close its model
                t.close_model()
            what = e.message if isinstance(e, ConfigError) else f"{type(e).__name__}: {e}"
            raise ConfigError(f"{where}: tasks.{name}: cannot serve it: {what}") from None
        for table, built in ((rt._tasks, built_c), (rt._generators, built_g)):
            for n, t in built.items():  # an unchanged budget keeps what it has spent
                before = table.get(n)
                if before is not None and before.policy.budget == t.policy.budget:
                    t.router.budget = before.router.budget
        # first every new task in, then the old ones out (a task that changed kind moves)
        cls.commit(built_c, {n: new.tasks[n] for n in built_c}, set())
        gen.commit(built_g, {n: new.tasks[n] for n in built_g}, set())
        cls.commit({}, {}, {n for n in removed | set(built_g) if n in rt._tasks})
        gen.commit({}, {}, {n for n in removed | set(built_c) if n in rt._generators})
        rt._default_task = next(iter(rt._tasks)) if len(rt._tasks) == 1 else None
        rt._default_generator = next(iter(rt._generators)) if len(rt._generators) == 1 else None

    # ------------------------------------------------------------------ watching
    def watch(self, path: Path, content: bytes, every_s: float | None) -> None:
        """Remember ``path`` (read as ``content``) as the runtime's file, and watch it every
        ``every_s`` seconds (None: as the policy's ``reload.watch_s`` says; no such section:
        not watched)."""
        self.path = path
        if every_s is None and self._rt.policy.reload is None:
            return
        self._watcher = PolicyWatcher(self, path, content, every_s)
        self._watcher.start()

    @property
    def watching(self) -> float | None:
        """Seconds between checks of the file, None when it is not watched."""
        return None if self._watcher is None else self._watcher.period()

    def stats(self) -> dict[str, Any]:
        c = self.counters
        return {
            "digest": self.digest,
            "source": None if self.path is None else str(self.path),
            "watch_s": self.watching,
            "reloads": {"applied": c.applied, "unchanged": c.unchanged, "refused": c.refused},
            "last_error": c.last_error,
            "last_applied": c.last_applied,
        }

    def close(self) -> None:
        if self._watcher is not None:
            self._watcher.close()


@dataclass(frozen=True)
class _Pending:
    """A content written in place, waiting to be seen unchanged a whole poll period later."""

    sig: Signature
    digest: str
    since: float  # time.monotonic() when it was first seen


class PolicyWatcher:
    """Polls one policy file on a daemon thread and reloads it when its content changes: an
    atomic replace at once, an in-place write once it is stable (:meth:`stable_s`)."""

    def __init__(
        self, reloader: PolicyReloader, path: Path, content: bytes, every_s: float | None
    ) -> None:
        self.reloader = reloader
        self.path = path
        self.every_s = every_s
        self._applied = hashlib.sha256(content).hexdigest()
        self._seen = _signature(path)  # the file as the last poll saw it
        self._recheck = True  # read at the next poll even if the stat is the same
        self._pending: _Pending | None = None
        self._refused_at: tuple[str, Signature] | None = None  # (content, stat) refused last
        self._refused: OrderedDict[str, None] = OrderedDict()  # contents logged already
        self._changing: OrderedDict[str, None] = OrderedDict()  # logged as still changing
        self._read_error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tandem-policy-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def period(self) -> float | None:
        """The explicit period, else the serving policy's ``reload.watch_s`` (re-read after
        every reload; a policy without the section stops the watcher)."""
        if self.every_s is not None:
            return self.every_s
        spec = self.reloader._rt.policy.reload
        return None if spec is None else spec.watch_s

    def stable_s(self) -> float:
        """Seconds an in-place write must stay unchanged before it is applied: a whole poll
        period, and at least :data:`STABLE_S`."""
        return max(self.period() or 0.0, STABLE_S)

    def _run(self) -> None:
        while True:
            every = self.period()
            if every is None:
                log.info("%s: the policy has no 'reload' section now; not watched", self.path)
                return
            if self._stop.wait(every):
                return
            try:
                self.poll()
            except Exception:  # the watcher must outlive anything one poll meets
                log.exception("%s: policy check failed", self.path)

    def poll(self) -> PolicyReload | None:
        """One check: reload the file if its content changed (and, written in place, has
        been stable for :meth:`stable_s`); None when nothing was applied."""
        got = self._read()
        if got is None:
            return None
        sig, data, new_inode = got
        digest = hashlib.sha256(data).hexdigest()
        if digest == self._applied:
            self._pending = self._refused_at = None
            return None
        if self._refused_at == (digest, sig):
            return None  # the content refused last time, untouched: wait for it to change
        if not new_inode and not self._stable(sig, digest):
            return None
        self._pending = None
        try:
            result = self.reloader.reload_bytes(self.path, data, quiet=digest in self._refused)
        except ConfigError:  # logged and counted by the reloader; the old policy serves on
            self._refused_at = (digest, sig)
            _remember(self._refused, digest, REFUSED_REMEMBERED)
            return None
        self._applied, self._refused_at = digest, None
        return result

    def _stable(self, sig: Signature, digest: str) -> bool:
        """Whether this in-place content was seen, the same, :meth:`stable_s` ago or more;
        else it is remembered as the content to look for at the next polls."""
        now = time.monotonic()
        p = self._pending
        if p is not None and p.sig == sig and p.digest == digest:
            return now - p.since >= self.stable_s()
        if p is not None and digest not in self._changing:  # a writer at work, or paused
            log.info(
                "%s: the policy file is still changing (written in place); it is applied "
                "once unchanged for %.2f s",
                self.path,
                self.stable_s(),
            )
            _remember(self._changing, digest, CHANGING_REMEMBERED)
        self._pending = _Pending(sig, digest, now)
        return False

    def _read(self) -> tuple[Signature, bytes, bool] | None:
        """(stat, bytes, whether the path names another inode than at the last poll: an
        atomic replace) when the file may hold new content; None when its stat did not change
        (and nothing waits to be seen again), it cannot be read, or it changed while read."""
        try:
            sig = _signature(self.path, strict=True)
            assert sig is not None
            if sig == self._seen and not self._recheck and self._pending is None:
                return None
            new_inode = self._seen is None or sig[2] != self._seen[2]
            if new_inode:  # a rename of a complete file, or a new file still being written
                if self._stop.wait(SETTLE_S):
                    return None
                again = _signature(self.path, strict=True)
                if again != sig:
                    return self._changed_while_read(sig, again)
            with self.path.open("rb") as f:
                data = f.read(MAX_POLICY_BYTES + 1)
            after = _signature(self.path, strict=True)
        except OSError as e:  # e.g. deleted before a rename puts the new one there
            if self._read_error != str(e):
                log.warning("%s: cannot read the policy file: %s", self.path, e)
            self._read_error = str(e)
            return None
        self._read_error = None
        if after != sig:
            return self._changed_while_read(sig, after)
        self._seen, self._recheck = sig, False
        return sig, data, new_inode

    def _changed_while_read(self, sig: Signature, after: Signature | None) -> None:
        """Read again at the next poll; a file that grew under the same inode is being
        written in place (from now on it has to be stable to be applied)."""
        self._recheck = True
        if after is not None and after[2] == sig[2]:
            self._seen = after
        return None

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)


def _remember(seen: OrderedDict[str, None], key: str, bound: int) -> None:
    seen[key] = None
    while len(seen) > bound:
        seen.popitem(last=False)


def _signature(path: Path, *, strict: bool = False) -> Signature | None:
    """What a cheap ``stat`` says about a file's content: (mtime ns, size, inode); an atomic
    rename changes the inode, an in-place write the size or time."""
    try:
        st = os.stat(path)
    except OSError:
        if strict:
            raise
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino
