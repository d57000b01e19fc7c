"""The loop's runs: one row per alert the loop decided on (lmops/loop.py), and where that decision stands.

A run that retrains moves through its steps (triggered -> ingested -> trained -> evaluated -> deployed ->
canary -> done) and records each step's outputs in `details` before it takes the next, so a process
killed mid-way leaves a row another process continues from the step it was in. `owner` is the process
advancing it ("host:pid") and `heartbeat` when it last wrote: a run whose owner is gone is taken over.
A decision not to retrain (on_alert notify, cool-down, daily cap, a retrain already running) is a row
too, finished at once with its reason, so `lmops loop status` says why nothing happened.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Integer, Text, select, update
from sqlalchemy.orm import Mapped, mapped_column, sessionmaker

from lmops.errors import LmopsError
from lmops.store.db import Base, UTCDateTime, utcnow

_ID = BigInteger().with_variant(Integer(), "sqlite")
ACTIVE = ("running", "waiting")  # waiting: for a person's approval or for the canary to finish
FINISHED = ("succeeded", "stopped", "failed", "skipped")


class LoopRunRow(Base):
    __tablename__ = "loop_runs"
    id: Mapped[int] = mapped_column(_ID, primary_key=True)
    created: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    updated: Mapped[datetime] = mapped_column(UTCDateTime)
    endpoint: Mapped[str | None]
    alert_id: Mapped[int | None] = mapped_column(index=True)  # None: started by hand (`lmops loop retrain`)
    signal: Mapped[str | None]
    window_start: Mapped[datetime | None] = mapped_column(UTCDateTime)  # the production prompts it reads
    window_end: Mapped[datetime | None] = mapped_column(UTCDateTime)
    step: Mapped[str]  # the step it is in (or ended in)
    status: Mapped[str]  # running | waiting | succeeded | stopped | failed | skipped
    outcome: Mapped[str | None]  # promoted | rolled_back | gates_failed | notified | cooldown | ...
    reason: Mapped[str | None] = mapped_column(Text)
    actor: Mapped[str]
    owner: Mapped[str | None]
    heartbeat: Mapped[datetime | None] = mapped_column(UTCDateTime)
    details: Mapped[dict[str, Any]] = mapped_column(JSON)  # each step's outputs: dataset, version, rollout, ...


@dataclass(frozen=True)
class LoopRun:
    id: int
    created: datetime
    updated: datetime
    endpoint: str | None
    alert_id: int | None
    signal: str | None
    window_start: datetime | None
    window_end: datetime | None
    step: str
    status: str
    outcome: str | None
    reason: str | None
    actor: str
    owner: str | None
    heartbeat: datetime | None
    details: dict[str, Any]

    @property
    def active(self) -> bool:
        return self.status in ACTIVE


FIELDS = tuple(LoopRun.__dataclass_fields__)


def _record(r: LoopRunRow) -> LoopRun:
    return LoopRun(**{k: getattr(r, k) for k in FIELDS})


class LoopRuns:
    def __init__(self, sessions: sessionmaker):
        self._sessions = sessions

    def add(self, endpoint: str | None, actor: str, step: str, status: str, *, alert_id: int | None = None,
            signal: str | None = None, window_start: datetime | None = None, window_end: datetime | None = None,
            outcome: str | None = None, reason: str | None = None, owner: str | None = None,
            details: dict[str, Any] | None = None) -> LoopRun:
        now = utcnow()
        with self._sessions.begin() as s:
            r = LoopRunRow(created=now, updated=now, endpoint=endpoint, alert_id=alert_id, signal=signal,
                           window_start=window_start, window_end=window_end, step=step, status=status,
                           outcome=outcome, reason=reason, actor=actor, owner=owner,
                           heartbeat=now if owner else None, details=details or {})
            s.add(r)
            s.flush()
            return _record(r)

    def get(self, run_id: int) -> LoopRun:
        with self._sessions.begin() as s:
            r = s.get(LoopRunRow, run_id)
            if r is None:
                raise LmopsError(f"no loop run {run_id}; `lmops loop status` lists them")
            return _record(r)

    def list(self, limit: int = 50, endpoint: str | None = None, since: datetime | None = None,
             active: bool = False) -> list[LoopRun]:
        """Newest first."""
        q = select(LoopRunRow).order_by(LoopRunRow.id.desc()).limit(limit)
        if endpoint is not None:
            q = q.where(LoopRunRow.endpoint == endpoint)
        if since is not None:
            q = q.where(LoopRunRow.created >= since)
        if active:
            q = q.where(LoopRunRow.status.in_(ACTIVE))
        with self._sessions.begin() as s:
            return [_record(r) for r in s.scalars(q)]

    def last_alert_id(self) -> int:
        """The newest alert a loop run decided on (0: none yet): alerts after it are new to the loop."""
        q = select(LoopRunRow.alert_id).where(LoopRunRow.alert_id.is_not(None)).order_by(LoopRunRow.alert_id.desc())
        with self._sessions.begin() as s:
            return s.scalar(q.limit(1)) or 0

    def claim(self, run_id: int, owner: str, takeover_if) -> LoopRun | None:
        """The run for owner to advance: already its own, unowned, or its owner judged gone by
        takeover_if(LoopRun); None when another live process has it or it is finished."""
        with self._sessions.begin() as s:
            r = s.get(LoopRunRow, run_id, with_for_update=True)
            if r is None or r.status not in ACTIVE:
                return None
            if r.owner not in (None, owner) and not takeover_if(_record(r)):
                return None
            r.owner, r.heartbeat = owner, utcnow()
            return _record(r)

    def update(self, run_id: int, owner: str | None = None, details: dict[str, Any] | None = None,
               **changes: Any) -> LoopRun:
        """Write changes (details merged into the row's), as owner when given: refused if another process
        took the run over meanwhile."""
        with self._sessions.begin() as s:
            r = s.get(LoopRunRow, run_id, with_for_update=True)
            if r is None:
                raise LmopsError(f"no loop run {run_id}")
            if owner is not None and r.owner != owner:
                raise LmopsError(f"loop run {run_id} was taken over by {r.owner}; this process stops advancing it")
            for key, value in changes.items():
                setattr(r, key, value)
            if details:
                r.details = {**(r.details or {}), **details}
            r.updated = utcnow()
            if owner is not None:
                r.heartbeat = r.updated
            return _record(r)

    def release(self, run_id: int, owner: str) -> None:
        with self._sessions.begin() as s:
            s.execute(update(LoopRunRow).where(LoopRunRow.id == run_id, LoopRunRow.owner == owner)
                      .values(owner=None))
