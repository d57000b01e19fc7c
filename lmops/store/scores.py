"""Answer scores: how good each scored answer was, measured off the live path (lmops/serve/shadow.py).

A live answer of a sampled request gets one row (role 'live'); a request mirrored to a shadow deployment
gets a second row with the same request_id (role 'shadow'), so a pair is two rows. The numbers are what
a canary analysis and `lmops endpoint compare` read:

- prompt_nll: mean negative log-likelihood per token of the prompt under the model that answered (how
  well the model predicts the traffic it serves; lower is better);
- answer_nll: mean negative log-likelihood per token of the answer under one reference model (the
  endpoint's stable deployment), the same judge for both sides of a pair;
- agree: for a shadow row, whether its greedy answer equals the live one's (None: not greedy).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, Index, Integer, insert, select
from sqlalchemy.orm import Mapped, mapped_column, sessionmaker

from lmops.store.db import Base, UTCDateTime, utcnow

ROLES = ("live", "shadow")


class AnswerScoreRow(Base):
    __tablename__ = "answer_scores"
    __table_args__ = (Index("ix_answer_scores_endpoint_ts", "endpoint", "ts"),)
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer(), "sqlite"), primary_key=True)
    ts: Mapped[datetime] = mapped_column(UTCDateTime)  # when the request arrived
    request_id: Mapped[str] = mapped_column(index=True)
    endpoint: Mapped[str]
    deployment: Mapped[str]
    role: Mapped[str]
    model_version: Mapped[str | None]
    reference: Mapped[str | None]  # the deployment whose model scored answer_nll
    prompt_tokens: Mapped[int | None]
    completion_tokens: Mapped[int | None]
    prompt_nll: Mapped[float | None]
    answer_nll: Mapped[float | None]
    finish_reason: Mapped[str | None]
    flagged: Mapped[bool | None]  # moderation flagged the answer
    ttft_s: Mapped[float | None]
    latency_s: Mapped[float | None]
    agree: Mapped[bool | None]
    error: Mapped[str | None]


@dataclass(frozen=True)
class AnswerScore:
    id: int
    ts: datetime
    request_id: str
    endpoint: str
    deployment: str
    role: str
    model_version: str | None
    reference: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    prompt_nll: float | None
    answer_nll: float | None
    finish_reason: str | None
    flagged: bool | None
    ttft_s: float | None
    latency_s: float | None
    agree: bool | None
    error: str | None


SCORE_FIELDS = tuple(c.name for c in AnswerScoreRow.__table__.columns if c.name != "id")


class AnswerScores:
    def __init__(self, sessions: sessionmaker):
        self._sessions = sessions

    def add(self, rows: list[Mapping[str, Any]]) -> int:
        if not rows:
            return 0
        clean = []
        for r in rows:
            if unknown := r.keys() - set(SCORE_FIELDS):
                raise ValueError(f"answer_scores has no column {', '.join(sorted(unknown))}")
            if r.get("role") not in ROLES:
                raise ValueError(f"answer_scores role {r.get('role')!r}: one of {ROLES}")
            clean.append({k: r.get(k) for k in SCORE_FIELDS} | {"ts": r.get("ts") or utcnow()})
        with self._sessions.begin() as s:
            s.execute(insert(AnswerScoreRow), clean)
        return len(clean)

    def list(self, endpoint: str, since: datetime | None = None, until: datetime | None = None,
             deployment: str | None = None, limit: int = 100_000) -> list[AnswerScore]:
        """Oldest first."""
        query = select(AnswerScoreRow).where(AnswerScoreRow.endpoint == endpoint)
        if since is not None:
            query = query.where(AnswerScoreRow.ts >= since)
        if until is not None:
            query = query.where(AnswerScoreRow.ts < until)
        if deployment is not None:
            query = query.where(AnswerScoreRow.deployment == deployment)
        query = query.order_by(AnswerScoreRow.ts, AnswerScoreRow.id).limit(limit)
        with self._sessions.begin() as s:
            return [AnswerScore(**{k: getattr(r, k) for k in ("id", *SCORE_FIELDS)}) for r in s.scalars(query)]
