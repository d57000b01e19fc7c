"""The metadata store: datasets, pipeline runs and their steps, the workspace lock, the audit log,
and for the server its API keys and request log.

One SQL database: a SQLite file in the workspace by default (nothing to run), PostgreSQL by URL for a
team. Tables are created and changed only by the Alembic migrations shipped in lmops/migrations, run
to head on open, so an older database is upgraded in place and the schema is exactly the one the
tests compare with the ORM below. Callers get frozen dataclasses, never ORM objects, so no session
outlives the method that opened it.

The audit log is append-only (database triggers refuse UPDATE and DELETE) and hash-chained: each
entry holds the hash of the one before, so an edit, a deletion or a reordering made by someone who
dropped the triggers is still found by `verify_audit`.

API keys are stored as a prefix (shown in listings, used to find the key) and a hash of the secret;
the secret itself is shown once, by `create_api_key`, and never stored or logged.
"""

from __future__ import annotations

import getpass
import hashlib
import hmac
import json
import os
import secrets
import socket
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.util import CommandError
from sqlalchemy import (
    JSON, URL, BigInteger, CheckConstraint, DateTime, Dialect, Engine, ForeignKey, Index, Integer, MetaData, Text,
    TypeDecorator, create_engine, delete, event, exc, insert, make_url, select, text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, selectinload, sessionmaker

from lmops.errors import LmopsError
from lmops.util import canonical_json, first_line, pid_alive

if TYPE_CHECKING:
    from lmops.config import Config
    from lmops.workspace import Workspace

MIGRATIONS = Path(__file__).with_name("migrations")
DB_FILE = "lmops.db"
GENESIS = "0" * 64  # prev_hash of the first audit entry
BUSY_TIMEOUT_S = 30  # SQLite: how long a writer waits for another one before giving up
CONNECT_TIMEOUT_S = 5  # PostgreSQL: a server that is down must fail fast, not hang the command
MIGRATION_LOCK = 0x6C6D6F7073  # PostgreSQL advisory lock key ("lmops"): one migrator at a time
VERSION_TABLE = "lmops_alembic_version"  # not alembic_version: MLflow's tables may share the database
FINISHED = ("succeeded", "failed", "cancelled", "skipped")
ROLES = ("inference", "deployer", "admin")  # lowest to highest: each may do what the ones before it may
KEY_PREFIX = "lmk_"  # marks an lmops key, so secret scanners and people can tell what leaked
PREFIX_CHARS = len(KEY_PREFIX) + 8  # the start of a secret kept in clear: 48 of its 256 bits, enough to find it


def utcnow() -> datetime:
    return datetime.now(UTC)


def default_actor() -> str:
    """Who the audit log names: LMOPS_USER (for CI and service accounts), else the OS user."""
    if user := os.environ.get("LMOPS_USER"):
        return user
    try:
        return getpass.getuser()
    except OSError:  # a container uid with no passwd entry
        return f"uid-{os.getuid()}"


def mask_url(url: str | URL) -> str:
    return make_url(url).render_as_string(hide_password=True)


# ---------------------------------------------------------------------------------------------- tables


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in and out: PostgreSQL keeps the zone, SQLite keeps none."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    # Named constraints, so later migrations can alter them by name on every database.
    metadata = MetaData(naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    })


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


class ApiKeyRow(Base):
    __tablename__ = "api_keys"
    __table_args__ = (CheckConstraint(f"role IN {ROLES!r}", name="ck_api_keys_role"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]
    role: Mapped[str]
    prefix: Mapped[str] = mapped_column(unique=True)  # verify_api_key finds the key by it
    # sha256 of the whole secret. A fast hash is right here: the secret is 256 random bits, so there is no
    # dictionary to try and no brute force to slow down; slow hashes (bcrypt, argon2) protect low-entropy
    # passwords, and would add their deliberate ~100 ms to every request on a cache miss.
    hash: Mapped[str]
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    created_by: Mapped[str]
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class RequestLogRow(Base):
    __tablename__ = "request_log"
    # BIGINT: a busy server passes 2**31 requests; SQLite autoincrements only an INTEGER primary key.
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer(), "sqlite"), primary_key=True)
    ts: Mapped[datetime] = mapped_column(UTCDateTime, index=True)  # when the request arrived
    request_id: Mapped[str] = mapped_column(index=True)
    key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id"), index=True)  # None: auth disabled
    model: Mapped[str | None]
    model_version: Mapped[str | None]
    endpoint: Mapped[str]
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


