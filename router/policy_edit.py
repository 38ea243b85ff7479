"""Edits to a policy file that a human can review: what ``tandem calibrate`` changes (a gate's
threshold and temperature, the task's ``calibration:`` record), made on the YAML text with
ruamel.yaml's round trip so comments, key order, quoting and flow style stay as they were.

An edit is validated with the policy loader before anything is written, shown as a unified
diff, and written atomically (a temporary file in the same folder, fsync, ``os.replace``),
keeping the previous file as ``POLICY.bak`` when it replaces it in place.
"""

from __future__ import annotations

import contextlib
import difflib
import io
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tandem.router.policy import CalibrationRecord, Policy, policy_from_dict
from tandem.runtime.errors import ConfigError

BACKUP_SUFFIX = ".bak"


def _yaml() -> Any:
    from ruamel.yaml import YAML

    y = YAML(typ="rt")
    y.preserve_quotes = True
    y.width = 4096  # never re-wrap a user's long lines
    return y


@dataclass(frozen=True)
class PolicyEdit:
    """A validated change to one policy file, not yet written."""

    path: Path
    old_text: str
    new_text: str
    policy: Policy  # the edited policy, as the loader reads it

    @property
    def changed(self) -> bool:
        return self.old_text != self.new_text

    def diff(self, out: Path | None = None) -> str:
        """The change as a unified diff."""
        return "".join(
            difflib.unified_diff(
                self.old_text.splitlines(keepends=True),
                self.new_text.splitlines(keepends=True),
                fromfile=str(self.path),
                tofile=str(out or self.path),
            )
        )

    def write(self, out: str | Path | None = None) -> Path:
        """Write the edited text atomically to ``out`` (default: over the policy file, which
        is first copied to ``POLICY.bak``). Relative paths in a policy resolve against its
        folder, so writing to another folder is validated against that folder first."""
        dest = Path(out) if out is not None else self.path
        if dest.parent.resolve() != self.path.parent.resolve():
            validate_policy_text(self.new_text, base_dir=dest.parent, source=str(dest))
        if out is None:
            shutil.copy2(self.path, self.path.with_name(self.path.name + BACKUP_SUFFIX))
        _atomic_write(dest, self.new_text)
        return dest


def validate_policy_text(text: str, *, base_dir: str | Path, source: str) -> Policy:
    """Parse ``text`` as a policy (paths relative to ``base_dir``); :class:`ConfigError` naming
    every bad key otherwise."""
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: the edit is not valid YAML: {e}") from None
    return policy_from_dict(data, base_dir=base_dir, source=source)


def _atomic_write(dest: Path, text: str) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}-", dir=dest.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if dest.exists():
            shutil.copymode(dest, tmp)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _flow(value: Any) -> Any:
    """``value`` as ruamel nodes: small mappings and lists of numbers in flow style."""
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    if isinstance(value, dict):
        m = CommentedMap((k, _flow(v)) for k, v in value.items())
        if all(not isinstance(v, dict | list) for v in value.values()) and len(value) <= 4:
            m.fa.set_flow_style()
        return m
    if isinstance(value, list):
        s = CommentedSeq(_flow(v) for v in value)
        s.fa.set_flow_style()
        return s
    return value


def _keep_indentation(y: Any, text: str) -> None:
    """Dump with the file's own indentation: its first nested mapping's indent, and ruamel's
    guess for sequences (where the dash sits, where the item starts)."""
    from ruamel.yaml.util import load_yaml_guess_indent

    mapping = next(
        (
            len(line) - len(line.lstrip(" "))
            for line in text.splitlines()
            if line.startswith(" ") and not line.lstrip().startswith(("-", "#"))
        ),
        2,
    )
    try:
        _, seq, dash = load_yaml_guess_indent(text)
    except Exception:
        seq, dash = None, None
    y.indent(mapping=mapping, sequence=seq or mapping, offset=dash or 0)


def edit_task(
    path: str | Path,
    task: str,
    *,
    threshold: float | None = None,
    temperature: float | None = None,
    calibration: CalibrationRecord | dict[str, Any] | None = None,
    base_dir: str | Path | None = None,
) -> PolicyEdit:
    """Set ``tasks.<task>.gate.threshold`` (and ``.temperature``: confidence gates only) and
    the task's ``calibration:`` record in the policy file at ``path``, keeping the rest of the
    text. The result is validated (paths relative to ``base_dir``, default the file's folder)
    before it is returned; nothing is written here. :class:`ConfigError` for a missing task or
    gate, or an edit the loader refuses (e.g. a threshold above 1)."""
    p = Path(path)
    try:
        old = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{p}: cannot read: {e.strerror or e}") from None
    y = _yaml()
    _keep_indentation(y, old)
    try:
        doc = y.load(old)
    except Exception as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    tasks = doc.get("tasks") if isinstance(doc, dict) else None
    if not isinstance(tasks, dict) or task not in tasks:
        known = ", ".join(map(str, tasks)) if isinstance(tasks, dict) else "none"
        raise ConfigError(f"{p}: tasks.{task}: no such task (the file has: {known})")
    node = tasks[task]
    gate = node.get("gate") if isinstance(node, dict) else None
    if not isinstance(gate, dict):
        raise ConfigError(f"{p}: tasks.{task}.gate: missing; calibrate edits an existing gate")
    if threshold is not None:
        gate["threshold"] = round(float(threshold), 6)
    if temperature is not None:
        if gate.get("type", "confidence") != "confidence" or node.get("kind") == "generate":
            raise ConfigError(f"{p}: tasks.{task}.gate: only a confidence gate has a temperature")
        gate["temperature"] = round(float(temperature), 4)
    if calibration is not None:
        rec = (
            calibration
            if isinstance(calibration, CalibrationRecord)
            else CalibrationRecord.model_validate(calibration)
        )
        dumped = rec.model_dump(mode="json", exclude_none=True)
        node["calibration"] = _flow({k: v for k, v in dumped.items() if v not in ({}, [])})
    buf = io.StringIO()
    y.dump(doc, buf)
    new = buf.getvalue()
    policy = validate_policy_text(new, base_dir=base_dir or p.parent, source=str(p))
    return PolicyEdit(p, old, new, policy)
