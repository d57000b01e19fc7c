"""Monitoring: what `lmops monitor` measured, the alerts it raised, and the feedback users gave.

- monitor_results: one row per monitor run, deployment and signal (lmops/monitor/signals.py names
  them): the value, the threshold it was judged by, a p-value where the statistic has one, the sample
  sizes, the window and the reference; `alert` says whether it crossed. A run is the rows sharing a
  run_id.
- alerts: a signal past its threshold or a rule that held (lmops/monitor/alerts.py). Kept until
  delivered to monitor.webhook_url: `delivered_at` None with attempts > 0 is an undelivered alert a
  later run retries, so a dead webhook loses none.
- feedback: a score (0..1; thumbs up 1, down 0) and an optional comment on a served completion,
  by its request_id (POST /v1/feedback checks that it exists).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, Double, Index, Integer, Text, insert, select, update
from sqlalchemy.orm import Mapped, mapped_column, sessionmaker

from lmops.store.db import Base, UTCDateTime, utcnow

_ID = BigInteger().with_variant(Integer(), "sqlite")


class MonitorResultRow(Base):
    __tablename__ = "monitor_results"
    __table_args__ = (Index("ix_monitor_results_endpoint_signal_ts", "endpoint", "signal", "ts"),)
    id: Mapped[int] = mapped_column(_ID, primary_key=True)
    run_id: Mapped[str] = mapped_column(index=True)
    ts: Mapped[datetime] = mapped_column(UTCDateTime)  # when the run measured
    endpoint: Mapped[str | None]  # None: a model monitored without an endpoint (--model)
    deployment: Mapped[str | None]
    model_version: Mapped[str | None]
    signal: Mapped[str]
    kind: Mapped[str]  # prompts | embeddings | answers | operations | feedback
    value: Mapped[float | None] = mapped_column(Double)
    threshold: Mapped[float | None] = mapped_column(Double)  # None: reported, not judged
    p_value: Mapped[float | None] = mapped_column(Double)
    n_reference: Mapped[int | None]
    n_window: Mapped[int | None]
    window_start: Mapped[datetime] = mapped_column(UTCDateTime)
    window_end: Mapped[datetime] = mapped_column(UTCDateTime)
    reference: Mapped[str | None] = mapped_column(Text)  # what the window was compared with
    alert: Mapped[bool] = mapped_column(Boolean)
    details: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class AlertRow(Base):
    __tablename__ = "alerts"
    id: Mapped[int] = mapped_column(_ID, primary_key=True)
    ts: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    run_id: Mapped[str | None]
    endpoint: Mapped[str | None]
    deployment: Mapped[str | None]
    signal: Mapped[str]
    value: Mapped[float | None] = mapped_column(Double)
    threshold: Mapped[float | None] = mapped_column(Double)
    rule: Mapped[str | None] = mapped_column(Text)  # the rule that held; None: a calibrated threshold
    message: Mapped[str] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer)  # webhook deliveries tried
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(Text)


class FeedbackRow(Base):
    __tablename__ = "feedback"
    id: Mapped[int] = mapped_column(_ID, primary_key=True)
    ts: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    request_id: Mapped[str] = mapped_column(index=True)
    key_id: Mapped[int | None]  # who gave it (None: auth disabled)
    endpoint: Mapped[str | None]  # of the request it is about, copied so the monitor reads one table
    deployment: Mapped[str | None]
    model_version: Mapped[str | None]
    score: Mapped[float] = mapped_column(Double)  # 0..1
    comment: Mapped[str | None] = mapped_column(Text)


@dataclass(frozen=True)
class MonitorResult:
    id: int
    run_id: str
    ts: datetime
    endpoint: str | None
    deployment: str | None
    model_version: str | None
    signal: str
    kind: str
    value: float | None
    threshold: float | None
    p_value: float | None
    n_reference: int | None
    n_window: int | None
    window_start: datetime
    window_end: datetime
    reference: str | None
    alert: bool
    details: dict[str, Any] | None


@dataclass(frozen=True)
class Alert:
    id: int
    ts: datetime
    run_id: str | None
    endpoint: str | None
    deployment: str | None
    signal: str
    value: float | None
    threshold: float | None
    rule: str | None
    message: str
    attempts: int
    delivered_at: datetime | None
    last_error: str | None


@dataclass(frozen=True)
class Feedback:
    id: int
    ts: datetime
    request_id: str
    key_id: int | None
    endpoint: str | None
    deployment: str | None
    model_version: str | None
    score: float
    comment: str | None


def _fields(row_type) -> tuple[str, ...]:
    return tuple(c.name for c in row_type.__table__.columns)


RESULT_FIELDS, ALERT_FIELDS, FEEDBACK_FIELDS = _fields(MonitorResultRow), _fields(AlertRow), _fields(FeedbackRow)


def _clean(row: dict[str, Any], fields: tuple[str, ...], table: str) -> dict[str, Any]:
    if unknown := row.keys() - set(fields):
        raise ValueError(f"{table} has no column {', '.join(sorted(unknown))}")
    return {k: row.get(k) for k in fields if k != "id"}


class MonitorResults:
    def __init__(self, sessions: sessionmaker):
        self._sessions = sessions

    def add(self, rows: list[dict[str, Any]]) -> int:
        """One run's rows in one transaction (a run is all of its signals or none)."""
        if not rows:
            return 0
        clean = [_clean(r, RESULT_FIELDS, "monitor_results") | {"ts": r.get("ts") or utcnow(),
                                                                "alert": bool(r.get("alert"))} for r in rows]
        with self._sessions.begin() as s:
            s.execute(insert(MonitorResultRow), clean)
        return len(clean)

    def list(self, endpoint: str | None = None, signal: str | None = None, deployment: str | None = None,
             since: datetime | None = None, run_id: str | None = None, limit: int = 10_000) -> list[MonitorResult]:
        """Oldest first (the newest `limit` rows)."""
        q = select(MonitorResultRow)
        for col, value in ((MonitorResultRow.endpoint, endpoint), (MonitorResultRow.signal, signal),
                           (MonitorResultRow.deployment, deployment), (MonitorResultRow.run_id, run_id)):
            if value is not None:
                q = q.where(col == value)
        if since is not None:
            q = q.where(MonitorResultRow.ts >= since)
        q = q.order_by(MonitorResultRow.ts.desc(), MonitorResultRow.id.desc()).limit(limit)
        with self._sessions.begin() as s:
            rows = [MonitorResult(**{k: getattr(r, k) for k in RESULT_FIELDS}) for r in s.scalars(q)]
        return rows[::-1]

    def latest_run(self, endpoint: str | None = None) -> list[MonitorResult]:
        """The rows of the newest run (of an endpoint)."""
        q = select(MonitorResultRow.run_id).order_by(MonitorResultRow.ts.desc(), MonitorResultRow.id.desc()).limit(1)
        if endpoint is not None:
            q = q.where(MonitorResultRow.endpoint == endpoint)
        with self._sessions.begin() as s:
            run_id = s.scalar(q)
        return [] if run_id is None else self.list(run_id=run_id)


