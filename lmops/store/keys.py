"""The server's API keys: each stored as a prefix (shown in listings, used to find the key) and a hash
of the secret; the secret itself is shown once, by `create`, and never stored or logged."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import CheckConstraint, exc, select
from sqlalchemy.orm import Mapped, mapped_column, sessionmaker

from lmops.errors import LmopsError
from lmops.store.audit import AuditLog
from lmops.store.db import Base, UTCDateTime, utcnow

ROLES = ("inference", "deployer", "admin")  # lowest to highest: each may do what the ones before it may
KEY_PREFIX = "lmk_"  # marks an lmops key, so secret scanners and people can tell what leaked
PREFIX_CHARS = len(KEY_PREFIX) + 8  # the start of a secret kept in clear: 48 of its 256 bits, enough to find it


class ApiKeyRow(Base):
    __tablename__ = "api_keys"
    __table_args__ = (CheckConstraint(f"role IN {ROLES!r}", name="ck_api_keys_role"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]
    role: Mapped[str]
    prefix: Mapped[str] = mapped_column(unique=True)  # verify finds the key by it
    # sha256 of the whole secret. A fast hash is right here: the secret is 256 random bits, so there is no
    # dictionary to try and no brute force to slow down; slow hashes (bcrypt, argon2) protect low-entropy
    # passwords, and would add their deliberate ~100 ms to every request on a cache miss.
    hash: Mapped[str]
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    created_by: Mapped[str]
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


@dataclass(frozen=True)
class ApiKey:
    """An API key of the server, without its secret (only the secret's hash is stored)."""

    id: int
    name: str
    role: str
    prefix: str
    created_at: datetime
    created_by: str
    revoked_at: datetime | None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


def _key(row: ApiKeyRow) -> ApiKey:
    return ApiKey(row.id, row.name, row.role, row.prefix, row.created_at, row.created_by, row.revoked_at)


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


class ApiKeys:
    def __init__(self, sessions: sessionmaker, audit: AuditLog):
        self._sessions, self._audit = sessions, audit

    def create(self, name: str, role: str, created_by: str) -> tuple[ApiKey, str]:
        """A new key and its secret, `lmk_` + 43 URL-safe characters (256 random bits). The secret is
        returned this once: only its prefix and hash are stored, and the audit entry names the prefix."""
        if role not in ROLES:
            raise LmopsError(f"unknown role '{role}'; use one of {', '.join(ROLES)}")
        if not name.strip():
            raise LmopsError("an API key needs a name saying who or what uses it; pass one")
        for _ in range(3):
            secret = KEY_PREFIX + secrets.token_urlsafe(32)
            try:
                with self._sessions.begin() as s:
                    row = ApiKeyRow(name=name, role=role, prefix=secret[:PREFIX_CHARS], hash=_hash(secret),
                                    created_at=utcnow(), created_by=created_by)
                    s.add(row)
                    s.flush()
                    key = _key(row)
                break
            except exc.IntegrityError:  # the prefix was drawn before (1 in 2**48 per key): draw again
                continue
        else:
            raise LmopsError("could not draw an unused API key prefix three times; try again")
        self._audit.append(created_by, "api_key.created", f"api_key:{key.prefix}",
                           {"id": key.id, "name": name, "role": role})
        return key, secret

    def list(self) -> list[ApiKey]:
        """Oldest first, revoked ones included (their revoked_at says so)."""
        with self._sessions.begin() as s:
            return [_key(r) for r in s.scalars(select(ApiKeyRow).order_by(ApiKeyRow.id))]

    def revoke(self, id_or_prefix: str | int, by: str) -> ApiKey:
        """Revoke by id or by prefix (as listed, or a unique start of it). Revoking a revoked key
        returns it unchanged, with no second audit entry."""
        with self._sessions.begin() as s:
            row = _find(s, str(id_or_prefix).strip())
            if row.revoked_at is not None:
                return _key(row)
            row.revoked_at = utcnow()
            s.flush()
            key = _key(row)
        self._audit.append(by, "api_key.revoked", f"api_key:{key.prefix}",
                           {"id": key.id, "name": key.name, "role": key.role})
        return key

    def verify(self, secret: str) -> ApiKey | None:
        """The key whose secret this is, or None (unknown, malformed or revoked). The key is found by
        its prefix, which is no secret (listings show it); the hash is then compared in constant time,
        so response times reveal nothing about the rest of the secret."""
        if not secret.startswith(KEY_PREFIX) or len(secret) <= PREFIX_CHARS:
            return None
        with self._sessions.begin() as s:
            row = s.scalars(select(ApiKeyRow).where(ApiKeyRow.prefix == secret[:PREFIX_CHARS])).first()
            if row is None or not hmac.compare_digest(row.hash, _hash(secret)) or row.revoked_at is not None:
                return None
            return _key(row)


def _find(s: Any, ref: str) -> ApiKeyRow:
    rows: list[ApiKeyRow] = []
    if ref.isdigit():
        row = s.get(ApiKeyRow, int(ref))
        rows = [row] if row is not None else []
    elif ref.startswith(KEY_PREFIX):
        rows = list(s.scalars(select(ApiKeyRow).where(ApiKeyRow.prefix.startswith(ref, autoescape=True))
                              .order_by(ApiKeyRow.id).limit(6)))
    if len(rows) == 1:
        return rows[0]
    if not rows:
        raise LmopsError(f"no API key matches '{ref}'; list the keys and pass an id or a prefix (lmk_...)")
    listed = ", ".join(r.prefix for r in rows[:5]) + (", ..." if len(rows) > 5 else "")
    raise LmopsError(f"API key '{ref}' is ambiguous ({listed}); give more characters of the prefix")
