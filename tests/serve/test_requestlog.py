"""The request log writer: nothing accepted is lost (concurrency, close, database failures), and
log() never waits for the database."""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import exc

from lmops.serve.requestlog import RequestLogger
from lmops.store import Store

from .conftest import free_port, serve_command


@pytest.fixture
def store(tmp_path):
    with Store.open(f"sqlite:///{tmp_path / 'lmops.db'}") as s:
        yield s


def row(i: int, **extra) -> dict:
    return {"request_id": f"r{i}", "route": "/v1/completions", "status_code": 200, "prompt": "p",
            "completion": "c", **extra}


def ids(store: Store) -> list[str]:
    return sorted(r.request_id for r in store.requests.list(limit=100_000))


def wait_until(condition, timeout: float = 30.0) -> bool:
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


def test_close_flushes_the_buffer(store, monkeypatch):
    real, wrote = store.requests.log, threading.Event()

    def watched(rows):
        wrote.set()
        return real(rows)

    monkeypatch.setattr(store.requests, "log", watched)
    logger = RequestLogger(store, batch_rows=1000, flush_interval_ms=60_000)  # neither would trigger a write
    for i in range(10):
        logger.log(row(i))
    assert not wrote.wait(0.2)  # nothing is written before close (a write would set it at once)
    assert logger.pending == 10 and ids(store) == []
    assert logger.close() == 0
    assert len(ids(store)) == 10 and logger.written == 10
    assert logger.log(row(99)) is False and logger.dropped == 1  # closed: refused, counted


def test_flush_and_interval(store):
    with RequestLogger(store, batch_rows=1000, flush_interval_ms=60_000) as logger:
        logger.log(row(1))
        assert logger.flush(timeout=30) and ids(store) == ["r1"]
    with RequestLogger(store, batch_rows=1000, flush_interval_ms=20) as logger:
        logger.log(row(2))
        assert wait_until(lambda: "r2" in ids(store))  # the oldest row waited flush_interval_ms


def test_a_transient_failure_loses_nothing(store, monkeypatch):
    # Simulated: the store raises once, as when the database is locked or restarting; the rows are kept
    # and written on the retry.
    real = store.requests.log
    calls = []

    def flaky(rows):
        calls.append(len(rows))
        if len(calls) == 1:
            raise exc.OperationalError("INSERT INTO request_log ...", {}, Exception("simulated: database is locked"))
        return real(rows)

    monkeypatch.setattr(store.requests, "log", flaky)
    logger = RequestLogger(store, batch_rows=1000, flush_interval_ms=60_000)
    for i in range(50):
        logger.log(row(i))
    assert logger.flush(timeout=30)
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
    real, release = store.requests.log, threading.Event()

    def hanging(rows):  # simulated: a database that does not answer until released
        release.wait()
        return real(rows)

    monkeypatch.setattr(store.requests, "log", hanging)
    logger = RequestLogger(store, batch_rows=2, flush_interval_ms=0, max_pending=5)
    accepted, returned = [], threading.Event()

    def calls():  # while the database hangs: if log() waited for it, this would not return before release
        accepted.extend(logger.log(row(i)) for i in range(8))
        returned.set()

    threading.Thread(target=calls, daemon=True).start()
    assert returned.wait(30)
    assert not release.is_set() and accepted == [True] * 5 + [False] * 3 and logger.dropped == 3 and logger.pending == 5
    assert logger.flush(timeout=0.1) is False
    release.set()
    assert logger.close() == 0
    assert ids(store) == [f"r{i}" for i in range(5)] and logger.written == 5


def test_wrong_columns_fail_in_the_caller(store):
    with RequestLogger(store) as logger:
        with pytest.raises(ValueError, match="request_log has no column user"):
            logger.log({**row(1), "user": "x"})
        with pytest.raises(ValueError, match="without request_id"):
            logger.log({"route": "/", "status_code": 200})


# ---------------------------------------------------------------------------------------------- the journal

