"""EscalationLog against real SQLite files and its real writer thread."""

from __future__ import annotations

import io
import sqlite3
import threading
import time
import tracemalloc
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tandem.edge import EdgeRuntime, EscalationLog, EscalationRecord, Tier
from tandem.edge import escalation_log as esc
from tandem.edge.escalation_log import array_to_npy, npy_to_array
from tandem.router.policy import policy_from_dict
from tandem.runtime.errors import ConfigError
from tests.peers import free_endpoint

POISON = "poison"


def rec(i: int, *, ts_ms: int | None = None, task: str = "t", n_in: int = 8) -> EscalationRecord:
    return EscalationRecord(
        ts_ms=int(time.time() * 1e3) if ts_ms is None else ts_ms,
        request_id=str(i),
        task=task,
        tier="cloud",
        reason="low-confidence",
        tags=["a", "b"],
        input=np.full(n_in, i, np.float32),
        input_digest="",
        edge_output=np.arange(3, dtype=np.float32) + i,
        edge_label=2,
        edge_confidence=0.5,
        cloud_output=np.ones(3, np.float32),
        cloud_label=1,
        error=None,
        timings_ms={"total": 1.5},
        model_versions={"edge": "v1"},
    )


def ids(log: EscalationLog) -> list[str]:
    return [r.request_id for r in log.records()]


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "esc.sqlite"


@pytest.fixture
def locked(db: Path) -> Iterator[sqlite3.Connection]:
    """A second connection holding the write lock; release with ``.execute("ROLLBACK")``."""
    EscalationLog(db).close()  # create the file and schema first
    other = sqlite3.connect(db, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    yield other
    if other.in_transaction:
        other.execute("ROLLBACK")
    other.close()


def poison_trigger(db: Path, when: str = f"NEW.request_id = '{POISON}'") -> None:
    with sqlite3.connect(db) as c:
        c.execute(
            f"CREATE TRIGGER poison BEFORE INSERT ON escalations WHEN {when}"
            " BEGIN SELECT RAISE(ABORT, 'poisoned row'); END"
        )


# ---------------------------------------------------------------- storage format
@settings(max_examples=200, deadline=None)
@given(
    hnp.arrays(
        dtype=st.one_of(
            hnp.integer_dtypes(endianness="="),
            hnp.unsigned_integer_dtypes(endianness=">"),
            hnp.floating_dtypes(endianness="<"),
            hnp.complex_number_dtypes(),
            hnp.boolean_dtypes(),
            hnp.byte_string_dtypes(max_len=4),
            hnp.unicode_string_dtypes(max_len=4),
        ),
        shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5),
    ),
    st.booleans(),
)
def test_array_to_npy_is_byte_identical_to_np_save(a: np.ndarray, transpose: bool) -> None:
    a = a.T if transpose else a  # not C-contiguous
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    assert array_to_npy(a) == buf.getvalue()
    back = npy_to_array(array_to_npy(a))
    assert back.dtype == a.dtype and back.shape == np.ascontiguousarray(a).shape
    np.testing.assert_array_equal(back, a)


def test_array_to_npy_refuses_object_arrays(db: Path) -> None:
    with pytest.raises(ValueError, match="pickle"):
        array_to_npy(np.array([object()]))
    with EscalationLog(db) as log:
        with pytest.raises(ValueError, match="pickle"):
            log.append(rec(1), replace(rec(0), edge_output=np.array([None, 1])))
        assert log.stats()["queued"] == 0


# ---------------------------------------------------------------- durability and batching
def test_rows_survive_close_and_reopen(db: Path) -> None:
    with EscalationLog(db, store_inputs=True) as first:
        first.append(*(rec(i) for i in range(10)))
        first.append(replace(rec(10), cloud_output=None, edge_confidence=float("nan")))
    stats = first.stats()
    assert stats["written"] == 11 and stats["queued"] == 0 and stats["last_error"] is None
    with EscalationLog(db) as log:
        recs = list(log.records())
        assert len(log) == 11
    assert [r.request_id for r in recs] == [str(i) for i in range(11)]
    np.testing.assert_array_equal(recs[4].input, np.full(8, 4, np.float32))
    np.testing.assert_array_equal(recs[4].edge_output, np.arange(3, dtype=np.float32) + 4)
    assert recs[4].tags == ["a", "b"] and recs[4].timings_ms == {"total": 1.5}
    assert len(recs[4].input_digest) == 64 and recs[4].input_digest != recs[5].input_digest
    assert recs[10].cloud_output is None and recs[10].edge_confidence is None


