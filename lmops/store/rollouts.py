"""Rollouts: one row per rollout of a deployment (lmops/deploy/rollout.py decides, this keeps).

The row holds everything a driver needs to continue after a restart: status, the current step and when
it started, the counts of consecutive inconclusive analyses, failures and measuring errors, every
analysis with its measurements, and the message a person reads.

Exactly one driver acts on a rollout, even with several server processes on one database: a lease in the
row (`driver`, `lease_until`), taken by one conditional UPDATE (free, already mine, or expired) and
renewed on every tick; a driver that dies loses it when it expires and another takes over. Every change
adds one to `version`, and a driver's write is conditional on the version it read, so a person's pause
or abort between a driver's read and its write wins and the driver decides again on the new state.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import JSON, Double, ForeignKey, Integer, Text, select, update
from sqlalchemy.orm import Mapped, mapped_column, sessionmaker

from lmops.errors import LmopsError
from lmops.store.db import Base, UTCDateTime, utcnow
from lmops.store.endpoints import EndpointRow

ACTIVE = ("running", "paused", "awaiting_approval")
TERMINAL = ("succeeded", "aborted", "undone")
STATUSES = ACTIVE + TERMINAL
STRATEGIES = ("canary", "blue-green")


class RolloutRow(Base):
    __tablename__ = "rollouts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    endpoint: Mapped[str] = mapped_column(ForeignKey("endpoints.name", ondelete="CASCADE"), index=True)
    target: Mapped[str]  # the new deployment
    stable: Mapped[str]  # the deployment that took most traffic when the rollout started
    strategy: Mapped[str]
    steps: Mapped[list[int]] = mapped_column(JSON)
    window_s: Mapped[float] = mapped_column(Double)
    status: Mapped[str] = mapped_column(index=True)
    step_index: Mapped[int] = mapped_column(Integer)
    step_started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)  # None: the step is not set yet
    analysed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)  # last analysis (or resume, approval check)
    inconclusive: Mapped[int] = mapped_column(Integer)  # consecutive inconclusive analyses of this step
    failures: Mapped[int] = mapped_column(Integer)  # failed analyses
    errors: Mapped[int] = mapped_column(Integer)  # consecutive errors while measuring
    analyses: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    message: Mapped[str] = mapped_column(Text)
    reason: Mapped[str | None] = mapped_column(Text)
    previous_traffic: Mapped[dict[str, int]] = mapped_column(JSON)
    champion_before: Mapped[str | None]  # the champion version the completion moved away from
    promoted_version: Mapped[str | None]  # the version the completion made champion
    driver: Mapped[str | None]
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    version: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    started_by: Mapped[str]
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


@dataclass(frozen=True)
class Rollout:
    id: int
    endpoint: str
    target: str
    stable: str
    strategy: str
    steps: list[int]
    window_s: float
    status: str
    step_index: int
    step_started_at: datetime | None
    analysed_at: datetime | None
    inconclusive: int
    failures: int
    errors: int
    analyses: list[dict[str, Any]]
    message: str
    reason: str | None
    previous_traffic: dict[str, int]
    champion_before: str | None
    promoted_version: str | None
    driver: str | None
    lease_until: datetime | None
    version: int
    started_at: datetime
    started_by: str
    updated_at: datetime
    finished_at: datetime | None

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    @property
    def share(self) -> int | None:
        """The canary's traffic share at the current step (None for blue-green)."""
        return self.steps[self.step_index] if self.strategy == "canary" and self.step_index < len(self.steps) else None


_FIELDS = tuple(f.name for f in fields(Rollout))
# What a driver may change with `advance` (the rest is fixed at start or is the lease's).
MUTABLE = ("status", "step_index", "step_started_at", "analysed_at", "inconclusive", "failures", "errors",
           "analyses", "message", "champion_before", "promoted_version", "finished_at")


def _record(row: RolloutRow) -> Rollout:
    return Rollout(**{k: getattr(row, k) for k in _FIELDS})