class Alerts:
    def __init__(self, sessions: sessionmaker):
        self._sessions = sessions

    def add(self, row: dict[str, Any]) -> Alert:
        clean = _clean(row, ALERT_FIELDS, "alerts") | {"ts": row.get("ts") or utcnow(),
                                                       "attempts": row.get("attempts") or 0}
        with self._sessions.begin() as s:
            r = AlertRow(**clean)
            s.add(r)
            s.flush()
            return self._record(r)

    @staticmethod
    def _record(r: AlertRow) -> Alert:
        return Alert(**{k: getattr(r, k) for k in ALERT_FIELDS})

    def list(self, limit: int = 100, endpoint: str | None = None, since: datetime | None = None,
             undelivered: bool = False) -> list[Alert]:
        """Newest first; undelivered: only those no webhook has received yet."""
        q = select(AlertRow).order_by(AlertRow.ts.desc(), AlertRow.id.desc()).limit(limit)
        if endpoint is not None:
            q = q.where(AlertRow.endpoint == endpoint)
        if since is not None:
            q = q.where(AlertRow.ts >= since)
        if undelivered:
            q = q.where(AlertRow.delivered_at.is_(None))
        with self._sessions.begin() as s:
            return [self._record(r) for r in s.scalars(q)]

    def attempted(self, alert_id: int, error: str | None) -> None:
        """One delivery tried: delivered (error None) or not, with why."""
        values: dict[str, Any] = {"attempts": AlertRow.attempts + 1, "last_error": error}
        if error is None:
            values["delivered_at"] = utcnow()
        with self._sessions.begin() as s:
            s.execute(update(AlertRow).where(AlertRow.id == alert_id).values(**values))


class FeedbackLog:
    def __init__(self, sessions: sessionmaker):
        self._sessions = sessions

    def add(self, row: dict[str, Any]) -> Feedback:
        clean = _clean(row, FEEDBACK_FIELDS, "feedback") | {"ts": row.get("ts") or utcnow()}
        if not 0.0 <= float(clean["score"]) <= 1.0:
            raise ValueError(f"feedback score {clean['score']}: between 0 and 1")
        with self._sessions.begin() as s:
            r = FeedbackRow(**clean)
            s.add(r)
            s.flush()
            return Feedback(**{k: getattr(r, k) for k in FEEDBACK_FIELDS})

    def list(self, endpoint: str | None = None, since: datetime | None = None, until: datetime | None = None,
             request_id: str | None = None, limit: int = 100_000) -> list[Feedback]:
        """Oldest first."""
        q = select(FeedbackRow)
        if endpoint is not None:
            q = q.where(FeedbackRow.endpoint == endpoint)
        if since is not None:
            q = q.where(FeedbackRow.ts >= since)
        if until is not None:
            q = q.where(FeedbackRow.ts < until)
        if request_id is not None:
            q = q.where(FeedbackRow.request_id == request_id)
        q = q.order_by(FeedbackRow.ts, FeedbackRow.id).limit(limit)
        with self._sessions.begin() as s:
            return [Feedback(**{k: getattr(r, k) for k in FEEDBACK_FIELDS}) for r in s.scalars(q)]
