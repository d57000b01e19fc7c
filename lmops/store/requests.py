"""The request log: one row per request the server answered (lmops/serve/requestlog.py writes it off
the hot path; monitoring reads it)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, ForeignKey, Index, Integer, Text, insert, select
from sqlalchemy.orm import Mapped, mapped_column, sessionmaker

from lmops.store.db import Base, UTCDateTime, utcnow


class RequestLogRow(Base):
    __tablename__ = "request_log"
    __table_args__ = (Index("ix_request_log_endpoint_ts", "endpoint", "ts"),)
    # BIGINT: a busy server passes 2**31 requests; SQLite autoincrements only an INTEGER primary key.
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer(), "sqlite"), primary_key=True)
    ts: Mapped[datetime] = mapped_column(UTCDateTime, index=True)  # when the request arrived
    request_id: Mapped[str] = mapped_column(index=True)
    key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id"), index=True)  # None: auth disabled
    model: Mapped[str | None]
    model_version: Mapped[str | None]
    route: Mapped[str]  # the HTTP path: /v1/completions, ...
    endpoint: Mapped[str | None]  # the lmops endpoint (lmops/deploy) and its deployment that answered
    deployment: Mapped[str | None]
    status_code: Mapped[int]
    error: Mapped[str | None] = mapped_column(Text)
    prompt: Mapped[str | None] = mapped_column(Text)  # as redacted by policy before it gets here
    completion: Mapped[str | None] = mapped_column(Text)
    prompt_tokens: Mapped[int | None]
    completion_tokens: Mapped[int | None]
    queue_s: Mapped[float | None]
    ttft_s: Mapped[float | None]
    latency_s: Mapped[float | None]
    moderation: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # lmops.safety.Moderation hits and action
    finish_reason: Mapped[str | None]  # stop, length, content_filter, ... (several choices: comma-separated)


@dataclass(frozen=True)
class RequestRecord:
    """One served request, as the request log holds it."""

    id: int
    ts: datetime
    request_id: str
    key_id: int | None
    model: str | None
    model_version: str | None
    route: str
    endpoint: str | None
    deployment: str | None
    status_code: int
    error: str | None
    prompt: str | None
    completion: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    queue_s: float | None
    ttft_s: float | None
    latency_s: float | None
    moderation: dict[str, Any] | None
    finish_reason: str | None


# The columns a request_log row is given (id is the database's), and those it cannot do without.
REQUEST_FIELDS = tuple(c.name for c in RequestLogRow.__table__.columns if c.name != "id")
REQUEST_REQUIRED = ("request_id", "route", "status_code")


def request_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """One request_log row checked and completed: every column present (a batch insert needs the same
    keys in each row), ts now if not given, NUL characters replaced (PostgreSQL text refuses them).
    A wrong key or a missing required value is a programming error: ValueError, at once."""
    if unknown := row.keys() - set(REQUEST_FIELDS):
        known = ", ".join(REQUEST_FIELDS)
        raise ValueError(f"request_log has no column {', '.join(sorted(unknown))}; columns: {known}")
    if missing := [k for k in REQUEST_REQUIRED if row.get(k) is None]:
        raise ValueError(f"request_log row without {', '.join(missing)}")
    out = {k: row.get(k) for k in REQUEST_FIELDS}
    if out["ts"] is None:
        out["ts"] = utcnow()
    for k, v in out.items():
        if isinstance(v, str) and "\x00" in v:
            out[k] = v.replace("\x00", "\ufffd")
    return out


def _window(query, since: datetime | None, until: datetime | None, endpoint: str | None):
    """query restricted to requests that arrived in [since, until) (either end open), of one endpoint."""
    if since is not None:
        query = query.where(RequestLogRow.ts >= since)
    if until is not None:
        query = query.where(RequestLogRow.ts < until)
    if endpoint is not None:
        query = query.where(RequestLogRow.endpoint == endpoint)
    return query


def _record(row: RequestLogRow) -> RequestRecord:
    return RequestRecord(**{k: getattr(row, k) for k in ("id", *REQUEST_FIELDS)})


class RequestLog:
    def __init__(self, sessions: sessionmaker):
        self._sessions = sessions

    def log(self, rows: list[Mapping[str, Any]]) -> int:
        """Insert rows (see request_row) in one transaction: all of them or, on an error, none."""
        if not rows:
            return 0
        clean = [request_row(r) for r in rows]
        with self._sessions.begin() as s:
            s.execute(insert(RequestLogRow), clean)
        return len(clean)

    def rows(self, since: datetime | None = None, until: datetime | None = None, endpoint: str | None = None,
             columns: tuple[str, ...] = REQUEST_FIELDS, limit: int | None = None, newest: bool = False) -> list[Any]:
        """Requests of [since, until) as named tuples of `columns`, oldest first (newest first with
        newest); one Core query without ORM objects: the monitor reads 100k rows in well under a second."""
        query = _window(select(*(RequestLogRow.__table__.c[c] for c in columns)), since, until, endpoint)
        key = (RequestLogRow.ts.desc(), RequestLogRow.id.desc()) if newest else (RequestLogRow.ts, RequestLogRow.id)
        query = query.order_by(*key)
        if limit is not None:
            query = query.limit(limit)
        with self._sessions.begin() as s:
            return list(s.execute(query))

    def get(self, request_id: str) -> RequestRecord | None:
        """The request with this request_id (the latest, should there be two), or None."""
        query = select(RequestLogRow).where(RequestLogRow.request_id == request_id).order_by(RequestLogRow.id.desc())
        with self._sessions.begin() as s:
            row = s.scalars(query.limit(1)).first()
            return None if row is None else _record(row)

    def list(self, limit: int = 100, since: datetime | None = None, until: datetime | None = None,
             endpoint: str | None = None) -> list[RequestRecord]:
        """Newest first; since/until: only requests that arrived in [since, until); endpoint: only those
        an lmops endpoint served."""
        query = _window(select(RequestLogRow), since, until, endpoint)
        query = query.order_by(RequestLogRow.ts.desc(), RequestLogRow.id.desc()).limit(limit)
        with self._sessions.begin() as s:
            return [_record(r) for r in s.scalars(query)]