# ---------------------------------------------------------------------------------------------- entities


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


@dataclass(frozen=True)
class RequestRecord:
    """One served request, as the request log holds it."""

    id: int
    ts: datetime
    request_id: str
    key_id: int | None
    model: str | None
    model_version: str | None
    endpoint: str
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


# The columns a request_log row is given (id is the database's), and those it cannot do without.
REQUEST_FIELDS = tuple(c.name for c in RequestLogRow.__table__.columns if c.name != "id")
REQUEST_REQUIRED = ("request_id", "endpoint", "status_code")


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


def _dataset(row: DatasetRow) -> DatasetRecord:
    return DatasetRecord(row.id, row.short_id, row.path, row.parent, row.documents, row.created_by,
                         row.created_at, row.summary)


def _step(row: StepRunRow) -> StepRun:
    return StepRun(row.id, row.run_id, row.name, row.cache_key, row.status, row.cached, row.outputs, row.error,
                   row.started_at, row.finished_at, row.duration_s)


def _run(row: PipelineRunRow) -> PipelineRun:
    return PipelineRun(row.id, row.config_hash, row.status, row.started_by, row.started_at, row.finished_at,
                       row.duration_s, row.error, tuple(_step(s) for s in row.steps))


def _lock(row: LockRow) -> LockHolder:
    return LockHolder(row.name, row.holder, row.pid, row.host, row.acquired_at)


def audit_hash(seq: int, timestamp: str, actor: str, action: str, subject: str, details: dict[str, Any],
               reason: str | None, prev_hash: str) -> str:
    """sha256 of the canonical JSON of every field of an entry, its predecessor's hash included."""
    fields = dict(seq=seq, timestamp=timestamp, actor=actor, action=action, subject=subject, details=details,
                  reason=reason, prev_hash=prev_hash)
    return hashlib.sha256(canonical_json(fields).encode("utf-8")).hexdigest()


def _api_key(row: ApiKeyRow) -> ApiKey:
    return ApiKey(row.id, row.name, row.role, row.prefix, row.created_at, row.created_by, row.revoked_at)


def _key_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def _request(row: RequestLogRow) -> RequestRecord:
    return RequestRecord(**{k: getattr(row, k) for k in ("id", *REQUEST_FIELDS)})


def _audit(row: AuditRow) -> AuditEntry:
    return AuditEntry(row.seq, row.timestamp, row.actor, row.action, row.subject, json.loads(row.details),
                      row.reason, row.prev_hash, row.hash)


# ---------------------------------------------------------------------------------------------- engine


def _create_engine(url: URL) -> Engine:
    if url.get_backend_name() != "sqlite":
        return create_engine(url, connect_args={"connect_timeout": CONNECT_TIMEOUT_S}, pool_pre_ping=True)
    engine = create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_S})

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # sqlite3 must not emit its own deferred BEGIN; _begin does
        dbapi_conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_S * 1000}")
        dbapi_conn.execute("PRAGMA foreign_keys = ON")
        dbapi_conn.execute("PRAGMA journal_mode = WAL")  # readers never wait for the writer

    @event.listens_for(engine, "begin")
    def _begin(conn: Any) -> None:
        # Take the write lock up front: two writers then queue on busy_timeout instead of one failing
        # when it upgrades a read lock, and read-then-append (the audit chain) is serialised.
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def alembic_config(connection: Any) -> AlembicConfig:
    """Alembic config for the migrations shipped in the package, run on `connection` (no alembic.ini).

    New revision: `command.revision(alembic_config(conn), "what changed", autogenerate=True)` on a
    store at head, then edit the generated file in lmops/migrations/versions.
    """
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg


def _migrate(engine: Engine) -> None:
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":  # two first opens at once must not both create the tables
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
        command.upgrade(alembic_config(conn), "head")


# ---------------------------------------------------------------------------------------------- store


