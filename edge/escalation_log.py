"""The escalation log: every request the edge sent (or tried to send) to the cloud.

SQLite in WAL mode, one row per escalation, committed before :meth:`EscalationLog.append`
returns — with ``synchronous=FULL`` (the default) a row survives power loss, with ``NORMAL`` a
process crash. Co-evolution trains on this table later, so it is not digits-specific: arrays
are stored as ``.npy`` bytes (dtype and shape included, never pickled), everything else as
columns or JSON.
"""

from __future__ import annotations

import hashlib
import io
import json
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS escalations (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    ts_ms INTEGER NOT NULL,
    request_id TEXT NOT NULL,
    task TEXT NOT NULL,
    tier TEXT NOT NULL,               -- cloud | edge-degraded
    reason TEXT NOT NULL,
    tags TEXT NOT NULL,               -- JSON list
    input_digest TEXT NOT NULL,       -- sha256 of the input's .npy bytes
    input BLOB,                       -- .npy bytes; NULL when store_inputs is off
    edge_output BLOB NOT NULL,        -- .npy bytes
    edge_label INTEGER,
    edge_confidence REAL,
    cloud_output BLOB,                -- .npy bytes; NULL when the cloud did not answer
    cloud_label INTEGER,
    error TEXT,                       -- why the cloud did not answer
    timings_ms TEXT NOT NULL,         -- JSON object
    model_versions TEXT NOT NULL      -- JSON object
);
"""


def array_to_npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def npy_to_array(b: bytes) -> np.ndarray:
    return np.load(io.BytesIO(b), allow_pickle=False)


_COLUMNS = (
    "ts_ms, request_id, task, tier, reason, tags, input_digest, input, edge_output, edge_label,"
    " edge_confidence, cloud_output, cloud_label, error, timings_ms, model_versions"
)
_INSERT = f"INSERT INTO escalations ({_COLUMNS}) VALUES ({', '.join('?' * 16)})"


@dataclass(frozen=True)
class EscalationRecord:
    """One escalation. ``input_digest`` is filled in on append when left empty."""

    ts_ms: int
    request_id: str
    task: str
    tier: str
    reason: str
    tags: list[str] | frozenset[str]
    input: np.ndarray | None
    input_digest: str
    edge_output: np.ndarray
    edge_label: int | None
    edge_confidence: float | None
    cloud_output: np.ndarray | None
    cloud_label: int | None
    error: str | None
    timings_ms: dict[str, float]
    model_versions: dict[str, str]


class EscalationLog:
    """Append-only escalation table. Safe to share between threads."""

    def __init__(
        self,
        path: str | Path,
        *,
        synchronous: Literal["full", "normal"] = "full",
        store_inputs: bool = True,
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.store_inputs = store_inputs
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={synchronous.upper()}")
        self._db.executescript(_SCHEMA)
        self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def append(self, *records: EscalationRecord) -> None:
        """Insert the records in one transaction, committed before returning."""
        rows = [self._row(r) for r in records]
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.executemany(_INSERT, rows)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _row(self, r: EscalationRecord) -> tuple[Any, ...]:
        raw_input = array_to_npy(r.input) if r.input is not None else b""
        return (
            r.ts_ms,
            r.request_id,
            r.task,
            r.tier,
            r.reason,
            json.dumps(sorted(r.tags)),
            r.input_digest or hashlib.sha256(raw_input).hexdigest(),
            raw_input if self.store_inputs and r.input is not None else None,
            array_to_npy(r.edge_output),
            r.edge_label,
            _finite_or_none(r.edge_confidence),
            None if r.cloud_output is None else array_to_npy(r.cloud_output),
            r.cloud_label,
            r.error,
            json.dumps(r.timings_ms),
            json.dumps(r.model_versions),
        )

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM escalations").fetchone()[0]

    def records(self, task: str | None = None) -> Iterator[EscalationRecord]:
        """Every row, oldest first (optionally one task's)."""
        q = (
            f"SELECT {_COLUMNS} FROM escalations"
            + (" WHERE task = ?" if task else "")
            + " ORDER BY seq"
        )
        with self._lock:
            rows = self._db.execute(q, (task,) if task else ()).fetchall()
        for r in rows:
            yield EscalationRecord(
                ts_ms=r[0],
                request_id=r[1],
                task=r[2],
                tier=r[3],
                reason=r[4],
                tags=json.loads(r[5]),
                input_digest=r[6],
                input=None if r[7] is None else npy_to_array(r[7]),
                edge_output=npy_to_array(r[8]),
                edge_label=r[9],
                edge_confidence=r[10],
                cloud_output=None if r[11] is None else npy_to_array(r[11]),
                cloud_label=r[12],
                error=r[13],
                timings_ms=json.loads(r[14]),
                model_versions=json.loads(r[15]),
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> EscalationLog:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _finite_or_none(v: float | None) -> float | None:
    return None if v is None or v != v else float(v)
