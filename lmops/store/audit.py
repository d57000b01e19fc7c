"""The audit log: every state change, who, when, what and why.

Append-only (database triggers, made by the migrations, refuse UPDATE and DELETE) and hash-chained:
each entry holds the hash of the one before, so an edit, a deletion or a reordering made by someone
who dropped the triggers is still found by `verify`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, Text, select, text
from sqlalchemy.orm import Mapped, mapped_column, sessionmaker

from lmops.store.db import Base, utcnow
from lmops.util import canonical_json

GENESIS = "0" * 64  # prev_hash of the first entry


class AuditRow(Base):
    __tablename__ = "audit_log"
    seq: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    timestamp: Mapped[str]  # UTC ISO 8601 text: hashed as stored, no round trip through a driver
    actor: Mapped[str]
    action: Mapped[str] = mapped_column(index=True)
    subject: Mapped[str] = mapped_column(index=True)
    details: Mapped[str] = mapped_column(Text)  # canonical JSON
    reason: Mapped[str | None] = mapped_column(Text)
    prev_hash: Mapped[str] = mapped_column(unique=True)  # two entries can never follow the same one
    hash: Mapped[str]


@dataclass(frozen=True)
class AuditEntry:
    seq: int
    timestamp: str
    actor: str
    action: str
    subject: str
    details: dict[str, Any]
    reason: str | None
    prev_hash: str
    hash: str


@dataclass(frozen=True)
class AuditVerification:
    ok: bool
    entries: int
    first_bad_seq: int | None = None
    reason: str | None = None


def audit_hash(seq: int, timestamp: str, actor: str, action: str, subject: str, details: dict[str, Any],
               reason: str | None, prev_hash: str) -> str:
    """sha256 of the canonical JSON of every field of an entry, its predecessor's hash included."""
    fields = dict(seq=seq, timestamp=timestamp, actor=actor, action=action, subject=subject, details=details,
                  reason=reason, prev_hash=prev_hash)
    return hashlib.sha256(canonical_json(fields).encode("utf-8")).hexdigest()


def _entry(row: AuditRow) -> AuditEntry:
    return AuditEntry(row.seq, row.timestamp, row.actor, row.action, row.subject, json.loads(row.details),
                      row.reason, row.prev_hash, row.hash)


class AuditLog:
    def __init__(self, engine: Engine, sessions: sessionmaker):
        self._engine, self._sessions = engine, sessions

    def append(self, actor: str, action: str, subject: str, details: dict[str, Any] | None = None,
               reason: str | None = None) -> AuditEntry:
        """Append one entry, chained to the last one. Appends are serialised (SQLite: BEGIN IMMEDIATE;
        PostgreSQL: an EXCLUSIVE table lock, which still lets readers read) so the chain never forks."""
        details = json.loads(canonical_json(details or {}))  # what verify will read back
        with self._sessions.begin() as s:
            if self._engine.dialect.name == "postgresql":
                s.execute(text("LOCK TABLE audit_log IN EXCLUSIVE MODE"))
            last = s.execute(select(AuditRow.seq, AuditRow.hash).order_by(AuditRow.seq.desc()).limit(1)).first()
            seq, prev_hash = (last.seq + 1, last.hash) if last else (1, GENESIS)
            timestamp = utcnow().isoformat(timespec="microseconds")
            digest = audit_hash(seq, timestamp, actor, action, subject, details, reason, prev_hash)
            s.add(AuditRow(seq=seq, timestamp=timestamp, actor=actor, action=action, subject=subject,
                           details=canonical_json(details), reason=reason, prev_hash=prev_hash, hash=digest))
        return AuditEntry(seq, timestamp, actor, action, subject, details, reason, prev_hash, digest)

    def list(self, limit: int = 50, subject: str | None = None, action: str | None = None) -> list[AuditEntry]:
        """Newest first."""
        query = select(AuditRow).order_by(AuditRow.seq.desc()).limit(limit)
        if subject is not None:
            query = query.where(AuditRow.subject == subject)
        if action is not None:
            query = query.where(AuditRow.action == action)
        with self._sessions.begin() as s:
            return [_entry(r) for r in s.scalars(query)]

    def verify(self) -> AuditVerification:
        """Walk the chain from the first entry: seqs 1, 2, 3... with no gap, each hash matching its
        entry's fields, each prev_hash matching the entry before. Cutting entries off the end leaves
        a valid shorter chain: compare `entries` with a count kept elsewhere to catch that."""
        expected, prev_hash = 1, GENESIS
        with self._sessions.begin() as s:
            for row in s.scalars(select(AuditRow).order_by(AuditRow.seq).execution_options(yield_per=1000)):
                bad = None
                if row.seq != expected:
                    bad = (expected, f"entry {expected} is missing (deleted or renumbered)")
                else:
                    try:
                        details = json.loads(row.details)
                    except ValueError:
                        details = None
                    if details is None or audit_hash(row.seq, row.timestamp, row.actor, row.action, row.subject,
                                                     details, row.reason, row.prev_hash) != row.hash:
                        bad = (row.seq, f"entry {row.seq} does not match its hash (edited or moved)")
                    elif row.prev_hash != prev_hash:
                        bad = (row.seq, f"entry {row.seq} does not follow entry {row.seq - 1} (an entry before it "
                                        "was changed, removed or moved)")
                if bad:
                    return AuditVerification(False, expected - 1, *bad)
                expected, prev_hash = expected + 1, row.hash
        return AuditVerification(True, expected - 1)
