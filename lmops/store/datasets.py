"""Dataset versions in the metadata store: which versions exist, where their files are, their parents.
The versions themselves (documents, manifest, report) are folders: lmops/data/dataset.py."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, ForeignKey, Text, exc, select
from sqlalchemy.orm import Mapped, mapped_column, sessionmaker

from lmops.errors import LmopsError
from lmops.store.db import Base, UTCDateTime, utcnow


class DatasetRow(Base):
    __tablename__ = "dataset_versions"
    id: Mapped[str] = mapped_column(primary_key=True)
    short_id: Mapped[str] = mapped_column(index=True)
    path: Mapped[str] = mapped_column(Text)
    parent: Mapped[str | None] = mapped_column(ForeignKey("dataset_versions.id"))
    documents: Mapped[int]
    created_by: Mapped[str]
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    summary: Mapped[dict[str, Any]] = mapped_column(JSON)


@dataclass(frozen=True)
class DatasetRecord:
    """One version of a dataset: its content id, where its files are, and what it was made from."""

    id: str
    short_id: str
    path: str
    parent: str | None
    documents: int
    created_by: str
    created_at: datetime
    summary: dict[str, Any]


def _record(row: DatasetRow) -> DatasetRecord:
    return DatasetRecord(row.id, row.short_id, row.path, row.parent, row.documents, row.created_by,
                         row.created_at, row.summary)


class Datasets:
    def __init__(self, sessions: sessionmaker):
        self._sessions = sessions

    def add(self, id: str, short_id: str, path: str | Path, parent: str | None, documents: int, created_by: str,
            summary: dict[str, Any]) -> DatasetRecord:
        """Record a dataset version; adding the same id again returns the first record unchanged."""
        try:
            with self._sessions.begin() as s:
                if (row := s.get(DatasetRow, id)) is not None:
                    return _record(row)
                if parent is not None and s.get(DatasetRow, parent) is None:
                    raise LmopsError(
                        f"dataset {short_id}: its parent {parent} is not in the metadata store; add it first"
                    )
                row = DatasetRow(id=id, short_id=short_id, path=str(path), parent=parent, documents=documents,
                                 created_by=created_by, created_at=utcnow(), summary=summary)
                s.add(row)
                s.flush()
                return _record(row)
        except exc.IntegrityError:  # another process added the same id in between
            return self.get(id)

    def get(self, id_or_prefix: str) -> DatasetRecord:
        """By full id, short id, or a unique prefix of the id (as git takes commit hashes)."""
        if not id_or_prefix:
            raise LmopsError("no dataset id given; pass a dataset id or a prefix of one")
        with self._sessions.begin() as s:
            if (row := s.get(DatasetRow, id_or_prefix)) is not None:
                return _record(row)
            rows = s.scalars(
                select(DatasetRow).where(
                    (DatasetRow.short_id == id_or_prefix) | DatasetRow.id.startswith(id_or_prefix, autoescape=True)
                ).order_by(DatasetRow.created_at).limit(6)
            ).all()
            if len(rows) == 1:
                return _record(rows[0])
        if not rows:
            raise LmopsError(
                f"no dataset matches '{id_or_prefix}' in the metadata store; list the datasets to find its id"
            )
        listed = ", ".join(r.short_id for r in rows[:5]) + (", ..." if len(rows) > 5 else "")
        raise LmopsError(f"dataset '{id_or_prefix}' is ambiguous ({listed}); give more characters of the id")

    def list(self) -> list[DatasetRecord]:
        """Oldest first, so lineage reads downwards."""
        with self._sessions.begin() as s:
            return [_record(r) for r in s.scalars(select(DatasetRow).order_by(DatasetRow.created_at, DatasetRow.id))]
