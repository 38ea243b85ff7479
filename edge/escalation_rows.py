"""The escalation table's rows: schema, the record type, and how a row is stored — arrays as
``.npy`` bytes (dtype and shape included, never pickled), everything else as columns or JSON.
Co-evolution trains on this table, so nothing here is digits-specific."""

from __future__ import annotations

import functools
import hashlib
import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.lib import format as npy_format

SCHEMA_VERSION = 2  # 2: the `generation` column

SCHEMA = """
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
    model_versions TEXT NOT NULL,     -- JSON object
    generation TEXT                   -- JSON for generation requests: prompt, answers, log-probs
);
"""


def array_to_npy(a: np.ndarray) -> bytes:
    """The bytes ``np.save(f, np.ascontiguousarray(a), allow_pickle=False)`` writes, about 9x
    faster for small arrays (1.6 vs 14.6 µs for 64 float32): the header is cached per dtype
    and shape. E.g. ``array_to_npy(np.zeros(2, "<f4"))`` is a 128-byte header (magic
    ``\\x93NUMPY``, version 1.0, ``{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }``
    padded with spaces to a multiple of 64) followed by 8 zero bytes."""
    a = np.ascontiguousarray(a)
    if a.dtype.hasobject:
        raise ValueError("object arrays cannot be stored without pickle")
    try:
        header = _npy_header(a.dtype, a.shape)
    except ValueError:  # a header too long for format 1.0: let numpy pick the version
        buf = io.BytesIO()
        np.save(buf, a, allow_pickle=False)
        return buf.getvalue()
    return header + a.tobytes()


@functools.lru_cache(maxsize=1024)
def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    buf = io.BytesIO()
    npy_format.write_array_header_1_0(
        buf, {"descr": npy_format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    )
    return buf.getvalue()


def npy_to_array(b: bytes) -> np.ndarray:
    return np.load(io.BytesIO(b), allow_pickle=False)


COLUMNS = (
    "ts_ms, request_id, task, tier, reason, tags, input_digest, input, edge_output, edge_label,"
    " edge_confidence, cloud_output, cloud_label, error, timings_ms, model_versions, generation"
)
INSERT = f"INSERT INTO escalations ({COLUMNS}) VALUES ({', '.join('?' * 17)})"
# a version-1 log gains the column on open (older rows read it as NULL)
MIGRATE_1_TO_2 = "ALTER TABLE escalations ADD COLUMN generation TEXT"
TRIM_ROWS = "DELETE FROM escalations WHERE seq <= (SELECT MAX(seq) FROM escalations) - ?"


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
    # generation requests: {"prompt": str, "edge": {"text", "logprobs"}, "cloud": {...} | None,
    # "answer": str}; the prompt is also the row's input (its UTF-8 bytes, uint8)
    generation: dict[str, Any] | None = None


def snapshot(r: EscalationRecord) -> tuple[tuple[Any, ...], int]:
    """The record as the writer will see it, whatever the caller mutates afterwards, and the
    bytes its arrays hold."""
    if not isinstance(r, EscalationRecord):
        raise TypeError(f"append takes EscalationRecord, got {type(r).__name__}")
    inp = None if r.input is None else frozen(r.input)
    eo = frozen(r.edge_output)
    co = None if r.cloud_output is None else frozen(r.cloud_output)
    nbytes = eo.nbytes + (0 if inp is None else inp.nbytes) + (0 if co is None else co.nbytes)
    item = (
        r.ts_ms,
        r.request_id,
        r.task,
        r.tier,
        r.reason,
        tuple(r.tags),
        inp,
        r.input_digest,
        eo,
        r.edge_label,
        r.edge_confidence,
        co,
        r.cloud_label,
        r.error,
        dict(r.timings_ms),
        dict(r.model_versions),
        r.generation,
    )
    return item, nbytes


def frozen(a: Any) -> np.ndarray:
    """``a`` itself when nothing can write to it (read-only, and so is every array it views),
    else a read-only copy."""
    if isinstance(a, np.ndarray):
        base = a
        while not base.flags.writeable:
            base = base.base
            if not isinstance(base, np.ndarray):  # owns its data, or views an immutable buffer
                if a.dtype.hasobject:
                    raise ValueError("object arrays cannot be stored without pickle")
                return a
    c = np.array(a)
    if c.dtype.hasobject:
        raise ValueError("object arrays cannot be stored without pickle")
    c.flags.writeable = False
    return c


def decode_row(r: tuple[Any, ...]) -> EscalationRecord:
    return EscalationRecord(
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
        generation=None if r[16] is None else json.loads(r[16]),
    )


def _json_scalar(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    raise TypeError(f"{type(v).__name__} is not JSON serialisable")


def _finite_or_none(v: float | None) -> float | None:
    return None if v is None or v != v else float(v)


def encode_row(item: tuple[Any, ...], store_inputs: bool) -> tuple[Any, ...]:
    """A queued row (see :func:`snapshot`) as the INSERT's parameters: arrays to .npy bytes,
    dicts and tags to JSON, the input digest filled in."""
    ts, rid, task, tier, reason, tags, inp, digest, eo, el, ec, co, cl, err, tm, mv, gen = item
    for name, v in (("request_id", rid), ("task", task), ("tier", tier), ("reason", reason)):
        if not isinstance(v, str):
            raise TypeError(f"{name} must be a str, got {type(v).__name__}")
    raw_input = array_to_npy(inp) if inp is not None else b""
    return (
        int(ts),
        rid,
        task,
        tier,
        reason,
        json.dumps(sorted(tags)),
        digest or hashlib.sha256(raw_input).hexdigest(),
        raw_input if store_inputs and inp is not None else None,
        array_to_npy(eo),
        None if el is None else int(el),
        _finite_or_none(ec),
        None if co is None else array_to_npy(co),
        None if cl is None else int(cl),
        err,
        json.dumps(tm, default=_json_scalar),
        json.dumps(mv, default=_json_scalar),
        None if gen is None else json.dumps(gen, default=_json_scalar),
    )