class Rollouts:
    def __init__(self, sessions: sessionmaker):
        self._sessions = sessions

    # ------------------------------------------------------------------------- reading

    def get(self, rollout_id: int) -> Rollout:
        with self._sessions.begin() as s:
            row = s.get(RolloutRow, rollout_id)
            if row is None:
                raise LmopsError(f"no rollout {rollout_id}")
            return _record(row)

    def latest(self, endpoint: str) -> Rollout | None:
        """The endpoint's newest rollout, whatever its status."""
        with self._sessions.begin() as s:
            row = s.scalars(select(RolloutRow).where(RolloutRow.endpoint == endpoint)
                            .order_by(RolloutRow.id.desc()).limit(1)).first()
            return None if row is None else _record(row)

    def active(self, endpoint: str | None = None) -> list[Rollout]:
        """Rollouts not finished (running, paused, awaiting approval), oldest first."""
        query = select(RolloutRow).where(RolloutRow.status.in_(ACTIVE)).order_by(RolloutRow.id)
        if endpoint is not None:
            query = query.where(RolloutRow.endpoint == endpoint)
        with self._sessions.begin() as s:
            return [_record(r) for r in s.scalars(query)]

    def list(self, endpoint: str | None = None, limit: int = 50) -> list[Rollout]:
        """Newest first."""
        query = select(RolloutRow).order_by(RolloutRow.id.desc()).limit(limit)
        if endpoint is not None:
            query = query.where(RolloutRow.endpoint == endpoint)
        with self._sessions.begin() as s:
            return [_record(r) for r in s.scalars(query)]

    # ------------------------------------------------------------------------- changing

    def create(self, endpoint: str, target: str, stable: str, strategy: str, steps: list[int], window_s: float,
               actor: str, previous_traffic: dict[str, int], reason: str | None = None,
               now: datetime | None = None) -> Rollout:
        """A new running rollout; refused while the endpoint has an active one (checked under the
        endpoint's row lock, so two starts at once cannot both succeed)."""
        if strategy not in STRATEGIES:
            raise LmopsError(f"--strategy {strategy}: use one of {', '.join(STRATEGIES)}")
        now = now or utcnow()
        with self._sessions.begin() as s:
            ep = s.scalars(select(EndpointRow).where(EndpointRow.name == endpoint).with_for_update()).first()
            if ep is None:
                raise LmopsError(f"no endpoint '{endpoint}'; create it with `lmops endpoint create {endpoint}`")
            busy = s.scalars(select(RolloutRow).where(RolloutRow.endpoint == endpoint,
                                                      RolloutRow.status.in_(ACTIVE))).first()
            if busy is not None:
                raise LmopsError(f"endpoint '{endpoint}' has rollout {busy.id} of {busy.target} {busy.status}; "
                                 f"finish it first (lmops rollout status|abort {endpoint})")
            row = RolloutRow(endpoint=endpoint, target=target, stable=stable, strategy=strategy, steps=list(steps),
                             window_s=float(window_s), status="running", step_index=0, step_started_at=None,
                             analysed_at=None, inconclusive=0, failures=0, errors=0, analyses=[],
                             message="starting", reason=reason, previous_traffic=dict(previous_traffic),
                             champion_before=None, promoted_version=None, driver=None, lease_until=None,
                             version=1, started_at=now, started_by=actor, updated_at=now, finished_at=None)
            s.add(row)
            s.flush()
            return _record(row)

    def acquire(self, rollout_id: int, driver: str, now: datetime, lease_s: float) -> bool:
        """Take or renew the lease on an active rollout: True if `driver` holds it until now + lease_s."""
        with self._sessions.begin() as s:
            result = s.execute(
                update(RolloutRow)
                .where(RolloutRow.id == rollout_id, RolloutRow.status.in_(ACTIVE),
                       (RolloutRow.driver.is_(None)) | (RolloutRow.driver == driver) | (RolloutRow.lease_until < now))
                .values(driver=driver, lease_until=now + timedelta(seconds=lease_s))
            )
            return result.rowcount == 1

    def release(self, rollout_id: int, driver: str) -> None:
        """Give the lease up (a driver stopping cleanly), so another may drive at once."""
        with self._sessions.begin() as s:
            s.execute(update(RolloutRow).where(RolloutRow.id == rollout_id, RolloutRow.driver == driver)
                      .values(driver=None, lease_until=None))

    def advance(self, rollout: Rollout, driver: str | None, now: datetime, **changes: Any) -> Rollout | None:
        """Write a decision: only if the row is still at rollout.version and (for a driver) its lease is
        still `driver`'s. None: someone changed it meanwhile (read it again and decide again). driver
        None: a person's command (pause, abort, ...), which needs no lease."""
        if unknown := set(changes) - set(MUTABLE):
            raise ValueError(f"a rollout's {', '.join(sorted(unknown))} cannot change")
        query = update(RolloutRow).where(RolloutRow.id == rollout.id, RolloutRow.version == rollout.version)
        if driver is not None:
            query = query.where(RolloutRow.driver == driver)
        values = dict(changes, version=rollout.version + 1, updated_at=now)
        if changes.get("status") in TERMINAL:
            values.update(driver=None, lease_until=None)
        with self._sessions.begin() as s:
            if s.execute(query.values(**values)).rowcount != 1:
                return None
            return _record(s.get(RolloutRow, rollout.id))
