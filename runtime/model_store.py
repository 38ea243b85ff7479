"""A folder of versioned edge models: what ``tandem evolve`` publishes and a running
:class:`~tandem.edge.EdgeRuntime` hot-swaps to.

.. code-block:: text

    STORE/
      CURRENT.json                 {"version": "v0003", "history": ["v0001", "v0002", "v0003"]}
      versions/v0003/model.onnx    (or model.gguf: the file the edge runs)
      versions/v0003/meta.json     {"version", "parent", "created", "file", "sha256",
                                    "gate": {threshold, temperature, ...} | null,
                                    "calibration": {...} | null, "report": {...}}

A version's folder is written completely (model, then ``meta.json``) before ``CURRENT.json``
names it, and ``CURRENT.json`` is replaced atomically (write a temporary file, fsync,
``os.replace``), so a reader sees the old version or the new one, never half of one.
``history`` lists the versions that were current, oldest first (at most
:data:`MAX_HISTORY`); :meth:`ModelStore.rollback` makes the one before the current one
current again. Versions are deleted only by :meth:`ModelStore.prune`, which keeps the newest
N and the current one. Publishing, rollback and pruning hold the store's lock file
(``STORE/.lock``), so several ``tandem evolve`` processes may share one store.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tandem.runtime.errors import ConfigError

CURRENT = "CURRENT.json"
MAX_HISTORY = 100
_VERSION = re.compile(r"^v(\d{4,})$")
_EXTRA_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class ModelVersion:
    """One published version: ``path`` is the model file, ``meta`` its ``meta.json``."""

    version: str
    path: Path
    meta: dict[str, Any]

    def verify(self) -> None:
        """:class:`ConfigError` unless the model file's sha256 is the one ``meta.json``
        recorded at publication (a file changed or swapped since is not served)."""
        want = self.meta.get("sha256")
        if want != _sha256(self.path):
            raise ConfigError(f"{self.path}: its sha256 is not the {want!r} meta.json recorded")

    @property
    def gate(self) -> dict[str, Any] | None:
        """Gate settings calibrated for this version (``threshold``, ``temperature``), or
        None: keep the policy's."""
        g = self.meta.get("gate")
        return g if isinstance(g, dict) else None

    def extra(self, name: str) -> Path | None:
        """The file or folder published beside the model as ``name`` (``extra_files``), or
        None when this version has none by that name."""
        if not _EXTRA_NAME.match(name) or name not in self.meta.get("extra_files", []):
            return None
        p = self.path.parent / name
        return p if p.exists() else None


