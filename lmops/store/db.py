"""The database under the metadata store: engine, session factory, column types, migrations.

One SQL database: a SQLite file in the workspace by default (nothing to run), PostgreSQL by URL for a
team. Tables are created and changed only by the Alembic migrations shipped in lmops/migrations, run
to head on open, so an older database is upgraded in place and the schema is exactly the one the
tests compare with the ORM rows of each domain module.
"""

from __future__ import annotations

import getpass
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import URL, DateTime, Dialect, Engine, MetaData, TypeDecorator, create_engine, event, make_url, text
from sqlalchemy.orm import DeclarativeBase

from lmops.errors import LmopsError

MIGRATIONS = Path(__file__).parent.parent / "migrations"
BUSY_TIMEOUT_S = 30  # SQLite: how long a writer waits for another one before giving up
CONNECT_TIMEOUT_S = 5  # PostgreSQL: a server that is down must fail fast, not hang the command
MIGRATION_LOCK = 0x6C6D6F7073  # PostgreSQL advisory lock key ("lmops"): one migrator at a time
VERSION_TABLE = "lmops_alembic_version"  # not alembic_version: MLflow's tables may share the database


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


def get_row(s: Any, model: type[Base], key: Any, what: str) -> Any:
    row = s.get(model, key)
    if row is None:
        raise LmopsError(f"no {what} {key} in the metadata store; list them to find its id")
    return row


def create(url: URL) -> Engine:
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


def migrate(engine: Engine) -> None:
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":  # two first opens at once must not both create the tables
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
        command.upgrade(alembic_config(conn), "head")
