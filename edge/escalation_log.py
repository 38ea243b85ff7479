"""The escalation log: every request the edge sent (or tried to send) to the cloud.
(Over 500 lines: one class, whose bounded queue, writer thread, retention and crash recovery
share one lock and one set of invariants.)

SQLite in WAL mode, one row per escalation. Co-evolution trains on this table later, so it is
not digits-specific: arrays are stored as ``.npy`` bytes (dtype and shape included, never
pickled), everything else as columns or JSON.

The log stays off the request path. :meth:`EscalationLog.append` and
:meth:`~EscalationLog.append_batch` only snapshot the rows onto a bounded in-memory queue (a
few microseconds); one writer thread gathers rows for :data:`GROUP_WINDOW_S`, serialises them
and writes every row waiting, up to :data:`BATCH_ROWS`, in one transaction with one commit
(group commit: one fsync per batch with ``synchronous=full``). A failed batch is rolled back,
counted in :meth:`EscalationLog.stats` and logged; the rows after it are written as usual.
Nothing here raises into a request because storage failed.

What survives: rows still in the queue are lost on a crash or power loss in either mode
(:meth:`EscalationLog.flush` waits for them). Committed rows survive a process crash in both
modes; a power loss only with ``synchronous=full`` — with ``normal`` the last commits before
the power loss may be lost (the database itself stays consistent).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import sqlite3
import threading
import time
import weakref
from collections import deque
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from tandem.edge.escalation_rows import (
    COLUMNS,
    INSERT,
    MIGRATE_1_TO_2,
    SCHEMA,
    SCHEMA_VERSION,
    TRIM_ROWS,
    EscalationRecord,
    array_to_npy,
    decode_row,
    encode_row,
    frozen,
    npy_to_array,
    snapshot,
)

__all__ = ["EscalationLog", "EscalationRecord", "array_to_npy", "npy_to_array"]

log = logging.getLogger(__name__)


DEFAULT_QUEUE_ROWS = 10_000
DEFAULT_QUEUE_BYTES = 64 << 20  # array bytes held by queued rows
BATCH_ROWS = 512  # rows per transaction at most
# After a row arrives the writer waits this long for more to join its batch, so a steady
# stream costs one wake-up and one commit per window instead of per row. Measured (same VM,
# sequential escalations to a loopback worker, ~2k/s, synchronous=full): p50 of the request
# +200 µs over no log with no window, +35 µs with 5 ms, +30 µs with 20 ms.
GROUP_WINDOW_S = 0.005
WRITER_BUSY_TIMEOUT_MS = 200  # the writer gives up on a locked database after this
SETUP_BUSY_TIMEOUT_MS = 5_000  # opening the log (schema, WAL) may wait longer
READ_BUSY_TIMEOUT_MS = 1_000
READ_CHUNK_ROWS = 256  # rows per fetchmany in records()
AGE_CHECK_EVERY_S = 1.0  # max_age_s is enforced at most this often
AGE_SCAN_ROWS = 1_000  # oldest rows looked at per step of an age pass
AGE_DELETE_MAX_ROWS = 50_000  # per pass, so one pass never holds the write lock for long
# The writer holds the GIL while it serialises rows; every GIL_SLICE_ROWS rows it sleeps
# GIL_YIELD_S so a request thread waiting for the GIL gets it then, not after CPython's 5 ms
# switch interval. Measured (2-core AMD EPYC VM, a thread sleeping 100 µs in a loop while the
# writer takes one 512-row burst of 1 KiB inputs; worst wait per burst, p50 of 20 bursts):
# no slicing 2.5-2.8 ms, 32 rows 0.9-1.1 ms, 16 rows 0.55-0.6 ms, 8 rows 0.36-0.48 ms,
# 4 rows 0.31-0.33 ms (but twice the sleeps of 8).
GIL_SLICE_ROWS = 8
GIL_YIELD_S = 20e-6
FAILURE_BACKOFF_S = 0.1  # after a failed batch; rows wait in the queue meanwhile
BUSY_RETRIES = 5  # a batch meeting a locked database is retried, backing off 0.1, 0.2... s
WARN_EVERY_S = 10.0  # drop and failure warnings, at most this often


class EscalationLog:
    """Append-only escalation table written by one background thread. Safe to share between
    threads; call :meth:`close` (or use it as a context manager) to write what is queued."""

    def __init__(
        self,
        path: str | Path,
        *,
        synchronous: Literal["full", "normal"] = "full",
        store_inputs: bool = True,
        queue_rows: int = DEFAULT_QUEUE_ROWS,
        queue_bytes: int = DEFAULT_QUEUE_BYTES,
        max_rows: int | None = None,
        max_age_s: float | None = None,
        busy_timeout_ms: int = WRITER_BUSY_TIMEOUT_MS,
        group_window_s: float = GROUP_WINDOW_S,
    ) -> None:
        """Open (or create) the table; raises :class:`sqlite3.Error` here, never later, when
        the file cannot be opened. ``max_rows`` and ``max_age_s`` (by ``ts_ms``, wall clock)
        bound what is kept; the oldest rows are deleted first."""
        if queue_rows < 1 or queue_bytes < 1:
            raise ValueError("queue_rows and queue_bytes must be at least 1")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.synchronous = synchronous
        self.store_inputs = store_inputs
        self.queue_rows, self.queue_bytes = queue_rows, queue_bytes
        self.max_rows, self.max_age_s = max_rows, max_age_s
        self.busy_timeout_ms = busy_timeout_ms
        self.group_window_s = group_window_s
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # the writer waits for rows here
        self._done = threading.Condition(self._lock)  # flush waits for the writer here
        self._queue: deque[tuple[tuple[Any, ...], int]] = deque()
        self._queued_bytes = 0
        self._accepted = 0  # rows ever queued
        self._processed = 0  # rows the writer has committed or given up on
        self._failed_spans: deque[tuple[int, int]] = deque(maxlen=256)  # [start, end) of _processed
        self._closed = self._stopping = False
        self._flushing = 0  # flush() calls waiting
        self._counts = dict.fromkeys(
            ("written", "dropped", "failed_batches", "failed_rows", "batches", "deleted"), 0
        )
        self._last_error: str | None = None
        self._drop_warning = _Throttle(WARN_EVERY_S)
        self._fail_warning = _Throttle(WARN_EVERY_S)
        self._next_age_check = 0.0
        self._db: sqlite3.Connection | None = self._open_writer(SETUP_BUSY_TIMEOUT_MS)
        self._thread = threading.Thread(
            target=self._run, name=f"tandem-escalation-log[{self.path.name}]", daemon=True
        )
        self._thread.start()
        _OPEN_LOGS.add(self)

    # ------------------------------------------------------------------ the request path
    def append(self, *records: EscalationRecord) -> None:
        """Queue the records for the writer thread and return at once (about 5 µs a row).

        Never blocks and never raises because of storage: when the queue is full (``queue_rows``
        rows or ``queue_bytes`` of arrays), or the log is closed, the rows are dropped, counted
        in ``stats()["dropped"]`` and a warning is logged (at most every 10 s). Writeable arrays
        are copied; read-only ones are kept as they are, so do not write to their buffer later.
        Raises ``TypeError``/``ValueError`` only for records that could never be stored.
        """
        self._enqueue([snapshot(r) for r in records])

    def append_batch(
        self,
        *,
        ts_ms: int,
        task: str,
        tier: str,
        request_ids: Sequence[str],
        reasons: Sequence[str],
        tags: Collection[str],
        inputs: np.ndarray | None,
        edge_outputs: np.ndarray,
        edge_labels: Sequence[int | None],
        edge_confidences: Sequence[float | None],
        cloud_outputs: np.ndarray | None,
        cloud_labels: Sequence[int | None] | None,
        error: str | None,
        timings_ms: dict[str, float],
        model_versions: dict[str, str],
    ) -> None:
        """:meth:`append` for the N rows of one escalated request, which share task, tier,
        tags, error, timings and versions; arrays are (N, ...). No per-row record is built,
        so this is what :class:`~tandem.edge.EdgeRuntime` calls (about 7 µs for one row)."""
        n = len(request_ids)
        inp = None if inputs is None else frozen(inputs)
        eo = frozen(edge_outputs)
        co = None if cloud_outputs is None else frozen(cloud_outputs)
        lengths = {len(reasons), len(edge_labels), len(edge_confidences), len(eo)}
        lengths |= {len(inp)} if inp is not None else set()
        lengths |= {len(co), len(cloud_labels or ())} if co is not None else set()
        if lengths != {n}:
            raise ValueError(f"append_batch: {n} request ids but other fields of lengths {lengths}")
        row_bytes = (
            eo.nbytes + (0 if inp is None else inp.nbytes) + (0 if co is None else co.nbytes)
        ) // max(n, 1)
        tags_, tm, mv = tuple(tags), dict(timings_ms), dict(model_versions)
        self._enqueue(
            [
                (
                    (
                        ts_ms,
                        request_ids[i],
                        task,
                        tier,
                        reasons[i],
                        tags_,
                        None if inp is None else inp[i],
                        "",
                        eo[i],
                        edge_labels[i],
                        edge_confidences[i],
                        None if co is None else co[i],
                        None if cloud_labels is None else cloud_labels[i],
                        error,
                        tm,
                        mv,
                        None,
                    ),
                    row_bytes,
                )
                for i in range(n)
            ]
        )

    def _enqueue(self, items: list[tuple[tuple[Any, ...], int]]) -> None:
        dropped, suppressed = 0, None
        with self._lock:
            before = len(self._queue)
            for item in items:
                full = len(self._queue) >= self.queue_rows or (
                    self._queue and self._queued_bytes + item[1] > self.queue_bytes
                )
                if self._closed or full:
                    dropped += 1
                    continue
                self._queue.append(item)
                self._queued_bytes += item[1]
                self._accepted += 1
            if dropped:
                self._counts["dropped"] += dropped
                suppressed = self._drop_warning.ready(dropped)
            after = len(self._queue)
            if before == 0 < after or before < BATCH_ROWS <= after:
                self._work.notify()
        if suppressed is not None:
            log.warning(
                "escalation log %s: %d rows dropped (%s)",
                self.path,
                suppressed,
                "log closed" if self._closed else "queue full: the writer is behind or failing",
                extra={"dropped_rows": suppressed, "escalation_log": str(self.path)},
            )

    # ------------------------------------------------------------------ waiting, closing
    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until every row queued before this call is committed. False when the timeout
        (seconds) expired first or some of those rows failed to be written."""
        with self._lock:
            start, target = self._processed, self._accepted
            self._flushing += 1  # the writer stops gathering
            self._work.notify()
            try:
                ok = self._done.wait_for(
                    lambda: self._processed >= target or not self._thread.is_alive(), timeout_s
                )
            finally:
                self._flushing -= 1
            ok = ok and self._processed >= target
            return ok and not any(s < target and e > start for s, e in self._failed_spans)

    def close(self, timeout_s: float = 5.0) -> bool:
        """Flush, stop the writer and close the database; True when every row ever appended
        was written (none dropped, none failed).
        Returns within about ``timeout_s`` plus the writer's busy timeout even when the
        database is locked or broken: rows still queued then are dropped (counted)."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            if self._closed:
                return not self._queue
            self._closed = True
        ok = self.flush(timeout_s)
        with self._lock:
            self._stopping = True
            left = len(self._queue)
            if left:
                self._queue.clear()
                self._queued_bytes = 0
                self._counts["dropped"] += left
            self._work.notify()
        if left:
            log.warning("escalation log %s: closed with %d rows unwritten", self.path, left)
        wait_s = max(0.0, deadline - time.monotonic()) + self.busy_timeout_ms / 1e3 + 0.5
        self._thread.join(wait_s)
        _OPEN_LOGS.discard(self)
        failed = self._counts["failed_rows"] + self._counts["dropped"]
        return ok and not left and not failed and not self._thread.is_alive()

    def stats(self) -> dict[str, Any]:
        """Counters since this log was opened: ``queued`` (rows waiting now), ``written``,
        ``dropped`` (queue full or closed), ``failed_batches``/``failed_rows`` (rolled back),
        ``batches`` (commits), ``deleted`` (by retention) and ``last_error``."""
        with self._lock:
            return {
                "queued": len(self._queue),
                "queued_bytes": self._queued_bytes,
                **self._counts,
                "last_error": self._last_error,
            }

    # ------------------------------------------------------------------ reading
    def __len__(self) -> int:
        """Committed rows, after waiting (up to 5 s) for rows queued before the call."""
        self.flush()
        with contextlib.closing(self._reader()) as db:
            return db.execute("SELECT COUNT(*) FROM escalations").fetchone()[0]

    def records(self, task: str | None = None) -> Iterator[EscalationRecord]:
        """Every row, oldest first (optionally one task's), read in chunks of
        :data:`READ_CHUNK_ROWS` on a connection of its own. Waits first (up to 5 s) for rows
        queued before iteration starts. The read is one snapshot: rows written meanwhile are
        not seen."""
        self.flush()
        q = (
            f"SELECT {COLUMNS} FROM escalations"
            + (" WHERE task = ?" if task else "")
            + " ORDER BY seq"
        )
        with contextlib.closing(self._reader()) as db:
            cur = db.execute(q, (task,) if task else ())
            while chunk := cur.fetchmany(READ_CHUNK_ROWS):
                for r in chunk:
                    yield decode_row(r)

    def _reader(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=READ_BUSY_TIMEOUT_MS / 1e3, isolation_level=None)
        db.execute("PRAGMA query_only=ON")
        return db

    # ------------------------------------------------------------------ the writer thread
    def _open_writer(self, busy_timeout_ms: int) -> sqlite3.Connection:
        db = sqlite3.connect(
            self.path,
            check_same_thread=False,  # opened by __init__, used only by the writer thread
            isolation_level=None,
            timeout=busy_timeout_ms / 1e3,
        )
        try:  # an existing log opens without the write lock, so a busy database cannot stop it
            if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={self.synchronous.upper()}")
            if not db.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'escalations'"
            ).fetchone():
                db.executescript(SCHEMA)
                db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            elif db.execute("PRAGMA user_version").fetchone()[0] < 2:
                db.execute(MIGRATE_1_TO_2)
                db.execute("PRAGMA user_version=2")
            db.execute(f"PRAGMA busy_timeout={int(self.busy_timeout_ms)}")
        except BaseException:
            db.close()
            raise
        return db

    def _run(self) -> None:
        try:
            while True:
                with self._lock:
                    while not self._queue and not self._stopping and not self._age_due():
                        self._work.wait(self._age_wait())
                    if self._queue and self.group_window_s > 0:  # let a group gather
                        self._work.wait_for(self._write_now, self.group_window_s)
                    if self._stopping and not self._queue:
                        return
                    n = min(len(self._queue), BATCH_ROWS)
                    batch = [self._queue.popleft() for _ in range(n)]
                    self._queued_bytes -= sum(b for _, b in batch)
                failed = self._write_guarded([item for item, _ in batch])
                with self._lock:
                    start, self._processed = self._processed, self._processed + n
                    if failed and n:
                        self._failed_spans.append((start, self._processed))
                    self._done.notify_all()
                    if failed and not self._stopping:
                        self._work.wait(FAILURE_BACKOFF_S)
        finally:
            with self._lock:
                db, self._db = self._db, None
                self._done.notify_all()
            if db is not None:
                db.close()

    def _write_now(self) -> bool:
        return self._stopping or self._flushing > 0 or len(self._queue) >= BATCH_ROWS

    def _age_due(self) -> bool:
        return self.max_age_s is not None and time.monotonic() >= self._next_age_check

    def _age_wait(self) -> float | None:
        if self.max_age_s is None:
            return None
        return max(0.0, self._next_age_check - time.monotonic())

    def _write_guarded(self, items: list[tuple[Any, ...]]) -> bool:
        """Write one batch; True when it failed or some of its rows were not written. A
        locked or busy database is retried (``BUSY_RETRIES`` times, backing off) before the
        batch counts as failed. Never raises."""
        bad = 0
        rows = []
        for i, item in enumerate(items):
            if i and i % GIL_SLICE_ROWS == 0:
                time.sleep(GIL_YIELD_S)
            try:
                rows.append(encode_row(item, self.store_inputs))
            except Exception as e:  # one unstorable row must not cost the batch
                bad += 1
                self._failed(e, "a row could not be serialised", 0, 1)
        for attempt in range(BUSY_RETRIES + 1):
            try:
                self._write(rows if items else None)
                break
            except Exception as e:
                self._rollback()
                busy = isinstance(e, sqlite3.OperationalError) and (
                    "locked" in str(e) or "busy" in str(e)
                )
                if busy and attempt < BUSY_RETRIES and not self._stopping:
                    time.sleep(FAILURE_BACKOFF_S * (attempt + 1))
                    continue
                self._failed(e, "batch rolled back", 1, len(rows))
                return True
        with self._lock:
            self._counts["written"] += len(rows)
            self._counts["batches"] += bool(rows)
        return bad > 0

    def _write(self, rows: list[tuple[Any, ...]] | None) -> None:
        """One transaction: the rows (serialised one at a time as SQLite asks for them),
        then retention, then one commit."""
        expire = self._age_due()
        if rows is None and not expire:
            return
        if expire:  # also when this pass fails: retry it later, not in a loop
            self._next_age_check = time.monotonic() + AGE_CHECK_EVERY_S
        if self._db is None:
            self._db = self._open_writer(self.busy_timeout_ms)
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        deleted = 0
        if rows is not None:
            db.executemany(INSERT, rows)
            if self.max_rows is not None:
                deleted += db.execute(TRIM_ROWS, (self.max_rows,)).rowcount
        more = False
        if expire:
            more, n = self._expire_by_age(db)
            deleted += n
        db.execute("COMMIT")
        if more:
            self._next_age_check = 0.0
        with self._lock:
            self._counts["deleted"] += deleted

    def _expire_by_age(self, db: sqlite3.Connection) -> tuple[bool, int]:
        """Delete the oldest rows while they are older than ``max_age_s``; stops at the first
        younger row (ts_ms has no index: this reads only the oldest end of the table).
        Returns (more may be left, rows deleted)."""
        assert self.max_age_s is not None
        cutoff = int(time.time() * 1e3 - self.max_age_s * 1e3)
        after, first, last, more = -1, None, None, False
        while True:
            chunk = db.execute(
                "SELECT seq, ts_ms FROM escalations WHERE seq > ? ORDER BY seq LIMIT ?",
                (after, AGE_SCAN_ROWS),
            ).fetchall()
            young = next((i for i, (_, ts) in enumerate(chunk) if ts >= cutoff), len(chunk))
            if young:
                first = chunk[0][0] if first is None else first
                last = chunk[young - 1][0]
            if young < AGE_SCAN_ROWS:
                break
            if last - first + 1 >= AGE_DELETE_MAX_ROWS:
                more = True
                break
            after = chunk[-1][0]
        if last is None:
            return False, 0
        return more, db.execute("DELETE FROM escalations WHERE seq <= ?", (last,)).rowcount

    def _rollback(self) -> None:
        """End a failed transaction; a connection that cannot is replaced, so the next batch
        never meets a transaction left open."""
        db = self._db
        if db is None:
            return
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")
        if db.in_transaction:
            self._db = None
            with contextlib.suppress(sqlite3.Error):
                db.close()

    def _failed(self, e: Exception, what: str, batches: int, rows: int) -> None:
        with self._lock:
            self._counts["failed_batches"] += batches
            self._counts["failed_rows"] += rows
            self._last_error = f"{type(e).__name__}: {e}"
            suppressed = self._fail_warning.ready(1)
        if suppressed is not None:
            log.error(
                "escalation log %s: %s (%d rows lost, %d failures since the last message)",
                self.path,
                what,
                rows,
                suppressed,
                exc_info=e,
                extra={"failed_rows": rows, "escalation_log": str(self.path)},
            )

    def __enter__(self) -> EscalationLog:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _Throttle:
    """Lets a message through at most every ``every_s`` seconds, counting what it held back."""

    def __init__(self, every_s: float) -> None:
        self.every_s, self._next, self._held = every_s, 0.0, 0

    def ready(self, n: int) -> int | None:
        """Count ``n`` events; the count since the last message when one is due, else None."""
        self._held += n
        now = time.monotonic()
        if now < self._next:
            return None
        held, self._held, self._next = self._held, 0, now + self.every_s
        return held


_OPEN_LOGS: weakref.WeakSet[EscalationLog] = weakref.WeakSet()


@atexit.register
def _close_open_logs() -> None:
    """On a normal interpreter exit, write what is queued (bounded: 2 s a log)."""
    for lg in list(_OPEN_LOGS):
        lg.close(timeout_s=2.0)
