"""The request log writer: request handlers call `log(row)` and move on; a background thread writes
the rows to the store's request_log in batches.

- `log` never waits for the database: it appends to an in-memory buffer under a lock held for
  microseconds, and returns whether the row was accepted.
- A batch is written, in one transaction, when `batch_rows` rows are waiting or the oldest has
  waited `flush_interval_ms`; `flush()` and `close()` write what is waiting at once.
- A failed write keeps its rows, in order, and retries them with a growing pause (0.05 s doubling to
  5 s): a database restart or a locked SQLite file loses no accepted row.
- A batch the database refuses for what it holds (IntegrityError, DataError, a value that cannot be
  bound; e.g. a key_id that is no key) is written again row by row, and only the rows refused on their
  own are dropped (counted, and logged without their content): one bad row cannot stall the log.
- The buffer is bounded (`max_pending`): while the database is down for long, rows beyond it are
  refused (log returns False, `dropped` counts them) rather than exhausting memory.
- With a journal folder (`journal_dir`, what `lmops serve` uses), every accepted row is also appended to
  a local write-ahead journal, fsync'd in batches by a thread of its own: `log_durably` returns a
  future that is done once the row is on disk, and the server sends a response's last bytes only
  then. A crash (kill -9, power loss) thus loses no row whose response was complete: at the next
  start the journal is replayed into the store (rows the store already holds, by request_id, are
  skipped) and removed. Journal segments are deleted once every row in them is in the store. Without
  a journal, rows still pending when the process dies are lost; `close` returns how many.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import exc

from lmops.store import Store, request_row
from lmops.util import canonical_json, first_line

log = logging.getLogger(__name__)

MAX_BATCH_ROWS = 1000  # rows per INSERT transaction when many are waiting (after an outage)
RETRY_FIRST_S = 0.05
RETRY_MAX_S = 5.0
SEGMENT_BYTES = 4_000_000  # a journal segment is closed past this size, and deleted once stored


def _refused(err: BaseException) -> bool:
    """True when the database refused the rows themselves, so retrying them unchanged cannot help;
    anything else (connection lost, database locked, server restarting) is worth retrying."""
    if isinstance(err, (exc.IntegrityError, exc.DataError)):
        return True
    return isinstance(err, exc.StatementError) and not isinstance(err, exc.DBAPIError)  # a value that won't bind


class Journal:
    """An append-only local file of request-log rows, one JSON line each, fsync'd in batches.

    `append(row, seq)` queues a line and returns a future done once it is on disk; a thread writes and
    fsyncs whatever has queued meanwhile in one go (group commit: one fsync for many rows under load).
    Rows carry the logger's sequence number; `release(done)` deletes the closed segments whose rows all
    have a lower one (they are in the store). Segments are files journal-<first seq>.jsonl in folder.
    """

    def __init__(self, folder: Path, first_seq: int = 0):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._cond = threading.Condition()
        self._pending: list[tuple[int, bytes, concurrent.futures.Future]] = []
        self._closed: list[tuple[Path, int]] = []  # (segment, its last seq), oldest first
        self._open_segment(first_seq)
        self._last_seq = first_seq - 1
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="lmops-request-journal", daemon=True)
        self._thread.start()

    def _open_segment(self, seq: int) -> None:
        self._path = self.folder / f"journal-{seq:012d}.jsonl"
        self._file = open(self._path, "ab")

    def append(self, row: Mapping[str, Any], seq: int) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        line = (canonical_json({"seq": seq, "row": row}) + "\n").encode("utf-8", "replace")
        with self._cond:
            self._pending.append((seq, line, future))
            self._cond.notify()
        return future

    def release(self, done: int) -> None:
        """Rows with seq < done are in the store: delete the closed segments holding only such rows."""
        with self._cond:
            while self._closed and self._closed[0][1] < done:
                path, _ = self._closed.pop(0)
                path.unlink(missing_ok=True)

    def close(self, all_stored: bool) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join()
        self._file.close()
        if all_stored:  # nothing in any segment is missing from the store
            for path, _ in self._closed:
                path.unlink(missing_ok=True)
            self._path.unlink(missing_ok=True)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stop:
                    self._cond.wait()
                if not self._pending:
                    return
                batch, self._pending = self._pending, []
            try:
                self._file.write(b"".join(line for _, line, _ in batch))
                self._file.flush()
                os.fsync(self._file.fileno())
            except OSError as err:  # a full or failing disk: the rows are not durable; say so
                log.error("request journal: writing %d rows failed (%s)", len(batch), first_line(err))
                for _, _, future in batch:
                    future.set_exception(err)
                continue
            for _, _, future in batch:
                future.set_result(None)
            with self._cond:
                self._last_seq = batch[-1][0]
                if self._file.tell() > SEGMENT_BYTES:
                    self._file.close()
                    self._closed.append((self._path, self._last_seq))
                    self._open_segment(self._last_seq + 1)

    @staticmethod
    def read(folder: Path) -> list[dict[str, Any]]:
        """The rows of every segment in folder, in order; a line cut short by a crash is skipped."""
        rows = []
        for path in sorted(Path(folder).glob("journal-*.jsonl")):
            for line in path.read_bytes().splitlines():
                try:
                    row = json.loads(line)["row"]
                except (ValueError, KeyError, TypeError):
                    continue  # the torn last line of a crash: its response was never sent
                if isinstance(row.get("ts"), str):
                    row["ts"] = datetime.fromisoformat(row["ts"])
                rows.append(row)
        return rows


def replay_journal(store: Store, folder: Path) -> int:
    """Write the journal's rows that the store does not hold yet (by request_id) and delete the journal.
    Returns how many rows were written."""
    folder = Path(folder)
    rows = Journal.read(folder) if folder.is_dir() else []
    written = 0
    if rows:
        since = min((r["ts"] for r in rows if r.get("ts") is not None), default=None)
        held = {r.request_id for r in store.requests.list(limit=10 * len(rows) + 1000, since=since)}
        fresh = list({r["request_id"]: r for r in rows if r["request_id"] not in held}.values())
        for start in range(0, len(fresh), MAX_BATCH_ROWS):
            written += store.requests.log(fresh[start:start + MAX_BATCH_ROWS])
        log.info("request journal: replayed %d rows into the store (%d were there already)", written,
                 len(rows) - written)
    for path in folder.glob("journal-*.jsonl") if folder.is_dir() else ():
        path.unlink()
    return written


class RequestLogger:
    """Batches request_log rows into `store` from a background thread (see the module docstring).

    Defaults: a batch every 100 rows or 200 ms, whichever comes first, so a busy server writes a few
    transactions a second and a quiet one shows a request in the log within a fifth of a second; at
    most 10,000 rows wait in memory (a few tens of MB with long prompts).
    """

    def __init__(self, store: Store, batch_rows: int = 100, flush_interval_ms: float = 200.0,
                 max_pending: int = 10_000, journal_dir: Path | None = None):
        if batch_rows < 1 or max_pending < 1 or flush_interval_ms < 0:
            raise ValueError("batch_rows and max_pending must be at least 1, flush_interval_ms at least 0")
        self.store = store
        self.batch_rows = batch_rows
        self.flush_interval_s = flush_interval_ms / 1000
        self.max_pending = max_pending
        self._cond = threading.Condition()
        self._rows: deque[tuple[float, dict[str, Any]]] = deque()  # (arrival, row), oldest first
        self._in_flight = 0  # rows taken by the writer and not yet resolved
        self._accepted = 0  # rows log() accepted, ever
        self._done = 0  # accepted rows resolved (written or refused by the database), oldest first
        self._flush_to = 0  # flush()/close(): write now until _done reaches this
        self._written = self._dropped = self._failures = 0
        self._closing = False
        self.replayed = replay_journal(store, journal_dir) if journal_dir is not None else 0
        self._journal = Journal(journal_dir) if journal_dir is not None else None
        self._thread = threading.Thread(target=self._run, name="lmops-request-log", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------------------ callers

    def log(self, row: Mapping[str, Any]) -> bool:
        """Queue one row (columns of lmops.store.RequestLogRow; ts defaults to now). False: refused,
        because the buffer is full or the logger is closed (counted in `dropped`). A wrong column name
        raises ValueError at once: that is a bug in the caller, not a database problem."""
        return self._log(row) is not None

    def log_durably(self, row: Mapping[str, Any]) -> concurrent.futures.Future | None:
        """log(row), and a future done once the row is in the journal on disk (at once without a
        journal); None when refused."""
        return self._log(row, durable=True)

    def _log(self, row: Mapping[str, Any], durable: bool = False) -> concurrent.futures.Future | None:
        clean = request_row(row)
        with self._cond:
            if self._closing or len(self._rows) + self._in_flight >= self.max_pending:
                self._dropped += 1
                return None
            self._rows.append((time.monotonic(), clean))
            seq = self._accepted
            self._accepted += 1
            if len(self._rows) == 1 or len(self._rows) >= self.batch_rows:  # start the timer, or batch is full
                self._cond.notify_all()
            if self._journal is not None:  # under the lock: the journal's order is the logger's
                return self._journal.append(clean, seq)
        done: concurrent.futures.Future = concurrent.futures.Future()
        if durable:
            done.set_result(None)
        return done

    def flush(self, timeout: float | None = None) -> bool:
        """Write every row accepted so far now; True once they are all written (or refused), False if
        `timeout` seconds pass first (the database is down: they stay queued)."""
        with self._cond:
            target = self._accepted
            self._flush_to = max(self._flush_to, target)
            self._cond.notify_all()
            return self._cond.wait_for(lambda: self._done >= target, timeout)

    def close(self, timeout: float = 10.0) -> int:
        """Stop accepting rows, write all waiting ones (retrying for up to `timeout` seconds) and stop
        the writer. Returns the number of rows still unwritten: 0 unless the database stayed down."""
        with self._cond:
            self._closing = True
            self._flush_to = self._accepted
            self._cond.notify_all()
        self._thread.join(timeout)
        left = self.pending
        if self._journal is not None:
            self._journal.close(all_stored=left == 0)  # else the next start replays what is left
        return left

    def __enter__(self) -> RequestLogger:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    @property
    def written(self) -> int:
        with self._cond:
            return self._written

    @property
    def dropped(self) -> int:
        """Rows lost: refused by log() (buffer full, closed) or by the database (invalid content)."""
        with self._cond:
            return self._dropped

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._rows) + self._in_flight

    @property
    def failures(self) -> int:
        """Failed write attempts (each retried): non-zero means the database had trouble."""
        with self._cond:
            return self._failures

    # ------------------------------------------------------------------------------------------ writer

    def _run(self) -> None:
        retry_at = 0.0  # after a failure, no write before this (monotonic time)
        pause = 0.0
        while True:
            with self._cond:
                while True:
                    if not self._rows:
                        if self._closing:
                            return
                        self._cond.wait()
                        continue
                    now = time.monotonic()
                    due_at = self._rows[0][0] + self.flush_interval_s
                    if len(self._rows) >= self.batch_rows or self._closing or self._flush_to > self._done:
                        due_at = now
                    start_at = max(due_at, retry_at)
                    if start_at <= now:
                        break
                    self._cond.wait(start_at - now)
                batch = [self._rows.popleft() for _ in range(min(len(self._rows), MAX_BATCH_ROWS))]
                self._in_flight = len(batch)
            written, refused = self._write([row for _, row in batch])
            with self._cond:
                resolved = written + refused
                self._rows.extendleft(reversed(batch[resolved:]))  # unwritten rows go back in front, in order
                self._in_flight = 0
                self._written += written
                self._dropped += refused
                self._done += resolved
                if self._journal is not None:
                    self._journal.release(self._done)
                if resolved < len(batch):
                    self._failures += 1
                    pause = min(max(pause * 2, RETRY_FIRST_S), RETRY_MAX_S)
                    retry_at = time.monotonic() + pause
                else:
                    pause, retry_at = 0.0, 0.0
                self._cond.notify_all()

    def _write(self, rows: list[dict[str, Any]]) -> tuple[int, int]:
        """(written, refused): together, how many of rows, from the front, are done with."""
        try:
            return self.store.requests.log(rows), 0
        except Exception as err:  # noqa: BLE001 - the writer thread must survive any database error
            if not _refused(err):
                log.warning("request log: writing %d rows failed (%s); kept, retrying", len(rows), first_line(err))
                return 0, 0
        written = refused = 0
        for row in rows:  # find the rows the database refuses, keep the others
            try:
                written += self.store.requests.log([row])
            except Exception as err:  # noqa: BLE001
                if not _refused(err):  # the database went away meanwhile: retry from this row on
                    log.warning("request log: writing rows failed (%s); kept, retrying", first_line(err))
                    break
                refused += 1
                log.warning("request log: dropped request %s, refused by the database (%s)",
                            row.get("request_id"), first_line(err))
        return written, refused