def test_append_snapshots_what_the_caller_may_change(db: Path) -> None:
    x = np.zeros(8, np.float32)
    timings = {"total": 1.0}
    with EscalationLog(db, store_inputs=True) as log:
        log.append(replace(rec(0), input=x, timings_ms=timings))
        x[:] = 7  # the caller reuses its buffer and adds a timing at once
        timings["log"] = 0.1
        [got] = list(log.records())
    np.testing.assert_array_equal(got.input, np.zeros(8, np.float32))
    assert got.timings_ms == {"total": 1.0}


def test_append_batch_writes_what_append_writes(tmp_path: Path) -> None:
    n = 3
    x = np.arange(n * 4, dtype=np.float32).reshape(n, 4)
    e = np.arange(n * 3, dtype=np.float32).reshape(n, 3)
    c = np.frombuffer((e + 1).tobytes(), np.float32).reshape(n, 3)  # read-only, as decoded
    common = dict(ts_ms=5, task="t", tier="cloud", error=None)
    shared = dict(timings_ms={"total": 1.0}, model_versions={"edge": "v"})
    with EscalationLog(tmp_path / "a.sqlite") as a, EscalationLog(tmp_path / "b.sqlite") as b:
        a.append(
            *(
                EscalationRecord(
                    **common,
                    **shared,
                    request_id=f"r:{i}",
                    reason=f"why{i}",
                    tags=["x"],
                    input=x[i],
                    input_digest="",
                    edge_output=e[i],
                    edge_label=i,
                    edge_confidence=0.25 * i,
                    cloud_output=c[i],
                    cloud_label=2,
                )
                for i in range(n)
            )
        )
        b.append_batch(
            **common,
            **shared,
            request_ids=[f"r:{i}" for i in range(n)],
            reasons=[f"why{i}" for i in range(n)],
            tags=["x"],
            inputs=x,
            edge_outputs=e,
            edge_labels=list(range(n)),
            edge_confidences=[0.25 * i for i in range(n)],
            cloud_outputs=c,
            cloud_labels=[2] * n,
        )
        x[:] = -1  # the caller's buffers are reused at once
        e[:] = -1
        assert a.flush(10) and b.flush(10)
        with sqlite3.connect(a.path) as ca, sqlite3.connect(b.path) as cb:
            q = "SELECT * FROM escalations ORDER BY seq"
            assert ca.execute(q).fetchall() == cb.execute(q).fetchall()
        [first, *_] = list(b.records())
    np.testing.assert_array_equal(first.input, np.arange(4, dtype=np.float32))
    with EscalationLog(tmp_path / "c.sqlite") as log, pytest.raises(ValueError, match="lengths"):
        log.append_batch(
            **common,
            **shared,
            request_ids=["a", "b"],
            reasons=["r"],
            tags=[],
            inputs=None,
            edge_outputs=np.zeros((2, 3)),
            edge_labels=[0, 1],
            edge_confidences=[0.5, 0.5],
            cloud_outputs=None,
            cloud_labels=None,
        )


SYNCHRONOUS = {"full": 2, "normal": 1}  # what PRAGMA synchronous reads back


@pytest.mark.parametrize("synchronous", ["normal", "full"])
def test_the_writer_commits_with_the_synchronous_mode_asked_for(db: Path, synchronous) -> None:
    """``synchronous`` is a setting of a connection, not of the file: read it back on the
    connection the writer commits with (SQLite's own default is full, so "normal" is the case
    that shows it is set at all)."""
    with EscalationLog(db, synchronous=synchronous) as log:
        writer = log._db  # idle: nothing appended yet
        assert writer is not None
        assert writer.execute("PRAGMA synchronous").fetchone()[0] == SYNCHRONOUS[synchronous]
        log.append(rec(1))
        assert log.flush(10)  # and it writes with it
    with sqlite3.connect(db) as other:  # a connection of its own keeps SQLite's default
        assert other.execute("PRAGMA synchronous").fetchone()[0] == SYNCHRONOUS["full"]


def test_the_policys_synchronous_mode_reaches_the_log_it_opens(make_policy, tmp_path) -> None:
    for mode in ("normal", "full"):
        policy = make_policy(None, name=f"{mode}.yaml")
        text = policy.read_text().replace("synchronous: normal", f"synchronous: {mode}")
        policy.write_text(text.replace("escalations.sqlite", f"{mode}.sqlite"))
        with EdgeRuntime.from_policy(policy) as rt:
            log = rt.escalation_log
            assert log is not None and log.path == tmp_path / f"{mode}.sqlite"
            assert log._db is not None
            assert log._db.execute("PRAGMA synchronous").fetchone()[0] == SYNCHRONOUS[mode]