class ModelStore:
    """A model store folder (created on the first :meth:`publish`)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the store's lock file: publishers, rollbacks and prunes from several processes
        take turns (numbering, the folder rename and CURRENT.json are one step each)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _dir(self, version: str) -> Path:
        return self.root / "versions" / version

    def _read_current(self) -> dict[str, Any] | None:
        p = self.root / CURRENT
        try:
            data = json.loads(p.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise ConfigError(f"{p}: not a readable model store pointer ({e})") from e
        if not isinstance(data, dict) or not isinstance(data.get("version"), str):
            raise ConfigError(f"{p}: expected {{'version': str, 'history': [...]}}")
        return data

    def current(self) -> ModelVersion | None:
        """The current version, or None when nothing was published yet."""
        data = self._read_current()
        return None if data is None else self.get(data["version"])

    def current_name(self) -> str | None:
        """Only the current version's name (one small read: what a watcher polls)."""
        data = self._read_current()
        return None if data is None else data["version"]

    def get(self, version: str) -> ModelVersion:
        if not _VERSION.match(version):
            raise ConfigError(f"{self.root}: {version!r} is not a version name (v0001, ...)")
        d = self._dir(version)
        try:
            meta = json.loads((d / "meta.json").read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"{d}: version {version} is missing or unreadable ({e})") from e
        name = meta.get("file") if isinstance(meta, dict) else None
        if not isinstance(name, str) or not _EXTRA_NAME.match(name):
            raise ConfigError(f"{d}/meta.json: 'file' must name a file in the version's folder")
        path = d / name
        if not path.is_file():
            raise ConfigError(f"{d}: meta.json names no model file that exists ({name})")
        return ModelVersion(version, path, meta)

    def versions(self) -> list[str]:
        """Every published version, oldest first."""
        base = self.root / "versions"
        if not base.is_dir():
            return []
        names = [p.name for p in base.iterdir() if _VERSION.match(p.name)]
        return sorted(names, key=lambda v: int(v[1:]))

    def history(self) -> list[str]:
        data = self._read_current()
        return [] if data is None else [str(v) for v in data.get("history", [])]

    def publish(
        self,
        model_file: str | Path,
        *,
        gate: dict[str, Any] | None = None,
        calibration: dict[str, Any] | None = None,
        report: dict[str, Any] | None = None,
        make_current: bool = True,
        extra_files: dict[str, str | Path] | None = None,
    ) -> ModelVersion:
        """Copy ``model_file`` in as the next version and (by default) make it current.
        ``extra_files``: name → file or directory copied beside it under that name (e.g.
        ``{"fp32.onnx": ...}`` or ``{"hf": transformers_dir}``: what the next ``tandem evolve``
        trains from); listed in ``meta["extra_files"]``, read back with
        :meth:`ModelVersion.extra`."""
        src = Path(model_file)
        base = self.root / "versions"
        base.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".publish-", dir=base))
        try:  # the copies (slow) outside the lock; numbering and renaming inside it
            dst = tmp / f"model{src.suffix}"
            shutil.copyfile(src, dst)
            extras = sorted((extra_files or {}).items())
            for name, extra in extras:
                if not _EXTRA_NAME.match(name) or name in (dst.name, "meta.json"):
                    raise ConfigError(f"extra_files: {name!r} is not a plain file name to use")
                if Path(extra).is_dir():
                    shutil.copytree(extra, tmp / name)
                else:
                    shutil.copyfile(extra, tmp / name)
            sha = _sha256(dst)
            with self._locked():
                existing = self.versions()
                version = f"v{int(existing[-1][1:]) + 1 if existing else 1:04d}"
                if calibration is not None:  # the record names the model it was made for
                    models = {**calibration.get("models", {}), "edge": f"{version}:{sha[:12]}"}
                    calibration = {**calibration, "models": models}
                meta = {
                    "version": version,
                    "parent": self.current_name(),
                    "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                    "file": dst.name,
                    "sha256": sha,
                    "gate": gate,
                    "calibration": calibration,
                    "report": report or {},
                    "extra_files": [name for name, _ in extras],
                }
                (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=_jsonable))
                os.replace(tmp, self._dir(version))
                if make_current:
                    self._set_current(version)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return self.get(version)

    def set_current(self, version: str) -> ModelVersion:
        """Make ``version`` current (it must exist), appending it to the history."""
        with self._locked():
            return self._set_current(version)

    def _set_current(self, version: str) -> ModelVersion:
        mv = self.get(version)
        history = [v for v in self.history() if v != version][-(MAX_HISTORY - 1) :]
        self._write_current({"version": version, "history": [*history, version]})
        return mv

    def rollback(self) -> ModelVersion:
        """Make the version that was current before this one current again; the current one
        leaves the history (a second rollback goes one further back)."""
        with self._locked():
            history = self.history()
            if len(history) < 2:
                raise ConfigError(f"{self.root}: no earlier version to roll back to")
            prev = history[-2]
            mv = self.get(prev)
            self._write_current({"version": prev, "history": history[:-1]})
            return mv

    def prune(self, keep: int) -> list[str]:
        """Delete all but the newest ``keep`` versions (never the current one); returns the
        deleted names. Rollback cannot go back past what is deleted."""
        if keep < 1:
            raise ValueError("keep at least one version")
        with self._locked():
            current = self.current_name()
            doomed = [v for v in self.versions()[:-keep] if v != current]
            for v in doomed:
                shutil.rmtree(self._dir(v), ignore_errors=True)
            if doomed:
                data = self._read_current()
                if data is not None:
                    data["history"] = [v for v in data.get("history", []) if v not in doomed]
                    self._write_current(data)
            return doomed

    def _write_current(self, data: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".CURRENT-", dir=self.root)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.root / CURRENT)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _jsonable(v: Any) -> Any:
    if hasattr(v, "tolist"):
        return v.tolist()
    return str(v)