def test_journal_rows_are_on_disk_when_the_future_is_done_and_replay_skips_stored_and_torn_rows(store, tmp_path,
                                                                                              monkeypatch):
    from lmops.serve import requestlog
    from lmops.serve.requestlog import Journal, replay_journal

    journal = tmp_path / "journal"
    monkeypatch.setattr(store.requests, "log", lambda rows: (_ for _ in ()).throw(exc.OperationalError("", {}, None)))
    logger = RequestLogger(store, journal_dir=journal)  # the database is down: nothing reaches it
    futures = [logger.log_durably(row(i)) for i in range(20)]
    for f in futures:
        f.result(timeout=30)
    assert [r["request_id"] for r in Journal.read(journal)] == [f"r{i}" for i in range(20)]  # on disk, in order
    monkeypatch.undo()
    store.requests.log([requestlog.request_row(row(3))])  # one of them did reach the store before the "crash"
    (journal / "journal-999999999999.jsonl").write_bytes(b'{"seq": 20, "row": {"request_id": "r2')  # torn
    assert replay_journal(store, journal) == 19
    assert ids(store) == sorted(f"r{i}" for i in range(20)) and not list(journal.glob("*.jsonl"))


def test_journal_segments_are_deleted_once_stored(store, tmp_path, monkeypatch):
    from lmops.serve import requestlog

    monkeypatch.setattr(requestlog, "SEGMENT_BYTES", 2_000)
    journal = tmp_path / "journal"
    with RequestLogger(store, journal_dir=journal, flush_interval_ms=0) as logger:
        for i in range(200):
            logger.log_durably(row(i, prompt="p" * 100)).result(timeout=30)
        assert logger.flush(timeout=30)
        assert wait_for_files(journal, at_most=1)  # closed segments go once their rows are stored
    assert not list(journal.glob("*.jsonl")) and len(ids(store)) == 200  # close: all stored, journal gone


def wait_for_files(folder, at_most: int, timeout: float = 30.0) -> bool:
    cond = threading.Condition()
    end = time.monotonic() + timeout
    with cond:  # polled: file deletion has no event to wait on
        while len(list(folder.glob("*.jsonl"))) > at_most:
            if time.monotonic() > end:
                return False
            cond.wait(0.01)
    return True


def test_every_answered_request_is_in_the_log_after_kill_9(env, tmp_path):
    """A real `serve` process under load, killed with SIGKILL mid-load: every request that got a complete
    response (whole JSON, or a stream up to [DONE]) is in the store once its journal is replayed."""
    import json
    import signal
    import subprocess

    import httpx

    from lmops.serve.requestlog import replay_journal

    port = free_port()
    proc = subprocess.Popen(serve_command(env.ws.root, env.model_dir, port, "auth.rate_limit_per_s=1000",
                                          "auth.burst=1000"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url, key = f"http://127.0.0.1:{port}", env.keys["inference"]
    answered: list[str] = []
    enough, lock = threading.Event(), threading.Lock()
    try:
        with httpx.Client(timeout=5) as c:
            end = time.monotonic() + 120
            while True:
                try:
                    if c.get(f"{url}/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < end and proc.poll() is None, "the server did not start"
                threading.Event().wait(0.05)

        def load(worker: int) -> None:
            with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as c:
                for i in range(10_000):
                    body = {"model": "tiny", "prompt": f"hello {worker} {i}", "max_tokens": 8, "stream": i % 2 == 1}
                    try:
                        r = c.post("/v1/completions", json=body)
                        if r.status_code != 200:
                            continue
                        if body["stream"]:
                            assert r.text.endswith("data: [DONE]\n\n")
                            rid = json.loads(r.text.split("\n\n")[0].removeprefix("data: "))["id"]
                        else:
                            rid = r.json()["id"]
                    except (httpx.TransportError, ValueError):
                        return  # the server is gone
                    with lock:
                        answered.append(rid.removeprefix("cmpl-"))
                        if len(answered) >= 60:
                            enough.set()

        workers = [threading.Thread(target=load, args=(w,)) for w in range(4)]
        for w in workers:
            w.start()
        assert enough.wait(120), "the load did not get going"
        proc.send_signal(signal.SIGKILL)
        for w in workers:
            w.join(60)
    finally:
        proc.kill()
        proc.wait(30)
    replay_journal(env.store, env.ws.state / "request-journal" / str(port))
    stored = {r.request_id for r in env.store.requests.list(limit=100_000)}
    missing = [rid for rid in answered if rid not in stored]
    assert len(answered) >= 60 and not missing, f"{len(missing)} of {len(answered)} answered requests not logged"
