"""Pipeline runs and their steps in the metadata store, and the workspace lock that lets one run at
a time: what lmops/pipeline.py's runner records, and what its cache looks up."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, ForeignKey, Index, Text, delete, exc, select
from sqlalchemy.orm import Mapped, mapped_column, relationship, selectinload, sessionmaker

from lmops.errors import LmopsError
from lmops.store.db import Base, UTCDateTime, default_actor, get_row, utcnow
from lmops.util import pid_alive

FINISHED = ("succeeded", "failed", "cancelled", "skipped")


class PipelineRunRow(Base):
    __tablename__ = "pipeline_runs"
    id: Mapped[int] = mapped_column(primary_key=True)
    config_hash: Mapped[str]
    status: Mapped[str]
    started_by: Mapped[str]
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    duration_s: Mapped[float | None]
    error: Mapped[str | None] = mapped_column(Text)
    steps: Mapped[list[StepRunRow]] = relationship(order_by="StepRunRow.id")


class StepRunRow(Base):
    __tablename__ = "step_runs"
    __table_args__ = (Index(None, "name", "cache_key"),)  # find_cached_step
    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("pipeline_runs.id"), index=True)
    name: Mapped[str]
    cache_key: Mapped[str]
    status: Mapped[str]
    cached: Mapped[bool]
    outputs: Mapped[dict[str, Any]] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    duration_s: Mapped[float | None]


class LockRow(Base):
    __tablename__ = "locks"
    name: Mapped[str] = mapped_column(primary_key=True)  # the unique name is the lock
    holder: Mapped[str]
    pid: Mapped[int]
    host: Mapped[str]
    acquired_at: Mapped[datetime] = mapped_column(UTCDateTime)


@dataclass(frozen=True)
class StepRun:
    id: int
    run_id: int
    name: str
    cache_key: str
    status: str
    cached: bool
    outputs: dict[str, Any]
    error: str | None
    started_at: datetime
    finished_at: datetime | None
    duration_s: float | None


@dataclass(frozen=True)
class PipelineRun:
    id: int
    config_hash: str
    status: str
    started_by: str
    started_at: datetime
    finished_at: datetime | None
    duration_s: float | None
    error: str | None
    steps: tuple[StepRun, ...]


@dataclass(frozen=True)
class LockHolder:
    name: str
    holder: str
    pid: int
    host: str
    acquired_at: datetime


def _step(row: StepRunRow) -> StepRun:
    return StepRun(row.id, row.run_id, row.name, row.cache_key, row.status, row.cached, row.outputs, row.error,
                   row.started_at, row.finished_at, row.duration_s)


def _run(row: PipelineRunRow) -> PipelineRun:
    return PipelineRun(row.id, row.config_hash, row.status, row.started_by, row.started_at, row.finished_at,
                       row.duration_s, row.error, tuple(_step(s) for s in row.steps))


def _lock(row: LockRow) -> LockHolder:
    return LockHolder(row.name, row.holder, row.pid, row.host, row.acquired_at)


def _check_status(status: str) -> None:
    if status not in FINISHED:
        raise ValueError(f"status {status!r}: expected one of {', '.join(FINISHED)}")


class PipelineRuns:
    def __init__(self, sessions: sessionmaker):
        self._sessions = sessions

    # ------------------------------------------------------------------------------------------ runs

    def start_run(self, config_hash: str, started_by: str) -> PipelineRun:
        with self._sessions.begin() as s:
            row = PipelineRunRow(config_hash=config_hash, status="running", started_by=started_by, started_at=utcnow())
            s.add(row)
            s.flush()
            return PipelineRun(row.id, config_hash, row.status, started_by, row.started_at, None, None, None, ())

    def finish_run(self, run_id: int, status: str, error: str | None = None) -> PipelineRun:
        _check_status(status)
        with self._sessions.begin() as s:
            row = get_row(s, PipelineRunRow, run_id, "pipeline run")
            row.status, row.error, row.finished_at = status, error, utcnow()
            row.duration_s = (row.finished_at - row.started_at).total_seconds()
        return self.get_run(run_id)

    def close_abandoned(self, error: str) -> list[int]:
        """Mark every run still 'running' (and its running steps) failed with error; return their ids.
        For the holder of the pipeline lock: with it held, no other run can be alive."""
        with self._sessions.begin() as s:
            runs = list(s.scalars(select(PipelineRunRow).where(PipelineRunRow.status == "running")))
            now = utcnow()
            for row in runs:
                for step in s.scalars(select(StepRunRow).where(StepRunRow.run_id == row.id,
                                                               StepRunRow.status == "running")):
                    step.status, step.error, step.finished_at = "failed", error, now
                row.status, row.error, row.finished_at = "failed", error, now
            return [row.id for row in runs]

    def list_runs(self, limit: int = 20) -> list[PipelineRun]:
        """Newest first, each with its steps."""
        with self._sessions.begin() as s:
            rows = s.scalars(select(PipelineRunRow).options(selectinload(PipelineRunRow.steps))
                             .order_by(PipelineRunRow.id.desc()).limit(limit))
            return [_run(r) for r in rows]

    def get_run(self, run_id: int) -> PipelineRun:
        with self._sessions.begin() as s:
            return _run(get_row(s, PipelineRunRow, run_id, "pipeline run"))

    # ------------------------------------------------------------------------------------------ steps

    def start_step(self, run_id: int, name: str, cache_key: str) -> StepRun:
        with self._sessions.begin() as s:
            get_row(s, PipelineRunRow, run_id, "pipeline run")
            row = StepRunRow(run_id=run_id, name=name, cache_key=cache_key, status="running", cached=False,
                             outputs={}, started_at=utcnow())
            s.add(row)
            s.flush()
            return _step(row)

    def finish_step(self, step_id: int, status: str, outputs: dict[str, Any], error: str | None = None,
                    cached: bool = False) -> StepRun:
        """cached=True: the step was skipped because find_cached_step found its outputs."""
        _check_status(status)
        with self._sessions.begin() as s:
            row = get_row(s, StepRunRow, step_id, "step run")
            row.status, row.outputs, row.error, row.cached, row.finished_at = status, outputs, error, cached, utcnow()
            row.duration_s = (row.finished_at - row.started_at).total_seconds()
            s.flush()
            return _step(row)

    def find_cached_step(self, name: str, cache_key: str) -> StepRun | None:
        """The latest succeeded step with this name and key: its outputs can stand in for a rerun."""
        with self._sessions.begin() as s:
            row = s.scalars(select(StepRunRow).where(StepRunRow.name == name, StepRunRow.cache_key == cache_key,
                                                     StepRunRow.status == "succeeded")
                            .order_by(StepRunRow.id.desc()).limit(1)).first()
            return _step(row) if row else None

    # ------------------------------------------------------------------------------------------ the lock

    @contextmanager
    def lock(self, name: str = "pipeline") -> Iterator[LockHolder]:
        """Hold the workspace lock `name` for the block: a second holder fails at once, naming the first.

        A row in `locks`, not a database transaction, so the lock can be held for hours. A lock left by
        a process that died on this host is taken over; one from another host needs `break_lock`.
        """
        me = self._acquire(name)
        try:
            yield me
        finally:
            with self._sessions.begin() as s:
                s.execute(delete(LockRow).where(LockRow.name == name, LockRow.pid == me.pid, LockRow.host == me.host))

    def _acquire(self, name: str) -> LockHolder:
        host, pid = socket.gethostname(), os.getpid()
        for _ in range(3):  # insert; else take over a dead holder's row and insert again
            try:
                with self._sessions.begin() as s:
                    row = LockRow(name=name, holder=default_actor(), pid=pid, host=host, acquired_at=utcnow())
                    s.add(row)
                    s.flush()
                    return _lock(row)
            except exc.IntegrityError:
                pass
            with self._sessions.begin() as s:
                row = s.get(LockRow, name)
                if row is None:  # released in between
                    continue
                other = _lock(row)
                if other.host != host or pid_alive(other.pid):
                    break
                s.execute(delete(LockRow).where(LockRow.name == name, LockRow.pid == other.pid,
                                                LockRow.host == other.host))
        else:
            raise LmopsError(f"could not take the workspace lock '{name}': other processes keep taking it; try again")
        since = other.acquired_at.strftime("%Y-%m-%d %H:%M:%S UTC")
        raise LmopsError(
            f"another {name} run (pid {other.pid} on host {other.host} since {since}, by {other.holder}) holds the "
            f"workspace lock; wait for it to finish or, if that process is gone, run `lmops unlock`"
        )

    def lock_holder(self, name: str = "pipeline") -> LockHolder | None:
        with self._sessions.begin() as s:
            row = s.get(LockRow, name)
            return _lock(row) if row else None

    def lock_holder_alive(self, name: str = "pipeline") -> bool:
        """Whether lock `name` is held by a process that still exists (one on another host is taken
        to: this host cannot tell)."""
        holder = self.lock_holder(name)
        return holder is not None and (holder.host != socket.gethostname() or pid_alive(holder.pid))

    def break_lock(self, name: str = "pipeline") -> LockHolder | None:
        """Remove lock `name` whoever holds it (its holder died on another host); returns who held it."""
        with self._sessions.begin() as s:
            row = s.get(LockRow, name)
            if row is None:
                return None
            holder = _lock(row)
            s.delete(row)
            return holder