def test_store_inputs_off_keeps_the_digest_only(db: Path) -> None:
    with EscalationLog(db, store_inputs=False) as log:
        log.append(rec(1))
        [got] = list(log.records())
    assert got.input is None and len(got.input_digest) == 64


def test_many_threads_are_group_committed(db: Path) -> None:
    n_threads, per_thread = 8, 400
    with EscalationLog(db, synchronous="full") as log:

        def run(k: int) -> None:
            for i in range(per_thread):
                log.append(rec(k * per_thread + i, task=f"t{k}"))

        threads = [threading.Thread(target=run, args=(k,)) for k in range(n_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert log.flush(30)
        stats = log.stats()
        rows = n_threads * per_thread
        assert stats["written"] == rows == len(log)
        assert 1 <= stats["batches"] <= rows // 10, stats  # far fewer commits than rows
        for k in range(n_threads):  # each thread's rows in the order it appended them
            got = [int(r.request_id) for r in log.records(task=f"t{k}")]
            assert got == list(range(k * per_thread, (k + 1) * per_thread))


def run_child(db: Path, tail: str) -> int:
    """Append 5 rows in a fresh interpreter, then run ``tail`` there."""
    import subprocess
    import sys

    code = f"""
import os, signal, time
import numpy as np
from tandem.edge import EscalationLog, EscalationRecord
log = EscalationLog({str(db)!r})
for i in range(5):
    log.append(EscalationRecord(ts_ms=int(time.time() * 1e3), request_id=str(i), task="t",
        tier="cloud", reason="r", tags=["a"], input=np.full(3, i, np.float32), input_digest="",
        edge_output=np.zeros(2), edge_label=0, edge_confidence=0.5, cloud_output=None,
        cloud_label=None, error=None, timings_ms={{}}, model_versions={{}}))
{tail}
"""
    return subprocess.run([sys.executable, "-c", code], timeout=60).returncode


def test_flushed_rows_survive_kill_9(db: Path) -> None:
    rc = run_child(db, "assert log.flush()\nos.kill(os.getpid(), signal.SIGKILL)")
    assert rc == -9
    with EscalationLog(db) as log:
        assert ids(log) == ["0", "1", "2", "3", "4"]
        assert sqlite3.connect(db).execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_a_log_left_open_is_written_on_a_normal_exit(db: Path) -> None:
    assert run_child(db, "raise SystemExit(0)  # no flush, no close") == 0
    with EscalationLog(db) as log:
        assert ids(log) == ["0", "1", "2", "3", "4"]


# ---------------------------------------------------------------- failures never wedge it
def test_failed_statement_is_rolled_back_and_later_rows_are_written(db: Path) -> None:
    EscalationLog(db).close()
    poison_trigger(db)
    with EscalationLog(db) as log:
        log.append(rec(1))
        assert log.flush(10)
        log.append(replace(rec(2), request_id=POISON))
        assert not log.flush(10)
        stats = log.stats()
        assert (stats["failed_batches"], stats["failed_rows"]) == (1, 1)
        assert "poisoned row" in stats["last_error"]
        for i in range(3, 6):  # unwedged: a transaction left open would fail all of these
            log.append(rec(i))
            assert log.flush(10)
        assert ids(log) == ["1", "3", "4", "5"]
        assert log.stats()["written"] == 4 and log.stats()["failed_batches"] == 1


def test_failed_batch_loses_only_its_own_rows(db: Path) -> None:
    EscalationLog(db).close()
    poison_trigger(db)
    with EscalationLog(db) as log:
        assert log.flush(10)
        log.append(
            rec(2), replace(rec(3), request_id=POISON), rec(4)
        )  # queued in one go while the writer is idle: one batch
        assert not log.flush(10)
        stats = log.stats()
        assert (stats["failed_batches"], stats["failed_rows"], stats["written"]) == (1, 3, 0)
        log.append(rec(5))
        assert log.flush(10) and ids(log) == ["5"]


def test_failed_commit_is_rolled_back_and_later_rows_are_written(db: Path) -> None:
    deny = threading.Event()

    def authorizer(action: int, arg1: str | None, *_: object) -> int:
        if deny.is_set() and action == sqlite3.SQLITE_TRANSACTION and arg1 == "COMMIT":
            return sqlite3.SQLITE_DENY
        return sqlite3.SQLITE_OK

    with EscalationLog(db) as log:
        log.append(rec(1))
        assert log.flush(10)
        deny.set()
        assert log._db is not None
        log._db.set_authorizer(authorizer)  # the writer is idle: every COMMIT now fails
        log.append(rec(2), rec(3))
        assert not log.flush(10)
        stats = log.stats()
        assert (stats["failed_batches"], stats["failed_rows"]) == (1, 2)
        assert "not authorized" in stats["last_error"]
        deny.clear()
        log.append(rec(4))
        assert log.flush(10)
        assert ids(log) == ["1", "4"]


def test_a_full_queue_drops_and_never_blocks(db: Path, locked: sqlite3.Connection) -> None:
    log = EscalationLog(db, queue_rows=100, busy_timeout_ms=200)
    try:
        records = [rec(i) for i in range(1000)]
        t0 = time.perf_counter()
        for r in records:
            log.append(r)
        elapsed = time.perf_counter() - t0
        stats = log.stats()
        assert elapsed < 0.05, f"1000 appends took {elapsed * 1e3:.1f} ms"
        assert stats["queued"] <= 100
        assert 800 <= stats["dropped"] <= 900, stats  # the writer holds at most one batch
        locked.execute("ROLLBACK")
        log.flush(10)
        stats = log.stats()
        assert stats["written"] + stats["failed_rows"] + stats["dropped"] == 1000
        log.append(rec(2000))
        assert log.flush(10) and ids(log)[-1] == "2000"
    finally:
        log.close()


def test_queue_bytes_bounds_big_rows(db: Path, locked: sqlite3.Connection) -> None:
    row_bytes = 4 * 10_000 + 2 * 12
    log = EscalationLog(db, queue_bytes=5 * row_bytes, busy_timeout_ms=100)
    try:
        for i in range(50):
            log.append(rec(i, n_in=10_000))
        stats = log.stats()
        assert stats["queued_bytes"] <= 5 * row_bytes and stats["dropped"] >= 40
    finally:
        log.close(timeout_s=0.1)


def test_close_returns_while_the_database_is_locked(db: Path, locked: sqlite3.Connection) -> None:
    log = EscalationLog(db, busy_timeout_ms=100)
    log.append(*(rec(i) for i in range(5000)))
    t0 = time.perf_counter()
    assert log.close(timeout_s=0.3) is False
    elapsed = time.perf_counter() - t0
    assert elapsed < 0.3 + 0.1 + 0.5 + 0.5, elapsed
    assert not log._thread.is_alive()
    stats = log.stats()
    assert stats["written"] == 0 and stats["dropped"] + stats["failed_rows"] == 5000
    log.append(rec(1))  # appending to a closed log drops, it does not raise
    assert log.stats()["dropped"] + log.stats()["failed_rows"] == 5001


def test_close_returns_when_every_write_fails(db: Path) -> None:
    EscalationLog(db).close()
    poison_trigger(db, when="1")
    log = EscalationLog(db)
    for i in range(2000):
        log.append(rec(i))
    t0 = time.perf_counter()
    assert log.close(timeout_s=1.0) is False
    assert time.perf_counter() - t0 < 3.0
    stats = log.stats()
    assert stats["written"] == 0 and stats["failed_rows"] + stats["dropped"] == 2000


# ---------------------------------------------------------------- retention
def test_retention_by_rows_keeps_the_newest(db: Path) -> None:
    with EscalationLog(db, max_rows=50) as log:
        for start in range(0, 200, 40):
            log.append(*(rec(i) for i in range(start, start + 40)))
            assert log.flush(10)
        assert len(log) == 50
        assert ids(log) == [str(i) for i in range(150, 200)]
        assert log.stats()["deleted"] == 150


def test_retention_by_age_deletes_old_rows(db: Path) -> None:
    now = int(time.time() * 1e3)
    with EscalationLog(db) as log:  # rows from an earlier session, before retention was set
        log.append(*(rec(i, ts_ms=now - 3_600_000) for i in range(30)))
    with EscalationLog(db, max_age_s=60) as log:
        log.append(*(rec(i, ts_ms=now) for i in range(30, 40)))
        assert log.flush(10)
        assert ids(log) == [str(i) for i in range(30, 40)]
        assert log.stats()["deleted"] == 30


def test_retention_by_age_runs_while_idle(db: Path) -> None:
    with EscalationLog(db, max_age_s=1.0) as log:
        log.append(*(rec(i) for i in range(20)))
        assert log.flush(10) and len(log) == 20  # fresh: kept
        deadline = time.monotonic() + 8
        while len(log) and time.monotonic() < deadline:  # no appends: the writer wakes itself
            time.sleep(0.05)
        assert len(log) == 0 and log.stats()["deleted"] == 20


def test_retention_options_are_validated_in_the_policy(tmp_path: Path) -> None:
    base = {"tasks": {"t": {"local": {"path": "m.onnx"}, "gate": {"threshold": 0.5}}}}
    ok = policy_from_dict(
        {**base, "escalation_log": {"path": "e.sqlite", "max_rows": 10, "max_age_s": 3600}},
        base_dir=tmp_path,
    )
    assert ok.escalation_log is not None and ok.escalation_log.queue_rows == 10_000
    assert ok.escalation_log.max_rows == 10 and ok.escalation_log.max_age_s == 3600
    for bad in ({"queue_rows": 0}, {"max_rows": 0}, {"max_age_s": 0}, {"queue_bytes": 1}):
        with pytest.raises(ConfigError):
            policy_from_dict(
                {**base, "escalation_log": {"path": "e.sqlite", **bad}}, base_dir=tmp_path
            )


# ---------------------------------------------------------------- reading
def test_records_iterates_in_chunks_in_order(db: Path) -> None:
    n = 3 * esc.READ_CHUNK_ROWS + 17
    with EscalationLog(db) as log:
        log.append(*(rec(i, task="even" if i % 2 == 0 else "odd") for i in range(n)))
        assert ids(log) == [str(i) for i in range(n)]
        assert [r.request_id for r in log.records("odd")] == [str(i) for i in range(1, n, 2)]
        it = log.records()
        assert next(it).request_id == "0"
        log.append(rec(n))  # a running iteration reads one snapshot
        assert log.flush(10)
        assert sum(1 for _ in it) == n - 1
        assert len(log) == n + 1


def test_records_never_loads_the_table(db: Path) -> None:
    n, n_in = 2_000, 2_048  # 8 KiB inputs: 16 MiB of input bytes in the table
    with EscalationLog(db, queue_bytes=1 << 30) as log:
        for start in range(0, n, 500):
            log.append(*(rec(i, n_in=n_in) for i in range(start, start + 500)))
        assert log.flush(30)
        tracemalloc.start()
        try:
            count = sum(1 for _ in log.records())
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert count == n
    assert peak < 16 * 2**20 / 2, f"peak {peak / 2**20:.1f} MiB while iterating"


# ---------------------------------------------------------------- inside EdgeRuntime


def test_a_broken_log_never_reaches_infer(make_policy, tmp_path: Path, digits_x) -> None:
    policy = make_policy(free_endpoint(), threshold=1.0, deadline_ms=30)
    db = tmp_path / "escalations.sqlite"
    with EdgeRuntime.from_policy(policy) as rt:
        assert rt.escalation_log is not None and rt.escalation_log.path == db
        poison_trigger(db, when="1")  # every write fails from now on
        results = [rt.infer(x) for x in digits_x]
        assert all(r.tier is Tier.EDGE_DEGRADED for r in results)
        assert not rt.escalation_log.flush(10)
        stats = rt.stats()["escalation_log"]
        assert stats["failed_rows"] == len(digits_x) and stats["written"] == 0
        assert "poisoned row" in stats["last_error"]
        with sqlite3.connect(db) as c:
            c.execute("DROP TRIGGER poison")
        rt.infer(digits_x[0])  # the same log goes on writing once the database is healthy
        assert rt.escalation_log.flush(10)
        assert rt.stats()["escalation_log"]["written"] == 1 and len(rt.escalation_log) == 1
    assert all(r.timings["log"] < 5 for r in results)  # ms: queued, never written inline


def test_a_briefly_locked_database_costs_no_rows(db: Path, locked: sqlite3.Connection) -> None:
    log = EscalationLog(db, busy_timeout_ms=100)
    log.append(*(rec(i) for i in range(100)))
    time.sleep(0.4)  # the writer meets the lock and backs off, rows kept
    locked.execute("ROLLBACK")
    assert log.flush(10)
    stats = log.stats()
    assert stats["written"] == 100 and stats["failed_rows"] == 0
    assert log.close()  # every row written
