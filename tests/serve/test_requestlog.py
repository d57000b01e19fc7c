"""The request log writer: nothing accepted is lost (concurrency, close, database failures), and
log() never waits for the database."""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import exc

from lmops.serve.requestlog import RequestLogger
from lmops.store import Store


@pytest.fixture
def store(tmp_path):
    with Store.open(f"sqlite:///{tmp_path / 'lmops.db'}") as s:
        yield s


def row(i: int, **extra) -> dict:
    return {"request_id": f"r{i}", "endpoint": "/v1/completions", "status_code": 200, "prompt": "p",
            "completion": "c", **extra}


def ids(store: Store) -> list[str]:
    return sorted(r.request_id for r in store.list_requests(limit=100_000))


def wait_until(condition, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def test_concurrent_log_calls_write_every_row_once(store):
    n, threads = 200, 8
    logger = RequestLogger(store, batch_rows=16, flush_interval_ms=5)
    start = threading.Barrier(threads)

    def work(t: int) -> None:
        start.wait()
        for i in range(t, n, threads):
            assert logger.log(row(i))

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert logger.close() == 0
    assert ids(store) == sorted(f"r{i}" for i in range(n))
    assert (logger.written, logger.dropped, logger.pending, logger.failures) == (n, 0, 0, 0)


def test_close_flushes_the_buffer(store):
    logger = RequestLogger(store, batch_rows=1000, flush_interval_ms=60_000)  # neither would trigger a write
    for i in range(10):
        logger.log(row(i))
    time.sleep(0.05)
    assert logger.pending == 10 and ids(store) == []
    assert logger.close() == 0
    assert len(ids(store)) == 10 and logger.written == 10
    assert logger.log(row(99)) is False and logger.dropped == 1  # closed: refused, counted


def test_flush_and_interval(store):
    with RequestLogger(store, batch_rows=1000, flush_interval_ms=60_000) as logger:
        logger.log(row(1))
        assert logger.flush(timeout=5) and ids(store) == ["r1"]
    with RequestLogger(store, batch_rows=1000, flush_interval_ms=20) as logger:
        logger.log(row(2))
        assert wait_until(lambda: "r2" in ids(store))  # the oldest row waited flush_interval_ms


def test_a_transient_failure_loses_nothing(store, monkeypatch):
    # Simulated: the store raises once, as when the database is locked or restarting; the rows are kept
    # and written on the retry.
    real = store.log_requests
    calls = []

    def flaky(rows):
        calls.append(len(rows))
        if len(calls) == 1:
            raise exc.OperationalError("INSERT INTO request_log ...", {}, Exception("simulated: database is locked"))
        return real(rows)

    monkeypatch.setattr(store, "log_requests", flaky)
    logger = RequestLogger(store, batch_rows=1000, flush_interval_ms=60_000)
    for i in range(50):
        logger.log(row(i))
    assert logger.flush(timeout=5)
    assert ids(store) == sorted(f"r{i}" for i in range(50))
    assert (logger.written, logger.dropped, logger.failures) == (50, 0, 1) and calls == [50, 50]
    assert logger.close() == 0


def test_a_row_the_database_refuses_is_dropped_alone(store):
    logger = RequestLogger(store, batch_rows=1000, flush_interval_ms=60_000)
    for i in range(5):
        logger.log(row(i, key_id=999 if i == 2 else None))  # 999: no such key (foreign key)
    assert logger.close() == 0
    assert ids(store) == ["r0", "r1", "r3", "r4"]
    assert (logger.written, logger.dropped) == (4, 1)


def test_log_never_waits_for_the_database_and_the_buffer_is_bounded(store, monkeypatch):
    real, release = store.log_requests, threading.Event()

    def hanging(rows):  # simulated: a database that does not answer until released
        release.wait()
        return real(rows)

    monkeypatch.setattr(store, "log_requests", hanging)
    logger = RequestLogger(store, batch_rows=2, flush_interval_ms=0, max_pending=5)
    start = time.perf_counter()
    accepted = [logger.log(row(i)) for i in range(8)]
    assert time.perf_counter() - start < 0.5
    assert accepted == [True] * 5 + [False] * 3 and logger.dropped == 3 and logger.pending == 5
    assert logger.flush(timeout=0.1) is False
    release.set()
    assert logger.close() == 0
    assert ids(store) == [f"r{i}" for i in range(5)] and logger.written == 5


def test_wrong_columns_fail_in_the_caller(store):
    with RequestLogger(store) as logger:
        with pytest.raises(ValueError, match="request_log has no column user"):
            logger.log({**row(1), "user": "x"})
        with pytest.raises(ValueError, match="without request_id"):
            logger.log({"endpoint": "/", "status_code": 200})