class Store:
    def __init__(self, engine: Engine):
        """Use Store.open or Store.for_workspace: they bring the schema up to date first."""
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    @classmethod
    def open(cls, url: str) -> Store:
        try:
            parsed = make_url(url)
        except exc.ArgumentError:
            raise LmopsError(
                "store.database_url is not a database URL; expected e.g. postgresql+psycopg://user@host:5432/lmops"
            ) from None
        if parsed.drivername == "postgresql":  # SQLAlchemy's default driver, psycopg2, is not a dependency
            parsed = parsed.set(drivername="postgresql+psycopg")
        shown = mask_url(parsed)
        if parsed.get_backend_name() not in ("sqlite", "postgresql"):
            raise LmopsError(f"store.database_url {shown}: only sqlite and postgresql databases are supported")
        if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        try:
            engine = _create_engine(parsed)
        except (ImportError, exc.NoSuchModuleError):
            raise LmopsError(
                f"no database driver for {shown}; install it with `pip install 'lmops[postgres]'`"
            ) from None
        try:
            _migrate(engine)
        except exc.DBAPIError as err:
            engine.dispose()
            raise LmopsError(
                f"cannot open the metadata store at {shown} ({first_line(err.orig)}); check store.database_url "
                "in lmops.yaml"
            ) from None
        except CommandError as err:
            engine.dispose()
            raise LmopsError(
                f"the metadata store at {shown} has a schema this lmops does not know ({first_line(err)}); "
                "upgrade lmops"
            ) from None
        return cls(engine)

    @classmethod
    def for_workspace(cls, ws: Workspace, cfg: Config | None = None) -> Store:
        """The workspace's store: store.database_url, else .lmops/lmops.db. Relative SQLite paths are
        relative to the workspace, like every other path in lmops.yaml."""
        url = (cfg or ws.config()).store.database_url
        if url is None:
            return cls.open(URL.create("sqlite", database=str(ws.state / DB_FILE)).render_as_string())
        try:
            parsed = make_url(url)
        except exc.ArgumentError:
            return cls.open(url)  # open() words the error
        if parsed.get_backend_name() == "sqlite" and parsed.database and parsed.database != ":memory:":
            url = parsed.set(database=str(ws.resolve(parsed.database))).render_as_string(hide_password=False)
        return cls.open(url)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    @property
    def url(self) -> str:
        """The database URL with its password masked: safe to print."""
        return mask_url(self.engine.url)

    # ------------------------------------------------------------------------------------------ datasets

    def add_dataset(self, id: str, short_id: str, path: str | Path, parent: str | None, documents: int,
                    created_by: str, summary: dict[str, Any]) -> DatasetRecord:
        """Record a dataset version; adding the same id again returns the first record unchanged."""
        try:
            with self._sessions.begin() as s:
                if (row := s.get(DatasetRow, id)) is not None:
                    return _dataset(row)
                if parent is not None and s.get(DatasetRow, parent) is None:
                    raise LmopsError(
                        f"dataset {short_id}: its parent {parent} is not in the metadata store; add it first"
                    )
                row = DatasetRow(id=id, short_id=short_id, path=str(path), parent=parent, documents=documents,
                                 created_by=created_by, created_at=utcnow(), summary=summary)
                s.add(row)
                s.flush()
                return _dataset(row)
        except exc.IntegrityError:  # another process added the same id in between
            return self.get_dataset(id)

    def get_dataset(self, id_or_prefix: str) -> DatasetRecord:
        """By full id, short id, or a unique prefix of the id (as git takes commit hashes)."""
        if not id_or_prefix:
            raise LmopsError("no dataset id given; pass a dataset id or a prefix of one")
        with self._sessions.begin() as s:
            if (row := s.get(DatasetRow, id_or_prefix)) is not None:
                return _dataset(row)
            rows = s.scalars(
                select(DatasetRow).where(
                    (DatasetRow.short_id == id_or_prefix) | DatasetRow.id.startswith(id_or_prefix, autoescape=True)
                ).order_by(DatasetRow.created_at).limit(6)
            ).all()
            if len(rows) == 1:
                return _dataset(rows[0])
        if not rows:
            raise LmopsError(
                f"no dataset matches '{id_or_prefix}' in the metadata store; list the datasets to find its id"
            )
        listed = ", ".join(r.short_id for r in rows[:5]) + (", ..." if len(rows) > 5 else "")
        raise LmopsError(f"dataset '{id_or_prefix}' is ambiguous ({listed}); give more characters of the id")

    def list_datasets(self) -> list[DatasetRecord]:
        """Oldest first, so lineage reads downwards."""
        with self._sessions.begin() as s:
            return [_dataset(r) for r in s.scalars(select(DatasetRow).order_by(DatasetRow.created_at, DatasetRow.id))]

    # ------------------------------------------------------------------------------------------ pipeline runs

    def start_pipeline_run(self, config_hash: str, started_by: str) -> PipelineRun:
        with self._sessions.begin() as s:
            row = PipelineRunRow(config_hash=config_hash, status="running", started_by=started_by, started_at=utcnow())
            s.add(row)
            s.flush()
            return PipelineRun(row.id, config_hash, row.status, started_by, row.started_at, None, None, None, ())

    def finish_pipeline_run(self, run_id: int, status: str, error: str | None = None) -> PipelineRun:
        _check_status(status)
        with self._sessions.begin() as s:
            row = self._get(s, PipelineRunRow, run_id, "pipeline run")
            row.status, row.error, row.finished_at = status, error, utcnow()
            row.duration_s = (row.finished_at - row.started_at).total_seconds()
        return self.get_pipeline_run(run_id)

    def close_abandoned_runs(self, error: str) -> list[int]:
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

    def start_step(self, run_id: int, name: str, cache_key: str) -> StepRun:
        with self._sessions.begin() as s:
            self._get(s, PipelineRunRow, run_id, "pipeline run")
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
            row = self._get(s, StepRunRow, step_id, "step run")
            row.status, row.outputs, row.error, row.cached, row.finished_at = status, outputs, error, cached, utcnow()
            row.duration_s = (row.finished_at - row.started_at).total_seconds()
            s.flush()
            return _step(row)

    def list_pipeline_runs(self, limit: int = 20) -> list[PipelineRun]:
        """Newest first, each with its steps."""
        with self._sessions.begin() as s:
            rows = s.scalars(select(PipelineRunRow).options(selectinload(PipelineRunRow.steps))
                             .order_by(PipelineRunRow.id.desc()).limit(limit))
            return [_run(r) for r in rows]

    def get_pipeline_run(self, run_id: int) -> PipelineRun:
        with self._sessions.begin() as s:
            return _run(self._get(s, PipelineRunRow, run_id, "pipeline run"))

    def find_cached_step(self, name: str, cache_key: str) -> StepRun | None:
        """The latest succeeded step with this name and key: its outputs can stand in for a rerun."""
        with self._sessions.begin() as s:
            row = s.scalars(select(StepRunRow).where(StepRunRow.name == name, StepRunRow.cache_key == cache_key,
                                                     StepRunRow.status == "succeeded")
                            .order_by(StepRunRow.id.desc()).limit(1)).first()
            return _step(row) if row else None

    @staticmethod
    def _get(s: Any, model: type[Base], key: Any, what: str) -> Any:
        row = s.get(model, key)
        if row is None:
            raise LmopsError(f"no {what} {key} in the metadata store; list the pipeline runs to find its id")
        return row

    # ------------------------------------------------------------------------------------------ lock

    @contextmanager
    def pipeline_lock(self, name: str = "pipeline") -> Iterator[LockHolder]:
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

    # ------------------------------------------------------------------------------------------ audit log

    def audit(self, actor: str, action: str, subject: str, details: dict[str, Any] | None = None,
              reason: str | None = None) -> AuditEntry:
        """Append one entry, chained to the last one. Appends are serialised (SQLite: BEGIN IMMEDIATE;
        PostgreSQL: an EXCLUSIVE table lock, which still lets readers read) so the chain never forks."""
        details = json.loads(canonical_json(details or {}))  # what verify_audit will read back
        with self._sessions.begin() as s:
            if self.engine.dialect.name == "postgresql":
                s.execute(text("LOCK TABLE audit_log IN EXCLUSIVE MODE"))
            last = s.execute(select(AuditRow.seq, AuditRow.hash).order_by(AuditRow.seq.desc()).limit(1)).first()
            seq, prev_hash = (last.seq + 1, last.hash) if last else (1, GENESIS)
            timestamp = utcnow().isoformat(timespec="microseconds")
            digest = audit_hash(seq, timestamp, actor, action, subject, details, reason, prev_hash)
            s.add(AuditRow(seq=seq, timestamp=timestamp, actor=actor, action=action, subject=subject,
                           details=canonical_json(details), reason=reason, prev_hash=prev_hash, hash=digest))
        return AuditEntry(seq, timestamp, actor, action, subject, details, reason, prev_hash, digest)

    def list_audit(self, limit: int = 50, subject: str | None = None, action: str | None = None) -> list[AuditEntry]:
        """Newest first."""
        query = select(AuditRow).order_by(AuditRow.seq.desc()).limit(limit)
        if subject is not None:
            query = query.where(AuditRow.subject == subject)
        if action is not None:
            query = query.where(AuditRow.action == action)
        with self._sessions.begin() as s:
            return [_audit(r) for r in s.scalars(query)]

    def verify_audit(self) -> AuditVerification:
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

    # ------------------------------------------------------------------------------------------ API keys

    def create_api_key(self, name: str, role: str, created_by: str) -> tuple[ApiKey, str]:
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
                    row = ApiKeyRow(name=name, role=role, prefix=secret[:PREFIX_CHARS], hash=_key_hash(secret),
                                    created_at=utcnow(), created_by=created_by)
                    s.add(row)
                    s.flush()
                    key = _api_key(row)
                break
            except exc.IntegrityError:  # the prefix was drawn before (1 in 2**48 per key): draw again
                continue
        else:
            raise LmopsError("could not draw an unused API key prefix three times; try again")
        self.audit(created_by, "api_key.created", f"api_key:{key.prefix}", {"id": key.id, "name": name, "role": role})
        return key, secret

    def list_api_keys(self) -> list[ApiKey]:
        """Oldest first, revoked ones included (their revoked_at says so)."""
        with self._sessions.begin() as s:
            return [_api_key(r) for r in s.scalars(select(ApiKeyRow).order_by(ApiKeyRow.id))]

    def revoke_api_key(self, id_or_prefix: str | int, by: str) -> ApiKey:
        """Revoke by id or by prefix (as listed, or a unique start of it). Revoking a revoked key
        returns it unchanged, with no second audit entry."""
        with self._sessions.begin() as s:
            row = self._find_api_key(s, str(id_or_prefix).strip())
            if row.revoked_at is not None:
                return _api_key(row)
            row.revoked_at = utcnow()
            s.flush()
            key = _api_key(row)
        self.audit(by, "api_key.revoked", f"api_key:{key.prefix}", {"id": key.id, "name": key.name, "role": key.role})
        return key

    @staticmethod
    def _find_api_key(s: Any, ref: str) -> ApiKeyRow:
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

    def verify_api_key(self, secret: str) -> ApiKey | None:
        """The key whose secret this is, or None (unknown, malformed or revoked). The key is found by
        its prefix, which is no secret (listings show it); the hash is then compared in constant time,
        so response times reveal nothing about the rest of the secret."""
        if not secret.startswith(KEY_PREFIX) or len(secret) <= PREFIX_CHARS:
            return None
        with self._sessions.begin() as s:
            row = s.scalars(select(ApiKeyRow).where(ApiKeyRow.prefix == secret[:PREFIX_CHARS])).first()
            if row is None or not hmac.compare_digest(row.hash, _key_hash(secret)) or row.revoked_at is not None:
                return None
            return _api_key(row)

    # ------------------------------------------------------------------------------------------ request log

    def log_requests(self, rows: list[Mapping[str, Any]]) -> int:
        """Insert rows (see request_row) in one transaction: all of them or, on an error, none."""
        if not rows:
            return 0
        clean = [request_row(r) for r in rows]
        with self._sessions.begin() as s:
            s.execute(insert(RequestLogRow), clean)
        return len(clean)

    def list_requests(self, limit: int = 100, since: datetime | None = None) -> list[RequestRecord]:
        """Newest first; since: only requests that arrived at or after it."""
        query = select(RequestLogRow).order_by(RequestLogRow.ts.desc(), RequestLogRow.id.desc()).limit(limit)
        if since is not None:
            query = query.where(RequestLogRow.ts >= since)
        with self._sessions.begin() as s:
            return [_request(r) for r in s.scalars(query)]


def _check_status(status: str) -> None:
    if status not in FINISHED:
        raise ValueError(f"status {status!r}: expected one of {', '.join(FINISHED)}")
